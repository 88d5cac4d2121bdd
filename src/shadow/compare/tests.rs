//! Unit tests of the comparer: collecting, normalising, diffing and
//! reporting, on answers built message by message.

use std::collections::HashSet;
use std::sync::Arc;

use super::*;

const INT4: u32 = 23;
const TEXT: u32 = 25;

type Msgs = Vec<(u8, Vec<u8>)>;

fn t_full(cols: &[(&str, u32, u32, i16)]) -> Vec<u8> {
    let mut b = (cols.len() as i16).to_be_bytes().to_vec();
    for (name, table, ty, format) in cols {
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(&table.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&format.to_be_bytes());
    }
    b
}

fn t(cols: &[(&str, u32)]) -> Vec<u8> {
    let full: Vec<_> = cols.iter().map(|(n, ty)| (*n, 0u32, *ty, 0i16)).collect();
    t_full(&full)
}

fn d_raw(vals: &[Option<&[u8]>]) -> Vec<u8> {
    let mut b = (vals.len() as i16).to_be_bytes().to_vec();
    for v in vals {
        match v {
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v);
            }
        }
    }
    b
}

fn dr(vals: &[Option<&str>]) -> Vec<u8> {
    let raw: Vec<Option<&[u8]>> = vals.iter().map(|v| v.map(str::as_bytes)).collect();
    d_raw(&raw)
}

fn cstr(s: &str) -> Vec<u8> {
    let mut b = s.as_bytes().to_vec();
    b.push(0);
    b
}

fn e(code: &str, msg: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend(cstr("ERROR"));
    b.push(b'C');
    b.extend(cstr(code));
    b.push(b'M');
    b.extend(cstr(msg));
    b.push(0);
    b
}

/// Non-NULL text row.
fn r<'a>(vals: &[&'a str]) -> Vec<Option<&'a str>> {
    vals.iter().map(|v| Some(*v)).collect()
}

/// A simple-protocol SELECT answer, ended by ReadyForQuery.
fn select(cols: &[(&str, u32)], rows: &[Vec<Option<&str>>]) -> Msgs {
    let mut m = vec![(b'T', t(cols))];
    m.extend(rows.iter().map(|row| (b'D', dr(row))));
    m.push((b'C', cstr(&format!("SELECT {}", rows.len()))));
    m.push((b'Z', vec![b'I']));
    m
}

fn collect_full(
    settings: &CompareSettings,
    ignored: IgnoredTableColumns,
    orders: Vec<Order>,
    wanted: HashSet<u64>,
    msgs: &Msgs,
) -> Answer {
    let mut c = Collector::new(
        Arc::new(settings.clone()),
        Arc::new(ignored),
        orders,
        wanted,
    );
    for (tag, body) in msgs {
        c.message(*tag, body).unwrap();
    }
    c.finish()
}

fn collect(settings: &CompareSettings, orders: Vec<Order>, msgs: &Msgs) -> Answer {
    collect_full(settings, Vec::new(), orders, HashSet::new(), msgs)
}

fn cmp_with(settings: &CompareSettings, orders: Vec<Order>, a: &Msgs, b: &Msgs) -> Comparison {
    let x = collect(settings, orders.clone(), a);
    let y = collect(settings, orders, b);
    compare(&x, &y, settings)
}

fn cmp(a: &Msgs, b: &Msgs) -> Comparison {
    cmp_with(&CompareSettings::default(), Vec::new(), a, b)
}

fn is_same(c: &Comparison) -> bool {
    matches!(c, Comparison::Same)
}

fn differ(c: Comparison) -> Difference {
    match c {
        Comparison::Differ(d) => d,
        Comparison::Same => panic!("expected a difference"),
    }
}

fn by(keys: &[SortKey]) -> Vec<Order> {
    vec![Order::Keys(keys.to_vec())]
}

fn name(n: &str) -> SortKey {
    SortKey::Name(n.into())
}

/// One-column answer of the given type.
fn one(ty: u32, vals: &[Option<&str>]) -> Msgs {
    let rows: Vec<_> = vals.iter().map(|v| vec![*v]).collect();
    select(&[("v", ty)], &rows)
}

fn norm(ty: u32, text: &str) -> String {
    String::from_utf8(normalize(ty, 0, text.as_bytes()).into_owned()).unwrap()
}

const ACCOUNTS: &[(&str, u32)] = &[("aid", INT4), ("bid", INT4), ("abalance", INT4)];

#[test]
fn equal_answers_are_same() {
    let a = select(ACCOUNTS, &[r(&["1", "1", "10"]), r(&["2", "1", "20"])]);
    assert!(is_same(&cmp(&a, &a)));
    let x = collect(&CompareSettings::default(), Vec::new(), &a);
    assert!(x.complete);
    assert_eq!(x.sets.len(), 1);
    assert_eq!(x.sets[0].rows, 2);
    assert_eq!(x.sets[0].end, End::Tag("SELECT 2".into()));
    assert_eq!(x.sets[0].columns.as_ref().unwrap()[2].name, "abalance");
}

#[test]
fn changed_value_reports_column_and_values() {
    let a = select(ACCOUNTS, &[r(&["1", "1", "10"]), r(&["2", "1", "20"])]);
    let b = select(ACCOUNTS, &[r(&["1", "1", "11"]), r(&["2", "1", "20"])]);
    let d = differ(cmp(&a, &b));
    assert_eq!(d.kind, DiffKind::Rows);
    assert_eq!(d.result_set, 0);
    assert_eq!(d.first_column.as_deref(), Some("abalance"));
    assert_eq!(
        d.detail,
        "column 3 \"abalance\" differs: served 10 vs shadow 11"
    );
    assert_eq!(
        d.rows_a,
        vec![vec![
            Some("1".to_string()),
            Some("1".into()),
            Some("10".into())
        ]]
    );
    assert_eq!(
        d.rows_b,
        vec![vec![
            Some("1".to_string()),
            Some("1".into()),
            Some("11".into())
        ]]
    );
    assert!(d.wanted_a.is_empty() && d.wanted_b.is_empty());
    // Serialisable for reports.
    let json = serde_json::to_string(&d).unwrap();
    assert!(json.contains("\"kind\":\"Rows\""));
}

#[test]
fn pairing_picks_the_most_similar_row() {
    let a = select(ACCOUNTS, &[r(&["1", "1", "10"]), r(&["2", "2", "20"])]);
    let b = select(ACCOUNTS, &[r(&["2", "2", "21"]), r(&["1", "1", "11"])]);
    let d = differ(cmp(&a, &b));
    assert_eq!(d.first_column.as_deref(), Some("abalance"));
    assert_eq!(d.rows_a.len(), 2);
    assert_eq!(d.rows_b.len(), 2);
    // Paired rows are shown side by side.
    assert_eq!(d.rows_a[0][0], d.rows_b[0][0]);
    assert_eq!(d.rows_a[1][0], d.rows_b[1][0]);
}

#[test]
fn unordered_rows_in_any_order_are_same() {
    let a = select(
        ACCOUNTS,
        &[
            r(&["1", "1", "10"]),
            r(&["2", "1", "20"]),
            r(&["3", "1", "30"]),
        ],
    );
    let b = select(
        ACCOUNTS,
        &[
            r(&["3", "1", "30"]),
            r(&["1", "1", "10"]),
            r(&["2", "1", "20"]),
        ],
    );
    assert!(is_same(&cmp(&a, &b)));
}

#[test]
fn duplicates_count_as_a_multiset() {
    let a = select(&[("v", INT4)], &[r(&["1"]), r(&["1"]), r(&["2"])]);
    let b = select(&[("v", INT4)], &[r(&["1"]), r(&["2"]), r(&["2"])]);
    let d = differ(cmp(&a, &b));
    assert_eq!(d.kind, DiffKind::Rows);
    assert_eq!(d.detail, "column 1 \"v\" differs: served 1 vs shadow 2");
}

#[test]
fn keyed_ties_may_break_differently() {
    let a = select(
        ACCOUNTS,
        &[
            r(&["1", "1", "10"]),
            r(&["2", "1", "10"]),
            r(&["3", "2", "5"]),
        ],
    );
    let b = select(
        ACCOUNTS,
        &[
            r(&["2", "1", "10"]),
            r(&["1", "1", "10"]),
            r(&["3", "2", "5"]),
        ],
    );
    let s = CompareSettings::default();
    assert!(is_same(&cmp_with(&s, by(&[name("abalance")]), &a, &b)));
    assert!(is_same(&cmp_with(&s, by(&[SortKey::Position(2)]), &a, &b)));
    // Fully ordered by aid, the swap is a real difference.
    let d = differ(cmp_with(&s, by(&[name("aid")]), &a, &b));
    assert_eq!(d.kind, DiffKind::Rows);
    assert!(
        d.detail.starts_with("row 1: column 1 \"aid\""),
        "{}",
        d.detail
    );
}

#[test]
fn keyed_order_violation_differs() {
    let a = select(
        ACCOUNTS,
        &[
            r(&["1", "1", "10"]),
            r(&["2", "1", "20"]),
            r(&["3", "1", "30"]),
        ],
    );
    let b = select(
        ACCOUNTS,
        &[
            r(&["1", "1", "10"]),
            r(&["3", "1", "30"]),
            r(&["2", "1", "20"]),
        ],
    );
    let s = CompareSettings::default();
    let d = differ(cmp_with(&s, by(&[name("aid")]), &a, &b));
    assert_eq!(d.kind, DiffKind::Rows);
    assert_eq!(d.first_column.as_deref(), Some("aid"));
    assert_eq!(
        d.detail,
        "row 2: column 1 \"aid\" differs: served 2 vs shadow 3"
    );
    // Unordered the same rows are equal.
    assert!(is_same(&cmp_with(&s, Vec::new(), &a, &b)));
    // An unresolvable key falls back to unordered.
    assert!(is_same(&cmp_with(&s, by(&[name("nope")]), &a, &b)));
    assert!(is_same(&cmp_with(&s, by(&[SortKey::Position(4)]), &a, &b)));
    assert!(is_same(&cmp_with(&s, by(&[SortKey::Position(0)]), &a, &b)));
}

#[test]
fn keyed_extra_trailing_row() {
    let a = select(&[("v", INT4)], &[r(&["1"]), r(&["2"]), r(&["3"])]);
    let b = select(&[("v", INT4)], &[r(&["1"]), r(&["2"])]);
    let d = differ(cmp_with(
        &CompareSettings::default(),
        by(&[name("v")]),
        &a,
        &b,
    ));
    assert_eq!(d.kind, DiffKind::RowCount);
    assert_eq!(d.rows_a, vec![vec![Some("3".to_string())]]);
    assert!(d.rows_b.is_empty());
}

#[test]
fn ambiguous_key_name_is_unordered() {
    let cols = &[("x", INT4), ("x", INT4)];
    let a = select(cols, &[r(&["1", "1"]), r(&["2", "2"])]);
    let b = select(cols, &[r(&["2", "2"]), r(&["1", "1"])]);
    assert!(is_same(&cmp_with(
        &CompareSettings::default(),
        by(&[name("x")]),
        &a,
        &b
    )));
}

#[test]
fn null_and_empty_string() {
    let null = one(TEXT, &[None]);
    let empty = one(TEXT, &[Some("")]);
    assert!(is_same(&cmp(&null, &null)));
    assert!(is_same(&cmp(&empty, &empty)));
    let d = differ(cmp(&null, &empty));
    assert_eq!(d.detail, "column 1 \"v\" differs: served NULL vs shadow ''");
    assert_eq!(d.rows_a, vec![vec![None]]);
    assert_eq!(d.rows_b, vec![vec![Some(String::new())]]);
    // NULLs don't run into neighbouring values.
    let a = select(&[("a", TEXT), ("b", TEXT)], &[vec![None, Some("x")]]);
    let b = select(&[("a", TEXT), ("b", TEXT)], &[vec![Some("x"), None]]);
    assert!(!is_same(&cmp(&a, &b)));
}

#[test]
fn float_normalisation() {
    let same = |ty, x: &str, y: &str| is_same(&cmp(&one(ty, &[Some(x)]), &one(ty, &[Some(y)])));
    assert!(same(OID_FLOAT8, "-0", "0"));
    assert!(same(OID_FLOAT8, "0.1", "0.10000000000000001"));
    assert!(same(OID_FLOAT8, "0.30000000000000004", "0.3"));
    assert!(same(OID_FLOAT8, "NaN", "NaN"));
    assert!(same(OID_FLOAT8, "Infinity", "Infinity"));
    assert!(same(OID_FLOAT8, "1e+100", "1.0000000000000000e100"));
    assert!(!same(OID_FLOAT8, "Infinity", "-Infinity"));
    assert!(!same(OID_FLOAT8, "0.1", "0.1001"));
    assert!(same(OID_FLOAT4, "0.1", "0.100000001"));
    assert!(same(OID_FLOAT4, "-0", "0"));
    assert!(!same(OID_FLOAT4, "0.1", "0.10001"));
    assert!(same(OID_FLOAT8, "junk", "junk"));
    assert!(!same(OID_FLOAT8, "junk", "junk2"));
}

#[test]
fn binary_floats_and_hex_rendering() {
    let bin = |ty: u32, v: &[u8]| {
        vec![
            (b'T', t_full(&[("f", 0, ty, 1)])),
            (b'D', d_raw(&[Some(v)])),
            (b'C', cstr("SELECT 1")),
            (b'Z', vec![b'I']),
        ]
    };
    let pos = 0f64.to_be_bytes();
    let neg = (-0f64).to_be_bytes();
    assert!(is_same(&cmp(
        &bin(OID_FLOAT8, &pos),
        &bin(OID_FLOAT8, &neg)
    )));
    let pos4 = 0f32.to_be_bytes();
    let neg4 = (-0f32).to_be_bytes();
    assert!(is_same(&cmp(
        &bin(OID_FLOAT4, &pos4),
        &bin(OID_FLOAT4, &neg4)
    )));
    let d = differ(cmp(&bin(INT4, &[0, 0, 0, 1]), &bin(INT4, &[0, 0, 0, 2])));
    assert_eq!(d.rows_a, vec![vec![Some("\\x00000001".to_string())]]);
    assert_eq!(
        d.detail,
        "column 1 \"f\" differs: served \\x00000001 vs shadow \\x00000002"
    );
    // Binary float tolerance.
    let s = CompareSettings {
        float_tolerance: 1e-9,
        ..CompareSettings::default()
    };
    let x = 1.0f64.to_be_bytes();
    let y = (1.0f64 + 1e-12).to_be_bytes();
    assert!(is_same(&cmp_with(
        &s,
        Vec::new(),
        &bin(OID_FLOAT8, &x),
        &bin(OID_FLOAT8, &y)
    )));
}

#[test]
fn float_tolerance_pairs_rows() {
    let cols = &[("id", INT4), ("x", OID_FLOAT8)];
    let a = select(cols, &[r(&["1", "1.0"]), r(&["2", "100"]), r(&["3", "7"])]);
    let b = select(
        cols,
        &[
            r(&["2", "100.00001"]),
            r(&["1", "1.0000001"]),
            r(&["3", "7"]),
        ],
    );
    let tol = |t| CompareSettings {
        float_tolerance: t,
        ..CompareSettings::default()
    };
    assert!(is_same(&cmp_with(&tol(1e-6), Vec::new(), &a, &b)));
    let d = differ(cmp_with(&tol(0.0), Vec::new(), &a, &b));
    assert_eq!(d.first_column.as_deref(), Some("x"));
    assert!(!is_same(&cmp_with(&tol(1e-9), Vec::new(), &a, &b)));
    // Pairing also needs the other columns to match.
    let c = select(
        cols,
        &[
            r(&["9", "1.0000001"]),
            r(&["2", "100.00001"]),
            r(&["3", "7"]),
        ],
    );
    let d = differ(cmp_with(&tol(1e-6), Vec::new(), &a, &c));
    assert_eq!(d.first_column.as_deref(), Some("id"));
    // Ordered: pairing within a tie group.
    let ka = select(cols, &[r(&["1", "1.0"]), r(&["1", "2.0"])]);
    let kb = select(cols, &[r(&["1", "2.0000001"]), r(&["1", "1.0000001"])]);
    assert!(is_same(&cmp_with(&tol(1e-6), by(&[name("id")]), &ka, &kb)));
    // Numeric participates when it parses as f64.
    let na = one(OID_NUMERIC, &[Some("3.14159265")]);
    let nb = one(OID_NUMERIC, &[Some("3.14159266")]);
    assert!(is_same(&cmp_with(&tol(1e-6), Vec::new(), &na, &nb)));
    assert!(!is_same(&cmp_with(&tol(0.0), Vec::new(), &na, &nb)));
    // Without retained bytes nothing can be paired.
    let no_bytes = CompareSettings {
        float_tolerance: 1e-6,
        max_retained_bytes: 0,
        ..CompareSettings::default()
    };
    let d = differ(cmp_with(&no_bytes, Vec::new(), &a, &b));
    assert_eq!(d.wanted_a.len(), 2);
    assert_eq!(d.wanted_b.len(), 2);
}

#[test]
fn numeric_normalisation() {
    let same = |x: &str, y: &str| {
        is_same(&cmp(
            &one(OID_NUMERIC, &[Some(x)]),
            &one(OID_NUMERIC, &[Some(y)]),
        ))
    };
    assert!(same("1.50", "1.5"));
    assert!(same("2.000", "2"));
    assert!(same("-0.00", "0"));
    assert!(same("NaN", "NaN"));
    assert!(!same("100", "1"));
    assert!(!same("1.5", "1.05"));
    assert_eq!(norm(OID_NUMERIC, "10.100"), "10.1");
    assert_eq!(norm(OID_NUMERIC, "1000"), "1000");
}

#[test]
fn time_normalisation() {
    let tz = |x: &str| norm(OID_TIMESTAMPTZ, x);
    assert_eq!(tz("2024-01-01 13:00:00+01"), tz("2024-01-01 12:00:00+00"));
    assert_eq!(tz("2024-01-01 12:00:00+00"), "2024-01-01 12:00:00+00");
    assert_eq!(
        tz("2024-01-01 00:30:00.500+05:30"),
        "2023-12-31 19:00:00.5+00"
    );
    assert_eq!(tz("2023-12-31 22:00:00-03:00"), "2024-01-01 01:00:00+00");
    assert_eq!(tz("2024-02-28 23:59:59-01:00:15"), "2024-02-29 01:00:14+00");
    assert_eq!(tz("0044-03-15 00:30:00+01 BC"), "0044-03-14 23:30:00+00 BC");
    assert_eq!(tz("0001-01-01 00:00:00+01"), "0001-12-31 23:00:00+00 BC");
    assert_eq!(tz("12345-06-07 08:09:10+00"), "12345-06-07 08:09:10+00");
    assert_eq!(tz("infinity"), "infinity");
    // Not ISO style: only the fraction is touched.
    assert_eq!(
        tz("Mon Jan 01 12:00:00.100 2024 CET"),
        "Mon Jan 01 12:00:00.1 2024 CET"
    );
    assert_eq!(
        norm(OID_TIMESTAMP, "2024-01-02 03:04:05.000"),
        "2024-01-02 03:04:05"
    );
    assert_eq!(
        norm(OID_TIMESTAMP, "02.10.2024 03:04:05.50"),
        "02.10.2024 03:04:05.5"
    );
    assert_eq!(norm(OID_TIME, "03:04:05.120"), "03:04:05.12");
    assert_eq!(norm(OID_TIMETZ, "03:04:05.120+02"), "03:04:05.12+02");
    assert_eq!(norm(OID_INTERVAL, "1 day 02:03:04.500"), "1 day 02:03:04.5");
    assert_eq!(norm(OID_INTERVAL, "@ 4.50 secs"), "@ 4.5 secs");
    let a = one(OID_TIMESTAMPTZ, &[Some("2024-01-01 12:00:00+00")]);
    let b = one(OID_TIMESTAMPTZ, &[Some("2024-01-01 13:00:00+01")]);
    assert!(is_same(&cmp(&a, &b)));
    let c = one(OID_TIMESTAMPTZ, &[Some("2024-01-01 13:00:00+00")]);
    assert!(!is_same(&cmp(&a, &c)));
}

#[test]
fn calendar_round_trip() {
    for days in (-800_000..800_000).step_by(997) {
        let (y, m, d) = civil_from_days(days);
        assert_eq!(days_from_civil(y, m, d), days);
    }
    assert_eq!(days_from_civil(1970, 1, 1), 0);
    assert_eq!(civil_from_days(19_723), (2024, 1, 1));
}

#[test]
fn jsonb_key_order() {
    let a = one(
        OID_JSONB,
        &[Some(r#"{"b": 1, "a": {"y": [1, 2], "x": "s\"q"}}"#)],
    );
    let b = one(
        OID_JSONB,
        &[Some(r#"{"a": {"x": "s\"q", "y": [1, 2]}, "b": 1}"#)],
    );
    assert!(is_same(&cmp(&a, &b)));
    let c = one(
        OID_JSONB,
        &[Some(r#"{"a": {"x": "s\"q", "y": [2, 1]}, "b": 1}"#)],
    );
    assert!(!is_same(&cmp(&a, &c)));
    assert_eq!(
        norm(OID_JSONB, r#"{"b":"\u0001","a":null}"#),
        r#"{"a":null,"b":"\u0001"}"#
    );
    // Unparseable stays raw.
    assert_eq!(norm(OID_JSONB, "{nope"), "{nope");
    // Plain json keeps its text.
    assert_eq!(norm(114, r#"{"b":1,"a":2}"#), r#"{"b":1,"a":2}"#);
}

#[test]
fn ignore_columns_by_name() {
    let cols = &[("id", INT4), ("Updated_At", TEXT)];
    let a = select(cols, &[r(&["1", "noon"]), r(&["2", "x"])]);
    let b = select(cols, &[r(&["1", "midnight"]), r(&["2", "y"])]);
    assert!(!is_same(&cmp(&a, &b)));
    let s = CompareSettings {
        ignore_columns: vec!["updated_at".into()],
        ..CompareSettings::default()
    };
    assert!(is_same(&cmp_with(&s, Vec::new(), &a, &b)));
    // An ignored sort key makes the rest of the order meaningless.
    let c = select(cols, &[r(&["2", "x"]), r(&["1", "noon"])]);
    assert!(is_same(&cmp_with(
        &s,
        by(&[name("updated_at"), name("id")]),
        &a,
        &c
    )));
    // Ignored columns also skip the type check.
    let d = select(
        &[("id", INT4), ("Updated_At", INT4)],
        &[r(&["1", "5"]), r(&["2", "6"])],
    );
    assert!(is_same(&cmp_with(&s, Vec::new(), &a, &d)));
}

#[test]
fn ignore_columns_by_table_oid() {
    let msgs = |oid: u32, v: &str| -> Msgs {
        vec![
            (b'T', t_full(&[("id", oid, INT4, 0), ("ts", oid, TEXT, 0)])),
            (b'D', dr(&r(&["1", v]))),
            (b'C', cstr("SELECT 1")),
            (b'Z', vec![b'I']),
        ]
    };
    let s = CompareSettings::default();
    let run = |ia: IgnoredTableColumns, ib: IgnoredTableColumns, oa, ob| {
        let x = collect_full(&s, ia, Vec::new(), HashSet::new(), &msgs(oa, "a"));
        let y = collect_full(&s, ib, Vec::new(), HashSet::new(), &msgs(ob, "b"));
        compare(&x, &y, &s)
    };
    // Each side resolves the table to its own OID.
    assert!(is_same(&run(
        vec![(100, "ts".into())],
        vec![(200, "ts".into())],
        100,
        200
    )));
    // Another table's column of the same name is not ignored.
    let d = differ(run(
        vec![(999, "ts".into())],
        vec![(999, "ts".into())],
        100,
        200,
    ));
    assert_eq!(d.first_column.as_deref(), Some("ts"));
}

#[test]
fn command_tag_differs() {
    let a = vec![(b'C', cstr("UPDATE 1")), (b'Z', vec![b'I'])];
    let b = vec![(b'C', cstr("UPDATE 2")), (b'Z', vec![b'I'])];
    let d = differ(cmp(&a, &b));
    assert_eq!(d.kind, DiffKind::CommandTag);
    assert_eq!(
        d.detail,
        "command tag differs: served \"UPDATE 1\" vs shadow \"UPDATE 2\""
    );
    let empty = vec![(b'I', vec![]), (b'Z', vec![b'I'])];
    assert_eq!(differ(cmp(&a, &empty)).kind, DiffKind::CommandTag);
    assert!(is_same(&cmp(&empty, &empty)));
}

#[test]
fn error_on_one_side() {
    let a = select(ACCOUNTS, &[r(&["1", "1", "10"])]);
    let b = vec![
        (b'E', e("57014", "canceling statement")),
        (b'Z', vec![b'I']),
    ];
    let d = differ(cmp(&a, &b));
    assert_eq!(d.kind, DiffKind::ErrorOneSide);
    assert!(d.detail.contains("57014"), "{}", d.detail);
    let x = collect(&CompareSettings::default(), Vec::new(), &b);
    assert_eq!(
        x.sets[0].end,
        End::Error {
            code: "57014".into(),
            message: "canceling statement".into()
        }
    );
}

#[test]
fn error_codes() {
    let err = |code: &str, msg: &str| vec![(b'E', e(code, msg)), (b'Z', vec![b'I'])];
    let d = differ(cmp(
        &err("22012", "division by zero"),
        &err("42P01", "no table"),
    ));
    assert_eq!(d.kind, DiffKind::Error);
    assert!(is_same(&cmp(
        &err("22012", "division by zero"),
        &err("22012", "divide by zero")
    )));
    // Rows before the same error don't matter.
    let mut a = vec![(b'T', t(&[("v", INT4)])), (b'D', dr(&r(&["1"])))];
    a.extend(err("22012", "x"));
    assert!(is_same(&cmp(&a, &err("22012", "y"))));
}

#[test]
fn row_count_differs() {
    let a = select(
        ACCOUNTS,
        &[
            r(&["1", "1", "10"]),
            r(&["2", "1", "20"]),
            r(&["3", "1", "30"]),
        ],
    );
    let b = select(ACCOUNTS, &[r(&["1", "1", "10"]), r(&["3", "1", "30"])]);
    let d = differ(cmp(&a, &b));
    assert_eq!(d.kind, DiffKind::RowCount);
    assert_eq!(d.detail, "row count differs: served 3 vs shadow 2");
    assert_eq!(
        d.rows_a,
        vec![vec![
            Some("2".to_string()),
            Some("1".into()),
            Some("20".into())
        ]]
    );
    assert!(d.rows_b.is_empty());
}

#[test]
fn result_sets_and_incomplete() {
    let one_set = select(&[("v", INT4)], &[r(&["1"])]);
    let mut two_sets = one_set.clone();
    two_sets.pop();
    two_sets.extend(select(&[("w", INT4)], &[r(&["2"])]));
    let d = differ(cmp(&one_set, &two_sets));
    assert_eq!(d.kind, DiffKind::ResultSets);
    assert_eq!(d.result_set, 1);
    // Second set differs.
    let mut other = one_set.clone();
    other.pop();
    other.extend(select(&[("w", INT4)], &[r(&["3"])]));
    let d = differ(cmp(&two_sets, &other));
    assert_eq!(d.result_set, 1);
    assert_eq!(d.first_column.as_deref(), Some("w"));
    // No ReadyForQuery.
    let mut cut = one_set.clone();
    cut.pop();
    let d = differ(cmp(&one_set, &cut));
    assert_eq!(d.kind, DiffKind::Incomplete);
    assert!(d.detail.contains("shadow"));
    let x = collect(&CompareSettings::default(), Vec::new(), &cut);
    assert!(!x.complete);
}

#[test]
fn columns_differ() {
    let a = select(&[("v", INT4)], &[r(&["1"])]);
    let d = differ(cmp(&a, &select(&[("v", 20)], &[r(&["1"])])));
    assert_eq!(d.kind, DiffKind::Columns);
    assert_eq!(d.first_column.as_deref(), Some("v"));
    let d = differ(cmp(&a, &select(&[("w", INT4)], &[r(&["1"])])));
    assert_eq!(d.kind, DiffKind::Columns);
    let d = differ(cmp(
        &a,
        &select(&[("v", INT4), ("w", INT4)], &[r(&["1", "2"])]),
    ));
    assert_eq!(d.kind, DiffKind::Columns);
    // Table OIDs and attnums may differ across servers.
    let other_oid = vec![
        (b'T', t_full(&[("v", 4242, INT4, 0)])),
        (b'D', dr(&r(&["1"]))),
        (b'C', cstr("SELECT 1")),
        (b'Z', vec![b'I']),
    ];
    assert!(is_same(&cmp(&a, &other_oid)));
}

#[test]
fn without_row_description_values_are_raw() {
    let msgs = |v: &str| -> Msgs {
        vec![
            (b'D', dr(&r(&["1", v]))),
            (b'C', cstr("SELECT 1")),
            (b'Z', vec![b'I']),
        ]
    };
    assert!(is_same(&cmp(&msgs("1.50"), &msgs("1.50"))));
    let d = differ(cmp(&msgs("1.50"), &msgs("1.5")));
    assert_eq!(d.detail, "column 2 differs: served 1.50 vs shadow 1.5");
    assert_eq!(d.first_column, None);
    // One side described: its columns are used for both.
    let mut described = msgs("1.5");
    described.insert(0, (b'T', t(&[("a", INT4), ("b", OID_NUMERIC)])));
    let d = differ(cmp(&msgs("2.5"), &described));
    assert_eq!(d.first_column.as_deref(), Some("b"));
    assert_eq!(d.detail, "column 2 \"b\" differs: served 2.5 vs shadow 1.5");
}

#[test]
fn extended_protocol_describe_then_rows() {
    // 'T' twice before rows refines one set; other tags are ignored.
    let msgs: Msgs = vec![
        (b'1', vec![]),
        (b'2', vec![]),
        (b't', vec![0, 0]),
        (b'T', t(&[("v", INT4)])),
        (b'T', t(&[("v", INT4)])),
        (b'D', dr(&r(&["1"]))),
        (b's', vec![]),
        (b'Z', vec![b'T']),
    ];
    let x = collect(&CompareSettings::default(), Vec::new(), &msgs);
    assert_eq!(x.sets.len(), 1);
    assert_eq!(x.sets[0].end, End::Suspended);
    assert!(is_same(&cmp(&msgs, &msgs)));
}

#[test]
fn many_rows_beyond_max_rows_compared() {
    let s = CompareSettings {
        max_rows_compared: 3,
        ..CompareSettings::default()
    };
    let rows = |changed: Option<(usize, &'static str)>| -> Vec<Vec<Option<&'static str>>> {
        const V: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
        (0..10)
            .map(|i| {
                let v = match changed {
                    Some((at, v)) if at == i => v,
                    _ => V[i],
                };
                vec![Some(V[i]), Some(v)]
            })
            .collect()
    };
    let cols = &[("id", INT4), ("v", TEXT)];
    let base = select(cols, &rows(None));
    let changed = select(cols, &rows(Some((7, "changed"))));
    let mut reversed_rows = rows(None);
    reversed_rows.reverse();
    let reversed = select(cols, &reversed_rows);
    for orders in [Vec::new(), by(&[name("id")])] {
        assert!(is_same(&cmp_with(&s, orders.clone(), &base, &base)));
        let d = differ(cmp_with(&s, orders.clone(), &base, &changed));
        assert_eq!(d.kind, DiffKind::Rows);
    }
    // Unordered: a different order is fine even past the limit.
    assert!(is_same(&cmp_with(&s, Vec::new(), &base, &reversed)));
    assert!(!is_same(&cmp_with(&s, by(&[name("id")]), &base, &reversed)));
    // Keyed, a tie group straddling the limit may split differently.
    let tied = |order: &[&'static str]| {
        let rows: Vec<_> = order.iter().map(|v| vec![Some("1"), Some(*v)]).collect();
        select(cols, &rows)
    };
    let a = tied(&["a", "b", "c", "d", "e"]);
    let b = tied(&["e", "d", "c", "b", "a"]);
    assert!(is_same(&cmp_with(&s, by(&[name("id")]), &a, &b)));
    let c = tied(&["e", "d", "c", "b", "x"]);
    assert!(!is_same(&cmp_with(&s, by(&[name("id")]), &a, &c)));
    // Collected state stays bounded.
    let x = collect(&s, Vec::new(), &base);
    assert_eq!(x.sets[0].rows, 10);
    assert_eq!(x.sets[0].kept.len(), 3);
}

#[test]
fn unordered_localisation_past_the_limit() {
    // The kept sample is the lowest hashes, so equal multisets keep the same rows
    // and a difference among them is still shown.
    let s = CompareSettings {
        max_rows_compared: 50,
        ..CompareSettings::default()
    };
    let numbers: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    let base: Vec<_> = numbers.iter().map(|n| vec![Some(n.as_str())]).collect();
    let a = select(&[("v", TEXT)], &base);
    let x = collect(&s, Vec::new(), &a);
    // Change the row with the lowest hash: it is in both samples' range.
    let lowest = x.sets[0].kept[0].hash;
    let row = numbers
        .iter()
        .position(|n| {
            let mut f = Vec::new();
            let body = dr(&[Some(n.as_str())]);
            parse_fields(&body, &mut f).unwrap();
            let cols = x.sets[0].columns.as_deref();
            row_hashes(&body, &f, cols, &[], &Mode::Unordered).0 == lowest
        })
        .unwrap();
    let mut changed = base.clone();
    changed[row] = vec![Some("changed")];
    let b = select(&[("v", TEXT)], &changed);
    let d = differ(cmp_with(&s, Vec::new(), &a, &b));
    assert_eq!(d.rows_a, vec![vec![Some(numbers[row].clone())]]);
    assert_eq!(d.first_column.as_deref(), Some("v"));
}

#[test]
fn wanted_rows_are_retained_past_the_budget() {
    let s = CompareSettings {
        max_retained_bytes: 0,
        ..CompareSettings::default()
    };
    let a = select(ACCOUNTS, &[r(&["1", "1", "10"]), r(&["2", "1", "20"])]);
    let b = select(ACCOUNTS, &[r(&["1", "1", "11"]), r(&["2", "1", "20"])]);
    let d = differ(cmp_with(&s, Vec::new(), &a, &b));
    assert_eq!(d.kind, DiffKind::Rows);
    assert!(d.rows_a.is_empty() && d.rows_b.is_empty());
    assert_eq!(d.wanted_a.len(), 1);
    assert_eq!(d.wanted_b.len(), 1);
    assert!(
        d.detail.contains("not all their bytes were retained"),
        "{}",
        d.detail
    );
    // The re-check retains exactly the wanted rows.
    let x = collect_full(
        &s,
        Vec::new(),
        Vec::new(),
        d.wanted_a.iter().copied().collect(),
        &a,
    );
    let y = collect_full(
        &s,
        Vec::new(),
        Vec::new(),
        d.wanted_b.iter().copied().collect(),
        &b,
    );
    assert_eq!(x.retained_bytes(), 0);
    assert_eq!(
        x.sets[0].kept.iter().filter(|e| e.bytes.is_some()).count(),
        1
    );
    let d2 = differ(compare(&x, &y, &s));
    assert_eq!(d2.first_column.as_deref(), Some("abalance"));
    assert_eq!(
        d2.detail,
        "column 3 \"abalance\" differs: served 10 vs shadow 11"
    );
    assert!(d2.wanted_a.is_empty());
    // At most 64 wanted hashes are honoured.
    let many: HashSet<u64> = (0..1000).collect();
    let c = Collector::new(Arc::new(s), Arc::new(Vec::new()), Vec::new(), many);
    assert_eq!(c.budget.wanted.len(), MAX_WANTED);
}

#[test]
fn budget_limits_retained_bytes() {
    let s = CompareSettings {
        max_retained_bytes: 40,
        ..CompareSettings::default()
    };
    let rows: Vec<_> = (0..10).map(|_| r(&["1", "1", "10"])).collect();
    let x = collect(&s, Vec::new(), &select(ACCOUNTS, &rows));
    assert!(x.retained_bytes() <= 40);
    let kept = x.sets[0].kept.iter().filter(|e| e.bytes.is_some()).count();
    assert_eq!(kept, 40 / dr(&r(&["1", "1", "10"])).len());
}

#[test]
fn long_values_are_clipped() {
    let long = "x".repeat(5000);
    let a = one(TEXT, &[Some(long.as_str())]);
    let b = one(TEXT, &[Some("y")]);
    let d = differ(cmp(&a, &b));
    let shown = d.rows_a[0][0].as_ref().unwrap();
    assert_eq!(shown.chars().count(), MAX_VALUE_CHARS + 1);
    assert!(d.detail.len() < 300);
}

#[test]
fn malformed_messages_are_errors() {
    let mut c = Collector::new(Arc::default(), Arc::default(), Vec::new(), HashSet::new());
    c.message(b'T', &t(&[("a", INT4), ("b", INT4)])).unwrap();
    // Column count disagrees with the RowDescription.
    assert!(c.message(b'D', &dr(&r(&["1"]))).is_err());
    // Truncated value.
    let mut body = dr(&r(&["1", "22"]));
    body.pop();
    assert!(c.message(b'D', &body).is_err());
    // Trailing garbage, negative length, negative count.
    let mut body = dr(&r(&["1", "2"]));
    body.push(0);
    assert!(c.message(b'D', &body).is_err());
    let mut body = 2i16.to_be_bytes().to_vec();
    body.extend_from_slice(&(-5i32).to_be_bytes());
    assert!(c.message(b'D', &body).is_err());
    assert!(c.message(b'D', &(-1i16).to_be_bytes()).is_err());
    assert!(c.message(b'D', &[]).is_err());
    assert!(c.message(b'T', &[0, 1, b'a']).is_err());
    assert!(c.message(b'C', b"SELECT 1").is_err());
    assert!(c.message(b'E', b"Cabc").is_err());
    let err = c.message(b'E', b"C123\0").unwrap_err();
    assert!(err
        .to_string()
        .starts_with("malformed backend message: ErrorResponse"));
    // Nothing was counted, and a good row still works.
    c.message(b'D', &dr(&r(&["1", "2"]))).unwrap();
    assert!(c.message(b'Z', b"I").unwrap());
    let x = c.finish();
    assert_eq!(x.sets.len(), 1);
    assert_eq!(x.sets[0].rows, 1);
    assert_eq!(x.sets[0].end, End::Missing);
}

#[test]
fn messages_after_ready_for_query_are_ignored() {
    let mut c = Collector::new(Arc::default(), Arc::default(), Vec::new(), HashSet::new());
    assert!(!c.message(b'C', &cstr("SELECT 0")).unwrap());
    assert!(c.message(b'Z', b"I").unwrap());
    assert!(c.message(b'D', b"garbage").unwrap());
    assert_eq!(c.finish().sets.len(), 1);
}

/// Small deterministic PRNG for the fuzz loop.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn fuzz_never_panics() {
    let mut rng = Rng(0x1234_5678_9abc_def0);
    let types = [
        INT4,
        TEXT,
        OID_FLOAT4,
        OID_FLOAT8,
        OID_NUMERIC,
        OID_TIMESTAMPTZ,
        OID_INTERVAL,
        OID_JSONB,
    ];
    let valid: Vec<(u8, Vec<u8>)> = vec![
        (
            b'T',
            t_full(&[
                ("a", 1, OID_FLOAT8, 0),
                ("b", 1, OID_TIMESTAMPTZ, 0),
                ("c", 1, OID_FLOAT4, 1),
            ]),
        ),
        (
            b'D',
            d_raw(&[
                Some(b"1.5"),
                Some(b"2024-01-01 00:00:00+01"),
                Some(&[0, 0, 0, 0]),
            ]),
        ),
        (
            b'D',
            d_raw(&[
                None,
                Some(b"0044-01-01 00:00:00-12:30:30 BC"),
                Some(&[1, 2, 3]),
            ]),
        ),
        (b'C', cstr("SELECT 2")),
        (b'E', e("XX000", "boom")),
    ];
    let tags = b"TDCEIsZ12ntNSAK";
    let settings = CompareSettings {
        float_tolerance: 1e-6,
        ignore_columns: vec!["b".into()],
        max_rows_compared: 4,
        max_retained_bytes: 64,
    };
    let orders = vec![
        Order::Keys(vec![name("a"), SortKey::Position(2)]),
        Order::Keys(vec![SortKey::Position(1)]),
    ];
    let mut answers = Vec::new();
    for round in 0..300 {
        let mut c = Collector::new(
            Arc::new(settings.clone()),
            Arc::new(vec![(1, "c".into())]),
            orders.clone(),
            HashSet::new(),
        );
        for _ in 0..40 {
            let (tag, body) = match rng.below(4) {
                // Random bytes under a random tag.
                0 => {
                    let len = rng.below(48);
                    (
                        tags[rng.below(tags.len())],
                        (0..len).map(|_| rng.next() as u8).collect(),
                    )
                }
                // A truncated valid message.
                1 => {
                    let (tag, body) = &valid[rng.below(valid.len())];
                    (*tag, body[..rng.below(body.len() + 1)].to_vec())
                }
                // A valid message with a flipped byte.
                2 => {
                    let (tag, body) = &valid[rng.below(valid.len())];
                    let mut body = body.clone();
                    let at = rng.below(body.len());
                    body[at] ^= 1 << rng.below(8);
                    (*tag, body)
                }
                // A valid message, or a row with random typed values.
                _ => {
                    if rng.below(2) == 0 {
                        valid[rng.below(valid.len())].clone()
                    } else {
                        let junk: Vec<Vec<u8>> = (0..3)
                            .map(|_| {
                                (0..rng.below(12))
                                    .map(|_| b"0123456789.-+:e NaIfy{}\"a"[rng.below(25)])
                                    .collect()
                            })
                            .collect();
                        (
                            b'D',
                            d_raw(&[Some(&junk[0]), Some(&junk[1]), Some(&junk[2])]),
                        )
                    }
                }
            };
            let _ = c.message(tag, &body);
        }
        if round % 2 == 0 {
            let _ = c.message(b'Z', b"I");
        }
        answers.push(c.finish());
    }
    // Typed values straight through normalisation, every type and format.
    const CHARS: &[u8] = b"0123456789.-+: BCe NaIfy{}\"[]a";
    for _ in 0..20_000 {
        let len = rng.below(40);
        let raw: Vec<u8> = (0..len).map(|_| CHARS[rng.below(CHARS.len())]).collect();
        for ty in types {
            let _ = normalize(ty, 0, &raw);
            let _ = normalize(ty, 1, &raw);
            let _ = float_value(ty, 0, &raw);
        }
    }
    for pair in answers.windows(2) {
        let _ = compare(&pair[0], &pair[1], &settings);
        let _ = compare(&pair[0], &pair[0], &settings);
    }
}
