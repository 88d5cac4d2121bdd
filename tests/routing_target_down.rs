//! Routed reads when the target fails: stopped (connections refused and
//! cut) and paused (SIGSTOP: nothing answers). Clients see no error; every
//! read that could not run on the target ran on the source and was
//! counted. This stops the shared target cluster, so it is the only test
//! in its binary (cargo runs test binaries one after another).
mod common;
use common::*;

use std::process::Command;
use std::time::{Duration, Instant};

fn report(out: std::process::Output) -> String {
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pgbench failed:\n{text}");
    assert!(
        text.contains("number of failed transactions: 0 "),
        "pgbench had failures:\n{text}"
    );
    text
}

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
    .output_async();
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
    let text = report(load.wait());
    let st = p.status();
    let r = &st["metrics"]["routing"];
    let fallbacks: u64 = ["connection", "timeout", "server_error", "setup"]
        .iter()
        .map(|k| r["fallbacks"][k].as_u64().unwrap())
        .sum();
    assert!(fallbacks > 0, "no fallback counted: {r:#}\n{text}");
    assert!(
        r["source"]["reads"].as_u64().unwrap() > 0 || fallbacks > 0,
        "{r:#}"
    );
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
    .output_async();
    std::thread::sleep(Duration::from_secs(3));
    let timeouts = p.stat("/metrics/routing/fallbacks/timeout");
    {
        let _paused = Paused::target(&c);
        std::thread::sleep(Duration::from_secs(4));
    }
    report(load.wait());
    assert!(
        p.stat("/metrics/routing/fallbacks/timeout") > timeouts,
        "{:#}",
        p.status()["metrics"]["routing"]
    );
}

/// A child process whose output is collected when it ends.
trait OutputAsync {
    fn output_async(&mut self) -> Pending;
}

struct Pending(std::process::Child);

impl Pending {
    fn wait(self) -> std::process::Output {
        self.0.wait_with_output().unwrap()
    }
}

impl OutputAsync for Command {
    fn output_async(&mut self) -> Pending {
        Pending(
            self.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }
}
