//! Shadow reads on real clusters: a row changed on the target by hand is a
//! confirmed mismatch naming the row and column; physical row order and
//! ties under ORDER BY are not mismatches; non-deterministic statements
//! are learned as noise; TPC-B plus select-only with every read shadowed
//! confirms no mismatch.
mod common;
use common::mirror::*;
use common::*;

use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

fn shadow_config(cfg: &mut toml_edit::DocumentMut, sample_percent: f64) {
    let mut t = toml_edit::Table::new();
    t["sample_percent"] = toml_edit::value(sample_percent);
    t["recheck_delay_ms"] = toml_edit::value(100);
    cfg["shadow"] = toml_edit::Item::Table(t);
}

fn routing_config(cfg: &mut toml_edit::DocumentMut, read_percent: f64) {
    let mut t = toml_edit::Table::new();
    t["read_percent"] = toml_edit::value(read_percent);
    cfg["routing"] = toml_edit::Item::Table(t);
}

fn mismatches(p: &Proxy) -> serde_json::Value {
    let (code, body) = p.admin_get("/mismatches");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn count(v: &serde_json::Value, outcome: &str) -> u64 {
    v["counts"]["compared"][outcome].as_u64().unwrap()
}

/// Waits until `cond` holds for `/mismatches`; returns it.
#[track_caller]
fn wait_mismatches(
    p: &Proxy,
    secs: u64,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = mismatches(p);
        if cond(&v) {
            return v;
        }
        if Instant::now() > deadline {
            panic!("{what}: not within {secs}s: {v:#}\nproxy log:\n{}", p.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every shadow read queued so far has finished (none queued or running).
fn wait_idle(p: &Proxy) -> serde_json::Value {
    wait_mismatches(p, 30, "shadow executor idle", |v| {
        v["counts"]["queued"] == 0 && v["counts"]["inflight"] == 0
    })
}

fn mismatch_log(p: &Proxy) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p.dir.path().join("pgshift-mismatches.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn connect(p: &Proxy, db: &str, app: &str) -> tokio_postgres::Client {
    let (client, conn) = p
        .pg_config(SUPERUSER, db)
        .application_name(app)
        .connect(NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_changed_on_the_target_is_confirmed_naming_row_and_column() {
    let spool = tempfile::tempdir().unwrap();
    let sp = spool.path().to_path_buf();
    let p = Proxy::start_with(move |cfg| {
        mirror_config(cfg, &sp);
        shadow_config(cfg, 100.0);
    });
    let c = p.clusters.clone();
    let db = "shadow_changed";
    c.fresh_db(db);
    mark_sides(&c, db);
    let client = connect(&p, db, "shadow_changed").await;
    client
        .batch_execute(
            "CREATE TABLE acct (id int PRIMARY KEY, owner text, balance numeric(12,2));
             INSERT INTO acct SELECT g, 'owner' || g, g * 10 FROM generate_series(1, 50) g;",
        )
        .await
        .unwrap();
    p.wait_mirror_drained(30);
    // Equal on both sides: reads match.
    client
        .simple_query("SELECT id, owner, balance FROM acct WHERE id <= 20")
        .await
        .unwrap();
    let v = wait_mismatches(&p, 20, "a matched read", |v| count(v, "match") >= 1);
    assert_eq!(count(&v, "mismatch_confirmed"), 0, "{v:#}");

    // By hand, on the target only.
    c.sql(
        c.target_port,
        db,
        "UPDATE acct SET balance = 999.99 WHERE id = 7",
    );
    // A read that does not cover the row still matches.
    client
        .simple_query("SELECT id, owner, balance FROM acct WHERE id > 40")
        .await
        .unwrap();
    // The first shadowed read covering it.
    let served = client
        .simple_query("SELECT id, owner, balance FROM acct WHERE id BETWEEN 5 AND 10")
        .await
        .unwrap();
    assert!(
        served.iter().any(|m| matches!(m,
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get(2) == Some("70.00"))),
        "the client got the source's answer"
    );
    let v = wait_mismatches(&p, 20, "a confirmed mismatch", |v| {
        count(v, "mismatch_confirmed") >= 1
    });
    assert_eq!(count(&v, "mismatch_confirmed"), 1, "{v:#}");
    let fps = v["fingerprints"].as_array().unwrap();
    assert_eq!(fps.len(), 1, "{v:#}");
    assert_eq!(fps[0]["confirmed"], 1);
    // The admin API (no admin.show_data) shows the statement with its
    // literals replaced and no rows, parameters or values.
    assert_eq!(
        fps[0]["query"], "SELECT id, owner, balance FROM acct WHERE id BETWEEN $1 AND $2",
        "{v:#}"
    );
    let last = &fps[0]["last_confirmed"];
    assert_eq!(last["difference"]["first_column"], "balance", "{v:#}");
    for key in ["source_rows", "target_rows", "detail"] {
        assert_eq!(last["difference"][key], "<redacted>", "{v:#}");
    }
    let body = v.to_string();
    for data in ["70.00", "999.99", "owner7", "BETWEEN 5"] {
        assert!(!body.contains(data), "{data} in /mismatches: {v:#}");
    }

    let log = mismatch_log(&p);
    assert_eq!(log.len(), 1, "{log:#?}");
    let e = &log[0];
    assert_eq!(e["fingerprint"], fps[0]["fingerprint"]);
    assert_eq!(e["served"], "source");
    let d = &e["difference"];
    assert_eq!(d["first_column"], "balance", "{e:#}");
    assert_eq!(
        d["source_rows"],
        serde_json::json!([["7", "owner7", "70.00"]]),
        "{e:#}"
    );
    assert_eq!(
        d["target_rows"],
        serde_json::json!([["7", "owner7", "999.99"]]),
        "{e:#}"
    );

    // The extended protocol, with a parameter (tokio-postgres sends it,
    // and asks for the rows, in binary: shown as hex).
    let rows = client
        .query(
            "SELECT id, owner, balance FROM acct WHERE id BETWEEN $1 AND 10",
            &[&5i32],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 6);
    wait_mismatches(&p, 20, "the extended read confirmed", |v| {
        count(v, "mismatch_confirmed") >= 2
    });
    let log = mismatch_log(&p);
    assert_eq!(log.len(), 2, "{log:#?}");
    assert_eq!(log[1]["parameters"], serde_json::json!([["\\x00000005"]]));
    assert_eq!(
        log[1]["difference"]["first_column"], "balance",
        "{:#}",
        log[1]
    );
    assert!(log[1]["query"]
        .as_str()
        .unwrap()
        .contains("BETWEEN $1 AND 10"));

    // Served by the target now: the read runs again on the source.
    let (code, body) = http_request(
        p.admin_port,
        "PUT",
        "/routing",
        p.token.as_deref(),
        r#"{"read_percent": 100}"#,
    );
    assert_eq!(code, 200, "{body}");
    let client = connect(&p, db, "shadow_changed_target").await;
    let served = client
        .simple_query(&format!(
            "SELECT id, balance, {SIDE} AS port FROM acct WHERE id = 7"
        ))
        .await
        .unwrap();
    let port = served
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(2).map(str::to_string),
            _ => None,
        })
        .unwrap();
    assert_eq!(port, c.target_port.to_string(), "served by the target");
    let v = wait_mismatches(&p, 20, "a third confirmed mismatch", |v| {
        count(v, "mismatch_confirmed") >= 3
    });
    let log = mismatch_log(&p);
    assert_eq!(log.len(), 3, "{v:#}");
    assert_eq!(log[2]["served"], "target");
    // `port` differs by design; the first differing column is named.
    assert_eq!(
        log[2]["difference"]["first_column"], "balance",
        "{:#}",
        log[2]
    );

    // The metric counts per fingerprint, as the API groups them.
    let metrics = p.metrics_text();
    let fp = fps[0]["fingerprint"].as_str().unwrap();
    let grouped = v["fingerprints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["fingerprint"] == fp)
        .unwrap()["confirmed"]
        .as_u64()
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("pgshift_shadow_mismatches_total")
                && l.contains(fp)
                && l.contains("kind=\"confirmed\"")
                && l.ends_with(&format!(" {grouped}"))),
        "{metrics}"
    );
    // And `ctl mismatches` lists it.
    let out = p.ctl(&["mismatches"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(fp) && text.contains("balance"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn physical_order_and_ties_under_order_by_are_not_mismatches() {
    let p = Proxy::start_with(|cfg| shadow_config(cfg, 100.0));
    let c = p.clusters.clone();
    let db = "shadow_order";
    c.fresh_db(db);
    // Same rows, inserted in opposite orders: heap order differs.
    c.sql(
        c.source_port,
        db,
        "CREATE TABLE t (id int, grp int, note text);
         INSERT INTO t SELECT g, g % 3, 'n' || g FROM generate_series(1, 30) g ORDER BY g",
    );
    c.sql(
        c.target_port,
        db,
        "CREATE TABLE t (id int, grp int, note text);
         INSERT INTO t SELECT g, g % 3, 'n' || g FROM generate_series(1, 30) g ORDER BY g DESC",
    );
    let ordered = "SELECT grp, id, note FROM t ORDER BY grp";
    // The test means something only if the two sides really answer in
    // different orders.
    assert_ne!(
        rows(&c, c.source_port, db, "SELECT id FROM t"),
        rows(&c, c.target_port, db, "SELECT id FROM t")
    );
    assert_ne!(
        rows(&c, c.source_port, db, ordered),
        rows(&c, c.target_port, db, ordered),
        "ties under ORDER BY grp break differently"
    );
    let client = connect(&p, db, "shadow_order").await;
    let mut prepared = Vec::new();
    for sql in [
        "SELECT * FROM t",
        ordered,
        "SELECT grp, count(*) FROM t GROUP BY grp",
        "SELECT id, note FROM t ORDER BY 1 DESC",
    ] {
        client.simple_query(sql).await.unwrap();
        // Extended protocol too, with a statement kept prepared: a
        // statement dropped right after use has its Close still in flight
        // when the next request starts, and only requests that start with
        // nothing in flight are eligible reads.
        let st = client.prepare(sql).await.unwrap();
        client.query(&st, &[]).await.unwrap();
        prepared.push(st);
    }
    wait_mismatches(&p, 20, "eight matched reads", |v| count(v, "match") >= 8);
    let v = wait_idle(&p);
    assert_eq!(count(&v, "match"), 8, "{v:#}");
    assert_eq!(count(&v, "mismatch_transient"), 0, "{v:#}");
    assert_eq!(count(&v, "mismatch_confirmed"), 0, "{v:#}");

    // Under ORDER BY, a changed value is still caught.
    c.sql(
        c.target_port,
        db,
        "UPDATE t SET note = 'changed' WHERE id = 4",
    );
    client
        .simple_query("SELECT id, note FROM t ORDER BY 1 DESC")
        .await
        .unwrap();
    let v = wait_mismatches(&p, 20, "the changed row confirmed", |v| {
        count(v, "mismatch_confirmed") == 1
    });
    assert_eq!(count(&v, "match"), 8, "{v:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_deterministic_statements_are_learned_as_noise() {
    // The statements are compared as written: the API shows them as they are.
    let p = Proxy::start_showing_data(|cfg| shadow_config(cfg, 100.0));
    let c = p.clusters.clone();
    let db = "shadow_noise";
    c.fresh_db(db);
    c.sql(
        c.source_port,
        db,
        "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 100) g ORDER BY g",
    );
    c.sql(
        c.target_port,
        db,
        "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 100) g ORDER BY g DESC",
    );
    let client = connect(&p, db, "shadow_noise").await;
    let queries = [
        "SELECT now()",
        "SELECT random()",
        "SELECT id FROM t LIMIT 3",
    ];
    for _ in 0..5 {
        for q in queries {
            client.simple_query(q).await.unwrap();
        }
        // Let each round's re-checks finish: learning happens there.
        wait_idle(&p);
    }
    let v = mismatches(&p);
    assert_eq!(count(&v, "mismatch_confirmed"), 0, "{v:#}");
    let noise = v["noise"].as_array().unwrap();
    assert_eq!(noise.len(), 3, "{v:#}");
    for q in queries {
        let n = noise
            .iter()
            .find(|n| n["query"] == q)
            .unwrap_or_else(|| panic!("{q} not learned: {v:#}"));
        assert!(!n["reason"].as_str().unwrap().is_empty());
        // Excluded from then on.
        assert!(n["skipped"].as_u64().unwrap() >= 1, "{v:#}");
    }
    assert!(
        count(&v, "noise") >= 2,
        "now() and random() learned by re-running: {v:#}"
    );
    let metrics = p.metrics_text();
    assert!(
        metrics.contains("pgshift_shadow_noise_fingerprints 3"),
        "{metrics}"
    );
}

#[test]
fn pgbench_tpcb_and_select_only_fully_shadowed_confirm_nothing() {
    let spool = tempfile::tempdir().unwrap();
    let sp = spool.path().to_path_buf();
    let p = Proxy::start_with(move |cfg| {
        mirror_config(cfg, &sp);
        shadow_config(cfg, 100.0);
        routing_config(cfg, 50.0);
    });
    let c = p.clusters.clone();
    let db = "shadow_pgbench";
    pgbench_db_on_both(&c, db);
    let spawn = |args: &[&str]| {
        pgbench_cmd(&p, SUPERUSER, db, args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Writes, and reads in two protocol modes, all at once.
    let runs = [
        spawn(&["-c", "4", "-T", "30", "-M", "extended"]),
        spawn(&["-S", "-c", "2", "-T", "30", "-M", "simple"]),
        spawn(&["-S", "-c", "2", "-T", "30", "-M", "prepared"]),
    ];
    let outs: Vec<_> = runs
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for out in &outs {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("number of failed transactions: 0 "), "{text}");
    }
    p.wait_mirror_drained(60);
    let v = wait_idle(&p);
    assert_eq!(count(&v, "mismatch_confirmed"), 0, "{v:#}\n{}", p.log());
    assert!(count(&v, "match") > 1000, "shadow reads really ran: {v:#}");
    assert_pgbench_tables_same(&c, db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_percent_changes_live_and_a_bad_value_is_rejected() {
    let p = Proxy::start_with(|cfg| shadow_config(cfg, 0.0));
    let c = p.clusters.clone();
    let db = "shadow_live";
    c.fresh_db(db);
    c.sql(c.source_port, db, "CREATE TABLE t AS SELECT 1 AS id");
    c.sql(c.target_port, db, "CREATE TABLE t AS SELECT 1 AS id");
    let client = connect(&p, db, "shadow_live").await;
    client.simple_query("SELECT id FROM t").await.unwrap();
    let v = wait_idle(&p);
    assert_eq!(count(&v, "match"), 0, "nothing sampled at 0%: {v:#}");

    let cfg_path = p.dir.path().join("proxy.toml");
    let base = std::fs::read_to_string(&cfg_path).unwrap();
    let with = |pct: &str| base.replace("sample_percent = 0.0", &format!("sample_percent = {pct}"));
    assert_ne!(with("100"), base, "the test edits the key");
    std::fs::write(&cfg_path, with("100")).unwrap();
    p.wait_for(60, "the reload", |p| {
        p.status()["shadow"]["settings"]["sample_percent"] == 100.0
    });
    let audit = p.audit_entries();
    let reload = audit
        .iter()
        .rev()
        .find(|e| e["kind"] == "config_reload")
        .unwrap();
    assert_eq!(reload["changes"][0]["key"], "shadow", "{reload:#}");
    assert_eq!(reload["changes"][0]["new"]["sample_percent"], 100.0);
    client.simple_query("SELECT id FROM t").await.unwrap();
    wait_mismatches(&p, 20, "a matched read", |v| count(v, "match") == 1);

    // Out of range: rejected with its key and line; 100% stays.
    std::fs::write(&cfg_path, with("250")).unwrap();
    p.wait_for(60, "the rejection", |p| {
        p.stat("/config/reloads_rejected") == 1
    });
    let st = p.status();
    assert_eq!(
        st["config"]["last_rejection"]["key"],
        "shadow.sample_percent"
    );
    let line = with("250")
        .lines()
        .position(|l| l.starts_with("sample_percent"))
        .unwrap()
        + 1;
    assert_eq!(st["config"]["last_rejection"]["line"], line as u64);
    assert_eq!(st["shadow"]["settings"]["sample_percent"], 100.0);
    client.simple_query("SELECT id FROM t").await.unwrap();
    wait_mismatches(&p, 20, "still sampled", |v| count(v, "match") == 2);
}
