//! The source restarts under an open session. This restarts the shared
//! source cluster, so it is the only test in its binary (cargo runs test
//! binaries one after another).
mod common;
use common::*;

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

#[tokio::test(flavor = "multi_thread")]
async fn open_session_sees_the_source_restart_and_new_sessions_work_after() {
    let c = Clusters::get();
    let _guard = ClusterGuard::new(&c, "source");
    let p = tokio::task::block_in_place(Proxy::start);
    let started_before = tokio::task::block_in_place(|| {
        c.sql(
            c.source_port,
            "postgres",
            "select pg_postmaster_start_time()",
        )
    });

    let (client, conn) = p
        .pg_config(SUPERUSER, "postgres")
        .application_name("source_restart")
        .connect(NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    let pid_before: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // A second session sits in an open transaction.
    let (tx, tx_conn) = p
        .pg_config(SUPERUSER, "postgres")
        .application_name("source_restart_tx")
        .connect(NoTls)
        .await
        .unwrap();
    let tx_task = tokio::spawn(tx_conn);
    tx.batch_execute("begin; select 1").await.unwrap();

    let out = tokio::task::block_in_place(|| {
        pg_ctl(&c, "source", &["-m", "fast", "-w", "-t", "120", "restart"])
    });
    assert!(
        out.status.success(),
        "pg_ctl restart failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Both sessions end with the source's own shutdown error (or at least a
    // closed connection), promptly rather than hanging.
    for (what, task) in [("idle session", task), ("transaction", tx_task)] {
        let r = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .unwrap_or_else(|_| panic!("{what}: still open 20 s after the source restarted"))
            .unwrap();
        eprintln!("{what} ended with: {r:?}");
        match r {
            Err(e) if e.code() == Some(&SqlState::ADMIN_SHUTDOWN) => {
                assert!(
                    e.as_db_error()
                        .unwrap()
                        .message()
                        .contains("administrator command"),
                    "{e}"
                )
            }
            Err(e) if e.is_closed() || e.as_db_error().is_none() => {}
            other => panic!("{what}: expected 57P01 or a closed connection, got {other:?}"),
        }
    }
    assert!(client.is_closed());
    let e = client
        .query_one("select 1", &[])
        .await
        .expect_err("query on a dead session");
    assert!(e.is_closed(), "{e}");
    assert!(tx.batch_execute("commit").await.is_err());

    // The proxy saw the source go, and serves new sessions on the new source.
    let started = Instant::now();
    let (client, conn) = loop {
        match p
            .pg_config(SUPERUSER, "postgres")
            .application_name("source_restart_new")
            .connect(NoTls)
            .await
        {
            Ok(ok) => break ok,
            // The proxy relays the source's refusals while it starts up.
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                eprintln!("retrying after: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no new session within 30 s: {e}"),
        }
    };
    let task = tokio::spawn(conn);
    let row = client
        .query_one(
            "select pg_backend_pid(), pg_postmaster_start_time()::text",
            &[],
        )
        .await
        .unwrap();
    assert_ne!(row.get::<_, i32>(0), pid_before);
    let started_after = tokio::task::block_in_place(|| {
        c.sql(
            c.source_port,
            "postgres",
            "select pg_postmaster_start_time()",
        )
    });
    assert_ne!(started_after, started_before, "the source did not restart");
    assert_eq!(
        row.get::<_, String>(1),
        started_after,
        "not the restarted source"
    );
    drop(client);
    task.await.unwrap().unwrap();

    tokio::task::block_in_place(|| {
        let port = psql_ok(
            &p.url(SUPERUSER, "postgres"),
            &["-Atc", "select inet_server_port()"],
            None,
        );
        assert_eq!(port.trim(), c.source_port.to_string());
        p.wait_for(60, "sessions_active to be 0", |p| {
            p.stat("/metrics/clients/sessions_active") == 0
        });
        // Whichever side the proxy noticed first (the source's close or the
        // client leaving after the source's FATAL), all four sessions ended.
        p.wait_for(60, "four sessions closed in the log", |p| {
            p.log().matches("session closed").count() == 4
        });
        let log = p.log();
        assert!(!log.contains("panicked"), "{log}");
    });
}
