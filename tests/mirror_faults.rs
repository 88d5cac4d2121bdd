//! The mirror under faults, with real processes and real disks: SIGKILL of
//! the proxy at random points under load, a spool tail lost to a machine
//! crash, a damaged frame in a closed segment, a full disk (a small tmpfs)
//! under both `on_full` policies, and an apply timeout behind a lock held
//! on the target. Each ends with equal tables or a recorded gap: never a
//! skipped unit, a stall, or a unit applied twice.
mod common;
use common::mirror::*;
use common::relay::Relay;
use common::*;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A proxy mirroring into `spool`, its target behind `relay` when given,
/// with `edit` applied to the `[mirror]` section.
fn proxy(spool: &Path, relay: Option<&Relay>, edit: impl FnOnce(&mut toml_edit::Table)) -> Proxy {
    let spool = spool.to_path_buf();
    let relay_port = relay.map(|r| r.port());
    let mut t = toml_edit::Table::new();
    edit(&mut t);
    Proxy::start_showing_data(move |cfg| {
        mirror_config(cfg, &spool);
        for (k, v) in t.iter() {
            cfg["mirror"][k] = v.clone();
        }
        if let Some(port) = relay_port {
            cfg["target"]["port"] = toml_edit::value(port as i64);
            cfg["failback"]["enabled"] = toml_edit::value(false);
        }
    })
}

fn kill(mut p: Proxy) {
    p.signal("KILL");
    p.wait_exit(10);
}

/// The TPC-B tables equal on both sides (history without mtime).
#[track_caller]
fn assert_tpcb_same(c: &Clusters, db: &str) {
    assert_pgbench_tables_same(c, db);
}

#[test]
fn repeated_sigkill_under_load_leaves_the_tables_equal() {
    let spool = tempfile::tempdir().unwrap();
    let db = "faults_kill";
    let p = proxy(spool.path(), None, |_| {});
    let c = p.clusters.clone();
    c.fresh_db(db);
    pgbench_ok(&p, db, &["-i", "-s", "1", "-q"]);
    p.wait_mirror_drained(60);
    let mut p = Some(p);
    // Kills at varied points, in each protocol mode: a commit is in flight
    // at most of them.
    let waits_ms = [700u64, 1900, 1300, 2600, 900, 1600];
    let modes = ["simple", "extended", "prepared"];
    for (i, wait) in waits_ms.iter().enumerate() {
        let cur = p
            .take()
            .unwrap_or_else(|| proxy(spool.path(), None, |_| {}));
        let load = pgbench_spawn(
            &cur,
            db,
            &["-M", modes[i % 3], "-c", "8", "-j", "2", "-T", "30", "-n"],
        );
        std::thread::sleep(Duration::from_millis(*wait));
        kill(cur);
        let _ = load.wait_with_output();
    }
    // Same spool, new process: units left in doubt are resolved from the
    // source's transaction status.
    let p = proxy(spool.path(), None, |_| {});
    p.wait_mirror_drained(180);
    p.wait_for(60, "units in doubt to be resolved", |p| {
        p.mirror()["in_doubt_resolving"] == 0
    });
    let m = p.wait_mirror_drained(60).clone();
    assert_eq!(
        m["report"]["in_doubt"], 0,
        "nothing may stay in doubt: {m:#}"
    );
    assert_eq!(m["report"]["gaps_total"], 0, "{m:#}");
    assert_eq!(m["report"]["divergences_total"], 0, "{m:#}");
    assert_tpcb_same(&c, db);
    // Mirroring carries on through the new process.
    pgbench_ok(&p, db, &["-c", "4", "-j", "2", "-T", "3", "-n"]);
    p.wait_mirror_drained(120);
    assert_tpcb_same(&c, db);
}

/// The state file a machine restart leaves: the spool was never closed,
/// and the boot id is another one.
fn pretend_machine_restart(spool: &Path) {
    std::fs::write(spool.join("state"), "an-earlier-boot running\n").unwrap();
}

fn segments(spool: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "spool"))
        .collect();
    v.sort();
    v
}

#[test]
fn a_spool_tail_lost_in_a_machine_crash_is_a_gap_and_numbers_move_on() {
    let spool = tempfile::tempdir().unwrap();
    let target = format!("127.0.0.1:{}", Clusters::get().target_port);
    let relay = Relay::start(target.parse().unwrap());
    let db = "faults_tail";
    let interval = |t: &mut toml_edit::Table| {
        t["fsync"] = toml_edit::value("interval");
        t["fsync_interval_ms"] = toml_edit::value(60_000);
    };
    let p = proxy(spool.path(), Some(&relay), interval);
    let c = p.clusters.clone();
    c.fresh_db(db);
    psql_ok(
        &p.url(SUPERUSER, db),
        &["-c", "CREATE TABLE t(a int)"],
        None,
    );
    p.wait_mirror_drained(60);
    // The target goes quiet; units pile up in the spool.
    relay.set_stall(true);
    for i in 0..20 {
        psql_ok(
            &p.url(SUPERUSER, db),
            &["-c", &format!("INSERT INTO t VALUES ({i})")],
            None,
        );
    }
    let before = p.mirror()["spooled_seq"].as_u64().unwrap();
    kill(p);
    // The last records never reached the disk.
    let seg = segments(spool.path()).pop().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 300)
        .unwrap();
    pretend_machine_restart(spool.path());
    relay.set_stall(false);
    let p = proxy(spool.path(), Some(&relay), interval);
    let m = p.mirror();
    assert!(m["report"]["needs_resync"] == true, "{m:#}");
    let gaps = m["report"]["gaps"].to_string();
    assert!(gaps.contains("machine restarted"), "{m:#}");
    // New units never reuse a number a lost one may have had (the target
    // could have applied it already).
    psql_ok(
        &p.url(SUPERUSER, db),
        &["-c", "INSERT INTO t VALUES (100)"],
        None,
    );
    let m = p.wait_mirror_drained(60);
    assert!(m["spooled_seq"].as_u64().unwrap() > before, "{m:#}");
    let on_target = rows(
        &c,
        c.target_port,
        db,
        "SELECT count(*) FROM t WHERE a = 100",
    );
    assert_eq!(on_target.trim(), "1");
}

#[test]
fn a_damaged_frame_in_a_closed_segment_is_a_gap_not_a_stall() {
    let spool = tempfile::tempdir().unwrap();
    let target = format!("127.0.0.1:{}", Clusters::get().target_port);
    let relay = Relay::start(target.parse().unwrap());
    let db = "faults_frame";
    // Small segments (an eighth of the bound, at least 64 KiB).
    let small = |t: &mut toml_edit::Table| {
        t["max_spool_bytes"] = toml_edit::value(1_048_576);
    };
    let p = proxy(spool.path(), Some(&relay), small);
    let c = p.clusters.clone();
    c.fresh_db(db);
    psql_ok(
        &p.url(SUPERUSER, db),
        &["-c", "CREATE TABLE t(a int, pad text)"],
        None,
    );
    p.wait_mirror_drained(60);
    relay.set_stall(true);
    // Units of ~4 KB each (the text travels in the statement): several
    // segments' worth.
    psql_ok(&p.url(SUPERUSER, db), &["-q"], Some(&big_inserts(100)));
    kill(p);
    let segs = segments(spool.path());
    assert!(segs.len() >= 3, "want closed segments: {segs:?}");
    // A flipped byte in the middle of the first closed segment.
    let mut data = std::fs::read(&segs[0]).unwrap();
    let at = data.len() / 2;
    data[at] ^= 0x5a;
    std::fs::write(&segs[0], &data).unwrap();
    relay.set_stall(false);
    let p = proxy(spool.path(), Some(&relay), small);
    // The applier moves on past the damage and applies everything else.
    let m = p.wait_mirror_drained(120);
    assert!(m["report"]["gaps_total"].as_u64() >= Some(1), "{m:#}");
    assert_eq!(m["report"]["needs_resync"], true, "{m:#}");
    assert!(
        m["report"]["gaps"].to_string().contains("unreadable"),
        "{m:#}"
    );
    let src: i64 = rows(&c, c.source_port, db, "SELECT count(*) FROM t")
        .trim()
        .parse()
        .unwrap();
    let tgt: i64 = rows(&c, c.target_port, db, "SELECT count(*) FROM t")
        .trim()
        .parse()
        .unwrap();
    assert!(tgt < src && tgt >= src - 20, "source {src}, target {tgt}");
    // Nothing on the target the source lacks (nothing applied twice).
    let extra = rows(
        &c,
        c.target_port,
        db,
        "SELECT count(*) FROM (SELECT a, count(*) FROM t GROUP BY a HAVING count(*) > 1) d",
    );
    assert_eq!(extra.trim(), "0");
}

/// An INSERT of one row whose 4000-byte value is in the statement text
/// (so its unit takes that much spool).
fn big_insert(i: usize) -> String {
    format!("INSERT INTO t VALUES ({i}, '{}')", "x".repeat(4000))
}

/// `big_insert(0..n)` as a psql script: one session, each INSERT its own
/// transaction (a connection per statement is slow on a loaded machine).
fn big_inserts(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| big_insert(i) + ";\n")
        .collect::<String>()
        .into_bytes()
}

/// A small tmpfs (root only; the suite runs as root in CI).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap().keep();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(ok.success(), "mounting a tmpfs needs root");
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_disk_makes_commits_wait_under_backpressure() {
    let disk = Tmpfs::mount("1m");
    let spool = disk.0.join("spool");
    let target = format!("127.0.0.1:{}", Clusters::get().target_port);
    let relay = Relay::start(target.parse().unwrap());
    let db = "faults_full_bp";
    let bp = |t: &mut toml_edit::Table| {
        t["on_full"] = toml_edit::value("backpressure");
    };
    let p = proxy(&spool, Some(&relay), bp);
    let c = p.clusters.clone();
    c.fresh_db(db);
    psql_ok(
        &p.url(SUPERUSER, db),
        &["-c", "CREATE TABLE t(a int, pad text)"],
        None,
    );
    p.wait_mirror_drained(60);
    relay.set_stall(true);
    // Each unit is ~20 KB: the 1 MB disk fills within a few dozen.
    let url = p.url(SUPERUSER, db);
    // One session, one autocommitted INSERT after another.
    let writer = std::thread::spawn(move || {
        let out = psql(&url, &["-q"], Some(&big_inserts(400)));
        assert!(out.status.success(), "{out:?}");
    });
    // Commits stop being acknowledged once the disk is full.
    p.wait_for(60, "the spool to hit the full disk", |p| {
        p.mirror()["backpressure_waits"].as_u64() > Some(0)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !writer.is_finished(),
        "a commit was acknowledged past a full spool"
    );
    let m = p.mirror();
    assert_eq!(
        m["report"]["gaps_total"], 0,
        "no gap under backpressure: {m:#}"
    );
    // The target comes back: the applier frees space, the commits go on.
    relay.set_stall(false);
    writer.join().unwrap();
    let m = p.wait_mirror_drained(120);
    assert_eq!(m["report"]["gaps_total"], 0, "{m:#}");
    assert_same(&c, db, "SELECT a, md5(pad) FROM t ORDER BY a");
}

#[test]
fn a_full_disk_is_a_recorded_gap_under_stop_mirroring() {
    let disk = Tmpfs::mount("1m");
    let spool = disk.0.join("spool");
    let target = format!("127.0.0.1:{}", Clusters::get().target_port);
    let relay = Relay::start(target.parse().unwrap());
    let db = "faults_full_stop";
    let p = proxy(&spool, Some(&relay), |_| {});
    let c = p.clusters.clone();
    c.fresh_db(db);
    psql_ok(
        &p.url(SUPERUSER, db),
        &["-c", "CREATE TABLE t(a int, pad text)"],
        None,
    );
    p.wait_mirror_drained(60);
    relay.set_stall(true);
    psql_ok(&p.url(SUPERUSER, db), &["-q"], Some(&big_inserts(400)));
    let m = p.mirror();
    assert!(m["report"]["gaps_total"].as_u64() >= Some(1), "{m:#}");
    assert_eq!(m["report"]["needs_resync"], true, "{m:#}");
    assert_eq!(m["state"], "stopped", "{m:#}");
    relay.set_stall(false);
    p.wait_mirror_drained(60);
    // What was spooled before the disk filled is on the target, once.
    let dup = rows(
        &c,
        c.target_port,
        db,
        "SELECT count(*) FROM (SELECT a FROM t GROUP BY a HAVING count(*) > 1) d",
    );
    assert_eq!(dup.trim(), "0");
}

/// Waits until a session on the target holds table `t` of `db` locked.
fn wait_locked(c: &Clusters, db: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let held = "SELECT count(*) FROM pg_locks l JOIN pg_class r ON r.oid = l.relation \
                WHERE r.relname = 't' AND l.mode = 'AccessExclusiveLock' AND l.granted";
    while rows(c, c.target_port, db, held).trim() != "1" {
        assert!(Instant::now() < deadline, "the lock on t was never taken");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_apply_timeout_behind_a_lock_applies_once_or_records_a_gap() {
    let spool = tempfile::tempdir().unwrap();
    let db = "faults_lock";
    let short = |t: &mut toml_edit::Table| {
        t["apply_timeout_ms"] = toml_edit::value(1000);
    };
    let p = proxy(spool.path(), None, short);
    let c = p.clusters.clone();
    c.fresh_db(db);
    psql_ok(
        &p.url(SUPERUSER, db),
        &["-c", "CREATE TABLE t(a int)"],
        None,
    );
    p.wait_mirror_drained(60);
    let target_url = c.target_url(SUPERUSER, db);
    // A session on the target holds the table locked for a few seconds:
    // the unit times out there, its abandoned attempt is terminated, and a
    // later attempt applies it once.
    let url = target_url.clone();
    let holder = std::thread::spawn(move || {
        psql_ok(
            &url,
            &["-c", "BEGIN; LOCK TABLE t; SELECT pg_sleep(2.5); COMMIT;"],
            None,
        )
    });
    wait_locked(&c, db);
    psql_ok(
        &p.url(SUPERUSER, db),
        &["-c", "INSERT INTO t VALUES (1)"],
        None,
    );
    holder.join().unwrap();
    let m = p.wait_mirror_drained(60);
    assert_eq!(
        rows(&c, c.target_port, db, "SELECT count(*) FROM t").trim(),
        "1",
        "applied once: {m:#}"
    );
    assert_eq!(m["report"]["gaps_total"], 0, "{m:#}");
    // Held past every attempt: the unit is given up, as a recorded gap.
    let url = target_url.clone();
    let holder = std::thread::spawn(move || {
        psql_ok(
            &url,
            &["-c", "BEGIN; LOCK TABLE t; SELECT pg_sleep(20); COMMIT;"],
            None,
        )
    });
    wait_locked(&c, db);
    psql_ok(
        &p.url(SUPERUSER, db),
        &["-c", "INSERT INTO t VALUES (2)"],
        None,
    );
    p.wait_for(60, "the unit to be given up", |p| {
        p.mirror()["report"]["gaps_total"].as_u64() >= Some(1)
    });
    holder.join().unwrap();
    let m = p.wait_mirror_drained(60);
    assert_eq!(m["report"]["needs_resync"], true, "{m:#}");
    assert_eq!(
        rows(&c, c.target_port, db, "SELECT count(*) FROM t WHERE a = 2").trim(),
        "0",
        "a unit given up is never applied behind the operator's back: {m:#}"
    );
}

/// Puts the target back to the moment a unit ran and its progress mark did
/// not (a SIGKILL of the proxy in between): the mark one unit lower with
/// the unit pending, and the spool's local applied position behind it.
fn rewind_to_pending(c: &Clusters, db: &str, spool: &Path) -> u64 {
    let seq: u64 = rows(
        c,
        c.target_port,
        db,
        "SELECT seq FROM pgshift_mirror.progress",
    )
    .trim()
    .parse()
    .unwrap();
    rows(
        c,
        c.target_port,
        db,
        &format!(
            "UPDATE pgshift_mirror.progress SET seq = {}, above = '{{}}', pending = {seq}",
            seq - 1
        ),
    );
    std::fs::write(spool.join("applied"), format!("{}\n", seq - 1)).unwrap();
    seq
}

fn prepared_on_target(c: &Clusters, gid: &str) -> String {
    rows(
        c,
        c.target_port,
        "postgres",
        &format!("SELECT count(*) FROM pg_prepared_xacts WHERE gid = '{gid}'"),
    )
    .trim()
    .to_string()
}

/// After a restart: every unit applied exactly once, nothing pending.
#[track_caller]
fn assert_settled(p: &Proxy, c: &Clusters, db: &str, seq: u64) {
    let m = p.wait_mirror_drained(60);
    assert_eq!(m["report"]["gaps_total"], 0, "{m:#}");
    assert_eq!(
        m["report"]["divergences_total"], 0,
        "a step run twice fails on the target: {m:#}"
    );
    let progress = rows(
        c,
        c.target_port,
        db,
        "SELECT seq || ':' || coalesce(pending::text, '-') FROM pgshift_mirror.progress",
    );
    let (low, pending) = progress.trim().split_once(':').unwrap();
    assert!(low.parse::<u64>().unwrap() >= seq, "{progress}");
    assert_eq!(pending, "-", "{progress}");
}

/// A two-phase commit step interrupted between running on the target and
/// its progress mark is settled from pg_prepared_xacts: found applied when
/// it was (never run twice), run when it was not (never a gap). A mark
/// inside a prepared transaction would hold the progress row until COMMIT
/// PREPARED, which would wait for it: these steps are marked around.
#[test]
fn an_interrupted_two_phase_commit_step_is_settled_from_pg_prepared_xacts() {
    let spool = tempfile::tempdir().unwrap();
    let db = "faults_2pc";
    let p = proxy(spool.path(), None, |_| {});
    let c = p.clusters.clone();
    // fresh_db rolls back what a failed run left prepared in the database.
    c.fresh_db(db);
    let url = p.url(SUPERUSER, db);
    psql_ok(&url, &["-c", "CREATE TABLE t(a int)"], None);
    let prepare = |p: &Proxy, gid: &str, v: u32| {
        psql_ok(
            &p.url(SUPERUSER, db),
            &[
                "-c",
                "BEGIN",
                "-c",
                &format!("INSERT INTO t VALUES ({v})"),
                "-c",
                &format!("PREPARE TRANSACTION '{gid}'"),
            ],
            None,
        );
    };

    // PREPARE ran on the target, its mark was lost.
    prepare(&p, "faults_2pc_a", 1);
    p.wait_mirror_drained(60);
    kill(p);
    let seq = rewind_to_pending(&c, db, spool.path());
    let p = proxy(spool.path(), None, |_| {});
    assert_settled(&p, &c, db, seq);
    assert_eq!(prepared_on_target(&c, "faults_2pc_a"), "1");

    // COMMIT PREPARED ran on the target, its mark was lost.
    psql_ok(
        &p.url(SUPERUSER, db),
        &["-c", "COMMIT PREPARED 'faults_2pc_a'"],
        None,
    );
    p.wait_mirror_drained(60);
    kill(p);
    let seq = rewind_to_pending(&c, db, spool.path());
    let p = proxy(spool.path(), None, |_| {});
    assert_settled(&p, &c, db, seq);
    assert_eq!(prepared_on_target(&c, "faults_2pc_a"), "0");

    // PREPARE was interrupted before it took effect (its transaction
    // rolled back): it runs again.
    prepare(&p, "faults_2pc_b", 2);
    p.wait_mirror_drained(60);
    kill(p);
    c.sql(c.target_port, db, "ROLLBACK PREPARED 'faults_2pc_b'");
    let seq = rewind_to_pending(&c, db, spool.path());
    let p = proxy(spool.path(), None, |_| {});
    assert_settled(&p, &c, db, seq);
    assert_eq!(prepared_on_target(&c, "faults_2pc_b"), "1");
    psql_ok(
        &p.url(SUPERUSER, db),
        &["-c", "COMMIT PREPARED 'faults_2pc_b'"],
        None,
    );
    p.wait_mirror_drained(60);
    assert_same(&c, db, "SELECT a FROM t ORDER BY a");
    assert_eq!(
        rows(
            &c,
            c.target_port,
            db,
            "SELECT string_agg(a::text, ',' ORDER BY a) FROM t"
        )
        .trim(),
        "1,2"
    );
}
