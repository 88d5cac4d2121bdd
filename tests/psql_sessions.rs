//! Scripted client sessions through a real pgshift: psql for DDL/DML,
//! multi-statement queries, transactions and \copy; tokio-postgres where
//! psql cannot do it (LISTEN, cancel, extended protocol). Every outcome is
//! checked against the source itself, not only against what the client saw.
mod common;
use common::*;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, NoTls};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// A tokio-postgres client through the proxy, its connection driven in the
/// background.
async fn connect(p: &Proxy, db: &str) -> tokio_postgres::Client {
    let (client, conn) = p
        .pg_config(SUPERUSER, db)
        .connect(NoTls)
        .await
        .expect("connect through pgshift");
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("connection error: {e}");
        }
    });
    client
}

#[test]
fn ddl_and_dml_land_on_the_source() {
    let p = Proxy::start();
    let c = &p.clusters;
    let db = "pgshift_t_psql_ddl";
    c.fresh_db(db);
    // A SCRAM login, so the session's auth is relayed, not trusted.
    let url = format!("{} password=scram-secret", p.url("pgshift_scram", db));
    let script = r#"
create table accounts (id int primary key, owner text not null, balance numeric(12,2) not null default 0);
create index accounts_owner on accounts (owner);
insert into accounts (id, owner, balance) select g, 'owner_' || (g % 10), g * 1.5 from generate_series(1, 1000) g;
update accounts set balance = balance + 100 where owner = 'owner_3';
delete from accounts where id > 900;
alter table accounts add column note text;
update accounts set note = 'vip' where id in (1, 2, 3);
create view rich as select id, owner from accounts where balance > 1000;
select count(*), sum(balance), count(note) from accounts;
select current_user, inet_server_port();
"#;
    let out = psql_ok(&url, &["-At"], Some(script.as_bytes()));
    // sum(g*1.5, g=1..900) = 608175, plus 100 for each of the 90 owner_3 rows.
    let tags =
        "CREATE TABLE\nCREATE INDEX\nINSERT 0 1000\nUPDATE 100\nDELETE 100\nALTER TABLE\nUPDATE 3\nCREATE VIEW\n";
    assert_eq!(
        out,
        format!("{tags}900|617175.00|3\npgshift_scram|{}\n", c.source_port)
    );

    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select count(*), sum(balance) from accounts"
        ),
        "900|617175.00"
    );
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select tableowner from pg_tables where tablename = 'accounts'"
        ),
        "pgshift_scram"
    );
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select string_agg(id::text, ',' order by id) from accounts where note = 'vip'"
        ),
        "1,2,3"
    );
    assert_eq!(c.sql(c.source_port, db, "select count(*) from rich"), "241");
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select indexdef like '%(owner)' from pg_indexes where indexname = 'accounts_owner'"
        ),
        "t"
    );
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select balance from accounts where id = 13"
        ),
        "119.50"
    );

    // Dropping through the proxy is seen on the source too.
    psql_ok(
        &url,
        &["-c", "drop view rich", "-c", "drop table accounts"],
        None,
    );
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select to_regclass('public.accounts') is null"
        ),
        "t"
    );
}

/// Startup parameters (options, application_name, client_encoding) reach
/// the source's backend as the client sent them.
#[test]
fn startup_parameters_reach_the_source() {
    let p = Proxy::start();
    let c = &p.clusters;
    let db = "pgshift_t_psql_startup";
    c.fresh_db(db);
    c.sql(
        c.source_port,
        db,
        "create schema s1; create table s1.marker (v text); insert into s1.marker values ('from s1')",
    );
    let url = format!(
        "{} options='-c search_path=s1,public -c statement_timeout=300' application_name='pgshift test' client_encoding=LATIN1",
        p.url(SUPERUSER, db)
    );
    let out = psql(
        &url,
        &[
            "-Atq",
            "-v",
            "ON_ERROR_STOP=0",
            "-c",
            "show search_path",
            "-c",
            "select v from marker",
            "-c",
            "show client_encoding",
            "-c",
            "select pg_sleep(5)",
            "-c",
            "select 'caf' || chr(233)",
        ],
        None,
    );
    // chr(233) arrives converted to LATIN1 by the server: one byte, 0xE9.
    assert_eq!(
        out.stdout,
        b"s1,public\nfrom s1\nLATIN1\ncaf\xe9\n",
        "{}",
        show(&out)
    );
    assert!(
        text(&out.stderr).contains("canceling statement due to statement timeout"),
        "{}",
        show(&out)
    );
    // The source's own view of a live session through the proxy.
    let out = psql_ok(&url, &["-Atq", "-c", "select application_name, current_setting('statement_timeout') from pg_stat_activity where pid = pg_backend_pid()"], None);
    assert_eq!(out, "pgshift test|300ms\n");
}

#[test]
fn multi_statement_simple_queries() {
    let p = Proxy::start();
    let c = &p.clusters;
    let db = "pgshift_t_psql_multi";
    c.fresh_db(db);
    let url = p.url(SUPERUSER, db);

    // One Query message, several results (psql 15 shows them all).
    let out = psql_ok(
        &url,
        &[
            "-At",
            "-c",
            "select 1; select 2; select 'three', 'x'; values (4), (5)",
        ],
        None,
    );
    assert_eq!(out, "1\n2\nthree|x\n4\n5\n");

    psql_ok(
        &url,
        &[
            "-c",
            "create table m (a int); insert into m values (1); insert into m values (2), (3)",
        ],
        None,
    );
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select string_agg(a::text, ',' order by a) from m"
        ),
        "1,2,3"
    );

    // An error in the middle: the implicit transaction of the whole string
    // rolls back and nothing after the error runs.
    let out = psql(
        &url,
        &[
            "-c",
            "insert into m values (10); select 1/0; insert into m values (11)",
        ],
        None,
    );
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("division by zero"),
        "{}",
        show(&out)
    );
    assert_eq!(
        c.sql(c.source_port, db, "select count(*) from m where a >= 10"),
        "0"
    );

    // An explicit COMMIT inside the string persists what came before it; the
    // error later only rolls back its own implicit transaction.
    let out = psql(
        &url,
        &["-c", "insert into m values (20); begin; insert into m values (21); commit; insert into m values (22); select 1/0; insert into m values (23)"],
        None,
    );
    assert!(!out.status.success(), "{}", show(&out));
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select string_agg(a::text, ',' order by a) from m where a >= 10"
        ),
        "20,21"
    );

    // The same in one long-lived session: \; sends one Query per line, the
    // session survives the error and keeps working.
    let script = "\\set ON_ERROR_STOP 0\n\
                  select 'a' \\; select 1/0 \\; select 'never';\n\
                  \\echo state=:SQLSTATE\n\
                  insert into m values (30) \\; insert into m values (31) \\; select count(*) from m where a >= 30;\n\
                  select 'still' \\; select 'alive';\n";
    let out = psql(&url, &["-Atq"], Some(script.as_bytes()));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("state=22012\n2\nstill\nalive\n"),
        "{}",
        show(&out)
    );
    assert!(!stdout.contains("never"), "{}", show(&out));
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select string_agg(a::text, ',' order by a) from m where a >= 10"
        ),
        "20,21,30,31"
    );
}

#[test]
fn transaction_with_savepoints_and_errors() {
    let p = Proxy::start();
    let c = &p.clusters;
    let db = "pgshift_t_psql_tx";
    c.fresh_db(db);
    let script = r#"\set ON_ERROR_STOP 0
create table acct (id int primary key, v text);
begin;
insert into acct values (1, 'a');
savepoint s1;
insert into acct values (2, 'b');
insert into acct values (1, 'dup');
\echo after_dup=:SQLSTATE
rollback to savepoint s1;
insert into acct values (3, 'c');
savepoint s2;
update acct set v = 'c2' where id = 3;
release savepoint s2;
savepoint s3;
delete from acct where id = 1;
rollback to s3;
commit;
begin;
insert into acct values (4, 'd');
select 1/0;
insert into acct values (5, 'e');
\echo in_aborted=:SQLSTATE
commit;
select string_agg(id || ':' || v, ',' order by id) from acct;
begin;
insert into acct values (6, 'f');
rollback;
"#;
    let out = psql(&p.url(SUPERUSER, db), &["-At"], Some(script.as_bytes()));
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    // COMMIT of an aborted transaction answers ROLLBACK.
    assert!(stdout.contains("after_dup=23505\n"), "{}", show(&out));
    assert!(
        stdout.contains("in_aborted=25P02\nROLLBACK\n1:a,3:c2\n"),
        "{}",
        show(&out)
    );
    assert!(
        stderr.contains("duplicate key value violates unique constraint"),
        "{}",
        show(&out)
    );
    assert!(stderr.contains("division by zero"), "{}", show(&out));
    assert!(
        stderr.contains("current transaction is aborted"),
        "{}",
        show(&out)
    );
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select string_agg(id || ':' || v, ',' order by id) from acct"
        ),
        "1:a,3:c2"
    );
    // Nothing is left open on the source for that database.
    assert_eq!(
        c.sql(
            c.source_port,
            "postgres",
            &format!(
                "select count(*) from pg_stat_activity where datname = '{db}' and state like 'idle in transaction%'"
            )
        ),
        "0"
    );
}

/// Tiny deterministic generator for test data (no extra crate needed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Escapes a value the way COPY TO writes text format, so that a file made
/// of these comes back byte for byte.
fn copy_escape(raw: &str, out: &mut String) {
    for ch in raw.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            '\x0b' => out.push_str("\\v"),
            c => out.push(c),
        }
    }
}

/// `rows` lines of COPY text for `t (id int, txt text, num numeric, flag bool, day date, blob bytea)`,
/// in id order, in canonical output form.
fn copy_file_contents(rows: u32) -> Vec<u8> {
    const PIECES: &[&str] = &[
        "plain",
        "with space",
        "tab\there",
        "back\\slash",
        "\\N",
        "ünïcödé",
        "日本語テキスト",
        "🦀🐘",
        "line\nbreak",
        "cr\rlf\r\n",
        "bell\x07and\x01ctl",
        "\x08\x0c\x0b",
        "quote'\"",
        "comma,semi;",
        "",
        "  lead and trail  ",
        "\\.",
        "ends with backslash\\",
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut s = String::with_capacity(rows as usize * 90);
    for id in 1..=rows {
        s.push_str(&id.to_string());
        s.push('\t');
        if rng.below(20) == 0 {
            s.push_str("\\N");
        } else {
            let mut raw = String::new();
            for _ in 0..rng.below(6) {
                raw.push_str(PIECES[rng.below(PIECES.len() as u64) as usize]);
            }
            if id % 10_000 == 0 {
                // A few values far larger than the proxy's read chunk.
                raw.push_str(&"x\u{e9}\t".repeat(8_000));
            }
            copy_escape(&raw, &mut s);
        }
        s.push('\t');
        let whole = rng.below(1_000_000);
        let frac = rng.below(10_000);
        let neg = (whole != 0 || frac != 0) && rng.below(2) == 0;
        s.push_str(&format!("{}{whole}.{frac:04}", if neg { "-" } else { "" }));
        s.push('\t');
        s.push_str(["t", "f", "\\N"][rng.below(3) as usize]);
        s.push('\t');
        s.push_str(&format!(
            "20{:02}-{:02}-{:02}",
            rng.below(100),
            1 + rng.below(12),
            1 + rng.below(28)
        ));
        s.push('\t');
        match rng.below(10) {
            0 => s.push_str("\\N"),
            n => {
                s.push_str("\\\\x");
                for _ in 0..(n - 1) * 3 {
                    s.push_str(&format!("{:02x}", rng.below(256)));
                }
            }
        }
        s.push('\n');
    }
    s.into_bytes()
}

fn same_bytes(what: &str, a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    if x != y {
        let at = x
            .iter()
            .zip(&y)
            .position(|(p, q)| p != q)
            .unwrap_or(x.len().min(y.len()));
        let lo = at.saturating_sub(80);
        panic!(
            "{what}: {} ({} bytes) and {} ({} bytes) differ at byte {at}:\n{:?}\nvs\n{:?}",
            a.display(),
            x.len(),
            b.display(),
            y.len(),
            text(&x[lo..(at + 80).min(x.len())]),
            text(&y[lo..(at + 80).min(y.len())]),
        );
    }
}

#[test]
fn copy_100k_rows_round_trip_is_byte_identical() {
    let p = Proxy::start();
    let c = &p.clusters;
    let db = "pgshift_t_psql_copy";
    c.fresh_db(db);
    let url = p.url(SUPERUSER, db);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.tsv");
    let via_proxy = dir.path().join("out_proxy.tsv");
    let direct = dir.path().join("out_direct.tsv");
    std::fs::write(&input, copy_file_contents(100_000)).unwrap();

    psql_ok(
        &url,
        &["-c", "create table t (id int primary key, txt text, num numeric, flag bool, day date, blob bytea)"],
        None,
    );
    let out = psql_ok(
        &url,
        &["-c", &format!("\\copy t from '{}'", input.display())],
        None,
    );
    assert_eq!(out.trim(), "COPY 100000");
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select count(*), count(txt), max(length(txt)) > 20000 from t"
        ),
        {
            let nulls = std::fs::read(&input)
                .unwrap()
                .split(|&b| b == b'\n')
                .filter(|l| l.split(|&b| b == b'\t').nth(1) == Some(b"\\N"))
                .count();
            format!("100000|{}|t", 100_000 - nulls)
        }
    );
    // Spot checks of what the server stored, straight from the source.
    assert!(
        c.sql(
            c.source_port,
            db,
            "select count(*) from t where txt like '%日本語%' and txt like '%' || chr(9) || '%'"
        )
        .parse::<u32>()
        .unwrap()
            > 0
    );
    assert!(
        c.sql(
            c.source_port,
            db,
            "select count(*) from t where txt like '%\\\\N%'"
        )
        .parse::<u32>()
        .unwrap()
            > 0
    );

    let out_sql = "select * from t order by id";
    let out = psql_ok(
        &url,
        &[
            "-c",
            &format!("\\copy ({out_sql}) to '{}'", via_proxy.display()),
        ],
        None,
    );
    assert_eq!(out.trim(), "COPY 100000");
    same_bytes("copy in then out through pgshift", &input, &via_proxy);
    psql_ok(
        &c.source_url(SUPERUSER, db),
        &[
            "-c",
            &format!("\\copy ({out_sql}) to '{}'", direct.display()),
        ],
        None,
    );
    same_bytes(
        "copy out through pgshift vs directly from the source",
        &via_proxy,
        &direct,
    );

    // Binary format, out through the proxy vs directly, and back in.
    let bin_proxy = dir.path().join("out_proxy.bin");
    let bin_direct = dir.path().join("out_direct.bin");
    psql_ok(
        &url,
        &[
            "-c",
            &format!(
                "\\copy ({out_sql}) to '{}' with (format binary)",
                bin_proxy.display()
            ),
        ],
        None,
    );
    psql_ok(
        &c.source_url(SUPERUSER, db),
        &[
            "-c",
            &format!(
                "\\copy ({out_sql}) to '{}' with (format binary)",
                bin_direct.display()
            ),
        ],
        None,
    );
    same_bytes(
        "binary copy out through pgshift vs directly",
        &bin_proxy,
        &bin_direct,
    );
    psql_ok(
        &url,
        &[
            "-c",
            "create table t2 (like t)",
            "-c",
            &format!(
                "\\copy t2 from '{}' with (format binary)",
                bin_proxy.display()
            ),
        ],
        None,
    );
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select count(*) from (select * from t except select * from t2) d"
        ),
        "0"
    );
    assert_eq!(
        c.sql(c.source_port, db, "select count(*) from t2"),
        "100000"
    );

    // A COPY that fails half-way leaves the table as it was, and the same
    // session carries on.
    let bad = dir.path().join("bad.tsv");
    let mut data = copy_file_contents(60_000);
    data.extend_from_slice(b"not-a-number\tx\t1\tt\t2024-01-01\t\\N\n");
    std::fs::write(&bad, data).unwrap();
    let script = format!(
        "\\set ON_ERROR_STOP 0\ncreate table t3 (like t);\n\\copy t3 from '{}'\nselect count(*) from t3;\n",
        bad.display()
    );
    let out = psql(&url, &["-Atq"], Some(script.as_bytes()));
    assert_eq!(text(&out.stdout), "0\n", "{}", show(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("invalid input syntax for type integer: \"not-a-number\"")
            && stderr.contains("line 60001"),
        "{}",
        show(&out)
    );
    assert_eq!(c.sql(c.source_port, db, "select count(*) from t3"), "0");
}

/// psql's \lo_import and \lo_export use libpq's large-object API, which
/// talks in FunctionCall messages (the fast-path protocol).
#[test]
fn large_objects_through_fastpath_function_calls() {
    let p = Proxy::start();
    let c = &p.clusters;
    let db = "pgshift_t_psql_lo";
    c.fresh_db(db);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("lo_in.bin");
    let via_proxy = dir.path().join("lo_out_proxy.bin");
    let direct = dir.path().join("lo_out_direct.bin");
    let mut rng = Rng(0x1234_5678_9abc_def1);
    // Larger than libpq's 8 KiB-ish lo_write calls and the proxy's read chunk.
    let data: Vec<u8> = (0..2 * 1024 * 1024 + 333)
        .map(|_| rng.next() as u8)
        .collect();
    std::fs::write(&input, &data).unwrap();

    let url = p.url(SUPERUSER, db);
    let script = format!(
        "\\lo_import '{}'\n\\echo oid=:LASTOID\n\\lo_export :LASTOID '{}'\n",
        input.display(),
        via_proxy.display()
    );
    let out = psql_ok(&url, &["-q"], Some(script.as_bytes()));
    let oid = out
        .lines()
        .find_map(|l| l.strip_prefix("oid="))
        .unwrap_or_else(|| panic!("no oid in {out:?}"))
        .to_string();
    assert!(oid.parse::<u32>().is_ok(), "{out}");
    same_bytes("large object exported through pgshift", &input, &via_proxy);
    assert_eq!(
        c.sql(c.source_port, db, &format!("select length(lo_get({oid}))")),
        data.len().to_string()
    );
    psql_ok(
        &c.source_url(SUPERUSER, db),
        &[
            "-q",
            "-c",
            &format!("\\lo_export {oid} '{}'", direct.display()),
        ],
        None,
    );
    same_bytes(
        "large object exported directly from the source",
        &input,
        &direct,
    );

    // Unlink through the proxy; a second unlink fails cleanly.
    psql_ok(&url, &["-q", "-c", &format!("\\lo_unlink {oid}")], None);
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select count(*) from pg_largeobject_metadata"
        ),
        "0"
    );
    let out = psql(&url, &["-q", "-c", &format!("\\lo_unlink {oid}")], None);
    assert!(
        !out.status.success() && text(&out.stderr).contains("does not exist"),
        "{}",
        show(&out)
    );
    assert_eq!(p.stat("/metrics/clients/protocol_errors"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_between_sessions() {
    let p = Proxy::start();
    let c = p.clusters.clone();
    let db = "pgshift_t_psql_notify";
    c.fresh_db(db);

    let (listener, mut conn) = p.pg_config(SUPERUSER, db).connect(NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n);
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("listener connection ended: {e}");
                    break;
                }
            }
        }
    });
    listener
        .batch_execute("LISTEN pgshift_chan; LISTEN \"Other Chan\"")
        .await
        .unwrap();

    // Notifier 1: tokio-postgres, so its backend pid can be compared.
    let notifier = connect(&p, db).await;
    let pid: i32 = notifier
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    notifier
        .execute(
            "select pg_notify('pgshift_chan', $1)",
            &[&"from tokio-postgres ü 🐘"],
        )
        .await
        .unwrap();
    // Notifier 2: psql, with a rolled-back notify that must never arrive,
    // one on a channel nobody listens to, and a committed pair.
    let script = "begin; notify pgshift_chan, 'rolled back'; rollback;\n\
                  notify nobody_listens, 'lost';\n\
                  begin; notify pgshift_chan, 'first in tx'; notify \"Other Chan\", 'it''s quoted'; commit;\n\
                  notify pgshift_chan;\n";
    let url = p.url(SUPERUSER, db);
    let out = tokio::task::spawn_blocking(move || psql(&url, &["-q"], Some(script.as_bytes())))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));

    let mut got = Vec::new();
    for _ in 0..4 {
        let n = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no notification within 10 s; got so far {got:?}; log:\n{}",
                    p.log()
                )
            })
            .expect("listener connection ended");
        got.push((
            n.channel().to_string(),
            n.payload().to_string(),
            n.process_id(),
        ));
    }
    assert_eq!(
        got[0],
        (
            "pgshift_chan".to_string(),
            "from tokio-postgres ü 🐘".to_string(),
            pid
        )
    );
    let rest: Vec<_> = got[1..]
        .iter()
        .map(|(c, p, _)| (c.as_str(), p.as_str()))
        .collect();
    assert_eq!(
        rest,
        [
            ("pgshift_chan", "first in tx"),
            ("Other Chan", "it's quoted"),
            ("pgshift_chan", "")
        ]
    );
    assert_ne!(got[1].2, pid, "psql notified from another backend");

    // The listening session still answers queries, and nothing else arrives.
    listener.batch_execute("UNLISTEN *").await.unwrap();
    notifier
        .batch_execute("NOTIFY pgshift_chan, 'after unlisten'")
        .await
        .unwrap();
    let row = listener.query_one("select 41 + 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.try_recv().is_err(), "notification after UNLISTEN");
}

/// A raw CancelRequest with a key the proxy never issued.
fn bogus_cancel(port: u16) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut pkt = Vec::new();
    pkt.extend_from_slice(&16i32.to_be_bytes());
    pkt.extend_from_slice(&80877102i32.to_be_bytes());
    pkt.extend_from_slice(&7i32.to_be_bytes());
    pkt.extend_from_slice(&0x5eed_i32.to_be_bytes());
    s.write_all(&pkt).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_running_query_through_the_proxy() {
    let p = Proxy::start();
    let c = p.clusters.clone();
    let db = "pgshift_t_psql_cancel";
    c.fresh_db(db);
    let client = connect(&p, db).await;
    let token = client.cancel_token();
    let running = format!(
        "select count(*) from pg_stat_activity where datname = '{db}' and state = 'active' and query = 'select pg_sleep(30)'"
    );
    let is_running = {
        let c = c.clone();
        let running = running.clone();
        move || {
            let c = c.clone();
            let running = running.clone();
            async move {
                tokio::task::spawn_blocking(move || c.sql(c.source_port, "postgres", &running))
                    .await
                    .unwrap()
                    == "1"
            }
        }
    };

    let started = Instant::now();
    let sleeper = tokio::spawn(async move {
        let r = client.simple_query("select pg_sleep(30)").await;
        (r, client)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_running().await {
        assert!(
            Instant::now() < deadline,
            "pg_sleep never showed up as active on the source"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A key the proxy never issued cancels nothing.
    bogus_cancel(p.port);
    let port_stat = |p: &Proxy, k: &str| p.stat(&format!("/metrics/cancel/{k}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while port_stat(&p, "unknown_key") < 1 {
        assert!(Instant::now() < deadline, "bogus cancel not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        is_running().await,
        "a cancel with an unknown key stopped the query"
    );
    assert!(!sleeper.is_finished());
    assert_eq!(port_stat(&p, "forwarded"), 0);

    token
        .cancel_query(NoTls)
        .await
        .expect("send cancel through pgshift");
    let (r, client) = tokio::time::timeout(Duration::from_secs(15), sleeper)
        .await
        .expect("query not cancelled")
        .unwrap();
    let err = r.expect_err("pg_sleep(30) should have been cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cancel took {:?}",
        started.elapsed()
    );
    assert_eq!(port_stat(&p, "forwarded"), 1);

    // The session goes on.
    let row = query_one_after_cancel(&client, "select $1::int * 2", &[&21i32]).await;
    assert_eq!(row.get::<_, i32>(0), 42);
    assert!(!is_running().await);

    // A cancel while idle does not end the session. (The source applies a
    // cancel whenever it lands, so a query racing with it may be cancelled:
    // allow that once, never a broken session.)
    token.cancel_query(NoTls).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while port_stat(&p, "forwarded") < 2 {
        assert!(Instant::now() < deadline, "second cancel not forwarded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let row = query_one_after_cancel(&client, "select $1::int + 1", &[&41i32]).await;
    assert_eq!(row.get::<_, i32>(0), 42);
    assert!(!client.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_inside_transactions_in_the_extended_protocol() {
    let p = Proxy::start();
    let c = p.clusters.clone();
    let db = "pgshift_t_psql_ext_tx";
    c.fresh_db(db);
    let mut client = connect(&p, db).await;
    client
        .batch_execute("create table items (id int primary key, name text not null)")
        .await
        .unwrap();
    let ins = client
        .prepare("insert into items values ($1, $2)")
        .await
        .unwrap();

    // Error on Execute in a transaction; everything after fails with 25P02
    // until ROLLBACK.
    {
        let tx = client.transaction().await.unwrap();
        tx.execute(&ins, &[&1i32, &"one"]).await.unwrap();
        let e = tx.execute(&ins, &[&1i32, &"dup"]).await.unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::UNIQUE_VIOLATION), "{e:?}");
        let e = tx.execute(&ins, &[&2i32, &"two"]).await.unwrap_err();
        assert_eq!(
            e.code(),
            Some(&SqlState::IN_FAILED_SQL_TRANSACTION),
            "{e:?}"
        );
        let e = tx.prepare("select 1").await.unwrap_err();
        assert_eq!(
            e.code(),
            Some(&SqlState::IN_FAILED_SQL_TRANSACTION),
            "{e:?}"
        );
        tx.rollback().await.unwrap();
    }
    assert_eq!(c.sql(c.source_port, db, "select count(*) from items"), "0");

    // Error on Parse inside a transaction, then a savepoint recovers from an
    // error on Execute.
    {
        let mut tx = client.transaction().await.unwrap();
        tx.execute(&ins, &[&10i32, &"ten"]).await.unwrap();
        {
            let sp = tx.savepoint("sp1").await.unwrap();
            let e = sp.prepare("selec 1").await.unwrap_err();
            assert_eq!(e.code(), Some(&SqlState::SYNTAX_ERROR), "{e:?}");
            sp.rollback().await.unwrap();
        }
        {
            let sp = tx.savepoint("sp2").await.unwrap();
            sp.execute(&ins, &[&11i32, &"eleven"]).await.unwrap();
            let e = sp
                .execute(&ins, &[&12i32, &None::<&str>])
                .await
                .unwrap_err();
            assert_eq!(e.code(), Some(&SqlState::NOT_NULL_VIOLATION), "{e:?}");
            sp.rollback().await.unwrap();
        }
        tx.execute(&ins, &[&13i32, &"thirteen"]).await.unwrap();
        tx.commit().await.unwrap();
    }
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select string_agg(id || ':' || name, ',' order by id) from items"
        ),
        "10:ten,13:thirteen"
    );

    // An error after some rows were already sent: the rows stream, then the
    // error, and the open transaction is aborted on the source.
    {
        let tx = client.transaction().await.unwrap();
        tx.execute(&ins, &[&20i32, &"twenty"]).await.unwrap();
        let e = tx
            .query("select 10 / (5 - g) from generate_series(1, 10) g", &[])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::DIVISION_BY_ZERO), "{e:?}");
        let e = tx.commit().await;
        // COMMIT of an aborted transaction is a rollback; tokio-postgres reports success.
        assert!(e.is_ok(), "{e:?}");
    }
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select count(*) from items where id = 20"
        ),
        "0"
    );
    // The session is healthy afterwards.
    let rows = client
        .query("select id from items order by id", &[])
        .await
        .unwrap();
    assert_eq!(
        rows.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>(),
        [10, 13]
    );
}
