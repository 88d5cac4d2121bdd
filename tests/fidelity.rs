//! Fidelity: after the mirror drains, every table is equal on both sides,
//! or the proxy names it (status: a non-deterministic statement replayed
//! as statements, or a divergence) — never silently different. Real
//! clusters, real clients (psql, pgbench, tokio-postgres), each case of
//! issue 17: procedures and DO blocks that commit, functions that write,
//! generated values under interleaved commits (from row images),
//! savepoints, temporary tables, two-phase commit, search_path and SET
//! ROLE, COPY, DDL then DML, sequences, and routed read-only transactions
//! that try to write.
mod common;
use common::mirror::*;
use common::*;

use std::time::Duration;

use tokio_postgres::NoTls;

/// A proxy mirroring into a spool in the returned directory, with row
/// images for `row_db` (when given) and `read_percent` of reads routed.
fn proxy(row_db: Option<&str>, read_percent: f64) -> (Proxy, tempfile::TempDir) {
    let spool = tempfile::tempdir().unwrap();
    let sp = spool.path().to_path_buf();
    let row_db = row_db.map(str::to_string);
    let p = Proxy::start_with(move |cfg| {
        mirror_config(cfg, &sp);
        if let Some(db) = row_db {
            let mut r = toml_edit::Table::new();
            let mut dbs = toml_edit::Array::new();
            dbs.push(db);
            r["databases"] = toml_edit::value(dbs);
            r["sequence_sync_ms"] = toml_edit::value(300);
            cfg["mirror"]["row_images"] = toml_edit::Item::Table(r);
        }
        if read_percent > 0.0 {
            let mut t = toml_edit::Table::new();
            t["read_percent"] = toml_edit::value(read_percent);
            cfg["routing"] = toml_edit::Item::Table(t);
            cfg["failback"]["enabled"] = toml_edit::value(false);
        }
    });
    (p, spool)
}

/// Every user table of `db` as (name, digest of all its rows) on one side.
fn table_digests(c: &Clusters, port: u16, db: &str) -> Vec<(String, String)> {
    let names = rows(
        c,
        port,
        db,
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables \
         WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'pgshift_mirror') \
         AND schemaname NOT LIKE 'pg\\_temp\\_%' ORDER BY 1",
    );
    names
        .lines()
        .map(|t| {
            let d = rows(
                c,
                port,
                db,
                &format!(
                    "SELECT count(*) || ':' || coalesce(md5(string_agg(x::text, ',' ORDER BY x::text)), '-') FROM {t} x"
                ),
            );
            (t.to_string(), d.trim().to_string())
        })
        .collect()
}

/// Tables that differ between the two sides. Each must be named by the
/// proxy (a non-deterministic statement replayed as statements, or a
/// divergence): a silent difference fails the test.
#[track_caller]
fn differing_tables(p: &Proxy, db: &str) -> Vec<String> {
    let c = &p.clusters;
    let s = table_digests(c, c.source_port, db);
    let t = table_digests(c, c.target_port, db);
    assert_eq!(
        s.iter().map(|x| &x.0).collect::<Vec<_>>(),
        t.iter().map(|x| &x.0).collect::<Vec<_>>(),
        "the two sides have different tables"
    );
    let status = p.mirror();
    let report = &status["report"];
    let named = |table: &str| {
        let bare = table.rsplit('.').next().unwrap_or(table);
        let mentions = |v: &serde_json::Value| {
            let text = v.to_string();
            text.contains(table) || text.contains(bare)
        };
        report["nondeterministic"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["replayed_as_statements"].as_u64() > Some(0) && mentions(&n["tables"]))
            || report["divergences"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|d| mentions(&d["statement"]))
    };
    let mut out = Vec::new();
    for ((name, sd), (_, td)) in s.iter().zip(&t) {
        if sd != td {
            assert!(
                named(name),
                "{name} differs silently (source {sd}, target {td}); mirror status:\n{status:#}"
            );
            out.push(name.clone());
        }
    }
    out
}

/// Sequences as (name, last_value) on one side.
fn sequences(c: &Clusters, port: u16, db: &str) -> String {
    rows(
        c,
        port,
        db,
        "SELECT format('%I.%I', schemaname, sequencename) || '=' || coalesce(last_value::text, 'unused') FROM pg_sequences ORDER BY 1",
    )
}

/// Runs a psql script through the proxy, errors allowed (some statements
/// fail on purpose); returns psql's combined output.
fn psql_script(p: &Proxy, db: &str, script: &str) -> String {
    let out = psql(
        &p.url(SUPERUSER, db),
        &["-v", "ON_ERROR_STOP=0", "-q"],
        Some(script.as_bytes()),
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn procedures_do_blocks_and_writing_functions_reach_the_target_as_they_ran() {
    let (p, _spool) = proxy(None, 0.0);
    let db = "fid_procs";
    p.clusters.fresh_db(db);
    let out = psql_script(
        &p,
        db,
        r#"
CREATE TABLE t(a int);
CREATE PROCEDURE commits() LANGUAGE plpgsql AS $$
BEGIN INSERT INTO t VALUES (1); COMMIT; INSERT INTO t VALUES (2); ROLLBACK; INSERT INTO t VALUES (3); END $$;
CALL commits();
CREATE PROCEDURE commits_then_fails() LANGUAGE plpgsql AS $$
BEGIN INSERT INTO t VALUES (10); COMMIT; INSERT INTO t VALUES (11); RAISE EXCEPTION 'boom'; END $$;
CALL commits_then_fails();
CREATE FUNCTION writes(v int) RETURNS int LANGUAGE plpgsql AS $$ BEGIN INSERT INTO t VALUES (v); RETURN v; END $$;
SELECT writes(20);
BEGIN; SELECT writes(21); COMMIT;
BEGIN; SELECT writes(22); ROLLBACK;
DO $$ BEGIN INSERT INTO t VALUES (30); COMMIT; INSERT INTO t VALUES (31); END $$;
DO $$ BEGIN INSERT INTO t VALUES (40); RAISE EXCEPTION 'no'; END $$;
BEGIN; CALL commits(); COMMIT;
"#,
    );
    assert!(out.contains("boom"), "{out}");
    assert!(
        out.contains("invalid transaction termination"),
        "a CALL that commits inside a block fails, as on Postgres: {out}"
    );
    // The same function through the extended protocol (a named statement).
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (client, conn) = p.pg_config(SUPERUSER, db).connect(NoTls).await.unwrap();
        tokio::spawn(conn);
        let st = client.prepare("SELECT writes($1)").await.unwrap();
        for v in 50..55i32 {
            client.query(&st, &[&v]).await.unwrap();
        }
        client.execute("CALL commits()", &[]).await.unwrap();
    });
    let status = p.wait_mirror_drained(60);
    let c = &p.clusters;
    assert_eq!(
        rows(
            c,
            c.source_port,
            db,
            "SELECT string_agg(a::text, ',' ORDER BY a) FROM t"
        )
        .trim(),
        "1,1,3,3,10,20,21,30,31,50,51,52,53,54"
    );
    assert_same(c, db, "SELECT a FROM t ORDER BY a");
    assert_eq!(status["report"]["divergences_total"], 0, "{status:#}");
    assert!(differing_tables(&p, db).is_empty());
}

#[test]
fn generated_values_are_equal_under_interleaved_commits() {
    let db = "fid_generated";
    let (p, _spool) = proxy(Some(db), 0.0);
    let c = p.clusters.clone();
    c.fresh_db(db);
    psql_ok(
        &p.url(SUPERUSER, db),
        &[],
        Some(
            br#"
CREATE TABLE orders(id serial PRIMARY KEY, n int, at timestamptz DEFAULT clock_timestamp(), tag uuid DEFAULT gen_random_uuid());
CREATE TABLE items(id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, order_id int, r float8 DEFAULT random());
CREATE TABLE flags(id int PRIMARY KEY, hit boolean NOT NULL DEFAULT false);
INSERT INTO flags SELECT g, false FROM generate_series(1, 200) g;
CREATE SEQUENCE direct_seq;
"#,
        ),
    );
    p.wait_mirror_drained(60);
    // The database was made after the proxy started (its first slot went
    // with the old one): rows exist only for transactions that commit once
    // the stream's new slot is active.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while c.sql(
        c.source_port,
        "postgres",
        &format!("SELECT count(*) FROM pg_replication_slots WHERE database = '{db}' AND active"),
    ) != "1"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the row image stream never came back for {db}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("gen.sql");
    // Ids taken in one order, commits in another (the sleep lets other
    // sessions take ids and commit first).
    std::fs::write(
        &script,
        "BEGIN;\n\
         INSERT INTO orders(n) VALUES (1);\n\
         INSERT INTO items(order_id) VALUES (currval('orders_id_seq'));\n\
         SELECT pg_sleep(random() * 0.005);\n\
         INSERT INTO items(order_id) SELECT currval('orders_id_seq') FROM generate_series(1, 3);\n\
         UPDATE flags SET hit = true WHERE id IN (SELECT id FROM flags WHERE NOT hit ORDER BY random() LIMIT 1);\n\
         END;\n\
         SELECT nextval('direct_seq');\n\
         INSERT INTO orders(n) VALUES (2);\n",
    )
    .unwrap();
    for mode in ["simple", "extended", "prepared"] {
        pgbench_ok(
            &p,
            db,
            &[
                "-n",
                "-M",
                mode,
                "-f",
                script.to_str().unwrap(),
                "-c",
                "6",
                "-j",
                "2",
                "-t",
                "40",
            ],
        );
    }
    psql_ok(
        &p.url(SUPERUSER, db),
        &["-c", "SELECT setval('direct_seq', 5000)"],
        None,
    );
    let status = p.wait_mirror_drained(120);
    assert!(
        differing_tables(&p, db).is_empty(),
        "row images should make every table equal: {status:#}"
    );
    // The non-deterministic writes were applied from rows, never replayed.
    let nd = status["report"]["nondeterministic"].as_array().unwrap();
    assert!(!nd.is_empty(), "{status:#}");
    for n in nd {
        assert_eq!(n["replayed_as_statements"], 0, "{n:#}");
        assert!(n["applied_as_rows"].as_u64() > Some(0), "{n:#}");
    }
    // Sequences follow (they are synced every sequence_sync_ms).
    p.wait_for(30, "the sequences to be synced", |_| {
        sequences(&c, c.source_port, db) == sequences(&c, c.target_port, db)
    });
    let rows_status = &status["row_images"][0];
    assert!(
        rows_status["transactions_applied_as_rows"].as_u64() >= Some(3 * 6 * 40),
        "{rows_status:#}"
    );
}

#[test]
fn session_state_savepoints_two_phase_commit_copy_and_ddl() {
    let (p, _spool) = proxy(None, 0.0);
    let db = "fid_session";
    let c = p.clusters.clone();
    c.fresh_db(db);
    for port in [c.source_port, c.target_port] {
        c.sql(
            port,
            db,
            "CREATE SCHEMA app; GRANT ALL ON SCHEMA app TO pgshift_md5; CREATE TABLE app.owned(a int); GRANT ALL ON app.owned TO pgshift_md5",
        );
    }
    let out = psql_script(
        &p,
        db,
        r#"
CREATE TABLE s(a int PRIMARY KEY, note text);
BEGIN;
INSERT INTO s VALUES (1, 'kept');
SAVEPOINT a;
INSERT INTO s VALUES (2, 'rolled back');
ROLLBACK TO SAVEPOINT a;
SAVEPOINT b;
INSERT INTO s VALUES (3, 'released');
RELEASE SAVEPOINT b;
COMMIT;
CREATE TEMP TABLE staging AS SELECT g AS a, 'from temp ' || g AS note FROM generate_series(10, 14) g;
INSERT INTO s SELECT * FROM staging;
BEGIN;
INSERT INTO s VALUES (20, 'prepared');
PREPARE TRANSACTION 'fid_2pc';
COMMIT PREPARED 'fid_2pc';
BEGIN;
INSERT INTO s VALUES (21, 'prepared then rolled back');
PREPARE TRANSACTION 'fid_2pc_no';
ROLLBACK PREPARED 'fid_2pc_no';
BEGIN;
PREPARE TRANSACTION 'fid_2pc_empty';
COMMIT PREPARED 'fid_2pc_empty';
BEGIN; PREPARE TRANSACTION 'fid_2pc_empty_too';
ROLLBACK PREPARED 'fid_2pc_empty_too';
SET search_path = app, public;
INSERT INTO owned VALUES (1);
RESET search_path;
SET ROLE pgshift_md5;
INSERT INTO app.owned VALUES (2);
RESET ROLE;
COPY s FROM STDIN;
30	copied
31	copied too
\.
BEGIN;
CREATE TABLE made(id serial PRIMARY KEY, v text);
INSERT INTO made(v) VALUES ('a'), ('b');
ALTER TABLE made ADD COLUMN w int DEFAULT 7;
UPDATE made SET w = id * 2;
COMMIT;
CREATE SEQUENCE seq_direct;
SELECT nextval('seq_direct');
SELECT nextval('seq_direct');
SELECT setval('seq_direct', 100);
SELECT nextval('seq_direct');
"#,
    );
    assert!(!out.contains("ERROR"), "{out}");
    let status = p.wait_mirror_drained(60);
    assert_same(&c, db, "SELECT * FROM s ORDER BY a");
    assert_same(&c, db, "SELECT * FROM app.owned ORDER BY a");
    assert_same(&c, db, "SELECT * FROM made ORDER BY id");
    assert_eq!(
        rows(
            &c,
            c.target_port,
            db,
            "SELECT count(*) FROM pg_prepared_xacts"
        )
        .trim(),
        "0",
        "no prepared transaction is left on the target"
    );
    assert_eq!(
        sequences(&c, c.source_port, db),
        sequences(&c, c.target_port, db)
    );
    assert_eq!(status["report"]["divergences_total"], 0, "{status:#}");
    // `made` was filled by DDL and DML in one transaction: replayed as
    // statements (its serial is flagged), equal here as nothing interleaved.
    assert!(differing_tables(&p, db).is_empty(), "{status:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routed_read_only_transaction_never_writes_on_the_target() {
    let (p, _spool) = proxy(None, 100.0);
    let db = "fid_routed";
    let c = p.clusters.clone();
    c.fresh_db(db);
    mark_sides(&c, db);
    psql_ok(
        &p.url(SUPERUSER, db),
        &[
            "-c",
            "CREATE TABLE r(a int)",
            "-c",
            "CREATE FUNCTION sneaky() RETURNS int LANGUAGE sql AS 'INSERT INTO r VALUES (99) RETURNING 1'",
        ],
        None,
    );
    p.wait_mirror_drained(60);
    let (mut client, conn) = p.pg_config(SUPERUSER, db).connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    let target = c.target_port.to_string();
    let source = c.source_port.to_string();
    let value = |m: Vec<tokio_postgres::SimpleQueryMessage>| {
        m.into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .unwrap_or_default()
    };

    // READ ONLY, then READ WRITE before any read: the transaction moves to
    // the source, where the write lands (and is mirrored).
    client.simple_query("BEGIN READ ONLY").await.unwrap();
    client
        .simple_query("SET TRANSACTION READ WRITE")
        .await
        .unwrap();
    client
        .simple_query("INSERT INTO r VALUES (1)")
        .await
        .unwrap();
    let on = value(
        client
            .simple_query(&format!("SELECT {SIDE}"))
            .await
            .unwrap(),
    );
    assert_eq!(on, source, "the transaction moved to the source");
    client.simple_query("COMMIT").await.unwrap();

    // After a read, the target answers as Postgres would: the write fails
    // (25006), READ WRITE fails (25001). (The session reads from the
    // source until its own write is on the target.)
    p.wait_mirror_drained(60);
    client.simple_query("BEGIN READ ONLY").await.unwrap();
    let on = value(
        client
            .simple_query(&format!("SELECT {SIDE}"))
            .await
            .unwrap(),
    );
    assert_eq!(on, target, "read-only transactions are routed");
    let e = client
        .simple_query("SET TRANSACTION READ WRITE")
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("25001"), "{e:?}");
    client.simple_query("ROLLBACK").await.unwrap();
    client.simple_query("BEGIN READ ONLY").await.unwrap();
    value(client.simple_query("SELECT 1").await.unwrap());
    let e = client
        .simple_query("INSERT INTO r VALUES (2)")
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("25006"), "{e:?}");
    client.simple_query("ROLLBACK").await.unwrap();

    // A session setting made inside a routed transaction reaches the source
    // once it commits; one rolled back to a savepoint does not.
    client.simple_query("BEGIN READ ONLY").await.unwrap();
    value(client.simple_query("SELECT 1").await.unwrap());
    client
        .simple_query("SET application_name = 'set_in_routed_txn'")
        .await
        .unwrap();
    client.simple_query("SAVEPOINT s").await.unwrap();
    client.simple_query("SET work_mem = '77MB'").await.unwrap();
    client
        .simple_query("ROLLBACK TO SAVEPOINT s")
        .await
        .unwrap();
    client.simple_query("COMMIT").await.unwrap();
    // SHOW is server-local: answered by the source, as the client's own.
    assert_eq!(
        value(client.simple_query("SHOW application_name").await.unwrap()),
        "set_in_routed_txn"
    );
    assert_ne!(
        value(client.simple_query("SHOW work_mem").await.unwrap()),
        "77MB"
    );

    // A statement prepared inside a routed transaction works outside it,
    // on the source too.
    let tx = client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .unwrap();
    let st = tx
        .prepare("SELECT count(*) FROM r WHERE a = $1")
        .await
        .unwrap();
    let n: i64 = tx.query_one(&st, &[&1i32]).await.unwrap().get(0);
    assert_eq!(n, 1);
    tx.commit().await.unwrap();
    client
        .simple_query("INSERT INTO r VALUES (3)")
        .await
        .unwrap();
    // Right after its own write the session reads from the source.
    let n: i64 = client.query_one(&st, &[&3i32]).await.unwrap().get(0);
    assert_eq!(n, 1);

    // Lifting the guard on the source session does not lift it on the
    // target: a "read" that writes fails there and runs on the source.
    client
        .simple_query("SET default_transaction_read_only = off")
        .await
        .unwrap();
    p.wait_mirror_drained(60);
    let v = value(client.simple_query("SELECT sneaky()").await.unwrap());
    assert_eq!(v, "1");
    let status = p.wait_mirror_drained(60);
    assert_eq!(
        rows(&c, c.source_port, db, "SELECT count(*) FROM r WHERE a = 99").trim(),
        "1",
        "the write ran on the source"
    );
    assert_same(&c, db, "SELECT a FROM r ORDER BY a");
    assert_eq!(status["report"]["divergences_total"], 0, "{status:#}");
    let routing = &p.status()["metrics"]["routing"];
    assert!(
        routing["transactions_moved"].as_u64() >= Some(1),
        "{routing:#}"
    );
}
