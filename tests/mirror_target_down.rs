//! The target stops for 20 s in the middle of a write load. Clients must
//! not notice; the spool absorbs the outage and the target catches up.
//! This stops the shared target cluster, so it is the only test in its
//! binary (cargo runs test binaries one after another).
mod common;
use common::mirror::*;
use common::*;

use std::time::{Duration, Instant};

#[test]
fn target_stopped_20s_under_write_load_costs_clients_nothing_and_catches_up() {
    let c = Clusters::get();
    let _guard = ClusterGuard::new(&c, "target");
    let spool = tempfile::tempdir().unwrap();
    let spool_path = spool.path().to_path_buf();
    let p = Proxy::start_with(move |cfg| mirror_config(cfg, &spool_path));
    let db = "mirror_outage";
    c.fresh_db(db);
    pgbench_ok(&p, db, &["-i", "-s", "1", "-q"]);
    psql_ok(
        &p.url(SUPERUSER, db),
        &["-c", "CREATE TABLE marks(id int PRIMARY KEY, at text)"],
        None,
    );
    let before = p.wait_mirror_drained(60);

    let load = pgbench_spawn(&p, db, &["-c", "4", "-j", "2", "-T", "40", "-n"]);
    std::thread::sleep(Duration::from_secs(8));

    let out = pg_ctl(&c, "target", &["-m", "fast", "-w", "-t", "60", "stop"]);
    assert!(out.status.success(), "{out:?}");
    let down = Instant::now();
    // New sessions work while the target is down, and their writes are kept.
    for i in 1..=3 {
        psql_ok(
            &p.url(SUPERUSER, db),
            &[
                "-c",
                &format!("INSERT INTO marks VALUES ({i}, 'during the outage')"),
            ],
            None,
        );
    }
    let (mut max_lag, mut max_spool, mut states) = (0u64, 0u64, Vec::new());
    while down.elapsed() < Duration::from_secs(20) {
        let m = p.mirror();
        max_lag = max_lag.max(m["lag_transactions"].as_u64().unwrap());
        max_spool = max_spool.max(m["spool_bytes"].as_u64().unwrap());
        if let Some(s) = m["report"]["apply_state"].as_str() {
            states.push(s.to_string());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = pg_ctl(&c, "target", &["-w", "-t", "120", "start"]);
    assert!(out.status.success(), "{out:?}");

    let out = load.wait_with_output().unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pgbench failed:\n{report}");
    assert!(!report.contains("aborted"), "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("number of failed transactions: 0 ")),
        "{report}"
    );

    // The spool held what the target could not take.
    assert!(max_lag > 100, "the lag never grew: max {max_lag}");
    assert!(
        max_spool > before["spool_bytes"].as_u64().unwrap(),
        "the spool never grew"
    );
    assert!(
        states.iter().any(|s| s.contains("target")),
        "status never said the mirror was waiting for the target: {states:?}"
    );

    let m = p.wait_mirror_drained(300);
    assert_pgbench_tables_same(&c, db);
    assert_same(&c, db, "select * from marks order by id");
    assert_eq!(
        rows(&c, c.target_port, db, "select count(*) from marks"),
        "3\n"
    );
    assert_eq!(m["report"]["divergences_total"], 0, "{m:#}");
    assert_eq!(m["report"]["needs_resync"], false, "{m:#}");
    assert_eq!(m["state"], "caught_up", "{m:#}");
}
