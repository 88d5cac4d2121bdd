//! The link between a session's two halves and its responder: what the
//! client -> source pump, the source -> client pump and the task that
//! answers routed requests from the target share about one session
//! (whether the source is busy, what it owes, whose answer is next), and
//! the routed request itself.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicU8,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

use super::policy;
use super::txn::SourceQueue;
use super::RouteMetrics;
use crate::config::HashKey;
use crate::shadow::Tap;
use crate::tracker::{StateLog, StateOp, Statement};

/// A request routed to the target, as the client sent it.
pub struct Routed {
    pub frames: BytesMut,
    /// Named statements it binds, to prepare on the target first.
    pub statements: Vec<(Box<[u8]>, Statement)>,
    pub started: Instant,
    /// When the target connection was ready for it (logged in, session
    /// state brought up to date): the target's own latency counts from
    /// here, for the health monitor.
    pub target_started: Option<Instant>,
    /// Sent inside a transaction on the target: it cannot fall back.
    pub in_txn: bool,
    /// A shadowed read: the answer relayed to the client is copied here.
    pub shadow: Option<Tap>,
    /// Its statement's shape, in per-fingerprint failback mode (else 0).
    pub shape: u64,
    /// An eligible read: counted for the backend that answers it.
    pub counted: bool,
    /// The proxy's own request, whose answer the client never sees; once
    /// it is answered, these frames (this many requests) go to the source,
    /// their answers withheld too (a routed transaction moving there).
    pub internal: Option<(Bytes, u32)>,
    /// Ends the session with this error instead (a limit passed).
    pub refuse: Option<String>,
    /// It ends with a Flush, not a Sync: it is over once each message has
    /// been answered (or one failed), with no ReadyForQuery.
    pub flushed: bool,
}

impl Routed {
    pub(super) fn new(frames: BytesMut, in_txn: bool) -> Self {
        Self {
            frames,
            statements: Vec::new(),
            started: Instant::now(),
            target_started: None,
            in_txn,
            shadow: None,
            shape: 0,
            counted: false,
            internal: None,
            refuse: None,
            flushed: false,
        }
    }
}

/// What one session's router halves share: the frontend decider, the
/// backend inspector and the responder. They are futures of one task, so
/// the locks are never contended and never held across an await.
pub struct RouteLink {
    pub queue: Mutex<VecDeque<Routed>>,
    /// Wakes the responder: a request was queued.
    pub request_ready: Notify,
    /// The target has nothing in flight any more.
    pub target_idle: Notify,
    /// The backend pump finished a write (the client stream may be free).
    pub client_free: Notify,
    /// The frontend pump finished a write (the source stream may be free).
    pub source_free: Notify,
    /// Routed requests not yet answered in full.
    pub target_in_flight: AtomicU32,
    /// Transaction status of the target session (`b'T'` inside a routed
    /// READ ONLY transaction).
    pub target_tx: AtomicU8,
    /// The responder holds a working target connection.
    pub ready: AtomicBool,
    /// Reads stay on the source for the rest of the session.
    pub pinned: AtomicBool,
    /// The source sent a FATAL (or PANIC) ErrorResponse: the session is
    /// over. Postgres answers nothing after it, so nothing more is routed
    /// and no routed answer is written to the client.
    pub source_ended: AtomicBool,
    pub responder_writing: AtomicBool,
    pub backend_writing: AtomicBool,
    pub frontend_writing: AtomicBool,
    pub state: Mutex<StateLog>,
    /// Statements the client prepared that the source has not got (the
    /// unnamed one parsed in a routed batch, named ones parsed inside a
    /// routed transaction): the source gets their Parse before a Bind or
    /// Describe uses them. `any_source_stale` spares the hot path the lock.
    pub source_stale: Mutex<HashSet<Box<[u8]>>>,
    pub any_source_stale: AtomicBool,
    /// ParseCompletes the source owes for Parses the proxy added (the
    /// client never sent them).
    pub drop_parse_complete: AtomicU32,
    /// Requests the proxy put into the source stream on its own (a routed
    /// transaction moving there, the session changes it made): their
    /// answers are withheld but for ParameterStatus and notifications.
    pub source_owed: AtomicU32,
    /// Session changes made inside the routed transaction, for the source.
    pub source_queue: Mutex<SourceQueue>,
    /// Seq of this session's last spooled write unit (0: none).
    pub last_spooled_seq: AtomicU64,
    /// When the eligible read now on the source was sent (its latency is
    /// recorded at its ReadyForQuery); see `time_source_read`.
    source_read_started: Mutex<Option<Instant>>,
    /// `source_read_started` holds a time: spares every other
    /// ReadyForQuery the lock.
    source_read_timed: AtomicBool,
    /// ReadyForQuery messages the source sent (but the order probe's).
    source_rfqs: AtomicU64,
    /// The `source_rfqs` at which the source has answered every request
    /// the responder put into its stream (routed reads that fell back,
    /// the proxy's own requests). The source answers in order, and while a
    /// routed request is unanswered nothing else is written to it: a
    /// routed answer waits for those, and the answers are the backend
    /// pump's to relay meanwhile (not held as unprompted messages).
    rfqs_due: AtomicU64,
    /// Responder waits on `client_free` or `source_free` in progress: the
    /// pumps notify only when one is (a Notify takes a lock even when
    /// nobody waits).
    stream_waiters: AtomicU32,
    /// A shadowed read's answer is coming from the source: the backend
    /// pump copies it into this tap.
    pub shadow_armed: AtomicBool,
    pub shadow_tap: Mutex<Option<Tap>>,
    /// The health monitor every outcome is reported to.
    pub health: Option<Arc<crate::health::Health>>,
    /// The eligible read now on the source is a routed read the target
    /// failed with a query error: if the source answers it, the target
    /// was at fault (its shape, for the report, in `rerun_shape`).
    pub rerun_of_target_error: AtomicBool,
    pub rerun_shape: AtomicU64,
    /// What the source answered the eligible read now on it: 0 nothing
    /// failed, 1 an error, 2 an error that is the server's fault.
    pub source_read_error: AtomicU8,
    /// The eligible read now on the source is a routed read that fell back.
    pub fallback_read: AtomicBool,
    /// The responder waits for a request, a target connection or its
    /// keepalive tick, each of which wakes it: the session need not poll
    /// it for the pumps' wakes (see `responder_parked`).
    responder_parked: AtomicBool,
}

impl Default for RouteLink {
    fn default() -> Self {
        Self {
            queue: Mutex::default(),
            request_ready: Notify::new(),
            target_idle: Notify::new(),
            client_free: Notify::new(),
            source_free: Notify::new(),
            target_in_flight: AtomicU32::new(0),
            target_tx: AtomicU8::new(b'I'),
            ready: AtomicBool::new(false),
            pinned: AtomicBool::new(false),
            source_ended: AtomicBool::new(false),
            responder_writing: AtomicBool::new(false),
            backend_writing: AtomicBool::new(false),
            frontend_writing: AtomicBool::new(false),
            state: Mutex::default(),
            source_stale: Mutex::default(),
            any_source_stale: AtomicBool::new(false),
            drop_parse_complete: AtomicU32::new(0),
            source_owed: AtomicU32::new(0),
            source_queue: Mutex::default(),
            last_spooled_seq: AtomicU64::new(0),
            source_read_started: Mutex::default(),
            source_read_timed: AtomicBool::new(false),
            source_rfqs: AtomicU64::new(0),
            rfqs_due: AtomicU64::new(0),
            stream_waiters: AtomicU32::new(0),
            shadow_armed: AtomicBool::new(false),
            shadow_tap: Mutex::default(),
            health: None,
            rerun_of_target_error: AtomicBool::new(false),
            rerun_shape: AtomicU64::new(0),
            source_read_error: AtomicU8::new(0),
            fallback_read: AtomicBool::new(false),
            responder_parked: AtomicBool::new(false),
        }
    }
}

impl RouteLink {
    /// A session's link, reporting to the health monitor when there is one.
    pub fn new(health: Option<Arc<crate::health::Health>>) -> Self {
        Self {
            health,
            ..Self::default()
        }
    }

    /// The eligible read now on the source was sent at `started` (`None`:
    /// it is not timed).
    pub fn time_source_read(&self, started: Option<Instant>) {
        self.source_read_timed.store(started.is_some(), Relaxed);
        *self
            .source_read_started
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = started;
    }

    /// At a ReadyForQuery of the source: when the read it ends was sent,
    /// if it was timed.
    pub fn take_source_read(&self) -> Option<Instant> {
        if !self.source_read_timed.swap(false, Relaxed) {
            return None;
        }
        self.source_read_started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The responder put `requests` into the source stream: they are
    /// answered after everything written there before them.
    pub fn put_into_source(&self, requests: u32) {
        let after = self
            .rfqs_due
            .load(Relaxed)
            .max(self.source_rfqs.load(Relaxed));
        self.rfqs_due.store(after + u64::from(requests), Relaxed);
    }

    /// A ReadyForQuery from the source (not the order probe's).
    pub fn source_ready(&self) {
        self.source_rfqs
            .store(self.source_rfqs.load(Relaxed) + 1, Relaxed);
    }

    /// The source still owes answers to requests the responder put into
    /// its stream.
    pub fn source_owes_responder(&self) -> bool {
        self.source_rfqs.load(Relaxed) < self.rfqs_due.load(Relaxed)
    }

    /// Waits until `ready`, woken by `stream_freed` on `notify`.
    pub async fn wait_stream_free(&self, notify: &Notify, ready: impl Fn() -> bool) {
        self.stream_waiters.fetch_add(1, SeqCst);
        super::wait_until(notify, ready).await;
        self.stream_waiters.fetch_sub(1, SeqCst);
    }

    /// Whether the responder is parked: waiting only on things that wake
    /// it (a queued request, a target connection, the keepalive tick).
    /// While it serves a request it also waits on state the pumps change
    /// without waking it, and must be polled at every wake of the session.
    pub fn responder_parked(&self) -> bool {
        self.responder_parked.load(Relaxed)
    }

    pub(super) fn set_responder_parked(&self, parked: bool) {
        self.responder_parked.store(parked, Relaxed);
    }

    /// A pump finished a write: wakes a responder waiting for its stream.
    pub fn stream_freed(&self, notify: &Notify) {
        if self.stream_waiters.load(SeqCst) > 0 {
            notify.notify_waiters();
        }
    }

    pub fn in_target_txn(&self) -> bool {
        self.target_tx.load(Relaxed) != b'I'
    }

    /// Whether anything routed is still being answered.
    pub fn target_busy(&self) -> bool {
        self.target_in_flight.load(Relaxed) > 0 || self.responder_writing.load(Relaxed)
    }

    /// The source has not got this statement (as the client last parsed it).
    pub fn mark_source_stale(&self, name: &[u8]) {
        self.source_stale
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.into());
        self.any_source_stale.store(true, Relaxed);
    }

    /// Whether the source lacks `name`; forgets it (the caller sends the
    /// Parse, or the source got one from the client).
    pub fn take_source_stale(&self, name: &[u8]) -> bool {
        if !self.any_source_stale.load(Relaxed) {
            return false;
        }
        let mut set = self.source_stale.lock().unwrap_or_else(|p| p.into_inner());
        let was = set.remove(name);
        self.any_source_stale.store(!set.is_empty(), Relaxed);
        was
    }

    pub fn pin(&self, metrics: &RouteMetrics, why: &str) {
        if !self.pinned.swap(true, Relaxed) {
            metrics.sessions_pinned.inc();
            tracing::info!(reason = why, "this session's reads stay on the source");
        }
    }

    pub(super) fn log_state(&self, op: StateOp, metrics: &RouteMetrics) {
        let fits = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(op);
        if !fits {
            self.pin(
                metrics,
                "more session state than the proxy keeps for the target",
            );
        }
    }

    /// The source's next answer is a shadowed read's.
    pub(super) fn arm_tap(&self, tap: Tap) {
        *self.shadow_tap.lock().unwrap_or_else(|p| p.into_inner()) = Some(tap);
        self.shadow_armed.store(true, Relaxed);
    }

    /// Bytes the backend pump forwards to the client (while armed).
    pub fn feed_tap(&self, bytes: &[u8]) {
        let mut t = self.shadow_tap.lock().unwrap_or_else(|p| p.into_inner());
        let done = t.as_mut().is_none_or(|t| t.feed(bytes));
        if done {
            *t = None;
            self.shadow_armed.store(false, Relaxed);
        }
    }

    pub(super) fn enqueue(&self, r: Routed) {
        self.target_in_flight
            .store(self.target_in_flight.load(Relaxed) + 1, Relaxed);
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(r);
        self.request_ready.notify_one();
    }
}

/// The buckets of the session-level keys, computed once at session start.
#[derive(Debug, Clone, Copy)]
pub struct SessionKeys {
    pub session: u64,
    pub user: u64,
    pub application_name: u64,
    pub client_addr: u64,
}

impl SessionKeys {
    pub fn new(session_id: u64, user: &str, application_name: &str, client_ip: &str) -> Self {
        Self {
            session: policy::bucket(session_id.to_string().as_bytes()),
            user: policy::bucket(user.as_bytes()),
            application_name: policy::bucket(application_name.as_bytes()),
            client_addr: policy::bucket(client_ip.as_bytes()),
        }
    }

    pub(super) fn bucket(&self, key: HashKey) -> u64 {
        match key {
            HashKey::Session | HashKey::Comment => self.session,
            HashKey::User => self.user,
            HashKey::ApplicationName => self.application_name,
            HashKey::ClientAddr => self.client_addr,
        }
    }
}
