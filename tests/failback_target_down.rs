//! The target cluster stopped for real under select-only load at 100%
//! routing: no client error, the trip is recorded, and with
//! `recovery = "auto"` the share ramps back to 100% through the probe steps
//! once the target is back. This stops the shared target cluster, so it is
//! the only test in its binary (cargo runs test binaries one at a time).
//!
//! The load runs until the ramp is over and reads are back on the target
//! (`Load`), not for a fixed time: a stop and a start of the target took
//! over 20 s here at times.
mod common;
use common::*;

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use pgshift::health::monitor::{SUSTAIN_TICKS, TICK};

const WINDOW_S: u64 = 5;
const CHECK_INTERVAL_MS: u64 = 300;
const COOLDOWN_S: u64 = 3;
const STEP_S: u64 = 2;
const PROBE_PERCENT: f64 = 10.0;

/// pgbench through the proxy in runs of `RUN_S` seconds, one after the
/// other until `finish`: the load outlasts the stop, the start and the
/// ramp however long they take, and every run must end without a failed
/// transaction.
struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u32>>,
}

const RUN_S: &str = "10";

impl Load {
    fn start(p: &Proxy, db: &str, args: &[&str]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let (clusters, port, db) = (p.clusters.clone(), p.port, db.to_string());
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let thread = std::thread::spawn(move || {
            let mut runs = 0;
            while !flag.load(SeqCst) {
                pg_tool(&clusters, "pgbench")
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", SUPERUSER])
                    .args(&args)
                    .args(["-n", "-T", RUN_S])
                    .arg(&db)
                    .env("PGCONNECT_TIMEOUT", "20")
                    .background()
                    .pgbench_ok();
                runs += 1;
            }
            runs
        });
        Load {
            stop,
            thread: Some(thread),
        }
    }

    /// Ends the load after the run under way; a failed run fails the test
    /// with its report.
    fn finish(mut self) -> u32 {
        self.stop.store(true, SeqCst);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(runs)) => runs,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => 0,
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

#[test]
fn a_stopped_target_fails_back_and_ramps_back_through_the_probe_steps() {
    let c = Clusters::get();
    let _guard = ClusterGuard::new(&c, "target");
    let p = Proxy::start_with(|cfg| {
        let mut r = toml_edit::Table::new();
        r["read_percent"] = toml_edit::value(100.0);
        r["target_timeout_ms"] = toml_edit::value(500);
        cfg["routing"] = toml_edit::Item::Table(r);
        cfg["target"]["keepalive_s"] = toml_edit::value(2);
        let mut f = toml_edit::Table::new();
        f["window_s"] = toml_edit::value(WINDOW_S as i64);
        f["min_samples"] = toml_edit::value(20);
        f["check_interval_ms"] = toml_edit::value(CHECK_INTERVAL_MS as i64);
        f["cooldown_s"] = toml_edit::value(COOLDOWN_S as i64);
        f["step_s"] = toml_edit::value(STEP_S as i64);
        f["probe_percent"] = toml_edit::value(PROBE_PERCENT);
        // Not the rule under test, and on a loaded 2-core machine routed
        // reads can be 3x slower than the source's.
        f["max_p95_ratio"] = toml_edit::value(0.0);
        cfg["failback"] = toml_edit::Item::Table(f);
    });
    let db = "fb_down";
    pgbench_db_on_both(&c, db);
    let load = Load::start(&p, db, &["-S", "-M", "prepared", "-c", "8", "-j", "2"]);
    let reads = || p.stat("/metrics/routing/target/reads");
    p.wait_for(60, "reads served by the target", |_| reads() > 200);

    let out = pg_ctl(&c, "target", &["-m", "fast", "-w", "-t", "60", "stop"]);
    assert!(out.status.success(), "{out:?}");
    // Generous deadlines from the configuration (three times the nominal
    // time and 10 s more; see tests/failback.rs, `trip_within`): the
    // checks are refused at once, a window of failed reads then a tick and
    // the hold would do too.
    let nominal_trip = (Duration::from_millis(3 * CHECK_INTERVAL_MS)
        + Duration::from_secs_f64(WINDOW_S as f64 * 1.1))
        + TICK * (1 + SUSTAIN_TICKS);
    p.wait_for((nominal_trip * 3).as_secs() + 10, "a failback trip", |p| {
        p.status()["failback"]["state"] == "tripped"
    });
    // Down for a while (this only makes the outage longer).
    std::thread::sleep(Duration::from_secs(3));
    let out = pg_ctl(&c, "target", &["-w", "-t", "120", "start"]);
    assert!(out.status.success(), "{out:?}");

    // Nominally a cooldown, then probe, 20%, 40%, 80% and recovery a step
    // apart; room here for all that twice (a ramp that trips again starts
    // over) and a window.
    let nominal_ramp = Duration::from_secs(2 * (COOLDOWN_S + 5 * STEP_S) + WINDOW_S);
    p.wait_for(
        (nominal_ramp * 3).as_secs() + 10,
        "the share back at 100%",
        |p| {
            let st = p.status();
            st["failback"]["state"] == "healthy"
                && st["routing"]["effective_percent"].as_f64() == Some(100.0)
        },
    );
    let before = reads();
    p.wait_for(60, "reads on the target again", |_| reads() > before + 100);
    load.finish();

    // The audit log tells the story: a trip, then probe steps with a rising
    // share (a step that tripped again starts over), then recovery.
    let steps: Vec<serde_json::Value> = p
        .audit_entries()
        .into_iter()
        .filter(|e| {
            e["kind"]
                .as_str()
                .is_some_and(|k| k.starts_with("failback_"))
        })
        .collect();
    let kinds: Vec<&str> = steps.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"failback_trip"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"failback_recovered"), "{kinds:?}");
    let last_trip = kinds.iter().rposition(|k| *k == "failback_trip").unwrap();
    let ramp: Vec<f64> = steps[last_trip + 1..]
        .iter()
        .filter(|e| e["kind"] != "failback_recovered")
        .map(|e| e["percent"].as_f64().unwrap())
        .collect();
    assert_eq!(ramp, [PROBE_PERCENT, 20.0, 40.0, 80.0], "{kinds:?}");
    assert_eq!(kinds[last_trip + 1], "failback_probe");
    eprintln!("failback story: {kinds:?}");
}
