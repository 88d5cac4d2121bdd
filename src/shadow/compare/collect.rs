//! Collecting one side's answer: each backend message in turn, into a
//! bounded summary per result set (counts, hashes, a sample of rows).

use crate::protocol::error::error_fields;
use crate::protocol::message::take_cstr;
use crate::protocol::rows;
use crate::protocol::FrameError;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use super::*;

/// One kept row: its hash, its sort-key hash (0 when unordered) and maybe its bytes.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) hash: u64,
    pub(super) key: u64,
    pub(super) bytes: Option<Box<[u8]>>,
    /// Retained only because it was wanted (counts against the wanted cap, not the budget).
    pub(super) by_wanted: bool,
}

/// Heap order by hash only, for keeping the lowest hashes.
#[derive(Debug)]
pub(super) struct ByHash(pub(super) Entry);

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
pub(super) enum Mode {
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
    pub(super) mode: Mode,
    /// Per column: left out of hashes and comparisons.
    pub(super) ignored: Vec<bool>,
    /// Keyed: the first rows in order. Unordered: (after finish) the lowest hashes, sorted.
    pub(super) kept: Vec<Entry>,
    /// Unordered while collecting: max-heap of the lowest hashes.
    pub(super) heap: BinaryHeap<ByHash>,
    /// Wrapping sum of mix(row hash) over all rows.
    pub(super) multiset: u64,
    /// Running hash over all tie groups (key, multiset, size), for Keyed.
    pub(super) ordered: u64,
    /// Open tie group: key hash, multiset hash, size.
    pub(super) group: Option<(u64, u64, u64)>,
}

impl ResultSet {
    pub(super) fn new() -> Self {
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
    pub(super) fn overflowed(&self) -> bool {
        self.rows > self.kept.len() as u64
    }

    pub(super) fn close_group(&mut self) {
        if let Some((key, set, n)) = self.group.take() {
            self.ordered = fmix64(fmix64(fmix64(self.ordered ^ key).wrapping_add(set)) ^ n);
        }
    }

    pub(super) fn seal(&mut self) {
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
    pub(super) retained: usize,
}

impl Answer {
    /// Row bytes retained within the budget (wanted rows not included).
    pub fn retained_bytes(&self) -> usize {
        self.retained
    }
}

/// Retention budget of one side.
#[derive(Debug)]
pub(super) struct Budget {
    pub(super) max: usize,
    pub(super) used: usize,
    pub(super) wanted: HashSet<u64>,
    pub(super) wanted_held: usize,
}

impl Budget {
    pub(super) fn entry(&mut self, hash: u64, key: u64, body: &[u8]) -> Entry {
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

    pub(super) fn release(&mut self, entry: &Entry) {
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
    pub(super) settings: Arc<CompareSettings>,
    pub(super) ignored: Arc<IgnoredTableColumns>,
    pub(super) orders: Vec<Order>,
    pub(super) budget: Budget,
    pub(super) sets: Vec<ResultSet>,
    /// The last set has no end yet.
    pub(super) open: bool,
    pub(super) complete: bool,
    /// Scratch for DataRow field ranges.
    pub(super) fields: Vec<Option<Range<usize>>>,
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
            rows::ROW_DESCRIPTION => {
                let columns = parse_row_description(body)?;
                self.describe(columns);
            }
            rows::DATA_ROW => self.data_row(body)?,
            b'C' => {
                let tag = parse_command_complete(body)?;
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
    pub(super) fn current(&mut self) -> usize {
        if !self.open || self.sets.is_empty() {
            self.sets.push(ResultSet::new());
            self.open = true;
        }
        self.sets.len() - 1
    }

    pub(super) fn end(&mut self, end: End) {
        let i = self.current();
        if let Some(set) = self.sets.get_mut(i) {
            set.end = end;
        }
        self.open = false;
    }

    pub(super) fn describe(&mut self, columns: Vec<Column>) {
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

    pub(super) fn data_row(&mut self, body: &[u8]) -> Result<(), CollectError> {
        let mut fields = std::mem::take(&mut self.fields);
        let result = self.data_row_with(body, &mut fields);
        self.fields = fields;
        result
    }

    pub(super) fn data_row_with(
        &mut self,
        body: &[u8],
        fields: &mut Vec<Option<Range<usize>>>,
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

pub(super) fn ignore_mask(
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

pub(super) fn resolve_order(order: Option<&Order>, columns: &[Column], ignored: &[bool]) -> Mode {
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
// Message decoding (the wire format itself is `protocol`'s)

pub(super) fn collect_error(what: &str, e: FrameError) -> CollectError {
    CollectError(format!("{what}: {e}"))
}

pub(super) fn parse_row_description(body: &[u8]) -> Result<Vec<Column>, CollectError> {
    rows::row_description(body)
        .map(|field| {
            field.map(|f| Column {
                name: String::from_utf8_lossy(f.name).into_owned(),
                table_oid: f.table_oid,
                attnum: f.column,
                type_oid: f.type_oid,
                format: f.format,
            })
        })
        .collect::<Result<_, _>>()
        .map_err(|e| collect_error("RowDescription", e))
}

/// Field byte ranges of a DataRow body; None = NULL.
pub(super) fn parse_fields(
    body: &[u8],
    out: &mut Vec<Option<Range<usize>>>,
) -> Result<(), CollectError> {
    rows::data_row_ranges(body, out).map_err(|e| collect_error("DataRow", e))
}

pub(super) fn parse_command_complete(body: &[u8]) -> Result<String, CollectError> {
    let mut rest = body;
    let tag = take_cstr(&mut rest).map_err(|e| collect_error("CommandComplete", e))?;
    if !rest.is_empty() {
        return Err(CollectError(
            "CommandComplete: bytes after its tag".to_owned(),
        ));
    }
    Ok(String::from_utf8_lossy(tag).into_owned())
}

pub(super) fn parse_error(body: &[u8]) -> Result<(String, String), CollectError> {
    let fields = error_fields(body).map_err(|e| collect_error("ErrorResponse", e))?;
    Ok((
        fields.code.unwrap_or_default().to_owned(),
        fields.message.unwrap_or("(not UTF-8)").to_owned(),
    ))
}

pub(super) fn field<'a>(body: &'a [u8], range: Option<&Range<usize>>) -> Option<&'a [u8]> {
    range.map(|r| body.get(r.clone()).unwrap_or_default())
}

/// Decodes a retained (already validated) DataRow body.
pub(super) fn decode(body: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    rows::data_row(body).ok()
}
