//! A thousand concurrent client sessions through one pgshift, each held open
//! and used twice, each on its own source backend.
mod common;
use common::*;

use std::collections::HashSet;
use std::time::Duration;

use futures_util::future::join_all;
use tokio_postgres::{Client, NoTls};

const CLIENTS: usize = 1000;
const BATCH: usize = 100;
const APP: &str = "many_clients";

type Session = (
    Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
);

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn source_backends(c: &Clusters) -> i64 {
    c.sql(
        c.source_port,
        "postgres",
        &format!("select count(*) from pg_stat_activity where application_name = '{APP}'"),
    )
    .parse()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_sessions() {
    // Each session is one socket here; the proxy raises its own limit.
    rlimit::increase_nofile_limit(u64::MAX).expect("raise RLIMIT_NOFILE");
    let p = blocking(Proxy::start);
    let c = p.clusters.clone();
    assert_eq!(
        blocking(|| source_backends(&c)),
        0,
        "leftover sessions from an earlier run"
    );

    let mut sessions: Vec<Session> = Vec::with_capacity(CLIENTS);
    for batch in 0..CLIENTS / BATCH {
        let connects = (0..BATCH).map(|_| {
            let mut cfg = p.pg_config(SUPERUSER, "postgres");
            cfg.application_name(APP)
                .connect_timeout(Duration::from_secs(30));
            async move {
                let (client, conn) = cfg.connect(NoTls).await?;
                Ok::<_, tokio_postgres::Error>((client, tokio::spawn(conn)))
            }
        });
        for (i, r) in join_all(connects).await.into_iter().enumerate() {
            sessions.push(r.unwrap_or_else(|e| panic!("client {} of batch {batch}: {e}", i)));
        }
    }
    assert_eq!(sessions.len(), CLIENTS);

    // Round 1: every session answers from its own backend.
    let pids: Vec<i32> = join_all(sessions.iter().map(|(client, _)| async move {
        client
            .query_one("select pg_backend_pid()", &[])
            .await
            .map(|r| r.get::<_, i32>(0))
    }))
    .await
    .into_iter()
    .collect::<Result<_, _>>()
    .expect("round 1");
    let distinct: HashSet<i32> = pids.iter().copied().collect();
    assert_eq!(distinct.len(), CLIENTS, "backend pids are not all distinct");

    blocking(|| {
        assert!(p.stat("/metrics/clients/sessions_active") >= CLIENTS as i64);
        assert_eq!(source_backends(&c), CLIENTS as i64);
        // Each session also has its own link to the target.
        p.wait_for(60, "all target links up", |p| {
            p.stat("/metrics/target/links_up") == CLIENTS as i64
        });
    });

    // Round 2, with every session still open: the same backend as before, and
    // session state (a per-session setting) that is the session's own.
    let round2 = join_all(
        sessions
            .iter()
            .enumerate()
            .map(|(i, (client, _))| async move {
                client
                    .batch_execute(&format!("set application_name = '{APP}_{i}'"))
                    .await?;
                let row = client
                    .query_one(
                        "select pg_backend_pid(), current_setting('application_name'), $1::int * 2",
                        &[&(i as i32)],
                    )
                    .await?;
                client
                    .batch_execute(&format!("set application_name = '{APP}'"))
                    .await?;
                Ok::<_, tokio_postgres::Error>((
                    row.get::<_, i32>(0),
                    row.get::<_, String>(1),
                    row.get::<_, i32>(2),
                ))
            }),
    )
    .await;
    for (i, r) in round2.into_iter().enumerate() {
        let (pid, app, twice) = r.unwrap_or_else(|e| panic!("round 2, session {i}: {e}"));
        assert_eq!(pid, pids[i], "session {i} moved to another backend");
        assert_eq!(app, format!("{APP}_{i}"));
        assert_eq!(twice, 2 * i as i32);
    }
    blocking(|| {
        assert_eq!(p.stat("/metrics/clients/sessions_active"), CLIENTS as i64);
        assert_eq!(p.stat("/metrics/clients/protocol_errors"), 0);
        assert_eq!(p.stat("/metrics/source/connect_failures"), 0);
    });

    // Close them all.
    let tasks: Vec<_> = sessions
        .into_iter()
        .map(|(client, task)| {
            drop(client);
            task
        })
        .collect();
    for r in join_all(tasks).await {
        r.unwrap().expect("clean close");
    }
    blocking(|| {
        p.wait_for(30, "sessions_active to fall to 0", |p| {
            p.stat("/metrics/clients/sessions_active") == 0
        });
        p.wait_for(30, "the target links to close", |p| {
            p.stat("/metrics/target/links_up") == 0
        });
        p.wait_for(30, "the source backends to go", |_| {
            source_backends(&c) == 0
        });
        assert!(p.stat("/metrics/clients/connections_total") >= CLIENTS as i64);
        let log = p.log();
        assert!(
            !log.contains("panicked") && !log.contains("accept failed"),
            "{log}"
        );
    });
}
