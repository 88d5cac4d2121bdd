//! What the mirror tells an operator: divergences (the target answered a
//! mirrored statement differently from the source), statements that cannot
//! replay to identical values, target errors, and gaps in the mirror.
//!
//! Divergences go to a JSON-lines log once per statement fingerprint (later
//! ones are counted); gaps are also appended to `gaps.jsonl` in the spool
//! directory, so a restart does not make them disappear.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;
use serde_json::json;
use tracing::warn;

/// Bound on the distinct fingerprints tracked in memory.
const MAX_FINGERPRINTS: usize = 10_000;
/// Gap events listed in status (the log keeps every one).
const MAX_GAPS_SHOWN: usize = 1000;

#[derive(Debug, Clone, Serialize)]
pub struct Divergence {
    pub time_us: u64,
    pub seq: u64,
    pub session: u64,
    pub fingerprint: String,
    pub statement: String,
    pub source: String,
    pub target: String,
    /// The target's error message, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_error: Option<String>,
    /// Which segment of the unit and which outcome in it.
    pub segment: usize,
    pub position: usize,
}

#[derive(Debug, Clone, Serialize)]
struct Counted {
    count: u64,
    first: Divergence,
    last_seq: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NonDeterministic {
    pub fingerprint: String,
    pub statement: String,
    pub tables: Vec<String>,
    pub reasons: Vec<String>,
    /// Units with it applied from the source's row images (exact values).
    pub applied_as_rows: u64,
    /// Units with it replayed as statements: their values on the target
    /// may differ (with why the rows were not used, the last time).
    pub replayed_as_statements: u64,
    pub why_not_rows: Option<String>,
}

#[derive(Default)]
struct Inner {
    divergences: BTreeMap<String, Counted>,
    total_divergences: u64,
    target_errors: BTreeMap<String, u64>,
    nondeterministic: BTreeMap<String, NonDeterministic>,
    /// The latest gap events (all of them are in gaps.jsonl).
    gaps: Vec<serde_json::Value>,
    gap_count: u64,
    in_doubt_count: u64,
    /// What the applier is doing or waiting for, when not simply applying.
    apply_state: Option<String>,
    /// Units applied without an in-transaction progress marker.
    at_least_once: u64,
}

pub struct MirrorReport {
    log: Mutex<Option<File>>,
    log_path: PathBuf,
    gaps_path: PathBuf,
    inner: Mutex<Inner>,
}

impl MirrorReport {
    /// Opens the divergence log and reads `gaps.jsonl` in `spool_dir`. Both
    /// hold statement texts, so both are private (`private_files`), and so
    /// is the spool directory itself.
    pub fn open(log_path: &Path, spool_dir: &Path) -> anyhow::Result<Self> {
        crate::private_files::private_dir(spool_dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", spool_dir.display()))?;
        crate::private_files::create_parent(log_path).map_err(|e| {
            anyhow::anyhow!("cannot create the directory of {}: {e}", log_path.display())
        })?;
        let log = crate::private_files::open_append(log_path)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", log_path.display()))?;
        let gaps_path = spool_dir.join("gaps.jsonl");
        if gaps_path.exists() {
            crate::private_files::tighten(&gaps_path)
                .map_err(|e| anyhow::anyhow!("cannot tighten {}: {e}", gaps_path.display()))?;
        }
        let mut inner = Inner::default();
        if let Ok(text) = std::fs::read_to_string(&gaps_path) {
            for g in text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            {
                match g["kind"].as_str() {
                    Some("gap") => inner.gap_count += 1,
                    Some("in_doubt") => inner.in_doubt_count += 1,
                    _ => {}
                }
                inner.gaps.push(g);
            }
            let excess = inner.gaps.len().saturating_sub(MAX_GAPS_SHOWN);
            inner.gaps.drain(..excess);
        }
        Ok(Self {
            log: Mutex::new(Some(log)),
            log_path: log_path.to_path_buf(),
            gaps_path,
            inner: Mutex::new(inner),
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a divergence; returns whether it was the first for its
    /// fingerprint (and so was logged).
    pub fn divergence(&self, d: Divergence) -> bool {
        let mut inner = self.inner();
        inner.total_divergences += 1;
        let tracked = inner.divergences.len() < MAX_FINGERPRINTS;
        let first = match inner.divergences.get_mut(&d.fingerprint) {
            Some(c) => {
                c.count += 1;
                c.last_seq = d.seq;
                false
            }
            None => {
                if tracked {
                    inner.divergences.insert(
                        d.fingerprint.clone(),
                        Counted {
                            count: 1,
                            first: d.clone(),
                            last_seq: d.seq,
                        },
                    );
                }
                true
            }
        };
        drop(inner);
        if first {
            warn!(
                seq = d.seq,
                fingerprint = %d.fingerprint,
                source = %d.source,
                target = %d.target,
                statement = %truncate(&d.statement, 200),
                "mirror divergence: the target answered differently from the source"
            );
            let line = serde_json::to_string(&d).unwrap_or_default();
            let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = log.as_mut() {
                if let Err(e) = writeln!(f, "{line}") {
                    warn!(error = %e, path = %self.log_path.display(), "cannot write the divergence log");
                    *log = None;
                }
            }
        }
        first
    }

    pub fn target_error(&self, sqlstate: &str) {
        let class = sqlstate.get(..2).unwrap_or("??").to_string();
        *self.inner().target_errors.entry(class).or_default() += 1;
    }

    /// Records a unit with a non-deterministic statement: applied from row
    /// images (`why_not_rows` None: exact) or replayed as statements.
    pub fn nondeterministic(&self, mut n: NonDeterministic, why_not_rows: Option<&str>) {
        let mut inner = self.inner();
        if let Some(seen) = inner.nondeterministic.get_mut(&n.fingerprint) {
            match why_not_rows {
                None => seen.applied_as_rows += 1,
                Some(w) => {
                    if seen.replayed_as_statements == 0 {
                        warn!(fingerprint = %n.fingerprint, reason = w,
                            "mirrored write replayed as statements: its values on the target may differ; verify these tables");
                    }
                    seen.replayed_as_statements += 1;
                    seen.why_not_rows = Some(w.to_string());
                }
            }
            return;
        }
        if inner.nondeterministic.len() >= MAX_FINGERPRINTS {
            return;
        }
        match why_not_rows {
            None => n.applied_as_rows = 1,
            Some(w) => {
                warn!(
                    fingerprint = %n.fingerprint,
                    tables = ?n.tables,
                    reasons = ?n.reasons,
                    statement = %truncate(&n.statement, 200),
                    why_not_rows = w,
                    "mirrored write is not deterministic and was replayed as statements: its values on the target may differ; verify these tables"
                );
                n.replayed_as_statements = 1;
                n.why_not_rows = Some(w.to_string());
            }
        }
        inner.nondeterministic.insert(n.fingerprint.clone(), n);
    }

    /// Fingerprints whose values on the target may differ (some unit with
    /// them was replayed as statements).
    pub fn nondeterministic_count(&self) -> usize {
        self.inner()
            .nondeterministic
            .values()
            .filter(|n| n.replayed_as_statements > 0)
            .count()
    }

    /// Records a gap: writes after `at_seq` may be missing on the target.
    pub fn gap(&self, why: &str, at_seq: u64) {
        self.event("gap", why, at_seq);
    }

    /// Records that mirroring resumed after a gap (the gap still stands).
    pub fn gap_closed(&self, why: &str, at_seq: u64) {
        self.event("resumed", why, at_seq);
    }

    fn event(&self, kind: &str, why: &str, at_seq: u64) {
        let g = json!({
            "time_us": crate::clock::now_us(),
            "kind": kind,
            "after_seq": at_seq,
            "reason": why,
        });
        self.record_gap(g);
    }

    /// Appends to gaps.jsonl and keeps the latest in memory for status.
    fn record_gap(&self, g: serde_json::Value) {
        match crate::private_files::open_append(&self.gaps_path) {
            Ok(mut f) => {
                if let Err(e) = writeln!(f, "{g}") {
                    warn!(error = %e, path = %self.gaps_path.display(), "cannot write the gap log");
                }
            }
            Err(e) => {
                warn!(error = %e, path = %self.gaps_path.display(), "cannot open the gap log")
            }
        }
        let mut inner = self.inner();
        match g["kind"].as_str() {
            Some("gap") => inner.gap_count += 1,
            Some("in_doubt") => inner.in_doubt_count += 1,
            _ => {}
        }
        if inner.gaps.len() >= MAX_GAPS_SHOWN {
            inner.gaps.remove(0);
        }
        inner.gaps.push(g);
    }

    /// A unit whose source commit is unknown; kept in gaps.jsonl.
    pub fn in_doubt(&self, session: u64, time_us: u64, statements: &str, why: &str, at_seq: u64) {
        let g = json!({
            "time_us": crate::clock::now_us(),
            "kind": "in_doubt",
            "after_seq": at_seq,
            "reason": why,
            "session": session,
            "started_us": time_us,
            "statements": statements,
        });
        self.record_gap(g);
    }

    /// A unit in doubt that the source's transaction status settled:
    /// spooled again as `seq` (committed) or dropped (0).
    pub fn resolved(
        &self,
        session: u64,
        xid: Option<u64>,
        outcome: &str,
        statements: &str,
        seq: u64,
    ) {
        let g = json!({
            "time_us": crate::clock::now_us(),
            "kind": "resolved",
            "after_seq": seq,
            "reason": outcome,
            "session": session,
            "xid": xid,
            "statements": statements,
        });
        self.record_gap(g);
    }

    pub fn set_apply_state(&self, s: Option<String>) {
        self.inner().apply_state = s;
    }

    pub fn at_least_once(&self) {
        self.inner().at_least_once += 1;
    }

    pub fn status(&self) -> serde_json::Value {
        let inner = self.inner();
        json!({
            "apply_state": inner.apply_state,
            "divergences_total": inner.total_divergences,
            "divergences": inner.divergences.iter().map(|(fp, c)| json!({
                "fingerprint": fp,
                "count": c.count,
                "last_seq": c.last_seq,
                "statement": truncate(&c.first.statement, 500),
                "source": c.first.source,
                "target": c.first.target,
                "target_error": c.first.target_error,
            })).collect::<Vec<_>>(),
            "divergence_log": self.log_path.display().to_string(),
            "target_errors_by_class": inner.target_errors,
            "nondeterministic": inner.nondeterministic.values().collect::<Vec<_>>(),
            "gaps": inner.gaps,
            // Writes may be missing on the target: a gap, or units whose
            // source commit is unknown.
            "needs_resync": inner.gap_count + inner.in_doubt_count > 0,
            "gaps_total": inner.gap_count,
            "in_doubt": inner.in_doubt_count,
            "applied_without_progress_marker": inner.at_least_once,
        })
    }
}

pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}
