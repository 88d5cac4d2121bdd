//! Shared harness for the integration tests: the two real clusters started
//! by `scripts/cluster.sh`, a real `pgshift` process per test, and helpers
//! to run real clients (psql, pgbench, python) against it.
//!
//! The clusters must be running (scripts/test.sh starts them); a test that
//! cannot reach them fails with instructions rather than skipping.
#![allow(dead_code)]

pub mod mirror;
pub mod relay;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const SUPERUSER: &str = "postgres";

/// Where the clusters are, from `scripts/cluster.sh env` (with its defaults).
#[derive(Debug, Clone)]
pub struct Clusters {
    pub host: String,
    pub source_port: u16,
    pub target_port: u16,
    pub dir: PathBuf,
    pub pg_bin: PathBuf,
}

impl Clusters {
    pub fn get() -> Clusters {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let c = Clusters {
            host: var("PGSHIFT_HOST").unwrap_or_else(|| "127.0.0.1".into()),
            source_port: var("PGSHIFT_SOURCE_PORT")
                .and_then(|p| p.parse().ok())
                .unwrap_or(54321),
            target_port: var("PGSHIFT_TARGET_PORT")
                .and_then(|p| p.parse().ok())
                .unwrap_or(54322),
            dir: var("PGSHIFT_CLUSTER_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join(".clusters")),
            pg_bin: var("PGSHIFT_PG_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin")),
        };
        for port in [c.source_port, c.target_port] {
            if TcpStream::connect((c.host.as_str(), port)).is_err() {
                panic!(
                    "no Postgres on {}:{port}: run the suite with scripts/test.sh, or start the clusters with scripts/cluster.sh start",
                    c.host
                );
            }
        }
        c
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("tls/ca.crt")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("tls/server.crt")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("tls/server.key")
    }
    pub fn target_passfile(&self) -> PathBuf {
        self.dir.join("target.pgpass")
    }

    /// libpq connection string straight to the source.
    pub fn source_url(&self, user: &str, db: &str) -> String {
        format!(
            "host={} port={} user={user} dbname={db}",
            self.host, self.source_port
        )
    }
    pub fn target_url(&self, user: &str, db: &str) -> String {
        format!(
            "host={} port={} user={user} dbname={db}",
            self.host, self.target_port
        )
    }

    /// Runs SQL as the superuser directly on one cluster; panics on failure.
    pub fn sql(&self, port: u16, db: &str, sql: &str) -> String {
        let conn = format!(
            "host={} port={port} user={SUPERUSER} dbname={db}",
            self.host
        );
        psql_ok(&conn, &["-Atq", "-c", sql], None)
            .trim_end()
            .to_string()
    }

    /// Waits (up to 60 s) until a statement containing `needle` is running
    /// on the cluster at `port`: a cancel sent earlier would find nothing
    /// to cancel (a fixed sleep is not enough on a stalling machine).
    #[track_caller]
    pub fn wait_running(&self, port: u16, needle: &str) {
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
             AND pid <> pg_backend_pid() AND position({} in query) > 0",
            quote_literal(needle)
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while self.sql(port, "postgres", &sql) == "0" {
            assert!(
                std::time::Instant::now() < deadline,
                "{needle:?} never ran on port {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// A fresh database of this name on both clusters (dropped first,
    /// with any replication slot an earlier proxy left in it).
    pub fn fresh_db(&self, name: &str) {
        for port in [self.source_port, self.target_port] {
            self.drop_slots(port, name);
            self.drop_prepared(port, name);
            self.sql(
                port,
                "postgres",
                &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            );
            self.sql(port, "postgres", &format!("CREATE DATABASE {name}"));
            self.sql(port, name, "GRANT ALL ON SCHEMA public TO PUBLIC");
        }
    }
}

/// Which server answered a read: `SIDE` reads a one-row table that
/// `mark_sides` makes on each cluster directly (not through a proxy),
/// holding that cluster's port. Unlike `inet_server_port()`, which a proxy
/// keeps on the source (it is server-local), it is a portable read that
/// routing may send to either side.
pub const SIDE: &str = "(SELECT port FROM pgshift_side)";

/// Makes `pgshift_side` in `db` on both clusters (see `SIDE`).
pub fn mark_sides(c: &Clusters, db: &str) {
    for port in [c.source_port, c.target_port] {
        c.sql(
            port,
            db,
            &format!(
                "CREATE TABLE IF NOT EXISTS pgshift_side(port int PRIMARY KEY); \
                 INSERT INTO pgshift_side VALUES ({port}) ON CONFLICT DO NOTHING; \
                 GRANT SELECT ON pgshift_side TO PUBLIC"
            ),
        );
    }
}

impl Clusters {
    /// Drops the logical replication slots of `db` on one cluster (their
    /// walsenders ended first): a database with a slot cannot be dropped,
    /// and a slot keeps WAL for as long as it exists.
    /// Rolls back the transactions left prepared in `db` (a failed run of a
    /// two-phase-commit test leaves them, and they keep the database from
    /// being dropped). ROLLBACK PREPARED has to run in their own database.
    pub fn drop_prepared(&self, port: u16, db: &str) {
        let lit = db.replace('\'', "''");
        let gids = self.sql(
            port,
            "postgres",
            &format!("SELECT gid FROM pg_prepared_xacts WHERE database = '{lit}'"),
        );
        for gid in gids.lines().filter(|g| !g.is_empty()) {
            let gid = gid.replace('\'', "''");
            self.sql(port, db, &format!("ROLLBACK PREPARED '{gid}'"));
        }
    }

    pub fn drop_slots(&self, port: u16, db: &str) {
        let lit = db.replace('\'', "''");
        for _ in 0..50 {
            let left = self.sql(
                port,
                "postgres",
                &format!(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = '{lit}' AND active_pid IS NOT NULL; \
                     SELECT count(pg_drop_replication_slot(slot_name)) FILTER (WHERE NOT active) || '/' || count(*) FROM pg_replication_slots WHERE database = '{lit}'"
                ),
            );
            let last = left.lines().last().unwrap_or("");
            let (dropped, all) = last.split_once('/').unwrap_or(("0", "0"));
            if dropped == all {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the replication slots of {db} on port {port} would not go");
    }
}

/// A fresh `db` on both clusters with the same pgbench tables (scale 1),
/// loaded directly, not through a proxy.
pub fn pgbench_db_on_both(c: &Clusters, db: &str) {
    c.fresh_db(db);
    for port in [c.source_port, c.target_port] {
        let out = pg_tool(c, "pgbench")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", SUPERUSER])
            .args(["-i", "-s", "1", "-q", db])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
}

/// A fresh `db` on the source only with the pgbench tables (scale 1),
/// loaded directly; with `copy`, also a copy of it taken now (a database
/// made from it as a template), to replay into later.
pub fn pgbench_db_on_source(c: &Clusters, db: &str, copy: Option<&str>) {
    c.fresh_db(db);
    let out = pgbench_on_source(c, &["-i", "-s", "1", "-q", db]);
    assert!(out.status.success(), "{out:?}");
    if let Some(copy) = copy {
        let drop = format!("DROP DATABASE IF EXISTS {copy} WITH (FORCE)");
        c.sql(c.source_port, "postgres", &drop);
        let create = format!("CREATE DATABASE {copy} TEMPLATE {db}");
        c.sql(c.source_port, "postgres", &create);
    }
}

/// pgbench straight to the source as the superuser.
pub fn pgbench_on_source(c: &Clusters, args: &[&str]) -> Output {
    pg_tool(c, "pgbench")
        .args([
            "-h",
            &c.host,
            "-p",
            &c.source_port.to_string(),
            "-U",
            SUPERUSER,
        ])
        .args(args)
        .output()
        .unwrap()
}

/// A `pgshift replay --json` report of a replay that went through: no
/// error, every session of the input logged in and stayed connected, every
/// statement of the input ran.
#[track_caller]
pub fn assert_replay_complete(report: &serde_json::Value) {
    assert_eq!(report["errors_total"], 0, "{report:#}");
    assert_eq!(report["sessions"]["failed_to_connect"], 0, "{report:#}");
    assert_eq!(report["sessions"]["lost"], 0, "{report:#}");
    assert_eq!(report["sessions"]["cut"], 0, "{report:#}");
    assert_eq!(
        report["sessions"]["started"], report["meta"]["sessions"],
        "{report:#}"
    );
    assert_eq!(
        report["statements"], report["meta"]["recorded_statements"],
        "{report:#}"
    );
}

/// What TPC-B leaves behind in `db` on the source, comparable across
/// databases: digests of every row of accounts, branches and tellers, and
/// of history without its mtime (as a sorted multiset).
pub fn pgbench_state(c: &Clusters, db: &str) -> Vec<String> {
    [
        "SELECT count(*) || ' ' || md5(string_agg(aid || ':' || bid || ':' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts",
        "SELECT count(*) || ' ' || md5(string_agg(bid || ':' || bbalance, ',' ORDER BY bid)) FROM pgbench_branches",
        "SELECT count(*) || ' ' || md5(string_agg(tid || ':' || bid || ':' || tbalance, ',' ORDER BY tid)) FROM pgbench_tellers",
        "SELECT count(*) || ' ' || coalesce(md5(string_agg(tid || ':' || bid || ':' || aid || ':' || delta, ',' ORDER BY tid, bid, aid, delta)), '-') FROM pgbench_history",
    ]
    .iter()
    .map(|q| c.sql(c.source_port, db, q))
    .collect()
}

/// A free TCP port on loopback (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `pgshift` process with its own config, ports and log file.
pub struct Proxy {
    child: Option<Child>,
    pub port: u16,
    pub admin_port: u16,
    pub dir: tempfile::TempDir,
    pub clusters: Clusters,
    /// The admin bearer token, when the config has a token file.
    pub token: Option<String>,
    /// Where `start_showing_data` keeps the token file.
    pub secrets: Option<tempfile::TempDir>,
}

/// Writes a file only its owner may read (0600), as the proxy requires of
/// token files and passfiles.
pub fn write_secret(path: &Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

impl Proxy {
    /// The config every test starts from: both clusters, sslmode disable,
    /// target passfile, free ports.
    pub fn base_config(c: &Clusters, port: u16, admin_port: u16) -> toml_edit::DocumentMut {
        let text = format!(
            r#"
[listen]
addr = "127.0.0.1:{port}"

[source]
host = "{host}"
port = {sp}
sslmode = "disable"

[target]
host = "{host}"
port = {tp}
sslmode = "disable"
passfile = "{passfile}"

[admin]
addr = "127.0.0.1:{admin_port}"

[limits]
shutdown_timeout_s = 10

[log]
level = "info"
"#,
            host = c.host,
            sp = c.source_port,
            tp = c.target_port,
            passfile = c.target_passfile().display(),
        );
        text.parse().unwrap()
    }

    /// Starts a proxy with the base config.
    pub fn start() -> Proxy {
        Self::start_with(|_| {})
    }

    /// Starts a proxy after `edit` adjusts the base config, e.g.
    /// `|c| c["limits"]["max_client_connections"] = toml_edit::value(5)`.
    pub fn start_with(edit: impl FnOnce(&mut toml_edit::DocumentMut)) -> Proxy {
        Self::launch(edit, None)
    }

    /// As `start_with`, with an admin token and `admin.show_data = true`,
    /// for tests that read statement texts, parameters or rows from the
    /// admin API (without it they are redacted).
    pub fn start_showing_data(edit: impl FnOnce(&mut toml_edit::DocumentMut)) -> Proxy {
        let secrets = tempfile::tempdir().unwrap();
        let token_file = secrets.path().join("admin.token");
        write_secret(&token_file, "show-data-token\n");
        let tf = token_file.display().to_string();
        let mut p = Self::start_with(move |cfg| {
            cfg["admin"]["token_file"] = toml_edit::value(tf);
            cfg["admin"]["show_data"] = toml_edit::value(true);
            edit(cfg);
        });
        p.secrets = Some(secrets);
        p
    }

    /// As `start_with`, with the proxy started under this umask (an octal
    /// string, e.g. "000"), to check the modes of the files it writes.
    pub fn start_under_umask(umask: &str, edit: impl FnOnce(&mut toml_edit::DocumentMut)) -> Proxy {
        Self::launch(edit, Some(umask))
    }

    fn launch(edit: impl FnOnce(&mut toml_edit::DocumentMut), umask: Option<&str>) -> Proxy {
        let clusters = Clusters::get();
        let (mut port, mut admin_port) = (free_port(), free_port());
        let mut cfg = Self::base_config(&clusters, port, admin_port);
        edit(&mut cfg);
        let admin = cfg.get("admin").and_then(|a| a.get("addr")).is_some();
        let token = cfg
            .get("admin")
            .and_then(|a| a.get("token_file"))
            .and_then(|t| t.as_str())
            .and_then(|f| std::fs::read_to_string(f).ok())
            .map(|t| t.trim().to_string());
        // free_port() releases its port before pgshift binds it, so a parallel
        // test can take it first: retry with fresh ports when binding fails.
        for attempt in 1.. {
            let dir = tempfile::tempdir().unwrap();
            let cfg_path = dir.path().join("proxy.toml");
            std::fs::write(&cfg_path, cfg.to_string()).unwrap();
            let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
            let mut cmd = match umask {
                None => Command::new(env!("CARGO_BIN_EXE_pgshift")),
                Some(mask) => {
                    let mut c = Command::new("sh");
                    c.arg("-c")
                        .arg(format!("umask {mask} && exec \"$0\" \"$@\""))
                        .arg(env!("CARGO_BIN_EXE_pgshift"));
                    c
                }
            };
            let child = cmd
                .arg("--config")
                .arg(&cfg_path)
                .env(
                    "RUST_LOG",
                    std::env::var("PGSHIFT_TEST_LOG").unwrap_or_else(|_| "info".into()),
                )
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start pgshift");
            let mut p = Proxy {
                child: Some(child),
                port,
                admin_port,
                dir,
                clusters: clusters.clone(),
                token: token.clone(),
                secrets: None,
            };
            match p.wait_listening(admin) {
                Ok(()) => return p,
                Err(log)
                    if attempt < 5
                        && (log.contains("cannot listen") || log.contains("cannot bind admin")) =>
                {
                    let old_port = port;
                    (port, admin_port) = (free_port(), free_port());
                    let listen = cfg["listen"]["addr"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    if listen.ends_with(&format!(":{old_port}")) {
                        cfg["listen"]["addr"] = toml_edit::value(format!("127.0.0.1:{port}"));
                    }
                    if admin {
                        cfg["admin"]["addr"] = toml_edit::value(format!("127.0.0.1:{admin_port}"));
                    }
                }
                Err(log) => panic!("pgshift did not start:\n{log}"),
            }
        }
        unreachable!()
    }

    /// Waits until the proxy serves; on failure returns its log. Probes the
    /// admin API when there is one (it is bound after the client listener, and
    /// a probe there is not a client connection the proxy would count).
    fn wait_listening(&mut self, admin: bool) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!("exited at start ({status}):\n{}", self.log()));
            }
            let up = if admin {
                TcpStream::connect(("127.0.0.1", self.admin_port)).is_ok()
                    && http_get(self.admin_port, "/health", self.token.as_deref()).0 == 200
            } else {
                TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            };
            if up {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "did not listen on {} in time:\n{}",
            self.port,
            self.log()
        ))
    }

    /// libpq connection string through the proxy.
    pub fn url(&self, user: &str, db: &str) -> String {
        format!("host=127.0.0.1 port={} user={user} dbname={db}", self.port)
    }

    /// tokio-postgres config through the proxy.
    pub fn pg_config(&self, user: &str, db: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1").port(self.port).user(user).dbname(db);
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The audit log's entries (`pgshift-audit.jsonl` beside the config).
    pub fn audit_entries(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("pgshift-audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// `pgshift ctl ARGS` against this proxy (address and token from its
    /// config file).
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_pgshift"))
            .arg("--config")
            .arg(self.dir.path().join("proxy.toml"))
            .arg("ctl")
            .args(args)
            .output()
            .expect("run pgshift ctl")
    }

    /// A GET on the admin API; returns (status code, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin_port, path, self.token.as_deref())
    }

    pub fn status(&self) -> serde_json::Value {
        let (code, body) = self.admin_get("/status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// A number from /status by JSON pointer, e.g. "/metrics/target/logins_ok".
    pub fn stat(&self, pointer: &str) -> i64 {
        self.status()
            .pointer(pointer)
            .and_then(|v| v.as_i64())
            .unwrap_or_else(|| panic!("no {pointer} in status"))
    }

    /// Polls `cond` for up to `secs` seconds.
    pub fn wait_for(&self, secs: u64, what: &str, mut cond: impl FnMut(&Proxy) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if cond(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out waiting for {what}; proxy log:\n{}", self.log());
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit, up to `secs`; returns its exit code.
    pub fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("pgshift did not exit within {secs}s:\n{}", self.log());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- pgshift log ----\n{}", self.log());
        }
    }
}

/// Minimal HTTP/1.0 GET against the admin API (no client crate needed).
pub fn http_get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    http_request(port, "GET", path, token, "")
}

/// An HTTP/1.0 request to the admin API with an optional JSON body;
/// returns (status code, body).
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("admin API reachable");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    // Requests that change something must say their body is JSON (an
    // empty one included).
    let content = if method == "GET" {
        String::new()
    } else {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )
    };
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\n{auth}{content}\r\n{body}"
    )
    .unwrap();
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

/// Runs psql with a connection string; never prompts for a password.
pub fn psql(conn: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new("psql");
    cmd.arg(conn)
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-w"])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("psql on PATH");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

/// Runs psql and insists it succeeded; returns stdout.
#[track_caller]
pub fn psql_ok(conn: &str, args: &[&str], stdin: Option<&[u8]>) -> String {
    let out = psql(conn, args, stdin);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success(),
        "psql {args:?} on {conn:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs a program from the Postgres bin dir (pgbench, pg_ctl...).
pub fn pg_tool(c: &Clusters, tool: &str) -> Command {
    let p = c.pg_bin.join(tool);
    Command::new(if p.exists() { p } else { PathBuf::from(tool) })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// pg_ctl on one cluster ("source" or "target"), as the cluster owner (as
/// scripts/cluster.sh does). The server log goes to its usual file: a
/// postmaster holding our pipes open would make this wait forever.
pub fn pg_ctl(c: &Clusters, which: &str, args: &[&str]) -> Output {
    let pg_ctl = pg_tool(c, "pg_ctl").get_program().to_owned();
    let data = c.dir.join(which);
    let log = c.dir.join(format!("logs/{which}.log"));
    let mut cmd = if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(pg_ctl);
        cmd
    } else {
        Command::new(pg_ctl)
    };
    cmd.arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(&log)
        .args(args)
        .current_dir("/")
        .stdin(Stdio::null());
    cmd.output().expect("run pg_ctl")
}

/// Whether a cluster accepts queries.
pub fn cluster_up(c: &Clusters, port: u16) -> bool {
    TcpStream::connect_timeout(
        &(std::net::Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_secs(1),
    )
    .is_ok()
        && psql(
            // Bounded: a stopped (SIGSTOP) server accepts the connection
            // and never answers.
            &format!(
                "host={} port={port} user={SUPERUSER} dbname=postgres connect_timeout=10",
                c.host
            ),
            &["-Atc", "select 1"],
            None,
        )
        .status
        .success()
}

/// Whatever happens in a test that stops a cluster, it runs again after.
pub struct ClusterGuard {
    c: Clusters,
    which: &'static str,
}

impl ClusterGuard {
    pub fn new(c: &Clusters, which: &'static str) -> Self {
        Self {
            c: c.clone(),
            which,
        }
    }
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        let port = if self.which == "source" {
            self.c.source_port
        } else {
            self.c.target_port
        };
        if !cluster_up(&self.c, port) {
            let out = pg_ctl(&self.c, self.which, &["-w", "-t", "120", "start"]);
            eprintln!(
                "restarting the {} after the test: {}",
                self.which,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The pids of the target cluster's processes (postmaster and children).
/// The target's postmaster pid.
fn target_postmaster(c: &Clusters) -> String {
    let pidfile = c.dir.join("target").join("postmaster.pid");
    let text = std::fs::read_to_string(&pidfile).unwrap();
    text.lines().next().unwrap().trim().to_string()
}

/// Sends `sig` to one process; false when it is gone.
fn signal_pid(pid: &str, sig: &str) -> bool {
    std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The target paused (SIGSTOP: connections hang, nothing answers) until
/// dropped, whatever happens in the test.
pub struct Paused(Vec<String>);

impl Paused {
    /// Stops the postmaster first (a stopped postmaster forks nothing, so
    /// its children are then a fixed set), then each child; a child that
    /// exited in between is simply not there to stop. The guard exists
    /// before the first signal, so a panic here still resumes what was
    /// stopped.
    pub fn target(c: &Clusters) -> Self {
        let postmaster = target_postmaster(c);
        let mut paused = Self(Vec::new());
        assert!(
            signal_pid(&postmaster, "STOP"),
            "cannot stop the target's postmaster {postmaster}"
        );
        paused.0.push(postmaster.clone());
        let out = std::process::Command::new("pgrep")
            .args(["-P", &postmaster])
            .output()
            .unwrap();
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if signal_pid(pid, "STOP") {
                paused.0.push(pid.to_string());
            }
        }
        paused
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        // Children first, the postmaster last; one that is gone is no
        // reason to leave the others stopped.
        for pid in self.0.iter().rev() {
            signal_pid(pid, "CONT");
        }
    }
}

/// pgbench through the proxy as `user`, with a bounded connect timeout.
pub fn pgbench_cmd(p: &Proxy, user: &str, db: &str, args: &[&str]) -> Command {
    let mut cmd = pg_tool(&p.clusters, "pgbench");
    cmd.args(["-h", "127.0.0.1", "-p", &p.port.to_string(), "-U", user])
        .args(args)
        .arg(db)
        .env("PGCONNECT_TIMEOUT", "20");
    cmd
}

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A client program running in the background, its output collected.
pub struct Running(std::process::Child);

impl Running {
    pub fn spawn(cmd: &mut Command) -> Running {
        Running(
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn"),
        )
    }

    /// Waits for pgbench to end and checks it succeeded with no failed
    /// transaction; returns its report.
    #[track_caller]
    pub fn pgbench_ok(self) -> String {
        let out = self.0.wait_with_output().expect("wait");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "pgbench failed:\n{text}");
        assert!(
            text.contains("number of failed transactions: 0 "),
            "pgbench had failures:\n{text}"
        );
        text
    }
}

/// Runs `cmd` to its end like `output()`, but kills it and fails the test
/// (with what it printed) if it has not ended within `limit`.
#[track_caller]
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let until = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if std::time::Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {limit:?}: killed; it printed:\n{}\n{}",
                String::from_utf8_lossy(&out.join().unwrap_or_default()),
                String::from_utf8_lossy(&err.join().unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// `cmd.background()`: runs a command as a `Running`.
pub trait Background {
    fn background(&mut self) -> Running;
}

impl Background for Command {
    fn background(&mut self) -> Running {
        Running::spawn(self)
    }
}

/// A SQL string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The first statement after a tokio-postgres cancel. tokio-postgres closes
/// its cancel connection as soon as it has written the request, without
/// waiting for the server to close it as libpq does, and Postgres up to 17
/// signals the backend twice per cancel (its pid, then its process group):
/// the second signal can land on this statement, with or without a proxy.
/// Such a cancel is taken once, and the statement run again. (The proxy's
/// own ordering of cancels is tested with psycopg, whose cancel waits.)
pub async fn query_one_after_cancel(
    client: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> tokio_postgres::Row {
    match client.query_one(sql, params).await {
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) => {
            client.query_one(sql, params).await.unwrap()
        }
        r => r.unwrap(),
    }
}
