//! Statement classification on the hot path: what `Classifier::classify`
//! costs for a statement seen before and for one seen for the first time,
//! what the pg_query-based `analyze` costs (the mirror's applier, once per
//! distinct text), and what the lexer's `shape_key` alone costs.
//! Throughput is in statements (or bytes for the lexer), so a regression
//! shows as fewer per second.
//!
//! How `classify` answers decides what "cached" means here:
//! 1. the lexical pass (`lexer::split` + `tokens`) runs first, on every
//!    call; when it is certain of every statement the answer comes from it
//!    and the cache is never consulted. pgbench's SELECT and TPC-B UPDATE,
//!    the CTE join and `BEGIN; UPDATE; SELECT; COMMIT;` are all decided
//!    this way, so for them "repeated" and "first time" cost the same: the
//!    `classify_repeated/lexical/*` benches are their cached case and their
//!    uncached case at once (checked below through `Classifier::stats`).
//! 2. otherwise the whole query string is looked up in the per-classifier
//!    cache, and only on a miss parsed by libpg_query and inserted. The
//!    `cache_hit/*` benches repeat statements the lexer hands to the parser
//!    (`FOR UPDATE`, a multi-statement string containing one, a writable
//!    CTE), so every iteration after the first is a cache hit.
//!
//! Uncached (`classify_uncached/*`): a fresh `Classifier` per iteration
//! (built and dropped outside the timing by `iter_batched_ref`), so every
//! call misses: lexical pass, libpg_query parse and classification, and
//! the cache insert. Varying literals would work too (the cache keys on the
//! exact text) but would time the text generation or need an unbounded
//! supply of texts; a fresh classifier costs nothing to build
//! (`HashMap::new` does not allocate).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pgshift::classify::analyze::analyze;
use pgshift::classify::lexer::shape_key;
use pgshift::classify::{Classifier, Rules};

/// pgbench's select-only statement (`-M extended` / `-M prepared` text).
const PGBENCH_SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;";
/// TPC-B (pgbench's default script): the account update.
const TPCB_UPDATE: &str = "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;";
/// A reporting query: three tables joined, one through a CTE.
const CTE_JOIN: &str = "WITH recent AS (\
     SELECT o.id, o.customer_id, o.total, o.created_at FROM orders o \
     WHERE o.created_at > now() - interval '7 days' AND o.status <> 'cancelled') \
     SELECT c.id, c.name, c.email, r.id AS order_id, r.total, sum(i.quantity * i.unit_price) AS items_total \
     FROM recent r \
     JOIN customers c ON c.id = r.customer_id \
     JOIN order_items i ON i.order_id = r.id \
     WHERE c.region = 'eu-west' \
     GROUP BY c.id, c.name, c.email, r.id, r.total \
     ORDER BY r.total DESC LIMIT 50";
/// A simple-protocol transaction sent as one query string (pgbench
/// `-M simple` with literals substituted).
const MULTI_TXN: &str = "BEGIN; \
     UPDATE pgbench_accounts SET abalance = abalance + -4215 WHERE aid = 77123; \
     SELECT abalance FROM pgbench_accounts WHERE aid = 77123; \
     COMMIT;";
/// Statements the lexical pass cannot be sure of: these go to libpg_query,
/// whose answer is cached by text.
const SELECT_FOR_UPDATE: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1 FOR UPDATE;";
const MULTI_TXN_FOR_UPDATE: &str = "BEGIN; \
     SELECT abalance FROM pgbench_accounts WHERE aid = 77123 FOR UPDATE; \
     UPDATE pgbench_accounts SET abalance = abalance + -4215 WHERE aid = 77123; \
     COMMIT;";
const CTE_ARCHIVE: &str = "WITH moved AS (\
     DELETE FROM orders o USING customers c \
     WHERE o.customer_id = c.id AND c.region = 'eu-west' AND o.created_at < now() - interval '1 year' \
     RETURNING o.*) \
     INSERT INTO orders_archive SELECT * FROM moved";

/// (bench name, text, statements in it)
const LEXICAL: &[(&str, &str, u64)] = &[
    ("pgbench_select", PGBENCH_SELECT, 1),
    ("tpcb_update", TPCB_UPDATE, 1),
    ("cte_join_3_tables", CTE_JOIN, 1),
    ("multi_begin_update_select_commit", MULTI_TXN, 4),
];
const PARSED: &[(&str, &str, u64)] = &[
    ("select_for_update", SELECT_FOR_UPDATE, 1),
    (
        "multi_begin_select_for_update_commit",
        MULTI_TXN_FOR_UPDATE,
        4,
    ),
    ("cte_delete_returning_insert", CTE_ARCHIVE, 1),
];

fn rules() -> Arc<Rules> {
    Arc::new(Rules::new(&["audit_log".to_string()]))
}

/// Checks which path a text takes, so the bench names stay true if the
/// lexical pass learns (or forgets) a shape.
fn check_path(sql: &str, statements: u64, lexical: bool) {
    let mut c = Classifier::new(rules());
    assert_eq!(c.classify(sql).len() as u64, statements, "{sql}");
    c.classify(sql);
    let s = c.stats;
    if lexical {
        assert_eq!((s.lexical, s.parsed, s.cached), (2, 0, 0), "{sql}");
    } else {
        assert_eq!((s.lexical, s.parsed, s.cached), (0, 1, 1), "{sql}");
    }
}

fn classify(c: &mut Criterion) {
    for (_, sql, n) in LEXICAL {
        check_path(sql, *n, true);
    }
    for (_, sql, n) in PARSED {
        check_path(sql, *n, false);
    }

    // The same text over and over, one classifier (one per worker thread,
    // as the proxy has).
    let mut g = c.benchmark_group("classify_repeated");
    for (name, sql, n) in LEXICAL {
        let mut classifier = Classifier::new(rules());
        g.throughput(Throughput::Elements(*n));
        g.bench_function(format!("lexical/{name}"), |b| {
            b.iter(|| classifier.classify(black_box(sql)))
        });
    }
    for (name, sql, n) in PARSED {
        let mut classifier = Classifier::new(rules());
        classifier.classify(sql); // the miss happens here, not in the loop
        g.throughput(Throughput::Elements(*n));
        g.bench_function(format!("cache_hit/{name}"), |b| {
            b.iter(|| classifier.classify(black_box(sql)))
        });
    }
    g.finish();

    // First sight of a text: a fresh classifier per iteration (see the top).
    let mut g = c.benchmark_group("classify_uncached");
    for (name, sql, n) in PARSED {
        let rules = rules();
        g.throughput(Throughput::Elements(*n));
        g.bench_function(format!("fresh_classifier/{name}"), |b| {
            b.iter_batched_ref(
                || Classifier::new(Arc::clone(&rules)),
                |classifier| classifier.classify(black_box(sql)),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();

    // The applier's per-distinct-text analysis (fingerprint, parse tree
    // walk): no cache inside, every call does the whole work.
    let mut g = c.benchmark_group("classify_analyze");
    for (name, sql, n) in LEXICAL.iter().chain(PARSED) {
        g.throughput(Throughput::Elements(*n));
        g.bench_function(*name, |b| b.iter(|| analyze(black_box(sql))));
    }
    g.finish();

    // The lexer alone: the cache key for per-statement analysis.
    let mut g = c.benchmark_group("classify_shape_key");
    for (name, sql, _) in LEXICAL.iter().chain(&PARSED[..1]) {
        g.throughput(Throughput::Bytes(sql.len() as u64));
        g.bench_function(*name, |b| b.iter(|| shape_key(black_box(sql))));
    }
    g.finish();
}

criterion_group!(benches, classify);
criterion_main!(benches);
