//! Client libraries through a real pgshift: tokio-postgres (extended
//! protocol, binary formats, pipelining, COPY, statement churn) and
//! psycopg 3 (tests/python/psycopg_session.py). Outcomes are checked on what
//! the client got back and on the source itself.
mod common;
use common::*;

use std::process::Command;

use bytes::Bytes;
use futures_util::{future, pin_mut, SinkExt, TryStreamExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

async fn spawn_conn(cfg: tokio_postgres::Config) -> Client {
    let (client, conn) = cfg.connect(NoTls).await.expect("connect");
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("connection error: {e}");
        }
    });
    client
}

async fn connect(p: &Proxy, db: &str) -> Client {
    spawn_conn(p.pg_config(SUPERUSER, db)).await
}

/// A connection straight to the source, bypassing the proxy.
async fn connect_source(c: &Clusters, db: &str) -> Client {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&c.host)
        .port(c.source_port)
        .user(SUPERUSER)
        .dbname(db);
    spawn_conn(cfg).await
}

/// The single value of a simple query (text protocol, no prepared statement).
async fn simple_value(client: &Client, sql: &str) -> String {
    let msgs = client.simple_query(sql).await.unwrap();
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no row from {sql}"))
}

/// A proxy with every policy on: mirroring (spool in the returned
/// directory), every read routed to the target, every read shadowed.
fn every_policy_on() -> (Proxy, tempfile::TempDir) {
    let spool = tempfile::tempdir().unwrap();
    let dir = spool.path().to_path_buf();
    let p = Proxy::start_with(move |cfg| {
        common::mirror::mirror_config(cfg, &dir);
        let mut r = toml_edit::Table::new();
        r["read_percent"] = toml_edit::value(100.0);
        cfg["routing"] = toml_edit::Item::Table(r);
        let mut s = toml_edit::Table::new();
        s["sample_percent"] = toml_edit::value(100.0);
        s["mismatch_log"] = toml_edit::value(dir.join("mismatches.jsonl").display().to_string());
        cfg["shadow"] = toml_edit::Item::Table(s);
    });
    (p, spool)
}

/// With mirroring on, waits until the target has the session's writes, so
/// that the reads after it may be routed (read-your-writes keeps them on
/// the source until then). Nothing to wait for without a mirror.
async fn settle(p: &Proxy) {
    tokio::task::block_in_place(|| {
        if p.status()["mirror"]["enabled"] == true {
            p.wait_mirror_drained(120);
        }
    });
}

/// The mirror took every write the session made, with no divergence; with
/// `routed`, the target served some of the reads.
fn assert_mirrored_alike(p: &Proxy, routed: bool) {
    if routed {
        let routing = &p.status()["metrics"]["routing"];
        assert!(routing["target"]["reads"].as_u64() > Some(0), "{routing:#}");
    }
    let m = p.wait_mirror_drained(120);
    assert_eq!(m["report"]["divergences_total"], 0, "{m:#}");
    assert_eq!(m["report"]["gaps_total"], 0, "{m:#}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Fixed-point value with three decimals, as numeric prints it.
fn milli(v: i64) -> String {
    format!(
        "{}{}.{:03}",
        if v < 0 { "-" } else { "" },
        v.unsigned_abs() / 1000,
        v.unsigned_abs() % 1000
    )
}

#[derive(Debug, Clone, PartialEq)]
struct Vals {
    id: i32,
    big: i64,
    t: Option<String>,
    b: Option<Vec<u8>>,
    f: Option<f64>,
    n: Option<String>,
    ts: Option<String>,
    ok: Option<bool>,
}

fn vals(i: i32) -> Vals {
    let specials = [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -0.0,
        f64::MIN_POSITIVE,
        1e308,
        -1.5e-300,
    ];
    let micros = (i as u64 * 7919) % 1_000_000;
    let frac = if micros == 0 {
        String::new()
    } else {
        format!(".{micros:06}").trim_end_matches('0').to_string()
    };
    Vals {
        id: i,
        big: match i {
            1 => i64::MIN,
            2 => i64::MAX,
            _ => (i as i64 - 150) * 1_000_000_007,
        },
        t: (i % 5 != 0).then(|| {
            format!(
                "row {i}: ü日本🐘\t'\"\\ {}",
                "z".repeat((i as usize * 37) % 3000)
            )
        }),
        b: (i % 6 != 0).then(|| {
            (0..(i as usize % 50))
                .map(|k| ((i as usize * 31 + k) % 256) as u8)
                .collect()
        }),
        f: (i % 11 != 0).then(|| {
            specials
                .get(i as usize % 20)
                .copied()
                .unwrap_or(i as f64 * 0.1 - 7.0)
        }),
        n: (i % 7 != 0).then(|| milli(i as i64 * 1_234_567 - 50_000_000)),
        ts: (i % 13 != 0).then(|| {
            format!(
                "20{:02}-{:02}-{:02} {:02}:{:02}:{:02}{frac}+00",
                i % 100,
                1 + i % 12,
                1 + i % 28,
                i % 24,
                i % 60,
                (i * 7) % 60
            )
        }),
        ok: (i % 3 != 0).then_some(i % 2 == 0),
    }
}

fn same_float(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => (x.is_nan() && y.is_nan()) || x.to_bits() == y.to_bits(),
        (x, y) => x == y,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_with_typed_params() {
    let p = Proxy::start();
    let c = p.clusters.clone();
    let db = "pgshift_t_libs_params";
    c.fresh_db(db);
    let client = connect(&p, db).await;
    client.batch_execute("set time zone 'UTC'").await.unwrap();
    client
        .batch_execute("create table vals (id int4 primary key, big int8 not null, t text, b bytea, f float8, n numeric, ts timestamptz, ok bool)")
        .await
        .unwrap();
    let ins = client
        .prepare("insert into vals values ($1, $2, $3, $4, $5, $6::text::numeric, $7::text::timestamptz, $8)")
        .await
        .unwrap();
    let sel = client
        .prepare("select id, big, t, b, f, n::text, ts::text, ok from vals where id = $1")
        .await
        .unwrap();
    const N: i32 = 300;
    for i in 1..=N {
        let v = vals(i);
        let params: [&(dyn ToSql + Sync); 8] =
            [&v.id, &v.big, &v.t, &v.b, &v.f, &v.n, &v.ts, &v.ok];
        assert_eq!(client.execute(&ins, &params).await.unwrap(), 1);
    }
    for i in 1..=N {
        let want = vals(i);
        let r = client.query_one(&sel, &[&i]).await.unwrap();
        let got = Vals {
            id: r.get(0),
            big: r.get(1),
            t: r.get(2),
            b: r.get(3),
            f: r.get(4),
            n: r.get(5),
            ts: r.get(6),
            ok: r.get(7),
        };
        assert!(
            same_float(got.f, want.f),
            "row {i}: float {:?} vs {:?}",
            got.f,
            want.f
        );
        assert_eq!(Vals { f: None, ..got }, Vals { f: None, ..want }, "row {i}");
    }

    // Multi-parameter statements reused with different values, NULLs included.
    let count = client
        .prepare("select count(*) from vals where big between $1 and $2 and ($3::text is null or t like $3) and ($4::bool is null or ok = $4)")
        .await
        .unwrap();
    let cases: [(i64, i64, Option<&str>, Option<bool>); 4] = [
        (i64::MIN, i64::MAX, None, None),
        (0, i64::MAX, None, None),
        (i64::MIN, i64::MAX, Some("row 1%"), None),
        (i64::MIN, i64::MAX, None, Some(true)),
    ];
    for (lo, hi, pat, ok) in cases {
        let want = (1..=N)
            .map(vals)
            .filter(|v| v.big >= lo && v.big <= hi)
            .filter(|v| {
                pat.is_none_or(|p| {
                    v.t.as_deref()
                        .is_some_and(|t| t.starts_with(p.trim_end_matches('%')))
                })
            })
            .filter(|v| ok.is_none_or(|ok| v.ok == Some(ok)))
            .count() as i64;
        let got: i64 = client
            .query_one(&count, &[&lo, &hi, &pat, &ok])
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, want, "count for {lo} {hi} {pat:?} {ok:?}");
    }

    // The source holds exactly what was sent.
    let all: Vec<Vals> = (1..=N).map(vals).collect();
    let sum_n: i64 = all
        .iter()
        .filter_map(|v| v.n.as_ref())
        .map(|n| {
            let neg = n.starts_with('-');
            let digits: i64 = n.trim_start_matches('-').replace('.', "").parse().unwrap();
            if neg {
                -digits
            } else {
                digits
            }
        })
        .sum();
    let sum_big: i128 = all.iter().map(|v| v.big as i128).sum();
    let want = format!(
        "{N}|{}|{}|{}|{}|{}|{}|{sum_big}|{}",
        all.iter().filter(|v| v.t.is_some()).count(),
        all.iter().filter(|v| v.b.is_some()).count(),
        all.iter().filter(|v| v.f.is_some()).count(),
        all.iter().filter(|v| v.n.is_some()).count(),
        all.iter().filter(|v| v.ts.is_some()).count(),
        all.iter().filter(|v| v.ok.is_some()).count(),
        milli(sum_n),
    );
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select count(*), count(t), count(b), count(f), count(n), count(ts), count(ok), sum(big), sum(n) from vals"
        ),
        want
    );
    assert_eq!(
        c.sql(c.source_port, db, "select t from vals where id = 7"),
        vals(7).t.unwrap()
    );
    let nans = all.iter().filter(|v| v.f.is_some_and(f64::is_nan)).count();
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select count(*) from vals where f = 'NaN'"
        ),
        nans.to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_bytea_round_trip() {
    let p = Proxy::start();
    let c = p.clusters.clone();
    let db = "pgshift_t_libs_bytea";
    c.fresh_db(db);
    let client = connect(&p, db).await;
    client
        .batch_execute("create table blobs (id int primary key, b bytea not null)")
        .await
        .unwrap();

    let all: Vec<u8> = (0..=255u8).collect();
    // Large: far bigger than any socket read, every byte value many times.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 17)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();

    let echo = client
        .prepare("select $1::bytea, length($1::bytea)")
        .await
        .unwrap();
    for v in [&all[..], &big[..], &[][..], &[0u8][..]] {
        let r = client.query_one(&echo, &[&v]).await.unwrap();
        assert_eq!(r.get::<_, &[u8]>(0), v);
        assert_eq!(r.get::<_, i32>(1) as usize, v.len());
    }
    let ins = client
        .prepare("insert into blobs values ($1, $2)")
        .await
        .unwrap();
    client.execute(&ins, &[&1i32, &all]).await.unwrap();
    client.execute(&ins, &[&2i32, &big]).await.unwrap();
    let rows = client
        .query("select id, b from blobs order by id", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get::<_, &[u8]>(1), &all[..]);
    assert_eq!(rows[1].get::<_, &[u8]>(1), &big[..]);

    // On the source: the exact bytes, and the same digest as computed over
    // the value sent as a parameter through the proxy.
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select encode(b, 'hex') from blobs where id = 1"
        ),
        hex(&all)
    );
    let stored_md5 = c.sql(
        c.source_port,
        db,
        "select md5(b) || ' ' || length(b) from blobs where id = 2",
    );
    let sent_md5: String = client
        .query_one("select md5($1::bytea)", &[&big])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored_md5, format!("{sent_md5} {}", big.len()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_queries_on_one_client() {
    pipelined_queries_on_one_client_through(&Proxy::start(), "pgshift_t_libs_pipeline").await;
}

/// The same with every policy on: mirroring, every read routed to the
/// target and shadowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_queries_on_one_client_with_every_policy_on() {
    let (p, _spool) = tokio::task::block_in_place(every_policy_on);
    pipelined_queries_on_one_client_through(&p, "pgshift_t_libs_pipeline_on").await;
    tokio::task::block_in_place(|| assert_mirrored_alike(&p, true));
}

/// A routed read that fails on the target runs again on the source; a read
/// pipelined behind it, routed too (shadowing held its batch), is answered
/// by the target long before the source has answered the first one. Its
/// answer must still come second: the client matches answers to requests
/// by their order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_answer_is_not_overtaken_by_a_later_routed_answer() {
    let (p, _spool) = tokio::task::block_in_place(every_policy_on);
    let c = p.clusters.clone();
    tokio::task::block_in_place(|| c.fresh_db("pgshift_t_libs_overtake"));
    let client = connect(&p, "pgshift_t_libs_overtake").await;
    // Fails only after scanning two million rows, on either side.
    let slow_error = client
        .prepare(
            "select count(*) from generate_series(1, 2000000) g \
             where 1 / (g - $1::int4) > 0",
        )
        .await
        .unwrap();
    let fast = client.prepare("select $1::int4 + 1").await.unwrap();
    for round in 0..3 {
        let (first, second) = future::join(
            client.query_one(&slow_error, &[&2_000_000i32]),
            client.query_one(&fast, &[&round]),
        )
        .await;
        assert_eq!(
            first.unwrap_err().code(),
            Some(&SqlState::DIVISION_BY_ZERO),
            "round {round}"
        );
        assert_eq!(second.unwrap().get::<_, i32>(0), round + 1, "round {round}");
    }
    tokio::task::block_in_place(|| {
        let routing = &p.status()["metrics"]["routing"];
        assert!(
            routing["fallbacks"]["query_error"].as_u64() >= Some(1),
            "the first read fell back: {routing:#}"
        );
        assert!(
            routing["target"]["reads"].as_u64() >= Some(1),
            "{routing:#}"
        );
    });
}

async fn pipelined_queries_on_one_client_through(p: &Proxy, db: &str) {
    let c = p.clusters.clone();
    c.fresh_db(db);
    let client = connect(p, db).await;
    client
        .batch_execute("create table pipe (i int primary key, s text)")
        .await
        .unwrap();
    let stmt = client
        .prepare("select $1::int4 * 2, repeat('x', $1::int4 % 97)")
        .await
        .unwrap();
    settle(p).await;

    // Hundreds of requests in flight at once, some failing, one with a large
    // result: every answer must come back to the request it belongs to.
    let results = future::join_all((0..600i32).map(|i| {
        let (client, stmt) = (&client, &stmt);
        async move {
            match i % 100 {
                7 => client
                    .query("select 1 / ($1::int4 - $1::int4)", &[&i])
                    .await
                    .map(|_| (i, -1)),
                50 => client
                    .query("select g from generate_series(1, 50000) g", &[])
                    .await
                    .map(|rows| {
                        (
                            i,
                            rows.iter().map(|r| r.get::<_, i32>(0) as i64).sum::<i64>() as i32,
                        )
                    }),
                _ => client.query_one(stmt, &[&i]).await.map(|r| {
                    assert_eq!(r.get::<_, &str>(1).len(), (i % 97) as usize);
                    (i, r.get::<_, i32>(0))
                }),
            }
        }
    }))
    .await;
    assert_eq!(results.len(), 600);
    for (i, r) in (0..600).zip(results) {
        match i % 100 {
            7 => assert_eq!(
                r.unwrap_err().code(),
                Some(&SqlState::DIVISION_BY_ZERO),
                "request {i}"
            ),
            50 => assert_eq!(r.unwrap(), (i, 1_250_025_000i64 as i32), "request {i}"),
            _ => assert_eq!(r.unwrap(), (i, i * 2), "request {i}"),
        }
    }

    // Pipelined writes, all of which must land on the source.
    let ins = client
        .prepare("insert into pipe values ($1::int4, ($1::int4)::text)")
        .await
        .unwrap();
    let n: u64 = future::try_join_all((0..1000i32).map(|i| {
        let (client, ins) = (&client, &ins);
        async move { client.execute(ins, &[&i]).await }
    }))
    .await
    .unwrap()
    .into_iter()
    .sum();
    assert_eq!(n, 1000);
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select count(*), sum(i), count(*) filter (where s = i::text) from pipe"
        ),
        "1000|499500|1000"
    );

    // Concurrent simple queries too.
    let texts = future::try_join_all((0..50).map(|i| {
        let client = &client;
        async move {
            client
                .simple_query(&format!("select {i}; select 'two'"))
                .await
        }
    }))
    .await
    .unwrap();
    for (i, msgs) in texts.iter().enumerate() {
        let vals: Vec<_> = msgs
            .iter()
            .filter_map(|m| {
                if let SimpleQueryMessage::Row(r) = m {
                    r.get(0).map(str::to_string)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(vals, [i.to_string(), "two".to_string()]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_error_then_rollback() {
    transaction_error_then_rollback_through(&Proxy::start(), "pgshift_t_libs_tx").await;
}

/// The same with every policy on: mirroring, every read routed to the
/// target and shadowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_error_then_rollback_with_every_policy_on() {
    let (p, _spool) = tokio::task::block_in_place(every_policy_on);
    transaction_error_then_rollback_through(&p, "pgshift_t_libs_tx_on").await;
    tokio::task::block_in_place(|| assert_mirrored_alike(&p, false));
}

async fn transaction_error_then_rollback_through(p: &Proxy, db: &str) {
    let c = p.clusters.clone();
    c.fresh_db(db);
    let mut client = connect(p, db).await;
    client
        .batch_execute("create table ledger (id int primary key, amount int check (amount > 0))")
        .await
        .unwrap();
    client
        .execute("insert into ledger values (1, 10)", &[])
        .await
        .unwrap();

    let tx = client.transaction().await.unwrap();
    tx.execute("insert into ledger values ($1, $2)", &[&2i32, &20i32])
        .await
        .unwrap();
    tx.execute("update ledger set amount = amount + 1", &[])
        .await
        .unwrap();
    let e = tx
        .execute("insert into ledger values ($1, $2)", &[&3i32, &-5i32])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::CHECK_VIOLATION), "{e:?}");
    let db_err = e.as_db_error().expect("a server error");
    assert_eq!(db_err.table(), Some("ledger"));
    assert_eq!(db_err.constraint(), Some("ledger_amount_check"));
    let e = tx.query_one("select 1", &[]).await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(&SqlState::IN_FAILED_SQL_TRANSACTION),
        "{e:?}"
    );
    // While aborted, the source shows the session idle in an aborted transaction.
    assert_eq!(
        c.sql(c.source_port, "postgres", &format!("select count(*) from pg_stat_activity where datname = '{db}' and state = 'idle in transaction (aborted)'")),
        "1"
    );
    tx.rollback().await.unwrap();
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select string_agg(id || '=' || amount, ',' order by id) from ledger"
        ),
        "1=10"
    );

    // The same client goes on: a committed transaction.
    let tx = client.transaction().await.unwrap();
    tx.execute("insert into ledger values ($1, $2)", &[&4i32, &40i32])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select string_agg(id || '=' || amount, ',' order by id) from ledger"
        ),
        "1=10,4=40"
    );
    // A dropped (neither committed nor rolled back) transaction rolls back.
    {
        let tx = client.transaction().await.unwrap();
        tx.execute("delete from ledger", &[]).await.unwrap();
    }
    assert_eq!(
        simple_value(&client, "select count(*) from ledger").await,
        "2"
    );
}

/// COPY text rows for `copytab (id int, txt text, b bytea)`, canonical form.
fn copy_rows(n: i32) -> Vec<u8> {
    let mut s = String::new();
    for i in 1..=n {
        let txt = match i % 9 {
            0 => "\\N".to_string(),
            1 => String::new(),
            2 => format!("tab\\there\\\\back{i}"),
            3 => format!("ünicode 日本 🐘 {i}"),
            4 => format!("line\\nbreak\\r{i}"),
            _ => format!("plain {i} {}", "p".repeat((i % 200) as usize)),
        };
        let b = if i % 4 == 0 {
            "\\N".to_string()
        } else {
            format!("\\\\x{}", hex(&i.to_be_bytes()))
        };
        s.push_str(&format!("{i}\t{txt}\t{b}\n"));
    }
    s.into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out() {
    copy_in_and_out_through(&Proxy::start(), "pgshift_t_libs_copy").await;
}

/// The same with every policy on: mirroring, every read routed to the
/// target and shadowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_with_every_policy_on() {
    let (p, _spool) = tokio::task::block_in_place(every_policy_on);
    copy_in_and_out_through(&p, "pgshift_t_libs_copy_on").await;
    tokio::task::block_in_place(|| assert_mirrored_alike(&p, true));
}

async fn copy_in_and_out_through(p: &Proxy, db: &str) {
    let c = p.clusters.clone();
    c.fresh_db(db);
    let client = connect(p, db).await;
    client
        .batch_execute("create table copytab (id int primary key, txt text, b bytea)")
        .await
        .unwrap();

    let data = copy_rows(10_000);
    let sink = client.copy_in("copy copytab from stdin").await.unwrap();
    pin_mut!(sink);
    // Uneven chunks that split rows (and multi-byte characters) anywhere.
    let mut rest = &data[..];
    let mut k = 0;
    while !rest.is_empty() {
        let n = [1, 7, 4096, 65_536, 333][k % 5].min(rest.len());
        sink.send(Bytes::copy_from_slice(&rest[..n])).await.unwrap();
        rest = &rest[n..];
        k += 1;
    }
    assert_eq!(sink.finish().await.unwrap(), 10_000);
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select count(*), count(txt), count(b), sum(id) from copytab"
        ),
        "10000|8889|7500|50005000"
    );

    let out: Vec<Bytes> = client
        .copy_out("copy (select * from copytab order by id) to stdout")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let out = out.concat();
    assert!(
        out == data,
        "COPY OUT through pgshift differs from what COPY IN sent ({} vs {} bytes)",
        out.len(),
        data.len()
    );

    // Binary format: through the proxy and straight from the source agree.
    let direct = connect_source(&c, db).await;
    let q = "copy (select * from copytab order by id) to stdout (format binary)";
    let via: Vec<Bytes> = client
        .copy_out(q)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let src: Vec<Bytes> = direct
        .copy_out(q)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(
        via.concat() == src.concat(),
        "binary COPY OUT differs from the source's own"
    );

    // Binary back in through the proxy.
    client
        .batch_execute("create table copytab2 (like copytab)")
        .await
        .unwrap();
    let sink = client
        .copy_in("copy copytab2 from stdin (format binary)")
        .await
        .unwrap();
    pin_mut!(sink);
    for chunk in via {
        sink.send(chunk).await.unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 10_000);
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select count(*) from (select * from copytab except select * from copytab2) d"
        ),
        "0"
    );

    // Bad data: the COPY fails with the server's SQLSTATE, nothing is kept.
    client
        .batch_execute("create table copytab3 (like copytab)")
        .await
        .unwrap();
    let sink = client.copy_in("copy copytab3 from stdin").await.unwrap();
    pin_mut!(sink);
    sink.send(Bytes::from_static(b"1\tok\t\\N\nnot-an-int\tbad\t\\N\n"))
        .await
        .unwrap();
    let e = sink.finish().await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(&SqlState::INVALID_TEXT_REPRESENTATION),
        "{e:?}"
    );

    // Aborted by the client (sink dropped unfinished: CopyFail).
    {
        let sink = client
            .copy_in::<_, Bytes>("copy copytab3 from stdin")
            .await
            .unwrap();
        pin_mut!(sink);
        sink.send(Bytes::from_static(b"5\thalf\t\\N\n"))
            .await
            .unwrap();
    }
    // With a mirror, the read below may go to the target only once the
    // target has the session's writes (read-your-writes keeps it on the
    // source until then); wait for that, or a slow applier on a stalled
    // machine keeps it on the source and the routed check fails.
    settle(p).await;
    assert_eq!(
        simple_value(&client, "select count(*) from copytab3").await,
        "0"
    );
    assert_eq!(
        c.sql(c.source_port, db, "select count(*) from copytab3"),
        "0"
    );
    assert_eq!(p.stat("/metrics/clients/protocol_errors"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_and_close_many_statements() {
    let p = Proxy::start();
    let c = p.clusters.clone();
    let db = "pgshift_t_libs_stmts";
    c.fresh_db(db);
    let client = connect(&p, db).await;
    let prepared = "select count(*) from pg_prepared_statements";
    for round in 0..4i32 {
        let mut stmts = Vec::new();
        for i in 0..200i32 {
            stmts.push(
                client
                    .prepare(&format!("select {i} + $1::int4, '{round}'"))
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(
            simple_value(&client, prepared).await,
            "200",
            "round {round}"
        );
        for (i, s) in stmts.iter().enumerate() {
            let r = client.query_one(s, &[&round]).await.unwrap();
            assert_eq!(r.get::<_, i32>(0), i as i32 + round);
            assert_eq!(r.get::<_, &str>(1), round.to_string());
        }
        // Dropping a Statement sends Close; all 200 go before the next query.
        drop(stmts);
        assert_eq!(simple_value(&client, prepared).await, "0", "round {round}");
    }
    // SQL-level PREPARE/EXECUTE/DEALLOCATE on the same session.
    client
        .batch_execute("prepare q1(int) as select $1 * 3; prepare q2 as select 'two'")
        .await
        .unwrap();
    assert_eq!(simple_value(&client, "execute q1(14)").await, "42");
    assert_eq!(simple_value(&client, prepared).await, "2");
    client.batch_execute("deallocate q1").await.unwrap();
    let e = client.batch_execute("execute q1(1)").await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::UNDEFINED_PSTATEMENT), "{e:?}");
    client.batch_execute("deallocate all").await.unwrap();
    assert_eq!(simple_value(&client, prepared).await, "0");
    // And the session still works in the extended protocol.
    let r = client
        .query_one("select $1::text || '!'", &[&"alive"])
        .await
        .unwrap();
    assert_eq!(r.get::<_, &str>(0), "alive!");
    assert_eq!(p.stat("/metrics/clients/protocol_errors"), 0);
}

/// Query and Parse are the messages the proxy buffers whole to inspect:
/// sizes around its 16 KiB read chunk and far beyond it, in both protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_query_and_parse_messages() {
    let p = Proxy::start();
    let db = "pgshift_t_libs_bigsql";
    p.clusters.fresh_db(db);
    let client = connect(&p, db).await;
    let overhead = "select length('')".len();
    for total in [
        16 * 1024 - 6,
        16 * 1024 - 5,
        16 * 1024,
        16 * 1024 + 1,
        64 * 1024 + 3,
        256 * 1024 + 1,
        8 * 1024 * 1024,
    ] {
        let n = total - overhead;
        let sql = format!(
            "select length('{}')",
            "é".repeat(n / 2) + &"x".repeat(n % 2)
        );
        let want = (n / 2 + n % 2).to_string();
        assert_eq!(
            simple_value(&client, &sql).await,
            want,
            "simple query of {} bytes",
            sql.len()
        );
        let r = client.query_one(sql.as_str(), &[]).await.unwrap();
        assert_eq!(
            r.get::<_, i32>(0).to_string(),
            want,
            "extended query of {} bytes",
            sql.len()
        );
    }
    // Pipelined large statements mixed with small ones.
    let big = format!("select '{}'::text", "q".repeat(300_000));
    let results = future::try_join_all((0..20).map(|i| {
        let (client, big) = (&client, &big);
        async move {
            if i % 2 == 0 {
                client
                    .query_one(big.as_str(), &[])
                    .await
                    .map(|r| r.get::<_, String>(0).len())
            } else {
                client
                    .query_one("select $1::int4", &[&i])
                    .await
                    .map(|r| r.get::<_, i32>(0) as usize)
            }
        }
    }))
    .await
    .unwrap();
    for (i, n) in results.into_iter().enumerate() {
        assert_eq!(n, if i % 2 == 0 { 300_000 } else { i }, "request {i}");
    }
    assert_eq!(p.stat("/metrics/clients/protocol_errors"), 0);
}

#[test]
fn psycopg3_session() {
    psycopg3_session_through(&Proxy::start(), "pgshift_t_libs_psycopg");
}

/// The same with every policy on: mirroring, every read routed to the
/// target and shadowed.
#[test]
fn psycopg3_session_with_every_policy_on() {
    let (p, _spool) = every_policy_on();
    psycopg3_session_through(&p, "pgshift_t_libs_psycopg_on");
    assert_mirrored_alike(&p, false);
}

fn psycopg3_session_through(p: &Proxy, db: &str) {
    let c = &p.clusters;
    c.fresh_db(db);
    let script = repo_root().join("tests/python/psycopg_session.py");
    let conninfo = format!(
        "{} password=scram-secret connect_timeout=20",
        p.url("pgshift_scram", db)
    );
    let out = Command::new("python3")
        .arg(&script)
        .arg(&conninfo)
        .env_remove("PGPASSWORD")
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "psycopg session failed ({}); is psycopg installed (pip install 'psycopg[binary]')?\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert_eq!(
        stdout.lines().last(),
        Some("psycopg: OK"),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("rows: 3103\n"), "{stdout}");
    // What the script committed is on the source.
    assert_eq!(
        c.sql(c.source_port, db, "select count(*), count(*) filter (where id between 1001 and 3000), count(*) filter (where id >= 8000 and id < 9000), max(id) from orders"),
        "3103|2000|0|9000"
    );
    assert_eq!(
        c.sql(
            c.source_port,
            db,
            "select tableowner from pg_tables where tablename = 'orders'"
        ),
        "pgshift_scram"
    );
}

/// The backend pid a client sees in BackendKeyData (libpq's PQbackendPID,
/// psycopg's `info.backend_pid`) is the real source backend's pid, as
/// applications compare it with `pg_backend_pid()` and with the pid in
/// NOTIFY messages to skip their own notifications.
#[test]
fn backend_pid_seen_by_the_client_is_the_real_one() {
    let p = Proxy::start();
    let script = "import psycopg, sys\n\
        c = psycopg.connect(sys.argv[1], autocommit=True)\n\
        c.execute('listen me'); c.execute('notify me')\n\
        n = next(c.notifies(timeout=5))\n\
        print(c.info.backend_pid, c.execute('select pg_backend_pid()').fetchone()[0], n.pid)\n";
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(p.url(SUPERUSER, "postgres"))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let pids: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(pids.len(), 3, "{text}");
    assert_eq!(
        pids[0], pids[1],
        "PQbackendPID differs from pg_backend_pid()"
    );
    assert_eq!(pids[0], pids[2], "own notification carries another pid");
}

/// Issue 17, "transparent in every mode": client libraries' own test suites
/// (scripts/client_suites.sh: asyncpg, psycopg2 and pg8000, their tests taken
/// from their PyPI sdists) pass through a pgshift that mirrors every write,
/// routes half the sessions' reads to the target and shadows every read,
/// test by test exactly as they pass straight against the source. A test
/// that fails straight against Postgres too (in any of three re-runs), or
/// fails through pgshift once and passes its three re-runs there, is only
/// reported; nothing else is excused. The script's own verdict is the
/// assertion; its files stay in target/client-suites/cargo-test.
#[test]
fn client_library_suites_pass_through_pgshift_as_straight() {
    let spool = tempfile::tempdir().unwrap();
    let spool_dir = spool.path().to_path_buf();
    let p = Proxy::start_with(move |cfg| {
        let c = Clusters::get();
        mirror::mirror_config(cfg, &spool_dir);
        // asyncpg's COPY tests commit 200 MB at once: past the default
        // limit mirroring would stop (a recorded gap) for the rest of the run.
        cfg["mirror"]["max_txn_bytes"] = toml_edit::value(1i64 << 30);
        let mut routing = toml_edit::Table::new();
        routing["read_percent"] = toml_edit::value(50.0);
        cfg["routing"] = toml_edit::Item::Table(routing);
        let mut shadow = toml_edit::Table::new();
        shadow["sample_percent"] = toml_edit::value(100.0);
        cfg["shadow"] = toml_edit::Item::Table(shadow);
        // The source offers TLS, and the suites' SSL tests expect it.
        cfg["listen"]["tls_cert"] = toml_edit::value(c.server_cert().display().to_string());
        cfg["listen"]["tls_key"] = toml_edit::value(c.server_key().display().to_string());
    });
    let c = &p.clusters;
    let out_dir = repo_root().join("target/client-suites/cargo-test");
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/client_suites.sh"))
        .arg("compare")
        .args(["--source-port", &c.source_port.to_string()])
        .args(["--target-port", &c.target_port.to_string()])
        .args(["--proxy-port", &p.port.to_string()])
        .arg("--out")
        .arg(&out_dir)
        .env("PGSHIFT_HOST", &c.host)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run scripts/client_suites.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(60).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "client suites differ through pgshift ({}); per-test results and logs in {}\n{stdout}\n---- end of the harness log ----\n{}",
        out.status,
        out_dir.display(),
        tail.join("\n")
    );
    assert!(stdout.contains("client-suites: "), "no verdict:\n{stdout}");
}
