//! The proxy's life: `pgshift check` and `--help`, the client connection
//! limit, graceful shutdown on SIGTERM (idle sessions closed at once, open
//! transactions allowed to finish until the deadline) and the idle timeout.
mod common;
use common::*;

use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

fn pgshift(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgshift"))
        .args(args)
        .env_remove("PGSHIFT_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run pgshift")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The base test config as text, and the 1-based line where `needle` first appears.
fn base_text() -> String {
    let c = Clusters::get();
    Proxy::base_config(&c, free_port(), free_port()).to_string()
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in:\n{text}"))
        + 1
}

/// Writes `text` as a config file and runs `pgshift check` on it.
fn check(dir: &tempfile::TempDir, name: &str, text: &str) -> (Output, String) {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    let p = path.display().to_string();
    (pgshift(&["check", "--config", &p]), p)
}

#[test]
fn check_accepts_a_good_config_and_names_key_and_line_of_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let good = base_text();

    let (out, path) = check(&dir, "good.toml", &good);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("{path}: ok"));

    // Unknown key: `adr` for `addr` in [listen] (line 3 of the base config).
    let bad = good.replacen("addr = ", "adr = ", 1);
    assert_eq!(line_of(&bad, "adr = "), 3);
    let (out, path) = check(&dir, "unknown.toml", &bad);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("{path}:3: key `listen.adr`")),
        "{err}"
    );
    assert!(err.contains("unknown field"), "{err}");

    // Wrong type: a string for source.port.
    let sp = Clusters::get().source_port;
    let bad = good.replacen(&format!("port = {sp}"), "port = \"fifty\"", 1);
    let line = line_of(&bad, "\"fifty\"");
    let (out, path) = check(&dir, "type.toml", &bad);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("{path}:{line}: key `source.port`")),
        "{err}"
    );

    // verify-full without sslrootcert: the missing key, at its table's line.
    let bad = good.replacen("sslmode = \"disable\"", "sslmode = \"verify-full\"", 1);
    let line = line_of(&bad, "[source]");
    let (out, path) = check(&dir, "verify.toml", &bad);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("{path}:{line}: key `source.sslrootcert`")),
        "{err}"
    );
    assert!(
        err.contains("verify-ca and verify-full need a CA file"),
        "{err}"
    );

    // A value out of range, caught by validation rather than parsing.
    let bad = good.replace(
        "shutdown_timeout_s = 10",
        "shutdown_timeout_s = 10\nmax_message_bytes = 12",
    );
    let line = line_of(&bad, "max_message_bytes");
    let (out, path) = check(&dir, "range.toml", &bad);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains(&format!("{path}:{line}: key `limits.max_message_bytes`")),
        "{}",
        text(&out.stderr)
    );

    // A missing file.
    let missing = dir.path().join("missing.toml").display().to_string();
    let out = pgshift(&["check", "--config", &missing]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("cannot read"),
        "{}",
        text(&out.stderr)
    );

    // Running (not just checking) a bad config fails the same way, before listening.
    let bad_path = dir.path().join("unknown.toml").display().to_string();
    let out = pgshift(&["--config", &bad_path]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("key `listen.adr`"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn help_for_the_command_and_for_check() {
    let out = pgshift(&["--help"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let help = text(&out.stdout);
    for word in ["Usage:", "check", "run", "--config", "--help"] {
        assert!(help.contains(word), "{word:?} missing from:\n{help}");
    }
    let out = pgshift(&["check", "--help"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let help = text(&out.stdout);
    assert!(help.contains("Validate the config file"), "{help}");
    assert!(help.contains("--config"), "{help}");
    // An unknown subcommand is a usage error, not a run.
    let out = pgshift(&["frobnicate"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("frobnicate"),
        "{}",
        text(&out.stderr)
    );
}

// ---------------------------------------------------------------- connection limit

async fn connect(
    p: &Proxy,
    app: &str,
) -> Result<
    (
        Client,
        tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    ),
    tokio_postgres::Error,
> {
    let (client, conn) = p
        .pg_config(SUPERUSER, "postgres")
        .application_name(app)
        .connect(NoTls)
        .await?;
    Ok((client, tokio::spawn(conn)))
}

async fn one(c: &Client, sql: &str) -> String {
    c.query_one(sql, &[]).await.unwrap().get::<_, String>(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn fourth_client_over_the_limit_gets_53300() {
    let p = tokio::task::block_in_place(|| {
        Proxy::start_with(|c| c["limits"]["max_client_connections"] = toml_edit::value(3))
    });
    // The harness's readiness probe may still hold a slot for a moment.
    let mut held = Vec::new();
    for i in 0..3 {
        let mut tries = 0;
        loop {
            match connect(&p, &format!("lc_limit_{i}")).await {
                Ok(c) => break held.push(c),
                Err(e) if e.code() == Some(&SqlState::TOO_MANY_CONNECTIONS) && tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("client {i}: {e}"),
            }
        }
    }
    let e = connect(&p, "lc_limit_3")
        .await
        .expect_err("a 4th client got in");
    assert_eq!(e.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{e}");
    let db = e.as_db_error().unwrap();
    assert_eq!(
        (db.severity(), db.message()),
        ("FATAL", "sorry, too many clients already")
    );
    // psql without SSL negotiation reads the same error. (With libpq's default
    // sslmode=prefer it cannot: see over_limit_client_negotiating_ssl_sees_53300.)
    let conn = format!("{} sslmode=disable", p.url(SUPERUSER, "postgres"));
    let out = tokio::task::block_in_place(|| psql(&conn, &["-c", "select 1"], None));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("sorry, too many clients already"),
        "{}",
        text(&out.stderr)
    );

    // The three keep working.
    for (i, (c, _)) in held.iter().enumerate() {
        assert_eq!(
            one(c, "select current_setting('application_name')").await,
            format!("lc_limit_{i}")
        );
    }
    tokio::task::block_in_place(|| {
        assert!(p.stat("/metrics/clients/rejected_too_many") >= 2);
        assert_eq!(p.stat("/metrics/clients/sessions_active"), 3);
    });
    // A slot freed is a slot available.
    let (c, t) = held.pop().unwrap();
    drop(c);
    t.await.unwrap().unwrap();
    let mut tries = 0;
    let (c4, t4) = loop {
        match connect(&p, "lc_limit_again").await {
            Ok(c) => break c,
            Err(e) if e.code() == Some(&SqlState::TOO_MANY_CONNECTIONS) && tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(
        one(&c4, "select current_setting('application_name')").await,
        "lc_limit_again"
    );
    drop(c4);
    t4.await.unwrap().unwrap();
    for (c, t) in held {
        drop(c);
        t.await.unwrap().unwrap();
    }
}

/// Postgres answers an SSLRequest before it reports "too many clients", so
/// libpq clients negotiating SSL (the default, sslmode=prefer) see the 53300.
/// An ErrorResponse in answer to the SSLRequest itself would make libpq
/// (since the CVE-2024-10977 fix) report only "server sent an error response
/// during SSL exchange": pgshift negotiates first, as Postgres does
/// (`refuse_over_limit` in src/session/mod.rs).
#[test]
fn over_limit_client_negotiating_ssl_sees_53300() {
    let p = Proxy::start_with(|c| c["limits"]["max_client_connections"] = toml_edit::value(1));
    std::thread::sleep(Duration::from_millis(300)); // the readiness probe's slot
    let holder = Command::new("psql")
        .arg(p.url(SUPERUSER, "postgres"))
        .args(["-X", "-c", "select pg_sleep(3)"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    p.wait_for(60, "the first session", |p| {
        p.stat("/metrics/clients/sessions_active") == 1
    });
    let out = psql(
        &format!("{} sslmode=prefer", p.url(SUPERUSER, "postgres")),
        &["-c", "select 1"],
        None,
    );
    let _ = holder.wait_with_output();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("sorry, too many clients already"),
        "{}",
        text(&out.stderr)
    );
}

// ---------------------------------------------------------------- shutdown

type ConnTask = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

/// Waits for a connection task to end with a FATAL of this SQLSTATE.
async fn expect_fatal(task: ConnTask, code: &SqlState, what: &str) -> String {
    let r = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap_or_else(|_| panic!("{what}: the session was not closed"))
        .unwrap();
    let e = r
        .err()
        .unwrap_or_else(|| panic!("{what}: closed without an error"));
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("{what}: not a server error: {e}"));
    assert_eq!(db.code(), code, "{what}: {db:?}");
    assert_eq!(db.severity(), "FATAL", "{what}");
    db.message().to_string()
}

fn source_count(c: &Clusters, db: &str, sql: &str) -> i64 {
    c.sql(c.source_port, db, sql).parse().unwrap()
}

fn refused(p: &Proxy) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], p.port).into(), Duration::from_secs(2)).is_err()
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_idle_sessions_and_lets_transactions_commit() {
    let c = Clusters::get();
    tokio::task::block_in_place(|| {
        c.fresh_db("lifecycle_term");
        c.sql(c.source_port, "lifecycle_term", "create table t (id int)");
    });
    let mut p = tokio::task::block_in_place(Proxy::start); // shutdown_timeout_s = 10
    let (idle, idle_task) = {
        let (c, conn) = p
            .pg_config(SUPERUSER, "lifecycle_term")
            .application_name("lc_term_idle")
            .connect(NoTls)
            .await
            .unwrap();
        (c, tokio::spawn(conn))
    };
    let (tx, tx_task) = {
        let (c, conn) = p
            .pg_config(SUPERUSER, "lifecycle_term")
            .application_name("lc_term_tx")
            .connect(NoTls)
            .await
            .unwrap();
        (c, tokio::spawn(conn))
    };
    idle.simple_query("select 1").await.unwrap();
    tx.batch_execute("begin; insert into t values (1)")
        .await
        .unwrap();

    p.signal("TERM");
    let msg = expect_fatal(idle_task, &SqlState::ADMIN_SHUTDOWN, "idle session").await;
    assert!(msg.contains("administrator command"), "{msg}");
    assert!(idle.is_closed());

    // Draining: no new clients, the admin API says so.
    tokio::task::block_in_place(|| {
        assert!(refused(&p), "a new connection was accepted after SIGTERM");
        let out = psql(&p.url(SUPERUSER, "postgres"), &["-c", "select 1"], None);
        assert!(!out.status.success(), "psql got in after SIGTERM");
        assert_eq!(p.status()["phase"], "draining");
    });

    // The transaction carries on and commits.
    tx.execute("insert into t values (2)", &[]).await.unwrap();
    let n: i64 = tx
        .query_one("select count(*) from t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    tx.batch_execute("commit").await.unwrap();
    let msg = expect_fatal(tx_task, &SqlState::ADMIN_SHUTDOWN, "session after commit").await;
    assert!(msg.contains("administrator command"), "{msg}");

    let code = tokio::task::block_in_place(|| p.wait_exit(15));
    assert_eq!(code, Some(0), "{}", p.log());
    tokio::task::block_in_place(|| {
        assert_eq!(
            source_count(&c, "lifecycle_term", "select count(*) from t"),
            2
        );
        assert_eq!(
            source_count(
                &c,
                "postgres",
                "select count(*) from pg_stat_activity where application_name like 'lc_term_%'"
            ),
            0
        );
        let log = p.log();
        assert!(
            log.contains("draining sessions") && log.contains("pgshift stopped"),
            "{log}"
        );
        assert!(!log.contains("drain deadline passed"), "{log}");
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_deadline_closes_an_unfinished_transaction_and_rolls_it_back() {
    let c = Clusters::get();
    tokio::task::block_in_place(|| {
        c.fresh_db("lifecycle_deadline");
        c.sql(
            c.source_port,
            "lifecycle_deadline",
            "create table t (id int primary key, v int); insert into t values (1, 0)",
        );
    });
    let mut p = tokio::task::block_in_place(|| {
        Proxy::start_with(|c| c["limits"]["shutdown_timeout_s"] = toml_edit::value(2))
    });
    let (tx, conn) = p
        .pg_config(SUPERUSER, "lifecycle_deadline")
        .application_name("lc_deadline_tx")
        .connect(NoTls)
        .await
        .unwrap();
    let tx_task = tokio::spawn(conn);
    tx.batch_execute("begin; insert into t values (2, 2); update t set v = 99 where id = 1")
        .await
        .unwrap();

    p.signal("TERM");
    tokio::task::block_in_place(|| {
        p.wait_for(60, "draining", |p| p.status()["phase"] == "draining")
    });
    // Before the deadline the transaction is still served.
    tx.execute("insert into t values (3, 3)", &[])
        .await
        .unwrap();

    let msg = expect_fatal(
        tx_task,
        &SqlState::ADMIN_SHUTDOWN,
        "transaction at the deadline",
    )
    .await;
    assert!(msg.contains("administrator command"), "{msg}");
    assert!(
        tx.batch_execute("commit").await.is_err(),
        "commit after the deadline"
    );

    let code = tokio::task::block_in_place(|| p.wait_exit(15));
    assert_eq!(code, Some(0), "{}", p.log());
    tokio::task::block_in_place(|| {
        p.wait_for(60, "the source backend to go", |_| {
            source_count(
                &c,
                "postgres",
                "select count(*) from pg_stat_activity where application_name = 'lc_deadline_tx'",
            ) == 0
        });
        assert_eq!(
            c.sql(
                c.source_port,
                "lifecycle_deadline",
                "select string_agg(id || ':' || v, ',' order by id) from t"
            ),
            "1:0"
        );
        // And no lock is left on the row.
        c.sql(
            c.source_port,
            "lifecycle_deadline",
            "set lock_timeout = '2s'; update t set v = 1 where id = 1",
        );
        assert!(p.log().contains("drain deadline passed"), "{}", p.log());
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_without_sessions_exits_promptly() {
    let mut p = tokio::task::block_in_place(Proxy::start);
    p.signal("TERM");
    let code = tokio::task::block_in_place(|| p.wait_exit(5));
    assert_eq!(code, Some(0), "{}", p.log());
    assert!(refused(&p));
}

// ---------------------------------------------------------------- idle timeout

#[tokio::test(flavor = "multi_thread")]
async fn idle_timeout_closes_silent_sessions_with_57p05_but_not_busy_ones() {
    let p = tokio::task::block_in_place(|| {
        Proxy::start_with(|c| c["limits"]["idle_timeout_s"] = toml_edit::value(1))
    });
    let (idle, idle_task) = connect(&p, "lc_idle_silent").await.unwrap();
    let (busy, busy_task) = connect(&p, "lc_idle_busy").await.unwrap();
    assert_eq!(one(&idle, "select 'hello'::text").await, "hello");

    // A query running longer than the timeout is not idleness.
    let (_, r) = tokio::join!(
        async {
            let msg =
                expect_fatal(idle_task, &SqlState::IDLE_SESSION_TIMEOUT, "idle session").await;
            assert!(msg.contains("idle-session timeout"), "{msg}");
        },
        busy.simple_query("select pg_sleep(3)")
    );
    r.expect("a busy session was closed for idleness");
    assert!(idle.is_closed());
    assert!(idle.simple_query("select 1").await.is_err());
    // Once silent, the busy one goes the same way.
    expect_fatal(
        busy_task,
        &SqlState::IDLE_SESSION_TIMEOUT,
        "formerly busy session",
    )
    .await;
    tokio::task::block_in_place(|| {
        let c = &p.clusters;
        p.wait_for(60, "the source backends to go", |_| {
            source_count(
                c,
                "postgres",
                "select count(*) from pg_stat_activity where application_name like 'lc_idle_%'",
            ) == 0
        });
        p.wait_for(60, "no active sessions", |p| {
            p.stat("/metrics/clients/sessions_active") == 0
        });
    });
}

/// Like Postgres' idle_session_timeout, the proxy's idle timeout leaves a
/// session that is idle inside a transaction block alone (that is
/// idle_in_transaction_session_timeout's business, which the source enforces
/// itself), and its transaction can still commit afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_spares_sessions_idle_in_a_transaction() {
    let p = tokio::task::block_in_place(|| {
        Proxy::start_with(|c| c["limits"]["idle_timeout_s"] = toml_edit::value(1))
    });
    tokio::task::block_in_place(|| p.clusters.fresh_db("pgshift_t_idle_tx"));
    let (client, task) = tokio_postgres::connect(
        &format!(
            "{} application_name=lc_idle_tx",
            p.url(SUPERUSER, "pgshift_t_idle_tx")
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let task = tokio::spawn(task);
    client
        .batch_execute("create table t(a int); begin; insert into t values (1)")
        .await
        .unwrap();
    // Well past 2x the timeout, the longest the proxy's check can take.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    assert!(
        !client.is_closed(),
        "a session idle in a transaction was closed"
    );
    client.batch_execute("commit").await.unwrap();
    let rows = tokio::task::block_in_place(|| {
        p.clusters.sql(
            p.clusters.source_port,
            "pgshift_t_idle_tx",
            "select count(*) from t",
        )
    });
    assert_eq!(rows, "1");
    // Outside the transaction the timeout applies again.
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), task).await;
    assert!(r.is_ok(), "the now idle session was not closed");
}

/// COPY FROM STDIN over the extended protocol sends a Sync that Postgres
/// swallows (it arrives in copy-in mode), so a proxy that simply counted
/// Syncs against ReadyForQuery would think the session busy forever and hold
/// SIGTERM until the drain deadline. After the copy, the session is idle and
/// shutdown must be immediate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_after_extended_copy_in_does_not_wait_for_the_deadline() {
    use futures_util::SinkExt;
    let mut p = tokio::task::block_in_place(|| {
        Proxy::start_with(|c| c["limits"]["shutdown_timeout_s"] = toml_edit::value(60))
    });
    tokio::task::block_in_place(|| p.clusters.fresh_db("pgshift_t_copy_drain"));
    let (client, task) = tokio_postgres::connect(&p.url(SUPERUSER, "pgshift_t_copy_drain"), NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(task);
    client.batch_execute("create table t(a int)").await.unwrap();
    let sink = client.copy_in("copy t from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    for i in 0..100 {
        sink.send(bytes::Bytes::from(format!("{i}\n")))
            .await
            .unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 100);
    assert_eq!(
        client
            .query_one("select count(*) from t", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        100
    );

    let started = std::time::Instant::now();
    p.signal("TERM");
    let code = tokio::task::block_in_place(|| p.wait_exit(30));
    assert_eq!(code, Some(0));
    // Far below the 60 s deadline: the idle session was closed at once.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "shutdown waited {:?}",
        started.elapsed()
    );
    let _ = task.await;
}
