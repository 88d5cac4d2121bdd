//! `pgshift replay --format csvlog`: a csvlog written by the real source
//! cluster (restarted with the logging collector and csvlog for this test,
//! `log_statement = 'all'` for one database) replays with no errors and
//! leaves the same TPC-B tables as the logged run. Its own binary: it
//! restarts the source cluster.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;

/// Restarts the source with the options it normally has (none beyond its
/// config files) when dropped, so a failing test leaves it as it was.
struct RestoreSource(Clusters);

impl Drop for RestoreSource {
    fn drop(&mut self) {
        let out = pg_ctl(
            &self.0,
            "source",
            &["-m", "fast", "-w", "-t", "120", "-o", "", "restart"],
        );
        if !out.status.success() {
            eprintln!("could not restart the source cluster: {out:?}");
        }
    }
}

fn tpcb_state(c: &Clusters, db: &str) -> Vec<String> {
    [
        "SELECT count(*) || ' ' || md5(string_agg(aid || ':' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts",
        "SELECT md5(string_agg(bid || ':' || bbalance, ',' ORDER BY bid)) FROM pgbench_branches",
        "SELECT md5(string_agg(tid || ':' || tbalance, ',' ORDER BY tid)) FROM pgbench_tellers",
        "SELECT count(*) || ' ' || coalesce(md5(string_agg(tid || ':' || bid || ':' || aid || ':' || delta, ',' ORDER BY tid, bid, aid, delta)), '-') FROM pgbench_history",
        "SELECT coalesce(string_agg(id || '=' || body, '|' ORDER BY id), '-') FROM notes",
    ]
    .iter()
    .map(|q| c.sql(c.source_port, db, q))
    .collect()
}

#[test]
fn a_real_csvlog_replays_with_no_errors() {
    let c = Clusters::get();
    let (db, copy) = ("rr_csvlog", "rr_csvlog_copy");
    c.fresh_db(db);
    let init = pg_tool(&c, "pgbench")
        .args([
            "-h",
            &c.host,
            "-p",
            &c.source_port.to_string(),
            "-U",
            SUPERUSER,
        ])
        .args(["-i", "-s", "1", "-q", db])
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    c.sql(
        c.source_port,
        db,
        "CREATE TABLE notes (id int PRIMARY KEY, body text)",
    );
    c.sql(
        c.source_port,
        "postgres",
        &format!("DROP DATABASE IF EXISTS {copy} WITH (FORCE)"),
    );
    c.sql(
        c.source_port,
        "postgres",
        &format!("CREATE DATABASE {copy} TEMPLATE {db}"),
    );

    let logs = tempfile::tempdir().unwrap();
    std::fs::set_permissions(logs.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let opts = format!(
        "-c logging_collector=on -c log_destination=csvlog -c log_directory={} -c log_filename=replay-%H%M%S.log -c lc_messages=C",
        logs.path().display()
    );
    let restore = RestoreSource(c.clone());
    let out = pg_ctl(
        &c,
        "source",
        &["-m", "fast", "-w", "-t", "120", "-o", &opts, "restart"],
    );
    assert!(out.status.success(), "restart with csvlog: {out:?}");
    c.sql(
        c.source_port,
        "postgres",
        &format!("ALTER DATABASE {db} SET log_statement = 'all'"),
    );

    // The logged workload, straight to the source: TPC-B in all three
    // protocol modes, and psql with multi-line text, quotes and NULL.
    for mode in ["simple", "extended", "prepared"] {
        let out = pg_tool(&c, "pgbench")
            .args([
                "-h",
                &c.host,
                "-p",
                &c.source_port.to_string(),
                "-U",
                SUPERUSER,
            ])
            .args(["-n", "-M", mode, "-T", "2", "-c", "2", "-j", "2", db])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("failed transactions: 0 "),
            "{out:?}"
        );
    }
    psql_ok(
        &c.source_url(SUPERUSER, db),
        &[
            "-c",
            "INSERT INTO notes VALUES (1, 'it''s a note'),\n  (2, 'two,\nlines')",
            "-c",
            "UPDATE notes SET body = body || ' (seen)' WHERE id = 1",
            "-c",
            "SELECT * FROM notes WHERE body IS NOT NULL ORDER BY id",
        ],
        None,
    );
    c.sql(
        c.source_port,
        "postgres",
        &format!("ALTER DATABASE {db} RESET log_statement"),
    );
    let logged = tpcb_state(&c, db);
    drop(restore); // the source as before; flushes and closes the csvlog

    let mut csv = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(logs.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "csv"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no csvlog written");
    for f in &files {
        csv.extend(std::fs::read(f).unwrap());
    }
    let all = logs.path().join("all.csvlog");
    std::fs::write(&all, &csv).unwrap();

    let url = format!("postgres://{SUPERUSER}@{}:{}/{copy}", c.host, c.source_port);
    let out = Command::new(env!("CARGO_BIN_EXE_pgshift"))
        .args(["replay", all.to_str().unwrap(), "--format", "csvlog"])
        .args(["--url", &url, "--speed", "max", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["errors_total"], 0, "{report:#}");
    assert_eq!(report["sessions"]["failed_to_connect"], 0, "{report:#}");
    assert_eq!(report["sessions"]["lost"], 0, "{report:#}");
    // Six pgbench clients (and pgbench's own set-up sessions) and psql.
    assert!(
        report["sessions"]["started"].as_u64().unwrap() >= 7,
        "{report:#}"
    );
    assert_eq!(
        report["sessions"]["started"], report["meta"]["sessions"],
        "{report:#}"
    );
    assert_eq!(
        report["statements"], report["meta"]["recorded_statements"],
        "{report:#}"
    );
    assert!(report["statements"].as_u64().unwrap() > 500, "{report:#}");
    assert_eq!(
        tpcb_state(&c, copy),
        logged,
        "the replayed database differs from the logged one"
    );
}
