//! Write mirroring on the real clusters: pgbench TPC-B, a mixed workload of
//! transactions, savepoints, failures, prepared statements, COPY, DDL and
//! temp tables, and a divergence planted on the target. Every test compares
//! what the target ends up with against the source, read directly.
mod common;
use common::mirror::*;
use common::*;

use bytes::Bytes;
use futures_util::{pin_mut, SinkExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

fn mirrored_proxy(spool: &std::path::Path) -> Proxy {
    let spool = spool.to_path_buf();
    Proxy::start_with(move |cfg| mirror_config(cfg, &spool))
}

/// The same, with the admin API showing statement texts as they are.
fn mirrored_proxy_showing_data(spool: &std::path::Path) -> Proxy {
    let spool = spool.to_path_buf();
    Proxy::start_showing_data(move |cfg| mirror_config(cfg, &spool))
}

#[test]
fn tpcb_8_clients_30s_leaves_the_target_identical() {
    let spool = tempfile::tempdir().unwrap();
    let p = mirrored_proxy(spool.path());
    let c = &p.clusters;
    let db = "mirror_tpcb";
    c.fresh_db(db);
    pgbench_ok(&p, db, &["-i", "-s", "1", "-q"]);
    let report = pgbench_ok(&p, db, &["-c", "8", "-j", "2", "-T", "30"]);
    let done: u64 = report
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in:\n{report}"));
    assert!(done > 0, "{report}");

    let m = p.wait_mirror_drained(300);
    // Every pgbench transaction is one unit, plus the set-up ones.
    assert!(
        m["applied_transactions"].as_u64().unwrap() >= done,
        "applied fewer units than pgbench committed ({done}): {m:#}"
    );
    assert_pgbench_tables_same(c, db);
    assert_eq!(
        rows(c, c.target_port, db, "select count(*) from pgbench_history"),
        done.to_string() + "\n"
    );
    // mtime is CURRENT_TIMESTAMP: it cannot replay to the same value, and
    // the proxy says so for the statement that inserts it.
    let nd = m["report"]["nondeterministic"].as_array().unwrap();
    assert!(
        nd.iter().any(|n| n["tables"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t.as_str().unwrap().ends_with("pgbench_history"))
            && n["reasons"]
                .to_string()
                .to_lowercase()
                .contains("current_timestamp")),
        "pgbench_history's insert not flagged non-deterministic: {m:#}"
    );
    assert_eq!(m["report"]["divergences_total"], 0, "{m:#}");
    assert_eq!(m["lost_transactions"], 0, "{m:#}");
    assert_eq!(m["report"]["needs_resync"], false, "{m:#}");
    assert_eq!(m["state"], "caught_up", "{m:#}");
}

/// A psql script of the shapes applications use: every committed effect
/// must reach the target, nothing rolled back or failed may.
const MIXED_SCRIPT: &str = r#"
\set ON_ERROR_STOP 0
CREATE TABLE items(id int PRIMARY KEY, name text NOT NULL, qty int NOT NULL DEFAULT 0);
INSERT INTO items VALUES (1, 'a', 1), (2, 'b', 2);
BEGIN;
INSERT INTO items VALUES (3, 'c', 3);
UPDATE items SET qty = qty + 10 WHERE id = 1;
COMMIT;
BEGIN;
INSERT INTO items VALUES (100, 'rolled back', 0);
ROLLBACK;
BEGIN;
INSERT INTO items VALUES (4, 'd', 4);
SAVEPOINT s1;
INSERT INTO items VALUES (101, 'undone by ROLLBACK TO', 0);
ROLLBACK TO SAVEPOINT s1;
INSERT INTO items VALUES (5, 'e', 5);
RELEASE SAVEPOINT s1;
COMMIT;
-- fails on both: unique violation in autocommit
INSERT INTO items VALUES (1, 'duplicate', 0);
-- a failed transaction: its COMMIT becomes a ROLLBACK
BEGIN;
INSERT INTO items VALUES (102, 'in a failed transaction', 0);
INSERT INTO items VALUES (1, 'duplicate', 0);
COMMIT;
-- a failure recovered by a savepoint: the rest commits
BEGIN;
INSERT INTO items VALUES (6, 'f', 6);
SAVEPOINT s2;
INSERT INTO items VALUES (2, 'duplicate', 0);
ROLLBACK TO s2;
INSERT INTO items VALUES (7, 'g', 7);
COMMIT;
-- a multi-statement query string (one implicit transaction)
INSERT INTO items VALUES (12, 'l', 12) \; UPDATE items SET qty = qty + 1 WHERE id = 12;
-- one that fails half-way: nothing of it commits
INSERT INTO items VALUES (103, 'before the failure', 0) \; INSERT INTO items VALUES (1, 'dup', 0);
-- DDL
ALTER TABLE items ADD COLUMN note text DEFAULT 'none';
UPDATE items SET note = 'even ' || id WHERE id % 2 = 0;
CREATE INDEX items_name ON items(name);
-- temp tables live on the session's own target connection
CREATE TEMP TABLE staging(id int, name text);
INSERT INTO staging VALUES (8, 'h'), (9, 'i');
INSERT INTO items(id, name, qty) SELECT id, name, id FROM staging;
COPY items(id, name, qty) FROM STDIN;
10	j	10
11	k	11
\.
-- a failed COPY loads nothing
COPY items(id, name, qty) FROM STDIN;
104	bad copy	0
1	duplicate	0
\.
-- session state: search_path and SQL-level prepared statements
CREATE SCHEMA app;
SET search_path = app, public;
CREATE TABLE notes(id int PRIMARY KEY, body text);
INSERT INTO notes VALUES (1, 'in schema app');
PREPARE add_note(int, text) AS INSERT INTO notes VALUES ($1, $2);
EXECUTE add_note(2, 'through PREPARE');
BEGIN;
EXECUTE add_note(3, 'prepared, in a transaction');
COMMIT;
DO $$ BEGIN INSERT INTO notes VALUES (4, 'from a DO block'); END $$;
DELETE FROM public.items WHERE id = 3;
DISCARD ALL;
-- search_path is public again after DISCARD ALL
INSERT INTO items VALUES (13, 'after discard', 13);
"#;

#[tokio::test(flavor = "multi_thread")]
async fn mixed_workload_reaches_the_target_and_rolled_back_work_does_not() {
    let spool = tempfile::tempdir().unwrap();
    let p = tokio::task::block_in_place(|| mirrored_proxy(spool.path()));
    let c = p.clusters.clone();
    let db = "mirror_mixed";
    tokio::task::block_in_place(|| {
        c.fresh_db(db);
        // Not psql_ok: the script fails on purpose in places.
        let out = psql(
            &p.url(SUPERUSER, db),
            &["-q"],
            Some(MIXED_SCRIPT.as_bytes()),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.matches("ERROR:").count(),
            5,
            "expected exactly the five planted failures:\n{err}"
        );
    });

    // The extended protocol with named prepared statements (tokio-postgres).
    let (client, conn) = p.pg_config(SUPERUSER, db).connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    let ins = client
        .prepare("INSERT INTO items(id, name, qty) VALUES ($1, $2, $3)")
        .await
        .unwrap();
    for i in 20..25i32 {
        client
            .execute(&ins, &[&i, &format!("tp{i}"), &i])
            .await
            .unwrap();
    }
    let mut client = client;
    let tx = client.transaction().await.unwrap();
    for i in 30..33i32 {
        tx.execute(&ins, &[&i, &format!("tx{i}"), &i])
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let tx = client.transaction().await.unwrap();
    tx.execute(&ins, &[&200i32, &"rolled back (extended)", &0i32])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let err = client
        .execute(&ins, &[&1i32, &"duplicate", &0i32])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION));
    let bump = client
        .prepare("UPDATE items SET qty = qty * 2 WHERE id = ANY($1)")
        .await
        .unwrap();
    let n = client
        .execute(&bump, &[&vec![20i32, 21, 30]])
        .await
        .unwrap();
    assert_eq!(n, 3);
    let sink = client
        .copy_in("COPY items(id, name, qty) FROM STDIN")
        .await
        .unwrap();
    pin_mut!(sink);
    sink.send(Bytes::from_static(b"40\tcopy 40\t40\n41\tcopy 41\t41\n"))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2);
    drop(client);

    tokio::task::block_in_place(|| {
        let m = p.wait_mirror_drained(60);
        assert_same(&c, db, "select * from items order by id");
        assert_same(&c, db, "select * from app.notes order by id");
        assert_same(
            &c,
            db,
            "select indexname from pg_indexes where schemaname in ('public', 'app') order by 1",
        );
        // What committed is there, and only that.
        let ids = "select string_agg(id::text, ',' order by id) from items";
        let want = "1,2,4,5,6,7,8,9,10,11,12,13,20,21,22,23,24,30,31,32,40,41\n";
        assert_eq!(rows(&c, c.source_port, db, ids), want);
        assert_eq!(rows(&c, c.target_port, db, ids), want);
        assert_eq!(
            rows(
                &c,
                c.target_port,
                db,
                "select qty, note from items where id = 12"
            ),
            "13|even 12\n"
        );
        assert_eq!(m["report"]["divergences_total"], 0, "{m:#}");
        assert_eq!(m["report"]["needs_resync"], false, "{m:#}");
    });
}

#[test]
fn a_row_changed_on_the_target_is_reported_when_the_next_write_touches_it() {
    let spool = tempfile::tempdir().unwrap();
    let p = mirrored_proxy(spool.path());
    let c = &p.clusters;
    let db = "mirror_diverge";
    c.fresh_db(db);
    let url = p.url(SUPERUSER, db);
    psql_ok(
        &url,
        &[
            "-c",
            "CREATE TABLE t(id int PRIMARY KEY, v int NOT NULL)",
            "-c",
            "INSERT INTO t SELECT g, g FROM generate_series(1, 10) g",
        ],
        None,
    );
    p.wait_mirror_drained(30);
    // Planted by hand on the target only.
    c.sql(c.target_port, db, "UPDATE t SET v = 1000 WHERE id = 5");
    c.sql(c.target_port, db, "INSERT INTO t VALUES (11, 500)");

    // A write that does not touch the planted rows: no divergence.
    psql_ok(&url, &["-c", "UPDATE t SET v = v WHERE id = 1"], None);
    let m = p.wait_mirror_drained(30);
    assert_eq!(m["report"]["divergences_total"], 0, "{m:#}");

    // One that covers row 5: the source updates 10 rows, the target 9.
    psql_ok(&url, &["-c", "UPDATE t SET v = v + 1 WHERE v <= 10"], None);
    // One that collides with the planted row 11 on the target only.
    psql_ok(&url, &["-c", "INSERT INTO t VALUES (11, 11)"], None);
    // The mirror carries on after both.
    psql_ok(&url, &["-c", "INSERT INTO t VALUES (12, 12)"], None);
    let m = p.wait_mirror_drained(30);
    assert_eq!(m["report"]["divergences_total"], 2, "{m:#}");
    // The admin API (no admin.show_data) shows the statements with their
    // literals replaced, and no server error text.
    let divs = m["report"]["divergences"].as_array().unwrap();
    let update = divs
        .iter()
        .find(|d| d["statement"] == "UPDATE t SET v = v + $1 WHERE v <= $2")
        .unwrap_or_else(|| panic!("no divergence for the UPDATE: {m:#}"));
    assert_eq!(update["source"], "UPDATE 10", "{update:#}");
    assert_eq!(update["target"], "UPDATE 9", "{update:#}");
    let insert = divs
        .iter()
        .find(|d| d["statement"] == "INSERT INTO t VALUES ($1, $2)")
        .unwrap_or_else(|| panic!("no divergence for the INSERT: {m:#}"));
    assert_eq!(insert["source"], "INSERT 0 1", "{insert:#}");
    assert!(
        insert["target"].as_str().unwrap().contains("23505"),
        "{insert:#}"
    );
    assert_eq!(insert["target_error"], "<redacted>", "{insert:#}");
    let (code, body) = p.admin_get("/status");
    assert_eq!(code, 200);
    for literal in ["v <= 10", "(11, 11)", "duplicate key"] {
        assert!(!body.contains(literal), "{literal} in /status: {body}");
    }
    assert_eq!(m["report"]["target_errors_by_class"]["23"], 1, "{m:#}");
    assert_eq!(
        rows(c, c.target_port, db, "select v from t where id = 12"),
        "12\n"
    );

    // The log has one JSON line per fingerprint, naming the statement.
    let log = std::fs::read_to_string(spool.path().join("divergences.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{log}");
    let fp = update["fingerprint"].as_str().unwrap();
    // The log (private to the proxy's user) has the statement as it ran.
    assert!(lines.iter().any(|l| l["fingerprint"] == fp
        && l["target"] == "UPDATE 9"
        && l["statement"] == "UPDATE t SET v = v + 1 WHERE v <= 10"));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(spool.path().join("divergences.jsonl"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // And the metric is labelled by that fingerprint.
    let metrics = p.metrics_text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("pgshift_mirror_divergences") && l.contains(fp)),
        "{metrics}"
    );
}

/// `(tid, bid, aid, delta)` from the pgbench_history INSERT in a unit's
/// statements (pgbench's simple protocol inlines the values).
fn history_values(statements: &str) -> Option<(i64, i64, i64, i64)> {
    let rest = &statements[statements.find("INSERT INTO pgbench_history")?..];
    let values = &rest[rest.find("VALUES (")? + 8..];
    let v: Vec<i64> = values
        .split(',')
        .take(4)
        .map(|x| x.trim().parse().ok())
        .collect::<Option<_>>()?;
    Some((v[0], v[1], v[2], v[3]))
}

/// `key|value` rows into a map.
fn balances(text: &str) -> std::collections::HashMap<i64, i64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('|')?;
            Some((k.parse().ok()?, v.parse().ok()?))
        })
        .collect()
}

#[test]
fn sigkill_mid_load_then_restart_resumes_without_applying_anything_twice() {
    let spool = tempfile::tempdir().unwrap();
    let p = mirrored_proxy_showing_data(spool.path());
    let c = p.clusters.clone();
    let db = "mirror_kill";
    c.fresh_db(db);
    pgbench_ok(&p, db, &["-i", "-s", "1", "-q"]);
    p.wait_mirror_drained(60);

    let load = pgbench_spawn(
        &p,
        db,
        &["-M", "simple", "-c", "8", "-j", "2", "-T", "30", "-n"],
    );
    std::thread::sleep(std::time::Duration::from_secs(6));
    let mut p = p;
    p.signal("KILL");
    p.wait_exit(10);
    let out = load.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "pgbench should have lost its connections"
    );
    drop(p);

    // Same spool, new process.
    let p = mirrored_proxy_showing_data(spool.path());
    let m = p.wait_mirror_drained(120);
    let resumed = m["applied_transactions"].as_u64().unwrap()
        + m["skipped_already_applied"].as_u64().unwrap();
    assert!(resumed > 0, "nothing was resumed from the spool: {m:#}");
    // Mirroring carries on through the new process.
    pgbench_ok(&p, db, &["-c", "4", "-j", "2", "-T", "5", "-n"]);
    let m = p.wait_mirror_drained(120);
    assert_eq!(m["report"]["divergences_total"], 0, "{m:#}");

    // Units whose commit was in flight at the kill are reported in doubt;
    // those that did commit on the source are the only differences allowed.
    let in_doubt: Vec<String> = m["report"]["gaps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["kind"] == "in_doubt")
        .map(|g| g["statements"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(m["report"]["in_doubt"], in_doubt.len(), "{m:#}");
    let mut doubtful: Vec<(i64, i64, i64, i64)> = in_doubt
        .iter()
        .map(|s| history_values(s).unwrap_or_else(|| panic!("not a TPC-B unit: {s}")))
        .collect();
    let history = |port| {
        let mut v: Vec<(i64, i64, i64, i64)> = rows(
            &c,
            port,
            db,
            "select tid, bid, aid, delta from pgbench_history",
        )
        .lines()
        .map(|l| {
            let f: Vec<i64> = l.split('|').map(|x| x.parse().unwrap()).collect();
            (f[0], f[1], f[2], f[3])
        })
        .collect();
        v.sort();
        v
    };
    let (src, mut tgt) = (history(c.source_port), history(c.target_port));
    // Multiset difference: source minus target.
    let mut missing = Vec::new();
    for row in &src {
        match tgt.binary_search(row) {
            Ok(i) => {
                tgt.remove(i);
            }
            Err(_) => missing.push(*row),
        }
    }
    assert!(
        tgt.is_empty(),
        "rows on the target that the source does not have (applied twice?): {tgt:?}"
    );
    for row in &missing {
        let i = doubtful.iter().position(|d| d == row).unwrap_or_else(|| {
            panic!("{row:?} committed on the source, is missing on the target and was not reported in doubt ({in_doubt:?})")
        });
        doubtful.remove(i);
    }
    // Balances differ by exactly the missing units' deltas.
    for (table, key, col, pick) in [
        ("pgbench_accounts", "aid", "abalance", 2usize),
        ("pgbench_tellers", "tid", "tbalance", 0),
        ("pgbench_branches", "bid", "bbalance", 1),
    ] {
        let sql = format!("select {key}, {col} from {table}");
        let s = balances(&rows(&c, c.source_port, db, &sql));
        let t = balances(&rows(&c, c.target_port, db, &sql));
        assert_eq!(s.len(), t.len(), "{table}");
        let mut want = std::collections::HashMap::new();
        for m in &missing {
            let k = [m.0, m.1, m.2][pick];
            *want.entry(k).or_insert(0) += m.3;
        }
        for (k, sv) in &s {
            let diff = sv - t[k];
            assert_eq!(
                diff,
                want.get(k).copied().unwrap_or(0),
                "{table} {key} = {k}: source {sv}, target {}",
                t[k]
            );
        }
    }
    eprintln!(
        "in doubt after the kill: {} unit(s), {} of them committed on the source",
        in_doubt.len(),
        missing.len()
    );
}

/// Conflicting, order-dependent writes from concurrent sessions: each one
/// rewrites a hot row from its previous value, so the target ends equal only
/// if every pair was applied in the source's commit order. Acknowledgement
/// order is not enough: Postgres releases a transaction's locks before it
/// acknowledges the commit, and a proxy thread descheduled in between lets a
/// later, conflicting commit be spooled first (before the order probe, this
/// test failed on every run). One row is rewritten in explicit blocks, the
/// other by autocommit statements, in all three pgbench protocol modes, so
/// every probe shape is used; each mode must leave the rows equal and every
/// unit with an order key.
#[test]
fn conflicting_order_dependent_writes_replay_in_commit_order() {
    let spool = tempfile::tempdir().unwrap();
    let p = mirrored_proxy(spool.path());
    let c = &p.clusters;
    let db = "mirror_order";
    c.fresh_db(db);
    psql_ok(
        &p.url(SUPERUSER, db),
        &[
            "-c",
            "CREATE TABLE hot(id int PRIMARY KEY, v bigint NOT NULL)",
            "-c",
            "INSERT INTO hot VALUES (1, 1), (2, 1)",
        ],
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let block = dir.path().join("block.sql");
    std::fs::write(
        &block,
        "\\set k random(1, 1000000000)\nBEGIN;\nUPDATE hot SET v = (v * 31 + :k) % 1000000007 WHERE id = 1;\nEND;\n",
    )
    .unwrap();
    let auto = dir.path().join("auto.sql");
    std::fs::write(
        &auto,
        "\\set k random(1, 1000000000)\nUPDATE hot SET v = (v * 31 + :k) % 1000000007 WHERE id = 2;\n",
    )
    .unwrap();
    // The CREATE TABLE above is DDL outside a block: it has no key.
    let unkeyed = p.wait_mirror_drained(60)["units_without_order_key"].clone();
    for mode in ["simple", "extended", "prepared"] {
        pgbench_ok(
            &p,
            db,
            &[
                "-n",
                "-M",
                mode,
                "-f",
                block.to_str().unwrap(),
                "-f",
                auto.to_str().unwrap(),
                "-c",
                "8",
                "-j",
                "2",
                "-T",
                "10",
            ],
        );
        let status = p.wait_mirror_drained(120);
        assert_same(c, db, "select * from hot order by id");
        assert_eq!(
            status["units_without_order_key"], unkeyed,
            "mode {mode}: some units had no order key: {status:#}"
        );
        assert_eq!(
            status["report"]["divergences_total"], 0,
            "mode {mode}: {status:#}"
        );
    }
}

/// Where the source refuses the order probe (EXECUTE on
/// `pg_current_wal_insert_lsn()` revoked from the role), the proxy learns it
/// from a probe that only checks, before it would append one to a client's
/// autocommit write: clients see no error, every write still reaches the
/// target, and the units without an order key are counted.
#[test]
fn a_source_that_refuses_the_order_probe_costs_clients_nothing() {
    let spool = tempfile::tempdir().unwrap();
    let p = mirrored_proxy(spool.path());
    let c = &p.clusters;
    let db = "mirror_noprobe";
    c.fresh_db(db);
    psql_ok(
        &p.url(SUPERUSER, db),
        &[
            "-c",
            "CREATE TABLE t(id int PRIMARY KEY, v bigint NOT NULL)",
            "-c",
            "INSERT INTO t VALUES (1, 0), (2, 0)",
            "-c",
            "GRANT ALL ON t TO PUBLIC",
        ],
        None,
    );
    c.sql(
        c.source_port,
        db,
        "REVOKE EXECUTE ON FUNCTION pg_current_wal_insert_lsn() FROM PUBLIC",
    );
    let before = p.wait_mirror_drained(60)["units_without_order_key"]
        .as_u64()
        .unwrap();
    let user = "pgshift_trust";
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("w.sql");
    std::fs::write(
        &script,
        "UPDATE t SET v = v + 1 WHERE id = 1;\nBEGIN;\nUPDATE t SET v = v + 1 WHERE id = 2;\nCOMMIT;\n",
    )
    .unwrap();
    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench_cmd(
            &p,
            user,
            db,
            &[
                "-n",
                "-M",
                mode,
                "-f",
                script.to_str().unwrap(),
                "-c",
                "2",
                "-t",
                "50",
            ],
        )
        .output()
        .unwrap();
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{mode}: {report}");
        assert!(!report.contains("error"), "{mode}: {report}");
    }
    let m = p.wait_mirror_drained(120);
    assert_same(c, db, "select * from t order by id");
    assert_eq!(
        c.sql(c.source_port, db, "select v from t order by id"),
        "300\n300",
        "every write committed on the source"
    );
    // Only the first sessions' probes checked: after one refusal, this
    // user and database get no more probes.
    let unkeyed = m["units_without_order_key"].as_u64().unwrap() - before;
    assert_eq!(unkeyed, 600, "{m:#}");
    let metrics = p.metrics_text();
    let failures: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pgshift_mirror_order_probe_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no probe failure metric:\n{metrics}"));
    assert!((1..=6).contains(&failures), "{failures} probe failures");
}
