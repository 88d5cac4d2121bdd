//! Helpers for the mirroring tests: a proxy with `[mirror]` switched on,
//! waiting for the applier to drain, and comparing table contents on the
//! two clusters.
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use super::*;

/// Adds an enabled `[mirror]` section spooling to `spool`.
pub fn mirror_config(cfg: &mut toml_edit::DocumentMut, spool: &Path) {
    let mut t = toml_edit::Table::new();
    t["enabled"] = toml_edit::value(true);
    t["spool_dir"] = toml_edit::value(spool.display().to_string());
    t["fsync_interval_ms"] = toml_edit::value(200);
    cfg["mirror"] = toml_edit::Item::Table(t);
}

impl Proxy {
    /// The proxy's `/status` mirror section.
    pub fn mirror(&self) -> serde_json::Value {
        self.status()["mirror"].clone()
    }

    /// Waits until every spooled unit is applied on the target; returns the
    /// final mirror status.
    #[track_caller]
    pub fn wait_mirror_drained(&self, secs: u64) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut last = serde_json::Value::Null;
        while Instant::now() < deadline {
            last = self.mirror();
            if last["lag_transactions"] == 0 && last["applied_seq"] == last["spooled_seq"] {
                return last;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "the mirror did not drain in {secs}s: {last:#}\nproxy log:\n{}",
            self.log()
        );
    }

    /// The admin API's Prometheus text.
    pub fn metrics_text(&self) -> String {
        let (code, body) = self.admin_get("/metrics");
        assert_eq!(code, 200, "{body}");
        body
    }
}

/// Runs a query as the superuser on one cluster; rows as `-At` text.
pub fn rows(c: &Clusters, port: u16, db: &str, sql: &str) -> String {
    let conn = format!("host={} port={port} user={SUPERUSER} dbname={db}", c.host);
    psql_ok(&conn, &["-At", "-c", sql], None)
}

/// Asserts that `sql` returns the same rows on source and target. On a
/// difference, names the first rows that differ (outputs can be large).
#[track_caller]
pub fn assert_same(c: &Clusters, db: &str, sql: &str) {
    let s = rows(c, c.source_port, db, sql);
    let t = rows(c, c.target_port, db, sql);
    if s == t {
        return;
    }
    let sl: Vec<&str> = s.lines().collect();
    let tl: Vec<&str> = t.lines().collect();
    let only_s: Vec<&&str> = sl.iter().filter(|l| !tl.contains(l)).take(5).collect();
    let only_t: Vec<&&str> = tl.iter().filter(|l| !sl.contains(l)).take(5).collect();
    panic!(
        "{sql}: source has {} rows, target {}; only on the source: {only_s:?}; only on the target: {only_t:?}",
        sl.len(),
        tl.len()
    );
}

/// Runs pgbench through the proxy as the superuser.
pub fn pgbench(p: &Proxy, db: &str, args: &[&str]) -> Output {
    pgbench_cmd(p, SUPERUSER, db, args)
        .output()
        .expect("run pgbench")
}

/// Starts pgbench through the proxy in the background (output captured).
pub fn pgbench_spawn(p: &Proxy, db: &str, args: &[&str]) -> std::process::Child {
    pgbench_cmd(p, SUPERUSER, db, args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start pgbench")
}

/// pgbench that must succeed with no failed transaction; returns its report.
#[track_caller]
pub fn pgbench_ok(p: &Proxy, db: &str, args: &[&str]) -> String {
    let out = pgbench(p, db, args);
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pgbench {args:?} failed:\n{report}");
    assert!(!report.contains("aborted"), "pgbench {args:?}:\n{report}");
    if let Some(failed) = report
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions:"))
    {
        assert!(
            failed.trim().starts_with("0 "),
            "pgbench {args:?}:\n{report}"
        );
    }
    report
}

/// The tables pgbench writes, compared in full (history without `mtime`).
pub fn assert_pgbench_tables_same(c: &Clusters, db: &str) {
    assert_same(c, db, "select * from pgbench_branches order by bid");
    assert_same(c, db, "select * from pgbench_tellers order by tid");
    assert_same(c, db, "select * from pgbench_accounts order by aid");
    assert_same(
        c,
        db,
        "select tid, bid, aid, delta from pgbench_history order by tid, bid, aid, delta",
    );
}
