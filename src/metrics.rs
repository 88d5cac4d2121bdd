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
    /// Per-session target connections (see `upstream::target`).
    pub target_links: std::sync::Arc<crate::upstream::target::LinkMetrics>,
    pub cancel: crate::cancel::CancelMetrics,
    pub config_reloads: Counter,
    pub config_rejections: Counter,
    /// Reloads that read a valid file which changed nothing live (its
    /// keys equal what runs, or only restart-only sections changed).
    pub config_reloads_unchanged: Counter,
    pub config_epoch: Gauge,
    pub mirror: std::sync::Arc<crate::mirror::MirrorMetrics>,
    pub route: crate::router::RouteMetrics,
    pub shadow: crate::shadow::ShadowMetrics,
    pub health: std::sync::Arc<crate::health::HealthMetrics>,
    pub record: std::sync::Arc<crate::record::metrics::RecordMetrics>,
    started: std::time::Instant,
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
        let target_links = std::sync::Arc::new(crate::upstream::target::LinkMetrics::register(
            &mut registry,
        ));
        let cancel = crate::cancel::CancelMetrics::register(&mut registry);
        let reloads = Family::<Labels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads, by outcome (applied; unchanged: a valid file that changed nothing live; or rejected with the running config kept)",
            reloads.clone(),
        );
        let config_reloads = reloads.get_or_create(&vec![("result", "applied")]).clone();
        let config_rejections = reloads.get_or_create(&vec![("result", "rejected")]).clone();
        let config_reloads_unchanged = reloads
            .get_or_create(&vec![("result", "unchanged")])
            .clone();
        let config_epoch = Gauge::default();
        registry.register(
            "config_epoch",
            "Epoch of the running config (1 at start, one more per applied change)",
            config_epoch.clone(),
        );
        let mirror = std::sync::Arc::new(crate::mirror::MirrorMetrics::register(&mut registry));
        let route = crate::router::RouteMetrics::new();
        route.register(&mut registry);
        let shadow = crate::shadow::ShadowMetrics::register(&mut registry);
        let health = std::sync::Arc::new(crate::health::HealthMetrics::register(&mut registry));
        let record = std::sync::Arc::new(crate::record::metrics::RecordMetrics::register(
            &mut registry,
        ));
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
            target_links,
            cancel,
            config_reloads,
            config_rejections,
            config_reloads_unchanged,
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
                "links_up": self.target_links.links_up.get(),
                "logins_ok": self.target_links.logins_ok.get(),
                "logins_failed": self.target_links.logins_failed.get(),
                "links_lost": self.target_links.links_lost.get(),
            },
            "cancel": {
                "forwarded": self.cancel.forwarded.get(),
                "unknown_key": self.cancel.unknown_key.get(),
            },
            "routing": self.route.snapshot(),
            "shadow": self.shadow.snapshot(),
        })
    }
}
