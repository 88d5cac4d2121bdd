//! The session recorder's counters, exported by the admin API's `/metrics`
//! (registered there).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The session recorder's metrics (see `record`).
#[derive(Default)]
pub struct RecordMetrics {
    pub active: Gauge,
    pub messages: Counter,
    pub bytes: Counter,
    pub dropped_runs: Counter,
}

impl RecordMetrics {
    pub fn register(r: &mut Registry) -> Self {
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
