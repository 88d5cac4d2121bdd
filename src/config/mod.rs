//! Configuration: the TOML file as plain data, its validation, and where
//! an error is.
//!
//! Every rejection names the key and the line, because an operator editing
//! a live proxy's file needs to know exactly what to fix. Validation here is
//! syntax and ranges only; opening the files the config points at
//! (certificates, passfiles, token files) is `preflight`'s, shared by
//! `pgshift check` and `run`. The connection sections (`listen`, `source`,
//! `target`, `admin`, `limits`, `log`, `runtime`, `audit`) are here; each
//! policy's section is in its own file (`mirror`, `routing`, `shadow`,
//! `failback`, `record`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod failback;
pub mod hosts;
mod mirror;
mod record;
pub mod require_auth;
mod routing;
mod shadow;

pub use failback::*;
pub use mirror::*;
pub use record::*;
pub use routing::*;
pub use shadow::*;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: ListenConfig,
    pub source: UpstreamConfig,
    pub target: UpstreamConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Write mirroring; absent = no mirror (and no spool directory).
    #[serde(default)]
    pub mirror: Option<MirrorConfig>,
    #[serde(default)]
    pub audit: AuditConfig,
    /// Read routing; every key changes live.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Shadow reads and result diffing; all but the sizes and the log path
    /// change live.
    #[serde(default)]
    pub shadow: ShadowConfig,
    /// The health monitor and automatic failback; every key changes live.
    #[serde(default)]
    pub failback: FailbackConfig,
    /// Recording client sessions for `pgshift replay`; every key changes
    /// live.
    #[serde(default)]
    pub record: RecordConfig,
}

/// The audit log (see `audit`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// JSON-lines file every change is appended to before it takes effect.
    #[serde(default = "default_audit_path")]
    pub path: PathBuf,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            path: default_audit_path(),
        }
    }
}

fn default_audit_path() -> PathBuf {
    PathBuf::from("pgshift-audit.jsonl")
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Session worker threads, each a single-threaded runtime (0 = one per core).
    #[serde(default)]
    pub worker_threads: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    pub addr: SocketAddr,
    /// PEM certificate chain and key: when both are set, clients may use TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// libpq's sslmode values that make sense for a proxy's own connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, plain otherwise; no verification.
    Prefer,
    /// TLS or fail; the certificate is not verified.
    Require,
    /// TLS, certificate chain verified against `sslrootcert`, host name not checked.
    VerifyCa,
    /// TLS, chain verified against `sslrootcert` and the host name checked.
    VerifyFull,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub host: String,
    pub port: u16,
    #[serde(default = "default_sslmode")]
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    /// pgpass-format credentials for the proxy's own logins (target only).
    pub passfile: Option<PathBuf>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Target only: open one connection to the target per client session.
    #[serde(default = "default_true")]
    pub session_links: bool,
    /// Target only: seconds between liveness pings on an idle session link.
    #[serde(default = "default_keepalive_s")]
    pub keepalive_s: u64,
    /// Authentication methods the proxy's own logins accept from this
    /// server, as libpq's `require_auth` (default: not `password`).
    #[serde(default)]
    pub require_auth: crate::config::require_auth::RequireAuth,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Where the admin HTTP API listens; omit to disable it.
    #[serde(default = "default_admin_addr")]
    pub addr: Option<SocketAddr>,
    /// A file holding the bearer token every admin request must carry
    /// (owner-only: a file group or others may read is refused).
    pub token_file: Option<PathBuf>,
    /// Host names (or `name:port`) accepted in the Host header besides the
    /// listen address, `localhost`, `127.0.0.1` and `[::1]`: every other
    /// Host is refused (421), against DNS rebinding.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Show statement texts, parameters and rows in `/status`,
    /// `/mismatches` and `/audit` as they are; needs `token_file`.
    /// Otherwise literals are replaced by `$n` and data by `<redacted>`.
    #[serde(default)]
    pub show_data: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            addr: default_admin_addr(),
            token_file: None,
            allowed_hosts: Vec::new(),
            show_data: false,
        }
    }
}

impl AdminConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((format!("admin.{k}"), m));
        if self.show_data && self.token_file.is_none() {
            return err(
                "show_data",
                "needs admin.token_file: data is only shown to requests that carry the token"
                    .into(),
            );
        }
        if let Some(h) = self
            .allowed_hosts
            .iter()
            .find(|h| !hosts::valid_allowed_host(h))
        {
            return err(
                "allowed_hosts",
                format!(
                    "{h:?} is not a host name, IP address or [IPv6] address with an optional :port"
                ),
            );
        }
        match (self.addr, &self.token_file) {
            (Some(addr), None) if !addr.ip().is_loopback() => err(
                "addr",
                "without admin.token_file the admin API may only listen on a loopback address"
                    .into(),
            ),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "default_max_clients")]
    pub max_client_connections: usize,
    /// Time a client has from connecting to its first ReadyForQuery.
    #[serde(default = "default_startup_timeout_ms")]
    pub startup_timeout_ms: u64,
    /// Close a client session silent for this long (0 = never, as Postgres).
    #[serde(default)]
    pub idle_timeout_s: u64,
    /// Largest message the proxy buffers whole to inspect it (Query, Parse).
    /// Messages it only forwards stream through under Postgres' own 1 GiB bound.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// On SIGTERM, how long open transactions may take to finish.
    #[serde(default = "default_shutdown_timeout_s")]
    pub shutdown_timeout_s: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_client_connections: default_max_clients(),
            startup_timeout_ms: default_startup_timeout_ms(),
            idle_timeout_s: 0,
            max_message_bytes: default_max_message_bytes(),
            shutdown_timeout_s: default_shutdown_timeout_s(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter (`info`, `pgshift=debug`, ...); `RUST_LOG` wins.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_log_level(),
        }
    }
}

fn default_sslmode() -> SslMode {
    SslMode::Prefer
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_true() -> bool {
    true
}
fn default_keepalive_s() -> u64 {
    30
}
fn default_admin_addr() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9930)))
}
fn default_max_clients() -> usize {
    10_000
}
fn default_startup_timeout_ms() -> u64 {
    10_000
}
fn default_max_message_bytes() -> usize {
    256 << 20
}
fn default_shutdown_timeout_s() -> u64 {
    30
}
fn default_log_level() -> String {
    "info".into()
}

/// A rejected config: which key, on which line, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub key: Option<String>,
    pub line: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads, parses and validates a config file (syntax and values only:
    /// the files it names are read by `preflight::load`, which `check`,
    /// `run` and every reload use).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_checked(path, |_| Ok(()))
    }

    /// `load`, then `check` on the result; an error it returns (a key and
    /// a message) is reported with that key's line like any other.
    pub fn load_checked(
        path: &Path,
        check: impl FnOnce(&Config) -> Result<(), (String, String)>,
    ) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: None,
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse_checked(&text, &file, path.parent(), check)
    }

    /// Parses and validates config text; relative paths resolve against `base`.
    pub fn parse(text: &str, file: &str, base: Option<&Path>) -> Result<Config, ConfigError> {
        Self::parse_checked(text, file, base, |_| Ok(()))
    }

    /// `parse`, then `check` (see `load_checked`).
    pub fn parse_checked(
        text: &str,
        file: &str,
        base: Option<&Path>,
        check: impl FnOnce(&Config) -> Result<(), (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            let (key, line) = match e.span() {
                Some(span) => locate_span(text, span.start),
                None => (None, None),
            };
            ConfigError {
                file: file.into(),
                key,
                line,
                message: e.message().trim().to_string(),
            }
        })?;
        if let Some(base) = base.filter(|b| !b.as_os_str().is_empty()) {
            cfg.resolve_paths(base);
        }
        cfg.validate()
            .and_then(|()| check(&cfg))
            .map_err(|(key, message)| ConfigError {
                file: file.into(),
                line: line_of_key(text, &key),
                key: Some(key),
                message,
            })?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut Option<PathBuf>| {
            if let Some(p) = p.as_mut().filter(|p| p.is_relative()) {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.listen.tls_cert);
        fix(&mut self.listen.tls_key);
        for u in [&mut self.source, &mut self.target] {
            fix(&mut u.sslrootcert);
            fix(&mut u.passfile);
        }
        fix(&mut self.admin.token_file);
        if self.audit.path.is_relative() {
            self.audit.path = base.join(&self.audit.path);
        }
        if self.shadow.mismatch_log.is_relative() {
            self.shadow.mismatch_log = base.join(&self.shadow.mismatch_log);
        }
        fix(&mut self.record.path);
        if let Some(m) = self.mirror.as_mut() {
            fix(&mut m.divergence_log);
            if m.spool_dir.is_relative() {
                m.spool_dir = base.join(&m.spool_dir);
            }
        }
    }

    /// Semantic checks; the error names the offending key.
    fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((k.to_string(), m));
        if self.audit.path.as_os_str().is_empty() {
            return err("audit.path", "must not be empty".into());
        }
        match (&self.listen.tls_cert, &self.listen.tls_key) {
            (Some(_), None) => {
                return err(
                    "listen.tls_key",
                    "tls_cert is set but tls_key is not".into(),
                )
            }
            (None, Some(_)) => {
                return err(
                    "listen.tls_cert",
                    "tls_key is set but tls_cert is not".into(),
                )
            }
            (Some(_), Some(_)) | (None, None) => {}
        }
        for (name, u) in [("source", &self.source), ("target", &self.target)] {
            if u.host.is_empty() {
                return err(&format!("{name}.host"), "must not be empty".into());
            }
            if u.sslmode == SslMode::VerifyFull
                && rustls::pki_types::ServerName::try_from(u.host.as_str()).is_err()
            {
                return err(
                    &format!("{name}.host"),
                    format!(
                        "{:?} is not a valid DNS name or IP address, so sslmode verify-full cannot check the server's certificate against it",
                        u.host
                    ),
                );
            }
            if u.port == 0 {
                return err(
                    &format!("{name}.port"),
                    "must be between 1 and 65535".into(),
                );
            }
            if !(1..=600_000).contains(&u.connect_timeout_ms) {
                return err(
                    &format!("{name}.connect_timeout_ms"),
                    "must be between 1 and 600000".into(),
                );
            }
            if matches!(u.sslmode, SslMode::VerifyCa | SslMode::VerifyFull)
                && u.sslrootcert.is_none()
            {
                return err(
                    &format!("{name}.sslrootcert"),
                    "verify-ca and verify-full need a CA file".into(),
                );
            }
        }
        if let Some(m) = &self.mirror {
            m.validate()?;
        }
        self.routing.validate()?;
        self.shadow.validate()?;
        self.failback.validate()?;
        self.record.validate()?;
        if !(1..=86_400).contains(&self.target.keepalive_s) {
            return err("target.keepalive_s", "must be between 1 and 86400".into());
        }
        self.admin.validate()?;
        let l = &self.limits;
        if !(1..=1_000_000).contains(&l.max_client_connections) {
            return err(
                "limits.max_client_connections",
                "must be between 1 and 1000000".into(),
            );
        }
        if !(1..=3_600_000).contains(&l.startup_timeout_ms) {
            return err(
                "limits.startup_timeout_ms",
                "must be between 1 and 3600000".into(),
            );
        }
        if l.idle_timeout_s > 31_536_000 {
            return err(
                "limits.idle_timeout_s",
                "must be at most 31536000 (0 = never)".into(),
            );
        }
        if l.shutdown_timeout_s > 86_400 {
            return err("limits.shutdown_timeout_s", "must be at most 86400".into());
        }
        if !(1024..=(1 << 30)).contains(&l.max_message_bytes) {
            return err(
                "limits.max_message_bytes",
                "must be between 1024 and 1073741824".into(),
            );
        }
        if self.runtime.worker_threads > 1024 {
            return err(
                "runtime.worker_threads",
                "must be at most 1024 (0 = one per core)".into(),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return err("log.level", format!("not a valid filter: {e}"));
        }
        Ok(())
    }
}

/// 1-based line of a byte offset.
fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// For a parse error at `offset`: the dotted key written on that line (under
/// the nearest table header above it) and the line number.
fn locate_span(text: &str, offset: usize) -> (Option<String>, Option<usize>) {
    let line_no = line_at(text, offset);
    let mut table = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if i + 1 == line_no {
            if t.starts_with('[') {
                return (
                    Some(t.trim_matches(|c| c == '[' || c == ']').trim().to_string()),
                    Some(line_no),
                );
            }
            let key = t
                .split('=')
                .next()
                .map(str::trim)
                .filter(|k| !k.is_empty() && !k.starts_with('#'));
            let key = key.map(|k| {
                if table.is_empty() {
                    k.to_string()
                } else {
                    format!("{table}.{k}")
                }
            });
            return (key.or(Some(table).filter(|t| !t.is_empty())), Some(line_no));
        }
        if t.starts_with('[') && !t.starts_with("[[") {
            table = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        }
    }
    (None, Some(line_no))
}

/// Line where a dotted key (or, failing that, its nearest parent) is written.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let doc = toml_edit::Document::parse(text).ok()?;
    let mut item = doc.as_item();
    let mut best = None;
    for part in key.split('.') {
        match item.get(part) {
            Some(next) => {
                item = next;
                if let Some(span) = item.span() {
                    best = Some(line_at(text, span.start));
                } else if let Some(span) = item.as_table().and_then(|t| t.span()) {
                    best = Some(line_at(text, span.start));
                }
            }
            None => break,
        }
    }
    best
}

/// The smallest valid config (the three required sections), for tests
/// here and in `preflight`.
#[cfg(test)]
pub(crate) const MINIMAL_CONFIG: &str = r#"
[listen]
addr = "127.0.0.1:6432"

[source]
host = "127.0.0.1"
port = 54321

[target]
host = "127.0.0.1"
port = 54322
"#;

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = MINIMAL_CONFIG;

    #[test]
    fn the_example_proxy_toml_is_valid_and_mirrors() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(root.join("proxy.toml")).unwrap();
        let c = Config::parse(&text, "proxy.toml", Some(root)).unwrap();
        let m = c.mirror.expect("proxy.toml has a [mirror] section");
        assert!(m.enabled);
        assert_eq!(m.spool_dir, root.join(".pgshift/spool"));
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, "t.toml", None).unwrap();
        assert_eq!(c.source.sslmode, SslMode::Prefer);
        assert_eq!(c.admin.addr, Some("127.0.0.1:9930".parse().unwrap()));
        assert_eq!(c.limits.max_client_connections, 10_000);
        assert!(c.target.session_links);
    }

    #[test]
    fn an_empty_or_partial_section_takes_each_default_from_default() {
        // [failback] and [shadow] take their defaults from one place, the
        // Default impl: an empty section is exactly it, and a key given
        // changes only that key.
        let text = format!("{MINIMAL}\n[failback]\n[shadow]\n");
        let c = Config::parse(&text, "t.toml", None).unwrap();
        assert_eq!(c.failback, FailbackConfig::default());
        assert_eq!(c.shadow, ShadowConfig::default());
        let text = format!("{MINIMAL}\n[failback]\nwindow_s = 7\n[shadow]\nqueue = 9\n");
        let c = Config::parse(&text, "t.toml", None).unwrap();
        assert_eq!(
            c.failback,
            FailbackConfig {
                window_s: 7,
                ..FailbackConfig::default()
            }
        );
        assert_eq!(
            c.shadow,
            ShadowConfig {
                queue: 9,
                ..ShadowConfig::default()
            }
        );
        assert_eq!(c.failback.max_error_rate, 0.05);
        assert_eq!(c.shadow.max_rows_compared, 100_000);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = MINIMAL.replace("port = 54322", "port = 54322\nprot = 1");
        let e = Config::parse(&text, "t.toml", None).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("target.prot"));
        assert_eq!(e.line, Some(12));
        assert!(e.message.contains("unknown field"), "{}", e.message);
        assert!(
            e.to_string().starts_with("t.toml:12: key `target.prot`"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let text = MINIMAL.replace("port = 54321", "port = \"x\"");
        let e = Config::parse(&text, "t.toml", None).unwrap_err();
        assert_eq!((e.key.as_deref(), e.line), (Some("source.port"), Some(7)));
    }

    #[test]
    fn semantic_error_names_key_and_line() {
        let text = MINIMAL.replace("port = 54321", "port = 54321\nsslmode = \"verify-full\"");
        let e = Config::parse(&text, "t.toml", None).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("source.sslrootcert"));
        // The key is absent: the line of its table is the best location.
        assert_eq!(e.line, Some(5));
        let text = MINIMAL.replace("port = 54322", "port = 0");
        let e = Config::parse(&text, "t.toml", None).unwrap_err();
        assert_eq!((e.key.as_deref(), e.line), (Some("target.port"), Some(11)));
    }

    #[test]
    fn a_public_admin_address_without_a_token_is_rejected() {
        let text = format!("{MINIMAL}\n[admin]\naddr = \"0.0.0.0:9930\"\n");
        let e = Config::parse(&text, "t", None).unwrap_err();
        assert_eq!((e.key.as_deref(), e.line), (Some("admin.addr"), Some(14)));
    }

    #[test]
    fn shadow_keys_are_checked_with_their_line() {
        for (line, key) in [
            ("sample_percent = 101", "shadow.sample_percent"),
            ("max_inflight = 0", "shadow.max_inflight"),
            ("float_tolerance = 1.5", "shadow.float_tolerance"),
            ("ignore_columns = [\"a.b.c\"]", "shadow.ignore_columns"),
            ("max_rows_compared = 0", "shadow.max_rows_compared"),
        ] {
            let text = format!("{MINIMAL}\n[shadow]\n{line}\n");
            let e = Config::parse(&text, "t", None).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{line}");
            assert_eq!(e.line, Some(14), "{line}");
        }
        let text = format!("{MINIMAL}\n[shadow]\nsample_percent = 2.5\nignore_columns = [\"updated_at\", \"t.c\"]\n");
        let c = Config::parse(&text, "t", None).unwrap();
        assert_eq!(c.shadow.sample_percent, 2.5);
        assert_eq!(c.shadow.ignore_columns.len(), 2);
    }

    #[test]
    fn failback_keys_are_checked_with_their_line() {
        for (line, key) in [
            ("max_error_rate = 1.5", "failback.max_error_rate"),
            ("max_p95_ratio = 0.5", "failback.max_p95_ratio"),
            ("window_s = 0", "failback.window_s"),
            ("probe_percent = 0", "failback.probe_percent"),
            ("check_interval_ms = 5", "failback.check_interval_ms"),
            ("recovery = \"sometimes\"", "failback.recovery"),
        ] {
            let text = format!("{MINIMAL}\n[failback]\n{line}\n");
            let e = Config::parse(&text, "t", None).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{line}");
            assert_eq!(e.line, Some(14), "{line}");
        }
        let text = format!("{MINIMAL}\n[failback]\nrecovery = \"manual\"\nmax_p95_ms = 20\n");
        let c = Config::parse(&text, "t", None).unwrap();
        assert_eq!(c.failback.recovery, Recovery::Manual);
        assert_eq!(c.failback.max_p95_ms, 20.0);
        assert_eq!(
            Config::parse(MINIMAL, "t", None).unwrap().failback,
            FailbackConfig::default()
        );
    }

    #[test]
    fn missing_section_is_reported() {
        let text = MINIMAL.replace("[target]\nhost = \"127.0.0.1\"\nport = 54322\n", "");
        let e = Config::parse(&text, "t", None).unwrap_err();
        assert!(e.message.contains("target"), "{e}");
    }

    #[test]
    fn verify_full_needs_a_host_a_certificate_can_name() {
        let text = MINIMAL.replace(
            "host = \"127.0.0.1\"\nport = 54322",
            "host = \"db host\"\nport = 54322\nsslmode = \"verify-full\"",
        );
        let e = Config::parse(&text, "t", None).unwrap_err();
        assert_eq!((e.key.as_deref(), e.line), (Some("target.host"), Some(10)));
        assert!(e.message.contains("not a valid DNS name"), "{e}");
        // Other modes do not check the name: the host is only resolved.
        let text = MINIMAL.replace(
            "host = \"127.0.0.1\"\nport = 54322",
            "host = \"db host\"\nport = 54322",
        );
        Config::parse(&text, "t", None).unwrap();
    }

    #[test]
    fn require_auth_is_checked_with_its_line_and_defaults_to_no_cleartext() {
        use crate::config::require_auth::AuthMethod;
        let c = Config::parse(MINIMAL, "t", None).unwrap();
        for u in [&c.source, &c.target] {
            assert!(!u.require_auth.allows(AuthMethod::Password));
            assert!(u.require_auth.allows(AuthMethod::ScramSha256));
        }
        let text = MINIMAL.replace(
            "port = 54322",
            "port = 54322\nrequire_auth = \"scram-sha-256\"",
        );
        let c = Config::parse(&text, "t", None).unwrap();
        assert!(!c.target.require_auth.allows(AuthMethod::Md5));
        for bad in ["md5,!password", "kerberos", ""] {
            let text = MINIMAL.replace(
                "port = 54322",
                &format!("port = 54322\nrequire_auth = {bad:?}"),
            );
            let e = Config::parse(&text, "t", None).unwrap_err();
            assert_eq!(
                (e.key.as_deref(), e.line),
                (Some("target.require_auth"), Some(12)),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn admin_show_data_needs_a_token_file() {
        let text = format!("{MINIMAL}\n[admin]\nshow_data = true\n");
        let e = Config::parse(&text, "t", None).unwrap_err();
        assert_eq!(
            (e.key.as_deref(), e.line),
            (Some("admin.show_data"), Some(14))
        );
        assert!(e.message.contains("token_file"), "{e}");
        // Whether the token file is private is checked by `preflight`.
    }

    #[test]
    fn admin_allowed_hosts_are_host_names_or_addresses() {
        let text = format!(
            "{MINIMAL}\n[admin]\nallowed_hosts = [\"pgshift.internal\", \"10.0.0.5:9930\", \"[fd00::1]\"]\n"
        );
        let c = Config::parse(&text, "t", None).unwrap();
        assert_eq!(c.admin.allowed_hosts.len(), 3);
        for bad in ["a b", "http://x", "x:port", "[nope]", ""] {
            let text = format!("{MINIMAL}\n[admin]\nallowed_hosts = [{bad:?}]\n");
            let e = Config::parse(&text, "t", None).unwrap_err();
            assert_eq!(
                (e.key.as_deref(), e.line),
                (Some("admin.allowed_hosts"), Some(14)),
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_sslmode_value() {
        let text = MINIMAL.replace("port = 54321", "port = 54321\nsslmode = \"sometimes\"");
        let e = Config::parse(&text, "t", None).unwrap_err();
        assert_eq!(
            (e.key.as_deref(), e.line),
            (Some("source.sslmode"), Some(8))
        );
    }
}
