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
//!
//! In order of an answer's life: `collect` (one side's messages into a
//! summary, decoded by `protocol::rows`), `normalize` (a value's canonical
//! form and the row hashes), `diff` (two summaries into a verdict and the
//! differing rows), `report` (what a mismatch report shows of them).

use std::fmt;

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

mod collect;
mod diff;
mod normalize;
mod report;
#[cfg(test)]
mod tests;

use collect::*;
pub use collect::{Answer, Collector, ResultSet};
use diff::*;
pub use diff::{compare, Comparison, DiffKind, Difference};
use normalize::*;
use report::*;
