//! The write mirror's counters and gauges, exported by the admin API's
//! `/metrics` (registered there) and updated by the capture, the spool and
//! the applier.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type DynLabels = Vec<(&'static str, String)>;

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
    pub fn register(r: &mut Registry) -> Self {
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
