//! Comparing two answers' summaries: result ends, columns, then rows
//! (multiset hashes, ordered groups, float tolerance), and localising the
//! rows that differ.

use serde::Serialize;
use std::cmp::Ordering;
use std::collections::HashMap;

use super::*;

/// Result of [`compare`].
#[derive(Clone, Debug)]
pub enum Comparison {
    Same,
    Differ(Difference),
}

/// What kind of difference was found first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum DiffKind {
    Columns,
    CommandTag,
    Error,
    ErrorOneSide,
    RowCount,
    Rows,
    ResultSets,
    Incomplete,
}

/// The first difference between the served (a) and shadow (b) answers.
#[derive(Clone, Debug, Serialize)]
pub struct Difference {
    pub result_set: usize,
    pub kind: DiffKind,
    /// One human sentence.
    pub detail: String,
    /// Name of the first differing column (for row differences).
    pub first_column: Option<String>,
    /// Up to 5 differing rows, values as text (binary as \x hex), None = NULL.
    pub rows_a: Vec<Vec<Option<String>>>,
    pub rows_b: Vec<Vec<Option<String>>>,
    /// Hashes of differing rows whose bytes were not retained (at most 64 each).
    pub wanted_a: Vec<u64>,
    pub wanted_b: Vec<u64>,
}

impl Difference {
    /// Whether the second answer (the shadow side; the target in a
    /// re-check) ended in an error where the first did not.
    pub fn second_side_failed(&self) -> bool {
        self.kind == DiffKind::ErrorOneSide && self.detail.contains("but shadow with error")
    }

    pub(super) fn new(result_set: usize, kind: DiffKind, detail: String) -> Self {
        Self {
            result_set,
            kind,
            detail,
            first_column: None,
            rows_a: Vec::new(),
            rows_b: Vec::new(),
            wanted_a: Vec::new(),
            wanted_b: Vec::new(),
        }
    }
}

/// Compares the served answer `a` with the shadow answer `b`; reports the first difference.
///
/// Floats (float4/float8, and numeric when it parses as f64) are equal under
/// `float_tolerance` when |x-y| <= tolerance * max(1, |x|, |y|).
pub fn compare(a: &Answer, b: &Answer, settings: &CompareSettings) -> Comparison {
    let sets = a.sets.len().min(b.sets.len());
    // Checked before the set count: a cut-off answer usually also has fewer sets.
    if !a.complete || !b.complete {
        let who = match (a.complete, b.complete) {
            (false, false) => "both answers are",
            (false, true) => "the served answer is",
            _ => "the shadow answer is",
        };
        return Comparison::Differ(Difference::new(
            sets,
            DiffKind::Incomplete,
            format!("{who} incomplete (no ReadyForQuery)"),
        ));
    }
    if a.sets.len() != b.sets.len() {
        return Comparison::Differ(Difference::new(
            sets,
            DiffKind::ResultSets,
            format!(
                "result set count differs: served {} vs shadow {}",
                a.sets.len(),
                b.sets.len()
            ),
        ));
    }
    for (i, (x, y)) in a.sets.iter().zip(&b.sets).enumerate() {
        if let Some(d) = compare_set(i, x, y, settings) {
            return Comparison::Differ(d);
        }
    }
    Comparison::Same
}

pub(super) fn describe_end(end: &End) -> String {
    match end {
        End::Tag(t) => format!("\"{t}\""),
        End::Error { code, message } => format!("error {code} ({message})"),
        End::Empty => "an empty query".into(),
        End::Suspended => "a suspended portal".into(),
        End::Missing => "no end".into(),
    }
}

/// "SELECT 5" vs "SELECT 6" with matching row counts: a row difference, better reported as such.
pub(super) fn tags_differ_only_in_count(t1: &str, rows1: u64, t2: &str, rows2: u64) -> bool {
    match (t1.rsplit_once(' '), t2.rsplit_once(' ')) {
        (Some((w1, n1)), Some((w2, n2))) => {
            w1 == w2 && n1.parse::<u64>() == Ok(rows1) && n2.parse::<u64>() == Ok(rows2)
        }
        _ => false,
    }
}

/// Outcome of comparing how two result sets ended.
pub(super) enum Ends {
    /// Go on to columns and rows.
    Continue,
    /// Stop comparing this set, with a difference or without.
    Done(Option<Difference>),
}

pub(super) fn compare_ends(i: usize, x: &ResultSet, y: &ResultSet) -> Ends {
    let diff = |kind, detail| Ends::Done(Some(Difference::new(i, kind, detail)));
    match (&x.end, &y.end) {
        (
            End::Error {
                code: c1,
                message: m1,
            },
            End::Error {
                code: c2,
                message: m2,
            },
        ) => {
            if c1 != c2 {
                return diff(
                    DiffKind::Error,
                    format!("errors differ: served {c1} ({m1}) vs shadow {c2} ({m2})"),
                );
            }
            // Same error: rows sent before it depend on timing, so stop here.
            Ends::Done(None)
        }
        (End::Error { .. }, _) | (_, End::Error { .. }) => diff(
            DiffKind::ErrorOneSide,
            format!(
                "served ended with {} but shadow with {}",
                describe_end(&x.end),
                describe_end(&y.end)
            ),
        ),
        (End::Tag(t1), End::Tag(t2)) => {
            if t1 != t2 && !tags_differ_only_in_count(t1, x.rows, t2, y.rows) {
                return diff(
                    DiffKind::CommandTag,
                    format!("command tag differs: served \"{t1}\" vs shadow \"{t2}\""),
                );
            }
            Ends::Continue
        }
        (e1, e2) if e1 != e2 => diff(
            DiffKind::CommandTag,
            format!(
                "result ends differ: served {} vs shadow {}",
                describe_end(e1),
                describe_end(e2)
            ),
        ),
        _ => Ends::Continue,
    }
}

pub(super) fn compare_columns(
    i: usize,
    c1: &[Column],
    c2: &[Column],
    ignored: &[bool],
) -> Option<Difference> {
    if c1.len() != c2.len() {
        return Some(Difference::new(
            i,
            DiffKind::Columns,
            format!(
                "column count differs: served {} vs shadow {}",
                c1.len(),
                c2.len()
            ),
        ));
    }
    for (j, (p, q)) in c1.iter().zip(c2).enumerate() {
        let n = j + 1;
        let detail = if p.name != q.name {
            format!(
                "column {n} name differs: served \"{}\" vs shadow \"{}\"",
                p.name, q.name
            )
        } else if ignored.get(j).copied().unwrap_or(false) {
            continue;
        } else if p.type_oid != q.type_oid {
            format!(
                "column {n} \"{}\" type differs: served oid {} vs shadow oid {}",
                p.name, p.type_oid, q.type_oid
            )
        } else if p.format != q.format {
            format!(
                "column {n} \"{}\" format differs: served {} vs shadow {}",
                p.name, p.format, q.format
            )
        } else {
            continue;
        };
        let mut d = Difference::new(i, DiffKind::Columns, detail);
        d.first_column = Some(p.name.clone());
        return Some(d);
    }
    None
}

/// What rows are compared with: shared columns, union of ignored columns, tolerance.
pub(super) struct RowCtx<'a> {
    pub(super) columns: Option<&'a [Column]>,
    pub(super) ignored: Vec<bool>,
    pub(super) tolerance: f64,
}

impl RowCtx<'_> {
    pub(super) fn ignored(&self, i: usize) -> bool {
        self.ignored.get(i).copied().unwrap_or(false)
    }

    pub(super) fn values_equal(&self, i: usize, x: Option<&[u8]>, y: Option<&[u8]>) -> bool {
        match (x, y) {
            (None, None) => true,
            (Some(x), Some(y)) => {
                let (ty, format) = column_type(self.columns, i);
                if self.tolerance > 0.0 && is_floaty(ty, format) {
                    if let (Some(p), Some(q)) =
                        (float_value(ty, format, x), float_value(ty, format, y))
                    {
                        return close(p, q, self.tolerance);
                    }
                }
                normalize(ty, format, x) == normalize(ty, format, y)
            }
            _ => false,
        }
    }

    /// Index of the first compared column that differs.
    pub(super) fn first_difference(
        &self,
        x: &[Option<&[u8]>],
        y: &[Option<&[u8]>],
    ) -> Option<usize> {
        (0..x.len().max(y.len())).find(|&i| {
            !self.ignored(i) && {
                match (x.get(i), y.get(i)) {
                    (Some(p), Some(q)) => !self.values_equal(i, *p, *q),
                    _ => true,
                }
            }
        })
    }

    pub(super) fn equal_columns(&self, x: &[Option<&[u8]>], y: &[Option<&[u8]>]) -> usize {
        x.iter()
            .zip(y)
            .enumerate()
            .filter(|(i, (p, q))| !self.ignored(*i) && self.values_equal(*i, **p, **q))
            .count()
    }

    /// Hash of the columns that must match exactly under tolerance pairing.
    pub(super) fn exact_key(&self, row: &[Option<&[u8]>]) -> u64 {
        let mut h = Fnv::new();
        h.write(&(row.len() as u64).to_le_bytes());
        for (i, v) in row.iter().enumerate() {
            let (ty, format) = column_type(self.columns, i);
            if self.ignored(i) || is_floaty(ty, format) {
                continue;
            }
            h.value(v.map(|v| normalize(ty, format, v)).as_deref());
        }
        h.finish()
    }

    pub(super) fn name(&self, i: usize) -> Option<String> {
        self.columns.and_then(|c| c.get(i)).map(|c| c.name.clone())
    }

    pub(super) fn render(
        &self,
        i: usize,
        value: Option<&[u8]>,
        max_chars: usize,
    ) -> Option<String> {
        let raw = value?;
        let (_, format) = column_type(self.columns, i);
        let text = match (self.columns.is_some(), format, std::str::from_utf8(raw)) {
            (true, 0, _) => String::from_utf8_lossy(raw).into_owned(),
            (false, _, Ok(s)) => s.to_string(),
            _ => hex(raw),
        };
        Some(clip(text, max_chars))
    }

    pub(super) fn render_row(&self, row: &[Option<&[u8]>]) -> Vec<Option<String>> {
        row.iter()
            .enumerate()
            .map(|(i, v)| self.render(i, *v, MAX_VALUE_CHARS))
            .collect()
    }

    pub(super) fn shown(&self, i: usize, value: Option<&[u8]>) -> String {
        match self.render(i, value, MAX_DETAIL_VALUE_CHARS) {
            None => "NULL".into(),
            Some(s) if s.is_empty() => "''".into(),
            Some(s) => s,
        }
    }
}

/// Differing rows found by localisation.
pub(super) struct Found<'a> {
    pub(super) a: Vec<&'a Entry>,
    pub(super) b: Vec<&'a Entry>,
    /// 1-based row position (ordered results).
    pub(super) at_row: Option<usize>,
    /// The rows in a/b account for every difference.
    pub(super) exhaustive: bool,
}

pub(super) fn compare_set(
    i: usize,
    x: &ResultSet,
    y: &ResultSet,
    settings: &CompareSettings,
) -> Option<Difference> {
    if let Ends::Done(d) = compare_ends(i, x, y) {
        return d;
    }
    let ignored: Vec<bool> = (0..x.ignored.len().max(y.ignored.len()))
        .map(|j| {
            x.ignored.get(j).copied().unwrap_or(false) || y.ignored.get(j).copied().unwrap_or(false)
        })
        .collect();
    let columns = match (&x.columns, &y.columns) {
        (Some(c1), Some(c2)) => {
            if let Some(d) = compare_columns(i, c1, c2, &ignored) {
                return Some(d);
            }
            Some(c1.as_slice())
        }
        (Some(c), None) | (None, Some(c)) => Some(c.as_slice()),
        (None, None) => None,
    };
    let ctx = RowCtx {
        columns,
        ignored,
        tolerance: settings.float_tolerance.max(0.0),
    };
    let keyed = matches!((&x.mode, &y.mode), (Mode::Keyed(k1), Mode::Keyed(k2)) if k1 == k2);
    let same_hash = if keyed {
        x.ordered == y.ordered
    } else {
        x.multiset == y.multiset
    };
    if x.rows == y.rows && same_hash {
        return None;
    }
    let found = if keyed {
        localize_ordered(x, y, &ctx)
    } else {
        localize_unordered(x, y)
    };
    if x.rows == y.rows && found.exhaustive {
        if found.a.is_empty() && found.b.is_empty() {
            return None;
        }
        if ctx.tolerance > 0.0 && pair_all(&found.a, &found.b, &ctx) {
            return None;
        }
    }
    Some(report(i, x, y, &ctx, &found, settings.max_rows_compared))
}

/// Multiset difference of two row lists, by hash.
pub(super) fn multiset_diff<'a>(
    a: &[&'a Entry],
    b: &[&'a Entry],
) -> (Vec<&'a Entry>, Vec<&'a Entry>) {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort_by_key(|e| e.hash);
    b.sort_by_key(|e| e.hash);
    let (mut only_a, mut only_b) = (Vec::new(), Vec::new());
    let (mut ia, mut ib) = (a.into_iter().peekable(), b.into_iter().peekable());
    loop {
        match (ia.peek(), ib.peek()) {
            (Some(p), Some(q)) => match p.hash.cmp(&q.hash) {
                Ordering::Less => only_a.extend(ia.next()),
                Ordering::Greater => only_b.extend(ib.next()),
                Ordering::Equal => {
                    ia.next();
                    ib.next();
                }
            },
            (Some(_), None) => only_a.extend(ia.next()),
            (None, Some(_)) => only_b.extend(ib.next()),
            (None, None) => break,
        }
    }
    (only_a, only_b)
}

/// Hashes below which a side kept every row (None = kept all rows).
pub(super) fn complete_below(set: &ResultSet) -> Option<u64> {
    if !set.overflowed() {
        return None;
    }
    match set.mode {
        // The lowest hashes were kept; ties at the maximum may be partial.
        Mode::Unordered => Some(set.kept.last().map_or(0, |e| e.hash)),
        // A prefix says nothing about hash ranges.
        Mode::Keyed(_) => Some(0),
    }
}

pub(super) fn localize_unordered<'a>(x: &'a ResultSet, y: &'a ResultSet) -> Found<'a> {
    let limit = match (complete_below(x), complete_below(y)) {
        (Some(p), Some(q)) => Some(p.min(q)),
        (p, q) => p.or(q),
    };
    let in_range = |e: &&Entry| limit.is_none_or(|t| e.hash < t);
    let a: Vec<&Entry> = x.kept.iter().filter(in_range).collect();
    let b: Vec<&Entry> = y.kept.iter().filter(in_range).collect();
    let (a, b) = multiset_diff(&a, &b);
    // The found rows explain everything iff they explain the count and multiset hash.
    let sum = |rows: &[&Entry]| rows.iter().fold(0u64, |s, e| s.wrapping_add(mix(e.hash)));
    let exhaustive = x.multiset.wrapping_sub(y.multiset) == sum(&a).wrapping_sub(sum(&b))
        && i128::from(x.rows) - i128::from(y.rows) == a.len() as i128 - b.len() as i128;
    Found {
        a,
        b,
        at_row: None,
        exhaustive,
    }
}

pub(super) struct Group<'a> {
    pub(super) start: usize,
    pub(super) key: u64,
    pub(super) rows: Vec<&'a Entry>,
    /// May continue past the kept rows.
    pub(super) truncated: bool,
}

pub(super) fn groups(kept: &[Entry], overflowed: bool) -> Vec<Group<'_>> {
    let mut out: Vec<Group<'_>> = Vec::new();
    for (i, e) in kept.iter().enumerate() {
        match out.last_mut() {
            Some(g) if g.key == e.key => g.rows.push(e),
            _ => out.push(Group {
                start: i,
                key: e.key,
                rows: vec![e],
                truncated: false,
            }),
        }
    }
    if let Some(g) = out.last_mut() {
        g.truncated = overflowed;
    }
    out
}

/// Walks tie groups in order; the first group that differs (beyond tolerance) is reported.
pub(super) fn localize_ordered<'a>(
    x: &'a ResultSet,
    y: &'a ResultSet,
    ctx: &RowCtx<'_>,
) -> Found<'a> {
    let ga = groups(&x.kept, x.overflowed());
    let gb = groups(&y.kept, y.overflowed());
    let found = |a, b, start: usize| Found {
        a,
        b,
        at_row: Some(start + 1),
        exhaustive: false,
    };
    for (g1, g2) in ga.iter().zip(&gb) {
        if g1.truncated || g2.truncated {
            // A tie group cut at max_rows_compared may hold different rows on each side.
            if g1.key != g2.key {
                return found(g1.rows.clone(), g2.rows.clone(), g1.start);
            }
            return Found {
                a: Vec::new(),
                b: Vec::new(),
                at_row: None,
                exhaustive: false,
            };
        }
        let (a, b) = if g1.key == g2.key {
            multiset_diff(&g1.rows, &g2.rows)
        } else {
            (g1.rows.clone(), g2.rows.clone())
        };
        if a.is_empty() && b.is_empty() {
            continue;
        }
        if ctx.tolerance > 0.0 && pair_all(&a, &b, ctx) {
            continue;
        }
        return found(a, b, g1.start);
    }
    let rest = |g: &[Group<'a>]| -> Vec<&'a Entry> {
        g.iter().flat_map(|g| g.rows.iter().copied()).collect()
    };
    let (rest_a, rest_b) = (
        rest(ga.get(gb.len()..).unwrap_or_default()),
        rest(gb.get(ga.len()..).unwrap_or_default()),
    );
    if !rest_a.is_empty() || !rest_b.is_empty() {
        let start = ga.len().min(gb.len());
        let at = ga.get(start).or(gb.get(start)).map_or(0, |g| g.start);
        return found(rest_a, rest_b, at);
    }
    Found {
        a: Vec::new(),
        b: Vec::new(),
        at_row: None,
        exhaustive: !x.overflowed() && !y.overflowed(),
    }
}

/// Whether the rows pair off one-to-one, equal up to the float tolerance.
pub(super) fn pair_all(a: &[&Entry], b: &[&Entry], ctx: &RowCtx<'_>) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (Some(ra), Some(rb)) = (decode_all(a), decode_all(b)) else {
        return false;
    };
    // Bucket by the exactly-compared columns; only floats need pairwise checks.
    let mut buckets: HashMap<u64, Vec<usize>> = HashMap::new();
    for (j, row) in rb.iter().enumerate() {
        buckets.entry(ctx.exact_key(row)).or_default().push(j);
    }
    let mut used = vec![false; rb.len()];
    let mut steps = 0usize;
    for row in &ra {
        let Some(candidates) = buckets.get(&ctx.exact_key(row)) else {
            return false;
        };
        let mut matched = false;
        for &j in candidates {
            if used.get(j).copied().unwrap_or(true) {
                continue;
            }
            steps += 1;
            if steps > MAX_PAIRING_STEPS {
                return false;
            }
            let Some(other) = rb.get(j) else { continue };
            if row.len() == other.len() && ctx.first_difference(row, other).is_none() {
                if let Some(u) = used.get_mut(j) {
                    *u = true;
                }
                matched = true;
                break;
            }
        }
        if !matched {
            return false;
        }
    }
    true
}

/// All rows decoded, or None if any row's bytes were not retained.
pub(super) fn decode_all<'a>(rows: &[&'a Entry]) -> Option<Vec<Vec<Option<&'a [u8]>>>> {
    rows.iter()
        .map(|e| e.bytes.as_deref().and_then(decode))
        .collect()
}

/// The retained rows decoded, for reports.
pub(super) fn decode_some<'a>(rows: &[&'a Entry]) -> Vec<Vec<Option<&'a [u8]>>> {
    rows.iter()
        .filter_map(|e| e.bytes.as_deref())
        .filter_map(decode)
        .take(MAX_REPORT_CANDIDATES)
        .collect()
}

pub(super) fn wanted(rows: &[&Entry]) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for e in rows.iter().filter(|e| e.bytes.is_none()) {
        if !out.contains(&e.hash) {
            out.push(e.hash);
            if out.len() == MAX_WANTED {
                break;
            }
        }
    }
    out
}
