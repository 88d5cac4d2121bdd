//! What the proxy knows of one client session, kept once and read by the
//! session core and every policy: the transaction status and requests in
//! flight (`Shared`), the statements the client prepared
//! (`PreparedStatements`), and the session settings the source got that
//! another connection must repeat (`StateLog`).
//!
//! Plain data with no I/O: it imports nothing from the crate, so the
//! policies that read it (mirror, router, shadow) and the session that
//! writes it need not know each other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;

/// Most session-state entries kept for the target; past it the session's
/// reads stay on the source.
pub const MAX_STATE_OPS: usize = 1_000;
const MAX_STATE_BYTES: usize = 256 << 10;

/// State both directions of a session touch.
///
/// Both pumps and the loop that watches them are futures inside one task,
/// so they never run at the same time: plain Relaxed loads and stores are
/// enough (atomics only because the task must be `Send`), and the
/// read-modify-writes below need no locked instructions.
pub struct Shared {
    /// Transaction status from the last ReadyForQuery: b'I', b'T' or b'E'.
    pub tx_status: AtomicU8,
    /// Requests (Query, Sync, FunctionCall) the source has not yet answered
    /// with ReadyForQuery.
    pub in_flight: AtomicU32,
    /// Messages received from the client, for idle detection.
    pub client_messages: AtomicU64,
    /// The client sent extended-protocol messages not yet closed by a Sync:
    /// Postgres does not consider such a session idle.
    pub mid_batch: AtomicBool,
    /// Set on shutdown: end the session at its next idle ReadyForQuery.
    pub draining: AtomicBool,
    /// Whether the bytes written to the client (and to the source) so far
    /// end on a message boundary, so the proxy may append a message of its
    /// own (an ErrorResponse to the client, a Terminate to the source).
    pub client_at_boundary: AtomicBool,
    pub server_at_boundary: AtomicBool,
    /// An order probe rides on the request in flight: the backend side
    /// must look for its answers (see `mirror::order`).
    pub probe_active: AtomicBool,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            tx_status: AtomicU8::new(b'I'),
            in_flight: AtomicU32::new(0),
            client_messages: AtomicU64::new(0),
            mid_batch: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            client_at_boundary: AtomicBool::new(true),
            server_at_boundary: AtomicBool::new(true),
            probe_active: AtomicBool::new(false),
        }
    }
}

impl Shared {
    /// Idle as Postgres means it: waiting for a new command outside a
    /// transaction block, with nothing outstanding.
    pub fn is_idle(&self) -> bool {
        self.in_flight.load(Relaxed) == 0
            && self.tx_status.load(Relaxed) == b'I'
            && !self.mid_batch.load(Relaxed)
    }

    pub fn add_in_flight(&self, n: u32) {
        self.in_flight
            .store(self.in_flight.load(Relaxed).saturating_add(n), Relaxed);
    }

    pub fn sub_in_flight(&self, n: u32) -> u32 {
        let left = self.in_flight.load(Relaxed).saturating_sub(n);
        self.in_flight.store(left, Relaxed);
        left
    }
}

/// Statements the client prepared with Parse, by name, with their SQL text.
/// Kept for mirroring and routing, which must re-prepare them elsewhere.
///
/// Bounded by count and by bytes of text: past either limit new statements
/// are no longer tracked (`overflowed` records that), which costs those
/// later features, never the client. Statements are recorded as sent; one
/// the source rejects stays recorded until closed or replaced (confirming
/// them from ParseComplete comes with mirroring).
pub struct PreparedStatements {
    named: HashMap<Box<[u8]>, Statement>,
    unnamed: Option<Statement>,
    max_count: usize,
    max_bytes: usize,
    bytes: usize,
    pub overflowed: bool,
}

/// A prepared statement's text and parameter types (the Parse message's
/// count and OIDs, as sent), enough to prepare it again elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub query: Arc<[u8]>,
    pub types: Arc<[u8]>,
}

impl Statement {
    fn size(&self) -> usize {
        self.query.len() + self.types.len()
    }
}

impl PreparedStatements {
    pub fn new(max_count: usize, max_bytes: usize) -> Self {
        Self {
            named: HashMap::new(),
            unnamed: None,
            max_count,
            max_bytes,
            bytes: 0,
            overflowed: false,
        }
    }

    pub fn on_parse(&mut self, name: &[u8], query: &[u8]) {
        self.on_parse_typed(name, query, &[0, 0]);
    }

    /// Records a Parse: `types` is its parameter count and type OIDs.
    pub fn on_parse_typed(&mut self, name: &[u8], query: &[u8], types: &[u8]) {
        if name.is_empty() {
            // Drivers re-send the same unnamed statement for every execution:
            // keep the copy we have instead of making a new one.
            if let Some(u) = &self.unnamed {
                if &*u.query == query && &*u.types == types {
                    return;
                }
            }
            let old = self.unnamed.take().map_or(0, |q| q.size());
            self.bytes -= old;
            if self.bytes + query.len() + types.len() <= self.max_bytes {
                self.bytes += query.len() + types.len();
                self.unnamed = Some(Statement {
                    query: query.into(),
                    types: types.into(),
                });
            } else {
                self.overflowed = true;
            }
            return;
        }
        let old = self.named.get(name).map(|q| q.size());
        let fits_count = old.is_some() || self.named.len() < self.max_count;
        let size = query.len() + types.len();
        let fits_bytes = self.bytes - old.unwrap_or(0) + name.len() + size <= self.max_bytes;
        if fits_count && fits_bytes {
            let st = Statement {
                query: query.into(),
                types: types.into(),
            };
            if let Some(old) = self.named.insert(name.into(), st) {
                self.bytes -= name.len() + old.size();
            }
            self.bytes += name.len() + size;
        } else {
            self.overflowed = true;
        }
    }

    pub fn on_close(&mut self, name: &[u8]) {
        if name.is_empty() {
            self.bytes -= self.unnamed.take().map_or(0, |q| q.size());
        } else if let Some(q) = self.named.remove(name) {
            self.bytes -= name.len() + q.size();
        }
    }

    /// Forgets every named statement (DEALLOCATE ALL, DISCARD ALL).
    pub fn clear_named(&mut self) {
        for (name, q) in self.named.drain() {
            self.bytes -= name.len() + q.size();
        }
    }

    /// A statement's SQL text.
    pub fn get(&self, name: &[u8]) -> Option<&Arc<[u8]>> {
        self.statement(name).map(|s| &s.query)
    }

    pub fn statement(&self, name: &[u8]) -> Option<&Statement> {
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

    /// Bytes of names, SQL text and parameter types held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Session state the source got that the target session must repeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateOp {
    /// SET / RESET / SET ROLE ...: run as it was sent.
    Sql(Arc<str>),
    /// `DISCARD ALL`, `RESET ALL`: replayed; with `true` (DISCARD ALL)
    /// every statement the target session holds is gone too.
    Reset(Arc<str>, bool),
    /// A named statement closed (protocol Close or DEALLOCATE).
    Close(Box<[u8]>),
    /// `DEALLOCATE ALL`.
    CloseAll,
}

/// The session-state log: what the target session must repeat, in order.
#[derive(Default)]
pub struct StateLog {
    pub ops: Vec<StateOp>,
    bytes: usize,
    /// Bumped when the log is cut back to a reset: replay from the start.
    pub restarts: u64,
}

impl StateLog {
    /// Appends an op; false when the log is full (the session must then
    /// read from the source for good).
    pub fn push(&mut self, op: StateOp) -> bool {
        if let StateOp::Reset(..) = op {
            // Everything before a reset is undone by it.
            self.ops.clear();
            self.bytes = 0;
            self.restarts += 1;
        }
        self.bytes += match &op {
            StateOp::Sql(s) | StateOp::Reset(s, _) => s.len(),
            StateOp::Close(n) => n.len(),
            StateOp::CloseAll => 0,
        };
        self.ops.push(op);
        self.ops.len() <= MAX_STATE_OPS && self.bytes <= MAX_STATE_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_cuts_the_state_log_back() {
        let mut log = StateLog::default();
        assert!(log.push(StateOp::Sql("set a = 1".into())));
        assert!(log.push(StateOp::Close(b"s1".to_vec().into())));
        assert!(log.push(StateOp::Reset("discard all".into(), true)));
        assert_eq!(log.ops, vec![StateOp::Reset("discard all".into(), true)]);
        assert_eq!(log.restarts, 1);
        for _ in 0..MAX_STATE_OPS {
            log.push(StateOp::Sql("set a = 1".into()));
        }
        assert!(!log.push(StateOp::Sql("set a = 2".into())));
    }

    #[test]
    fn statements_track_parse_and_close_within_count_and_byte_bounds() {
        let mut s = PreparedStatements::new(2, 1024);
        s.on_parse(b"a", b"select 1");
        s.on_parse(b"b", b"select 2");
        s.on_parse(b"c", b"select 3");
        assert!(s.overflowed);
        assert_eq!(s.len(), 2);
        s.on_parse(b"a", b"select 10"); // redefining a tracked name is fine
        assert_eq!(s.get(b"a").map(|q| &q[..]), Some(&b"select 10"[..]));
        s.on_parse(b"", b"select 4");
        assert_eq!(s.get(b"").map(|q| &q[..]), Some(&b"select 4"[..]));
        assert_eq!(s.bytes(), 1 + 9 + 2 + 1 + 8 + 2 + 8 + 2);
        s.on_close(b"a");
        s.on_close(b"");
        assert!(s.get(b"a").is_none());
        assert_eq!(s.bytes(), 1 + 8 + 2);

        let mut s = PreparedStatements::new(100, 20);
        s.on_parse(b"big", &[b'x'; 30]);
        assert!(s.overflowed && s.is_empty() && s.bytes() == 0);
    }

    #[test]
    fn unchanged_unnamed_statement_is_not_copied_again() {
        let mut s = PreparedStatements::new(10, 1024);
        s.on_parse(b"", b"select $1");
        let first = Arc::as_ptr(s.get(b"").unwrap());
        s.on_parse(b"", b"select $1");
        assert_eq!(Arc::as_ptr(s.get(b"").unwrap()), first);
        assert_eq!(s.bytes(), 9 + 2);
    }
}
