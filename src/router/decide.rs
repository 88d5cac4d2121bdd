//! Where each request goes: the routing half that runs on the hot path,
//! inside the client -> source pump.
//!
//! A request may go to the target only when nothing is in flight on the
//! source and the session is outside a transaction block (or inside one it
//! opened READ ONLY on the target); then the request alone decides:
//!
//! - a simple Query is routed when every statement in it is a read (or it
//!   is a `BEGIN ... READ ONLY`) and its key hashes into the cohort;
//! - an extended-protocol batch (Parse/Bind/Describe/Execute up to Sync) is
//!   held back whole while it is being received: routed at its Sync when
//!   every statement it runs is a read, released to the source as soon as
//!   one message shows it cannot be (a write, a named Parse, a Close, a
//!   Flush, a message too big to hold).
//!
//! A session that wrote reads from the source until the mirror has applied
//! its last write on the target (read-your-writes). Session state the
//! source got (SET, DISCARD, DEALLOCATE, Close) is logged for the
//! responder, which repeats it on the target before the next routed read.

use std::cell::Cell;
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
use super::txn::{self, Judged, SourceQueue};
use super::{RouteMetrics, Router, RoutingSettings};
use crate::classify::{Class, Classifier, Rules, SessionOp};
use crate::config::HashKey;
use crate::mirror::Mirror;
use crate::protocol::message::{
    parse_bind_names, put_message, take_cstr, BindNames, BIND, CLOSE, DESCRIBE, EXECUTE, FLUSH,
    PARSE, SYNC,
};
use crate::shadow::{Request, SessionInfo, Shadow, Side, Tap};
use crate::tracker::{PreparedStatements, StateLog, StateOp, Statement};

/// Most bytes of one extended-protocol batch held back while deciding.
pub const MAX_BATCH: usize = 256 << 10;

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
    fn new(frames: BytesMut, in_txn: bool) -> Self {
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

    fn log_state(&self, op: StateOp, metrics: &RouteMetrics) {
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
    fn arm_tap(&self, tap: Tap) {
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

    fn enqueue(&self, r: Routed) {
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

    fn bucket(&self, key: HashKey) -> u64 {
        match key {
            HashKey::Session | HashKey::Comment => self.session,
            HashKey::User => self.user,
            HashKey::ApplicationName => self.application_name,
            HashKey::ClientAddr => self.client_addr,
        }
    }
}

/// What a statement text means for routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadKind {
    /// Every statement reads: may be routed.
    Read,
    /// `BEGIN ... READ ONLY` alone: opens a transaction that may be routed.
    BeginReadOnly,
    /// Anything else.
    Other,
}

/// An extended-protocol batch held back until it is known where it goes.
#[derive(Default)]
struct Batch {
    frames: BytesMut,
    statements: Vec<(Box<[u8]>, Statement)>,
    /// An unnamed statement was parsed in this batch, and bound after.
    parsed_unnamed: bool,
    bound_unnamed: bool,
    /// It runs something (not only Parse/Describe).
    executes: bool,
    /// Started inside a routed transaction: goes to the target whatever it holds.
    in_txn: bool,
    /// Some statement's key (sqlcommenter) was in the cohort.
    keyed_in: bool,
    started: Option<Instant>,
    /// Sampled for a shadow read (if it turns out to be an eligible one).
    shadow: bool,
    /// The shape of its first statement (per-fingerprint failback mode).
    shape: u64,
    /// Inside a routed transaction: the texts of the statements it binds,
    /// in order, and the names it parses.
    executed: Vec<Arc<[u8]>>,
    named_parses: Vec<Box<[u8]>>,
}

/// Where a simple Query goes.
#[derive(Debug, PartialEq, Eq)]
pub enum QueryRoute {
    /// The target (the caller drops it from the source stream).
    Target,
    /// The source.
    Source,
}

/// A READ ONLY transaction routed to the target (see `txn`).
#[derive(Default)]
struct RoutedTxn {
    /// What went to the target in it while it had not read yet: replayed
    /// on the source if it moves there.
    prelude: BytesMut,
    requests: u32,
    /// It ran a statement that takes a snapshot.
    read: bool,
}

/// Where a held batch goes, decided at one of its messages.
pub enum BatchStep {
    /// Keep holding: the message is in the batch.
    Held,
    /// Send it to the target (at its Sync).
    Routed,
    /// Release it to the source: these frames go just before this message,
    /// which is then handled as usual.
    Release(Bytes),
}

/// The routing decisions of one session.
pub struct Decider<'a> {
    pub link: &'a RouteLink,
    router: &'a Router,
    metrics: &'a RouteMetrics,
    mirror: Option<&'a Mirror>,
    keys: SessionKeys,
    classifier: Classifier,
    batch: Option<Batch>,
    /// The READ ONLY transaction routed to the target, from its BEGIN
    /// until the target answers its end.
    txn: Option<RoutedTxn>,
    /// An extended-protocol batch going to the source that may be an
    /// eligible read: (when it started, whether it still is one, whether
    /// it executes anything).
    observed: Option<(Instant, bool, bool)>,
    /// What each prepared statement is, by name, checked by its text's
    /// identity: executions of a prepared statement are not classified
    /// again.
    kinds: StatementKinds,
    shadow: Option<&'a Shadow>,
    shadow_session: Option<Arc<SessionInfo>>,
    /// The shadow sampling draw for the extended-protocol batch starting
    /// now (drawn once, however often `collects` asks).
    pick: Cell<Option<bool>>,
}

type StatementKinds = std::collections::HashMap<Box<[u8]>, (Arc<[u8]>, ReadKind)>;

/// Prepared statements whose kind is remembered per session.
const MAX_KINDS: usize = 1024;

impl<'a> Decider<'a> {
    pub fn new(
        link: &'a RouteLink,
        router: &'a Router,
        metrics: &'a RouteMetrics,
        mirror: Option<&'a Mirror>,
        keys: SessionKeys,
        rules: Arc<Rules>,
    ) -> Self {
        Self {
            link,
            router,
            metrics,
            mirror,
            keys,
            classifier: Classifier::new(rules),
            batch: None,
            txn: None,
            observed: None,
            kinds: std::collections::HashMap::new(),
            shadow: None,
            shadow_session: None,
            pick: Cell::new(None),
        }
    }

    /// Shadow reads for this session's eligible reads.
    pub fn with_shadow(mut self, shadow: &'a Shadow, session: Arc<SessionInfo>) -> Self {
        self.shadow = Some(shadow);
        self.shadow_session = Some(session);
        self
    }

    fn sample(&self) -> bool {
        self.shadow.is_some_and(|s| s.sample()) && !self.link.pinned.load(Relaxed)
    }

    /// Whether reads are looked at now: routing has a share of them, or
    /// shadowing samples them. While neither does, a request costs the
    /// session nothing here but this check (two flags): no classification,
    /// no timing, no counting. The session-state log is kept regardless
    /// (`source_statement`), so that routing can start at any request.
    pub fn engaged(&self) -> bool {
        self.router.engaged() || self.shadow.is_some_and(|s| s.engaged())
    }

    /// Whether the batch starting now is sampled (one draw per batch).
    fn picked(&self) -> bool {
        match self.pick.get() {
            Some(p) => p,
            None => {
                let p = self.sample();
                self.pick.set(Some(p));
                p
            }
        }
    }

    /// Queues a shadow read of a sampled eligible read; the tap copies the
    /// served answer. A session pinned to the source has state the shadow
    /// connections cannot stand in for (temporary tables, ...).
    fn shadow_submit(&self, served: Side, request: impl FnOnce() -> Request) -> Option<Tap> {
        let (sh, info) = (self.shadow?, self.shadow_session.as_ref()?);
        if self.link.pinned.load(Relaxed) {
            return None;
        }
        let state = self
            .link
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ops
            .clone();
        let watermark = self.mirror.map_or(0, |m| m.spool.last_seq());
        sh.submit(served, request(), Arc::clone(info), state, watermark)
    }

    /// An extended-protocol batch on its way to the source is followed as
    /// a possible eligible read.
    pub fn observing(&self) -> bool {
        self.observed.is_some()
    }

    pub fn holding(&self) -> bool {
        self.batch.is_some()
    }

    /// Whether reads may leave the source now, with the settings in force.
    /// `source_idle`: nothing in flight on the source, outside a block.
    fn gate(&self, source_idle: bool) -> Option<arc_swap::Guard<Arc<RoutingSettings>>> {
        // A request pipelined behind a routed one goes to the source (its
        // bytes wait there until the routed answer is relayed): answers
        // reach the client in request order, a fallback included.
        if !source_idle
            || !self.link.ready.load(Relaxed)
            || self.link.pinned.load(Relaxed)
            || self.link.source_ended.load(Relaxed)
            || self.link.target_busy()
        {
            return None;
        }
        let s = self.router.settings();
        if !s.active() {
            return None;
        }
        Some(s)
    }

    /// Read-your-writes: the session's last write is applied on the target.
    fn own_writes_applied(&self) -> bool {
        let seq = self.link.last_spooled_seq.load(Relaxed);
        match self.mirror {
            Some(m) => m.is_applied(seq),
            None => true,
        }
    }

    fn kind(&mut self, sql: &[u8]) -> ReadKind {
        let Ok(sql) = std::str::from_utf8(sql) else {
            return ReadKind::Other;
        };
        // Only reads of table data are portable: SHOW, statistics, system
        // catalogs, cursors and admin functions answer about the session's
        // own server (see `classify::reads`).
        let classes = self.classifier.classify(sql);
        match &classes[..] {
            [] => ReadKind::Other,
            [Class::Begin { read_only: true }] => ReadKind::BeginReadOnly,
            cs if cs.iter().all(Class::is_portable_read) => ReadKind::Read,
            _ => ReadKind::Other,
        }
    }

    /// The kind of a prepared statement, remembered while its text is the
    /// same object.
    fn statement_kind(&mut self, name: &[u8], text: &Arc<[u8]>) -> ReadKind {
        if let Some((t, k)) = self.kinds.get(name) {
            if Arc::ptr_eq(t, text) {
                return *k;
            }
        }
        let k = self.kind(text);
        if self.kinds.len() >= MAX_KINDS {
            self.kinds.clear();
        }
        self.kinds.insert(name.into(), (Arc::clone(text), k));
        k
    }

    /// Whether a read keyed by this statement text goes to the target.
    fn in_cohort(&self, s: &RoutingSettings, sql: &[u8]) -> bool {
        let bucket = if s.hash_key == HashKey::Comment {
            std::str::from_utf8(sql)
                .ok()
                .and_then(|q| policy::comment_value(q, &s.comment_key))
                .map(|v| policy::bucket(v.as_bytes()))
                .unwrap_or(self.keys.session)
        } else {
            self.keys.bucket(s.hash_key)
        };
        bucket < s.threshold_for(|| crate::health::shape_hash(sql))
    }

    /// The shape a routed read is reported under, in per-fingerprint
    /// failback mode (0 otherwise: no hashing on the hot path).
    fn shape_of(&self, sql: &[u8]) -> u64 {
        match &self.link.health {
            Some(h) if h.wants_shapes() => h.shape_of(sql),
            _ => 0,
        }
    }

    /// Whether this session could route anything with these settings (so
    /// holding a batch back is worth it).
    fn may_route(&self, s: &RoutingSettings) -> bool {
        // (Shape 0 is in no capped set: with a cap on some shapes, others
        // may still route.)
        s.hash_key == HashKey::Comment || self.keys.bucket(s.hash_key) < s.threshold_for(|| 0)
    }

    /// A simple Query at a request boundary: where it goes.
    pub fn route_query(&mut self, body: &[u8], sql: &[u8], source_idle: bool) -> QueryRoute {
        if self.link.source_ended.load(Relaxed) {
            return QueryRoute::Source;
        }
        if source_idle && self.in_txn() {
            return self.txn_query(body, sql);
        }
        // Eligible reads are counted (and timed) whichever side serves
        // them, at every routing share (0% included, while shadowing is
        // on): the operator sees the whole picture.
        if !source_idle || !self.engaged() {
            return QueryRoute::Source;
        }
        let kind = self.kind(sql);
        if kind == ReadKind::Other {
            return QueryRoute::Source;
        }
        let to_target = self
            .gate(source_idle)
            .is_some_and(|s| self.in_cohort(&s, sql))
            && self.own_writes_applied();
        let shadowed = kind == ReadKind::Read && self.sample();
        let request = || Request::Simple(Bytes::copy_from_slice(body));
        if !to_target {
            if kind == ReadKind::Read {
                self.metrics.read(false);
                self.link.time_source_read(Some(Instant::now()));
                if let Some(tap) = shadowed
                    .then(|| self.shadow_submit(Side::Source, request))
                    .flatten()
                {
                    self.link.arm_tap(tap);
                }
            }
            return QueryRoute::Source;
        }
        let shadow = shadowed
            .then(|| self.shadow_submit(Side::Target, request))
            .flatten();
        let mut r = Routed::new(frame(b'Q', body), false);
        r.shadow = shadow;
        r.shape = self.shape_of(sql);
        if kind == ReadKind::BeginReadOnly {
            self.txn = Some(RoutedTxn {
                prelude: r.frames.clone(),
                requests: 1,
                read: false,
            });
        } else {
            r.counted = true;
        }
        self.link.enqueue(r);
        QueryRoute::Target
    }

    /// A simple Query inside the routed transaction (see `txn`).
    fn txn_query(&mut self, body: &[u8], sql: &[u8]) -> QueryRoute {
        let texts: Vec<String> = match std::str::from_utf8(sql) {
            Ok(t) => {
                let classes = self.classifier.classify(t);
                if classes.len() > 1 {
                    match crate::classify::lexer::split(t) {
                        Ok(parts) if parts.len() == classes.len() => {
                            parts.iter().map(|p| p.to_string()).collect()
                        }
                        _ => vec![t.to_string(); classes.len()],
                    }
                } else {
                    vec![t.to_string(); classes.len()]
                }
            }
            // Not UTF-8: both servers refuse it alike.
            Err(_) => Vec::new(),
        };
        let f = frame(b'Q', body);
        if self.judge_request(texts.iter().map(String::as_str)) {
            self.link.enqueue(Routed::new(f, true));
            QueryRoute::Target
        } else {
            QueryRoute::Source
        }
    }

    /// Judges the statements a request inside the routed transaction runs,
    /// in order. True: it goes to the target (its session changes queued
    /// for the source); false: the transaction moved to the source, where
    /// the request goes too.
    fn judge_request<'t>(&mut self, texts: impl Iterator<Item = &'t str>) -> bool {
        let Some(t) = self.txn.as_ref() else {
            return false;
        };
        let mut read = t.read;
        let mut actions = Vec::new();
        for text in texts {
            let class = self
                .classifier
                .classify(text)
                .first()
                .cloned()
                .unwrap_or(Class::READ);
            match txn::judge(&class, text, read) {
                Judged::Migrate => {
                    self.migrate();
                    return false;
                }
                Judged::Target { read: r } => read |= r,
                other => actions.push((text.to_string(), other)),
            }
        }
        if !actions.is_empty() {
            let mut q = self
                .link
                .source_queue
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (text, a) in actions {
                match a {
                    Judged::AlsoSource { transactional } if !q.push(&text, transactional) => {
                        drop(q);
                        let mut r = Routed::new(BytesMut::new(), true);
                        r.refuse = Some(format!(
                            "pgshift: more than {} bytes of session changes inside one read-only transaction routed to the target",
                            txn::MAX_QUEUED_BYTES
                        ));
                        self.link.enqueue(r);
                        return false;
                    }
                    Judged::Savepoint(op) => q.savepoint(&op),
                    _ => {}
                }
            }
        }
        if let Some(t) = self.txn.as_mut() {
            t.read = read;
        }
        true
    }

    /// The routed transaction moves to the source: the target's is rolled
    /// back, then the source gets what the target ran in it (answers
    /// withheld), then the request that moved it.
    fn migrate(&mut self) {
        let Some(t) = self.txn.take() else {
            return;
        };
        let mut r = Routed::new(frame(b'Q', b"ROLLBACK\0"), true);
        r.internal = Some((t.prelude.freeze(), t.requests));
        self.link.enqueue(r);
        self.metrics.transactions_moved.inc();
        // Nothing the target session did in it stays.
        let _ = self
            .link
            .source_queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(false);
    }

    /// Whether the session is (or is about to be) in the routed
    /// transaction on the target: from its BEGIN until the target has
    /// answered everything routed and is outside a transaction again.
    fn in_txn(&mut self) -> bool {
        if self.txn.is_some() && !self.link.target_busy() && !self.link.in_target_txn() {
            self.txn = None;
        }
        self.txn.is_some()
    }

    /// Whether an extended-protocol message at this point is held back:
    /// inside a batch being held (if it fits), or starting one that might
    /// be routed.
    pub fn collects(&self, tag: u8, len: usize, source_idle: bool) -> bool {
        if self.link.source_ended.load(Relaxed) {
            return false;
        }
        let in_txn = self.txn.is_some();
        if !matches!(
            tag,
            PARSE | BIND | DESCRIBE | EXECUTE | CLOSE | SYNC | FLUSH
        ) {
            return false;
        }
        if let Some(b) = &self.batch {
            return b.frames.len() + len + 5 <= MAX_BATCH;
        }
        if len + 5 > MAX_BATCH {
            return false;
        }
        if in_txn {
            return source_idle;
        }
        if !source_idle || !self.engaged() {
            return false;
        }
        // Held to be routed, or to copy it for a shadow read.
        self.gate(source_idle).is_some_and(|s| self.may_route(&s)) || self.picked()
    }

    /// A held (or first) extended-protocol message, complete; `statements`
    /// already records a Parse in it.
    pub fn batch_message(
        &mut self,
        tag: u8,
        body: &[u8],
        statements: &PreparedStatements,
    ) -> BatchStep {
        let in_txn = self.in_txn();
        let mut batch = match self.batch.take() {
            Some(b) => b,
            None => Batch {
                in_txn,
                started: Some(Instant::now()),
                shadow: !in_txn && self.pick.take().unwrap_or_else(|| self.sample()),
                ..Batch::default()
            },
        };
        let ok = if batch.in_txn {
            self.txn_batch_message(&mut batch, tag, body, statements)
        } else {
            self.read_batch_message(&mut batch, tag, body, statements)
        };
        if !ok {
            return BatchStep::Release(batch.frames.freeze());
        }
        // Inside the routed transaction a Flush sends what is held (the
        // client waits for those answers before it goes on).
        let flushed = batch.in_txn && tag == FLUSH;
        if tag != SYNC && !flushed {
            put_message(&mut batch.frames, tag, &[body]);
            self.batch = Some(batch);
            return BatchStep::Held;
        }
        if batch.in_txn {
            let executed = std::mem::take(&mut batch.executed);
            let texts: Vec<String> = executed
                .iter()
                .map(|t| String::from_utf8_lossy(t).into_owned())
                .collect();
            if !self.judge_request(texts.iter().map(String::as_str)) {
                // The transaction moved to the source: so does the batch,
                // then this message.
                return BatchStep::Release(batch.frames.freeze());
            }
            // Statements parsed here exist on the target now; the source
            // gets them before a later Bind or Describe there uses them.
            for name in &batch.named_parses {
                self.link.mark_source_stale(name);
            }
        }
        let eligible_read = !batch.in_txn && batch.executes;
        // An unnamed statement parsed but not used here will be bound by a
        // later batch, which may go to the source: it must be parsed there.
        let self_contained = !batch.parsed_unnamed || batch.bound_unnamed;
        let to_target =
            batch.in_txn || (batch.keyed_in && self_contained && self.own_writes_applied());
        let shadowed = eligible_read && batch.shadow;
        if !to_target {
            let frames = batch.frames.freeze();
            if eligible_read {
                self.metrics.read(false);
                self.link.time_source_read(batch.started);
                let statements = std::mem::take(&mut batch.statements);
                if let Some(tap) = shadowed
                    .then(|| {
                        self.shadow_submit(Side::Source, || Request::Extended {
                            frames: frames.clone(),
                            statements,
                        })
                    })
                    .flatten()
                {
                    self.link.arm_tap(tap);
                }
            }
            // All of it goes to the source now, then the Sync.
            return BatchStep::Release(frames);
        }
        let shadow = shadowed
            .then(|| {
                self.shadow_submit(Side::Target, || Request::Extended {
                    frames: Bytes::copy_from_slice(&batch.frames),
                    statements: batch.statements.clone(),
                })
            })
            .flatten();
        put_message(&mut batch.frames, tag, &[body]);
        if batch.parsed_unnamed {
            self.link.mark_source_stale(b"");
        }
        let mut r = Routed::new(batch.frames, batch.in_txn);
        r.statements = batch.statements;
        r.started = batch.started.unwrap_or_else(Instant::now);
        r.shadow = shadow;
        r.shape = batch.shape;
        r.counted = eligible_read;
        r.flushed = flushed;
        self.link.enqueue(r);
        BatchStep::Routed
    }

    /// A message of a batch outside a routed transaction: whether it can
    /// still be a routed read.
    fn read_batch_message(
        &mut self,
        batch: &mut Batch,
        tag: u8,
        body: &[u8],
        statements: &PreparedStatements,
    ) -> bool {
        let settings = self.router.settings();
        match tag {
            PARSE => {
                let mut b = body;
                match (take_cstr(&mut b), take_cstr(&mut b)) {
                    (Ok(b""), Ok(query)) => {
                        batch.parsed_unnamed = true;
                        batch.bound_unnamed = false;
                        if batch.shape == 0 {
                            batch.shape = self.shape_of(query);
                        }
                        let read = self.kind(query) == ReadKind::Read;
                        batch.keyed_in |= read && self.in_cohort(&settings, query);
                        read
                    }
                    // A named statement must exist on the source, where
                    // writes will use it: prepared there, lazily here.
                    _ => false,
                }
            }
            BIND => match parse_bind_names(body) {
                Ok(BindNames {
                    statement: name, ..
                }) => match statements.statement(name) {
                    Some(st) if !name.is_empty() || batch.parsed_unnamed => {
                        batch.bound_unnamed |= name.is_empty();
                        if batch.shape == 0 {
                            batch.shape = self.shape_of(&st.query);
                        }
                        let read = self.statement_kind(name, &st.query) == ReadKind::Read;
                        batch.keyed_in |= read && self.in_cohort(&settings, &st.query);
                        if read && !name.is_empty() {
                            batch.statements.push((name.into(), st.clone()));
                        }
                        read
                    }
                    _ => false,
                },
                Err(_) => false,
            },
            DESCRIBE | SYNC => true,
            EXECUTE => {
                batch.executes = true;
                true
            }
            // A Close must reach the source; a Flush wants answers now.
            _ => false,
        }
    }

    /// A message of a batch inside the routed transaction: it is held to
    /// its Sync (then judged whole); what it binds is noted.
    fn txn_batch_message(
        &mut self,
        batch: &mut Batch,
        tag: u8,
        body: &[u8],
        statements: &PreparedStatements,
    ) -> bool {
        let mut b = body;
        match tag {
            PARSE => {
                if let Ok(name) = take_cstr(&mut b) {
                    if name.is_empty() {
                        batch.parsed_unnamed = true;
                    } else {
                        batch.named_parses.push(name.into());
                    }
                }
                true
            }
            BIND => {
                if let Ok(names) = parse_bind_names(body) {
                    let name = names.statement;
                    if let Some(st) = statements.statement(name) {
                        batch.executed.push(Arc::clone(&st.query));
                        // Prepared before the transaction (on the source):
                        // the target gets it first.
                        let parsed_here = if name.is_empty() {
                            batch.parsed_unnamed
                        } else {
                            batch.named_parses.iter().any(|n| &**n == name)
                        };
                        if !parsed_here {
                            batch.statements.push((name.into(), st.clone()));
                        }
                    }
                }
                true
            }
            _ => true,
        }
    }

    /// A held batch must go to the source now (a message too big to hold,
    /// or one that is not extended protocol): its frames.
    pub fn release(&mut self) -> Option<Bytes> {
        self.batch.take().map(|b| b.frames.freeze())
    }

    /// Follows an extended-protocol batch the source gets, to count (and
    /// time) it as a read served by the source when it is an eligible one.
    /// `at_start`: the message opens a batch with the source idle; `text`:
    /// the SQL of a Parse, or of the statement a Bind uses.
    pub fn observe_source(
        &mut self,
        tag: u8,
        at_start: bool,
        is_read: impl FnOnce(&mut Self) -> bool,
    ) {
        if at_start {
            // This batch was not held: a shadow draw for it is spent.
            self.pick.set(None);
            self.observed = self.engaged().then(|| (Instant::now(), true, false));
        }
        let Some((_, eligible, executed)) = self.observed.as_mut() else {
            return;
        };
        match tag {
            PARSE | BIND => {
                if *eligible && !is_read(self) {
                    if let Some((_, e, _)) = self.observed.as_mut() {
                        *e = false;
                    }
                }
            }
            DESCRIBE => {}
            EXECUTE => *executed = true,
            SYNC => {
                if let Some((started, true, true)) = self.observed.take() {
                    self.metrics.read(false);
                    self.link.time_source_read(Some(started));
                }
            }
            _ => *eligible = false,
        }
    }

    /// Whether every statement of this text reads (and may be routed).
    pub fn is_read(&mut self, sql: &[u8]) -> bool {
        self.kind(sql) == ReadKind::Read
    }

    /// The same for a prepared statement (remembered per name).
    pub fn statement_is_read(&mut self, name: &[u8], text: &Arc<[u8]>) -> bool {
        self.statement_kind(name, text) == ReadKind::Read
    }

    /// A statement the source runs: logs the session state the target must
    /// repeat, and pins the session to the source where the target cannot
    /// follow (temporary tables).
    pub fn source_statement(&mut self, sql: &[u8]) {
        if !may_change_state(sql) {
            return;
        }
        let Ok(text) = std::str::from_utf8(sql) else {
            return;
        };
        let classes = self.classifier.classify(text);
        for c in classes.iter() {
            match c {
                Class::Session(SessionOp::Set) => {
                    // Only the statements of a multi-statement string that
                    // set things would be exact; the whole string repeated
                    // could run its other statements on the target.
                    if classes.len() == 1 {
                        self.link.log_state(StateOp::Sql(text.into()), self.metrics);
                    } else {
                        self.link
                            .pin(self.metrics, "SET inside a multi-statement query");
                    }
                }
                Class::Session(
                    op @ (SessionOp::ResetAll | SessionOp::Discard { all: true, .. }),
                ) => {
                    if classes.len() == 1 {
                        let drops = matches!(op, SessionOp::Discard { .. });
                        self.link
                            .log_state(StateOp::Reset(text.into(), drops), self.metrics);
                    } else {
                        self.link.pin(
                            self.metrics,
                            "DISCARD or RESET ALL inside a multi-statement query",
                        );
                    }
                }
                Class::Session(SessionOp::Deallocate { name: None }) => {
                    self.link.log_state(StateOp::CloseAll, self.metrics)
                }
                Class::Session(SessionOp::Deallocate { name: Some(n) }) => self
                    .link
                    .log_state(StateOp::Close(n.as_bytes().into()), self.metrics),
                Class::Session(SessionOp::Discard { temp: true, .. }) => {}
                Class::Write if contains_word(sql, b"temp") || contains_word(sql, b"temporary") => {
                    self.link
                        .pin(self.metrics, "the session created a temporary table");
                }
                _ => {}
            }
        }
    }

    /// A Close of a named statement reached the source.
    pub fn source_close(&self, name: &[u8]) {
        if !name.is_empty() {
            self.link
                .log_state(StateOp::Close(name.into()), self.metrics);
        }
    }
}

/// A message frame rebuilt from its tag and body.
fn frame(tag: u8, body: &[u8]) -> BytesMut {
    let mut b = BytesMut::with_capacity(5 + body.len());
    put_message(&mut b, tag, &[body]);
    b
}

/// Cheap pre-check before classifying a statement the source runs: only
/// these words can change session state (or make a temporary table).
fn may_change_state(sql: &[u8]) -> bool {
    crate::classify::mentions_word(
        sql,
        &[
            b"set",
            b"discard",
            b"deallocate",
            b"temp",
            b"temporary",
            b"reset",
        ],
    )
}

/// Whether `word` (lower-case ASCII) appears in `sql` as a whole word, in
/// any case.
fn contains_word(sql: &[u8], word: &[u8]) -> bool {
    let is_word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    if sql.len() < word.len() {
        return false;
    }
    (0..=sql.len() - word.len()).any(|i| {
        sql[i..i + word.len()].eq_ignore_ascii_case(word)
            && (i == 0 || !is_word(sql[i - 1]))
            && sql.get(i + word.len()).is_none_or(|&c| !is_word(c))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_words_are_found_as_whole_words_only() {
        assert!(may_change_state(b"SET search_path = x"));
        assert!(may_change_state(b"  reset ALL"));
        assert!(may_change_state(b"create TEMP table t(a int)"));
        assert!(!may_change_state(b"select * from t offset 5"));
        assert!(!may_change_state(b"select dataset from resets"));
    }

    use crate::config::RoutingConfig;

    fn body(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    struct World {
        link: RouteLink,
        router: Router,
        metrics: RouteMetrics,
    }

    impl World {
        fn new(read_percent: f64) -> Self {
            let cfg = RoutingConfig {
                read_percent,
                ..RoutingConfig::default()
            };
            let link = RouteLink::default();
            link.ready.store(true, Relaxed);
            Self {
                link,
                router: Router::new(&cfg, true),
                metrics: RouteMetrics::new(),
            }
        }
        fn decider(&self) -> Decider<'_> {
            Decider::new(
                &self.link,
                &self.router,
                &self.metrics,
                None,
                SessionKeys::new(1, "u", "app", "127.0.0.1"),
                Arc::new(Rules::default()),
            )
        }
    }

    fn released(step: BatchStep) -> Bytes {
        match step {
            BatchStep::Release(f) => f,
            BatchStep::Held => panic!("held"),
            BatchStep::Routed => panic!("routed"),
        }
    }

    #[test]
    fn a_read_batch_is_held_and_routed_at_its_sync_with_its_statements() {
        let w = World::new(100.0);
        let mut d = w.decider();
        let mut st = PreparedStatements::new(10, 1 << 20);
        st.on_parse_typed(b"s1", b"select $1::int", &[0, 1, 0, 0, 0, 23]);
        assert!(d.collects(BIND, 20, true));
        assert!(matches!(
            d.batch_message(BIND, &body(&[b"\0s1\0", &[0, 0, 0, 0, 0, 0]]), &st),
            BatchStep::Held
        ));
        assert!(matches!(
            d.batch_message(EXECUTE, b"\0\0\0\0\0", &st),
            BatchStep::Held
        ));
        assert!(matches!(d.batch_message(SYNC, b"", &st), BatchStep::Routed));
        let q = w.link.queue.lock().unwrap();
        let r = q.front().unwrap();
        assert_eq!(r.statements.len(), 1);
        assert_eq!(&*r.statements[0].0, b"s1");
        assert_eq!(&*r.statements[0].1.types, &[0, 1, 0, 0, 0, 23]);
        assert_eq!(r.frames[0], BIND);
        assert_eq!(r.frames[r.frames.len() - 5], SYNC);
        assert_eq!(w.link.target_in_flight.load(Relaxed), 1);
        // Counted once the target has answered it (by the responder).
        assert!(r.counted);
    }

    #[test]
    fn writes_named_parses_closes_and_flushes_release_the_batch_to_the_source() {
        let w = World::new(100.0);
        let mut st = PreparedStatements::new(10, 1 << 20);
        st.on_parse(b"w", b"update t set a = 1");
        st.on_parse(b"", b"select 1");
        // A named Parse: straight to the source, nothing held.
        let mut d = w.decider();
        let f = released(d.batch_message(PARSE, b"n\0select 1\0\0\0", &st));
        assert!(f.is_empty());
        // A read held, then a Bind of a write: both go to the source, in order.
        let mut d = w.decider();
        assert!(matches!(
            d.batch_message(PARSE, b"\0select 1\0\0\0", &st),
            BatchStep::Held
        ));
        let f = released(d.batch_message(BIND, b"\0w\0\0\0\0\0\0\0", &st));
        assert_eq!(f[0], PARSE);
        assert!(!d.holding());
        // A Flush wants answers now.
        let mut d = w.decider();
        assert!(matches!(
            d.batch_message(PARSE, b"\0select 1\0\0\0", &st),
            BatchStep::Held
        ));
        assert!(!released(d.batch_message(FLUSH, b"", &st)).is_empty());
        // An unnamed statement parsed and not bound here: the next batch
        // will bind it, maybe on the source, so this one stays there.
        let mut d = w.decider();
        d.batch_message(PARSE, b"\0select 1\0\0\0", &st);
        d.batch_message(DESCRIBE, b"S\0", &st);
        assert!(!released(d.batch_message(SYNC, b"", &st)).is_empty());
        assert_eq!(w.link.target_in_flight.load(Relaxed), 0);
    }

    fn routed(d: &mut Decider<'_>, sql: &str) -> bool {
        let body = format!("{sql}\0");
        d.route_query(body.as_bytes(), sql.as_bytes(), true) == QueryRoute::Target
    }

    #[test]
    fn outside_the_cohort_nothing_is_held_and_reads_count_as_source_reads() {
        // A share so small that this session's bucket is outside it.
        let w = World::new(0.0001);
        let mut d = w.decider();
        assert!(d.engaged());
        assert!(!d.collects(BIND, 20, true));
        assert!(!routed(&mut d, "select 1"));
        assert!(!routed(&mut d, "update t set a=1"));
        assert_eq!(w.metrics.snapshot()["source"]["reads"], 1);
        // At 0% (and no shadowing) reads are not even looked at: nothing
        // is classified, timed or counted.
        let w = World::new(0.0);
        let mut d = w.decider();
        assert!(!d.engaged());
        assert!(!d.collects(BIND, 20, true));
        assert!(!routed(&mut d, "select 1"));
        d.observe_source(PARSE, true, |_| panic!("classified at 0%"));
        assert!(!d.observing());
        assert_eq!(w.metrics.snapshot()["source"]["reads"], 0);
        assert!(w.link.take_source_read().is_none());
        // Raised live: the next request is looked at again.
        w.router.store(RoutingSettings::from_config(&RoutingConfig {
            read_percent: 0.0001,
            ..RoutingConfig::default()
        }));
        assert!(d.engaged());
        assert!(!routed(&mut d, "select 1"));
        assert_eq!(w.metrics.snapshot()["source"]["reads"], 1);
        assert!(w.link.take_source_read().is_some());
        // At 100%, but with the source busy: the source.
        let w = World::new(100.0);
        let mut d = w.decider();
        assert_eq!(
            d.route_query(b"select 1\0", b"select 1", false),
            QueryRoute::Source
        );
        assert!(!d.collects(BIND, 20, false));
        assert!(routed(&mut d, "select 1"));
        // Reads of server-local state stay on the source.
        assert!(!routed(&mut d, "show port"));
    }

    #[test]
    fn a_read_pipelined_behind_a_routed_one_goes_to_the_source() {
        let w = World::new(100.0);
        let mut d = w.decider();
        assert!(routed(&mut d, "select 1"));
        // The first one's answer is not in: the next read waits on the
        // source side, so the answers keep their order.
        assert!(!routed(&mut d, "select 2"));
        assert!(!d.collects(PARSE, 20, true));
        w.link.target_in_flight.store(0, Relaxed);
        assert!(routed(&mut d, "select 3"));
        // Counted when answered, by the side that answers.
        assert_eq!(w.metrics.snapshot()["target"]["reads"], 0);
    }

    #[test]
    fn a_read_only_transaction_runs_on_the_target_until_it_must_move() {
        let w = World::new(100.0);
        let mut d = w.decider();
        assert!(routed(&mut d, "begin read only"));
        // Before it read: a write moves it to the source (the target's is
        // rolled back, the source gets the BEGIN first).
        assert!(!routed(&mut d, "update t set a = 1"));
        {
            let q = w.link.queue.lock().unwrap();
            assert_eq!(q.len(), 2);
            let (frames, n) = q[1].internal.clone().expect("a move");
            assert_eq!(n, 1);
            assert!(frames.windows(15).any(|w| w == b"begin read only"));
        }
        assert_eq!(w.metrics.transactions_moved.get(), 1);

        // Once it has read, the target answers whatever comes (Postgres
        // refuses the write there as it would on the source), and session
        // settings are queued for the source.
        let w = World::new(100.0);
        let mut d = w.decider();
        assert!(routed(&mut d, "begin read only"));
        assert!(routed(&mut d, "select 1"));
        assert!(routed(&mut d, "set search_path = app"));
        assert!(routed(&mut d, "update t set a = 1"));
        assert!(routed(&mut d, "set transaction read write"));
        assert_eq!(w.link.queue.lock().unwrap().len(), 5);
        assert!(!w.link.source_queue.lock().unwrap().is_empty());
    }

    #[test]
    fn session_state_is_logged_and_temporary_tables_pin_the_session() {
        let w = World::new(100.0);
        let mut d = w.decider();
        d.source_statement(b"SET search_path = app");
        d.source_statement(b"select 1 offset 3");
        d.source_close(b"s1");
        assert_eq!(
            w.link.state.lock().unwrap().ops,
            vec![
                StateOp::Sql("SET search_path = app".into()),
                StateOp::Close(b"s1".to_vec().into())
            ]
        );
        assert!(!w.link.pinned.load(Relaxed));
        d.source_statement(b"create temp table x(a int)");
        assert!(w.link.pinned.load(Relaxed));
        assert!(!routed(&mut d, "select 1"));
    }
}
