//! The session side of mirroring: follows one client session's traffic and
//! turns each committed unit of work that wrote something into a spool
//! record.
//!
//! A *segment* is the client messages up to one ReadyForQuery (a Query, or
//! extended-protocol messages up to a Sync), with what the source answered.
//! A *unit* is the segments from one idle ReadyForQuery to the next: an
//! autocommit statement, or a whole transaction block. A unit is mirrored
//! when it wrote something and the source committed it; it is replayed on
//! the target message for message, so the target runs the same transaction
//! with the same statements, savepoints and failures.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::inflight::{self, InDoubt, InFlight};
use super::order::{OrderKey, Probe, ProbeRow};
use super::unit::{startup_param, MirroredUnit, Outcome, Segment};
use crate::classify::{Class, Classifier, Rules, SessionOp};
use crate::clock::now_us;
use crate::protocol::error::parse_error_fields;
use crate::protocol::frame::{decode_header, HEADER_LEN};
use crate::protocol::message::{parse_bind_names, take_cstr};

/// Most session-state statements kept for rebuilding a target connection.
const MAX_STATE: usize = 256;

thread_local! {
    /// One classifier (and parse cache) per worker thread.
    static CLASSIFIER: RefCell<Option<Classifier>> = const { RefCell::new(None) };
}

fn classify(rules: &Arc<Rules>, sql: &str) -> Arc<[Class]> {
    CLASSIFIER.with(|c| {
        let mut c = c.borrow_mut();
        let stale = c.as_ref().is_none_or(|c| !Arc::ptr_eq(c.rules(), rules));
        if stale {
            *c = Some(Classifier::new(Arc::clone(rules)));
        }
        match c.as_mut() {
            Some(c) => c.classify(sql),
            None => Arc::from(vec![Class::Write]),
        }
    })
}

/// The class a prepared statement's executions take.
fn statement_class(rules: &Arc<Rules>, text: &str) -> Class {
    match &classify(rules, text)[..] {
        [c] => c.clone(),
        [] => Class::READ,
        _ => Class::Write,
    }
}

/// A prepared statement as the session defined it.
#[derive(Clone)]
struct CapturedStatement {
    /// The whole Parse message, to re-prepare it on the target.
    parse: Arc<[u8]>,
    /// `Class::Write` (the safe guess) until classified.
    class: Class,
    /// Parsed while mirroring was off, and not classified since (see
    /// `Capture::dormant`).
    classified: bool,
    text: Arc<str>,
}

#[derive(Default)]
struct Seg {
    bytes: Vec<u8>,
    write: bool,
    /// Calls functions that may write (the probe's xid tells).
    calls: bool,
    /// Session-state statements executed in this segment.
    session: Vec<(String, SessionOp)>,
    /// Statements bound here that the unit did not parse itself.
    uses: Vec<(Vec<u8>, Arc<[u8]>)>,
    /// Has transaction control (COMMIT, END, PREPARE TRANSACTION, ...).
    commitish: bool,
    /// Runs a CALL or DO, which may commit on its own even if it then
    /// fails.
    self_committing: bool,
}

impl Seg {
    fn extend(&mut self, other: Seg) {
        self.bytes.extend_from_slice(&other.bytes);
        self.write |= other.write;
        self.calls |= other.calls;
        self.session.extend(other.session);
        self.uses.extend(other.uses);
        self.commitish |= other.commitish;
        self.self_committing |= other.self_committing;
    }
}

/// Buffers of a unit that was not mirrored (the common case: reads, and
/// everything while mirroring is off), handed to the next segments so that
/// following a session allocates nothing per request once warm. Few and
/// small, so an idle session holds next to nothing: a buffer that grew
/// beyond `SPARE_MAX_BYTES` is freed.
#[derive(Default)]
struct Spares {
    bytes: Vec<Vec<u8>>,
    outcomes: Vec<Vec<Outcome>>,
    strings: Vec<String>,
}

/// At most this many of each kind are kept...
const SPARE_COUNT: usize = 4;
/// ...and a message buffer only up to this capacity.
const SPARE_MAX_BYTES: usize = 4096;

impl Spares {
    fn keep(&mut self, seg: Segment) {
        let Segment {
            mut messages,
            mut outcomes,
            ..
        } = seg;
        if self.bytes.len() < SPARE_COUNT && messages.capacity() <= SPARE_MAX_BYTES {
            messages.clear();
            self.bytes.push(messages);
        }
        for o in outcomes.drain(..) {
            if let Outcome::Complete(mut t) | Outcome::Error(mut t) = o {
                if self.strings.len() < SPARE_COUNT * 4 && t.capacity() <= 64 {
                    t.clear();
                    self.strings.push(t);
                }
            }
        }
        if self.outcomes.len() < SPARE_COUNT && outcomes.capacity() <= 64 {
            self.outcomes.push(outcomes);
        }
    }
}

/// What a finished unit asks of the caller.
pub enum Finished {
    /// Nothing to mirror.
    Nothing,
    /// Append this record to the spool before the client sees the commit.
    Mirror(Box<MirroredUnit>),
    /// A committed write could not be captured whole (`max_txn_bytes`):
    /// the target misses it, which must be recorded as a gap.
    Lost { bytes: usize },
}

pub struct Capture {
    rules: Arc<Rules>,
    session: u64,
    startup: Vec<(Vec<u8>, Vec<u8>)>,
    max_txn_bytes: usize,
    /// An incomplete message at the end of what was forwarded so far.
    partial: Vec<u8>,
    /// Client messages seen, and the ones routing took elsewhere (see
    /// `hide`): the mirror follows only what reached the source.
    msg_no: u64,
    hidden: VecDeque<(u64, Option<bytes::Bytes>)>,
    open: Seg,
    /// Closed segments waiting for their ReadyForQuery.
    closed: VecDeque<Seg>,
    syncs_since_execute: usize,
    /// The unit so far.
    unit: Vec<Segment>,
    unit_write: bool,
    /// The unit called functions that may have written.
    unit_calls: bool,
    /// The unit's top-level transaction id on the source, once a probe
    /// read it: the unit wrote, whatever the classifier thought.
    unit_xid: Option<u64>,
    /// A probe answered during the unit (so a missing xid means it wrote
    /// nothing).
    unit_probed: bool,
    unit_commit: bool,
    unit_error: bool,
    unit_session: Vec<(String, SessionOp)>,
    unit_uses: Vec<(Vec<u8>, Arc<[u8]>)>,
    /// CapturedStatement names the unit parsed itself (it re-prepares those).
    unit_parsed: Vec<Vec<u8>>,
    unit_bytes: usize,
    overflow: bool,
    /// Answers to the segment awaiting its ReadyForQuery.
    outcomes: Vec<Outcome>,
    /// Buffers of units that were not mirrored, for the next ones.
    spares: Spares,
    statements: HashMap<Vec<u8>, CapturedStatement>,
    statement_bytes: usize,
    portals: HashMap<Vec<u8>, Vec<u8>>,
    /// SQL-level PREPAREs: name -> whether the body writes.
    sql_prepared: HashMap<String, bool>,
    /// Session state: (PREPARE name, statement text) in execution order.
    state: Vec<(Option<String>, String)>,
    state_version: u64,
    /// Whether any unit of this session was mirrored (its target connection
    /// may hold temp tables that a DISCARD must drop).
    mirrored_any: bool,
    /// ReadyForQuery messages that matched no request (a desync).
    pub desyncs: u64,
    /// This session's slot in the in-flight journal.
    journal: Option<(Arc<InFlight>, u32)>,
    /// When the slot was armed (0 = not armed).
    armed_at_us: u64,
    /// The journal write of the latest arm, until the request it guards is
    /// let go (see `take_arm_write`).
    arm_write: Option<u64>,
    /// Segments of the unit already in the journal's intent.
    journaled: usize,
    /// The journal could not take the latest arm's intent.
    arm_error: Option<String>,
    /// The intent was written with the unit's transaction id (so the
    /// source can say whether it committed).
    intent_xid: bool,
    /// The arm number the journal gave (see `inflight`).
    arm_no: u64,
    /// The order probe riding on the request in flight, if any.
    pub probe: Probe,
    /// Whether that probe gives the unit its order key (at a commit, or
    /// after an autocommit write), or only its transaction id (after a
    /// write inside a block).
    pub probe_orders: bool,
    /// The unit's order key, once its probe answered.
    unit_lsn: Option<u64>,
    /// "user\0database", for the mirror's record of where probes work.
    pub probe_key: String,
    /// Whether probes work in this session (None: not known yet).
    pub probe_works: Option<bool>,
    /// A probe sent only to learn `probe_works` is in flight.
    pub probe_check: bool,
    /// Whether the last ReadyForQuery said "in a transaction block".
    in_block: bool,
    /// Whether the mirror was capturing at the last server message: nothing
    /// is armed while it is off (those units would not be mirrored anyway).
    capturing: bool,
}

const MAX_STATEMENT_BYTES: usize = 16 << 20;

/// Calls `f` with each complete message in `frames`.
fn for_each_frame(frames: &[u8], mut f: impl FnMut(&[u8])) {
    let mut at = 0;
    while let Ok(Some(h)) = decode_header(&frames[at..], usize::MAX >> 1) {
        if frames.len() - at < h.frame_len() {
            break;
        }
        f(&frames[at..at + h.frame_len()]);
        at += h.frame_len();
    }
}

impl Capture {
    pub fn new(
        rules: Arc<Rules>,
        session: u64,
        startup: Vec<(Vec<u8>, Vec<u8>)>,
        max_txn_bytes: usize,
        journal: Option<Arc<InFlight>>,
    ) -> Self {
        let journal = journal.and_then(|j| j.acquire().map(|slot| (j, slot)));
        let user = startup_param(&startup, "user").unwrap_or_default();
        let database = startup_param(&startup, "database").unwrap_or(user);
        let probe_key = format!("{user}\0{database}");
        Self {
            rules,
            session,
            startup,
            max_txn_bytes,
            partial: Vec::new(),
            open: Seg::default(),
            closed: VecDeque::new(),
            syncs_since_execute: 0,
            unit: Vec::new(),
            unit_write: false,
            unit_calls: false,
            unit_xid: None,
            unit_probed: false,
            unit_commit: false,
            unit_error: false,
            unit_session: Vec::new(),
            unit_uses: Vec::new(),
            unit_parsed: Vec::new(),
            unit_bytes: 0,
            overflow: false,
            outcomes: Vec::new(),
            spares: Spares::default(),
            statements: HashMap::new(),
            statement_bytes: 0,
            portals: HashMap::new(),
            sql_prepared: HashMap::new(),
            state: Vec::new(),
            state_version: 0,
            mirrored_any: false,
            desyncs: 0,
            journal,
            armed_at_us: 0,
            arm_write: None,
            journaled: 0,
            arm_error: None,
            intent_xid: false,
            arm_no: 0,
            probe: Probe::Idle,
            probe_orders: true,
            unit_lsn: None,
            probe_key,
            probe_works: None,
            probe_check: false,
            in_block: false,
            capturing: true,
            msg_no: 0,
            hidden: VecDeque::new(),
        }
    }

    /// Called as a request closes, before it is forwarded: arms the
    /// journal when the request may commit a write (a COMMIT, or a write
    /// outside a transaction block). Erring towards arming is harmless.
    fn maybe_arm(&mut self) {
        let Some((journal, slot)) = self.journal.as_ref().filter(|_| self.capturing) else {
            return;
        };
        let Some(seg) = self.closed.back() else {
            return;
        };
        let wrote =
            self.unit_write || self.unit_calls || self.closed.iter().any(|s| s.write || s.calls);
        // With requests still unanswered, the block status is not known.
        let may_commit = seg.commitish || !self.in_block || self.closed.len() > 1;
        if wrote && may_commit {
            let now = now_us();
            // The unit so far goes into the journal whole the first time,
            // then only what was added since.
            let (from, prepared) = if self.armed_at_us == 0 {
                (0, self.uses_so_far())
            } else {
                (
                    self.journaled,
                    self.closed
                        .back()
                        .map(|s| s.uses.clone())
                        .unwrap_or_default(),
                )
            };
            let mut intent = MirroredUnit {
                session: self.session,
                committed_at_us: now,
                xid: self.unit_xid,
                prepared: dedup_prepared(prepared),
                segments: self.segments_so_far(from),
                ..MirroredUnit::default()
            };
            let written = if self.armed_at_us == 0 {
                intent.startup = self.startup.clone();
                intent.state_version = self.state_version;
                intent.state = self.state_texts();
                intent.post_state_version = u64::MAX;
                journal.arm(*slot, &intent)
            } else {
                journal.arm_more(*slot, &intent)
            };
            match written {
                Ok((arm, write)) => {
                    self.journaled = from + intent.segments.len();
                    self.intent_xid |= self.unit_xid.is_some();
                    self.arm_no = arm;
                    self.arm_write = Some(write);
                }
                Err(e) => {
                    // Not on disk: written whole again before the request
                    // goes (see `rearm`), or recorded as a gap.
                    self.journaled = 0;
                    self.arm_error = Some(e.to_string());
                }
            }
            if self.armed_at_us == 0 {
                self.armed_at_us = now;
            }
        }
    }

    /// The unit's segments from `from` on: answered ones with their
    /// answers, requests still in flight without.
    fn segments_so_far(&self, from: usize) -> Vec<Segment> {
        let in_flight = self
            .closed
            .iter()
            .chain(std::iter::once(&self.open).filter(|o| !o.bytes.is_empty()))
            .map(|s| Segment {
                messages: s.bytes.clone(),
                status: b'T',
                outcomes: Vec::new(),
            });
        self.unit
            .iter()
            .cloned()
            .chain(in_flight)
            .skip(from)
            .collect()
    }

    /// Statements the unit so far binds without having parsed them.
    fn uses_so_far(&self) -> Vec<(Vec<u8>, Arc<[u8]>)> {
        self.unit_uses
            .iter()
            .cloned()
            .chain(self.closed.iter().flat_map(|s| s.uses.iter().cloned()))
            .collect()
    }

    fn state_texts(&self) -> Vec<Vec<u8>> {
        self.state
            .iter()
            .map(|(_, t)| t.clone().into_bytes())
            .collect()
    }

    /// The journal write that must be on stable storage before the request
    /// that armed it goes to the source (`fsync = "commit"`).
    pub fn take_arm_write(&mut self) -> Option<u64> {
        self.arm_write.take()
    }

    /// Why the journal could not take the unit's intent, if it could not.
    pub fn take_arm_error(&mut self) -> Option<String> {
        self.arm_error.take()
    }

    /// Writes the unit's intent whole again (after a failed write): the
    /// journal write to wait for.
    pub fn rearm(&mut self) -> Result<u64, String> {
        let Some((journal, slot)) = &self.journal else {
            return Err("no journal slot".into());
        };
        let intent = MirroredUnit {
            session: self.session,
            committed_at_us: now_us(),
            xid: self.unit_xid,
            startup: self.startup.clone(),
            state_version: self.state_version,
            state: self.state_texts(),
            post_state_version: u64::MAX,
            prepared: dedup_prepared(self.uses_so_far()),
            segments: self.segments_so_far(0),
            ..MirroredUnit::default()
        };
        let (arm, write) = journal.arm(*slot, &intent).map_err(|e| e.to_string())?;
        self.journaled = intent.segments.len();
        self.intent_xid |= self.unit_xid.is_some();
        self.arm_no = arm;
        Ok(write)
    }

    /// Called after a ReadyForQuery was handled (and any record spooled, as
    /// `seq`; 0 for none): disarms the journal once nothing is in flight.
    pub fn settle(&mut self, seq: u64) {
        if self.armed_at_us != 0
            && self.unit.is_empty()
            && self.closed.is_empty()
            && self.open.bytes.is_empty()
        {
            if let Some((journal, slot)) = &self.journal {
                journal.disarm(*slot, seq);
            }
            self.armed_at_us = 0;
            self.arm_no = 0;
            self.journaled = 0;
            self.intent_xid = false;
        }
    }

    /// Whether the unit's journal intent holds its transaction id: after a
    /// crash, the source can say whether it committed.
    pub fn resolvable(&self) -> bool {
        self.intent_xid && self.journal.is_some()
    }

    /// Whether the open unit wrote something, or called functions that may
    /// have (so its commit gets a probe).
    pub fn wrote(&self) -> bool {
        self.capturing
            && (self.unit_write
                || self.unit_calls
                || self.open.write
                || self.open.calls
                || self.closed.iter().any(|s| s.write || s.calls))
    }

    /// The unit's transaction id, once known.
    pub fn xid(&self) -> Option<u64> {
        self.unit_xid
    }

    /// Whether the mirror was capturing at the last server message.
    pub fn capturing(&self) -> bool {
        self.capturing
    }

    /// The probe riding on the request answered.
    pub fn probe_answered(&mut self, row: ProbeRow) {
        self.unit_probed = true;
        if self.probe_orders {
            self.unit_lsn = Some(row.lsn);
        }
        if let Some(xid) = row.xid {
            self.unit_xid = Some(xid);
            if let (Some((journal, slot)), true) = (&self.journal, self.armed_at_us != 0) {
                journal.set_xid(*slot, xid);
            }
        }
    }

    /// At the end of the session: the unit whose commit was in flight (its
    /// outcome on the source is unknown), if any. Its journal intent stays
    /// armed until the caller has handed it to recovery.
    pub fn end(&mut self) -> Option<InDoubt> {
        if self.armed_at_us == 0 {
            return None;
        }
        let mut unit = MirroredUnit {
            session: self.session,
            committed_at_us: self.armed_at_us,
            startup: self.startup.clone(),
            state_version: self.state_version,
            state: self.state_texts(),
            post_state_version: u64::MAX,
            prepared: dedup_prepared(self.uses_so_far()),
            segments: self.segments_so_far(0),
            xid: self.unit_xid,
            ..MirroredUnit::default()
        };
        unit.recovered = true;
        let at = std::mem::take(&mut self.armed_at_us);
        Some(InDoubt {
            session: self.session,
            time_us: at,
            xid: self.unit_xid,
            statements: inflight::statements_of(&unit),
            unit: Some(unit),
            key: None,
            spooled_as: None,
        })
    }

    /// Disarms the journal slot of a unit `end` returned, once recovery
    /// holds it.
    pub fn forget_in_doubt(&mut self) {
        if let Some((journal, slot)) = &self.journal {
            journal.disarm(*slot, 0);
        }
        self.arm_no = 0;
        self.journaled = 0;
    }

    /// Sees the bytes about to be written to the source (any cut).
    pub fn client_bytes(&mut self, bytes: &[u8]) {
        if self.partial.is_empty() && bytes.is_empty() {
            return;
        }
        if self.partial.is_empty() {
            let used = self.messages(bytes);
            self.partial.extend_from_slice(&bytes[used..]);
        } else {
            // Only a message cut across reads is copied here first.
            let mut pending = std::mem::take(&mut self.partial);
            pending.extend_from_slice(bytes);
            let used = self.messages(&pending);
            pending.drain(..used);
            self.partial = pending;
        }
    }

    /// Handles the complete messages at the start of `bytes`; returns how
    /// many bytes they took. A malformed header stops it (the pump reports
    /// it and ends the session).
    fn messages(&mut self, bytes: &[u8]) -> usize {
        let mut used = 0;
        while let Ok(Some(h)) = decode_header(&bytes[used..], usize::MAX >> 1) {
            if bytes.len() - used < h.frame_len() {
                break;
            }
            self.msg_no += 1;
            let mut skip = false;
            while let Some((n, _)) = self.hidden.front() {
                if *n != self.msg_no {
                    break;
                }
                match self.hidden.pop_front() {
                    Some((_, Some(frames))) => {
                        for_each_frame(&frames, |m| self.client_message(m));
                    }
                    _ => skip = true,
                }
            }
            if !skip {
                self.client_message(&bytes[used..used + h.frame_len()]);
            }
            used += h.frame_len();
        }
        used
    }

    /// Complete messages that reach the source outside the client's stream
    /// (a routed read falling back), in order with it.
    pub fn inject(&mut self, frames: &[u8]) {
        for_each_frame(frames, |m| self.client_message(m));
    }

    /// Client message `n` (counted from 1, as the session's inspector
    /// counts them) was routed to the target: the mirror must not see it.
    pub fn hide(&mut self, n: u64) {
        self.hidden.push_back((n, None));
    }

    /// These complete messages, held back earlier and hidden, went to the
    /// source after all, just before client message `n`.
    pub fn insert_before(&mut self, n: u64, frames: bytes::Bytes) {
        self.hidden.push_back((n, Some(frames)));
    }

    fn store(&mut self, msg: &[u8], copy: bool) {
        let room = self.unit_bytes + msg.len() <= self.max_txn_bytes;
        if !room {
            self.overflow = true;
        }
        self.unit_bytes += msg.len();
        // Copy data belongs to the request that started the copy: with the
        // simple protocol that Query is already closed.
        let seg = if copy && self.open.bytes.is_empty() && !self.closed.is_empty() {
            self.closed.back_mut().unwrap_or(&mut self.open)
        } else {
            &mut self.open
        };
        if room {
            seg.bytes.extend_from_slice(msg);
        }
    }

    fn close_segment(&mut self) {
        let next = Seg {
            bytes: self.spares.bytes.pop().unwrap_or_default(),
            ..Seg::default()
        };
        self.closed
            .push_back(std::mem::replace(&mut self.open, next));
    }

    fn client_message(&mut self, msg: &[u8]) {
        let tag = msg[0];
        let body = &msg[HEADER_LEN..];
        match tag {
            b'Q' => {
                self.store(msg, false);
                let text = cstr_bytes(body);
                if self.dormant_bytes(text) {
                    // See `query`: taken for a write, with no text made.
                    self.open.write = true;
                } else {
                    self.query(&crate::protocol::text_lossy(text));
                }
                self.syncs_since_execute = 0;
                self.close_segment();
                self.maybe_arm();
            }
            b'P' => {
                self.store(msg, false);
                let mut b = body;
                let (Ok(name), Ok(text)) = (take_cstr(&mut b), take_cstr(&mut b)) else {
                    return;
                };
                if !self.unit_parsed.iter().any(|n| n == name) {
                    self.unit_parsed.push(name.to_vec());
                }
                // Drivers parse the same unnamed statement for every
                // execution: the one kept stays (its class too: the rules
                // are the session's for good).
                if self
                    .statements
                    .get(name)
                    .is_some_and(|old| old.parse[..] == *msg)
                {
                    return;
                }
                let text = crate::protocol::text_lossy(text);
                let classified = !self.dormant(&text);
                let class = if classified {
                    statement_class(&self.rules, &text)
                } else {
                    Class::Write
                };
                let st = CapturedStatement {
                    parse: Arc::from(msg),
                    class,
                    classified,
                    text: Arc::from(text.as_ref()),
                };
                if let Some(old) = self.statements.remove(name) {
                    self.statement_bytes -= old.parse.len();
                }
                if self.statement_bytes + msg.len() <= MAX_STATEMENT_BYTES {
                    self.statement_bytes += msg.len();
                    self.statements.insert(name.to_vec(), st);
                }
            }
            b'B' => {
                self.store(msg, false);
                let Ok(names) = parse_bind_names(body) else {
                    return;
                };
                let stmt = names.statement;
                self.portals.insert(names.portal.to_vec(), stmt.to_vec());
                if !self.unit_parsed.iter().any(|n| n == stmt) {
                    if let Some(st) = self.statements.get(stmt) {
                        self.open.uses.push((stmt.to_vec(), Arc::clone(&st.parse)));
                    }
                }
            }
            b'E' => {
                self.store(msg, false);
                self.syncs_since_execute = 0;
                let mut b = body;
                let Ok(portal) = take_cstr(&mut b) else {
                    return;
                };
                let capturing = self.capturing;
                let rules = &self.rules;
                let st = self
                    .portals
                    .get(portal)
                    .and_then(|s| self.statements.get_mut(s))
                    .map(|s| {
                        if !s.classified && capturing {
                            s.class = statement_class(rules, &s.text);
                            s.classified = true;
                        }
                        (s.class.clone(), Arc::clone(&s.text))
                    });
                match st {
                    Some((class, text)) => self.statement(&text, class),
                    // Unknown portal: the source will say; assume a write.
                    None => self.open.write = true,
                }
            }
            b'C' => {
                self.store(msg, false);
                let mut b = body;
                if let (Some(&kind), true) = (b.first(), b.len() > 1) {
                    b = &b[1..];
                    if let Ok(name) = take_cstr(&mut b) {
                        if kind == b'S' {
                            if let Some(old) = self.statements.remove(name) {
                                self.statement_bytes -= old.parse.len();
                            }
                        } else {
                            self.portals.remove(name);
                        }
                    }
                }
            }
            b'S' => {
                self.store(msg, false);
                self.syncs_since_execute += 1;
                self.close_segment();
                self.maybe_arm();
            }
            b'F' => {
                // Fast-path function calls are large-object writes in practice.
                self.store(msg, false);
                self.open.write = true;
                self.close_segment();
                self.maybe_arm();
            }
            b'd' => self.store(msg, true),
            b'c' | b'f' => {
                // The Syncs sent after the Execute that began a COPY were
                // ignored by the server: they do not end a request.
                let k = std::mem::take(&mut self.syncs_since_execute).min(self.closed.len());
                if k > 0 {
                    let mut merged = Seg::default();
                    for s in self.closed.drain(self.closed.len() - k..) {
                        merged.extend(s);
                    }
                    merged.extend(std::mem::take(&mut self.open));
                    self.open = merged;
                }
                self.store(msg, true);
            }
            b'X' => {}
            _ => self.store(msg, false), // Describe, Flush
        }
    }

    fn query(&mut self, text: &str) {
        if self.dormant(text) {
            // Taken for a write: should mirroring come back on before this
            // unit ends, it is replayed whole (replaying a read is
            // harmless, missing a write is not).
            self.open.write = true;
            return;
        }
        let classes = classify(&self.rules, text);
        // CapturedStatement texts matter only for session state; split only then.
        let parts = if classes.len() > 1 && classes.iter().any(|c| matches!(c, Class::Session(_))) {
            crate::classify::lexer::split(text).unwrap_or_default()
        } else {
            Vec::new()
        };
        for (i, class) in classes.iter().enumerate() {
            let part = parts
                .get(i)
                .filter(|_| parts.len() == classes.len())
                .copied()
                .unwrap_or(text);
            self.statement(part, class.clone());
        }
    }

    /// Whether `text` goes unclassified: mirroring is off (as of the last
    /// server message), and the statement cannot change the session state
    /// the capture keeps for when it comes back on (settings, SQL-level
    /// prepared statements) or commit on its own (CALL, DO). A unit is
    /// mirrored only if mirroring is on when it ends, so while it is off
    /// a session pays for a look at each statement's first word, not for a
    /// classification.
    fn dormant(&self, text: &str) -> bool {
        self.dormant_bytes(text.as_bytes())
    }

    /// `dormant` on the text as sent (before any UTF-8 check: the words it
    /// looks for are ASCII).
    fn dormant_bytes(&self, text: &[u8]) -> bool {
        !self.capturing
            && !crate::classify::starts_with_word(text, crate::classify::SESSION_OP_WORDS)
    }

    /// One statement executed in the open segment.
    fn statement(&mut self, text: &str, class: Class) {
        if class == Class::Write && first_word_is(text, &["call", "do"]) {
            self.open.self_committing = true;
        }
        match class {
            Class::Write => self.open.write = true,
            Class::Read(r) if r.calls => self.open.calls = true,
            Class::TxnControl => {
                self.open.commitish = true;
                // PREPARE TRANSACTION: even a transaction that wrote nothing
                // must exist, prepared, on the target, for the COMMIT or
                // ROLLBACK PREPARED that follows (mirrored as a write).
                if first_word_is(text, &["prepare"]) {
                    self.open.write = true;
                }
            }
            Class::Execute { name } if self.sql_prepared.get(&name).copied().unwrap_or(true) => {
                self.open.write = true
            }
            Class::Session(op) => {
                match &op {
                    SessionOp::Prepare { name, body } => {
                        self.sql_prepared.insert(name.clone(), body.is_write());
                    }
                    SessionOp::Deallocate { name: Some(n) } => {
                        self.sql_prepared.remove(n);
                    }
                    SessionOp::Deallocate { name: None } => self.sql_prepared.clear(),
                    SessionOp::Discard { all, temp } => {
                        if *all {
                            self.sql_prepared.clear();
                        }
                        // The target connection may hold this session's temp
                        // tables: it must drop them too.
                        if *temp && self.mirrored_any {
                            self.open.write = true;
                        }
                    }
                    _ => {}
                }
                self.open.session.push((text.to_string(), op));
            }
            _ => {}
        }
    }

    /// Sees a message from the source that matters to the mirror; returns
    /// a finished unit at an idle ReadyForQuery.
    pub fn server_message(&mut self, tag: u8, body: &[u8], mirror_on: bool) -> Finished {
        self.capturing = mirror_on;
        match tag {
            b'C' => {
                let t = crate::protocol::text_lossy(body.strip_suffix(b"\0").unwrap_or(body));
                if t == "COMMIT" || t == "PREPARE TRANSACTION" || t == "COMMIT PREPARED" {
                    self.unit_commit = true;
                }
                let mut tag = self.spares.strings.pop().unwrap_or_default();
                tag.push_str(&t);
                self.outcomes.push(Outcome::Complete(tag));
            }
            b'E' => {
                let code = parse_error_fields(body).code.unwrap_or("XX000").to_string();
                self.unit_error = true;
                self.outcomes.push(Outcome::Error(code));
            }
            b'I' => self.outcomes.push(Outcome::Empty),
            b's' => self.outcomes.push(Outcome::Suspended),
            b'Z' => {
                let status = body.first().copied().unwrap_or(b'I');
                self.in_block = status != b'I';
                return self.ready(status, mirror_on);
            }
            _ => {}
        }
        Finished::Nothing
    }

    fn ready(&mut self, status: u8, mirror_on: bool) -> Finished {
        let Some(seg) = self.closed.pop_front() else {
            // A ReadyForQuery we cannot match to a request: start over
            // rather than mirror something misaligned.
            self.desyncs += 1;
            self.reset_unit();
            return Finished::Nothing;
        };
        self.unit_write |= seg.write;
        self.unit_calls |= seg.calls;
        let seg_self_committing = seg.self_committing;
        self.unit_session.extend(seg.session);
        self.unit_uses.extend(seg.uses);
        let ended_rollback =
            matches!(self.outcomes.last(), Some(Outcome::Complete(t)) if t == "ROLLBACK");
        self.unit.push(Segment {
            messages: seg.bytes,
            status,
            outcomes: std::mem::replace(
                &mut self.outcomes,
                self.spares.outcomes.pop().unwrap_or_default(),
            ),
        });
        if status != b'I' {
            return Finished::Nothing;
        }
        // The unit is over. Did any of it commit on the source? A CALL or
        // DO outside a block may have committed part of its work before it
        // failed: it is replayed the same way, failure included (the
        // outcome check compares the error).
        let self_committing = self.unit.len() == 1 && seg_self_committing;
        let committed =
            self.unit_commit || (!self.unit_error && !ended_rollback) || self_committing;
        // A unit wrote when the classifier saw a write, or when the source
        // gave it a transaction id (a function that writes). One that called
        // functions that may write and got no probe (a routed read that fell
        // back, a pipelined request) is mirrored too: replaying a read is
        // harmless, missing a write is not.
        let wrote =
            self.unit_write || self.unit_xid.is_some() || (self.unit_calls && !self.unit_probed);
        let pre_version = self.state_version;
        // The record carries the state from before the unit: the unit's own
        // SETs and PREPAREs are replayed with it.
        let pre_state: Vec<Vec<u8>> = if committed && wrote && mirror_on {
            self.state
                .iter()
                .map(|(_, t)| t.clone().into_bytes())
                .collect()
        } else {
            Vec::new()
        };
        if committed {
            let ops = std::mem::take(&mut self.unit_session);
            for (text, op) in ops {
                self.apply_state(text, op);
            }
        }
        let result = if committed && wrote && mirror_on {
            if self.overflow {
                Finished::Lost {
                    bytes: self.unit_bytes,
                }
            } else {
                self.mirrored_any = true;
                let prepared = dedup_prepared(std::mem::take(&mut self.unit_uses));
                Finished::Mirror(Box::new(MirroredUnit {
                    seq: 0,
                    session: self.session,
                    committed_at_us: now_us(),
                    startup: self.startup.clone(),
                    state_version: pre_version,
                    state: pre_state,
                    post_state_version: self.state_version,
                    prepared,
                    segments: std::mem::take(&mut self.unit),
                    xid: self.unit_xid,
                    recovered: false,
                    order: OrderKey {
                        lsn: self.unit_lsn,
                        own: self
                            .journal
                            .as_ref()
                            .filter(|_| self.arm_no != 0)
                            .map(|(_, slot)| (*slot, self.arm_no)),
                        ..OrderKey::default()
                    },
                }))
            }
        } else {
            Finished::Nothing
        };
        self.reset_unit();
        result
    }

    fn apply_state(&mut self, text: String, op: SessionOp) {
        match op {
            SessionOp::Set => {
                self.state.retain(|(_, t)| *t != text);
                self.state.push((None, text));
            }
            SessionOp::ResetAll => self.state.retain(|(p, _)| p.is_some()),
            SessionOp::Discard { all: true, .. } => self.state.clear(),
            SessionOp::Prepare { name, .. } => {
                self.state.retain(|(p, _)| p.as_deref() != Some(&name));
                self.state.push((Some(name), text));
            }
            SessionOp::Deallocate { name: Some(n) } => {
                self.state.retain(|(p, _)| p.as_deref() != Some(&n))
            }
            SessionOp::Deallocate { name: None } => self.state.retain(|(p, _)| p.is_none()),
            SessionOp::SetLocal | SessionOp::SourceOnly | SessionOp::Discard { .. } => return,
        }
        if self.state.len() > MAX_STATE {
            self.state.remove(0);
        }
        self.state_version += 1;
    }

    fn reset_unit(&mut self) {
        for seg in self.unit.drain(..) {
            self.spares.keep(seg);
        }
        self.unit_lsn = None;
        self.unit_xid = None;
        self.unit_probed = false;
        self.unit_write = false;
        self.unit_calls = false;
        self.unit_commit = false;
        self.unit_error = false;
        self.unit_session.clear();
        self.unit_uses.clear();
        self.unit_parsed.clear();
        self.unit_bytes =
            self.open.bytes.len() + self.closed.iter().map(|s| s.bytes.len()).sum::<usize>();
        self.overflow = false;
        self.portals.retain(|p, _| !p.is_empty());
    }
}

/// Whether the text starts with one of `words` (lower-case).
fn first_word_is(sql: &str, words: &[&str]) -> bool {
    crate::classify::first_word(sql.as_bytes())
        .is_some_and(|w| words.iter().any(|k| w.eq_ignore_ascii_case(k.as_bytes())))
}

/// Each (name, Parse message) once.
fn dedup_prepared(uses: Vec<(Vec<u8>, Arc<[u8]>)>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut prepared: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for (name, parse) in uses {
        if !prepared
            .iter()
            .any(|(n, p)| *n == name && p[..] == parse[..])
        {
            prepared.push((name, parse.to_vec()));
        }
    }
    prepared
}

/// A Query's text: its body up to the terminator.
fn cstr_bytes(body: &[u8]) -> &[u8] {
    let end = memchr::memchr(0, body).unwrap_or(body.len());
    &body[..end]
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some((journal, slot)) = &self.journal {
            journal.release(*slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(sql: &str) -> Vec<u8> {
        let mut m = vec![b'Q'];
        m.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        m.extend_from_slice(sql.as_bytes());
        m.push(0);
        m
    }

    /// The source's answer to one simple Query: its tag, then ReadyForQuery.
    fn answer(c: &mut Capture, tag: &str, status: u8) -> Finished {
        let mut body = tag.as_bytes().to_vec();
        body.push(0);
        assert!(matches!(
            c.server_message(b'C', &body, true),
            Finished::Nothing
        ));
        c.server_message(b'Z', &[status], true)
    }

    /// A fresh journal in a temporary directory.
    fn journal() -> (tempfile::TempDir, Arc<InFlight>) {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = InFlight::open(dir.path()).unwrap();
        (dir, Arc::new(journal))
    }

    /// Runs `statement` one request at a time inside BEGIN, with the source
    /// answering `tag`: the session is then in a block that wrote.
    fn block_with(c: &mut Capture, statement: &str, tag: &str) {
        c.client_bytes(&query("BEGIN"));
        answer(c, "BEGIN", b'T');
        c.client_bytes(&query(statement));
        assert_eq!(c.armed_at_us, 0, "a write inside a block cannot commit");
        answer(c, tag, b'T');
    }

    fn capture(journal: &Arc<InFlight>) -> Capture {
        Capture::new(
            Arc::new(Rules::new(&[])),
            7,
            vec![(b"user".to_vec(), b"u".to_vec())],
            1 << 20,
            Some(Arc::clone(journal)),
        )
    }

    /// One simple Query and the source's answer, with mirroring `on` or off.
    fn request(c: &mut Capture, sql: &str, tag: &str, status: u8, on: bool) -> Finished {
        c.client_bytes(&query(sql));
        let mut body = tag.as_bytes().to_vec();
        body.push(0);
        c.server_message(b'C', &body, on);
        c.server_message(b'Z', &[status], on)
    }

    #[test]
    fn a_reparsed_unchanged_statement_is_kept_and_a_changed_one_replaces_it() {
        let (_dir, journal) = journal();
        let mut c = capture(&journal);
        let message = |tag: u8, body: &[u8]| {
            let mut m = vec![tag];
            m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
            m.extend_from_slice(body);
            m
        };
        let parse = |sql: &str| message(b'P', format!("\0{sql}\0\0\0").as_bytes());
        // Mirroring on, as of the last server message.
        request(&mut c, "SELECT 1", "SELECT 1", b'I', true);
        c.client_bytes(&parse("INSERT INTO t VALUES (1)"));
        let first = Arc::clone(&c.statements[&b""[..]].parse);
        c.client_bytes(&parse("INSERT INTO t VALUES (1)"));
        assert!(
            Arc::ptr_eq(&first, &c.statements[&b""[..]].parse),
            "the same Parse again is not copied again"
        );
        let changed = parse("INSERT INTO t VALUES (2)");
        c.client_bytes(&changed);
        assert_eq!(&*c.statements[&b""[..]].text, "INSERT INTO t VALUES (2)");
        assert_eq!(c.statement_bytes, changed.len());
        // The unit that re-parsed, bound and executed it is mirrored with
        // its three Parses, in order.
        c.client_bytes(&message(b'B', b"\0\0\0\0\0\0\0\0"));
        c.client_bytes(&message(b'E', b"\0\0\0\0\0"));
        c.client_bytes(&message(b'S', b""));
        for tag in [b'1', b'1', b'1', b'2'] {
            c.server_message(tag, b"", true);
        }
        c.server_message(b'C', b"INSERT 0 1\0", true);
        let Finished::Mirror(rec) = c.server_message(b'Z', b"I", true) else {
            panic!("an executed INSERT is mirrored");
        };
        let bytes: Vec<u8> = rec
            .segments
            .iter()
            .flat_map(|s| s.messages.clone())
            .collect();
        let at = |m: &[u8]| bytes.windows(m.len()).position(|w| w == m);
        let first_at = at(&parse("INSERT INTO t VALUES (1)")).expect("the first Parse");
        assert!(at(&changed).expect("the changed Parse") > first_at);
    }

    #[test]
    fn buffers_of_units_not_mirrored_are_reused_and_carry_nothing_over() {
        let (_dir, journal) = journal();
        let mut c = capture(&journal);
        // Reads (not mirrored) and units while mirroring is off leave their
        // buffers behind, with a long text and several outcomes in them.
        let long = format!("SELECT '{}'", "x".repeat(1000));
        for on in [true, false, true] {
            request(&mut c, &long, "SELECT 1", b'I', on);
            c.client_bytes(&query("SELECT 1; SELECT 2; SELECT 3"));
            for _ in 0..3 {
                c.server_message(b'C', b"SELECT 1\0", on);
            }
            assert!(matches!(
                c.server_message(b'Z', b"I", on),
                Finished::Nothing
            ));
        }
        assert!(!c.spares.bytes.is_empty() && !c.spares.strings.is_empty());
        // The next mirrored unit has exactly its own messages and outcomes.
        request(&mut c, "BEGIN", "BEGIN", b'T', true);
        request(&mut c, "INSERT INTO t VALUES (1)", "INSERT 0 1", b'T', true);
        let Finished::Mirror(rec) = request(&mut c, "COMMIT", "COMMIT", b'I', true) else {
            panic!("a committed INSERT is mirrored");
        };
        let got: Vec<(Vec<u8>, Vec<String>)> = rec
            .segments
            .iter()
            .map(|s| {
                (
                    s.messages.clone(),
                    s.outcomes.iter().map(|o| o.to_string()).collect(),
                )
            })
            .collect();
        let want: Vec<(Vec<u8>, Vec<String>)> = [
            ("BEGIN", "BEGIN"),
            ("INSERT INTO t VALUES (1)", "INSERT 0 1"),
            ("COMMIT", "COMMIT"),
        ]
        .iter()
        .map(|(q, t)| {
            (
                query(q),
                vec![Outcome::Complete((*t).to_string()).to_string()],
            )
        })
        .collect();
        assert_eq!(got, want);
        // A buffer that grew past the bound is not kept.
        assert!(c
            .spares
            .bytes
            .iter()
            .all(|b| b.is_empty() && b.capacity() <= SPARE_MAX_BYTES));
    }

    #[test]
    fn while_mirroring_is_off_only_session_statements_are_classified() {
        let (_dir, journal) = journal();
        let mut c = capture(&journal);
        // Mirroring goes off.
        assert!(matches!(
            request(&mut c, "SELECT 1", "SELECT 1", b'I', false),
            Finished::Nothing
        ));
        // A read is not classified: it is taken for a write, unmirrored
        // since mirroring is off when its unit ends.
        c.client_bytes(&query("SELECT * FROM t"));
        assert!(
            c.closed.back().is_some_and(|s| s.write),
            "unclassified counts as a write"
        );
        assert!(!c.wrote(), "but nothing is written while off");
        c.server_message(b'C', b"SELECT 3\0", false);
        assert!(matches!(
            c.server_message(b'Z', b"I", false),
            Finished::Nothing
        ));
        // Session state is still followed: the SET reaches the next unit.
        request(&mut c, "SET search_path = app", "SET", b'I', false);
        // A statement prepared while off is classified when it runs with
        // mirroring on: a read prepared then stays unmirrored.
        let mut parse = vec![b'P'];
        let body = b"r\0SELECT * FROM t\0\0\0";
        parse.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        parse.extend_from_slice(body);
        c.client_bytes(&parse);
        assert!(!c.statements[&b"r"[..]].classified);
        // A unit that began while off and ends with mirroring on is
        // mirrored whole, its unclassified read included.
        request(&mut c, "BEGIN", "BEGIN", b'T', false);
        request(&mut c, "SELECT count(*) FROM t", "SELECT 1", b'T', false);
        let Finished::Mirror(rec) = request(&mut c, "COMMIT", "COMMIT", b'I', true) else {
            panic!("a unit spanning the switch is mirrored");
        };
        assert_eq!(rec.segments.len(), 3);
        assert!(
            rec.state.iter().any(|s| s == b"SET search_path = app"),
            "the SET made while off is replayed before the unit"
        );
        // Mirroring on: a read is classified and not mirrored.
        assert!(matches!(
            request(&mut c, "SELECT * FROM t", "SELECT 3", b'I', true),
            Finished::Nothing
        ));
        let mut bind = vec![b'B'];
        let body = b"\0r\0\0\0\0\0\0\0";
        bind.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        bind.extend_from_slice(body);
        c.client_bytes(&bind);
        c.client_bytes(b"E\0\0\0\x09\0\0\0\0\0S\0\0\0\x04");
        assert!(c.statements[&b"r"[..]].classified);
        c.server_message(b'2', b"", true);
        c.server_message(b'C', b"SELECT 3\0", true);
        assert!(matches!(
            c.server_message(b'Z', b"I", true),
            Finished::Nothing
        ));
    }

    #[test]
    fn a_commit_in_flight_is_armed_and_settles_once_spooled() {
        let (dir, journal) = journal();

        // An explicit block: only the COMMIT may commit, so only it arms.
        let mut c = capture(&journal);
        block_with(&mut c, "UPDATE t SET v = 1", "UPDATE 1");
        c.client_bytes(&query("COMMIT"));
        assert_ne!(c.armed_at_us, 0, "the COMMIT may commit the write");
        let Finished::Mirror(rec) = answer(&mut c, "COMMIT", b'I') else {
            panic!("the committed block is mirrored");
        };
        assert_eq!(rec.segments.len(), 3);
        c.settle(1);
        assert_eq!(c.armed_at_us, 0);

        // A read never arms; an autocommit write does, before it is sent.
        c.client_bytes(&query("SELECT 1"));
        assert_eq!(c.armed_at_us, 0);
        answer(&mut c, "SELECT 1", b'I');
        c.client_bytes(&query("INSERT INTO t VALUES (2)"));
        assert_ne!(c.armed_at_us, 0);
        // The process dies here: no settle, no Drop.
        std::mem::forget(c);
        drop(journal);

        // The journal holds the whole unit; the block settled as spool
        // record 1 comes back for the spool to confirm.
        let (_, left) = InFlight::open(dir.path()).unwrap();
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(left[0].spooled_as, Some(1));
        assert_eq!(left[1].spooled_as, None);
        assert_eq!(left[1].session, 7);
        assert_eq!(left[1].statements, "INSERT INTO t VALUES (2)");
        let unit = left[1].unit.as_ref().expect("the unit, whole");
        assert_eq!(unit.segments.len(), 1);
        assert_eq!(unit.param("user"), Some("u"));
    }

    #[test]
    fn a_session_ending_with_a_commit_in_flight_reports_it() {
        let (_dir, journal) = journal();
        let mut c = capture(&journal);
        block_with(&mut c, "DELETE FROM t", "DELETE 3");
        c.client_bytes(&query("COMMIT"));
        // The source connection drops before the answer.
        let d = c.end().expect("in doubt");
        assert_eq!(d.statements, "BEGIN; DELETE FROM t; COMMIT");
        assert_eq!(d.unit.as_ref().map(|u| u.segments.len()), Some(3));
        assert!(c.end().is_none(), "reported once");
        c.forget_in_doubt();
        // A failed block arms at COMMIT and is not mirrored.
        let mut c = capture(&journal);
        c.client_bytes(&query("BEGIN"));
        answer(&mut c, "BEGIN", b'T');
        c.client_bytes(&query("UPDATE t SET v = 1/0"));
        c.server_message(b'E', b"SERROR\0C22012\0Mdivision by zero\0\0", true);
        assert!(matches!(
            c.server_message(b'Z', b"E", true),
            Finished::Nothing
        ));
        c.client_bytes(&query("COMMIT"));
        assert!(matches!(
            answer(&mut c, "ROLLBACK", b'I'),
            Finished::Nothing
        ));
        c.settle(0);
        assert!(c.end().is_none());
    }
}
