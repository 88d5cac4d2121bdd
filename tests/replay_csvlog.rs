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

/// The pgbench tables and the psql session's table.
fn state(c: &Clusters, db: &str) -> Vec<String> {
    let mut v = pgbench_state(c, db);
    v.push(c.sql(
        c.source_port,
        db,
        "SELECT coalesce(string_agg(id || '=' || body, '|' ORDER BY id), '-') FROM notes",
    ));
    v
}

#[test]
fn a_real_csvlog_replays_with_no_errors() {
    let c = Clusters::get();
    let (db, copy) = ("rr_csvlog", "rr_csvlog_copy");
    pgbench_db_on_source(&c, db, Some(copy));
    for d in [db, copy] {
        c.sql(
            c.source_port,
            d,
            "CREATE TABLE notes (id int PRIMARY KEY, body text)",
        );
    }

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
        let out = pgbench_on_source(&c, &["-n", "-M", mode, "-T", "2", "-c", "2", "-j", "2", db]);
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
    let logged = state(&c, db);
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
    assert_replay_complete(&report);
    // Six pgbench clients (and pgbench's own set-up sessions) and psql.
    assert!(
        report["sessions"]["started"].as_u64().unwrap() >= 7,
        "{report:#}"
    );
    assert!(report["statements"].as_u64().unwrap() > 500, "{report:#}");
    assert_eq!(
        state(&c, copy),
        logged,
        "the replayed database differs from the logged one"
    );
}
