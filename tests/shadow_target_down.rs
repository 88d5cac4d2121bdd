//! Shadow reads against a target that hangs (SIGSTOP: connections are
//! accepted by the kernel, nothing answers). The clients' reads are served
//! by the source as always and never wait for the shadow side; the shadow
//! reads time out and are counted. This pauses the shared target cluster,
//! so it is the only test in its binary.
mod common;
use common::*;

fn skipped(p: &Proxy, reason: &str) -> i64 {
    p.stat(&format!("/metrics/shadow/skipped/{reason}"))
}

#[test]
fn a_hung_target_times_shadow_reads_out_and_clients_do_not_wait() {
    let c = Clusters::get();
    let _guard = ClusterGuard::new(&c, "target");
    let p = Proxy::start_with(|cfg| {
        let mut t = toml_edit::Table::new();
        t["sample_percent"] = toml_edit::value(100.0);
        t["timeout_ms"] = toml_edit::value(300);
        t["max_inflight"] = toml_edit::value(4);
        t["queue"] = toml_edit::value(16);
        cfg["shadow"] = toml_edit::Item::Table(t);
    });
    let db = "shadow_down";
    pgbench_db_on_both(&c, db);
    let run = |secs: &str| {
        let out = pgbench_cmd(&p, SUPERUSER, db, &["-S", "-c", "2", "-T", secs, "-n"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("number of failed transactions: 0 "), "{text}");
        text
    };
    // Healthy first: shadow reads compare.
    run("2");
    p.wait_for(60, "matched shadow reads", |p| {
        p.stat("/metrics/shadow/compared/match") > 0
    });
    let timeouts = skipped(&p, "timeout");
    let full = skipped(&p, "queue_full");
    let text = {
        let _paused = Paused::target(&c);
        let text = run("5");
        // Still paused: what was queued times out.
        p.wait_for(60, "shadow reads timed out", |p| {
            skipped(p, "timeout") > timeouts
        });
        text
    };
    eprintln!("{text}");
    // More reads were sampled than could wait: the rest were skipped at
    // once, never queued without limit.
    assert!(
        skipped(&p, "queue_full") > full,
        "{:#}",
        p.status()["metrics"]["shadow"]
    );
    // What was queued drains within its timeouts.
    p.wait_for(60, "the shadow queue drained", |p| {
        p.stat("/metrics/shadow/queued") == 0 && p.stat("/metrics/shadow/inflight") == 0
    });
    // The target answers again and shadow reads compare again.
    let matched = p.stat("/metrics/shadow/compared/match");
    p.wait_for(30, "shadow reads matching again", |p| {
        run("1");
        p.stat("/metrics/shadow/compared/match") > matched
    });
}
