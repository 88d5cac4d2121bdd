//! Shadow-read comparison: what the shadow executor pays per shadowed read
//! to compare the served answer with the other side's.
//!
//! The work is in two parts (`shadow::compare`): each side's backend
//! messages go through a `Collector` (per DataRow: split the fields,
//! normalise numeric/float/timestamp values, hash the row, keep it within
//! the retention budget), then `compare` looks at the two summaries (for
//! equal answers: counts and multiset hashes; for a difference: localising
//! the differing rows, pairing them under a float tolerance, the report).
//! `compare` alone is almost free when the answers agree, so each bench
//! times both sides' collection plus the comparison, which is what one
//! shadowed read costs the executor. The messages are built beforehand.
//!
//! Settings are the proxy's defaults (`[shadow]` with nothing set:
//! `max_rows_compared` 100,000, 1 MiB of row bytes retained per side).
//!
//! Throughput is per answer compared, counted once (not once per side):
//! `compare_bytes/*` in DataRow body bytes, `compare_rows/*` in rows. The
//! two groups time the same routines, since criterion reports one
//! throughput unit per benchmark.

use std::collections::HashSet;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgshift::config::ShadowConfig;
use pgshift::shadow::compare::{
    compare, Collector, CompareSettings, Comparison, IgnoredTableColumns, Order, SortKey,
};

const INT4: u32 = 23;
const INT8: u32 = 20;
const TEXT: u32 = 25;
const NUMERIC: u32 = 1700;
const FLOAT8: u32 = 701;
const TIMESTAMPTZ: u32 = 1184;

/// `SELECT id, name, balance, score, created_at, note, parent_id FROM accounts ...`
const COLUMNS: &[(&str, u32)] = &[
    ("id", INT4),
    ("name", TEXT),
    ("balance", NUMERIC),
    ("score", FLOAT8),
    ("created_at", TIMESTAMPTZ),
    ("note", TEXT),
    ("parent_id", INT8),
];

type Msgs = Vec<(u8, Vec<u8>)>;
type Row = Vec<Option<String>>;

fn row_description() -> Vec<u8> {
    let mut b = (COLUMNS.len() as i16).to_be_bytes().to_vec();
    for (attnum, (name, ty)) in COLUMNS.iter().enumerate() {
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(&16_384u32.to_be_bytes()); // table OID
        b.extend_from_slice(&(attnum as i16 + 1).to_be_bytes());
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(&(-1i16).to_be_bytes()); // type size
        b.extend_from_slice(&(-1i32).to_be_bytes()); // type modifier
        b.extend_from_slice(&0i16.to_be_bytes()); // text format
    }
    b
}

fn data_row(values: &[Option<String>]) -> Vec<u8> {
    let mut b = (values.len() as i16).to_be_bytes().to_vec();
    for v in values {
        match v {
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v.as_bytes());
            }
        }
    }
    b
}

/// Row `i` as Postgres sends it in text format. `score_jitter` changes the
/// float in its 15th significant digit (parallel aggregation noise: beyond
/// what normalisation hides, within a 1e-9 tolerance).
fn row(i: usize, score_jitter: bool) -> Row {
    let score = 1_000.0 + (i as f64) * 0.731_923_417;
    let score = if score_jitter {
        score * (1.0 + 3e-14)
    } else {
        score
    };
    vec![
        Some((i + 1).to_string()),
        Some(format!("customer {:06}", i * 7_919 % 1_000_000)),
        Some(format!("{}.{:02}", i * 37 % 100_000, i % 100)),
        Some(format!("{score:.12}")),
        Some(format!(
            "2024-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00",
            i % 12 + 1,
            i % 28 + 1,
            i % 24,
            i % 60,
            (i * 7) % 60,
            i * 1_337 % 1_000_000
        )),
        (!i.is_multiple_of(3)).then(|| format!("note for {i}")),
        (!i.is_multiple_of(5)).then(|| (i / 5 + 1).to_string()),
    ]
}

/// A whole simple-protocol answer: RowDescription, DataRows,
/// CommandComplete, ReadyForQuery. `change(i, row)` may alter a row.
fn answer(rows: usize, change: impl Fn(usize, &mut Row)) -> Msgs {
    let mut m = vec![(b'T', row_description())];
    for i in 0..rows {
        let mut r = row(i, false);
        change(i, &mut r);
        m.push((b'D', data_row(&r)));
    }
    let mut tag = format!("SELECT {rows}").into_bytes();
    tag.push(0);
    m.push((b'C', tag));
    m.push((b'Z', b"I".to_vec()));
    m
}

fn data_row_bytes(m: &Msgs) -> u64 {
    m.iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, b)| b.len() as u64)
        .sum()
}

struct Case {
    name: String,
    served: Msgs,
    shadow: Msgs,
    settings: Arc<CompareSettings>,
    orders: Vec<Order>,
    rows: u64,
    same: bool,
}

/// Both sides collected and compared, as the executor does.
fn run(c: &Case, ignored: &Arc<IgnoredTableColumns>) -> Comparison {
    let side = |msgs: &Msgs| {
        let mut col = Collector::new(
            Arc::clone(&c.settings),
            Arc::clone(ignored),
            c.orders.clone(),
            HashSet::new(),
        );
        for (tag, body) in msgs {
            if col.message(*tag, body).unwrap() {
                break;
            }
        }
        col.finish()
    };
    let a = side(black_box(&c.served));
    let b = side(black_box(&c.shadow));
    compare(&a, &b, &c.settings)
}

fn case(
    name: &str,
    rows: usize,
    settings: &Arc<CompareSettings>,
    orders: Vec<Order>,
    shadow_change: impl Fn(usize, &mut Row),
    same: bool,
) -> Case {
    Case {
        name: format!("{name}/{rows}"),
        served: answer(rows, |_, _| {}),
        shadow: answer(rows, shadow_change),
        settings: Arc::clone(settings),
        orders,
        rows: rows as u64,
        same,
    }
}

fn cases() -> Vec<Case> {
    let defaults = pgshift::shadow::ShadowSettings::from_config(&ShadowConfig::default()).compare;
    let tolerant = Arc::new(CompareSettings {
        float_tolerance: 1e-9,
        ..(*defaults).clone()
    });
    let by_id = || vec![Order::Keys(vec![SortKey::Name("id".into())])];
    let equal = |_: usize, _: &mut Row| {};
    let mut out = Vec::new();
    // Equal answers, no ORDER BY (compared as multisets).
    for rows in [1, 100, 10_000] {
        out.push(case("equal", rows, &defaults, Vec::new(), equal, true));
    }
    // Equal, with ORDER BY id (compared in order, by tie group).
    out.push(case(
        "equal_order_by_id",
        10_000,
        &defaults,
        by_id(),
        equal,
        true,
    ));
    // The last row's name differs. (At 10,000 rows, ~1.1 MB, that row's
    // bytes are past the 1 MiB retention budget: the report names it by
    // hash, as it would in the proxy.)
    for rows in [100, 10_000] {
        let last = rows - 1;
        let change = move |i: usize, r: &mut Row| {
            if i == last {
                r[1] = Some("customer changed".into());
            }
        };
        out.push(case(
            "last_row_differs",
            rows,
            &defaults,
            Vec::new(),
            change,
            false,
        ));
    }
    // Every float differs beyond 15 digits: rows localised, decoded and
    // paired under float_tolerance = 1e-9, found equal. 1,000 rows, because
    // pairing needs every differing row's bytes, and 10,000 of these rows
    // are past the default 1 MiB retained per side (the comparison would
    // then end in a report instead).
    out.push(case(
        "float_tolerance_all_rows",
        1_000,
        &tolerant,
        Vec::new(),
        |i, r: &mut Row| r[3] = row(i, true)[3].clone(),
        true,
    ));
    out
}

fn bench(c: &mut Criterion) {
    let ignored: Arc<IgnoredTableColumns> = Arc::new(Vec::new());
    let cases = cases();
    // Each case's outcome is checked once, so the names stay true.
    for case in &cases {
        let r = run(case, &ignored);
        assert_eq!(
            matches!(r, Comparison::Same),
            case.same,
            "{}: {r:?}",
            case.name
        );
    }
    for (group, bytes) in [("compare_bytes", true), ("compare_rows", false)] {
        let mut g = c.benchmark_group(group);
        for case in &cases {
            g.throughput(if bytes {
                Throughput::Bytes(data_row_bytes(&case.served))
            } else {
                Throughput::Elements(case.rows)
            });
            g.bench_function(&case.name, |b| b.iter(|| run(case, &ignored)));
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
