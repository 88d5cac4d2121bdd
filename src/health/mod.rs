//! The health monitor and automatic failback.
//!
//! The hot path only records what happened: one `Sample` per request the
//! proxy made of a backend (a read it served, a routed read that failed, a
//! mirrored unit, a shadow read that diverged, a health check), pushed into
//! a per-thread buffer under an uncontended lock. Everything else happens on
//! the monitor's own thread, ten times a second:
//!
//! - `window`: the samples go into rolling windows per backend (requests,
//!   failures by kind, an hdr latency histogram of the reads served, and
//!   per query shape for the target);
//! - `rules`: the trip rules read the windows (error rate, p95, p95 against
//!   the source's, mirror lag, failed health checks), and when the trouble
//!   sits in a few query shapes, which ones;
//! - `monitor`: the state machine (healthy, tripped, probing) that caps
//!   routing through `router::Limit`, audits every step and ramps back;
//! - `check`: the periodic health checks of both backends.
//!
//! The failures that count are the backend's fault, never the query's:
//! connection failures, timeouts, SQLSTATE classes 08, 53, 57P, 58 and XX,
//! and errors the target gave for something the source answered (a routed
//! read re-run on the source, a shadow read, a mirrored unit).

pub mod check;
pub mod monitor;
pub mod rules;
pub mod window;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::config::FailbackConfig;
use crate::protocol::startup::StartupMessage;

/// Which database a sample is about (`upstream::roles::Db`, re-exported:
/// samples are this module's main business).
pub use crate::upstream::roles::Db;

/// What the proxy asked of the backend (in the order of `ALL`: the
/// discriminant indexes per-kind counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleKind {
    /// A client's eligible read (served, or attempted on the target).
    Read,
    /// A mirrored unit applied on the target.
    Mirror,
    /// A shadow read compared against the other side.
    Shadow,
    /// A health check.
    Check,
}

impl SampleKind {
    pub const ALL: [SampleKind; 4] = [
        SampleKind::Read,
        SampleKind::Mirror,
        SampleKind::Shadow,
        SampleKind::Check,
    ];
    pub fn label(self) -> &'static str {
        match self {
            SampleKind::Read => "read",
            SampleKind::Mirror => "mirror",
            SampleKind::Shadow => "shadow",
            SampleKind::Check => "check",
        }
    }
}

/// A failure that is the backend's fault (in the order of `ALL`, as
/// above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// No connection, or it broke.
    Connection,
    /// No answer in time.
    Timeout,
    /// SQLSTATE 08, 53, 57P, 58 or XX.
    Server,
    /// The target could not take the session's settings or statements.
    Setup,
    /// The target failed a statement the source answered.
    Diverged,
    /// A health check failed.
    Check,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::Connection,
        Fault::Timeout,
        Fault::Server,
        Fault::Setup,
        Fault::Diverged,
        Fault::Check,
    ];
    pub fn label(self) -> &'static str {
        match self {
            Fault::Connection => "connection",
            Fault::Timeout => "timeout",
            Fault::Server => "server_error",
            Fault::Setup => "setup",
            Fault::Diverged => "diverged",
            Fault::Check => "check",
        }
    }
}

/// Whether an SQLSTATE says the server, not the query, failed.
pub fn is_server_fault(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code.starts_with("58")
        || code.starts_with("XX")
}

/// One request's outcome, as the hot path hands it over (16 bytes).
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// `shape_hash` of the statement, 0 when not known or not wanted.
    pub shape: u64,
    /// Microseconds from request to the end of its answer; 0: no latency
    /// (only reads served, and timeouts, have one).
    pub latency_us: u32,
    pub backend: Db,
    pub kind: SampleKind,
    pub fault: Option<Fault>,
}

impl Sample {
    pub fn new(backend: Db, kind: SampleKind, fault: Option<Fault>) -> Self {
        Self {
            shape: 0,
            latency_us: 0,
            backend,
            kind,
            fault,
        }
    }

    pub fn latency(mut self, d: Duration) -> Self {
        self.latency_us = d.as_micros().clamp(1, u32::MAX as u128) as u32;
        self
    }

    pub fn shape(mut self, shape: u64) -> Self {
        self.shape = shape;
        self
    }
}

/// A statement's shape: equal for statements that differ only in
/// literals, parameters, comments, case and white space. Never 0.
pub fn shape_hash(sql: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(sql);
    let h = match crate::classify::lexer::shape_key(&text) {
        Some(key) => crate::classify::analyze::fnv1a(key.as_bytes()),
        None => crate::classify::analyze::fnv1a(sql),
    };
    h.max(1)
}

/// Samples one shard holds between two monitor ticks; more are dropped
/// and counted (the monitor ticks every 100 ms, so this is 300k/s per
/// thread before anything is lost).
const SHARD_CAP: usize = 32 << 10;
/// Shapes whose text is kept for status and the audit log.
const MAX_SHAPE_NAMES: usize = 1_000;

/// The hot path's side: per-thread buffers the monitor drains.
pub struct Recorder {
    shards: Vec<Mutex<Vec<Sample>>>,
    pub dropped: AtomicU64,
}

impl Recorder {
    fn new() -> Self {
        Self {
            shards: (0..crate::clock::SHARDS)
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            dropped: AtomicU64::new(0),
        }
    }

    /// Records a sample: a push under a lock only the monitor's drain
    /// ever contends for.
    #[inline]
    pub fn record(&self, s: Sample) {
        let mut v = self.shards[crate::clock::shard()]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if v.len() >= SHARD_CAP {
            drop(v);
            self.dropped.fetch_add(1, Relaxed);
            return;
        }
        v.push(s);
    }

    /// Takes every buffered sample (swapping in `spare`'s allocation).
    pub fn drain(&self, spare: &mut Vec<Sample>, mut f: impl FnMut(&Sample)) {
        for shard in &self.shards {
            spare.clear();
            {
                let mut v = shard.lock().unwrap_or_else(|p| p.into_inner());
                if v.is_empty() {
                    continue;
                }
                std::mem::swap(&mut *v, spare);
            }
            spare.iter().for_each(&mut f);
        }
    }
}

/// The latest health check of one backend.
#[derive(Default)]
pub struct CheckStatus {
    /// Failed checks in a row (0 after a good one).
    pub failures: AtomicU32,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// The check could connect but not log in (no credentials): it checks
    /// connectivity only.
    pub connect_only: AtomicBool,
}

/// The monitor's metrics (counters are updated by the monitor thread from
/// the samples, never on the hot path).
pub struct HealthMetrics {
    pub requests: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub errors: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub trips: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// 0 healthy, 1 tripped, 2 probing.
    pub state: Gauge,
    /// The share of reads the target may get now, in hundredths of a percent.
    pub read_cap: Gauge,
    pub window_p95_us: Family<Vec<(&'static str, &'static str)>, Gauge>,
    /// Errors per million requests in the window.
    pub window_error_ppm: Family<Vec<(&'static str, &'static str)>, Gauge>,
    pub samples_dropped: Counter,
}

impl HealthMetrics {
    pub fn register(r: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            errors: Family::default(),
            trips: Family::default(),
            state: Gauge::default(),
            read_cap: Gauge::default(),
            window_p95_us: Family::default(),
            window_error_ppm: Family::default(),
            samples_dropped: Counter::default(),
        };
        r.register(
            "health_requests",
            "Requests the health monitor saw, by backend and kind (read, mirror, shadow, check)",
            m.requests.clone(),
        );
        r.register(
            "health_errors",
            "Failures that were the backend's fault, by backend and kind of failure",
            m.errors.clone(),
        );
        r.register(
            "failback_trips",
            "Automatic failbacks, by the rule that tripped",
            m.trips.clone(),
        );
        r.register(
            "failback_state",
            "Health monitor state: 0 healthy, 1 tripped (reads on the source), 2 probing",
            m.state.clone(),
        );
        r.register(
            "failback_read_cap_centipercent",
            "The share of reads the target may get now, in hundredths of a percent",
            m.read_cap.clone(),
        );
        r.register(
            "health_window_p95_microseconds",
            "p95 latency of the reads each backend served in the rolling window",
            m.window_p95_us.clone(),
        );
        r.register(
            "health_window_error_ppm",
            "Failures per million requests in the rolling window, per backend",
            m.window_error_ppm.clone(),
        );
        r.register(
            "health_samples_dropped",
            "Samples the monitor lost because a thread's buffer was full",
            m.samples_dropped.clone(),
        );
        m
    }
}

/// The health monitor's shared part: the recorder every thread writes to,
/// the settings in force, the state the monitor thread keeps.
pub struct Health {
    pub recorder: Recorder,
    settings: ArcSwap<FailbackConfig>,
    /// `settings.per_fingerprint`, read on the hot path.
    per_fingerprint: AtomicBool,
    pub checks: [CheckStatus; 2],
    /// The most recent client session's startup: whom checks log in as
    /// when `check_user` is unset.
    pub last_startup: Mutex<Option<StartupMessage>>,
    shape_names: Mutex<HashMap<u64, String>>,
    pub state: Mutex<monitor::Monitor>,
    pub metrics: Arc<HealthMetrics>,
}

impl Health {
    pub fn new(cfg: &FailbackConfig, metrics: Arc<HealthMetrics>) -> Self {
        Self {
            recorder: Recorder::new(),
            per_fingerprint: AtomicBool::new(cfg.per_fingerprint),
            settings: ArcSwap::from_pointee(cfg.clone()),
            checks: Default::default(),
            last_startup: Mutex::new(None),
            shape_names: Mutex::new(HashMap::new()),
            state: Mutex::new(monitor::Monitor::new(cfg)),
            metrics,
        }
    }

    pub fn settings(&self) -> Arc<FailbackConfig> {
        self.settings.load_full()
    }

    pub fn store(&self, cfg: FailbackConfig) {
        self.per_fingerprint.store(cfg.per_fingerprint, Relaxed);
        self.settings.store(Arc::new(cfg));
    }

    #[inline]
    pub fn record(&self, s: Sample) {
        self.recorder.record(s);
    }

    /// Whether reads carry their shape (per-fingerprint mode).
    #[inline]
    pub fn wants_shapes(&self) -> bool {
        self.per_fingerprint.load(Relaxed)
    }

    /// The shape of a statement the target ran, remembering its text the
    /// first time (for status and the audit log).
    pub fn shape_of(&self, sql: &[u8]) -> u64 {
        thread_local! {
            /// Shapes this thread has named already: the shared map's lock
            /// is taken once per shape and thread, not once per read.
            static NAMED: std::cell::RefCell<std::collections::HashSet<u64>> =
                std::cell::RefCell::default();
        }
        let h = shape_hash(sql);
        let new = NAMED.with(|n| {
            let mut n = n.borrow_mut();
            n.len() < MAX_SHAPE_NAMES && n.insert(h)
        });
        if new {
            let mut names = self.shape_names.lock().unwrap_or_else(|p| p.into_inner());
            if names.len() < MAX_SHAPE_NAMES {
                names.entry(h).or_insert_with(|| {
                    String::from_utf8_lossy(&sql[..sql.len().min(200)]).into_owned()
                });
            }
        }
        h
    }

    pub fn shape_name(&self, h: u64) -> Option<String> {
        self.shape_names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&h)
            .cloned()
    }

    pub fn saw_session(&self, startup: &StartupMessage) {
        let mut s = self.last_startup.lock().unwrap_or_else(|p| p.into_inner());
        if s.as_ref() != Some(startup) {
            *s = Some(startup.clone());
        }
    }

    /// `/status`: the state machine, the windows and the checks.
    pub fn status(&self) -> serde_json::Value {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut v = st.status(self);
        v["checks"] = serde_json::json!({
            "source": self.check_json(Db::Source),
            "target": self.check_json(Db::Target),
        });
        v["samples_dropped"] = self.recorder.dropped.load(Relaxed).into();
        v
    }

    fn check_json(&self, b: Db) -> serde_json::Value {
        let c = &self.checks[b as usize];
        serde_json::json!({
            "failures_in_a_row": c.failures.load(Relaxed),
            "ok": c.ok.load(Relaxed),
            "failed": c.failed.load(Relaxed),
            "last_error": *c.last_error.lock().unwrap_or_else(|p| p.into_inner()),
            "connect_only": c.connect_only.load(Relaxed),
        })
    }
}
