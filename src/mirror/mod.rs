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
pub mod metrics;
pub mod order;
pub mod recover;
pub mod report;
pub mod rows;
pub mod spool;
pub mod unit;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::error;

use self::inflight::InFlight;
use self::report::MirrorReport;
use self::spool::{AppendError, Spool};
use self::unit::MirroredUnit;
use crate::classify::Rules;
use crate::config::{MirrorConfig, OnFull};
pub use metrics::MirrorMetrics;

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
    pub report: MirrorReport,
    pub metrics: Arc<MirrorMetrics>,
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
    /// Units in doubt waiting to be resolved against the source.
    pub recovery: recover::Recovery,
    /// The source's row images, for units statements cannot reproduce.
    pub rows: rows::RowImages,
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
    Full(Box<MirroredUnit>),
}

impl Mirror {
    pub fn open(
        cfg: &MirrorConfig,
        metrics: Arc<MirrorMetrics>,
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
        let spool = Spool::open(&cfg.spool_dir, cfg.max_spool_bytes, cfg.fsync).map_err(|e| {
            anyhow::anyhow!("cannot open the spool in {}: {e}", cfg.spool_dir.display())
        })?;
        let log = cfg
            .divergence_log
            .clone()
            .unwrap_or_else(|| cfg.spool_dir.join("divergences.jsonl"));
        let report = MirrorReport::open(&log, &cfg.spool_dir)?;
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
            recovery: recover::Recovery::default(),
            rows: rows::RowImages::new(&cfg.row_images),
        });
        m.metrics.enabled.set(cfg.enabled as i64);
        m.metrics.spool_bytes.set(m.spool.bytes() as i64);
        let o = &m.spool.opened;
        if o.may_have_lost(cfg.fsync) {
            let why = format!(
                "the machine restarted while pgshift ran with mirror.fsync = \"{}\": units acknowledged after the last sync may be missing (seqs from {} on, before {})",
                if cfg.fsync == crate::config::FsyncPolicy::Interval { "interval" } else { "off" },
                o.last_on_disk + 1,
                o.next_seq
            );
            m.metrics.gaps.inc();
            m.audit_gap(&why);
            m.report.gap(&why, o.last_on_disk);
        }
        // What the previous process's journal left: units whose spool
        // record made it are done; the rest are resolved (see `recover`).
        let owners = m.spool.recent_owners();
        for d in left {
            let spooled = match (d.spooled_as, d.key) {
                (Some(seq), _) => seq <= m.spool.opened.last_on_disk,
                (None, Some(key)) => owners.contains(&key),
                (None, None) => false,
            };
            if !spooled {
                m.unit_in_doubt(
                    d,
                    "the proxy stopped while this unit's commit was on its way to the source",
                    true,
                );
            }
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
            self.metrics.enabled.set(on as i64);
            if on {
                self.report
                    .gap_closed("mirroring re-enabled", self.spool.last_seq());
            } else {
                self.metrics.gaps.inc();
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
    pub fn spool_record(&self, mut rec: Box<MirroredUnit>) -> Spooled {
        if self.stopped.load(Ordering::Relaxed) {
            self.metrics.lost_transactions.inc();
            return Spooled::Done(NEVER);
        }
        // Which commits were in flight as this one is spooled: the applier
        // waits for them before it may apply this unit (see `order`).
        rec.order.run = self.inflight.run;
        rec.order.deps = self.inflight.snapshot(rec.order.own.map(|(slot, _)| slot));
        match self.spool.append(&rec) {
            Ok(seq) => {
                self.metrics.spooled.inc();
                if rec.order.lsn.is_none() {
                    self.metrics.unordered.inc();
                }
                self.metrics.spool_bytes.set(self.spool.bytes() as i64);
                Spooled::Done(seq)
            }
            Err(AppendError::Full { .. } | AppendError::NoSpace(_))
                if self.on_full == OnFull::Backpressure =>
            {
                Spooled::Full(rec)
            }
            Err(e) => {
                self.stop(&format!(
                    "{e}; mirroring stopped, the target needs a re-sync"
                ));
                self.metrics.lost_transactions.inc();
                Spooled::Done(NEVER)
            }
        }
    }

    /// Spooled records `from..=to` cannot be read back (damaged frames):
    /// the target misses them.
    pub fn unreadable(&self, from: u64, to: u64, why: &str) {
        let why = format!("spool records {from} to {to} are unreadable ({why}); the target misses them and needs a re-sync");
        error!(reason = %why, "MIRROR GAP");
        self.metrics.gaps.inc();
        self.audit_gap(&why);
        self.report.gap(&why, from.saturating_sub(1));
    }

    /// The applier gave up on a committed unit: the target misses it.
    pub fn unapplied(&self, seq: u64, xid: Option<u64>, why: &str) {
        let why = format!(
            "spool record {seq} (source transaction {}) was given up after repeated failures on the target ({why}); the target misses it and needs a re-sync",
            xid.map_or("unknown".to_string(), |x| x.to_string())
        );
        error!(reason = %why, "MIRROR GAP");
        self.metrics.gaps.inc();
        self.audit_gap(&why);
        self.report.gap(&why, seq.saturating_sub(1));
    }

    /// The spool could not make `seq` durable: mirroring stops with a gap
    /// (nothing acknowledged since the last good sync can be vouched for).
    pub fn sync_failed(&self, why: &str) {
        self.stop(&format!(
            "the spool could not be synced to stable storage ({why}); mirroring stopped, the target needs a re-sync"
        ));
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
        self.metrics.in_doubt.inc();
        self.report
            .in_doubt(session, time_us, statements, why, self.spool.last_seq());
    }

    /// A committed write that could not be captured (too large).
    pub fn lost(&self, why: &str) {
        self.metrics.lost_transactions.inc();
        self.stop(why);
    }

    fn stop(&self, why: &str) {
        if !self.stopped.swap(true, Ordering::Relaxed) {
            error!(
                reason = why,
                "MIRROR GAP: the target no longer receives every write"
            );
            self.audit_gap(why);
            self.metrics.gaps.inc();
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
            (crate::clock::now_us().saturating_sub(oldest)) as f64 / 1e6
        };
        let m = &self.metrics;
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
            "fsync": self.spool.policy(),
            "synced_seq": self.spool.synced_seq(),
            "spool_failure": self.spool.failure(),
            "max_spool_bytes": self.spool.max_bytes(),
            "spool_dir": self.spool.dir().display().to_string(),
            "on_full": format!("{:?}", self.on_full),
            "lost_transactions": m.lost_transactions.get(),
            "in_doubt_transactions": m.in_doubt.get(),
            "in_doubt_resolving": self.recovery.pending(),
            "in_doubt_resolved_committed": self.recovery.committed.load(Ordering::Relaxed),
            "in_doubt_resolved_aborted": self.recovery.aborted.load(Ordering::Relaxed),
            "skipped_already_applied": m.already_applied.get(),
            "units_without_order_key": m.unordered.get(),
            "order_waits": m.order_waits.get(),
            "backpressure_waits": m.backpressure_waits.get(),
            "target_connections": m.target_connections.get(),
            "row_images": self.rows.status(),
            "report": self.report.status(),
        })
    }
}
