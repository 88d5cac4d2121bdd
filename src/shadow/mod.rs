//! Shadow reads: evidence that the target answers like the source.
//!
//! A sampled share of eligible reads (as routing defines them) also runs on
//! the other database, and the two answers are compared. The client always
//! gets the served side's answer as it comes; the proxy only copies it on
//! the way past (`tap`), within a global byte budget, into a bounded queue
//! that the shadow executor (`exec`, its own thread) drains. Work that does
//! not fit is skipped and counted, never queued without limit.
//!
//! - `tap`: on the hot path, copies the served answer of a sampled read.
//! - `exec`: the executor: connection pools per side, the race-free wait on
//!   the mirror, running the other side, the re-check, noise learning.
//! - `compare`: answers turned into bounded summaries (row hashes with
//!   type-aware normalisation) and compared.
//! - `query`: what the statement text says about the comparison (ORDER BY
//!   keys, LIMIT without ORDER BY, fingerprint).
//! - `report`: confirmed and transient mismatches per fingerprint, learned
//!   noise, the mismatch log, metrics.

pub mod compare;
pub mod exec;
pub mod query;
pub mod report;
pub mod tap;

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::config::ShadowConfig;
use crate::protocol::startup::StartupMessage;
use crate::tracker::StateOp;
use crate::tracker::Statement;

pub use self::report::{MismatchReport, ShadowMetrics};
pub use self::tap::{Chunk, Tap};

/// Most bytes of served answers held in taps' queues at once, over all
/// sessions; a tap that would go past it gives up (counted).
pub const MAX_TAP_BYTES: usize = 64 << 20;

/// Which database answered, or runs a shadow read.
pub use crate::upstream::roles::Db;

/// The shadow settings in force (every key but the sizes changes live).
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowSettings {
    pub sample_percent: f64,
    pub timeout: Duration,
    pub max_wait: Duration,
    pub recheck_delay: Duration,
    pub redact_parameters: bool,
    pub compare: Arc<compare::CompareSettings>,
    /// `table.column` entries of `ignore_columns`, lowercase.
    pub ignore_table_columns: Vec<(String, String)>,
}

impl ShadowSettings {
    pub fn from_config(c: &ShadowConfig) -> Self {
        let mut columns = Vec::new();
        let mut table_columns = Vec::new();
        for entry in &c.ignore_columns {
            let e = entry.to_lowercase();
            match e.split_once('.') {
                Some((t, col)) => table_columns.push((t.to_string(), col.to_string())),
                None => columns.push(e),
            }
        }
        Self {
            sample_percent: c.sample_percent,
            timeout: Duration::from_millis(c.timeout_ms),
            max_wait: Duration::from_millis(c.max_wait_ms),
            recheck_delay: Duration::from_millis(c.recheck_delay_ms),
            redact_parameters: c.redact_parameters,
            compare: Arc::new(compare::CompareSettings {
                float_tolerance: c.float_tolerance,
                ignore_columns: columns,
                max_rows_compared: c.max_rows_compared,
                max_retained_bytes: MAX_RETAINED_BYTES,
            }),
            ignore_table_columns: table_columns,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut ignore = self.compare.ignore_columns.clone();
        ignore.extend(
            self.ignore_table_columns
                .iter()
                .map(|(t, c)| format!("{t}.{c}")),
        );
        serde_json::json!({
            "sample_percent": self.sample_percent,
            "timeout_ms": self.timeout.as_millis() as u64,
            "max_wait_ms": self.max_wait.as_millis() as u64,
            "recheck_delay_ms": self.recheck_delay.as_millis() as u64,
            "float_tolerance": self.compare.float_tolerance,
            "ignore_columns": ignore,
            "max_rows_compared": self.compare.max_rows_compared,
            "redact_parameters": self.redact_parameters,
        })
    }
}

/// Row bytes kept per side for reporting differing rows.
const MAX_RETAINED_BYTES: usize = 1 << 20;

/// A read as the client sent it, enough to run it again elsewhere.
#[derive(Debug, Clone)]
pub enum Request {
    /// A simple Query's body (the text and its NUL).
    Simple(Bytes),
    /// Extended-protocol messages up to (not including) the Sync, and the
    /// named statements they bind.
    Extended {
        frames: Bytes,
        statements: Vec<(Box<[u8]>, Statement)>,
    },
}

/// Who the session is, for the shadow connections that stand in for it.
pub struct SessionInfo {
    pub startup: StartupMessage,
    /// Sessions with the same startup parameters share shadow connections.
    pub key: u64,
}

impl SessionInfo {
    pub fn new(startup: &StartupMessage) -> Self {
        let mut h = crate::classify::analyze::fnv1a(b"");
        for (k, v) in startup.params() {
            h = (h ^ crate::classify::analyze::fnv1a(k)).wrapping_mul(0x100000001b3);
            h = (h ^ crate::classify::analyze::fnv1a(v)).wrapping_mul(0x100000001b3);
        }
        Self {
            startup: startup.clone(),
            key: h,
        }
    }
}

/// One shadowed read, handed to the executor.
pub struct Job {
    pub served: Db,
    pub request: Request,
    pub session: Arc<SessionInfo>,
    /// The session state the source had (SETs since the last reset).
    pub state: Vec<StateOp>,
    /// The mirror's last spooled seq when the read started: everything the
    /// source had acknowledged by then.
    pub watermark: u64,
    /// The served answer, as the client got it (taken by the first
    /// comparison).
    pub answer: Option<mpsc::Receiver<Chunk>>,
    pub started: Instant,
}

/// The shadow reads of the whole proxy: settings, the queue to the
/// executor, the report.
pub struct Shadow {
    settings: ArcSwap<ShadowSettings>,
    /// `sample_percent` scaled to 2^32, read on the hot path without the
    /// `ArcSwap`.
    threshold: AtomicU32,
    jobs: mpsc::Sender<Job>,
    pub report: Arc<MismatchReport>,
    /// Bytes of served answers queued in taps.
    pub tap_bytes: Arc<AtomicUsize>,
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(rand::random::<u64>() | 1);
}

/// xorshift64*: a sampling draw costs a few instructions.
fn draw() -> u32 {
    RNG.with(|r| {
        let mut x = r.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        r.set(x);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
    })
}

fn threshold(percent: f64) -> u32 {
    ((percent / 100.0) * (u32::MAX as f64)).round() as u32
}

impl Shadow {
    pub fn new(c: &ShadowConfig, report: Arc<MismatchReport>) -> (Arc<Self>, mpsc::Receiver<Job>) {
        let (tx, rx) = mpsc::channel(c.queue);
        let s = ShadowSettings::from_config(c);
        let shadow = Arc::new(Self {
            threshold: AtomicU32::new(threshold(s.sample_percent)),
            settings: ArcSwap::from_pointee(s),
            jobs: tx,
            report,
            tap_bytes: Arc::new(AtomicUsize::new(0)),
        });
        (shadow, rx)
    }

    pub fn settings(&self) -> Arc<ShadowSettings> {
        self.settings.load_full()
    }

    pub fn store(&self, s: ShadowSettings) {
        self.threshold.store(threshold(s.sample_percent), Relaxed);
        self.settings.store(Arc::new(s));
    }

    /// Whether this eligible read is shadowed (hot path).
    #[inline]
    /// Whether any share of reads is shadowed.
    pub fn engaged(&self) -> bool {
        self.threshold.load(Relaxed) != 0
    }

    pub fn sample(&self) -> bool {
        let t = self.threshold.load(Relaxed);
        t != 0 && (t == u32::MAX || draw() < t)
    }

    /// A shadowed read: the returned tap copies the served answer and
    /// hands the job to the executor with it. `None` (counted) when the
    /// queue is already full.
    pub fn submit(
        &self,
        served: Db,
        request: Request,
        session: Arc<SessionInfo>,
        state: Vec<StateOp>,
        watermark: u64,
    ) -> Option<Tap> {
        if self.jobs.capacity() == 0 {
            self.report.metrics.skip("queue_full");
            return None;
        }
        let (mut tap, answer) = Tap::new(Arc::clone(&self.tap_bytes));
        tap.defer(tap::Deferred {
            job: Job {
                served,
                request,
                session,
                state,
                watermark,
                answer: Some(answer),
                started: Instant::now(),
            },
            queue: self.jobs.clone(),
            metrics: self.report.metrics.clone(),
        });
        Some(tap)
    }
}
