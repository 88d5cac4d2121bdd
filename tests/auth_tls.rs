//! Authentication and TLS through a real pgshift: password logins relayed to
//! the source (trust, md5, SCRAM), the source's own refusals, TLS between
//! clients and the proxy and between the proxy and the source, the proxy's
//! own logins to the target, and the admin API's bearer token.
mod common;
use common::*;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio_postgres::config::{SslMode, SslNegotiation};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

const MD5_PW: &str = "md5-secret";
const SCRAM_PW: &str = "scram-secret";
const TLS_PW: &str = "tls-secret";

/// psql with an optional PGPASSWORD and no passfile, so only what the test
/// gives it can authenticate; never prompts.
fn psql_pw(conn: &str, password: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new("psql");
    cmd.arg(conn)
        .args(["-X", "-w", "-v", "ON_ERROR_STOP=1", "-At"])
        .args(args)
        .env("PGPASSFILE", "/nonexistent/pgshift-test-pgpass")
        .env_remove("PGPASSWORD")
        .env_remove("PGSSLMODE")
        .env_remove("PGSSLROOTCERT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(pw) = password {
        cmd.env("PGPASSWORD", pw);
    }
    cmd.output().expect("psql on PATH")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[track_caller]
fn assert_ok(o: &Output) -> String {
    assert!(o.status.success(), "psql failed: {}", stderr(o));
    stdout(o)
}

/// The client-facing certificate and key for the proxy: the invoking user's
/// copies when cluster.sh made them, else the server's own files.
fn proxy_cert_key(c: &Clusters) -> (PathBuf, PathBuf) {
    let (cert, key) = (c.dir.join("tls/proxy.crt"), c.dir.join("tls/proxy.key"));
    if cert.exists() && std::fs::File::open(&key).is_ok() {
        (cert, key)
    } else {
        (c.server_cert(), c.server_key())
    }
}

fn tls_proxy() -> Proxy {
    let c = Clusters::get();
    let (cert, key) = proxy_cert_key(&c);
    Proxy::start_with(|cfg| {
        cfg["listen"]["tls_cert"] = toml_edit::value(cert.display().to_string());
        cfg["listen"]["tls_key"] = toml_edit::value(key.display().to_string());
    })
}

/// A counter or gauge from the Prometheus text at /metrics.
fn metric(p: &Proxy, name: &str) -> f64 {
    let (code, body) = p.admin_get("/metrics");
    assert_eq!(code, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{body}"))
}

/// The proxy log without the terminal colour codes tracing puts in it.
fn log_text(p: &Proxy) -> String {
    let raw = p.log();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[track_caller]
fn assert_no_secrets(p: &Proxy) {
    let log = p.log();
    for secret in [MD5_PW, SCRAM_PW, TLS_PW, "wrong-password-123"] {
        assert!(
            !log.contains(secret),
            "the proxy log contains the password {secret:?}:\n{log}"
        );
    }
    assert!(!log.contains("panicked"), "the proxy panicked:\n{log}");
}

/// Runs `sql` straight on the target as the superuser.
fn on_target(c: &Clusters, sql: &str) -> String {
    c.sql(c.target_port, "postgres", sql)
}

fn rustls_client(ca: &std::path::Path, alpn: bool) -> tokio_postgres_rustls::MakeRustlsConnect {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    if alpn {
        cfg.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    tokio_postgres_rustls::MakeRustlsConnect::new(cfg)
}

// ------------------------------------------------------------------ passwords

#[test]
fn trust_md5_and_scram_users_log_in_with_psql() {
    let p = Proxy::start();
    let sp = p.clusters.source_port.to_string();
    for (user, pw) in [
        ("pgshift_trust", None),
        ("pgshift_md5", Some(MD5_PW)),
        ("pgshift_scram", Some(SCRAM_PW)),
    ] {
        let out = psql_pw(
            &p.url(user, "postgres"),
            pw,
            &["-c", "select current_user, inet_server_port()"],
        );
        assert_eq!(assert_ok(&out), format!("{user}|{sp}"), "login as {user}");
    }
    // The password really is checked by the source: without one psql cannot log in.
    for user in ["pgshift_md5", "pgshift_scram"] {
        let out = psql_pw(&p.url(user, "postgres"), None, &["-c", "select 1"]);
        assert!(!out.status.success(), "{user} logged in without a password");
        assert!(
            stderr(&out).contains("no password supplied"),
            "{user}: {}",
            stderr(&out)
        );
    }
    assert_eq!(p.stat("/metrics/clients/protocol_errors"), 0);
    assert_no_secrets(&p);
}

#[tokio::test(flavor = "multi_thread")]
async fn tokio_postgres_password_logins() {
    let p = Proxy::start();
    for (user, pw) in [
        ("pgshift_trust", None),
        ("pgshift_md5", Some(MD5_PW)),
        ("pgshift_scram", Some(SCRAM_PW)),
    ] {
        let mut cfg = p.pg_config(user, "postgres");
        if let Some(pw) = pw {
            cfg.password(pw);
        }
        let (client, conn) = cfg
            .connect(NoTls)
            .await
            .unwrap_or_else(|e| panic!("login as {user}: {e}"));
        let task = tokio::spawn(conn);
        let row = client
            .query_one("select current_user::text, inet_server_port()", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), user);
        assert_eq!(row.get::<_, i32>(1), i32::from(p.clusters.source_port));
        // An extended-protocol round trip with a parameter, too.
        let row = client
            .query_one("select $1::int + 1", &[&41i32])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), 42);
        drop(client);
        task.await.unwrap().unwrap();
    }
    assert_no_secrets(&p);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_gets_the_sources_own_error() {
    let p = Proxy::start();
    for user in ["pgshift_md5", "pgshift_scram"] {
        let out = tokio::task::block_in_place(|| {
            psql_pw(
                &p.url(user, "postgres"),
                Some("wrong-password-123"),
                &["-c", "select 1"],
            )
        });
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains(&format!(
                "password authentication failed for user \"{user}\""
            )),
            "{user}: {err}"
        );

        let e = p
            .pg_config(user, "postgres")
            .password("wrong-password-123")
            .connect(NoTls)
            .await
            .err()
            .unwrap_or_else(|| panic!("{user} logged in with a wrong password"));
        assert_eq!(e.code(), Some(&SqlState::INVALID_PASSWORD), "{user}: {e}");
        let db = e.as_db_error().unwrap();
        assert_eq!(db.severity(), "FATAL");
        assert!(
            db.message().contains("password authentication failed"),
            "{db:?}"
        );
    }
    // The refusals are counted as failed startups, not protocol errors, and the
    // proxy still serves the right password.
    // The proxy counts a refusal when the session ends, which may be just
    // after the client has read the error: wait for the count.
    let stats = tokio::task::block_in_place(|| {
        p.wait_for(60, "4 rejected startups", |p| {
            p.stat("/metrics/clients/rejected_startup") >= 4
        });
        (
            p.stat("/metrics/clients/rejected_startup"),
            p.stat("/metrics/clients/protocol_errors"),
        )
    });
    assert!(stats.0 >= 4, "rejected_startup = {}", stats.0);
    assert_eq!(stats.1, 0);
    let out = tokio::task::block_in_place(|| {
        psql_pw(
            &p.url("pgshift_scram", "postgres"),
            Some(SCRAM_PW),
            &["-c", "select 7"],
        )
    });
    assert_eq!(assert_ok(&out), "7");
    assert_no_secrets(&p);
}

// ------------------------------------------------------------- client TLS

#[test]
fn client_tls_require_and_verify_full() {
    let p = tls_proxy();
    let ca = p.clusters.ca_cert();
    let tls_before = metric(&p, "pgshift_client_tls_sessions_total");

    // sslmode=require: the client is on TLS, the proxy's source connection is plain.
    let conn = format!("{} sslmode=require", p.url(SUPERUSER, "postgres"));
    let out = psql_pw(
        &conn,
        None,
        &[
            "-c",
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            "-c",
            "\\conninfo",
        ],
    );
    let text = assert_ok(&out);
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("f"),
        "source connection should be plain: {text}"
    );
    assert!(
        text.contains("SSL connection (protocol: TLS"),
        "client connection should be TLS: {text}"
    );
    assert_eq!(
        metric(&p, "pgshift_client_tls_sessions_total"),
        tls_before + 1.0
    );

    // verify-full against the test CA, by host name.
    let conn = format!(
        "host=localhost port={} user=pgshift_scram dbname=postgres sslmode=verify-full sslrootcert={}",
        p.port,
        ca.display()
    );
    let out = psql_pw(
        &conn,
        Some(SCRAM_PW),
        &["-c", "select current_user", "-c", "\\conninfo"],
    );
    let text = assert_ok(&out);
    assert!(text.starts_with("pgshift_scram"), "{text}");
    assert!(text.contains("SSL connection"), "{text}");
    assert_eq!(
        metric(&p, "pgshift_client_tls_sessions_total"),
        tls_before + 2.0
    );

    // verify-full against a host name not in the certificate fails on the client.
    let conn = format!(
        "host=vm hostaddr=127.0.0.1 port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
        p.port,
        ca.display()
    );
    let out = psql_pw(&conn, None, &["-c", "select 1"]);
    assert!(
        !out.status.success(),
        "verify-full accepted a wrong host name"
    );
    assert!(
        stderr(&out).contains("does not match host name"),
        "{}",
        stderr(&out)
    );

    // A plain client is still welcome on a TLS-capable proxy.
    let conn = format!("{} sslmode=disable", p.url(SUPERUSER, "postgres"));
    let out = psql_pw(&conn, None, &["-c", "select 1", "-c", "\\conninfo"]);
    let text = assert_ok(&out);
    assert!(!text.contains("SSL connection"), "{text}");

    let log = log_text(&p);
    assert!(log.contains("tls=true source_tls=false"), "{log}");
    assert_no_secrets(&p);
}

#[tokio::test(flavor = "multi_thread")]
async fn tokio_postgres_tls_with_sslrequest_and_direct_negotiation() {
    let p = tokio::task::block_in_place(tls_proxy);
    let ca = p.clusters.ca_cert();
    for (negotiation, alpn) in [
        (SslNegotiation::Postgres, false),
        (SslNegotiation::Direct, true),
    ] {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("localhost")
            .port(p.port)
            .user("pgshift_scram")
            .password(SCRAM_PW)
            .dbname("postgres")
            .ssl_mode(SslMode::Require)
            .ssl_negotiation(negotiation);
        let (client, conn) = cfg
            .connect(rustls_client(&ca, alpn))
            .await
            .unwrap_or_else(|e| panic!("{negotiation:?}: {e}"));
        let task = tokio::spawn(conn);
        let row = client
            .query_one(
                "select current_user::text, ssl from pg_stat_ssl where pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "pgshift_scram");
        assert!(
            !row.get::<_, bool>(1),
            "proxy->source is plain in this config"
        );
        drop(client);
        task.await.unwrap().unwrap();
    }
    let tls = tokio::task::block_in_place(|| metric(&p, "pgshift_client_tls_sessions_total"));
    assert_eq!(tls, 2.0);
    assert_no_secrets(&p);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_proxy_tls_require_fails_cleanly_and_prefer_works() {
    let p = tokio::task::block_in_place(Proxy::start);
    let out = tokio::task::block_in_place(|| {
        psql_pw(
            &format!("{} sslmode=require", p.url(SUPERUSER, "postgres")),
            None,
            &["-c", "select 1"],
        )
    });
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("server does not support SSL, but SSL was required"),
        "{}",
        stderr(&out)
    );

    let mut cfg = p.pg_config(SUPERUSER, "postgres");
    cfg.ssl_mode(SslMode::Require);
    let e = cfg
        .connect(rustls_client(&p.clusters.ca_cert(), false))
        .await
        .err()
        .expect("TLS required but got plain");
    let cause = std::error::Error::source(&e)
        .map(|c| c.to_string())
        .unwrap_or_default();
    assert!(cause.contains("does not support TLS"), "{e}: {cause}");

    let out = tokio::task::block_in_place(|| {
        psql_pw(
            &format!("{} sslmode=prefer", p.url(SUPERUSER, "postgres")),
            None,
            &["-c", "select 5", "-c", "\\conninfo"],
        )
    });
    let text = assert_ok(&out);
    assert!(text.starts_with('5'), "{text}");
    assert!(!text.contains("SSL connection"), "{text}");

    tokio::task::block_in_place(|| {
        assert_eq!(metric(&p, "pgshift_client_tls_sessions_total"), 0.0);
        assert_eq!(p.stat("/metrics/clients/protocol_errors"), 0);
        assert_no_secrets(&p);
    });
}

// ------------------------------------------------------------ upstream TLS

#[test]
fn upstream_verify_full_admits_the_tls_only_role() {
    let c = Clusters::get();
    let ca = c.ca_cert();
    let p = Proxy::start_with(|cfg| {
        cfg["source"]["host"] = toml_edit::value("localhost");
        cfg["source"]["sslmode"] = toml_edit::value("verify-full");
        cfg["source"]["sslrootcert"] = toml_edit::value(ca.display().to_string());
    });
    assert_eq!(p.status()["source"]["sslmode"], "VerifyFull");
    let out = psql_pw(
        &p.url("pgshift_tls", "postgres"),
        Some(TLS_PW),
        &[
            "-c",
            "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()",
        ],
    );
    assert_eq!(assert_ok(&out), "pgshift_tls|t");
    // Other users ride the same verified TLS upstream.
    let out = psql_pw(
        &p.url("pgshift_md5", "postgres"),
        Some(MD5_PW),
        &[
            "-c",
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
        ],
    );
    assert_eq!(assert_ok(&out), "t");
    let log = log_text(&p);
    assert!(
        log.contains("user=\"pgshift_tls\"") && log.contains("source_tls=true"),
        "{log}"
    );
    assert_eq!(p.stat("/metrics/source/connect_failures"), 0);
    assert_no_secrets(&p);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_plain_gets_the_sources_refusal_for_the_tls_only_role() {
    let p = tokio::task::block_in_place(Proxy::start); // source sslmode = disable
    let out = tokio::task::block_in_place(|| {
        psql_pw(
            &p.url("pgshift_tls", "postgres"),
            Some(TLS_PW),
            &["-c", "select 1"],
        )
    });
    assert!(
        !out.status.success(),
        "pgshift_tls got in over a plain upstream"
    );
    let err = stderr(&out);
    assert!(
        err.contains("pg_hba.conf rejects connection") && err.contains("pgshift_tls"),
        "{err}"
    );

    let e = p
        .pg_config("pgshift_tls", "postgres")
        .password(TLS_PW)
        .connect(NoTls)
        .await
        .err()
        .expect("refused");
    assert_eq!(
        e.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{e}"
    );
    assert!(
        e.as_db_error().unwrap().message().contains("no encryption"),
        "{e}"
    );
    tokio::task::block_in_place(|| assert_no_secrets(&p));
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_verify_full_with_the_wrong_ca_fails_to_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let (key, crt) = (
        dir.path().join("wrong-ca.key"),
        dir.path().join("wrong-ca.crt"),
    );
    let gen = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
        ])
        .args(["-subj", "/CN=pgshift wrong test CA"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .stdin(Stdio::null())
        .output()
        .expect("openssl on PATH");
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );

    let crt_s = crt.display().to_string();
    let p = tokio::task::block_in_place(|| {
        Proxy::start_with(|cfg| {
            cfg["source"]["host"] = toml_edit::value("localhost");
            cfg["source"]["sslmode"] = toml_edit::value("verify-full");
            cfg["source"]["sslrootcert"] = toml_edit::value(crt_s);
        })
    });
    let out = tokio::task::block_in_place(|| {
        psql_pw(&p.url(SUPERUSER, "postgres"), None, &["-c", "select 1"])
    });
    assert!(
        !out.status.success(),
        "connected through an unverifiable source"
    );
    let err = stderr(&out);
    assert!(
        err.contains("pgshift could not connect to the source"),
        "{err}"
    );

    let e = p
        .pg_config(SUPERUSER, "postgres")
        .connect(NoTls)
        .await
        .err()
        .expect("refused");
    assert_eq!(e.code(), Some(&SqlState::CONNECTION_FAILURE), "{e}");
    tokio::task::block_in_place(|| {
        assert!(p.stat("/metrics/source/connect_failures") >= 2);
        let log = log_text(&p);
        assert!(log.contains("TLS handshake with source"), "{log}");
        assert!(!log.contains("panicked"), "{log}");
    });
}

// ------------------------------------------------------------ target logins

/// Connections on the target with this application_name, by user and database.
fn target_backends(c: &Clusters, app: &str) -> String {
    on_target(
        c,
        &format!(
            "select coalesce(string_agg(usename || '@' || datname, ',' order by pid), '') \
             from pg_stat_activity where application_name = '{app}'"
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn scram_session_gets_a_target_link_as_the_same_user() {
    let c = Clusters::get();
    tokio::task::block_in_place(|| c.fresh_db("auth_tls_link"));
    let p = tokio::task::block_in_place(Proxy::start);
    let ok_before = tokio::task::block_in_place(|| p.stat("/metrics/target/logins_ok"));
    let (client, conn) = p
        .pg_config("pgshift_scram", "auth_tls_link")
        .password(SCRAM_PW)
        .application_name("auth_tls_scram_link")
        .connect(NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    let row = client
        .query_one("select current_database()::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "auth_tls_link");

    tokio::task::block_in_place(|| {
        // logins_ok and links_up are two counters, bumped one after the other.
        p.wait_for(60, "a target login", |p| {
            p.stat("/metrics/target/logins_ok") == ok_before + 1
                && p.stat("/metrics/target/links_up") == 1
        });
        assert_eq!(p.stat("/metrics/target/logins_failed"), 0);
        assert_eq!(
            target_backends(&c, "auth_tls_scram_link"),
            "pgshift_scram@auth_tls_link"
        );
    });

    // The link ends with the session.
    drop(client);
    task.await.unwrap().unwrap();
    tokio::task::block_in_place(|| {
        p.wait_for(60, "the target link to close", |p| {
            p.stat("/metrics/target/links_up") == 0
        });
        p.wait_for(60, "the target backend to go", |_| {
            target_backends(&c, "auth_tls_scram_link").is_empty()
        });
        assert_no_secrets(&p);
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn source_only_role_works_while_its_target_login_fails() {
    let p = tokio::task::block_in_place(Proxy::start);
    let (client, conn) = p
        .pg_config("pgshift_src_only", "postgres")
        .application_name("auth_tls_src_only")
        .connect(NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    tokio::task::block_in_place(|| {
        p.wait_for(60, "a failed target login", |p| {
            p.stat("/metrics/target/logins_failed") >= 1
        });
    });
    // The client does not notice.
    let row = client
        .query_one("select current_user::text, inet_server_port()", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pgshift_src_only");
    assert_eq!(row.get::<_, i32>(1), i32::from(p.clusters.source_port));
    tokio::task::block_in_place(|| {
        assert_eq!(p.stat("/metrics/target/logins_ok"), 0);
        assert_eq!(p.stat("/metrics/target/links_up"), 0);
        // The metric is counted just before the warning is written.
        p.wait_for(60, "the target login failure in the log", |p| {
            log_text(p).lines().any(|l| {
                l.contains("target login failed")
                    && l.contains("pgshift_src_only")
                    && l.contains("does not exist")
            })
        });
    });
    drop(client);
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn without_target_passfile_the_target_login_fails_but_the_client_works() {
    let p = tokio::task::block_in_place(|| {
        Proxy::start_with(|cfg| {
            cfg["target"].as_table_mut().unwrap().remove("passfile");
        })
    });
    let (client, conn) = p
        .pg_config("pgshift_md5", "postgres")
        .password(MD5_PW)
        .application_name("auth_tls_no_passfile")
        .connect(NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    tokio::task::block_in_place(|| {
        p.wait_for(60, "a failed target login", |p| {
            p.stat("/metrics/target/logins_failed") >= 1
        });
    });
    let row = client
        .query_one("select current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pgshift_md5");
    tokio::task::block_in_place(|| {
        assert_eq!(p.stat("/metrics/target/logins_ok"), 0);
        p.wait_for(60, "the target login failure in the log", |p| {
            let log = log_text(p);
            log.contains("target login failed") && log.contains("passfile has none")
        });
        assert_eq!(target_backends(&p.clusters, "auth_tls_no_passfile"), "");
        assert_no_secrets(&p);
    });
    drop(client);
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn passwords_never_reach_the_log() {
    // Every kind of login, good and bad, relayed and the proxy's own, through
    // one proxy; then grep the whole log (the other tests check theirs too).
    let p = tokio::task::block_in_place(Proxy::start);
    let mut held = Vec::new();
    for (user, pw) in [("pgshift_md5", MD5_PW), ("pgshift_scram", SCRAM_PW)] {
        let out = tokio::task::block_in_place(|| {
            psql_pw(&p.url(user, "postgres"), Some(pw), &["-c", "select 1"])
        });
        assert_ok(&out);
        let out = tokio::task::block_in_place(|| {
            psql_pw(
                &p.url(user, "postgres"),
                Some("wrong-password-123"),
                &["-c", "select 1"],
            )
        });
        assert!(!out.status.success());
        // Sessions held open so their target links log in with the passfile's passwords.
        let (client, conn) = p
            .pg_config(user, "postgres")
            .password(pw)
            .connect(NoTls)
            .await
            .unwrap();
        held.push((client, tokio::spawn(conn)));
    }
    tokio::task::block_in_place(|| {
        p.wait_for(60, "target logins", |p| {
            p.stat("/metrics/target/logins_ok") >= 2
        });
        let log = log_text(&p);
        assert!(log.contains("session established"), "{log}");
        assert!(log.contains("password authentication failed"), "{log}");
        assert_no_secrets(&p);
    });
    for (client, task) in held {
        drop(client);
        task.await.unwrap().unwrap();
    }
}

// ------------------------------------------------------------ admin token

#[test]
fn admin_api_requires_the_bearer_token_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let token = "pgshift-test-token-4f1c";
    let token_file = dir.path().join("admin.token");
    write_secret(&token_file, &format!("{token}\n"));
    let tf = token_file.display().to_string();
    let p = Proxy::start_with(|cfg| cfg["admin"]["token_file"] = toml_edit::value(tf));

    for path in ["/status", "/metrics", "/health"] {
        let (code, body) = http_get(p.admin_port, path, None);
        assert_eq!(code, 401, "{path} without a token: {body}");
        let (code, _) = http_get(p.admin_port, path, Some("not-the-token"));
        assert_eq!(code, 401, "{path} with a wrong token");
        let (code, _) = http_get(p.admin_port, path, Some(&token[..token.len() - 1]));
        assert_eq!(code, 401, "{path} with a token prefix");
    }
    let (code, body) = http_get(p.admin_port, "/status", Some(token));
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["phase"], "running");
    assert_eq!(status["listen"], format!("127.0.0.1:{}", p.port));
    let (code, body) = http_get(p.admin_port, "/metrics", Some(token));
    assert_eq!(code, 200);
    assert!(body.contains("pgshift_client_connections_total"), "{body}");
    // The proxy itself is unaffected by the token.
    assert_eq!(
        assert_ok(&psql_pw(
            &p.url(SUPERUSER, "postgres"),
            None,
            &["-c", "select 3"]
        )),
        "3"
    );
    assert!(!p.log().contains(token), "token in the log");
}

/// Every admin request must name this API in its Host (DNS rebinding),
/// and changes must be JSON (no cross-origin form posts); `pgshift ctl`
/// does both.
#[test]
fn admin_api_refuses_foreign_hosts_and_changes_that_are_not_json() {
    let p = Proxy::start_with(|cfg| {
        let mut hosts = toml_edit::Array::new();
        hosts.push("pgshift.test");
        cfg["admin"]["allowed_hosts"] = toml_edit::value(hosts);
    });
    let port = p.admin_port;
    let get = |host: Option<&str>| {
        let host = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
        raw_http(port, &format!("GET /status HTTP/1.0\r\n{host}\r\n"))
    };
    for ok in [
        "localhost".to_string(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "[::1]".into(),
        "pgshift.test:8080".into(),
        "PGSHIFT.TEST".into(),
    ] {
        let (code, body) = get(Some(&ok));
        assert_eq!(code, 200, "Host {ok}: {body}");
    }
    for bad in [
        "evil.example",
        "evil.example:9930",
        "localhost.evil.example",
        "10.1.2.3",
    ] {
        let (code, body) = get(Some(bad));
        assert_eq!(code, 421, "Host {bad}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            v["error"].as_str().unwrap().contains("allowed_hosts"),
            "{v}"
        );
    }
    let (code, body) = get(None);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("Host header"), "{body}");
    // An absolute URI names the host too.
    let (code, _) = raw_http(
        port,
        "GET http://evil.example/status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 421);
    // Unknown paths are refused the same way (and then not found).
    assert_eq!(
        raw_http(port, "GET /nope HTTP/1.0\r\nHost: evil.example\r\n\r\n").0,
        421
    );
    assert_eq!(
        raw_http(port, "GET /nope HTTP/1.0\r\nHost: localhost\r\n\r\n").0,
        404
    );

    // Changes need Content-Type: application/json (an empty body is fine).
    let post = |ctype: &str, body: &str| {
        raw_http(
            port,
            &format!(
                "POST /failback HTTP/1.0\r\nHost: localhost\r\n{ctype}Content-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    for ctype in [
        "",
        "Content-Type: text/plain\r\n",
        "Content-Type: application/x-www-form-urlencoded\r\n",
    ] {
        let (code, body) = post(ctype, r#"{"reason": "form"}"#);
        assert_eq!(code, 415, "{ctype:?}: {body}");
        assert!(body.contains("application/json"), "{body}");
    }
    assert_eq!(
        p.stat("/config/epoch"),
        1,
        "a refused change applied nothing"
    );
    let (code, body) = post("Content-Type: application/json\r\n", "");
    assert_eq!(code, 200, "{body}");
    let (code, body) = raw_http(
        port,
        "PUT /routing HTTP/1.0\r\nHost: localhost\r\nContent-Type: Application/JSON; charset=utf-8\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert_eq!(code, 200, "{body}");
    // pgshift ctl sends a Host and JSON.
    let out = p.ctl(&["resume", "--reason", "ctl works"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = p.ctl(&["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// One raw HTTP exchange with the admin API; (status code, body).
fn raw_http(port: u16, request: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

// ------------------------------------------------ target.require_auth

/// What a fake target asks for at login.
#[derive(Clone, Copy, PartialEq)]
enum FakeAuth {
    /// AuthenticationCleartextPassword.
    Cleartext,
    /// AuthenticationSASL, AuthenticationSASLContinue, then
    /// AuthenticationOk without AuthenticationSASLFinal: an impostor that
    /// cannot prove it knows the password.
    ScramWithoutFinal,
}

/// What the fake target saw.
#[derive(Default)]
struct FakeSeen {
    /// Cleartext passwords it was sent.
    passwords: Vec<String>,
    /// SCRAM exchanges that reached the client's final message.
    scram_finals: usize,
    /// Logins it completed (AuthenticationOk and ReadyForQuery sent).
    logins: usize,
}

/// A TCP server the test controls, speaking just enough of the protocol
/// for a login; runs until the test's runtime ends.
async fn fake_target(auth: FakeAuth) -> (u16, Arc<std::sync::Mutex<FakeSeen>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(std::sync::Mutex::new(FakeSeen::default()));
    let s2 = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let seen = Arc::clone(&s2);
            tokio::spawn(async move {
                let _ = fake_session(sock, auth, &seen).await;
            });
        }
    });
    (port, seen)
}

fn be_msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn be_auth(code: i32, data: &[u8]) -> Vec<u8> {
    be_msg(b'R', &[&code.to_be_bytes()[..], data].concat())
}

async fn fe_msg(s: &mut tokio::net::TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let tag = s.read_u8().await?;
    let len = s.read_i32().await?;
    let mut body = vec![0; (len.max(4) - 4) as usize];
    s.read_exact(&mut body).await?;
    Ok((tag, body))
}

async fn fake_session(
    mut s: tokio::net::TcpStream,
    auth: FakeAuth,
    seen: &std::sync::Mutex<FakeSeen>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The startup packet (an SSLRequest first is answered N).
    loop {
        let len = s.read_i32().await?;
        let mut rest = vec![0; (len.max(4) - 4) as usize];
        s.read_exact(&mut rest).await?;
        if rest.get(..4) == Some(&80877103i32.to_be_bytes()[..]) {
            s.write_all(b"N").await?;
            continue;
        }
        break;
    }
    let ok_ready = [
        be_auth(0, b""),
        be_msg(b'K', &[0, 0, 0, 42, 0, 0, 0, 7]),
        be_msg(b'Z', b"I"),
    ]
    .concat();
    match auth {
        FakeAuth::Cleartext => {
            s.write_all(&be_auth(3, b"")).await?;
            let (_, body) = fe_msg(&mut s).await?;
            let pw =
                String::from_utf8_lossy(body.strip_suffix(b"\0").unwrap_or(&body)).into_owned();
            seen.lock().unwrap().passwords.push(pw);
        }
        FakeAuth::ScramWithoutFinal => {
            s.write_all(&be_auth(10, b"SCRAM-SHA-256\0\0")).await?;
            let (_, first) = fe_msg(&mut s).await?;
            // "SCRAM-SHA-256\0", a length, "n,,n=,r=<client nonce>"
            let text = String::from_utf8_lossy(&first).into_owned();
            let nonce = text.rsplit("r=").next().unwrap_or("").to_string();
            let server_first = format!("r={nonce}fake-server-nonce,s=c2FsdHNhbHRzYWx0,i=4096");
            s.write_all(&be_auth(11, server_first.as_bytes())).await?;
            fe_msg(&mut s).await?;
            seen.lock().unwrap().scram_finals += 1;
            // No AuthenticationSASLFinal: straight to Ok.
        }
    }
    s.write_all(&ok_ready).await?;
    seen.lock().unwrap().logins += 1;
    // Keepalive Syncs and simple queries get an answer; the rest waits.
    loop {
        let (tag, _) = fe_msg(&mut s).await?;
        match tag {
            b'S' => s.write_all(&be_msg(b'Z', b"I")).await?,
            b'Q' => {
                s.write_all(&[be_msg(b'I', b""), be_msg(b'Z', b"I")].concat())
                    .await?
            }
            b'X' => return Ok(()),
            _ => {}
        }
    }
}

/// A proxy whose target is the fake on `port`, with a passfile holding
/// the superuser's password for it.
fn proxy_on_fake_target(port: u16, require_auth: Option<&str>) -> (Proxy, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let pf = dir.path().join("fake.pgpass");
    write_secret(
        &pf,
        &format!("127.0.0.1:{port}:*:{SUPERUSER}:fake-target-secret\n"),
    );
    let pf = pf.display().to_string();
    let require_auth = require_auth.map(str::to_string);
    let p = Proxy::start_with(move |cfg| {
        cfg["target"]["host"] = toml_edit::value("127.0.0.1");
        cfg["target"]["port"] = toml_edit::value(i64::from(port));
        cfg["target"]["passfile"] = toml_edit::value(pf);
        if let Some(r) = require_auth {
            cfg["target"]["require_auth"] = toml_edit::value(r);
        }
    });
    (p, dir)
}

/// Holds a session as the superuser on the (real) source through `p`, so
/// its target link logs in to the fake.
async fn hold_session(
    p: &Proxy,
    app: &str,
) -> (tokio_postgres::Client, tokio::task::JoinHandle<()>) {
    let (client, conn) = p
        .pg_config(SUPERUSER, "postgres")
        .application_name(app)
        .connect(NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let row = client.query_one("select 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1, "the source serves");
    (client, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_asking_for_a_cleartext_password_gets_none_unless_require_auth_allows_it() {
    let (port, seen) = fake_target(FakeAuth::Cleartext).await;

    // The default leaves out "password": the link is refused and the
    // password never sent.
    let (p, _pf) = tokio::task::block_in_place(|| proxy_on_fake_target(port, None));
    let (client, task) = hold_session(&p, "fake_cleartext_default").await;
    tokio::task::block_in_place(|| {
        p.wait_for(60, "a refused target login", |p| {
            p.stat("/metrics/target/logins_failed") >= 1
        });
        p.wait_for(60, "the refusal in the log", |p| {
            log_text(p).lines().any(|l| {
                l.contains("target login failed")
                    && l.contains("cleartext password")
                    && l.contains("target.require_auth")
            })
        });
        assert_eq!(p.stat("/metrics/target/logins_ok"), 0);
    });
    assert!(
        seen.lock().unwrap().passwords.is_empty(),
        "a password was sent"
    );
    assert_eq!(seen.lock().unwrap().logins, 0);
    drop(client);
    let _ = task.await;
    drop(p);

    // Allowed explicitly: the passfile's password is sent and the link is up.
    let (p, _pf) = tokio::task::block_in_place(|| proxy_on_fake_target(port, Some("password")));
    let (client, task) = hold_session(&p, "fake_cleartext_allowed").await;
    tokio::task::block_in_place(|| {
        p.wait_for(60, "a target login", |p| {
            p.stat("/metrics/target/logins_ok") >= 1
        })
    });
    assert!(
        seen.lock()
            .unwrap()
            .passwords
            .iter()
            .all(|pw| pw == "fake-target-secret"),
        "only the passfile's password"
    );
    assert!(seen.lock().unwrap().logins >= 1);
    assert!(
        !p.log().contains("fake-target-secret"),
        "password in the log"
    );
    drop(client);
    let _ = task.await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_that_skips_scrams_final_message_is_refused() {
    let (port, seen) = fake_target(FakeAuth::ScramWithoutFinal).await;
    for require_auth in [None, Some("scram-sha-256")] {
        let (p, _pf) = tokio::task::block_in_place(|| proxy_on_fake_target(port, require_auth));
        let (client, task) = hold_session(&p, "fake_scram_no_final").await;
        tokio::task::block_in_place(|| {
            p.wait_for(60, "a refused target login", |p| {
                p.stat("/metrics/target/logins_failed") >= 1
            });
            p.wait_for(60, "the refusal in the log", |p| {
                log_text(p).lines().any(|l| {
                    l.contains("target login failed")
                        && l.contains("server skipped SCRAM's final message")
                })
            });
            assert_eq!(p.stat("/metrics/target/logins_ok"), 0, "{require_auth:?}");
        });
        drop(client);
        let _ = task.await;
    }
    // The exchange went as far as the client's final message each time.
    assert!(seen.lock().unwrap().scram_finals >= 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn require_auth_scram_refuses_the_md5_role_and_admits_the_scram_role() {
    let p = tokio::task::block_in_place(|| {
        Proxy::start_with(|cfg| cfg["target"]["require_auth"] = toml_edit::value("scram-sha-256"))
    });
    let (md5_client, md5_conn) = p
        .pg_config("pgshift_md5", "postgres")
        .password(MD5_PW)
        .application_name("require_auth_md5")
        .connect(NoTls)
        .await
        .unwrap();
    let md5_task = tokio::spawn(md5_conn);
    tokio::task::block_in_place(|| {
        p.wait_for(60, "the md5 role's refused target login", |p| {
            p.stat("/metrics/target/logins_failed") >= 1
        });
        p.wait_for(60, "the refusal in the log", |p| {
            log_text(p).lines().any(|l| {
                l.contains("target login failed")
                    && l.contains("pgshift_md5")
                    && l.contains("an md5 password")
                    && l.contains("target.require_auth")
            })
        });
        assert_eq!(p.stat("/metrics/target/logins_ok"), 0);
    });
    // The client's own session on the source is not affected.
    let row = md5_client
        .query_one("select current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pgshift_md5");

    let (client, conn) = p
        .pg_config("pgshift_scram", "postgres")
        .password(SCRAM_PW)
        .application_name("require_auth_scram")
        .connect(NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    tokio::task::block_in_place(|| {
        p.wait_for(60, "the scram role's target login", |p| {
            p.stat("/metrics/target/logins_ok") >= 1
        });
        assert_eq!(
            target_backends(&p.clusters, "require_auth_scram"),
            "pgshift_scram@postgres"
        );
        assert_eq!(target_backends(&p.clusters, "require_auth_md5"), "");
        assert_no_secrets(&p);
    });
    drop((client, md5_client));
    task.await.unwrap().unwrap();
    md5_task.await.unwrap().unwrap();
}

/// A request written over TLS reaches the server whole even when the socket
/// is full at the last write: `write_all` alone leaves the tail inside the
/// TLS session (sent only at the next write or flush) while the writer goes
/// on to wait for an answer. The server here starts reading only after a
/// pause, with small socket buffers, so the socket is full when the last
/// bytes are written; every request-then-wait in pgshift goes through
/// `send_all`.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_over_tls_arrives_whole_when_the_socket_is_full() {
    use tokio::io::AsyncReadExt;
    let c = Clusters::get();
    let (cert, key) = proxy_cert_key(&c);
    let acceptor =
        tokio_rustls::TlsAcceptor::from(pgshift::net::tls::server_config(&cert, &key).unwrap());
    let connector = tokio_rustls::TlsConnector::from(
        pgshift::net::tls::client_config(pgshift::config::SslMode::Require, None).unwrap(),
    );
    let listening = tokio::net::TcpSocket::new_v4().unwrap();
    listening.set_recv_buffer_size(4096).unwrap();
    listening.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = listening.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    const LEN: usize = 48 << 10;
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let mut got = vec![0u8; LEN];
        // Everything that was sent arrives at once; a tail left unsent
        // never does.
        tokio::time::timeout(std::time::Duration::from_secs(20), tls.read_exact(&mut got))
            .await
            .map(|r| r.map(|_| got))
    });
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let request: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    pgshift::net::send_all(&mut tls, &request).await.unwrap();
    match server.await.unwrap() {
        Ok(Ok(got)) => assert!(got == request, "the bytes arrived changed"),
        Ok(Err(e)) => panic!("server read failed: {e}"),
        Err(_) => panic!("the end of the request never arrived: it stayed in the TLS session"),
    }
}
