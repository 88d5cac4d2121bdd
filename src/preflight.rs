//! Loading a config and the files it names, before anything uses it.
//!
//! `config` parses and checks values only (it is plain data and imports
//! nothing that does I/O). Whether the TLS certificate and key load,
//! whether the CA files parse, whether the passfiles and the admin token
//! file are readable (and private) is checked here, with the same error
//! shape as a bad value: the key and its line. `pgshift check`, `pgshift
//! run` and every live reload go through `load`, so a file that stopped
//! loading is rejected before a reload takes effect and the running config
//! is kept.

use std::path::Path;

use crate::config::{Config, ConfigError};

/// Reads, parses and validates a config file, then loads the files it
/// names (`check_files`).
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    Config::load_checked(path, check_files)
}

/// Loads every file the config names; the first that fails is reported
/// under its key.
pub fn check_files(cfg: &Config) -> Result<(), (String, String)> {
    let err = |k: &str, e: anyhow::Error| Err((k.to_string(), format!("{e:#}")));
    if let (Some(cert), Some(key)) = (&cfg.listen.tls_cert, &cfg.listen.tls_key) {
        if let Err(e) = crate::net::tls::server_config(cert, key) {
            return err("listen.tls_cert", e);
        }
    }
    for (name, u) in [("source", &cfg.source), ("target", &cfg.target)] {
        if let Some(ca) = &u.sslrootcert {
            if let Err(e) = crate::net::tls::load_roots(ca) {
                return err(&format!("{name}.sslrootcert"), e);
            }
        }
        // Clients authenticate to the source themselves; the proxy logs in
        // to the source only for shadow reads.
        if let Some(pf) = &u.passfile {
            if let Err(e) = crate::upstream::passfile::PassFile::load(pf) {
                return err(&format!("{name}.passfile"), e);
            }
        }
    }
    if let (Some(_), Some(tf)) = (cfg.admin.addr, &cfg.admin.token_file) {
        if let Err(e) = crate::private_files::read_token(tf) {
            return err("admin.token_file", e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = crate::config::MINIMAL_CONFIG;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_checked(text, "t", None, check_files)
    }

    #[test]
    fn a_missing_passfile_is_rejected_under_its_key() {
        // A source passfile is allowed (shadow reads log in with it), but
        // it must exist.
        let text = MINIMAL.replace("port = 54321", "port = 54321\npassfile = \"x\"");
        assert!(
            Config::parse(&text, "t", None).is_ok(),
            "config alone reads no file"
        );
        let e = parse(&text).unwrap_err();
        assert_eq!(
            (e.key.as_deref(), e.line),
            (Some("source.passfile"), Some(8))
        );
    }

    #[test]
    fn a_ca_file_that_does_not_load_is_rejected_under_its_key() {
        let text = MINIMAL.replace(
            "port = 54322",
            "port = 54322\nsslrootcert = \"/nonexistent/ca.pem\"",
        );
        let e = parse(&text).unwrap_err();
        assert_eq!(
            (e.key.as_deref(), e.line),
            (Some("target.sslrootcert"), Some(12))
        );
    }

    #[test]
    fn the_admin_token_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tf = dir.path().join("admin.token");
        std::fs::write(&tf, "tok\n").unwrap();
        std::fs::set_permissions(&tf, std::fs::Permissions::from_mode(0o640)).unwrap();
        let text = format!(
            "{MINIMAL}\n[admin]\nshow_data = true\ntoken_file = {:?}\n",
            tf.display().to_string()
        );
        let e = parse(&text).unwrap_err();
        assert_eq!(
            (e.key.as_deref(), e.line),
            (Some("admin.token_file"), Some(15))
        );
        assert!(e.message.contains("group or world access"), "{e}");
        std::fs::set_permissions(&tf, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = parse(&text).unwrap();
        assert!(c.admin.show_data);
    }
}
