//! `[shadow]`: shadow reads and how their answers are compared.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Shadow reads: a sampled share of eligible reads also runs on the other
/// database and the answers are compared (see `shadow`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShadowConfig {
    /// Share of eligible reads shadowed, 0 to 100 (fractions allowed).
    pub sample_percent: f64,
    /// Shadow reads running at once (restart to change).
    pub max_inflight: usize,
    /// Shadow reads waiting for a slot; more are skipped and counted
    /// (restart to change).
    pub queue: usize,
    /// A shadow read (or re-check) with no complete answer within this is
    /// skipped and counted.
    pub timeout_ms: u64,
    /// How long a shadow read on the target waits for the mirror to apply
    /// what the source had acknowledged; longer is skipped and counted.
    pub max_wait_ms: u64,
    /// Pause before a mismatch is re-checked on both sides.
    pub recheck_delay_ms: u64,
    /// Relative tolerance for float (and numeric) values: equal when
    /// |a - b| <= tolerance * max(1, |a|, |b|). 0 = exact (after rounding
    /// float8 to 15 significant digits).
    pub float_tolerance: f64,
    /// Columns left out of every comparison: `column` (any table) or
    /// `table.column` (the table the column comes from).
    pub ignore_columns: Vec<String>,
    /// Rows per result compared one by one; the rest are compared by count
    /// and a combined hash.
    pub max_rows_compared: usize,
    /// Leave bind parameters out of the mismatch log and API.
    pub redact_parameters: bool,
    /// JSON-lines file of confirmed mismatches (restart to change).
    pub mismatch_log: PathBuf,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        Self {
            sample_percent: 0.0,
            max_inflight: 8,
            queue: 256,
            timeout_ms: 5_000,
            max_wait_ms: 2_000,
            recheck_delay_ms: 200,
            float_tolerance: 0.0,
            ignore_columns: Vec::new(),
            max_rows_compared: 100_000,
            redact_parameters: false,
            mismatch_log: PathBuf::from("pgshift-mismatches.jsonl"),
        }
    }
}

impl ShadowConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: &str| Err((format!("shadow.{k}"), m.to_string()));
        if !(0.0..=100.0).contains(&self.sample_percent) {
            return err("sample_percent", "must be between 0 and 100");
        }
        if !(1..=1024).contains(&self.max_inflight) {
            return err("max_inflight", "must be between 1 and 1024");
        }
        if !(1..=100_000).contains(&self.queue) {
            return err("queue", "must be between 1 and 100000");
        }
        if !(1..=3_600_000).contains(&self.timeout_ms) {
            return err("timeout_ms", "must be between 1 and 3600000");
        }
        if self.max_wait_ms > 3_600_000 {
            return err("max_wait_ms", "must be at most 3600000");
        }
        if self.recheck_delay_ms > 600_000 {
            return err("recheck_delay_ms", "must be at most 600000");
        }
        if !(0.0..1.0).contains(&self.float_tolerance) {
            return err("float_tolerance", "must be at least 0 and below 1");
        }
        if !(1..=100_000_000).contains(&self.max_rows_compared) {
            return err("max_rows_compared", "must be between 1 and 100000000");
        }
        for c in &self.ignore_columns {
            let parts: Vec<&str> = c.split('.').collect();
            if parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
                return err("ignore_columns", "each entry is `column` or `table.column`");
            }
        }
        if self.mismatch_log.as_os_str().is_empty() {
            return err("mismatch_log", "must not be empty");
        }
        Ok(())
    }
}
