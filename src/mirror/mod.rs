//! Write mirroring: every committed write reaches the target, in the order
//! the source acknowledged the commits, and none is lost silently.
//!
//! - `capture`: per session, on the hot path: follows the traffic and turns
//!   each committed unit of work that wrote into a record.
//! - `spool`: the records on local disk, appended before the client sees
//!   the commit acknowledgement.
//! - `order`: the source commit order (a WAL position probed inside each
//!   unit) and the sequencer that applies units in it.
//! - `apply`: one task off the hot path that replays records in source
//!   commit order on per-session target connections and checks every
//!   outcome.
//! - `report`: divergences, non-deterministic statements, gaps: what an
//!   operator must know.

pub mod apply;
pub mod capture;
pub mod inflight;
pub mod order;
pub mod record;
pub mod report;
pub mod spool;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::error;

use self::inflight::InFlight;
use self::record::TxnRecord;
use self::report::Report;
use self::spool::{AppendError, Spool};
use crate::classify::Rules;
use crate::config::{MirrorConfig, OnFull};
use crate::metrics::Metrics;

pub struct Mirror {
    enabled: AtomicBool,
    /// Set when a gap stopped mirroring (`on_full = "stop_mirroring"`, or
    /// the spool failing): nothing more is captured until a restart.
    stopped: AtomicBool,
    pub rules: Arc<Rules>,
    pub spool: Spool,
    /// Units on their way to a commit on the source (see `inflight`).
    pub inflight: Arc<InFlight>,
    pub on_full: OnFull,
    pub max_txn_bytes: usize,
    pub apply_timeout: Duration,
    pub report: Report,
    pub metrics: Arc<Metrics>,
    /// Highest seq applied (or skipped as already applied) on the target.
    pub applied_seq: AtomicU64,
    /// Source commit time of the oldest unapplied record (0 = caught up).
    pub oldest_unapplied_us: AtomicU64,
    /// Per "user\0database": whether the order probe works there. An
    /// autocommit write gets a probe only where it does (see `order`).
    probe_works: Mutex<HashMap<String, bool>>,
    /// Gaps go to the audit log too.
    audit: Option<Arc<crate::audit::Audit>>,
    /// Every outcome check is reported to the health monitor (set once,
    /// when the proxy has one).
    pub health: std::sync::OnceLock<Arc<crate::health::Health>>,
}

/// The seq of a unit that will never be applied.
pub const NEVER: u64 = u64::MAX;

/// What a session must do after handing a record over.
pub enum Spooled {
    /// In the spool as this seq (`NEVER` when it was lost: it will never
    /// be applied).
    Done(u64),
    /// The spool is full and the policy is backpressure: hold the commit
    /// acknowledgement and try again.
    Full(Box<TxnRecord>),
}

impl Mirror {
    pub fn open(
        cfg: &MirrorConfig,
        metrics: Arc<Metrics>,
        audit: Option<Arc<crate::audit::Audit>>,
    ) -> anyhow::Result<Arc<Self>> {
        // The spool holds every mirrored statement: owner-only, created so
        // before the spool's own files are (see `private_files`).
        crate::private_files::private_dir(&cfg.spool_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create the spool directory {}: {e}",
                cfg.spool_dir.display()
            )
        })?;
        let spool = Spool::open(&cfg.spool_dir, cfg.max_spool_bytes).map_err(|e| {
            anyhow::anyhow!("cannot open the spool in {}: {e}", cfg.spool_dir.display())
        })?;
        let log = cfg
            .divergence_log
            .clone()
            .unwrap_or_else(|| cfg.spool_dir.join("divergences.jsonl"));
        let report = Report::open(&log, &cfg.spool_dir)?;
        let (inflight, left) = InFlight::open(&cfg.spool_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot open the in-flight journal in {}: {e}",
                cfg.spool_dir.display()
            )
        })?;
        let m = Arc::new(Self {
            enabled: AtomicBool::new(cfg.enabled),
            stopped: AtomicBool::new(false),
            rules: Arc::new(Rules::new(&cfg.write_functions)),
            spool,
            inflight: Arc::new(inflight),
            on_full: cfg.on_full,
            max_txn_bytes: cfg.max_txn_bytes,
            apply_timeout: Duration::from_millis(cfg.apply_timeout_ms),
            report,
            metrics,
            applied_seq: AtomicU64::new(0),
            oldest_unapplied_us: AtomicU64::new(0),
            probe_works: Mutex::default(),
            audit,
            health: std::sync::OnceLock::new(),
        });
        m.metrics.mirror.enabled.set(cfg.enabled as i64);
        m.metrics.mirror.spool_bytes.set(m.spool.bytes() as i64);
        for d in left {
            m.in_doubt(
                d.session,
                d.time_us,
                &d.statements,
                "the proxy stopped while this unit's commit was on its way to the source",
            );
        }
        Ok(m)
    }

    /// Whether sessions should capture their writes now.
    pub fn capturing(&self) -> bool {
        self.enabled.load(Ordering::Relaxed) && !self.stopped.load(Ordering::Relaxed)
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Switches mirroring on or off (config reload). Switching it off
    /// opens a gap: writes made meanwhile never reach the target.
    pub fn set_enabled(&self, on: bool) {
        let was = self.enabled.swap(on, Ordering::Relaxed);
        if was != on {
            self.metrics.mirror.enabled.set(on as i64);
            if on {
                self.report
                    .gap_closed("mirroring re-enabled", self.spool.last_seq());
            } else {
                self.metrics.mirror.gaps.inc();
                self.audit_gap("mirroring disabled by configuration");
                self.report.gap(
                    "mirroring disabled by configuration: writes from now on are not mirrored",
                    self.spool.last_seq(),
                );
            }
        }
    }

    /// Appends a committed unit to the spool, applying the `on_full`
    /// policy. Called by the session before it forwards the commit
    /// acknowledgement.
    pub fn spool_record(&self, mut rec: Box<TxnRecord>) -> Spooled {
        if self.stopped.load(Ordering::Relaxed) {
            self.metrics.mirror.lost_transactions.inc();
            return Spooled::Done(NEVER);
        }
        // Which commits were in flight as this one is spooled: the applier
        // waits for them before it may apply this unit (see `order`).
        rec.order.run = self.inflight.run;
        rec.order.deps = self.inflight.snapshot(rec.order.own.map(|(slot, _)| slot));
        match self.spool.append(&rec) {
            Ok(seq) => {
                self.metrics.mirror.spooled.inc();
                if rec.order.lsn.is_none() {
                    self.metrics.mirror.unordered.inc();
                }
                self.metrics
                    .mirror
                    .spool_bytes
                    .set(self.spool.bytes() as i64);
                Spooled::Done(seq)
            }
            Err(AppendError::Full { .. }) if self.on_full == OnFull::Backpressure => {
                Spooled::Full(rec)
            }
            Err(e) => {
                self.stop(&format!(
                    "{e}; mirroring stopped, the target needs a re-sync"
                ));
                self.metrics.mirror.lost_transactions.inc();
                Spooled::Done(NEVER)
            }
        }
    }

    /// Whether the order probe is known to work for this user and database.
    pub fn probe_works(&self, key: &str) -> Option<bool> {
        self.probe_works
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
    }

    pub fn set_probe_works(&self, key: &str, works: bool) {
        let mut m = self.probe_works.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 10_000 {
            m.clear();
        }
        if m.insert(key.to_string(), works) != Some(works) && !works {
            error!(
                user_database = %key.replace('\0', "/"),
                "the order probe (SELECT pg_current_wal_insert_lsn()) fails on the source for this user and database: their autocommit writes are mirrored without an order key; grant EXECUTE on pg_current_wal_insert_lsn() to fix"
            );
        }
    }

    /// Records a divergence in the report and the per-fingerprint metric.
    pub fn divergence(&self, d: report::Divergence) {
        self.metrics
            .mirror
            .divergences
            .get_or_create(&vec![("fingerprint", d.fingerprint.clone())])
            .inc();
        self.report.divergence(d);
    }

    /// A unit whose commit on the source is unknown (the proxy died, or the
    /// session ended, with the commit in flight): it is not on the target
    /// and may be on the source.
    pub fn in_doubt(&self, session: u64, time_us: u64, statements: &str, why: &str) {
        error!(
            session,
            statements,
            reason = why,
            "MIRROR IN DOUBT: a write may have committed on the source without reaching the target"
        );
        self.metrics.mirror.in_doubt.inc();
        self.report
            .in_doubt(session, time_us, statements, why, self.spool.last_seq());
    }

    /// A committed write that could not be captured (too large).
    pub fn lost(&self, why: &str) {
        self.metrics.mirror.lost_transactions.inc();
        self.stop(why);
    }

    fn stop(&self, why: &str) {
        if !self.stopped.swap(true, Ordering::Relaxed) {
            error!(
                reason = why,
                "MIRROR GAP: the target no longer receives every write"
            );
            self.audit_gap(why);
            self.metrics.mirror.gaps.inc();
            self.report.gap(why, self.spool.last_seq());
        }
    }

    /// The gap as an audit entry (the gap happened whether or not the
    /// entry can be written).
    fn audit_gap(&self, why: &str) {
        if let Some(a) = &self.audit {
            let fields = serde_json::json!({"reason": why, "after_seq": self.spool.last_seq()});
            if let Err(e) = a.record("mirror_gap", "mirror", fields) {
                error!(error = %e, "cannot write the audit log");
            }
        }
    }

    /// Whether the unit spooled as `seq` is applied on the target (0: no
    /// unit at all).
    pub fn is_applied(&self, seq: u64) -> bool {
        seq == 0 || (seq != NEVER && self.applied_seq.load(Ordering::Relaxed) >= seq)
    }

    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// `GET /status` section.
    pub fn status(&self) -> serde_json::Value {
        let last = self.spool.last_seq();
        let applied = self.applied_seq.load(Ordering::Relaxed).min(last);
        let oldest = self.oldest_unapplied_us.load(Ordering::Relaxed);
        let lag_s = if oldest == 0 || applied >= last {
            0.0
        } else {
            (capture::now_us().saturating_sub(oldest)) as f64 / 1e6
        };
        let m = &self.metrics.mirror;
        serde_json::json!({
            "enabled": self.enabled(),
            "state": if self.stopped() { "stopped" } else if !self.enabled() { "disabled" } else if applied >= last { "caught_up" } else { "applying" },
            "spooled_seq": last,
            "applied_seq": applied,
            "spooled_transactions": m.spooled.get(),
            "applied_transactions": m.applied.get(),
            "lag_transactions": last - applied,
            "lag_seconds": lag_s,
            "spool_bytes": self.spool.bytes(),
            "max_spool_bytes": self.spool.max_bytes(),
            "spool_dir": self.spool.dir().display().to_string(),
            "on_full": format!("{:?}", self.on_full),
            "lost_transactions": m.lost_transactions.get(),
            "in_doubt_transactions": m.in_doubt.get(),
            "skipped_already_applied": m.already_applied.get(),
            "units_without_order_key": m.unordered.get(),
            "order_waits": m.order_waits.get(),
            "backpressure_waits": m.backpressure_waits.get(),
            "target_connections": m.target_connections.get(),
            "report": self.report.status(),
        })
    }
}
