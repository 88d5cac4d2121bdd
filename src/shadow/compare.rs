//! Shadow-read comparison: turns one server's answer (a stream of backend
//! messages) into a bounded summary, and compares the served side's summary
//! with the shadow side's.
//!
//! Per result set a side keeps: the row count, an order-independent multiset
//! hash of all rows, an order-dependent hash of all tie groups (for ORDER BY),
//! and at most `max_rows_compared` individual row hashes (the first rows for
//! ORDER BY, otherwise the rows with the lowest hashes, so both sides keep the
//! same sample of equal multisets). Row bytes are kept only within
//! `max_retained_bytes` (plus explicitly wanted rows), for reports and for
//! float-tolerance pairing.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fmt;
use std::fmt::Write as _;
use std::sync::Arc;

use serde::Serialize;

const OID_FLOAT4: u32 = 700;
const OID_FLOAT8: u32 = 701;
const OID_NUMERIC: u32 = 1700;
const OID_TIME: u32 = 1083;
const OID_TIMETZ: u32 = 1266;
const OID_TIMESTAMP: u32 = 1114;
const OID_TIMESTAMPTZ: u32 = 1184;
const OID_INTERVAL: u32 = 1186;
const OID_JSONB: u32 = 3802;

/// Wanted hashes honoured per collector, and reported per side.
const MAX_WANTED: usize = 64;
/// Example rows per side in a report.
const MAX_SHOWN_ROWS: usize = 5;
/// Differing rows considered when pairing rows for a report.
const MAX_REPORT_CANDIDATES: usize = 64;
/// Characters of one value shown in `rows_a`/`rows_b`.
const MAX_VALUE_CHARS: usize = 1024;
/// Characters of one value shown in `detail`.
const MAX_DETAIL_VALUE_CHARS: usize = 100;
/// Row comparisons allowed when pairing rows under a float tolerance.
const MAX_PAIRING_STEPS: usize = 1_000_000;

/// Comparison settings shared by both sides.
#[derive(Clone, Debug, PartialEq)]
pub struct CompareSettings {
    /// Relative float tolerance, see [`compare`]; 0 = exact (after normalisation).
    pub float_tolerance: f64,
    /// Lowercase column names ignored in every result.
    pub ignore_columns: Vec<String>,
    /// Per result set: rows kept as individual hashes; the rest only by count + combined hash.
    pub max_rows_compared: usize,
    /// Per side: DataRow bodies kept verbatim (for reports) up to this many bytes in total.
    pub max_retained_bytes: usize,
}

impl Default for CompareSettings {
    fn default() -> Self {
        Self {
            float_tolerance: 0.0,
            ignore_columns: Vec::new(),
            max_rows_compared: 10_000,
            max_retained_bytes: 1 << 20,
        }
    }
}

/// Columns ignored by (table OID, column name) — the caller resolves "table.column" entries to this side's OIDs.
pub type IgnoredTableColumns = Vec<(u32, String)>;

/// How the rows of one result set are compared.
#[derive(Clone, Debug, PartialEq)]
pub enum Order {
    /// No ORDER BY: rows compared as a multiset.
    Unordered,
    /// Top-level ORDER BY whose keys are given: by output-column name (lowercase) or 1-based position.
    Keys(Vec<SortKey>),
}

/// One ORDER BY key.
#[derive(Clone, Debug, PartialEq)]
pub enum SortKey {
    Name(String),
    Position(usize),
}

/// One field of a RowDescription.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Column {
    pub name: String,
    pub table_oid: u32,
    pub attnum: i16,
    pub type_oid: u32,
    pub format: i16,
}

/// How a result set ended.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum End {
    Tag(String),
    Error { code: String, message: String },
    Empty,
    Suspended,
    Missing,
}

/// A backend message body that could not be decoded.
#[derive(Debug)]
pub struct CollectError(pub String);

impl fmt::Display for CollectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed backend message: {}", self.0)
    }
}

impl std::error::Error for CollectError {}

/// One kept row: its hash, its sort-key hash (0 when unordered) and maybe its bytes.
#[derive(Debug)]
struct Entry {
    hash: u64,
    key: u64,
    bytes: Option<Box<[u8]>>,
    /// Retained only because it was wanted (counts against the wanted cap, not the budget).
    by_wanted: bool,
}

/// Heap order by hash only, for keeping the lowest hashes.
#[derive(Debug)]
struct ByHash(Entry);

impl PartialEq for ByHash {
    fn eq(&self, other: &Self) -> bool {
        self.0.hash == other.0.hash
    }
}
impl Eq for ByHash {}
impl PartialOrd for ByHash {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ByHash {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.hash.cmp(&other.0.hash)
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Mode {
    Unordered,
    /// Column indexes of the usable sort keys, in key order.
    Keyed(Vec<usize>),
}

/// The summary of one result set.
#[derive(Debug)]
pub struct ResultSet {
    pub columns: Option<Vec<Column>>,
    pub end: End,
    pub rows: u64,
    mode: Mode,
    /// Per column: left out of hashes and comparisons.
    ignored: Vec<bool>,
    /// Keyed: the first rows in order. Unordered: (after finish) the lowest hashes, sorted.
    kept: Vec<Entry>,
    /// Unordered while collecting: max-heap of the lowest hashes.
    heap: BinaryHeap<ByHash>,
    /// Wrapping sum of mix(row hash) over all rows.
    multiset: u64,
    /// Running hash over all tie groups (key, multiset, size), for Keyed.
    ordered: u64,
    /// Open tie group: key hash, multiset hash, size.
    group: Option<(u64, u64, u64)>,
}

impl ResultSet {
    fn new() -> Self {
        Self {
            columns: None,
            end: End::Missing,
            rows: 0,
            mode: Mode::Unordered,
            ignored: Vec::new(),
            kept: Vec::new(),
            heap: BinaryHeap::new(),
            multiset: 0,
            ordered: 0,
            group: None,
        }
    }

    /// Whether some rows were counted but not kept individually.
    fn overflowed(&self) -> bool {
        self.rows > self.kept.len() as u64
    }

    fn close_group(&mut self) {
        if let Some((key, set, n)) = self.group.take() {
            self.ordered = fmix64(fmix64(fmix64(self.ordered ^ key).wrapping_add(set)) ^ n);
        }
    }

    fn seal(&mut self) {
        self.close_group();
        if !self.heap.is_empty() {
            let heap = std::mem::take(&mut self.heap);
            self.kept = heap.into_sorted_vec().into_iter().map(|e| e.0).collect();
        }
    }
}

/// One side's complete summary.
#[derive(Debug)]
pub struct Answer {
    pub sets: Vec<ResultSet>,
    /// Saw ReadyForQuery.
    pub complete: bool,
    retained: usize,
}

impl Answer {
    /// Row bytes retained within the budget (wanted rows not included).
    pub fn retained_bytes(&self) -> usize {
        self.retained
    }
}

/// Retention budget of one side.
#[derive(Debug)]
struct Budget {
    max: usize,
    used: usize,
    wanted: HashSet<u64>,
    wanted_held: usize,
}

impl Budget {
    fn entry(&mut self, hash: u64, key: u64, body: &[u8]) -> Entry {
        let mut entry = Entry {
            hash,
            key,
            bytes: None,
            by_wanted: false,
        };
        let used = self.used.saturating_add(body.len());
        if used <= self.max {
            self.used = used;
            entry.bytes = Some(body.into());
        } else if self.wanted_held < MAX_WANTED && self.wanted.contains(&hash) {
            self.wanted_held += 1;
            entry.bytes = Some(body.into());
            entry.by_wanted = true;
        }
        entry
    }

    fn release(&mut self, entry: &Entry) {
        if let Some(bytes) = &entry.bytes {
            if entry.by_wanted {
                self.wanted_held = self.wanted_held.saturating_sub(1);
            } else {
                self.used = self.used.saturating_sub(bytes.len());
            }
        }
    }
}

/// Builds one side's [`Answer`] from backend messages.
#[derive(Debug)]
pub struct Collector {
    settings: Arc<CompareSettings>,
    ignored: Arc<IgnoredTableColumns>,
    orders: Vec<Order>,
    budget: Budget,
    sets: Vec<ResultSet>,
    /// The last set has no end yet.
    open: bool,
    complete: bool,
    /// Scratch for DataRow field ranges.
    fields: Vec<Option<(usize, usize)>>,
}

impl Collector {
    /// `orders[i]` is the Order of the i-th result set (a missing entry means Unordered).
    /// `wanted`: row hashes whose row bytes must be retained even past max_retained_bytes (at most 64 are honoured).
    pub fn new(
        settings: Arc<CompareSettings>,
        ignored: Arc<IgnoredTableColumns>,
        orders: Vec<Order>,
        wanted: HashSet<u64>,
    ) -> Self {
        // Keep the cap deterministic: the 64 lowest hashes.
        let wanted = if wanted.len() > MAX_WANTED {
            let mut all: Vec<u64> = wanted.into_iter().collect();
            all.sort_unstable();
            all.truncate(MAX_WANTED);
            all.into_iter().collect()
        } else {
            wanted
        };
        let max = settings.max_retained_bytes;
        Self {
            settings,
            ignored,
            orders,
            budget: Budget {
                max,
                used: 0,
                wanted,
                wanted_held: 0,
            },
            sets: Vec::new(),
            open: false,
            complete: false,
            fields: Vec::new(),
        }
    }

    /// Feeds one complete backend message. Returns Ok(true) at ReadyForQuery ('Z'), which ends the answer.
    pub fn message(&mut self, tag: u8, body: &[u8]) -> Result<bool, CollectError> {
        if self.complete {
            return Ok(true);
        }
        match tag {
            b'T' => {
                let columns = parse_row_description(body)?;
                self.describe(columns);
            }
            b'D' => self.data_row(body)?,
            b'C' => {
                let mut r = Reader::new(body, "CommandComplete");
                let tag = r.cstr()?;
                r.done()?;
                self.end(End::Tag(tag));
            }
            b'E' => {
                let (code, message) = parse_error(body)?;
                self.end(End::Error { code, message });
            }
            b'I' => self.end(End::Empty),
            b's' => self.end(End::Suspended),
            b'Z' => {
                self.complete = true;
                return Ok(true);
            }
            _ => {}
        }
        Ok(false)
    }

    pub fn finish(self) -> Answer {
        let mut sets = self.sets;
        for set in &mut sets {
            set.seal();
        }
        Answer {
            sets,
            complete: self.complete,
            retained: self.budget.used,
        }
    }

    /// Index of the open set, creating one if needed.
    fn current(&mut self) -> usize {
        if !self.open || self.sets.is_empty() {
            self.sets.push(ResultSet::new());
            self.open = true;
        }
        self.sets.len() - 1
    }

    fn end(&mut self, end: End) {
        let i = self.current();
        if let Some(set) = self.sets.get_mut(i) {
            set.end = end;
        }
        self.open = false;
    }

    fn describe(&mut self, columns: Vec<Column>) {
        // A second 'T' before any row (Describe statement, then portal) refines the
        // same set; after rows it cannot, since those rows were hashed without it.
        let reuse = self.open && self.sets.last().is_some_and(|s| s.rows == 0);
        if !reuse {
            self.sets.push(ResultSet::new());
            self.open = true;
        }
        let index = self.sets.len().saturating_sub(1);
        let ignored = ignore_mask(&columns, &self.settings, &self.ignored);
        let mode = resolve_order(self.orders.get(index), &columns, &ignored);
        if let Some(set) = self.sets.get_mut(index) {
            set.columns = Some(columns);
            set.ignored = ignored;
            set.mode = mode;
        }
    }

    fn data_row(&mut self, body: &[u8]) -> Result<(), CollectError> {
        let mut fields = std::mem::take(&mut self.fields);
        let result = self.data_row_with(body, &mut fields);
        self.fields = fields;
        result
    }

    fn data_row_with(
        &mut self,
        body: &[u8],
        fields: &mut Vec<Option<(usize, usize)>>,
    ) -> Result<(), CollectError> {
        parse_fields(body, fields)?;
        // Check against the open set before creating anything, so errors change nothing.
        if self.open {
            if let Some(columns) = self.sets.last().and_then(|s| s.columns.as_ref()) {
                if columns.len() != fields.len() {
                    return Err(CollectError(format!(
                        "DataRow has {} columns, RowDescription {}",
                        fields.len(),
                        columns.len()
                    )));
                }
            }
        }
        let i = self.current();
        let limit = self.settings.max_rows_compared;
        let Some(set) = self.sets.get_mut(i) else {
            return Ok(());
        };
        let (hash, key) = row_hashes(
            body,
            fields,
            set.columns.as_deref(),
            &set.ignored,
            &set.mode,
        );
        set.rows += 1;
        set.multiset = set.multiset.wrapping_add(mix(hash));
        match set.mode {
            Mode::Keyed(_) => {
                let mut joined = false;
                if let Some((k, m, n)) = set.group.as_mut() {
                    if *k == key {
                        *m = m.wrapping_add(mix(hash));
                        *n += 1;
                        joined = true;
                    }
                }
                if !joined {
                    set.close_group();
                    set.group = Some((key, mix(hash), 1));
                }
                if set.kept.len() < limit {
                    set.kept.push(self.budget.entry(hash, key, body));
                }
            }
            Mode::Unordered => {
                if set.heap.len() < limit {
                    set.heap.push(ByHash(self.budget.entry(hash, 0, body)));
                } else if set.heap.peek().is_some_and(|top| hash < top.0.hash) {
                    // Release first so the evicted row's bytes can go to this one.
                    if let Some(evicted) = set.heap.pop() {
                        self.budget.release(&evicted.0);
                    }
                    set.heap.push(ByHash(self.budget.entry(hash, 0, body)));
                }
            }
        }
        Ok(())
    }
}

fn ignore_mask(
    columns: &[Column],
    settings: &CompareSettings,
    ignored: &IgnoredTableColumns,
) -> Vec<bool> {
    columns
        .iter()
        .map(|c| {
            let name = c.name.to_lowercase();
            settings.ignore_columns.contains(&name)
                || ignored
                    .iter()
                    .any(|(oid, n)| *oid == c.table_oid && n.to_lowercase() == name)
        })
        .collect()
}

fn resolve_order(order: Option<&Order>, columns: &[Column], ignored: &[bool]) -> Mode {
    let Some(Order::Keys(keys)) = order else {
        return Mode::Unordered;
    };
    let mut out = Vec::new();
    for key in keys {
        let index = match key {
            SortKey::Position(p) => p.checked_sub(1).filter(|i| *i < columns.len()),
            SortKey::Name(name) => {
                let mut hits = columns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.name == *name || c.name.to_lowercase() == *name);
                match (hits.next(), hits.next()) {
                    (Some((i, _)), None) => Some(i),
                    _ => None,
                }
            }
        };
        let Some(index) = index else {
            return Mode::Unordered;
        };
        // Order among rows that differ only in an ignored key (and later keys) is
        // not comparable, so keys stop there.
        if ignored.get(index).copied().unwrap_or(false) {
            break;
        }
        out.push(index);
    }
    if out.is_empty() {
        Mode::Unordered
    } else {
        Mode::Keyed(out)
    }
}

// ---------------------------------------------------------------------------
// Message decoding

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }

    fn err(&self, why: &str) -> CollectError {
        CollectError(format!("{}: {} at byte {}", self.what, why, self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CollectError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| self.err("truncated"))?;
        let out = self
            .buf
            .get(self.pos..end)
            .ok_or_else(|| self.err("truncated"))?;
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CollectError> {
        let bytes = self.take(N)?;
        <[u8; N]>::try_from(bytes).map_err(|_| self.err("truncated"))
    }

    fn u8(&mut self) -> Result<u8, CollectError> {
        let [b] = self.array::<1>()?;
        Ok(b)
    }

    fn i16(&mut self) -> Result<i16, CollectError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, CollectError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, CollectError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn cstr(&mut self) -> Result<String, CollectError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let len = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| self.err("unterminated string"))?;
        let s = String::from_utf8_lossy(self.take(len)?).into_owned();
        self.take(1)?;
        Ok(s)
    }

    fn done(&self) -> Result<(), CollectError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(self.err("trailing bytes"))
        }
    }
}

fn parse_row_description(body: &[u8]) -> Result<Vec<Column>, CollectError> {
    let mut r = Reader::new(body, "RowDescription");
    let n = r.i16()?;
    if n < 0 {
        return Err(r.err("negative field count"));
    }
    // A field needs at least 19 bytes; don't let a bogus count reserve memory.
    let mut columns = Vec::with_capacity(usize::from(n.unsigned_abs()).min(body.len() / 19));
    for _ in 0..n {
        let name = r.cstr()?;
        let table_oid = r.u32()?;
        let attnum = r.i16()?;
        let type_oid = r.u32()?;
        let _typlen = r.i16()?;
        let _typmod = r.i32()?;
        let format = r.i16()?;
        columns.push(Column {
            name,
            table_oid,
            attnum,
            type_oid,
            format,
        });
    }
    r.done()?;
    Ok(columns)
}

/// Field byte ranges of a DataRow body; None = NULL.
fn parse_fields(body: &[u8], out: &mut Vec<Option<(usize, usize)>>) -> Result<(), CollectError> {
    out.clear();
    let mut r = Reader::new(body, "DataRow");
    let n = r.i16()?;
    if n < 0 {
        return Err(r.err("negative column count"));
    }
    for _ in 0..n {
        let len = r.i32()?;
        if len == -1 {
            out.push(None);
            continue;
        }
        let len = usize::try_from(len).map_err(|_| r.err("negative length"))?;
        let start = r.pos;
        r.take(len)?;
        out.push(Some((start, r.pos)));
    }
    r.done()
}

fn parse_error(body: &[u8]) -> Result<(String, String), CollectError> {
    let mut r = Reader::new(body, "ErrorResponse");
    let mut code = String::new();
    let mut message = String::new();
    loop {
        let field = r.u8()?;
        if field == 0 {
            break;
        }
        let value = r.cstr()?;
        match field {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    r.done()?;
    Ok((code, message))
}

fn field(body: &[u8], range: Option<(usize, usize)>) -> Option<&[u8]> {
    range.map(|(s, e)| body.get(s..e).unwrap_or_default())
}

/// Decodes a retained (already validated) DataRow body.
fn decode(body: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    let mut ranges = Vec::new();
    parse_fields(body, &mut ranges).ok()?;
    Some(ranges.into_iter().map(|r| field(body, r)).collect())
}

// ---------------------------------------------------------------------------
// Hashing and normalisation

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// Row hash as it enters the multiset sums (decorrelated from the row hash itself).
fn mix(hash: u64) -> u64 {
    fmix64(hash ^ 0x9e37_79b9_7f4a_7c15)
}

/// FNV-1a with an fmix64 finaliser: deterministic across processes, unlike RandomState.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// Length-prefixed with a NULL marker, so NULL != '' and values can't run together.
    fn value(&mut self, value: Option<&[u8]>) {
        match value {
            None => self.write(&[0]),
            Some(v) => {
                self.write(&[1]);
                self.write(&(v.len() as u64).to_le_bytes());
                self.write(v);
            }
        }
    }

    fn finish(&self) -> u64 {
        fmix64(self.0)
    }
}

fn column_type(columns: Option<&[Column]>, i: usize) -> (u32, i16) {
    columns
        .and_then(|c| c.get(i))
        .map_or((0, 0), |c| (c.type_oid, c.format))
}

fn row_hashes(
    body: &[u8],
    fields: &[Option<(usize, usize)>],
    columns: Option<&[Column]>,
    ignored: &[bool],
    mode: &Mode,
) -> (u64, u64) {
    let mut h = Fnv::new();
    for (i, range) in fields.iter().enumerate() {
        if ignored.get(i).copied().unwrap_or(false) {
            continue;
        }
        let (ty, format) = column_type(columns, i);
        h.value(
            field(body, *range)
                .map(|v| normalize(ty, format, v))
                .as_deref(),
        );
    }
    let key = match mode {
        Mode::Unordered => 0,
        Mode::Keyed(keys) => {
            let mut k = Fnv::new();
            for &c in keys {
                let (ty, format) = column_type(columns, c);
                let v = field(body, fields.get(c).copied().flatten());
                k.value(v.map(|v| normalize(ty, format, v)).as_deref());
            }
            k.finish()
        }
    };
    (h.finish(), key)
}

/// Type-aware canonical form of one value, so representation-only differences hash equal.
fn normalize(ty: u32, format: i16, raw: &[u8]) -> Cow<'_, [u8]> {
    if format != 0 {
        return normalize_binary(ty, raw);
    }
    // Most columns are not normalised: skip the UTF-8 check for them.
    if !matches!(
        ty,
        OID_FLOAT8
            | OID_FLOAT4
            | OID_NUMERIC
            | OID_TIME
            | OID_TIMETZ
            | OID_TIMESTAMP
            | OID_TIMESTAMPTZ
            | OID_INTERVAL
            | OID_JSONB
    ) {
        return Cow::Borrowed(raw);
    }
    let Ok(text) = std::str::from_utf8(raw) else {
        return Cow::Borrowed(raw);
    };
    let out = match ty {
        OID_FLOAT8 => float_text(text, 15),
        OID_FLOAT4 => float_text(text, 6),
        OID_NUMERIC => numeric_text(text),
        OID_TIME | OID_TIMETZ | OID_TIMESTAMP => strip_fraction(text, false),
        OID_INTERVAL => strip_fraction(text, true),
        OID_TIMESTAMPTZ => {
            let stripped = strip_fraction(text, false);
            let base = stripped.as_deref().unwrap_or(text);
            timestamptz_utc(base).or(stripped)
        }
        OID_JSONB => jsonb_canonical(text),
        _ => None,
    };
    match out {
        Some(s) => Cow::Owned(s.into_bytes()),
        None => Cow::Borrowed(raw),
    }
}

fn normalize_binary(ty: u32, raw: &[u8]) -> Cow<'_, [u8]> {
    match ty {
        OID_FLOAT8 => match <[u8; 8]>::try_from(raw) {
            Ok(b) => {
                let v = f64::from_be_bytes(b);
                if v == 0.0 {
                    Cow::Owned(0f64.to_be_bytes().to_vec())
                } else if v.is_nan() {
                    Cow::Owned(f64::NAN.to_be_bytes().to_vec())
                } else {
                    Cow::Borrowed(raw)
                }
            }
            Err(_) => Cow::Borrowed(raw),
        },
        OID_FLOAT4 => match <[u8; 4]>::try_from(raw) {
            Ok(b) => {
                let v = f32::from_be_bytes(b);
                if v == 0.0 {
                    Cow::Owned(0f32.to_be_bytes().to_vec())
                } else if v.is_nan() {
                    Cow::Owned(f32::NAN.to_be_bytes().to_vec())
                } else {
                    Cow::Borrowed(raw)
                }
            }
            Err(_) => Cow::Borrowed(raw),
        },
        _ => Cow::Borrowed(raw),
    }
}

/// Rounds to `digits` significant digits, which hides extra_float_digits and
/// last-bit noise (e.g. from parallel aggregation).
fn float_text(text: &str, digits: usize) -> Option<String> {
    let v: f64 = text.trim().parse().ok()?;
    if v.is_nan() {
        return Some("NaN".into());
    }
    if v.is_infinite() {
        return Some(if v > 0.0 { "Infinity" } else { "-Infinity" }.into());
    }
    let v = if v == 0.0 { 0.0 } else { v };
    Some(format!("{:.*e}", digits.saturating_sub(1), v))
}

fn numeric_text(text: &str) -> Option<String> {
    let mut s = text.trim();
    if s.contains('.') {
        s = s.trim_end_matches('0');
        s = s.strip_suffix('.').unwrap_or(s);
    }
    if s == "-0" {
        s = "0";
    }
    (s != text).then(|| s.to_string())
}

/// Drops trailing zeros of fractional seconds (and a bare '.'). Outside
/// intervals only a '.' after ":SS" counts, so dates like "02.10.2024" survive.
fn strip_fraction(text: &str, any_dot: bool) -> Option<String> {
    let b = text.as_bytes();
    let digit = |i: Option<usize>| i.and_then(|i| b.get(i)).is_some_and(u8::is_ascii_digit);
    let mut out: Vec<u8> = Vec::with_capacity(b.len());
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        let seconds_dot = b.get(i) == Some(&b'.')
            && digit(i.checked_sub(1))
            && (any_dot
                || (digit(i.checked_sub(2))
                    && i.checked_sub(3).and_then(|j| b.get(j)) == Some(&b':')));
        if !seconds_dot {
            i += 1;
            continue;
        }
        let start = i + 1;
        let mut end = start;
        while digit(Some(end)) {
            end += 1;
        }
        if end == start {
            i += 1;
            continue;
        }
        let digits = b.get(start..end).unwrap_or_default();
        let keep = digits.iter().rposition(|d| *d != b'0').map_or(0, |p| p + 1);
        out.extend_from_slice(b.get(copied..i).unwrap_or_default());
        if keep > 0 {
            out.push(b'.');
            out.extend_from_slice(digits.get(..keep).unwrap_or_default());
        }
        copied = end;
        i = end;
    }
    if copied == 0 {
        return None;
    }
    out.extend_from_slice(b.get(copied..).unwrap_or_default());
    // Only ASCII was removed, so this cannot fail; fall back to no change if it did.
    String::from_utf8(out).ok()
}

fn small_number(s: &str, min_len: usize, max_len: usize) -> Option<i64> {
    if s.len() < min_len || s.len() > max_len || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Rewrites an ISO-style timestamptz ("2024-01-02 03:04:05.5+01[:30[:15]][ BC]") in
/// UTC, so the session TimeZone doesn't matter. None if anything is unexpected.
fn timestamptz_utc(text: &str) -> Option<String> {
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(b) => (b, true),
        None => (text, false),
    };
    let (date, time) = body.split_once(' ')?;
    let mut d = date.split('-');
    let year = small_number(d.next()?, 4, 7)?;
    let month = small_number(d.next()?, 2, 2)?;
    let day = small_number(d.next()?, 2, 2)?;
    if d.next().is_some() || year == 0 || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let sign_at = time.find(['+', '-'])?;
    let (clock, offset) = (time.get(..sign_at)?, time.get(sign_at..)?);
    let (hms, fraction) = match clock.split_once('.') {
        Some((hms, f)) => (hms, Some(f)),
        None => (clock, None),
    };
    if let Some(f) = fraction {
        if f.is_empty() || !f.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
    }
    let mut t = hms.split(':');
    let hour = small_number(t.next()?, 2, 2)?;
    let minute = small_number(t.next()?, 2, 2)?;
    let second = small_number(t.next()?, 2, 2)?;
    if t.next().is_some() || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let mut o = offset.get(1..)?.split(':');
    let mut offset_secs = small_number(o.next()?, 2, 2)? * 3600;
    if let Some(m) = o.next() {
        offset_secs += small_number(m, 2, 2)? * 60;
    }
    if let Some(s) = o.next() {
        offset_secs += small_number(s, 2, 2)?;
    }
    if o.next().is_some() {
        return None;
    }
    let astronomical = if bc { 1 - year } else { year };
    let secs =
        days_from_civil(astronomical, month, day) * 86_400 + hour * 3600 + minute * 60 + second
            - sign * offset_secs;
    let (y, m, dd) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    let (shown_year, era) = if y <= 0 { (1 - y, " BC") } else { (y, "") };
    let mut out = format!(
        "{shown_year:04}-{m:02}-{dd:02} {:02}:{:02}:{:02}",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    );
    if let Some(f) = fraction {
        out.push('.');
        out.push_str(f);
    }
    out.push_str("+00");
    out.push_str(era);
    Some(out)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn jsonb_canonical(text: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    let mut out = String::with_capacity(text.len());
    write_json(&value, &mut out);
    Some(out)
}

/// Canonical JSON: object keys sorted. Depth is bounded by serde_json's parse limit.
fn write_json(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::String(s) => write_json_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_string(k, out);
                out.push(':');
                write_json(v, out);
            }
            out.push('}');
        }
    }
}

fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A value as a float, for tolerance checks: float4/float8 (text or binary), numeric text.
fn float_value(ty: u32, format: i16, raw: &[u8]) -> Option<f64> {
    match (ty, format) {
        (OID_FLOAT8 | OID_FLOAT4 | OID_NUMERIC, 0) => {
            std::str::from_utf8(raw).ok()?.trim().parse().ok()
        }
        (OID_FLOAT8, 1) => Some(f64::from_be_bytes(<[u8; 8]>::try_from(raw).ok()?)),
        (OID_FLOAT4, 1) => Some(f64::from(f32::from_be_bytes(
            <[u8; 4]>::try_from(raw).ok()?,
        ))),
        _ => None,
    }
}

fn is_floaty(ty: u32, format: i16) -> bool {
    matches!(
        (ty, format),
        (OID_FLOAT8 | OID_FLOAT4, _) | (OID_NUMERIC, 0)
    )
}

fn close(x: f64, y: f64, tolerance: f64) -> bool {
    if x.is_nan() || y.is_nan() {
        return x.is_nan() && y.is_nan();
    }
    if x.is_infinite() || y.is_infinite() {
        return x == y;
    }
    (x - y).abs() <= tolerance * 1f64.max(x.abs()).max(y.abs())
}

// ---------------------------------------------------------------------------
// Comparison

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

    fn new(result_set: usize, kind: DiffKind, detail: String) -> Self {
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

fn describe_end(end: &End) -> String {
    match end {
        End::Tag(t) => format!("\"{t}\""),
        End::Error { code, message } => format!("error {code} ({message})"),
        End::Empty => "an empty query".into(),
        End::Suspended => "a suspended portal".into(),
        End::Missing => "no end".into(),
    }
}

/// "SELECT 5" vs "SELECT 6" with matching row counts: a row difference, better reported as such.
fn tags_differ_only_in_count(t1: &str, rows1: u64, t2: &str, rows2: u64) -> bool {
    match (t1.rsplit_once(' '), t2.rsplit_once(' ')) {
        (Some((w1, n1)), Some((w2, n2))) => {
            w1 == w2 && n1.parse::<u64>() == Ok(rows1) && n2.parse::<u64>() == Ok(rows2)
        }
        _ => false,
    }
}

/// Outcome of comparing how two result sets ended.
enum Ends {
    /// Go on to columns and rows.
    Continue,
    /// Stop comparing this set, with a difference or without.
    Done(Option<Difference>),
}

fn compare_ends(i: usize, x: &ResultSet, y: &ResultSet) -> Ends {
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

fn compare_columns(i: usize, c1: &[Column], c2: &[Column], ignored: &[bool]) -> Option<Difference> {
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
struct RowCtx<'a> {
    columns: Option<&'a [Column]>,
    ignored: Vec<bool>,
    tolerance: f64,
}

impl RowCtx<'_> {
    fn ignored(&self, i: usize) -> bool {
        self.ignored.get(i).copied().unwrap_or(false)
    }

    fn values_equal(&self, i: usize, x: Option<&[u8]>, y: Option<&[u8]>) -> bool {
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
    fn first_difference(&self, x: &[Option<&[u8]>], y: &[Option<&[u8]>]) -> Option<usize> {
        (0..x.len().max(y.len())).find(|&i| {
            !self.ignored(i) && {
                match (x.get(i), y.get(i)) {
                    (Some(p), Some(q)) => !self.values_equal(i, *p, *q),
                    _ => true,
                }
            }
        })
    }

    fn equal_columns(&self, x: &[Option<&[u8]>], y: &[Option<&[u8]>]) -> usize {
        x.iter()
            .zip(y)
            .enumerate()
            .filter(|(i, (p, q))| !self.ignored(*i) && self.values_equal(*i, **p, **q))
            .count()
    }

    /// Hash of the columns that must match exactly under tolerance pairing.
    fn exact_key(&self, row: &[Option<&[u8]>]) -> u64 {
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

    fn name(&self, i: usize) -> Option<String> {
        self.columns.and_then(|c| c.get(i)).map(|c| c.name.clone())
    }

    fn render(&self, i: usize, value: Option<&[u8]>, max_chars: usize) -> Option<String> {
        let raw = value?;
        let (_, format) = column_type(self.columns, i);
        let text = match (self.columns.is_some(), format, std::str::from_utf8(raw)) {
            (true, 0, _) => String::from_utf8_lossy(raw).into_owned(),
            (false, _, Ok(s)) => s.to_string(),
            _ => hex(raw),
        };
        Some(clip(text, max_chars))
    }

    fn render_row(&self, row: &[Option<&[u8]>]) -> Vec<Option<String>> {
        row.iter()
            .enumerate()
            .map(|(i, v)| self.render(i, *v, MAX_VALUE_CHARS))
            .collect()
    }

    fn shown(&self, i: usize, value: Option<&[u8]>) -> String {
        match self.render(i, value, MAX_DETAIL_VALUE_CHARS) {
            None => "NULL".into(),
            Some(s) if s.is_empty() => "''".into(),
            Some(s) => s,
        }
    }
}

fn hex(raw: &[u8]) -> String {
    let mut s = String::with_capacity(2 + raw.len() * 2);
    s.push_str("\\x");
    for b in raw {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn clip(s: String, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((at, _)) => {
            let mut out = s.get(..at).unwrap_or_default().to_string();
            out.push('…');
            out
        }
        None => s,
    }
}

/// Differing rows found by localisation.
struct Found<'a> {
    a: Vec<&'a Entry>,
    b: Vec<&'a Entry>,
    /// 1-based row position (ordered results).
    at_row: Option<usize>,
    /// The rows in a/b account for every difference.
    exhaustive: bool,
}

fn compare_set(
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
fn multiset_diff<'a>(a: &[&'a Entry], b: &[&'a Entry]) -> (Vec<&'a Entry>, Vec<&'a Entry>) {
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
fn complete_below(set: &ResultSet) -> Option<u64> {
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

fn localize_unordered<'a>(x: &'a ResultSet, y: &'a ResultSet) -> Found<'a> {
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

struct Group<'a> {
    start: usize,
    key: u64,
    rows: Vec<&'a Entry>,
    /// May continue past the kept rows.
    truncated: bool,
}

fn groups(kept: &[Entry], overflowed: bool) -> Vec<Group<'_>> {
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
fn localize_ordered<'a>(x: &'a ResultSet, y: &'a ResultSet, ctx: &RowCtx<'_>) -> Found<'a> {
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
fn pair_all(a: &[&Entry], b: &[&Entry], ctx: &RowCtx<'_>) -> bool {
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
fn decode_all<'a>(rows: &[&'a Entry]) -> Option<Vec<Vec<Option<&'a [u8]>>>> {
    rows.iter()
        .map(|e| e.bytes.as_deref().and_then(decode))
        .collect()
}

/// The retained rows decoded, for reports.
fn decode_some<'a>(rows: &[&'a Entry]) -> Vec<Vec<Option<&'a [u8]>>> {
    rows.iter()
        .filter_map(|e| e.bytes.as_deref())
        .filter_map(decode)
        .take(MAX_REPORT_CANDIDATES)
        .collect()
}

fn wanted(rows: &[&Entry]) -> Vec<u64> {
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

fn report(
    i: usize,
    x: &ResultSet,
    y: &ResultSet,
    ctx: &RowCtx<'_>,
    found: &Found<'_>,
    max_rows_compared: usize,
) -> Difference {
    let ra = decode_some(&found.a);
    let rb = decode_some(&found.b);
    // Greedy pairing by most equal columns, served rows in order.
    let mut used = vec![false; rb.len()];
    let mut pairs: Vec<(usize, Option<usize>)> = Vec::new();
    for (ia, row) in ra.iter().enumerate() {
        let best = rb
            .iter()
            .enumerate()
            .filter(|(j, _)| !used.get(*j).copied().unwrap_or(true))
            .max_by_key(|(j, other)| (ctx.equal_columns(row, other), std::cmp::Reverse(*j)))
            .map(|(j, _)| j);
        if let Some(u) = best.and_then(|j| used.get_mut(j)) {
            *u = true;
        }
        pairs.push((ia, best));
    }
    // Under a tolerance, pairs equal within it are not differences: leave them out.
    if ctx.tolerance > 0.0 {
        pairs.retain(|(ia, ib)| match (ra.get(*ia), ib.and_then(|j| rb.get(j))) {
            (Some(p), Some(q)) => ctx.first_difference(p, q).is_some(),
            _ => true,
        });
    }
    let mut rows_a = Vec::new();
    let mut rows_b = Vec::new();
    for (ia, ib) in &pairs {
        if let Some(r) = ra.get(*ia).filter(|_| rows_a.len() < MAX_SHOWN_ROWS) {
            rows_a.push(ctx.render_row(r));
        }
        if let Some(r) = ib
            .and_then(|j| rb.get(j))
            .filter(|_| rows_b.len() < MAX_SHOWN_ROWS)
        {
            rows_b.push(ctx.render_row(r));
        }
    }
    for (j, r) in rb.iter().enumerate() {
        if rows_b.len() >= MAX_SHOWN_ROWS {
            break;
        }
        if !used.get(j).copied().unwrap_or(true) {
            rows_b.push(ctx.render_row(r));
        }
    }
    // The first pair that differs in a compared column names the column.
    let first_pair = pairs.iter().find_map(|(ia, ib)| {
        let (p, q) = (ra.get(*ia)?, rb.get((*ib)?)?);
        Some((p, q, ctx.first_difference(p, q)?))
    });
    let mut first_column = None;
    let mut column_detail = None;
    if let Some((p, q, c)) = first_pair {
        first_column = ctx.name(c);
        let label = match ctx.name(c) {
            Some(name) => format!("column {} \"{}\"", c + 1, name),
            None => format!("column {}", c + 1),
        };
        let value = |row: &[Option<&[u8]>]| {
            if c < row.len() {
                ctx.shown(c, row.get(c).copied().flatten())
            } else {
                "(no such column)".into()
            }
        };
        column_detail = Some(format!(
            "{label} differs: served {} vs shadow {}",
            value(p),
            value(q)
        ));
    }
    let at = found
        .at_row
        .map(|r| format!("row {r}: "))
        .unwrap_or_default();
    let (kind, detail) = if x.rows != y.rows {
        (
            DiffKind::RowCount,
            format!("row count differs: served {} vs shadow {}", x.rows, y.rows),
        )
    } else if let Some(d) = column_detail {
        (DiffKind::Rows, format!("{at}{d}"))
    } else if found.a.is_empty() && found.b.is_empty() {
        (
            DiffKind::Rows,
            format!(
                "rows differ beyond the first {max_rows_compared} rows kept per result set (only a combined hash was compared)"
            ),
        )
    } else if !ra.is_empty() && rb.is_empty() && found.b.is_empty() {
        (
            DiffKind::Rows,
            format!("{at}{} served row(s) are missing on shadow", found.a.len()),
        )
    } else if ra.is_empty() && !rb.is_empty() && found.a.is_empty() {
        (
            DiffKind::Rows,
            format!("{at}{} shadow row(s) are missing on served", found.b.len()),
        )
    } else if ra.len() < found.a.len() || rb.len() < found.b.len() {
        (
            DiffKind::Rows,
            format!(
                "{at}{} served and {} shadow row(s) differ; not all their bytes were retained (re-check with the wanted hashes)",
                found.a.len(),
                found.b.len()
            ),
        )
    } else {
        (
            DiffKind::Rows,
            format!(
                "{at}{} served and {} shadow row(s) differ",
                found.a.len(),
                found.b.len()
            ),
        )
    };
    Difference {
        result_set: i,
        kind,
        detail,
        first_column,
        rows_a,
        rows_b,
        wanted_a: wanted(&found.a),
        wanted_b: wanted(&found.b),
    }
}

#[cfg(test)]
mod tests {
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
}
