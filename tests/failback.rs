//! The health monitor and automatic failback on real clusters, with faults
//! from a TCP relay the tests control between the proxy and the target
//! (added latency, stalled connections, refused connections) and from the
//! target itself (a table dropped there):
//!
//! - 50 ms added latency trips the p95 rule; once the trip is in force no
//!   read is sent to the target (at most the reads already under way end
//!   there), and the audit entry carries p95 and threshold;
//! - a table dropped on the target trips the error-rate rule, with no
//!   client error and the source untouched;
//! - per-fingerprint mode fails back only the failing query shape;
//! - a stalled target stays failed back under `recovery = "manual"` until
//!   `pgshift ctl resume`;
//! - a target refusing connections trips the health-check rule with no
//!   traffic at all, and recovers by itself;
//! - `[failback]` keys change live from the file; a bad value is rejected
//!   with its key and line and the running value stays.
//!
//! The target stopped for real is in `failback_target_down.rs`, the
//! healthy minute with default thresholds in `failback_healthy.rs` (alone
//! in its binary: the set-up of the tests here, creating and loading
//! databases, stalls the shared clusters for seconds now and then, and the
//! monitor rightly reacts to that).
//!
//! No test here bounds how soon something happens except by a generous
//! deadline derived from the configuration (`trip_within`), and the loads
//! run until the test is done with them (`Load`), not for a fixed time.
mod common;
use common::relay::Relay;
use common::*;

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgshift::health::monitor::{SUSTAIN_TICKS, TICK};

/// `failback.window_s` in these tests.
const WINDOW_S: u64 = 5;
/// `failback.check_interval_ms` in these tests, unless a test sets it.
const CHECK_INTERVAL_MS: u64 = 300;
/// The default `failback.check_timeout_ms`.
const CHECK_TIMEOUT_MS: u64 = 3_000;
/// The default `failback.check_failures`.
const CHECK_FAILURES: u64 = 3;

/// A deadline for a trip once the target fails. Nominally the bad samples
/// may need a whole window to cross a threshold (the window covers up to
/// 1.1 `window_s` as its slices age out), then a tick, then the hold
/// (`SUSTAIN_TICKS` ticks, and `min_samples` more samples, which these
/// loads bring within it); or, for the health-check rule, `check_failures`
/// checks that each fail within `check_interval_ms + check_timeout_ms`.
/// The deadline is three times the longer of the two and 10 s more: a
/// stalled machine makes everything slower, and only an upper bound that
/// is never reached by a working monitor keeps the test deterministic.
fn trip_within(check_interval_ms: u64) -> Duration {
    let window = Duration::from_secs_f64(WINDOW_S as f64 * 1.1) + TICK * (1 + SUSTAIN_TICKS);
    let checks =
        Duration::from_millis(CHECK_FAILURES * (check_interval_ms + CHECK_TIMEOUT_MS)) + TICK;
    window.max(checks) * 3 + Duration::from_secs(10)
}

/// pgbench through the proxy in runs of `RUN_S` seconds, one after the
/// other until `finish`: the load lasts as long as the test needs it,
/// however slow the machine, and every run must end without a failed
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

fn target_addr(c: &Clusters) -> std::net::SocketAddr {
    format!("{}:{}", c.host, c.target_port).parse().unwrap()
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// `[routing]` at `read_percent`, and `[failback]` with quick windows for
/// tests plus `extra` keys.
fn configure(
    cfg: &mut toml_edit::DocumentMut,
    read_percent: f64,
    extra: &[(&str, toml_edit::Value)],
) {
    let mut r = toml_edit::Table::new();
    r["read_percent"] = toml_edit::value(read_percent);
    cfg["routing"] = toml_edit::Item::Table(r);
    let mut f = toml_edit::Table::new();
    f["window_s"] = toml_edit::value(WINDOW_S as i64);
    f["min_samples"] = toml_edit::value(20);
    f["check_interval_ms"] = toml_edit::value(CHECK_INTERVAL_MS as i64);
    for (k, v) in extra {
        f[*k] = toml_edit::Item::Value(v.clone());
    }
    cfg["failback"] = toml_edit::Item::Table(f);
}

/// A proxy whose target is behind a relay the test controls.
fn behind_relay(
    read_percent: f64,
    extra: &[(&str, toml_edit::Value)],
    edit: impl FnOnce(&mut toml_edit::DocumentMut),
) -> (Relay, Proxy) {
    let relay = Relay::start(target_addr(&Clusters::get()));
    let rp = relay.port();
    let p = Proxy::start_with(|cfg| {
        cfg["target"]["port"] = toml_edit::value(rp as i64);
        configure(cfg, read_percent, extra);
        edit(cfg);
    });
    (relay, p)
}

fn failback(p: &Proxy) -> serde_json::Value {
    p.status()["failback"].clone()
}

fn target_reads(p: &Proxy) -> i64 {
    p.stat("/metrics/routing/target/reads")
}

fn source_reads(p: &Proxy) -> i64 {
    p.stat("/metrics/routing/source/reads")
}

/// The audit entries of these kinds, oldest first.
fn audited(p: &Proxy, kinds: &[&str]) -> Vec<serde_json::Value> {
    p.audit_entries()
        .into_iter()
        .filter(|e| kinds.iter().any(|k| e["kind"] == *k))
        .collect()
}

#[track_caller]
fn wait_tripped(p: &Proxy, within: Duration) -> serde_json::Value {
    p.wait_for(within.as_secs() + 1, "a failback trip", |p| {
        failback(p)["state"] == "tripped"
    });
    let trips = audited(p, &["failback_trip"]);
    assert!(!trips.is_empty(), "tripped without an audit entry");
    trips[0].clone()
}

#[test]
fn added_latency_trips_the_p95_rule_and_reads_leave_the_target() {
    let c = Clusters::get();
    let (relay, p) = behind_relay(
        50.0,
        &[
            ("max_p95_ms", 25.0.into()),
            // Only the absolute rule, so the trip is attributable.
            ("max_p95_ratio", 0.0.into()),
            ("max_error_rate", 0.0.into()),
            ("check_failures", 0.into()),
            ("recovery", "manual".into()),
        ],
        |_| {},
    );
    let db = "fb_latency";
    pgbench_db_on_both(&c, db);
    const CLIENTS: i64 = 8;
    let load = Load::start(
        &p,
        db,
        &[
            "-S",
            "-M",
            "prepared",
            "-c",
            &CLIENTS.to_string(),
            "-j",
            "2",
        ],
    );
    p.wait_for(60, "reads served by the target", |p| target_reads(p) > 200);
    assert_eq!(failback(&p)["state"], "healthy", "{:#}", failback(&p));

    relay.set_delay(Duration::from_millis(50));
    let delayed_at = now_us();
    let within = trip_within(CHECK_INTERVAL_MS);
    let trip = wait_tripped(&p, within);
    // Counted from here, when the cap is in force (the state says tripped
    // once the trip is applied).
    let at_trip = target_reads(&p);
    assert_eq!(trip["rule"], "p95", "{trip:#}");
    let measured = trip["measured"].as_f64().unwrap();
    assert!(measured >= 45.0, "p95 measured {measured} ms: {trip:#}");
    assert_eq!(trip["threshold"].as_f64(), Some(25.0), "{trip:#}");
    assert_eq!(trip["unit"], "ms");
    assert_eq!(trip["scope"], "all reads");
    assert_eq!(
        trip["new"]["effective_percent"].as_f64(),
        Some(0.0),
        "{trip:#}"
    );
    assert_eq!(
        trip["new"]["read_percent"].as_f64(),
        Some(50.0),
        "the configured share is kept"
    );
    let trip_us = trip["time_us"].as_i64().unwrap();
    assert!(
        trip_us - delayed_at <= within.as_micros() as i64,
        "tripped {} ms after the delay began, beyond {within:?}: {trip:#}",
        (trip_us - delayed_at) / 1000
    );

    // Once the cap is in force no read is sent to the target: the only
    // target reads still counted are those under way when it landed, at
    // most one per client, however long the load goes on (here: for
    // another 500 reads on the source).
    let source_then = source_reads(&p);
    p.wait_for(60, "more reads on the source", |p| {
        source_reads(p) > source_then + 500
    });
    let after = target_reads(&p) - at_trip;
    assert!(
        after <= CLIENTS,
        "{after} reads reached the target after the trip"
    );
    let status = failback(&p);
    assert_eq!(status["rule"], "p95");
    assert_eq!(
        p.status()["routing"]["effective_percent"].as_f64(),
        Some(0.0)
    );
    let metrics = p.admin_get("/metrics").1;
    assert!(
        metrics.contains("pgshift_failback_trips_total{rule=\"p95\"} 1"),
        "{metrics}"
    );
    load.finish();
}

#[test]
fn a_table_dropped_on_the_target_trips_the_error_rate_rule() {
    let c = Clusters::get();
    // Only the rule under test: the other tests of this binary create
    // databases and load them beside it, which stalls the clusters for
    // seconds now and then (slow reads, slow checks) on this 2-core box.
    let p = Proxy::start_with(|cfg| {
        configure(
            cfg,
            100.0,
            &[
                ("recovery", "manual".into()),
                ("max_p95_ratio", 0.0.into()),
                ("check_failures", 0.into()),
            ],
        )
    });
    let db = "fb_errors";
    pgbench_db_on_both(&c, db);
    let count = "SELECT count(*), sum(abalance) FROM pgbench_accounts";
    let source_before = c.sql(c.source_port, db, count);
    let load = Load::start(&p, db, &["-S", "-M", "extended", "-c", "4", "-j", "2"]);
    p.wait_for(60, "reads served by the target", |p| target_reads(p) > 200);
    c.sql(c.target_port, db, "DROP TABLE pgbench_accounts");
    let trip = wait_tripped(&p, trip_within(CHECK_INTERVAL_MS));
    assert_eq!(trip["rule"], "error_rate", "{trip:#}");
    assert!(trip["measured"].as_f64().unwrap() > 0.05, "{trip:#}");
    assert_eq!(trip["threshold"].as_f64(), Some(0.05));
    let diverged = trip["windows"]["target"]["errors_by"]["diverged"].as_u64();
    assert!(diverged.unwrap_or(0) > 0, "{trip:#}");
    // Every failed read ran on the source instead: no client saw an error.
    load.finish();
    assert!(p.stat("/metrics/routing/fallbacks/query_error") > 0);
    // The source is untouched.
    assert_eq!(c.sql(c.source_port, db, count), source_before);
}

#[test]
fn per_fingerprint_mode_fails_back_only_the_failing_shape() {
    let c = Clusters::get();
    let p = Proxy::start_with(|cfg| {
        configure(
            cfg,
            100.0,
            &[
                ("per_fingerprint", true.into()),
                ("recovery", "manual".into()),
                ("max_p95_ratio", 0.0.into()),
                ("check_failures", 0.into()),
            ],
        )
    });
    let db = "fb_shapes";
    pgbench_db_on_both(&c, db);
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.sql");
    let b = dir.path().join("b.sql");
    std::fs::write(
        &a,
        "\\set aid random(1, 100000)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n",
    )
    .unwrap();
    std::fs::write(&b, "SELECT bbalance FROM pgbench_branches WHERE bid = 1;\n").unwrap();
    let (a, b) = (a.display().to_string(), b.display().to_string());
    let load = Load::start(
        &p,
        db,
        &["-f", &a, "-f", &b, "-M", "prepared", "-c", "4", "-j", "2"],
    );
    p.wait_for(60, "reads served by the target", |p| target_reads(p) > 200);
    c.sql(c.target_port, db, "DROP TABLE pgbench_branches");
    let trip = wait_tripped(&p, trip_within(CHECK_INTERVAL_MS));
    let scope = trip["scope"]
        .as_array()
        .unwrap_or_else(|| panic!("{trip:#}"));
    assert_eq!(scope.len(), 1, "{trip:#}");
    let query = scope[0]["query"].as_str().unwrap();
    assert!(query.contains("pgbench_branches"), "{trip:#}");
    let status = failback(&p);
    // The same shape; the status shows its text with the literals replaced
    // (admin.show_data is off), the audit file on disk shows it whole.
    assert_eq!(
        status["scope"][0]["shape"], trip["scope"][0]["shape"],
        "{status:#}"
    );
    assert_eq!(
        status["scope"].as_array().map(Vec::len),
        Some(1),
        "{status:#}"
    );
    assert_eq!(
        status["scope"][0]["query"], "SELECT bbalance FROM pgbench_branches WHERE bid = $1;",
        "{status:#}"
    );
    let shapes = &p.status()["routing"]["health_limit"]["shapes"];
    assert_eq!(shapes.as_array().map(Vec::len), Some(1), "{shapes}");
    // The other shape keeps its routing.
    // (Links dropped by the failing prepares come back with backoff.)
    let before = target_reads(&p);
    p.wait_for(60, "the other shape's reads on the target", |p| {
        target_reads(p) > before + 50
    });
    assert_eq!(failback(&p)["state"], "tripped");
    load.finish();
}

#[test]
fn a_stalled_target_stays_failed_back_until_ctl_resume() {
    let c = Clusters::get();
    let (relay, p) = behind_relay(
        100.0,
        &[
            ("recovery", "manual".into()),
            // Auto recovery would probe within two seconds.
            ("cooldown_s", 1.into()),
            ("step_s", 1.into()),
        ],
        |cfg| cfg["routing"]["target_timeout_ms"] = toml_edit::value(300),
    );
    let db = "fb_manual";
    pgbench_db_on_both(&c, db);
    let load = Load::start(&p, db, &["-S", "-c", "4", "-j", "2"]);
    p.wait_for(60, "reads served by the target", |p| target_reads(p) > 200);
    relay.set_stall(true);
    let trip = wait_tripped(&p, trip_within(CHECK_INTERVAL_MS));
    relay.set_stall(false);
    // The routed reads in flight timed out and ran on the source; a
    // session whose link timed out stops routing until it is back, so with
    // four clients it is mostly the stalled health checks that trip (or
    // the timeouts' latency, or on a loaded machine routed reads already
    // slower than 3x the source's: any trip will do here).
    assert!(p.stat("/metrics/routing/fallbacks/timeout") > 0);
    assert!(
        ["health_check", "error_rate", "p95_ratio"].contains(&trip["rule"].as_str().unwrap()),
        "{trip:#}"
    );
    assert_eq!(trip["recovery"], "manual");

    // The target is fine again (its checks pass), but nothing comes back
    // by itself.
    p.wait_for(60, "passing checks", |p| {
        failback(p)["checks"]["target"]["failures_in_a_row"] == 0
    });
    let reads = target_reads(&p);
    std::thread::sleep(Duration::from_secs(5));
    let st = failback(&p);
    assert_eq!(st["state"], "tripped", "{st:#}");
    assert!(st["next"].as_str().unwrap().contains("resume"), "{st:#}");
    assert_eq!(target_reads(&p), reads);
    assert!(audited(&p, &["failback_probe", "failback_step"]).is_empty());

    let out = p.ctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("failback: TRIPPED (all reads at 0%")
            && text.contains("next: waiting for resume"),
        "{text}"
    );
    let out = p.ctl(&["resume", "--reason", "target checked by hand"]);
    assert!(out.status.success(), "{out:?}");
    p.wait_for(60, "reads on the target after resume", |p| {
        failback(p)["state"] == "healthy" && target_reads(p) > reads + 50
    });
    let resume = audited(&p, &["resume"]);
    assert_eq!(resume.len(), 1);
    assert_eq!(resume[0]["reason"], "target checked by hand");
    assert_eq!(resume[0]["new"]["effective_percent"].as_f64(), Some(100.0));
    load.finish();
}

#[test]
fn refused_connections_trip_the_health_check_rule_without_traffic() {
    let (relay, p) = behind_relay(
        0.0,
        &[
            ("check_interval_ms", 200.into()),
            ("check_failures", 3.into()),
            ("check_user", SUPERUSER.into()),
            ("check_database", "postgres".into()),
            ("cooldown_s", 1.into()),
            ("step_s", 1.into()),
        ],
        |_| {},
    );
    p.wait_for(60, "passing health checks", |p| {
        let f = failback(p);
        f["checks"]["target"]["ok"].as_u64() > Some(2)
            && f["checks"]["target"]["connect_only"] == false
    });
    let started = Instant::now();
    relay.set_refuse(true);
    relay.cut();
    let trip = wait_tripped(&p, trip_within(200));
    assert_eq!(trip["rule"], "health_check", "{trip:#}");
    assert_eq!(trip["threshold"].as_f64(), Some(3.0));
    let err = failback(&p)["checks"]["target"]["last_error"].clone();
    assert!(err.as_str().is_some_and(|e| !e.is_empty()), "{err}");
    relay.set_refuse(false);
    // Auto recovery: checks pass again, the cooldown passes, the probe
    // steps run (nothing is routed at 0%), and the target is healthy.
    p.wait_for(60, "recovery", |p| failback(p)["state"] == "healthy");
    let kinds: Vec<String> = audited(
        &p,
        &[
            "failback_trip",
            "failback_probe",
            "failback_step",
            "failback_recovered",
        ],
    )
    .iter()
    .map(|e| e["kind"].as_str().unwrap().to_string())
    .collect();
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("failback_trip"),
        "{kinds:?}"
    );
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("failback_recovered"),
        "{kinds:?}"
    );
    assert!(kinds.contains(&"failback_probe".to_string()), "{kinds:?}");
    eprintln!(
        "dead target tripped and recovered in {:?}",
        started.elapsed()
    );
}

#[test]
fn failback_settings_change_live_and_a_bad_value_is_rejected() {
    let p = Proxy::start_with(|cfg| configure(cfg, 0.0, &[]));
    let effective = |p: &Proxy| -> serde_json::Value {
        let (code, body) = p.admin_get("/config");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["config"]["failback"].clone()
    };
    assert_eq!(effective(&p)["min_samples"], 20);
    let cfg_path = p.dir.path().join("proxy.toml");
    let base = std::fs::read_to_string(&cfg_path).unwrap();
    let with = |v: &str| base.replace("min_samples = 20", &format!("min_samples = {v}"));
    assert_ne!(with("30"), base, "the test edits the key");
    std::fs::write(&cfg_path, with("30")).unwrap();
    p.wait_for(60, "the reload", |p| effective(p)["min_samples"] == 30);
    let reload = p
        .audit_entries()
        .into_iter()
        .rev()
        .find(|e| e["kind"] == "config_reload")
        .unwrap();
    assert_eq!(reload["changes"][0]["key"], "failback", "{reload:#}");
    assert_eq!(reload["changes"][0]["old"]["min_samples"], 20);
    assert_eq!(reload["changes"][0]["new"]["min_samples"], 30);

    // Out of range: rejected with its key and line; 30 stays.
    std::fs::write(&cfg_path, with("0")).unwrap();
    p.wait_for(60, "the rejection", |p| {
        p.stat("/config/reloads_rejected") == 1
    });
    let st = p.status();
    assert_eq!(
        st["config"]["last_rejection"]["key"],
        "failback.min_samples"
    );
    let line = with("0")
        .lines()
        .position(|l| l.starts_with("min_samples"))
        .unwrap()
        + 1;
    assert_eq!(st["config"]["last_rejection"]["line"], line as u64);
    assert_eq!(effective(&p)["min_samples"], 30);
}
