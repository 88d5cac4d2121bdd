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
//!   That half is `batch`; what the session's pumps and its responder
//!   share is `link`.
//!
//! A session that wrote reads from the source until the mirror has applied
//! its last write on the target (read-your-writes). Session state the
//! source got (SET, DISCARD, DEALLOCATE, Close) is logged for the
//! responder, which repeats it on the target before the next routed read.

use std::cell::Cell;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::link::{RouteLink, Routed, SessionKeys};
use super::policy;
use super::txn::{self, Judged};
use super::{RouteMetrics, Router, RoutingSettings};
use crate::classify::{first_word, Class, Classifier, Rules, SessionOp};
use crate::config::HashKey;
use crate::mirror::Mirror;
use crate::protocol::message::{put_message, BIND, DESCRIBE, EXECUTE, PARSE, SYNC};
use crate::shadow::{Db, Request, SessionInfo, Shadow, Tap};
use crate::tracker::{StateOp, Statement};

/// What a statement text means for routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReadKind {
    /// Every statement reads: may be routed.
    Read,
    /// `BEGIN ... READ ONLY` alone: opens a transaction that may be routed.
    BeginReadOnly,
    /// Anything else.
    Other,
}

/// An extended-protocol batch held back until it is known where it goes.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) frames: BytesMut,
    pub(super) statements: Vec<(Box<[u8]>, Statement)>,
    /// An unnamed statement was parsed in this batch, and bound after.
    pub(super) parsed_unnamed: bool,
    pub(super) bound_unnamed: bool,
    /// It runs something (not only Parse/Describe).
    pub(super) executes: bool,
    /// Started inside a routed transaction: goes to the target whatever it holds.
    pub(super) in_txn: bool,
    /// Some statement's key (sqlcommenter) was in the cohort.
    pub(super) keyed_in: bool,
    pub(super) started: Option<Instant>,
    /// Sampled for a shadow read (if it turns out to be an eligible one).
    pub(super) shadow: bool,
    /// The shape of its first statement (per-fingerprint failback mode).
    pub(super) shape: u64,
    /// Inside a routed transaction: the texts of the statements it binds,
    /// in order, and the names it parses.
    pub(super) executed: Vec<Arc<[u8]>>,
    pub(super) named_parses: Vec<Box<[u8]>>,
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
pub(super) struct RoutedTxn {
    /// What went to the target in it while it had not read yet: replayed
    /// on the source if it moves there.
    prelude: BytesMut,
    requests: u32,
    /// It ran a statement that takes a snapshot.
    read: bool,
}

/// The routing decisions of one session.
pub struct Decider<'a> {
    pub link: &'a RouteLink,
    pub(super) router: &'a Router,
    pub(super) metrics: &'a RouteMetrics,
    mirror: Option<&'a Mirror>,
    keys: SessionKeys,
    classifier: Classifier,
    pub(super) batch: Option<Batch>,
    /// The READ ONLY transaction routed to the target, from its BEGIN
    /// until the target answers its end.
    pub(super) txn: Option<RoutedTxn>,
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
    pub(super) pick: Cell<Option<bool>>,
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

    pub(super) fn sample(&self) -> bool {
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
    pub(super) fn picked(&self) -> bool {
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
    pub(super) fn shadow_submit(
        &self,
        served: Db,
        request: impl FnOnce() -> Request,
    ) -> Option<Tap> {
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
    pub(super) fn gate(&self, source_idle: bool) -> Option<arc_swap::Guard<Arc<RoutingSettings>>> {
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
    pub(super) fn own_writes_applied(&self) -> bool {
        let seq = self.link.last_spooled_seq.load(Relaxed);
        match self.mirror {
            Some(m) => m.is_applied(seq),
            None => true,
        }
    }

    pub(super) fn kind(&mut self, sql: &[u8]) -> ReadKind {
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
    pub(super) fn statement_kind(&mut self, name: &[u8], text: &Arc<[u8]>) -> ReadKind {
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
    pub(super) fn in_cohort(&self, s: &RoutingSettings, sql: &[u8]) -> bool {
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
    pub(super) fn shape_of(&self, sql: &[u8]) -> u64 {
        match &self.link.health {
            Some(h) if h.wants_shapes() => h.shape_of(sql),
            _ => 0,
        }
    }

    /// Whether this session could route anything with these settings (so
    /// holding a batch back is worth it).
    pub(super) fn may_route(&self, s: &RoutingSettings) -> bool {
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
                    .then(|| self.shadow_submit(Db::Source, request))
                    .flatten()
                {
                    self.link.arm_tap(tap);
                }
            }
            return QueryRoute::Source;
        }
        let shadow = shadowed
            .then(|| self.shadow_submit(Db::Target, request))
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
    pub(super) fn judge_request<'t>(&mut self, texts: impl Iterator<Item = &'t str>) -> bool {
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
    pub(super) fn in_txn(&mut self) -> bool {
        if self.txn.is_some() && !self.link.target_busy() && !self.link.in_target_txn() {
            self.txn = None;
        }
        self.txn.is_some()
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
                Class::Write if crate::classify::mentions_word(sql, &[b"temp", b"temporary"]) => {
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
/// a statement that starts with one of `STATE_WORDS` changes session
/// state, and only one that may create a relation (`TEMP_CAPABLE`, or one
/// that starts with no word at all) and mentions a temporary object makes
/// a temporary table. The first words are found once; the text is scanned
/// for the temporary words only when a statement may create one (an
/// UPDATE, INSERT, DELETE, BEGIN or COMMIT never does).
fn may_change_state(sql: &[u8]) -> bool {
    const STATE_WORDS: &[&[u8]] = &[b"set", b"reset", b"discard", b"deallocate"];
    const TEMP_CAPABLE: &[&[u8]] = &[
        b"create", b"select", b"with", b"do", b"call", b"explain", b"execute", b"prepare",
    ];
    let is = |w: &[u8], words: &[&[u8]]| words.iter().any(|k| w.eq_ignore_ascii_case(k));
    let mut may_create = false;
    let starts = std::iter::once(0).chain(memchr::memchr_iter(b';', sql).map(|i| i + 1));
    for (n, start) in starts.enumerate() {
        match sql.get(start..).and_then(first_word) {
            Some(w) if is(w, STATE_WORDS) => return true,
            Some(w) => may_create |= is(w, TEMP_CAPABLE),
            // The text starts with something else than a word: "(", ...
            None => may_create |= n == 0,
        }
    }
    may_create && crate::classify::mentions_word(sql, &[b"temp", b"temporary"])
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn state_words_are_found_as_whole_words_only() {
        assert!(may_change_state(b"SET search_path = x"));
        assert!(may_change_state(b"  reset ALL"));
        assert!(may_change_state(b"create TEMP table t(a int)"));
        assert!(!may_change_state(b"select * from t offset 5"));
        assert!(!may_change_state(b"select dataset from resets"));
        assert!(may_change_state(b"select * into temporary t from u"));
        // The SET of an UPDATE changes no session state.
        assert!(!may_change_state(b"update t set a = 1"));
        // Nor can an UPDATE or INSERT create a temporary table, whatever it
        // names; a statement after a ';' is looked at, and one that starts
        // with no word at all is scanned.
        assert!(!may_change_state(b"update temp set a = 1"));
        assert!(!may_change_state(b"insert into temp values (1)"));
        assert!(may_change_state(
            b"update t set a = 1; create temp table x(a int)"
        ));
        assert!(may_change_state(b"(select 1 into temp t)"));
        assert!(may_change_state(
            b"WITH a AS (select 1) SELECT * INTO TEMP t FROM a"
        ));
        assert!(may_change_state(
            b"do $$ begin create temp table t(a int); end $$"
        ));
    }

    use crate::config::RoutingConfig;

    pub(crate) fn body(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    /// A session's routing parts, with the link ready.
    pub(crate) struct World {
        pub(crate) link: RouteLink,
        router: Router,
        metrics: RouteMetrics,
    }

    impl World {
        pub(crate) fn new(read_percent: f64) -> Self {
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
        pub(crate) fn decider(&self) -> Decider<'_> {
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
