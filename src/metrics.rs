//! Process-wide counters, exported in Prometheus text format by the admin API.
//!
//! Handles are created once and kept as fields, so the hot path only ever
//! does an atomic add; label families are resolved at start-up.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

pub struct Metrics {
    registry: Registry,
    pub client_connections: Counter,
    pub client_sessions_active: Gauge,
    pub client_rejected_too_many: Counter,
    pub client_rejected_startup: Counter,
    pub client_gone_in_startup: Counter,
    pub client_tls: Counter,
    pub protocol_errors: Counter,
    pub source_connect_failures: Counter,
    pub target_logins_ok: Counter,
    pub target_logins_failed: Counter,
    pub target_links_up: Gauge,
    pub target_links_lost: Counter,
    pub cancel_forwarded: Counter,
    pub cancel_unknown_key: Counter,
    pub config_reloads: Counter,
    pub config_rejections: Counter,
    pub config_epoch: Gauge,
    pub mirror: MirrorMetrics,
    pub route: crate::router::RouteMetrics,
    pub shadow: crate::shadow::ShadowMetrics,
    pub health: std::sync::Arc<crate::health::HealthMetrics>,
    pub record: std::sync::Arc<RecordMetrics>,
    started: std::time::Instant,
}

type DynLabels = Vec<(&'static str, String)>;

/// The session recorder's metrics (see `record`).
#[derive(Default)]
pub struct RecordMetrics {
    pub active: Gauge,
    pub messages: Counter,
    pub bytes: Counter,
    pub dropped_runs: Counter,
}

impl RecordMetrics {
    fn register(r: &mut Registry) -> Self {
        let m = Self::default();
        r.register(
            "record_active",
            "1 while client sessions are being recorded",
            m.active.clone(),
        );
        r.register(
            "record_messages",
            "Client messages written to the capture",
            m.messages.clone(),
        );
        r.register(
            "record_bytes",
            "Bytes written to the capture",
            m.bytes.clone(),
        );
        r.register(
            "record_dropped_runs",
            "Runs of client bytes not recorded because the recording buffer was full (each ends one session's recording)",
            m.dropped_runs.clone(),
        );
        m
    }
}

/// The write mirror's metrics (see `mirror`).
pub struct MirrorMetrics {
    pub spooled: Counter,
    pub applied: Counter,
    pub lag_transactions: Gauge,
    /// Milliseconds (Prometheus gauges here are integers); exported as
    /// `pgshift_mirror_lag_milliseconds`.
    pub lag_ms: Gauge,
    pub spool_bytes: Gauge,
    pub divergences: Family<DynLabels, Counter>,
    pub target_errors: Family<DynLabels, Counter>,
    pub nondeterministic: Gauge,
    pub gaps: Counter,
    pub lost_transactions: Counter,
    pub in_doubt: Counter,
    pub already_applied: Counter,
    pub unordered: Counter,
    pub order_waits: Counter,
    pub order_probe_failures: Counter,
    pub backpressure_waits: Counter,
    pub enabled: Gauge,
    pub target_connections: Gauge,
}

impl MirrorMetrics {
    fn register(r: &mut Registry) -> Self {
        let m = Self {
            spooled: Counter::default(),
            applied: Counter::default(),
            lag_transactions: Gauge::default(),
            lag_ms: Gauge::default(),
            spool_bytes: Gauge::default(),
            divergences: Family::default(),
            target_errors: Family::default(),
            nondeterministic: Gauge::default(),
            gaps: Counter::default(),
            lost_transactions: Counter::default(),
            in_doubt: Counter::default(),
            already_applied: Counter::default(),
            unordered: Counter::default(),
            order_waits: Counter::default(),
            order_probe_failures: Counter::default(),
            backpressure_waits: Counter::default(),
            enabled: Gauge::default(),
            target_connections: Gauge::default(),
        };
        r.register(
            "mirror_spooled_transactions",
            "Committed write units appended to the mirror spool",
            m.spooled.clone(),
        );
        r.register(
            "mirror_applied_transactions",
            "Spooled units applied to the target",
            m.applied.clone(),
        );
        r.register(
            "mirror_lag_transactions",
            "Spooled units not yet applied to the target",
            m.lag_transactions.clone(),
        );
        r.register(
            "mirror_lag_milliseconds",
            "Age of the oldest unapplied unit's source commit",
            m.lag_ms.clone(),
        );
        r.register(
            "mirror_spool_bytes",
            "Bytes of spool on disk",
            m.spool_bytes.clone(),
        );
        r.register(
            "mirror_divergences",
            "Mirrored statements whose target outcome differed from the source's, by statement fingerprint",
            m.divergences.clone(),
        );
        r.register(
            "mirror_target_errors",
            "Errors the target returned while applying, by SQLSTATE class",
            m.target_errors.clone(),
        );
        r.register(
            "mirror_nondeterministic_statements",
            "Distinct mirrored write fingerprints flagged as non-deterministic",
            m.nondeterministic.clone(),
        );
        r.register(
            "mirror_gaps",
            "Times the mirror lost continuity (spool full or failing, oversized unit, disabled): the target needs a re-sync",
            m.gaps.clone(),
        );
        r.register(
            "mirror_lost_transactions",
            "Committed write units that did not reach the spool (counted within gaps)",
            m.lost_transactions.clone(),
        );
        r.register(
            "mirror_in_doubt_transactions",
            "Write units whose source commit is unknown because the proxy or the session died with the commit in flight; listed in gaps.jsonl",
            m.in_doubt.clone(),
        );
        r.register(
            "mirror_skipped_already_applied",
            "Spooled units found already applied on the target (re-read after a restart or a lost connection) and not applied again",
            m.already_applied.clone(),
        );
        r.register(
            "mirror_units_without_order_key",
            "Spooled units whose shape carries no order probe (DDL or COPY outside a block, multi-statement strings, pipelined requests); applied where they were spooled",
            m.unordered.clone(),
        );
        r.register(
            "mirror_order_waits",
            "Times the applier waited for a commit in flight on another session before applying a unit",
            m.order_waits.clone(),
        );
        r.register(
            "mirror_order_probe_failures",
            "Order probes the source answered with an error (the unit is applied where it was spooled)",
            m.order_probe_failures.clone(),
        );
        r.register(
            "mirror_backpressure_waits",
            "Commit acknowledgements held back because the spool was full (on_full = backpressure)",
            m.backpressure_waits.clone(),
        );
        r.register(
            "mirror_enabled",
            "1 while write mirroring is on",
            m.enabled.clone(),
        );
        r.register(
            "mirror_target_connections",
            "Connections the mirror holds open to the target",
            m.target_connections.clone(),
        );
        m
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pgshift");
        let client_connections = Counter::default();
        registry.register(
            "client_connections",
            "Client connections accepted",
            client_connections.clone(),
        );
        let client_sessions_active = Gauge::default();
        registry.register(
            "client_sessions_active",
            "Client sessions past startup and still open",
            client_sessions_active.clone(),
        );
        let rejected = Family::<Labels, Counter>::default();
        registry.register(
            "client_rejected",
            "Client connections refused, by reason",
            rejected.clone(),
        );
        let client_rejected_too_many = rejected
            .get_or_create(&vec![("reason", "too_many_clients")])
            .clone();
        let client_rejected_startup = rejected
            .get_or_create(&vec![("reason", "startup_failed")])
            .clone();
        let client_gone_in_startup = Counter::default();
        registry.register(
            "client_gone_in_startup",
            "Clients that closed the connection before their session was established (e.g. TCP health checks)",
            client_gone_in_startup.clone(),
        );
        let client_tls = Counter::default();
        registry.register(
            "client_tls_sessions",
            "Client connections that negotiated TLS",
            client_tls.clone(),
        );
        let protocol_errors = Counter::default();
        registry.register(
            "client_protocol_errors",
            "Client connections closed for malformed or oversized messages or a startup timeout",
            protocol_errors.clone(),
        );
        let source_connect_failures = Counter::default();
        registry.register(
            "source_connect_failures",
            "Failed attempts to connect to the source",
            source_connect_failures.clone(),
        );
        let logins = Family::<Labels, Counter>::default();
        registry.register(
            "target_logins",
            "Proxy logins to the target, by result",
            logins.clone(),
        );
        let target_logins_ok = logins.get_or_create(&vec![("result", "ok")]).clone();
        let target_logins_failed = logins.get_or_create(&vec![("result", "failed")]).clone();
        let target_links_up = Gauge::default();
        registry.register(
            "target_links_up",
            "Per-session target connections currently up",
            target_links_up.clone(),
        );
        let target_links_lost = Counter::default();
        registry.register(
            "target_links_lost",
            "Target connections lost after login",
            target_links_lost.clone(),
        );
        let cancels = Family::<Labels, Counter>::default();
        registry.register(
            "cancel_requests",
            "CancelRequests received, by outcome",
            cancels.clone(),
        );
        let cancel_forwarded = cancels
            .get_or_create(&vec![("result", "forwarded")])
            .clone();
        let cancel_unknown_key = cancels
            .get_or_create(&vec![("result", "unknown_key")])
            .clone();
        let reloads = Family::<Labels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads, by outcome (applied, or rejected with the running config kept)",
            reloads.clone(),
        );
        let config_reloads = reloads.get_or_create(&vec![("result", "applied")]).clone();
        let config_rejections = reloads.get_or_create(&vec![("result", "rejected")]).clone();
        let config_epoch = Gauge::default();
        registry.register(
            "config_epoch",
            "Epoch of the running config (1 at start, one more per applied change)",
            config_epoch.clone(),
        );
        let mirror = MirrorMetrics::register(&mut registry);
        let route = crate::router::RouteMetrics::new();
        route.register(&mut registry);
        let shadow = crate::shadow::ShadowMetrics::register(&mut registry);
        let health = std::sync::Arc::new(crate::health::HealthMetrics::register(&mut registry));
        let record = std::sync::Arc::new(RecordMetrics::register(&mut registry));
        Self {
            shadow,
            health,
            record,
            registry,
            mirror,
            route,
            client_connections,
            client_sessions_active,
            client_rejected_too_many,
            client_rejected_startup,
            client_gone_in_startup,
            client_tls,
            protocol_errors,
            source_connect_failures,
            target_logins_ok,
            target_logins_failed,
            target_links_up,
            target_links_lost,
            cancel_forwarded,
            cancel_unknown_key,
            config_reloads,
            config_rejections,
            config_epoch,
            started: std::time::Instant::now(),
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        // The latency summaries go before the closing `# EOF`.
        let eof = out.rfind("# EOF").unwrap_or(out.len());
        let tail = out.split_off(eof);
        self.route.render_latency(&mut out);
        out.push_str(&tail);
        out
    }

    /// A JSON snapshot for `GET /status`.
    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "uptime_s": self.started.elapsed().as_secs(),
            "clients": {
                "connections_total": self.client_connections.get(),
                "sessions_active": self.client_sessions_active.get(),
                "rejected_too_many": self.client_rejected_too_many.get(),
                "rejected_startup": self.client_rejected_startup.get(),
                "gone_in_startup": self.client_gone_in_startup.get(),
                "tls_sessions": self.client_tls.get(),
                "protocol_errors": self.protocol_errors.get(),
            },
            "source": { "connect_failures": self.source_connect_failures.get() },
            "target": {
                "links_up": self.target_links_up.get(),
                "logins_ok": self.target_logins_ok.get(),
                "logins_failed": self.target_logins_failed.get(),
                "links_lost": self.target_links_lost.get(),
            },
            "cancel": {
                "forwarded": self.cancel_forwarded.get(),
                "unknown_key": self.cancel_unknown_key.get(),
            },
            "routing": self.route.snapshot(),
            "shadow": self.shadow.snapshot(),
        })
    }
}
