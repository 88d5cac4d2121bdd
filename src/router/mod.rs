//! Read routing: which reads the target serves.
//!
//! - `policy`: the stable hashed percentage and the routing keys.
//! - `decide`: per session, on the hot path: which requests are eligible
//!   reads, and where each goes.
//! - `responder`: per session, beside the pumps: runs routed requests on
//!   the session's target connection, relays the answers to the client,
//!   and falls back to the source when the target fails.
//!
//! The settings live in one `ArcSwap`: a change (file, signal, admin API)
//! applies to the next request of every session, with no lock on the hot
//! path.

pub mod batch;
pub mod decide;
pub mod link;
pub mod policy;
pub mod responder;
pub mod txn;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use hdrhistogram::Histogram;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::config::{HashKey, RoutingConfig};

/// The routing settings in force.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingSettings {
    pub read_percent: f64,
    /// `policy::threshold(read_percent)`, computed once per change.
    pub threshold: u64,
    pub hash_key: HashKey,
    pub comment_key: String,
    pub target_timeout: Duration,
    /// Set by a failback (`POST /failback`): every read goes to the source
    /// until a resume, whatever `read_percent` says.
    pub failed_back: Option<String>,
    /// Set by the health monitor (`crate::health`): a cap on the share of
    /// reads the target gets, for every read or for some query shapes,
    /// until it recovers. `read_percent` stays as configured.
    pub limit: Option<Arc<Limit>>,
}

/// The health monitor's cap on routing.
#[derive(Debug, Clone, PartialEq)]
pub struct Limit {
    /// The most reads the target may get (0 after a trip, the probe share
    /// while ramping back).
    pub percent: f64,
    /// `policy::threshold(percent)`.
    pub threshold: u64,
    /// `None`: the cap applies to every read; else only to reads whose
    /// shape hash (`crate::health::shape_hash`) is listed.
    pub shapes: Option<std::collections::HashSet<u64>>,
    /// "tripped" or "probing", and the rule, for status.
    pub why: String,
}

impl RoutingSettings {
    pub fn from_config(c: &RoutingConfig) -> Self {
        Self {
            read_percent: c.read_percent,
            threshold: policy::threshold(c.read_percent),
            hash_key: c.hash_key,
            comment_key: c.comment_key.clone(),
            target_timeout: Duration::from_millis(c.target_timeout_ms),
            failed_back: None,
            limit: None,
        }
    }

    /// Whether any read may go to the target now.
    pub fn active(&self) -> bool {
        self.threshold > 0
            && self.failed_back.is_none()
            && !self
                .limit
                .as_ref()
                .is_some_and(|l| l.shapes.is_none() && l.threshold == 0)
    }

    /// Buckets below this go to the target, for a read of this shape
    /// (computed only when the cap names shapes).
    pub fn threshold_for(&self, shape: impl FnOnce() -> u64) -> u64 {
        match &self.limit {
            None => self.threshold,
            Some(l) => match &l.shapes {
                None => self.threshold.min(l.threshold),
                Some(set) if set.contains(&shape()) => self.threshold.min(l.threshold),
                Some(_) => self.threshold,
            },
        }
    }

    /// The share of reads the target may get now (the configured one,
    /// capped by a failback), for status and metrics.
    pub fn effective_percent(&self) -> f64 {
        if self.failed_back.is_some() {
            return 0.0;
        }
        match &self.limit {
            Some(l) if l.shapes.is_none() => self.read_percent.min(l.percent),
            _ => self.read_percent,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "read_percent": self.read_percent,
            "hash_key": self.hash_key,
            "comment_key": self.comment_key,
            "target_timeout_ms": self.target_timeout.as_millis() as u64,
            "failed_back": self.failed_back.is_some(),
            "failback_reason": self.failed_back,
            "effective_percent": self.effective_percent(),
            "health_limit": self.limit.as_ref().map(|l| serde_json::json!({
                "percent": l.percent,
                "shapes": l.shapes.as_ref().map(|s| {
                    let mut v: Vec<String> = s.iter().map(|h| format!("{h:016x}")).collect();
                    v.sort();
                    v
                }),
                "why": l.why,
            })),
        })
    }
}

/// Why a routed read ran on the source after all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// No connection, or it broke before an answer.
    Connection,
    /// No complete answer within `target_timeout_ms`.
    Timeout,
    /// The target answered with an error that is not the query's fault
    /// (SQLSTATE classes 08, 53, 57P, 58, XX, or 25006: the read wrote).
    ServerError,
    /// The proxy could not bring the target session up to date (session
    /// settings, a prepared statement).
    Setup,
    /// The target failed the read with an error of the query's kind (a
    /// missing table, a permission): the source decides, and if it answers,
    /// the target was at fault (the health monitor counts it).
    QueryError,
    /// The answer names a type by an OID only this cluster gives it (a
    /// user type, an extension's type, a binary record whose members name
    /// theirs): OIDs differ between the clusters, and the client would
    /// cache the target's.
    Types,
}

impl Fallback {
    pub fn label(self) -> &'static str {
        match self {
            Fallback::Connection => "connection",
            Fallback::Timeout => "timeout",
            Fallback::ServerError => "server_error",
            Fallback::Setup => "setup",
            Fallback::QueryError => "query_error",
            Fallback::Types => "types",
        }
    }
}

/// Whether an error the target returned for a routed read is the target's
/// fault rather than the query's: the same read then runs on the source.
/// 25006 (read-only transaction) is the guard that catches a "read" that
/// writes: target sessions run with `default_transaction_read_only`.
pub fn is_fallback_code(code: &str) -> bool {
    crate::health::is_server_fault(code) || code == "25006"
}

/// Waits until `ready()` holds, checking again at each wake-up of
/// `notify` (registered before each check, so no wake-up is missed).
pub async fn wait_until(notify: &tokio::sync::Notify, ready: impl Fn() -> bool) {
    loop {
        let woken = notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if ready() {
            return;
        }
        woken.await;
    }
}

type Labels = Vec<(&'static str, &'static str)>;

use crate::clock::{shard, SHARDS};

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 hour, 3 significant digits: fixed size, never grows.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| {
        Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits is valid"))
    })
}

/// Per-route counters and latencies.
pub struct RouteMetrics {
    /// Eligible reads, by backend that served them.
    pub reads: Family<Labels, Counter>,
    reads_source: Counter,
    reads_target: Counter,
    pub fallbacks: Family<Labels, Counter>,
    /// A routed read whose target connection broke after part of the
    /// answer had reached the client: the client got an error.
    pub target_failures_after_start: Counter,
    /// Sessions whose reads stay on the source for good (state the target
    /// session could not reproduce).
    pub sessions_pinned: Counter,
    /// Read-only transactions routed to the target that moved to the source
    /// before they read (see `txn`).
    pub transactions_moved: Counter,
    /// Microseconds from request to ReadyForQuery, per backend, sharded.
    latency_source: Vec<Mutex<Histogram<u64>>>,
    latency_target: Vec<Mutex<Histogram<u64>>>,
}

impl RouteMetrics {
    pub fn new() -> Self {
        let shards = || (0..SHARDS).map(|_| Mutex::new(histogram())).collect();
        let reads = Family::<Labels, Counter>::default();
        let reads_source = reads.get_or_create(&vec![("backend", "source")]).clone();
        let reads_target = reads.get_or_create(&vec![("backend", "target")]).clone();
        Self {
            reads,
            reads_source,
            reads_target,
            fallbacks: Family::default(),
            target_failures_after_start: Counter::default(),
            sessions_pinned: Counter::default(),
            transactions_moved: Counter::default(),
            latency_source: shards(),
            latency_target: shards(),
        }
    }

    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "route_reads",
            "Eligible reads, by the backend that served them",
            self.reads.clone(),
        );
        r.register(
            "route_fallbacks",
            "Routed reads re-run on the source because the target failed, by reason",
            self.fallbacks.clone(),
        );
        r.register(
            "route_target_failures_after_start",
            "Routed reads whose target failed after part of the answer reached the client",
            self.target_failures_after_start.clone(),
        );
        r.register(
            "route_sessions_pinned",
            "Sessions whose reads stay on the source for good",
            self.sessions_pinned.clone(),
        );
        r.register(
            "route_transactions_moved",
            "Read-only transactions routed to the target that moved to the source before they read",
            self.transactions_moved.clone(),
        );
    }

    pub fn read(&self, target: bool) {
        if target {
            self.reads_target.inc();
        } else {
            self.reads_source.inc();
        }
    }

    pub fn fallback(&self, why: Fallback) {
        self.fallbacks
            .get_or_create(&vec![("reason", why.label())])
            .inc();
    }

    pub fn latency(&self, target: bool, d: Duration) {
        let h = if target {
            &self.latency_target
        } else {
            &self.latency_source
        };
        let us = (d.as_micros() as u64).clamp(1, 3_600_000_000);
        h[shard()]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .saturating_record(us);
    }

    fn quantiles(&self, target: bool) -> (u64, [(f64, u64); 4], f64) {
        let shards = if target {
            &self.latency_target
        } else {
            &self.latency_source
        };
        let mut h = histogram();
        for s in shards {
            let _ = h.add(&*s.lock().unwrap_or_else(|p| p.into_inner()));
        }
        let q = [0.5, 0.9, 0.99, 0.999].map(|q| (q, h.value_at_quantile(q)));
        (h.len(), q, h.mean() * h.len() as f64)
    }

    /// The latency summaries in OpenMetrics text (prometheus-client has no
    /// summary type; these come from the hdr histograms).
    pub fn render_latency(&self, out: &mut String) {
        use std::fmt::Write;
        let name = "pgshift_route_latency_seconds";
        let _ = writeln!(out, "# TYPE {name} summary");
        let _ = writeln!(
            out,
            "# HELP {name} Eligible reads: time from request to ReadyForQuery, per backend"
        );
        for target in [false, true] {
            let backend = if target { "target" } else { "source" };
            let (count, qs, sum_us) = self.quantiles(target);
            for (q, us) in qs {
                let _ = writeln!(
                    out,
                    "{name}{{backend=\"{backend}\",quantile=\"{q}\"}} {}",
                    us as f64 / 1e6
                );
            }
            let _ = writeln!(out, "{name}_sum{{backend=\"{backend}\"}} {}", sum_us / 1e6);
            let _ = writeln!(out, "{name}_count{{backend=\"{backend}\"}} {count}");
        }
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let one = |target: bool| {
            let (count, qs, _) = self.quantiles(target);
            let reads = if target {
                &self.reads_target
            } else {
                &self.reads_source
            };
            serde_json::json!({
                "reads": reads.get(),
                "latency_samples": count,
                "p50_us": qs[0].1, "p90_us": qs[1].1, "p99_us": qs[2].1, "p999_us": qs[3].1,
            })
        };
        let fb = |k| self.fallbacks.get_or_create(&vec![("reason", k)]).get();
        serde_json::json!({
            "source": one(false),
            "target": one(true),
            "fallbacks": {
                "connection": fb("connection"), "timeout": fb("timeout"),
                "server_error": fb("server_error"), "setup": fb("setup"),
                "query_error": fb("query_error"), "types": fb("types"),
            },
            "target_failures_after_start": self.target_failures_after_start.get(),
            "sessions_pinned": self.sessions_pinned.get(),
            "transactions_moved": self.transactions_moved.get(),
        })
    }
}

impl Default for RouteMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The proxy's router: settings in force, shared by every session.
pub struct Router {
    settings: ArcSwap<RoutingSettings>,
    /// Whether the proxy has target links at all (without them nothing is
    /// routed, whatever the settings).
    pub has_target: AtomicBool,
    /// Whether a share of reads is configured for the target (whatever
    /// failback made of it): only then do sessions classify and time their
    /// reads. Kept beside the settings so the hot path reads one flag.
    engaged: AtomicBool,
}

impl Router {
    pub fn new(cfg: &RoutingConfig, has_target: bool) -> Self {
        let settings = RoutingSettings::from_config(cfg);
        Self {
            engaged: AtomicBool::new(settings.threshold > 0),
            settings: ArcSwap::from_pointee(settings),
            has_target: AtomicBool::new(has_target),
        }
    }

    /// Whether reads are to be classified at all: `read_percent` above 0,
    /// even while failback holds them on the source (the source's own
    /// latency is then the baseline recovery is judged against).
    pub fn engaged(&self) -> bool {
        self.engaged.load(Ordering::Relaxed)
    }

    /// The settings in force (one atomic load).
    pub fn settings(&self) -> arc_swap::Guard<Arc<RoutingSettings>> {
        self.settings.load()
    }

    pub fn current(&self) -> Arc<RoutingSettings> {
        self.settings.load_full()
    }

    pub fn store(&self, s: RoutingSettings) {
        self.engaged.store(s.threshold > 0, Ordering::Relaxed);
        self.settings.store(Arc::new(s));
    }

    pub fn status(&self) -> serde_json::Value {
        let mut v = self.settings().to_json();
        v["has_target"] = self.has_target.load(Ordering::Relaxed).into();
        v
    }
}
