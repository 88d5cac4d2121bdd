//! Routed reads when the target fails: stopped (connections refused and
//! cut) and paused (SIGSTOP: nothing answers). Clients see no error; every
//! read that could not run on the target ran on the source and was
//! counted. This stops the shared target cluster, so it is the only test
//! in its binary (cargo runs test binaries one after another).
mod common;
use common::*;

use std::time::{Duration, Instant};

#[test]
fn a_failing_target_costs_routed_reads_nothing() {
    let c = Clusters::get();
    let _guard = ClusterGuard::new(&c, "target");
    let p = Proxy::start_with(|cfg| {
        let mut t = toml_edit::Table::new();
        t["read_percent"] = toml_edit::value(100.0);
        t["target_timeout_ms"] = toml_edit::value(500);
        cfg["routing"] = toml_edit::Item::Table(t);
        cfg["target"]["keepalive_s"] = toml_edit::value(2);
        // This is about each read's own fallback: the health monitor
        // would move every read to the source (tests/failback*.rs).
        cfg["failback"]["enabled"] = toml_edit::value(false);
    });
    let db = "route_down";
    pgbench_db_on_both(&c, db);

    // Stopped: sessions' target connections are cut, new logins refused.
    let load = pgbench_cmd(
        &p,
        SUPERUSER,
        db,
        &[
            "-S", "-M", "prepared", "-c", "4", "-j", "2", "-T", "25", "-n",
        ],
    )
    .background();
    std::thread::sleep(Duration::from_secs(5));
    let on_target = p.stat("/metrics/routing/target/reads");
    assert!(on_target > 0, "nothing was routed before the outage");
    let out = pg_ctl(&c, "target", &["-m", "fast", "-w", "-t", "60", "stop"]);
    assert!(out.status.success(), "{out:?}");
    let down = Instant::now();
    std::thread::sleep(Duration::from_secs(8));
    let out = pg_ctl(&c, "target", &["-w", "-t", "120", "start"]);
    assert!(out.status.success(), "{out:?}");
    let back = down.elapsed();
    let text = load.pgbench_ok();
    let st = p.status();
    let r = &st["metrics"]["routing"];
    let fallbacks: u64 = ["connection", "timeout", "server_error", "setup"]
        .iter()
        .map(|k| r["fallbacks"][k].as_u64().unwrap())
        .sum();
    assert!(fallbacks > 0, "no fallback counted: {r:#}\n{text}");
    // The reads that fell back were answered by the source, and counted so.
    assert!(r["source"]["reads"].as_u64().unwrap() > 0, "{r:#}");
    // Links come back (backoff up to a few seconds) and reads return.
    let before = p.stat("/metrics/routing/target/reads");
    p.wait_for(30, "reads on the target again", |p| {
        let out = pgbench_cmd(p, SUPERUSER, db, &["-S", "-c", "2", "-T", "2", "-n"])
            .output()
            .unwrap();
        assert!(out.status.success());
        p.stat("/metrics/routing/target/reads") > before
    });
    eprintln!("target down for {back:?}; routing {r:#}");

    // Paused: nothing answers. Reads wait at most target_timeout_ms, then
    // run on the source.
    let load = pgbench_cmd(
        &p,
        SUPERUSER,
        db,
        &["-S", "-c", "2", "-j", "2", "-T", "12", "-n"],
    )
    .background();
    std::thread::sleep(Duration::from_secs(3));
    let timeouts = p.stat("/metrics/routing/fallbacks/timeout");
    {
        let _paused = Paused::target(&c);
        std::thread::sleep(Duration::from_secs(4));
    }
    load.pgbench_ok();
    assert!(
        p.stat("/metrics/routing/fallbacks/timeout") > timeouts,
        "{:#}",
        p.status()["metrics"]["routing"]
    );
}
