//! Per-session state the proxy keeps from the traffic it forwards, and the
//! two inspectors that keep it up to date.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use super::forward::{Inspector, Verdict};
use crate::protocol::message::{
    is_frontend_tag, parse_close, parse_parse, parse_query, parse_ready_for_query, CLOSE,
    FUNCTION_CALL, PARSE, QUERY, READY_FOR_QUERY, SYNC, TERMINATE,
};
use crate::protocol::FrameError;

/// State both directions of a session touch. Atomics, because the two pumps
/// run as separate futures; they are never contended in practice.
pub struct Shared {
    /// Transaction status from the last ReadyForQuery: b'I', b'T' or b'E'.
    pub tx_status: AtomicU8,
    /// Requests (Query, Sync, FunctionCall) the source has not yet answered
    /// with ReadyForQuery.
    pub in_flight: AtomicU32,
    /// Messages received from the client, for idle detection.
    pub client_messages: AtomicU64,
    /// Set on shutdown: end the session at its next idle ReadyForQuery.
    pub draining: AtomicBool,
    /// Whether the bytes written to the client so far end on a message
    /// boundary, so the proxy may append an ErrorResponse of its own.
    pub client_at_boundary: AtomicBool,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            tx_status: AtomicU8::new(b'I'),
            in_flight: AtomicU32::new(0),
            client_messages: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            client_at_boundary: AtomicBool::new(true),
        }
    }
}

impl Shared {
    /// Idle: no request outstanding and not inside a transaction block.
    pub fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.tx_status.load(Ordering::Acquire) == b'I'
    }
}

/// Statements the client prepared with Parse, by name, with their SQL text.
/// Kept for mirroring and routing, which must re-prepare them elsewhere.
/// Bounded: past `limit` named statements new ones are no longer tracked
/// (`overflowed` records that), which costs those later features, never
/// the client.
pub struct PreparedStatements {
    named: HashMap<Box<[u8]>, Arc<[u8]>>,
    unnamed: Option<Arc<[u8]>>,
    limit: usize,
    pub overflowed: bool,
}

impl PreparedStatements {
    pub fn new(limit: usize) -> Self {
        Self {
            named: HashMap::new(),
            unnamed: None,
            limit,
            overflowed: false,
        }
    }

    pub fn on_parse(&mut self, name: &[u8], query: &[u8]) {
        if name.is_empty() {
            self.unnamed = Some(query.into());
        } else if self.named.len() < self.limit || self.named.contains_key(name) {
            self.named.insert(name.into(), query.into());
        } else {
            self.overflowed = true;
        }
    }

    pub fn on_close(&mut self, name: &[u8]) {
        if name.is_empty() {
            self.unnamed = None;
        } else {
            self.named.remove(name);
        }
    }

    pub fn get(&self, name: &[u8]) -> Option<&Arc<[u8]>> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.named.get(name)
        }
    }

    pub fn len(&self) -> usize {
        self.named.len()
    }

    pub fn is_empty(&self) -> bool {
        self.named.is_empty()
    }
}

/// Client -> source: validates message types, counts requests, and tracks
/// prepared statements.
pub struct FrontendInspector<'a> {
    pub shared: &'a Shared,
    pub statements: &'a mut PreparedStatements,
    pub max_inspected: usize,
}

impl Inspector for FrontendInspector<'_> {
    #[inline]
    fn wants_body(&self, tag: u8) -> bool {
        matches!(tag, QUERY | PARSE | CLOSE | TERMINATE)
    }

    fn max_inspected(&self) -> usize {
        self.max_inspected
    }

    #[inline]
    fn header(&mut self, tag: u8) -> Result<(), FrameError> {
        if !is_frontend_tag(tag) {
            return Err(FrameError::UnknownType(tag));
        }
        self.shared.client_messages.fetch_add(1, Ordering::Relaxed);
        if tag == SYNC || tag == FUNCTION_CALL {
            self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    fn inspect(&mut self, tag: u8, body: &[u8]) -> Result<Verdict, FrameError> {
        self.shared.client_messages.fetch_add(1, Ordering::Relaxed);
        match tag {
            QUERY => {
                parse_query(body)?;
                self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
            }
            PARSE => {
                let (name, query) = parse_parse(body)?;
                self.statements.on_parse(name, query);
            }
            CLOSE => {
                if let (b'S', name) = parse_close(body)? {
                    self.statements.on_close(name);
                }
            }
            TERMINATE => return Ok(Verdict::ForwardAndStop),
            _ => {}
        }
        Ok(Verdict::Forward)
    }
}

/// Source -> client: follows ReadyForQuery for the transaction status and
/// the end of each request, and ends a draining session once it is idle.
pub struct BackendInspector<'a> {
    pub shared: &'a Shared,
}

impl Inspector for BackendInspector<'_> {
    #[inline]
    fn wants_body(&self, tag: u8) -> bool {
        tag == READY_FOR_QUERY
    }

    fn max_inspected(&self) -> usize {
        // Only ReadyForQuery is inspected, and it has a one-byte body.
        16
    }

    #[inline]
    fn header(&mut self, _tag: u8) -> Result<(), FrameError> {
        Ok(())
    }

    fn inspect(&mut self, _tag: u8, body: &[u8]) -> Result<Verdict, FrameError> {
        let status = parse_ready_for_query(body)?;
        self.shared.tx_status.store(status, Ordering::Release);
        let left = self
            .shared
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            })
            .map_or(0, |prev| prev.saturating_sub(1));
        if left == 0 && status == b'I' && self.shared.draining.load(Ordering::Acquire) {
            return Ok(Verdict::ForwardAndStop);
        }
        Ok(Verdict::Forward)
    }

    fn writing(&mut self, done: bool, at_boundary: bool) {
        self.shared
            .client_at_boundary
            .store(done && at_boundary, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_track_parse_and_close_with_a_bound() {
        let mut s = PreparedStatements::new(2);
        s.on_parse(b"a", b"select 1");
        s.on_parse(b"b", b"select 2");
        s.on_parse(b"c", b"select 3");
        assert!(s.overflowed);
        assert_eq!(s.len(), 2);
        s.on_parse(b"a", b"select 10"); // redefining a tracked name is fine
        assert_eq!(s.get(b"a").map(|q| &q[..]), Some(&b"select 10"[..]));
        s.on_parse(b"", b"select 4");
        assert_eq!(s.get(b"").map(|q| &q[..]), Some(&b"select 4"[..]));
        s.on_close(b"a");
        assert!(s.get(b"a").is_none());
    }

    #[test]
    fn frontend_inspector_counts_requests_and_rejects_unknown_types() {
        let shared = Shared::default();
        let mut st = PreparedStatements::new(10);
        let mut i = FrontendInspector {
            shared: &shared,
            statements: &mut st,
            max_inspected: 1024,
        };
        i.inspect(QUERY, b"select 1\0").unwrap();
        i.header(SYNC).unwrap();
        assert_eq!(shared.in_flight.load(Ordering::Relaxed), 2);
        assert!(matches!(i.header(b'z'), Err(FrameError::UnknownType(b'z'))));
        assert!(i.inspect(QUERY, b"no terminator").is_err());
        assert_eq!(i.inspect(TERMINATE, b"").unwrap(), Verdict::ForwardAndStop);
    }

    #[test]
    fn backend_inspector_tracks_status_and_stops_when_draining_and_idle() {
        let shared = Shared::default();
        shared.in_flight.store(2, Ordering::Relaxed);
        let mut b = BackendInspector { shared: &shared };
        shared.draining.store(true, Ordering::Relaxed);
        assert_eq!(b.inspect(READY_FOR_QUERY, b"T").unwrap(), Verdict::Forward);
        assert!(!shared.is_idle());
        assert_eq!(
            b.inspect(READY_FOR_QUERY, b"I").unwrap(),
            Verdict::ForwardAndStop
        );
        assert!(shared.is_idle());
        assert!(b.inspect(READY_FOR_QUERY, b"Q").is_err());
    }
}
