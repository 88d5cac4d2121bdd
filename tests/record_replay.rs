//! Recording sessions through the proxy and replaying them (`[record]`,
//! `pgshift replay`), on the real clusters.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

/// `pgshift replay` with these arguments.
/// `pgshift replay`, bounded: a replay that has not ended after two
/// minutes (every replay here is seconds long, `--duration` included) is
/// killed and the test fails with what it printed, instead of hanging.
fn replay(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgshift"));
    cmd.arg("replay").args(args);
    output_within(&mut cmd, std::time::Duration::from_secs(120))
}

/// A replay that must succeed; its `--json` report.
#[track_caller]
fn replay_json(input: &Path, url: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![input.to_str().unwrap(), "--url", url, "--json"];
    args.extend_from_slice(extra);
    let out = replay(&args);
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "replay report is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn segments(base: &Path) -> Vec<PathBuf> {
    let dir = base.parent().unwrap();
    let name = base.file_name().unwrap().to_str().unwrap().to_string();
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{name}.")))
        })
        .collect();
    v.sort();
    v
}

/// A proxy recording to `cap` (no target links: recording needs none).
fn recording_proxy(cap: &Path, edit: impl FnOnce(&mut toml_edit::DocumentMut)) -> Proxy {
    let cap = cap.to_str().unwrap().to_string();
    Proxy::start_with(move |c| {
        c["target"]["session_links"] = toml_edit::value(false);
        c["record"]["path"] = toml_edit::value(cap);
        edit(c);
    })
}

/// The check: TPC-B recorded through the proxy, in all three
/// protocol modes, replayed directly against a copy of the database taken
/// before the run, leaves the same tables (history without mtime). The
/// capture rotates (1 MiB segments), so sessions span segments.
#[test]
fn recorded_pgbench_replays_to_the_same_tables() {
    let c = Clusters::get();
    let (db, copy) = ("rr_pgbench", "rr_pgbench_copy");
    pgbench_db_on_source(&c, db, Some(copy));
    let before = pgbench_state(&c, db);

    let work = tempfile::tempdir().unwrap();
    let cap = work.path().join("tpcb.pgcap");
    let mut p = recording_proxy(&cap, |c| {
        c["record"]["max_file_bytes"] = toml_edit::value(1_i64 << 20);
    });
    for (mode, secs, clients) in [
        ("prepared", "4", "4"),
        ("simple", "3", "3"),
        ("extended", "3", "2"),
    ] {
        pgbench_cmd(
            &p,
            SUPERUSER,
            db,
            &["-n", "-M", mode, "-T", secs, "-c", clients, "-j", "2"],
        )
        .background()
        .pgbench_ok();
    }
    let st = p.status();
    let rec = &st["record"]["current"];
    assert_eq!(st["record"]["recording"], true, "{st:#}");
    assert!(rec["sessions"].as_u64().unwrap() >= 9, "{rec:#}");
    assert_eq!(rec["dropped_runs"], 0, "{rec:#}");
    assert_eq!(rec["sessions_incomplete"], 0, "{rec:#}");
    assert!(
        rec["segment"].as_u64().unwrap() >= 2,
        "no rotation: {rec:#}"
    );
    // Stopping the proxy finishes the capture.
    p.signal("TERM");
    assert_eq!(p.wait_exit(30), Some(0));
    let segs = segments(&cap);
    assert!(segs.len() >= 2, "{segs:?}");
    let after = pgbench_state(&c, db);
    assert_ne!(before, after, "the recorded run changed nothing");

    let url = format!("postgres://{SUPERUSER}@{}:{}/{copy}", c.host, c.source_port);
    let report = replay_json(&cap, &url, &["--speed", "max"]);
    assert_replay_complete(&report);
    assert!(report["statements"].as_u64().unwrap() > 1000, "{report:#}");
    assert_eq!(
        pgbench_state(&c, copy),
        after,
        "replayed tables differ from the recorded run's"
    );
}

/// Passwords never reach the capture (a SCRAM login through the proxy),
/// and with `redact_parameters` neither do bind parameter values; a
/// redacted capture still replays (its parameters are NULL).
#[test]
fn passwords_and_redacted_parameters_stay_out_of_the_capture() {
    let c = Clusters::get();
    c.fresh_db("rr_redact");
    let work = tempfile::tempdir().unwrap();
    let secret = "param-value-7f3a91";
    let run = |cap: &Path, redact: bool| -> Vec<u8> {
        let mut p = recording_proxy(cap, |c| {
            c["record"]["redact_parameters"] = toml_edit::value(redact);
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut cfg = p.pg_config("pgshift_scram", "rr_redact");
            cfg.password("scram-secret");
            let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
            let conn = tokio::spawn(conn);
            let row = client
                .query_one("SELECT $1::text AS v", &[&secret])
                .await
                .unwrap();
            assert_eq!(row.get::<_, String>(0), secret);
            drop(client);
            let _ = conn.await;
        });
        p.signal("TERM");
        assert_eq!(p.wait_exit(30), Some(0));
        segments(cap)
            .iter()
            .flat_map(|s| std::fs::read(s).unwrap())
            .collect()
    };
    let contains =
        |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());

    let plain = run(&work.path().join("plain"), false);
    assert!(
        contains(&plain, "SELECT $1::text"),
        "the statement is recorded"
    );
    assert!(
        contains(&plain, secret),
        "without redaction the parameter is recorded"
    );
    assert!(!contains(&plain, "scram-secret"), "a password was recorded");
    assert!(
        !contains(&plain, "SCRAM-SHA-256"),
        "a SASL exchange was recorded"
    );

    let redacted = run(&work.path().join("redacted"), true);
    assert!(contains(&redacted, "SELECT $1::text"));
    assert!(
        !contains(&redacted, secret),
        "a redacted parameter was recorded"
    );
    assert!(!contains(&redacted, "scram-secret"));

    let url = format!(
        "postgres://pgshift_scram:scram-secret@{}:{}/rr_redact",
        c.host, c.source_port
    );
    let report = replay_json(&work.path().join("redacted"), &url, &["--speed", "max"]);
    assert_eq!(report["meta"]["redacted"], true, "{report:#}");
    assert_eq!(report["errors_total"], 0, "{report:#}");
    assert_eq!(report["sessions"]["started"], 1, "{report:#}");
}

/// `[record]` switches live: on from a reload, off again (the capture is
/// finished), and a second start at the same path is refused (recordings
/// never overwrite) and shown in status and the audit log. A bad value is
/// rejected with key and line and the recording in force stays.
#[test]
fn recording_switches_live_and_never_overwrites() {
    let c = Clusters::get();
    c.fresh_db("rr_live");
    let work = tempfile::tempdir().unwrap();
    let cap = work.path().join("live");
    let p = Proxy::start_with(|c| {
        c["target"]["session_links"] = toml_edit::value(false);
    });
    let cfg_path = p.dir.path().join("proxy.toml");
    let base = std::fs::read_to_string(&cfg_path).unwrap();
    let write_cfg = |extra: &str| std::fs::write(&cfg_path, format!("{base}\n{extra}")).unwrap();
    let url = p.url(SUPERUSER, "rr_live");
    assert_eq!(p.status()["record"]["recording"], false);

    write_cfg(&format!("[record]\npath = \"{}\"\n", cap.display()));
    p.signal("HUP");
    p.wait_for(60, "recording on", |p| {
        p.status()["record"]["recording"] == true
    });
    psql_ok(
        &url,
        &[
            "-c",
            "CREATE TABLE t (v int)",
            "-c",
            "INSERT INTO t VALUES (1), (2)",
        ],
        None,
    );
    p.wait_for(60, "the session recorded", |p| {
        p.status()["record"]["current"]["messages"].as_u64() >= Some(2)
    });

    // A bad value: rejected with key and line; the recording stays on.
    write_cfg(&format!(
        "[record]\npath = \"{}\"\nmax_file_bytes = 5\n",
        cap.display()
    ));
    p.signal("HUP");
    p.wait_for(60, "the rejection", |p| {
        !p.status()["config"]["last_rejection"].is_null()
    });
    let st = p.status();
    let rej = &st["config"]["last_rejection"];
    assert_eq!(rej["key"], "record.max_file_bytes", "{rej:#}");
    assert!(rej["line"].as_u64().is_some(), "{rej:#}");
    assert_eq!(st["record"]["recording"], true);

    // Off: the capture is finished and replays.
    write_cfg("");
    p.signal("HUP");
    p.wait_for(60, "recording off and finished", |p| {
        let s = p.status();
        s["record"]["recording"] == false && s["record"]["last"]["finished"] == true
    });
    c.sql(c.source_port, "rr_live", "DROP TABLE t");
    let report = replay_json(
        &cap,
        &format!(
            "postgres://{SUPERUSER}@{}:{}/rr_live",
            c.host, c.source_port
        ),
        &["--speed", "max"],
    );
    assert_eq!(report["errors_total"], 0, "{report:#}");
    assert_eq!(c.sql(c.source_port, "rr_live", "SELECT sum(v) FROM t"), "3");

    // On again at the same path: refused, said in status and the audit log.
    write_cfg(&format!("[record]\npath = \"{}\"\n", cap.display()));
    p.signal("HUP");
    p.wait_for(60, "the start error", |p| {
        p.status()["record"]["start_error"].is_string()
    });
    let st = p.status();
    assert!(
        st["record"]["start_error"]
            .as_str()
            .unwrap()
            .contains("never overwrites"),
        "{st:#}"
    );
    assert!(p
        .audit_entries()
        .iter()
        .any(|e| e["kind"] == "record_not_started"));
    assert!(p
        .audit_entries()
        .iter()
        .any(|e| e["kind"] == "config_reload" && e["changes"].to_string().contains("\"record\"")));
}

/// A recording that cannot keep up never slows or breaks the client: with
/// the smallest buffer, a 20 MB COPY through the proxy succeeds, the
/// session's recording stops (counted, shown in status), and what was
/// recorded ends marked incomplete and still reads.
#[test]
fn a_full_buffer_drops_recording_not_the_client() {
    let c = Clusters::get();
    c.fresh_db("rr_full");
    let work = tempfile::tempdir().unwrap();
    let cap = work.path().join("full");
    let mut p = recording_proxy(&cap, |c| {
        c["record"]["buffer_bytes"] = toml_edit::value(1_i64 << 20);
    });
    let url = p.url(SUPERUSER, "rr_full");
    psql_ok(&url, &["-c", "CREATE TABLE big (id int, pad text)"], None);
    let mut data = Vec::new();
    for i in 0..200_000 {
        data.extend_from_slice(format!("{i}\t{}\n", "x".repeat(90)).as_bytes());
    }
    psql_ok(&url, &["-c", "\\copy big FROM STDIN"], Some(&data));
    assert_eq!(
        c.sql(c.source_port, "rr_full", "SELECT count(*) FROM big"),
        "200000"
    );
    let st = p.status();
    let rec = &st["record"]["current"];
    assert!(rec["dropped_runs"].as_u64().unwrap() >= 1, "{rec:#}");
    assert!(rec["sessions_incomplete"].as_u64().unwrap() >= 1, "{rec:#}");
    assert_eq!(
        st["record"]["recording"], true,
        "recording goes on for other sessions"
    );
    let metrics = http_get(p.admin_port, "/metrics", None).1;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("pgshift_record_dropped_runs_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    p.signal("TERM");
    assert_eq!(p.wait_exit(30), Some(0));
    let check = replay(&[
        cap.to_str().unwrap(),
        "--url",
        "postgres://nobody@127.0.0.1:1/x",
        "--sessions",
        "0",
        "--json",
    ]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    // The capture with its dropped runs reads to its end as a valid one:
    // a report, nothing replayed (so nothing tried the unreachable URL).
    let report: serde_json::Value = serde_json::from_slice(&check.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&check.stdout)));
    assert_eq!(report["errors_total"], 0, "{report:#}");
    assert_eq!(report["sessions"]["started"], 0, "{report:#}");
    assert_eq!(report["sessions"]["failed_to_connect"], 0, "{report:#}");
}

/// A truncated or corrupt capture is rejected with an error naming the
/// file and the offset, before anything is replayed; so is a file that is
/// not a capture.
#[test]
fn truncated_or_corrupt_captures_are_rejected_with_the_offset() {
    let c = Clusters::get();
    c.fresh_db("rr_corrupt");
    let work = tempfile::tempdir().unwrap();
    let cap = work.path().join("good");
    let mut p = recording_proxy(&cap, |_| {});
    let url = p.url(SUPERUSER, "rr_corrupt");
    psql_ok(&url, &["-c", "CREATE TABLE t (v int)"], None);
    psql_ok(&url, &["-c", "INSERT INTO t VALUES (1)"], None);
    p.signal("TERM");
    assert_eq!(p.wait_exit(30), Some(0));
    let good = std::fs::read(&segments(&cap)[0]).unwrap();
    let target = format!(
        "postgres://{SUPERUSER}@{}:{}/rr_corrupt",
        c.host, c.source_port
    );
    let count = || c.sql(c.source_port, "rr_corrupt", "SELECT count(*) FROM t");

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            good[..good.len() - 3].to_vec(),
            "truncated at offset",
        ),
        (
            "corrupt",
            {
                let mut b = good.clone();
                let i = b.len() - 20;
                b[i] ^= 0x55;
                b
            },
            "corrupt record at offset",
        ),
        ("header", good[..12].to_vec(), "truncated at offset 12"),
        (
            "foreign",
            b"PGDMP\x01\x0e\x00 not ours".to_vec(),
            "not a pgshift capture",
        ),
    ];
    for (name, bytes, want) in cases {
        let f = work.path().join(format!("{name}.000001"));
        std::fs::write(&f, &bytes).unwrap();
        let out = replay(&[f.to_str().unwrap(), "--url", &target, "--speed", "max"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(want), "{name}: {err}");
        assert!(
            err.contains(f.to_str().unwrap()),
            "{name}: the file is named: {err}"
        );
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert_eq!(
            count(),
            "1",
            "{name}: something was replayed from a bad file"
        );
    }
    // The good capture itself replays (inserting one more row).
    c.sql(c.source_port, "rr_corrupt", "DROP TABLE t");
    let report = replay_json(&cap, &target, &["--speed", "max"]);
    assert_eq!(report["errors_total"], 0, "{report:#}");
    assert_eq!(count(), "1");
}

/// Pointed at pgshift, a replay is live traffic: a recorded TPC-B and
/// select-only capture replayed through a proxy with mirroring, 50% read
/// routing and every eligible read shadowed leaves the target equal to the
/// source, and its reads are routed and compared with no confirmed
/// mismatch.
#[test]
fn a_replay_through_pgshift_is_mirrored_routed_and_shadowed() {
    use common::mirror::*;
    let c = Clusters::get();
    let work = tempfile::tempdir().unwrap();

    // Record somewhere else: a plain recording proxy over its own database.
    pgbench_db_on_source(&c, "rr_through_rec", None);
    let cap = work.path().join("cap");
    let mut rec = recording_proxy(&cap, |_| {});
    for args in [["-M", "prepared", "-T", "3"], ["-M", "simple", "-T", "2"]] {
        let mut a = vec!["-n", "-c", "2", "-j", "2"];
        a.extend_from_slice(&args);
        pgbench_cmd(&rec, SUPERUSER, "rr_through_rec", &a)
            .background()
            .pgbench_ok();
    }
    pgbench_cmd(
        &rec,
        SUPERUSER,
        "rr_through_rec",
        &["-n", "-S", "-M", "simple", "-T", "2", "-c", "2"],
    )
    .background()
    .pgbench_ok();
    rec.signal("TERM");
    assert_eq!(rec.wait_exit(30), Some(0));

    // Replay through a mirroring, routing, shadowing proxy over a database
    // with the same pgbench data on both clusters.
    pgbench_db_on_both(&c, "rr_through");
    let spool = work.path().join("spool");
    let p = Proxy::start_with(|cfg| {
        mirror_config(cfg, &spool);
        cfg["routing"]["read_percent"] = toml_edit::value(50.0);
        cfg["shadow"]["sample_percent"] = toml_edit::value(100.0);
        // Failback has its own tests; here a slow moment must not change
        // where reads go.
        cfg["failback"]["enabled"] = toml_edit::value(false);
    });
    let url = format!("postgres://{SUPERUSER}@127.0.0.1:{}/rr_through", p.port);
    let report = replay_json(&cap, &url, &["--speed", "max"]);
    assert_eq!(report["errors_total"], 0, "{report:#}");
    assert_eq!(report["sessions"]["lost"], 0, "{report:#}");
    assert_eq!(
        report["statements"], report["meta"]["recorded_statements"],
        "{report:#}"
    );
    p.wait_mirror_drained(120);
    assert_pgbench_tables_same(&c, "rr_through");
    assert!(
        p.stat("/metrics/routing/target/reads") > 0,
        "no read was routed"
    );
    p.wait_for(60, "shadow reads compared", |p| {
        let (_, body) = p.admin_get("/mismatches");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["counts"]["compared"]["match"].as_u64() > Some(100)
    });
    let (_, body) = p.admin_get("/mismatches");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["counts"]["compared"]["mismatch_confirmed"], 0, "{v:#}");
}

/// `--loop` starts the capture over (a pass at a time) and `--duration`
/// ends a replay early, whether it is still dispatching or its sessions
/// are still working through what they were sent.
#[test]
fn loop_and_duration_bound_a_replay() {
    let c = Clusters::get();
    pgbench_db_on_source(&c, "rr_loop", None);
    let work = tempfile::tempdir().unwrap();
    let cap = work.path().join("loop");
    let mut p = recording_proxy(&cap, |_| {});
    pgbench_cmd(
        &p,
        SUPERUSER,
        "rr_loop",
        &["-n", "-S", "-T", "3", "-c", "2"],
    )
    .background()
    .pgbench_ok();
    p.signal("TERM");
    assert_eq!(p.wait_exit(30), Some(0));
    let url = format!(
        "postgres://{SUPERUSER}@{}:{}/rr_loop",
        c.host, c.source_port
    );

    // At the recorded pace, one second of a three-second capture.
    let cut = replay_json(&cap, &url, &["--duration", "1s"]);
    assert_eq!(cut["errors_total"], 0, "{cut:#}");
    assert_eq!(cut["sessions"]["lost"], 0, "{cut:#}");
    assert_eq!(cut["sessions"]["cut"], 0, "{cut:#}");
    let (done, all) = (
        cut["statements"].as_u64().unwrap(),
        cut["meta"]["recorded_statements"].as_u64().unwrap(),
    );
    assert!(done > 0 && done < all, "{done} of {all}: {cut:#}");

    // As fast as possible, over and over, for a while.
    let looped = replay_json(
        &cap,
        &url,
        &["--speed", "max", "--loop", "--duration", "6s"],
    );
    assert_eq!(looped["errors_total"], 0, "{looped:#}");
    assert_eq!(looped["sessions"]["lost"], 0, "{looped:#}");
    // Every session ended by itself within the grace after --duration.
    assert_eq!(looped["sessions"]["cut"], 0, "{looped:#}");
    let passes = looped["meta"]["passes"].as_u64().unwrap();
    assert!(passes >= 2, "{looped:#}");
    let per_pass = looped["meta"]["sessions"].as_u64().unwrap();
    assert!(
        looped["sessions"]["started"].as_u64().unwrap() > per_pass,
        "later passes started sessions: {looped:#}"
    );
}

/// `--duration` bounds a replay even when a session's request never gets
/// its answer: a recorded read replayed while a table lock blocks it is
/// cut once the duration and its grace have run out, and the report says
/// so (it does not wait for the lock, or forever).
#[test]
fn a_session_the_server_never_answers_is_cut_after_the_duration() {
    use std::io::Write;
    let c = Clusters::get();
    c.fresh_db("rr_cut");
    c.sql(c.source_port, "rr_cut", "CREATE TABLE t (v int)");
    let work = tempfile::tempdir().unwrap();
    let cap = work.path().join("cut");
    let mut p = recording_proxy(&cap, |_| {});
    psql_ok(
        &p.url(SUPERUSER, "rr_cut"),
        &["-c", "SELECT count(*) FROM t"],
        None,
    );
    p.signal("TERM");
    assert_eq!(p.wait_exit(30), Some(0));

    // A session on the source holds the table's lock until its input ends.
    let mut holder = Command::new("psql")
        .arg(format!(
            "host={} port={} user={SUPERUSER} dbname=rr_cut",
            c.host, c.source_port
        ))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut input = holder.stdin.take().unwrap();
    input
        .write_all(b"BEGIN;\nLOCK TABLE t IN ACCESS EXCLUSIVE MODE;\n")
        .unwrap();
    input.flush().unwrap();
    let locked = || {
        c.sql(
            c.source_port,
            "rr_cut",
            "SELECT count(*) FROM pg_locks l JOIN pg_class r ON r.oid = l.relation \
             WHERE r.relname = 't' AND l.mode = 'AccessExclusiveLock' AND l.granted",
        ) == "1"
    };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !locked() {
        assert!(
            std::time::Instant::now() < until,
            "the lock was never taken"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let url = format!("postgres://{SUPERUSER}@{}:{}/rr_cut", c.host, c.source_port);
    let report = replay_json(&cap, &url, &["--speed", "max", "--duration", "1s"]);
    drop(input);
    let _ = holder.wait();
    assert_eq!(report["sessions"]["started"], 1, "{report:#}");
    assert_eq!(report["sessions"]["cut"], 1, "{report:#}");
    assert_eq!(report["statements"], 0, "{report:#}");
}
