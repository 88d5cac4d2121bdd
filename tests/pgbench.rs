//! pgbench through a real pgshift: initialisation (client-side COPY), then
//! select-only and TPC-B in each query mode, with the TPC-B invariants
//! checked on the source afterwards. Each mode runs as a different role, so
//! trust, md5 and SCRAM logins are all relayed under concurrency.
mod common;
use common::*;

use std::process::Output;

/// Who pgbench logs in as, and its password if any.
struct Login {
    user: &'static str,
    password: Option<&'static str>,
}

const TRUST: Login = Login {
    user: SUPERUSER,
    password: None,
};
const MD5: Login = Login {
    user: "pgshift_md5",
    password: Some("md5-secret"),
};
const SCRAM: Login = Login {
    user: "pgshift_scram",
    password: Some("scram-secret"),
};

fn pgbench(p: &Proxy, login: &Login, db: &str, args: &[&str]) -> Output {
    let mut cmd = pgbench_cmd(p, login.user, db, args);
    cmd.env_remove("PGPASSWORD")
        .env("PGPASSFILE", "/nonexistent");
    if let Some(pw) = login.password {
        cmd.env("PGPASSWORD", pw);
    }
    cmd.output().expect("run pgbench")
}

fn pgbench_ok(p: &Proxy, login: &Login, db: &str, args: &[&str]) -> String {
    let out = pgbench(p, login, db, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pgbench {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    // pgbench reports client errors on stderr even when it exits 0 with
    // aborted clients in some versions; none are expected here.
    assert!(!stderr.contains("aborted"), "pgbench {args:?}: {stderr}");
    stdout + &stderr
}

/// The value after `key` on its line of pgbench's report.
fn field<'a>(report: &'a str, key: &str) -> &'a str {
    report
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key:?} in pgbench output:\n{report}"))
        .trim()
}

/// Runs a benchmark and checks that every transaction went through.
fn run(
    p: &Proxy,
    login: &Login,
    db: &str,
    mode: &str,
    select_only: bool,
    clients: u32,
    per_client: u32,
) -> String {
    let (c, t) = (clients.to_string(), per_client.to_string());
    let mut args = vec!["-M", mode, "-c", &c, "-j", "2", "-t", &t];
    if select_only {
        // No vacuum: only the TPC-B run does pgbench's pre-run vacuum and
        // history truncation, through the proxy like everything else.
        args.extend(["-n", "-S"]);
    }
    let report = pgbench_ok(p, login, db, &args);
    let total = clients * per_client;
    assert_eq!(field(&report, "query mode:"), mode, "{report}");
    assert_eq!(
        field(&report, "number of transactions actually processed:"),
        format!("{total}/{total}"),
        "{report}"
    );
    assert!(
        field(&report, "number of failed transactions:").starts_with("0 "),
        "{report}"
    );
    let script = if select_only {
        "<builtin: select only>"
    } else {
        "<builtin: TPC-B (sort of)>"
    };
    assert_eq!(field(&report, "transaction type:"), script, "{report}");
    report
}

/// Sets up a database with `pgbench -i -s 1` through the proxy and checks
/// on the source that it arrived complete.
fn init(p: &Proxy, login: &Login, db: &str) {
    let c = &p.clusters;
    c.fresh_db(db);
    pgbench_ok(p, login, db, &["-i", "-s", "1", "-q"]);
    assert_eq!(
        c.sql(c.source_port, db, "select (select count(*) from pgbench_accounts), (select count(*) from pgbench_branches), (select count(*) from pgbench_tellers), (select count(*) from pgbench_history)"),
        "100000|1|10|0"
    );
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select tableowner from pg_tables where tablename = 'pgbench_accounts'"
        ),
        login.user
    );
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select count(*) from pg_indexes where indexname = 'pgbench_accounts_pkey'"
        ),
        "1"
    );
}

/// The TPC-B invariant on the source: every balance change is in the
/// history, once, and there are exactly `txns` history rows from this run.
fn check_tpcb_invariants(p: &Proxy, db: &str, txns: u32) {
    let c = &p.clusters;
    let sums = c.sql(
        c.source_port,
        db,
        "select (select sum(abalance) from pgbench_accounts), (select sum(bbalance) from pgbench_branches), \
         (select sum(tbalance) from pgbench_tellers), (select sum(delta) from pgbench_history), (select count(*) from pgbench_history)",
    );
    let v: Vec<&str> = sums.split('|').collect();
    assert_eq!(v.len(), 5, "{sums}");
    assert_eq!(v[0], v[3], "sum(abalance) != sum(delta): {sums}");
    assert_eq!(v[1], v[3], "sum(bbalance) != sum(delta): {sums}");
    assert_eq!(v[2], v[3], "sum(tbalance) != sum(delta): {sums}");
    assert_eq!(v[4], txns.to_string(), "history rows: {sums}");
}

fn bench_mode(mode: &str, login: &Login) {
    let p = Proxy::start();
    let db = format!("pgshift_t_pgbench_{mode}");
    init(&p, login, &db);
    let sessions_before = p.stat("/metrics/clients/connections_total");
    run(&p, login, &db, mode, true, 4, 500);
    run(&p, login, &db, mode, false, 4, 250);
    check_tpcb_invariants(&p, &db, 1000);
    // Each pgbench run opens its 4 client connections (and may probe once more).
    let sessions = p.stat("/metrics/clients/connections_total") - sessions_before;
    assert!(sessions >= 8, "only {sessions} sessions through the proxy");
    assert_eq!(p.stat("/metrics/clients/protocol_errors"), 0, "{}", p.log());
    p.wait_for(60, "all sessions closed", |p| {
        p.stat("/metrics/clients/sessions_active") == 0
    });
}

#[test]
fn pgbench_simple_protocol() {
    bench_mode("simple", &TRUST);
}

#[test]
fn pgbench_extended_protocol() {
    bench_mode("extended", &MD5);
}

#[test]
fn pgbench_prepared_statements() {
    bench_mode("prepared", &SCRAM);
}

/// A new connection for every transaction (-C): startup, auth relay and
/// session teardown under load, interleaved with TPC-B writes.
#[test]
fn pgbench_connection_per_transaction() {
    let p = Proxy::start();
    let db = "pgshift_t_pgbench_connect";
    init(&p, &SCRAM, db);
    let before = p.stat("/metrics/clients/connections_total");
    // (The harness's readiness probe, long finished, counts as one.)
    let rejected_before = p.stat("/metrics/clients/rejected_startup");
    let report = pgbench_ok(
        &p,
        &SCRAM,
        db,
        &[
            "-n", "-C", "-M", "extended", "-c", "2", "-j", "2", "-t", "60",
        ],
    );
    assert_eq!(
        field(&report, "number of transactions actually processed:"),
        "120/120",
        "{report}"
    );
    assert!(
        field(&report, "number of failed transactions:").starts_with("0 "),
        "{report}"
    );
    check_tpcb_invariants(&p, db, 120);
    let connections = p.stat("/metrics/clients/connections_total") - before;
    assert!(
        connections >= 120,
        "pgbench -C made only {connections} connections through the proxy"
    );
    p.wait_for(60, "all sessions closed", |p| {
        p.stat("/metrics/clients/sessions_active") == 0
    });
    assert_eq!(
        p.stat("/metrics/clients/rejected_startup"),
        rejected_before,
        "{}",
        p.log()
    );
}
