//! Read routing on real clusters: hashed cohorts, read-your-writes,
//! prepared statements on both sides, live changes (file, SIGHUP, API)
//! under load, failback and resume, and the admin API's guard.
//!
//! Which backend answered is read from the answer itself: `SIDE` reads a
//! table holding each cluster's own port (`inet_server_port()` is
//! server-local, so the proxy keeps it on the source).
mod common;
use common::mirror::*;
use common::*;

use std::time::Duration;

use tokio_postgres::NoTls;

fn http(p: &Proxy, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    http_request(p.admin_port, method, path, token, body)
}

/// Eligible reads the given backend served, from a `/status` answer.
fn reads(status: &serde_json::Value, backend: &str) -> u64 {
    status["metrics"]["routing"][backend]["reads"]
        .as_u64()
        .unwrap()
}

fn api(p: &Proxy, method: &str, path: &str, body: &str) -> serde_json::Value {
    let (code, text) = http(p, method, path, p.token.as_deref(), body);
    assert_eq!(code, 200, "{method} {path} {body}: {text}");
    serde_json::from_str(&text).unwrap()
}

fn routing_config(cfg: &mut toml_edit::DocumentMut, read_percent: f64, hash_key: &str) {
    let mut t = toml_edit::Table::new();
    t["read_percent"] = toml_edit::value(read_percent);
    t["hash_key"] = toml_edit::value(hash_key);
    cfg["routing"] = toml_edit::Item::Table(t);
}

/// A proxy with the mirror on (spooling into the returned directory) that
/// routes `read_percent` of eligible reads, one decision per session.
fn mirrored_routing_proxy(read_percent: f64) -> (Proxy, tempfile::TempDir) {
    let spool = tempfile::tempdir().unwrap();
    let sp = spool.path().to_path_buf();
    let p = Proxy::start_with(move |cfg| {
        mirror_config(cfg, &sp);
        routing_config(cfg, read_percent, "session");
    });
    (p, spool)
}

/// The documented routing hash, computed here independently:
/// fmix64(fnv1a64(key)) mod 1 000 000 < read_percent × 10 000.
fn on_target(key: &str, read_percent: f64) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h % 1_000_000 < (read_percent * 10_000.0).round() as u64
}

/// Column `col` of every row a simple query returns.
async fn column(client: &tokio_postgres::Client, sql: &str, col: usize) -> Vec<String> {
    client
        .simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(col).map(str::to_string),
            _ => None,
        })
        .collect()
}

/// The first column of the first row a simple query returns.
async fn first_value(client: &tokio_postgres::Client, sql: &str) -> String {
    column(client, sql, 0).await.swap_remove(0)
}

/// Which port answered one session's read (a fresh connection each time).
async fn answered_by(cfg: &tokio_postgres::Config) -> i32 {
    let (client, conn) = cfg.connect(NoTls).await.expect("connect");
    let conn = tokio::spawn(conn);
    let row = client
        .query_one(&format!("SELECT {SIDE}"), &[])
        .await
        .expect("read");
    drop(client);
    let _ = conn.await;
    row.get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cohorts_are_stable_hashed_shares_and_raising_the_percentage_keeps_them() {
    let p = Proxy::start_with(|cfg| {
        routing_config(cfg, 10.0, "session");
        // 5,000 short sessions: each one's first routed read waits for its
        // target login, which the health monitor rightly sees as a slow
        // target (p95 in the hundreds of ms) and fails back. This test is
        // about the hash alone.
        cfg["failback"]["enabled"] = toml_edit::value(false);
    });
    let c = p.clusters.clone();
    let target_port = c.target_port as i32;
    let db = "route_cohorts";
    c.fresh_db(db);
    mark_sides(&c, db);

    // 5,000 sessions, one decision each: 8-12% answered by the target.
    let cfg = p.pg_config(SUPERUSER, db);
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = Vec::new();
    for _ in 0..5000 {
        let cfg = cfg.clone();
        let permit = std::sync::Arc::clone(&sem).acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let port = answered_by(&cfg).await;
            drop(permit);
            port
        }));
    }
    let mut on_target_count = 0;
    for t in tasks {
        if t.await.unwrap() == target_port {
            on_target_count += 1;
        }
    }
    assert!(
        (400..=600).contains(&on_target_count),
        "{on_target_count} of 5000 sessions read from the target at 10%"
    );
    // A routed read is counted right after its answer is written to the
    // client, which may read it, close and be counted here first (the send
    // wakes the client, which can preempt the proxy's thread in between):
    // wait for the counters to settle, then compare exactly.
    let counted = |p: &Proxy| {
        let status = p.status();
        (
            status["metrics"]["routing"]["target"]["reads"].clone(),
            status["metrics"]["routing"]["source"]["reads"].clone(),
        )
    };
    let want = (
        serde_json::json!(on_target_count),
        serde_json::json!(5000 - on_target_count),
    );
    tokio::task::block_in_place(|| {
        p.wait_for(60, "the read counters to reach the clients' count", |p| {
            counted(p) == want
        })
    });
    assert_eq!(counted(&p), want);

    // User keys: every session of a user lands on the same side, the side
    // the documented hash says.
    let users: Vec<String> = (0..40).map(|i| format!("route_user_{i}")).collect();
    for port in [c.source_port, c.target_port] {
        let mut sql = String::new();
        for u in &users {
            sql += &format!("DROP ROLE IF EXISTS {u}; CREATE ROLE {u} LOGIN;");
        }
        c.sql(port, "postgres", &sql);
    }
    let v = api(
        &p,
        "PUT",
        "/routing",
        r#"{"hash_key": "user", "read_percent": 10}"#,
    );
    assert_eq!(v["routing"]["hash_key"], "user");
    let sides = |pct: f64| {
        let p = &p;
        let users = users.clone();
        async move {
            let mut out = Vec::new();
            for u in &users {
                let mut seen = Vec::new();
                for _ in 0..3 {
                    seen.push(answered_by(&p.pg_config(u, db)).await == target_port);
                }
                assert!(
                    seen.iter().all(|s| *s == seen[0]),
                    "{u} answered from both sides: {seen:?}"
                );
                assert_eq!(seen[0], on_target(u, pct), "{u} at {pct}%");
                out.push(seen[0]);
            }
            out
        }
    };
    let at10 = sides(10.0).await;
    api(&p, "PUT", "/routing", r#"{"read_percent": 20}"#);
    let at20 = sides(20.0).await;
    for (i, u) in users.iter().enumerate() {
        assert!(
            !at10[i] || at20[i],
            "{u} left the target going from 10 to 20%"
        );
    }
    assert!(
        at20.iter().filter(|x| **x).count() >= at10.iter().filter(|x| **x).count(),
        "{at10:?} {at20:?}"
    );
    for port in [c.source_port, c.target_port] {
        let sql: String = users
            .iter()
            .map(|u| format!("DROP ROLE IF EXISTS {u};"))
            .collect();
        c.sql(port, "postgres", &sql);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reads_its_own_insert_at_100_percent_under_write_load() {
    let (p, _spool) = mirrored_routing_proxy(100.0);
    let c = p.clusters.clone();
    let db = "route_ryw";
    c.fresh_db(db);
    mark_sides(&c, db);
    pgbench_ok(&p, db, &["-i", "-s", "1", "-q"]);
    psql_ok(
        &p.url(SUPERUSER, db),
        &["-c", "CREATE TABLE mine(id int PRIMARY KEY, note text)"],
        None,
    );
    p.wait_mirror_drained(60);

    let load = pgbench_spawn(&p, db, &["-c", "4", "-j", "2", "-T", "15", "-n"]);
    let (client, conn) = p.pg_config(SUPERUSER, db).connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    let insert = client
        .prepare("INSERT INTO mine VALUES ($1, 'written')")
        .await
        .unwrap();
    let select = client
        .prepare(&format!("SELECT note, {SIDE} FROM mine WHERE id = $1"))
        .await
        .unwrap();
    for i in 0..300i32 {
        client.execute(&insert, &[&i]).await.unwrap();
        let rows = client.query(&select, &[&i]).await.unwrap();
        assert_eq!(rows.len(), 1, "row {i} not found right after its insert");
        // The simple protocol too.
        let simple = client
            .simple_query(&format!("SELECT note FROM mine WHERE id = {i}"))
            .await
            .unwrap();
        assert!(
            simple
                .iter()
                .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))),
            "row {i} not found by a simple query right after its insert"
        );
    }
    let out = load.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    // Once the mirror has applied the session's writes, its reads go to
    // the target again, and find everything there.
    p.wait_mirror_drained(60);
    let rows = client
        .query(&format!("SELECT count(*), {SIDE} FROM mine"), &[])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 300);
    assert_eq!(rows[0].get::<_, i32>(1), c.target_port as i32);
    let st = p.status();
    assert!(reads(&st, "source") > 0, "{st:#}");
    assert!(reads(&st, "target") > 0, "{st:#}");
    assert_eq!(st["mirror"]["report"]["divergences_total"], 0, "{st:#}");
}

/// Read-your-writes with a target that is provably stale: a lock held on
/// the target (EXCLUSIVE: reads pass, writes wait) keeps the mirror from
/// applying the session's insert, so only the source has the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reads_its_own_write_from_the_source_while_the_target_is_stale() {
    let (p, _spool) = mirrored_routing_proxy(100.0);
    let c = p.clusters.clone();
    let db = "route_ryw_stale";
    c.fresh_db(db);
    mark_sides(&c, db);
    psql_ok(
        &p.url(SUPERUSER, db),
        &["-c", "CREATE TABLE w(id int PRIMARY KEY)"],
        None,
    );
    p.wait_mirror_drained(60);
    let mut direct = tokio_postgres::Config::new();
    direct
        .host(&c.host)
        .port(c.target_port)
        .user(SUPERUSER)
        .dbname(db);
    let (locker, conn) = direct.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    locker
        .batch_execute("BEGIN; LOCK TABLE w IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let count = format!("SELECT count(*), {SIDE} FROM w");
    let (writer, conn) = p.pg_config(SUPERUSER, db).connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    writer
        .execute("INSERT INTO w VALUES (1)", &[])
        .await
        .unwrap();
    // Another session, with no writes of its own, reads the stale target.
    let (other, conn) = p.pg_config(SUPERUSER, db).connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    // (Its first reads may run on the source while its target link logs in.)
    let mut served = None;
    for _ in 0..200 {
        let row = other.query_one(&count, &[]).await.unwrap();
        if row.get::<_, i32>(1) == c.target_port as i32 {
            served = Some(row.get::<_, i64>(0));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        served,
        Some(0),
        "the stale target should serve the other session"
    );
    // The writer's own read goes to the source, and finds its row.
    for _ in 0..3 {
        let row = writer.query_one(&count, &[]).await.unwrap();
        assert_eq!(
            (row.get::<_, i64>(0), row.get::<_, i32>(1)),
            (1, c.source_port as i32),
            "read-your-writes"
        );
        let side = first_value(&writer, &format!("SELECT {SIDE} FROM w WHERE id = 1")).await;
        assert_eq!(side, c.source_port.to_string());
    }
    // Once the mirror has applied it, the writer's reads go to the target.
    locker.batch_execute("COMMIT").await.unwrap();
    tokio::task::block_in_place(|| p.wait_mirror_drained(60));
    let row = writer.query_one(&count, &[]).await.unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i32>(1)),
        (1, c.target_port as i32)
    );
}

#[test]
fn prepared_statements_work_on_both_sides_in_every_protocol_mode() {
    let (p, _spool) = mirrored_routing_proxy(50.0);
    let c = p.clusters.clone();
    let db = "route_prepared";
    c.fresh_db(db);
    pgbench_ok(&p, db, &["-i", "-s", "1", "-q"]);
    p.wait_mirror_drained(60);

    // Select-only at 50%: sessions on both sides, prepared statements
    // prepared lazily on the target.
    for mode in ["simple", "extended", "prepared"] {
        pgbench_ok(
            &p,
            db,
            &["-S", "-M", mode, "-c", "8", "-j", "2", "-T", "5", "-n"],
        );
    }
    let st = p.status();
    let r = &st["metrics"]["routing"];
    assert!(r["target"]["reads"].as_u64().unwrap() > 1000, "{r:#}");
    assert!(r["source"]["reads"].as_u64().unwrap() > 1000, "{r:#}");

    // Reads and writes mixed in one session at 100%: each write sends the
    // session's next reads to the source until the mirror applied it, so
    // the same prepared statements run on both sides, alternating.
    api(&p, "PUT", "/routing", r#"{"read_percent": 100}"#);
    let script = p.dir.path().join("mixed.sql");
    std::fs::write(
        &script,
        "\\set aid random(1, 100000)\n\
         \\set delta random(-5000, 5000)\n\
         SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n\
         SELECT abalance FROM pgbench_accounts WHERE aid = :aid + 1;\n\
         UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;\n\
         SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n",
    )
    .unwrap();
    let before = p.status()["metrics"]["routing"].clone();
    let f = format!("-f{}", script.display());
    for mode in ["simple", "extended", "prepared"] {
        pgbench_ok(
            &p,
            db,
            &[&f, "-M", mode, "-c", "4", "-j", "2", "-T", "5", "-n"],
        );
    }
    let after = p.status()["metrics"]["routing"].clone();
    let grew = |side: &str| {
        after[side]["reads"].as_u64().unwrap() > before[side]["reads"].as_u64().unwrap()
    };
    assert!(grew("target") && grew("source"), "{before:#} {after:#}");
    assert_eq!(after["fallbacks"]["setup"], 0, "{after:#}");
    p.wait_mirror_drained(60);
    assert_pgbench_tables_same(&c, db);
}

fn audit(p: &Proxy) -> Vec<serde_json::Value> {
    p.audit_entries()
}

#[test]
fn ten_live_changes_by_file_signal_and_api_under_load_are_audited() {
    let secret = tempfile::tempdir().unwrap();
    let token_file = secret.path().join("admin.token");
    write_secret(&token_file, "route-token\n");
    let tf = token_file.display().to_string();
    let p = Proxy::start_with(move |cfg| {
        routing_config(cfg, 0.0, "session");
        cfg["admin"]["token_file"] = toml_edit::value(tf);
    });
    let c = p.clusters.clone();
    let db = "route_live";
    // The same data on both sides (no mirror here: read-only load).
    pgbench_db_on_both(&c, db);
    let load = pgbench_spawn(
        &p,
        db,
        &[
            "-S", "-M", "prepared", "-c", "8", "-j", "2", "-T", "30", "-n",
        ],
    );
    let cfg_path = p.dir.path().join("proxy.toml");
    let base = std::fs::read_to_string(&cfg_path).unwrap();
    let with = |pct: &str| base.replace("read_percent = 0.0", &format!("read_percent = {pct}"));
    let epoch = |p: &Proxy| p.stat("/config/epoch");
    let expect = std::cell::Cell::new(1);
    let wait_epoch = |p: &Proxy| {
        expect.set(expect.get() + 1);
        let e = expect.get();
        p.wait_for(60, &format!("epoch {e}"), |p| epoch(p) == e);
    };
    std::thread::sleep(Duration::from_secs(2));
    // 1-3: file edits (the file is watched).
    for pct in ["10", "50", "100"] {
        std::fs::write(&cfg_path, with(pct)).unwrap();
        wait_epoch(&p);
        std::thread::sleep(Duration::from_millis(1500));
    }
    // An invalid file: rejected, the running routing stays.
    std::fs::write(&cfg_path, with("250")).unwrap();
    p.wait_for(60, "the rejection", |p| {
        p.stat("/config/reloads_rejected") == 1
    });
    let st = p.status();
    assert_eq!(st["routing"]["read_percent"], 100.0);
    assert_eq!(
        st["config"]["last_rejection"]["key"],
        "routing.read_percent"
    );
    assert!(
        st["config"]["last_rejection"]["line"].as_u64().is_some(),
        "{st:#}"
    );
    assert_eq!(epoch(&p), expect.get());
    // 4-6: edits signalled at once with SIGHUP.
    for pct in ["25", "75", "5"] {
        std::fs::write(&cfg_path, with(pct)).unwrap();
        p.signal("HUP");
        wait_epoch(&p);
        std::thread::sleep(Duration::from_millis(1500));
    }
    // 7-10: the API (PUT /routing, failback, resume, PUT /routing).
    api(&p, "PUT", "/routing", r#"{"read_percent": 60}"#);
    wait_epoch(&p);
    std::thread::sleep(Duration::from_millis(1500));
    let v = api(
        &p,
        "POST",
        "/failback",
        r#"{"reason": "test: all reads home"}"#,
    );
    assert_eq!(v["routing"]["failed_back"], true);
    wait_epoch(&p);
    std::thread::sleep(Duration::from_millis(1500));
    api(&p, "POST", "/resume", "");
    wait_epoch(&p);
    std::thread::sleep(Duration::from_millis(1000));
    api(
        &p,
        "PUT",
        "/routing",
        r#"{"read_percent": 100, "hash_key": "client_addr"}"#,
    );
    wait_epoch(&p);

    let out = load.wait_with_output().unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains("number of failed transactions: 0 "),
        "{report}"
    );

    let entries = audit(&p);
    let changes: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| {
            matches!(
                e["kind"].as_str(),
                Some("config_reload" | "routing_change" | "failback" | "resume")
            )
        })
        .collect();
    assert_eq!(changes.len(), 10, "{entries:#?}");
    for (i, e) in changes.iter().enumerate() {
        assert_eq!(e["epoch"], i as u64 + 2, "{e}");
    }
    let who: Vec<&str> = changes.iter().map(|e| e["who"].as_str().unwrap()).collect();
    assert_eq!(&who[..3], ["file"; 3], "{who:?}");
    assert!(
        who[3..6].iter().all(|w| *w == "signal" || *w == "file"),
        "{who:?}"
    );
    assert!(who[3..6].contains(&"signal"), "{who:?}");
    assert_eq!(&who[6..], ["api"; 4], "{who:?}");
    assert_eq!(changes[0]["changes"][0]["old"]["read_percent"], 0.0);
    assert_eq!(changes[0]["changes"][0]["new"]["read_percent"], 10.0);
    assert_eq!(changes[7]["reason"], "test: all reads home");
    assert!(
        changes[7]["metrics"]["routing"]["target"]["reads"].is_u64(),
        "{}",
        changes[7]
    );
    assert!(entries
        .iter()
        .any(|e| e["kind"] == "config_rejected" && e["key"] == "routing.read_percent"));
    let st = p.status();
    assert!(reads(&st, "target") > 0, "{st:#}");
    assert!(reads(&st, "source") > 0, "{st:#}");

    // The API's guard: no or a wrong token is refused, changes included.
    for (m, path) in [
        ("GET", "/status"),
        ("PUT", "/routing"),
        ("POST", "/failback"),
        ("POST", "/resume"),
        ("GET", "/metrics"),
    ] {
        assert_eq!(http(&p, m, path, None, "{}").0, 401, "{m} {path}");
        assert_eq!(http(&p, m, path, Some("nope"), "{}").0, 401, "{m} {path}");
    }
    // Bad changes are refused, with the key where there is one.
    for (bad, key) in [
        (r#"{"read_percent": -1}"#, "routing.read_percent"),
        (r#"{"percent": 5}"#, "percent"),
    ] {
        let (code, body) = http(&p, "PUT", "/routing", p.token.as_deref(), bad);
        assert_eq!(code, 400, "{body}");
        assert!(body.contains(key), "{bad}: {body}");
    }

    // /metrics is Prometheus text a real parser reads, with the per-route
    // series.
    let (code, text) = http(&p, "GET", "/metrics", p.token.as_deref(), "");
    assert_eq!(code, 200);
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    let value = |name: &str, label: (&str, &str)| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get(label.0) == Some(label.1))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => -1.0,
            })
    };
    assert!(value("pgshift_route_reads_total", ("backend", "target")).unwrap() > 0.0);
    assert!(value("pgshift_route_reads_total", ("backend", "source")).unwrap() > 0.0);
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "pgshift_route_latency_seconds"),
        "{text}"
    );
    assert!(scrape
        .samples
        .iter()
        .any(|s| s.metric == "pgshift_config_epoch"));

    // The CLI says the same.
    let ctl = |args: &[&str]| p.ctl(args);
    // The file catches up with the API (100): a change to the file that
    // changes nothing live. Waited for, so that the watcher's reload of it
    // cannot land after the CLI's change below and win.
    let unchanged = p.stat("/config/reloads_unchanged");
    std::fs::write(&cfg_path, with("100")).unwrap();
    p.wait_for(30, "the file's reload", |p| {
        p.stat("/config/reloads_unchanged") == unchanged + 1
    });
    assert_eq!(p.status()["routing"]["read_percent"], 100.0);
    let out = ctl(&["route", "--read-percent", "7.5"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("7.5"), "{text}");
    assert_eq!(p.status()["routing"]["read_percent"], 7.5);
    let out = ctl(&["failback", "--reason", "ctl test"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(p.status()["routing"]["failed_back"], true);
    let out = ctl(&["--json", "resume"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["routing"]["failed_back"], false);
    let last = audit(&p);
    let last = last.last().unwrap();
    assert_eq!(last["kind"], "resume");
    assert_eq!(last["who"], "api");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_the_routed_query_on_the_target() {
    let p = Proxy::start_with(|cfg| {
        routing_config(cfg, 100.0, "session");
        cfg["routing"]["target_timeout_ms"] = toml_edit::value(60_000);
    });
    let target_port = p.clusters.target_port as i32;
    let db = "route_cancel";
    p.clusters.fresh_db(db);
    mark_sides(&p.clusters, db);
    let (client, conn) = p.pg_config(SUPERUSER, db).connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one(&format!("SELECT {SIDE}"), &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), target_port, "not routed");
    let token = client.cancel_token();
    let started = std::time::Instant::now();
    let clusters = p.clusters.clone();
    let canceller = tokio::spawn(async move {
        // Once the sleep runs on the target (where it was routed).
        let port = clusters.target_port;
        tokio::task::spawn_blocking(move || clusters.wait_running(port, "pg_sleep(30)"))
            .await
            .unwrap();
        token.cancel_query(NoTls).await
    });
    let err = client
        .simple_query(&format!("SELECT pg_sleep(30), {SIDE}"))
        .await
        .expect_err("the sleep should have been cancelled");
    canceller.await.unwrap().unwrap();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // The session goes on, still routed.
    let row = query_one_after_cancel(&client, &format!("SELECT {SIDE}"), &[]).await;
    assert_eq!(row.get::<_, i32>(0), target_port);
    // A cancel lands on the query it was sent for, never on the next one.
    // Postgres 15 signals a backend twice per cancel (its pid, then its
    // process group), so the second signal can land on the next statement
    // unless the client waits for the cancel connection to close, as
    // libpq's PQcancel does (tokio-postgres does not, direct or not). The
    // proxy must close the client's only once the target has closed its
    // own: psycopg's cancel, eight rounds.
    let script = format!(
        r#"
import sys, threading, time, psycopg
c = psycopg.connect(sys.argv[1], autocommit=True)
watch = psycopg.connect(sys.argv[2], autocommit=True)
def cancel_when_running():
    deadline = time.time() + 60
    while not watch.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
        "AND pid <> pg_backend_pid() AND position('pg_sleep(30)' in query) > 0"
    ).fetchone()[0]:
        assert time.time() < deadline, "the sleep never ran on the target"
        time.sleep(0.02)
    c.cancel()
for round in range(8):
    t = threading.Thread(target=cancel_when_running)
    t.start()
    try:
        c.execute("SELECT pg_sleep(30), {SIDE}")
        raise SystemExit(f"round {{round}}: the sleep was not cancelled")
    except psycopg.errors.QueryCanceled:
        pass
    t.join()
    row = c.execute("SELECT pg_sleep(0.2), {SIDE}").fetchone()
    assert row[1] == {target_port}, (round, row)
print("cancel rounds: OK")
"#
    );
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            &script,
            &format!("{} connect_timeout=20", p.url(SUPERUSER, db)),
            &format!(
                "{} connect_timeout=20",
                p.clusters.target_url(SUPERUSER, db)
            ),
        ])
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("cancel rounds: OK"),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_eq!(p.stat("/metrics/cancel/forwarded"), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_types_the_clusters_number_differently_run_on_the_source() {
    let p = Proxy::start_with(|cfg| routing_config(cfg, 100.0, "session"));
    let (source_port, target_port) = (p.clusters.source_port as i32, p.clusters.target_port as i32);
    let db = "route_types";
    p.clusters.fresh_db(db);
    mark_sides(&p.clusters, db);
    // The same enum on both, numbered differently (the target made a type
    // first), as types created through the mirror are.
    let c = p.clusters.clone();
    c.sql(c.target_port, db, "CREATE TYPE spacer AS (x int)");
    for port in [c.source_port, c.target_port] {
        c.sql(
            port,
            db,
            "CREATE TYPE mood AS ENUM ('calm', 'sunny'); \
             CREATE TABLE feelings(id int, m mood); \
             INSERT INTO feelings VALUES (1, 'sunny')",
        );
    }
    let oid = |port| c.sql(port, db, "SELECT 'mood'::regtype::oid");
    assert_ne!(
        oid(c.source_port),
        oid(c.target_port),
        "the OIDs should differ"
    );
    let (client, conn) = p.pg_config(SUPERUSER, db).connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    // Built-in types only: routed.
    let row = client
        .query_one(&format!("SELECT id, {SIDE} FROM feelings"), &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(1), target_port, "not routed");
    // A prepared statement whose column is the enum: the client learned
    // its OID from the source (Describe); the rows come from the source.
    let st = client
        .prepare(&format!("SELECT m, {SIDE} FROM feelings"))
        .await
        .unwrap();
    assert_eq!(st.columns()[0].type_().name(), "mood");
    for _ in 0..3 {
        let row = client.query_one(&st, &[]).await.unwrap();
        assert_eq!(
            row.get::<_, i32>(1),
            source_port,
            "answered with the target's types"
        );
    }
    // The simple protocol: the RowDescription names the enum.
    let side = first_value(&client, &format!("SELECT {SIDE}, m FROM feelings")).await;
    assert_eq!(side, source_port.to_string());
    // Still routed when the types are built in.
    let side = first_value(&client, &format!("SELECT {SIDE}, m::text FROM feelings")).await;
    assert_eq!(side, target_port.to_string());
    tokio::task::block_in_place(|| {
        assert!(p.stat("/metrics/routing/fallbacks/types") >= 2);
        // Not the target's fault: nothing counted against its health.
        assert_eq!(p.stat("/metrics/routing/target_failures_after_start"), 0);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_transaction_runs_whole_on_the_target_and_its_errors_are_the_clients() {
    let p = Proxy::start_with(|cfg| routing_config(cfg, 100.0, "session"));
    let (target, source) = (
        p.clusters.target_port.to_string(),
        p.clusters.source_port.to_string(),
    );
    let db = "route_read_only";
    p.clusters.fresh_db(db);
    mark_sides(&p.clusters, db);
    let (client, conn) = p.pg_config(SUPERUSER, db).connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    assert_eq!(
        first_value(&client, &format!("SELECT {SIDE}")).await,
        target
    );
    client.simple_query("BEGIN READ ONLY").await.unwrap();
    assert_eq!(
        first_value(&client, &format!("SELECT {SIDE}")).await,
        target
    );
    // A write inside it fails as Postgres says, and the session lives on.
    let err = client
        .simple_query("CREATE TABLE route_ro_should_fail(a int)")
        .await
        .expect_err("a write in a read-only transaction");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
        "{err:?}"
    );
    let err = client
        .simple_query("SELECT 1")
        .await
        .expect_err("aborted transaction");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION),
        "{err:?}"
    );
    client.simple_query("ROLLBACK").await.unwrap();
    // A read-write transaction stays on the source, reads included.
    client.simple_query("BEGIN").await.unwrap();
    assert_eq!(
        first_value(&client, &format!("SELECT {SIDE}")).await,
        source
    );
    client.simple_query("COMMIT").await.unwrap();
    assert_eq!(
        first_value(&client, &format!("SELECT {SIDE}")).await,
        target
    );
    // SHOW answers from the source session's settings.
    let ro = first_value(&client, "SHOW default_transaction_read_only").await;
    assert_eq!(ro, "off");
}

/// psycopg 3 at read_percent 100 with the mirror on, autocommit: its
/// server-side prepared statements (named `_pg3_*`, prepared after a few
/// executions), binary parameters, unnamed statements and pipeline mode,
/// with each read checked against what the session wrote.
#[test]
fn psycopg_reads_at_100_percent_see_their_writes_on_either_side() {
    let (p, _spool) = mirrored_routing_proxy(100.0);
    let c = p.clusters.clone();
    let db = "pgshift_t_route_psycopg";
    c.fresh_db(db);
    mark_sides(&c, db);
    let script = r#"
import sys, time, psycopg
c = psycopg.connect(sys.argv[1], autocommit=True)
c.execute("CREATE TABLE kv(k int PRIMARY KEY, v text, b bytea)")
ports = set()
for i in range(300):
    c.execute("INSERT INTO kv VALUES (%s, %s, %s)", (i, f"v{i}", bytes([i % 256]) * 3))
    # prepare=None: psycopg prepares it server-side after 5 executions.
    row = c.execute("SELECT v, b, (SELECT port FROM pgshift_side) FROM kv WHERE k = %s", (i,)).fetchone()
    assert row[0] == f"v{i}" and row[1] == bytes([i % 256]) * 3, row
    ports.add(row[2])
    if i % 50 == 0:
        time.sleep(0.3)  # let the mirror catch up: later reads may go to the target
        row = c.execute("SELECT count(*), (SELECT port FROM pgshift_side) FROM kv", prepare=True).fetchone()
        assert row[0] == i + 1, row
        ports.add(row[1])
with c.pipeline():
    curs = [c.execute("SELECT v FROM kv WHERE k = %s", (k,)) for k in range(0, 300, 7)]
values = [cur.fetchone()[0] for cur in curs]
assert values == [f"v{k}" for k in range(0, 300, 7)], values
time.sleep(1.0)
for i in range(20):
    row = c.execute("SELECT sum(k), (SELECT port FROM pgshift_side) FROM kv", binary=True).fetchone()
    assert row[0] == sum(range(300)), row
    ports.add(row[1])
print("ports", sorted(ports))
print("psycopg routing: OK")
"#;
    let conninfo = format!(
        "{} password=scram-secret connect_timeout=20",
        p.url("pgshift_scram", db)
    );
    let out = std::process::Command::new("python3")
        .args(["-c", script, &conninfo])
        .env_remove("PGPASSWORD")
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(
        stdout.lines().last(),
        Some("psycopg routing: OK"),
        "{stdout}\n{stderr}"
    );
    // Both sides answered: reads right after a write on the source, the
    // others on the target once the mirror had applied the session's writes.
    let both = format!("ports [{}, {}]", c.source_port, c.target_port);
    assert!(stdout.contains(&both), "{stdout}");
    let st = p.status();
    let r = &st["metrics"]["routing"];
    assert!(r["target"]["reads"].as_u64().unwrap() > 0, "{r:#}");
    assert!(r["source"]["reads"].as_u64().unwrap() > 0, "{r:#}");
    assert_eq!(r["fallbacks"]["setup"], 0, "{r:#}");
    p.wait_mirror_drained(60);
    assert_same(&c, db, "select * from kv order by k");
}

/// A routed read the target answers in a way the client cannot get (its
/// rows name a type the clusters number differently) runs on the source;
/// when the target has not finished that answer within target_timeout_ms,
/// its connection is dropped rather than used again, so what the target
/// still sends never reaches the session's next read as its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_left_unfinished_on_the_target_never_reaches_the_next_read() {
    let p = Proxy::start_with(|cfg| {
        routing_config(cfg, 100.0, "session");
        cfg["routing"]["target_timeout_ms"] = toml_edit::value(1000);
        // Nothing moves reads back by itself: every read is routed.
        cfg["failback"]["enabled"] = toml_edit::value(false);
    });
    let source_port = p.clusters.source_port as i32;
    let db = "route_unfinished";
    p.clusters.fresh_db(db);
    mark_sides(&p.clusters, db);
    let c = p.clusters.clone();
    for port in [c.source_port, c.target_port] {
        c.sql(port, db, "CREATE TYPE mood AS ENUM ('calm')");
    }
    let (client, conn) = p.pg_config(SUPERUSER, db).connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    // Rows 1 and 2 are large, so the server sends them (and the
    // RowDescription) at once; row 3 follows 3 s later.
    let slow = format!(
        "SELECT 'calm'::mood, repeat('y', 20000), \
         pg_sleep(CASE WHEN g = 3 THEN 3 ELSE 0 END), {SIDE} \
         FROM generate_series(1, 3) g"
    );
    let rows = column(&client, &slow, 3).await;
    assert_eq!(
        rows,
        vec![source_port.to_string(); 3],
        "answered by the source"
    );
    for i in 0..3 {
        let answer = first_value(&client, &format!("SELECT 40 + {i}, {SIDE}")).await;
        assert_eq!(answer, (40 + i).to_string());
        let answer = client
            .query_one(&format!("SELECT 50 + {i}, {SIDE}"), &[])
            .await
            .unwrap();
        assert_eq!(answer.get::<_, i32>(0), 50 + i);
    }
    tokio::task::block_in_place(|| {
        assert!(p.stat("/metrics/routing/fallbacks/types") >= 1);
    });
}
