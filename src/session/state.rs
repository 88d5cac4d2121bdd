//! Per-session state the proxy keeps from the traffic it forwards, and the
//! two inspectors that keep it up to date.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

use super::forward::{Hold, Inspector, Verdict};
use crate::mirror::capture::{Capture, Finished};
use crate::mirror::order::{self, Probe, Shape, Step};
use crate::mirror::unit::MirroredUnit;
use crate::mirror::{Mirror, Spooled};
use crate::protocol::error::parse_error_fields;
use crate::protocol::frame::HEADER_LEN;
use crate::protocol::message::{
    is_frontend_tag, parse_close, parse_parse, parse_query, parse_ready_for_query, BIND, CLOSE,
    COPY_DONE, COPY_FAIL, DESCRIBE, ERROR_RESPONSE, EXECUTE, FLUSH, FUNCTION_CALL, PARSE, QUERY,
    READY_FOR_QUERY, SYNC, TERMINATE,
};
use crate::protocol::FrameError;
use crate::router::decide::{BatchStep, Decider, QueryRoute, RouteLink};
use crate::router::RouteMetrics;
use crate::tracker::{PreparedStatements, Shared};

/// Client -> source: validates message types, counts requests, and tracks
/// prepared statements.
pub struct FrontendInspector<'a> {
    pub shared: &'a Shared,
    pub statements: &'a mut PreparedStatements,
    pub max_inspected: usize,
    /// Syncs sent since the last Execute or Query. Postgres ignores Syncs
    /// that reach it during COPY FROM STDIN, and a driver sends one right
    /// after the Execute that starts the copy: those get no ReadyForQuery
    /// and are taken back out of `in_flight` when the copy ends.
    syncs_since_execute: u32,
    /// The mirror's view of this session, when mirroring is configured.
    pub capture: Option<&'a Mutex<Capture>>,
    pub mirror: Option<&'a Mirror>,
    /// An autocommit extended-protocol write that may get an order probe
    /// before its Sync.
    plan: Option<ProbePlan>,
    /// Read routing, when the proxy has a target.
    pub route: Option<Decider<'a>>,
    /// The session's recording for replay, when one is on.
    pub record: Option<&'a crate::record::SessionRecorder>,
    /// Client messages seen (the mirror counts the same way).
    msg_no: u64,
    /// This run holds bytes for the source.
    run_source: bool,
    /// The client sent Terminate: it goes to the source at once, without
    /// waiting for a routed answer nobody will read, so the source backend
    /// leaves as soon as it would without the proxy.
    terminating: bool,
}

/// What the messages of an extended-protocol request held so far, to know
/// at its Sync whether a probe fits: one Execute of an INSERT, UPDATE,
/// DELETE or MERGE, and nothing but Parse, Bind, Describe, Execute, Close
/// and Flush.
#[derive(Debug, Default)]
struct ProbePlan {
    /// Messages that each get one completion (ParseComplete, ...).
    completions: u32,
    executes: u32,
    fits: bool,
    /// Outside a block: the probe gives the order key too.
    orders: bool,
}

impl<'a> FrontendInspector<'a> {
    pub fn new(
        shared: &'a Shared,
        statements: &'a mut PreparedStatements,
        max_inspected: usize,
    ) -> Self {
        Self {
            shared,
            statements,
            max_inspected,
            syncs_since_execute: 0,
            capture: None,
            mirror: None,
            record: None,
            plan: None,
            route: None,
            msg_no: 0,
            run_source: false,
            terminating: false,
        }
    }

    /// Whether this message starts a request with nothing else in flight
    /// (only then is the capture's view current, and the block status known).
    fn at_request_start(&self) -> bool {
        self.capture.is_some()
            && self.shared.in_flight.load(Relaxed) == 0
            && !self.shared.mid_batch.load(Relaxed)
    }

    /// Decides on an order probe for a request starting with a statement
    /// whose text is `sql`. A COMMIT of a block that wrote gets the probe
    /// first in its request, or as a request of its own while the probe is
    /// not yet known to work for this user and database; an autocommit
    /// write (`Shape::Dml`, which the caller handles) gets one only where it
    /// is known to work. Until that is known, the session's first request
    /// is preceded by a probe that only checks.
    fn probe_for_start(&mut self, sql: &[u8], extended: bool) -> Option<(Shape, Verdict)> {
        let capture = self.capture?;
        let status = self.shared.tx_status.load(Relaxed);
        let mut c = capture.lock().unwrap_or_else(|p| p.into_inner());
        if !c.capturing() {
            return None;
        }
        let own_request = || {
            if extended {
                order::extended(true)
            } else {
                order::standalone_query()
            }
        };
        if c.probe_works.is_none() {
            c.probe_works = self.mirror.and_then(|m| m.probe_works(&c.probe_key));
        }
        if c.probe_works.is_none() && !c.probe_check {
            c.probe_check = true;
            c.probe = Probe::Standalone;
            self.shared.probe_active.store(true, Relaxed);
            return Some((Shape::Other, Verdict::Before(own_request())));
        }
        if c.probe_works == Some(false) || status == b'E' {
            return None;
        }
        let shape = order::shape(std::str::from_utf8(sql).ok()?);
        match shape {
            // Where the probe is known to work, it goes first in the
            // client's own request: one answer flush instead of two.
            Shape::Commit if status == b'T' && c.wrote() && c.probe_works == Some(true) => {
                self.shared.probe_active.store(true, Relaxed);
                c.probe_orders = true;
                if extended {
                    c.probe = Probe::Leading {
                        left: order::EXTENDED_ANSWERS,
                    };
                    Some((shape, Verdict::Before(order::extended(false))))
                } else {
                    c.probe = Probe::Leading {
                        left: order::PREPENDED_ANSWERS,
                    };
                    Some((shape, Verdict::Replace(order::prepended_query(sql))))
                }
            }
            Shape::Commit if status == b'T' && c.wrote() => {
                c.probe = Probe::Standalone;
                c.probe_orders = true;
                self.shared.probe_active.store(true, Relaxed);
                Some((shape, Verdict::Before(own_request())))
            }
            // An autocommit write (or a read calling functions that may
            // write) gets its order key and transaction id after it; a
            // write inside a block, its transaction id, so that a crash
            // while its COMMIT is on the way can be resolved.
            s if s.takes_trailing_probe()
                && c.probe_works == Some(true)
                && (status == b'I' || c.xid().is_none()) =>
            {
                Some((shape, Verdict::Forward))
            }
            _ => None,
        }
    }

    /// Follows an extended-protocol message for the pending plan.
    fn plan_message(&mut self, tag: u8, statement: Option<&[u8]>) {
        let Some(plan) = self.plan.as_mut() else {
            return;
        };
        match tag {
            PARSE | DESCRIBE | CLOSE => plan.completions += 1,
            BIND => {
                plan.completions += 1;
                let dml = statement
                    .and_then(|name| self.statements.get(name))
                    .and_then(|q| std::str::from_utf8(q).ok())
                    .is_some_and(|q| order::shape(q).takes_trailing_probe());
                plan.fits &= dml;
            }
            EXECUTE => {
                plan.completions += 1;
                plan.executes += 1;
            }
            FLUSH | SYNC => {}
            _ => plan.fits = false,
        }
    }

    /// At the Sync: the probe goes before it when the request fits.
    fn plan_sync(&mut self) -> Verdict {
        let Some(plan) = self.plan.take() else {
            return Verdict::Forward;
        };
        let Some(capture) = self.capture else {
            return Verdict::Forward;
        };
        if !plan.fits || plan.executes != 1 {
            return Verdict::Forward;
        }
        let mut c = capture.lock().unwrap_or_else(|p| p.into_inner());
        c.probe = Probe::Trailing {
            left: plan.completions,
            extended: true,
        };
        c.probe_orders = plan.orders;
        self.shared.probe_active.store(true, Relaxed);
        Verdict::Before(order::extended(false))
    }

    /// The statement name a Bind refers to (from its first bytes).
    fn bind_statement(prefix: &[u8]) -> Option<&[u8]> {
        let mut b = prefix;
        let _portal = crate::protocol::message::take_cstr(&mut b).ok()?;
        crate::protocol::message::take_cstr(&mut b).ok()
    }
}

impl FrontendInspector<'_> {
    /// Nothing in flight on the source, outside a block and a batch: a
    /// request starting now may go to the target.
    fn source_idle(&self) -> bool {
        let s = self.shared;
        s.in_flight.load(Relaxed) == 0
            && s.tx_status.load(Relaxed) == b'I'
            && !s.mid_batch.load(Relaxed)
    }

    /// Every client message: a type a client may send, counted for idle
    /// detection and numbered as the mirror numbers them.
    fn saw_message(&mut self, tag: u8) -> Result<(), FrameError> {
        if !is_frontend_tag(tag) {
            return Err(FrameError::UnknownType(tag));
        }
        let s = self.shared;
        s.client_messages
            .store(s.client_messages.load(Relaxed) + 1, Relaxed);
        self.msg_no += 1;
        Ok(())
    }

    /// The mirror must not see client message `n`: it went to the target.
    fn hide(&self, n: u64) {
        if let Some(c) = self.capture {
            c.lock().unwrap_or_else(|p| p.into_inner()).hide(n);
        }
    }

    /// Held messages go to the source just before the current message:
    /// the mirror sees them there, and the request counters catch up.
    /// Returns the frames as the source gets them: with the Parse of a
    /// statement the source has not got put before the Bind or Describe
    /// that uses it.
    fn released(&mut self, frames: Bytes) -> Bytes {
        if frames.is_empty() {
            return frames;
        }
        let mut out: Option<BytesMut> = None;
        let mut at = 0;
        while let Ok(Some(h)) =
            crate::protocol::frame::decode_header(&frames[at..], usize::MAX >> 1)
        {
            if frames.len() - at < h.frame_len() {
                break;
            }
            let frame = &frames[at..at + h.frame_len()];
            if let Some(p) = self.reparse_if_stale(h.tag, &frame[HEADER_LEN..]) {
                let o = out.get_or_insert_with(|| BytesMut::from(&frames[..at]));
                o.extend_from_slice(&p);
            }
            if let Some(o) = out.as_mut() {
                o.extend_from_slice(frame);
            }
            self.count(h.tag);
            at += h.frame_len();
        }
        let frames = match out {
            Some(mut o) => {
                o.extend_from_slice(&frames[at..]);
                o.freeze()
            }
            None => frames,
        };
        if let Some(c) = self.capture {
            c.lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert_before(self.msg_no, frames.clone());
        }
        frames
    }

    /// A Bind or Describe of a statement the source has not got (parsed in
    /// a routed batch or inside the routed transaction): the Parse the
    /// source gets first (its answer is dropped).
    fn reparse_if_stale(&self, tag: u8, body: &[u8]) -> Option<Bytes> {
        let r = self.route.as_ref()?;
        if !matches!(tag, BIND | DESCRIBE) || !r.link.any_source_stale.load(Relaxed) {
            return None;
        }
        let name = match tag {
            BIND => Self::bind_statement(body),
            _ => body
                .strip_prefix(b"S")
                .and_then(|b| b.iter().position(|&c| c == 0).map(|end| &b[..end])),
        }?;
        if !r.link.take_source_stale(name) {
            return None;
        }
        let st = self.statements.statement(name)?;
        let mut f = BytesMut::new();
        crate::protocol::message::put_message(
            &mut f,
            PARSE,
            &[name, b"\0", &st.query, b"\0", &st.types],
        );
        let l = r.link;
        l.drop_parse_complete
            .store(l.drop_parse_complete.load(Relaxed) + 1, Relaxed);
        Some(f.freeze())
    }

    /// Request bookkeeping for a message the source gets (everything but
    /// Query, Parse and Close, which `inspect_source` counts).
    fn count(&mut self, tag: u8) {
        let s = self.shared;
        match tag {
            SYNC => {
                s.add_in_flight(1);
                s.mid_batch.store(false, Relaxed);
                self.syncs_since_execute += 1;
            }
            FUNCTION_CALL => s.add_in_flight(1),
            EXECUTE => {
                s.mid_batch.store(true, Relaxed);
                self.syncs_since_execute = 0;
            }
            BIND | DESCRIBE | FLUSH | PARSE | CLOSE => s.mid_batch.store(true, Relaxed),
            COPY_DONE | COPY_FAIL => {
                s.sub_in_flight(self.syncs_since_execute);
                self.syncs_since_execute = 0;
            }
            _ => {}
        }
    }

    /// A streamed message (or a non-inspected one shown whole) bound for
    /// the source.
    fn header_source(&mut self, tag: u8, prefix: &[u8]) -> Verdict {
        let mut verdict = Verdict::Forward;
        let reparse = self.reparse_if_stale(tag, prefix);
        if let (Some(f), Some(c)) = (&reparse, self.capture) {
            c.lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert_before(self.msg_no, f.clone());
        }
        if self.route.is_some() && tag != PARSE {
            let at_start = self.source_idle();
            let name = (tag == BIND)
                .then(|| Self::bind_statement(prefix))
                .flatten();
            let statements = &*self.statements;
            if let Some(r) = self.route.as_mut() {
                // The statement is looked up only if the batch is followed.
                r.observe_source(tag, at_start, |r| {
                    name.and_then(|n| statements.get(n).map(|t| r.statement_is_read(n, t)))
                        .unwrap_or(false)
                });
            }
        }
        if self.capture.is_some() {
            let statement = if tag == BIND {
                Self::bind_statement(prefix)
            } else {
                None
            };
            if tag == BIND && self.at_request_start() {
                self.plan = None;
                let text = statement.and_then(|n| self.statements.get(n)).cloned();
                if let Some((shape, v)) = text.and_then(|t| self.probe_for_start(&t, true)) {
                    verdict = v;
                    if shape.takes_trailing_probe() {
                        self.plan = Some(ProbePlan {
                            fits: true,
                            orders: self.shared.tx_status.load(Relaxed) == b'I',
                            ..ProbePlan::default()
                        });
                    }
                }
            }
            self.plan_message(tag, statement);
            if tag == SYNC {
                verdict = self.plan_sync();
            }
        }
        self.count(tag);
        match reparse {
            Some(f) => before(f, verdict),
            None => verdict,
        }
    }

    /// A Query, Parse, Close or Terminate bound for the source.
    fn inspect_source(&mut self, tag: u8, body: &[u8]) -> Result<Verdict, FrameError> {
        let s = self.shared;
        let mut verdict = Verdict::Forward;
        match tag {
            QUERY => {
                let text = parse_query(body)?;
                if let Some(r) = self.route.as_mut() {
                    r.source_statement(text);
                }
                if self.at_request_start() {
                    match self.probe_for_start(text, false) {
                        Some((shape, _)) if shape.takes_trailing_probe() => {
                            if let Some(c) = self.capture {
                                let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
                                c.probe = Probe::Trailing {
                                    left: 1,
                                    extended: false,
                                };
                                c.probe_orders = s.tx_status.load(Relaxed) == b'I';
                                s.probe_active.store(true, Relaxed);
                                verdict = Verdict::Replace(order::appended_query(body));
                            }
                        }
                        Some((_, v)) => verdict = v,
                        None => {}
                    }
                }
                self.plan = None;
                s.add_in_flight(1);
                self.syncs_since_execute = 0;
            }
            PARSE => {
                let (name, query) = parse_parse(body)?;
                let at_start = self.source_idle();
                if let Some(r) = self.route.as_mut() {
                    r.source_statement(query);
                    r.observe_source(PARSE, at_start, |r| r.is_read(query));
                }
                if self.at_request_start() {
                    self.plan = None;
                    if let Some((shape, v)) = self.probe_for_start(query, true) {
                        verdict = v;
                        if shape.takes_trailing_probe() {
                            self.plan = Some(ProbePlan {
                                fits: true,
                                orders: s.tx_status.load(Relaxed) == b'I',
                                ..ProbePlan::default()
                            });
                        }
                    }
                }
                s.mid_batch.store(true, Relaxed);
                let types = &body[name.len() + query.len() + 2..];
                self.statements.on_parse_typed(name, query, types);
                if let Some(r) = self.route.as_ref() {
                    r.link.take_source_stale(name);
                }
                self.plan_message(tag, None);
            }
            CLOSE => {
                let (kind, name) = parse_close(body)?;
                if let Some(r) = self.route.as_mut() {
                    r.observe_source(CLOSE, false, |_| false);
                }
                s.mid_batch.store(true, Relaxed);
                if kind == b'S' {
                    self.statements.on_close(name);
                    if let Some(r) = self.route.as_ref() {
                        r.source_close(name);
                    }
                }
                self.plan_message(tag, None);
            }
            TERMINATE => {
                self.terminating = true;
                return Ok(Verdict::ForwardAndStop);
            }
            // A message shown whole only because a batch might have been
            // held (the settings changed in between): as if streamed.
            _ => verdict = self.header_source(tag, body),
        }
        Ok(verdict)
    }

    /// Routing's say on a complete message: `Some` when routing took it
    /// (held or sent to the target) or released held messages before it.
    fn route_message(&mut self, tag: u8, body: &[u8]) -> Result<Option<Verdict>, FrameError> {
        let source_idle = self.source_idle();
        let Some(r) = self.route.as_mut() else {
            return Ok(None);
        };
        if tag == QUERY && !r.holding() {
            let text = parse_query(body)?;
            if r.route_query(body, text, source_idle) == QueryRoute::Target {
                self.hide(self.msg_no);
                return Ok(Some(Verdict::Drop));
            }
            return Ok(None);
        }
        if !r.holding()
            && (body.len() > self.max_inspected || !r.collects(tag, body.len(), source_idle))
        {
            return Ok(None);
        }
        let step = match tag {
            PARSE | BIND | DESCRIBE | EXECUTE | CLOSE | SYNC | FLUSH => {
                if tag == PARSE {
                    let (name, query) = parse_parse(body)?;
                    let types = &body[name.len() + query.len() + 2..];
                    self.statements.on_parse_typed(name, query, types);
                } else if tag == CLOSE {
                    parse_close(body)?;
                }
                let Some(r) = self.route.as_mut() else {
                    return Ok(None);
                };
                r.batch_message(tag, body, self.statements)
            }
            _ => BatchStep::Release(r.release().unwrap_or_default()),
        };
        match step {
            BatchStep::Held => {
                self.hide(self.msg_no);
                self.shared.mid_batch.store(true, Relaxed);
                Ok(Some(Verdict::Drop))
            }
            BatchStep::Routed => {
                self.hide(self.msg_no);
                self.shared.mid_batch.store(false, Relaxed);
                Ok(Some(Verdict::Drop))
            }
            BatchStep::Release(frames) => {
                let frames = self.released(frames);
                let v = self.inspect_source(tag, body)?;
                Ok(Some(before(frames, v)))
            }
        }
    }
}

/// `frames` written ahead of whatever `v` says about the message.
fn before(frames: Bytes, v: Verdict) -> Verdict {
    if frames.is_empty() {
        return v;
    }
    match v {
        Verdict::Forward => Verdict::Before(frames),
        Verdict::Before(b) => {
            let mut all = BytesMut::from(&frames[..]);
            all.extend_from_slice(&b);
            Verdict::Before(all.freeze())
        }
        Verdict::Replace(b) => {
            let mut all = BytesMut::from(&frames[..]);
            all.extend_from_slice(&b);
            Verdict::Replace(all.freeze())
        }
        // Terminate (stop) and Drop do not follow held messages.
        other => other,
    }
}

/// Enough of a Bind for its portal and statement names.
const BIND_PEEK: usize = 256;

impl Inspector for FrontendInspector<'_> {
    #[inline]
    fn wants_body(&self, tag: u8, body_len: usize) -> bool {
        matches!(tag, QUERY | PARSE | CLOSE | TERMINATE)
            || (body_len <= self.max_inspected
                && self
                    .route
                    .as_ref()
                    .is_some_and(|r| r.collects(tag, body_len, self.source_idle())))
    }

    fn max_inspected(&self) -> usize {
        self.max_inspected
    }

    fn peek(&self, tag: u8) -> usize {
        if (tag == BIND && (self.capture.is_some() || self.route.is_some()))
            || (tag == DESCRIBE && self.route.is_some())
        {
            BIND_PEEK
        } else {
            0
        }
    }

    #[inline]
    fn header(&mut self, tag: u8, prefix: &[u8]) -> Result<Verdict, FrameError> {
        self.saw_message(tag)?;
        // A message that cannot be held ends a held batch: the batch goes
        // to the source first.
        let held = match self.route.as_mut() {
            Some(r) if r.holding() => r.release(),
            _ => None,
        };
        if let Some(frames) = held {
            let frames = self.released(frames);
            self.run_source = true;
            let v = self.header_source(tag, prefix);
            return Ok(before(frames, v));
        }
        self.run_source = true;
        Ok(self.header_source(tag, prefix))
    }

    fn inspect(&mut self, tag: u8, body: &[u8]) -> Result<Verdict, FrameError> {
        self.saw_message(tag)?;
        if let Some(v) = self.route_message(tag, body)? {
            if v != Verdict::Drop {
                self.run_source = true;
            }
            return Ok(v);
        }
        self.run_source = true;
        self.inspect_source(tag, body)
    }

    fn writing(&mut self, done: bool, at_boundary: bool) {
        self.shared
            .server_at_boundary
            .store(done && at_boundary, Relaxed);
        if let Some(r) = self.route.as_ref() {
            r.link.frontend_writing.store(!done, Relaxed);
            if done {
                r.link.source_free.notify_waiters();
            }
        }
        if done {
            self.run_source = false;
        }
    }

    fn forwarding(&mut self, bytes: &[u8]) {
        if let Some(r) = self.record {
            r.client_bytes(bytes);
        }
        if let Some(c) = self.capture {
            c.lock()
                .unwrap_or_else(|p| p.into_inner())
                .client_bytes(bytes);
        }
    }

    /// Source-bound bytes wait while a routed request is unanswered, so
    /// answers reach the client in request order (and what the proxy puts
    /// into the source stream meanwhile goes first, the mirror seeing it in
    /// that order).
    fn hold(&mut self) -> Option<Hold<'_>> {
        let link = self
            .route
            .as_ref()
            .map(|r| r.link)
            .filter(|l| self.run_source && !self.terminating && l.target_busy())?;
        Some(Box::pin(async move {
            crate::router::wait_until(&link.target_idle, || !link.target_busy()).await;
            Ok(())
        }))
    }

    /// With `fsync = "commit"`, a request that may commit a write waits
    /// until its in-flight journal entry is on stable storage (a crash after
    /// the source commits must find it).
    fn hold_seen(&mut self) -> Option<Hold<'_>> {
        let (Some(capture), Some(m)) = (self.capture, self.mirror) else {
            return None;
        };
        let (failed, write) = {
            let mut c = capture.lock().unwrap_or_else(|p| p.into_inner());
            (c.take_arm_error(), c.take_arm_write())
        };
        let commit_mode = m.spool.policy() == crate::config::FsyncPolicy::Commit;
        let write = write.filter(|&w| commit_mode && m.inflight.synced() < w);
        if failed.is_none() && write.is_none() {
            return None;
        }
        Some(Box::pin(async move {
            let mut write = write;
            if let Some(why) = failed {
                if m.on_full == crate::config::OnFull::Backpressure {
                    // The journal's disk is full (or failing): the request
                    // waits until its intent is written whole.
                    m.metrics.backpressure_waits.inc();
                    loop {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        let r = capture.lock().unwrap_or_else(|p| p.into_inner()).rearm();
                        if let Ok(w) = r {
                            write = Some(w).filter(|_| commit_mode);
                            break;
                        }
                    }
                } else {
                    m.sync_failed(&format!(
                        "the in-flight journal could not be written: {why}"
                    ));
                    return Ok(());
                }
            }
            let Some(write) = write else {
                return Ok(());
            };
            loop {
                let notified = m.spool.synced.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if m.inflight.synced() >= write {
                    break;
                }
                if let Some(why) = m.spool.failure() {
                    m.sync_failed(&why);
                    if m.on_full == crate::config::OnFull::Backpressure {
                        return Err(format!(
                            "pgshift could not record this commit durably before sending it ({why}); nothing was sent to the source"
                        ));
                    }
                    break;
                }
                m.spool.want_sync();
                notified.await;
            }
            Ok(())
        }))
    }
}

/// Source -> client: follows ReadyForQuery for the transaction status and
/// the end of each request, and ends a draining session once it is idle.
/// With mirroring, it also shows the mirror what the source answered, and
/// puts each committed write unit in the spool before the client sees the
/// commit acknowledgement.
pub struct BackendInspector<'a> {
    pub shared: &'a Shared,
    pub mirror: Option<(&'a Mirror, &'a Mutex<Capture>)>,
    /// Largest inspected message (ErrorResponse bodies, with mirroring).
    pub max_inspected: usize,
    /// A unit waiting for spool space (`on_full = "backpressure"`).
    pending: Option<Box<MirroredUnit>>,
    /// A spooled unit whose commit acknowledgement waits for the spool to
    /// reach stable storage (`fsync = "commit"`).
    unsynced: Option<u64>,
    /// The run being forwarded held withheld answers.
    run_had_owed: bool,
    /// Read routing, when the proxy has a target.
    pub route: Option<(&'a RouteLink, &'a RouteMetrics)>,
}

impl<'a> BackendInspector<'a> {
    pub fn new(shared: &'a Shared) -> Self {
        Self {
            shared,
            mirror: None,
            max_inspected: 16,
            pending: None,
            unsynced: None,
            run_had_owed: false,
            route: None,
        }
    }

    /// Follows the order probe's answers: `Some(Drop)` for the probe's own
    /// messages, which the client must not see.
    fn probe_step(&mut self, tag: u8, body: &[u8]) -> Option<Verdict> {
        if !self.shared.probe_active.load(Relaxed) {
            return None;
        }
        let (mirror, capture) = self.mirror?;
        let mut c = capture.lock().unwrap_or_else(|p| p.into_inner());
        let step = c.probe.step(tag, body);
        if !c.probe.active() {
            self.shared.probe_active.store(false, Relaxed);
        }
        let works = match step {
            Step::Forward => return None,
            Step::ForwardFailed => {
                mirror.metrics.order_probe_failures.inc();
                c.probe_works = Some(false);
                mirror.set_probe_works(&c.probe_key, false);
                return None;
            }
            Step::Drop => return Some(Verdict::Drop),
            Step::Key(row) => {
                if !c.probe_check {
                    c.probe_answered(row);
                }
                true
            }
            Step::Failed => {
                mirror.metrics.order_probe_failures.inc();
                false
            }
        };
        c.probe_check = false;
        if c.probe_works != Some(works) {
            c.probe_works = Some(works);
            mirror.set_probe_works(&c.probe_key, works);
        }
        Some(Verdict::Drop)
    }

    /// Read-your-writes: this session's reads stay on the source until the
    /// mirror has applied `seq` on the target.
    fn spooled(&self, seq: u64) {
        if let Some((link, _)) = self.route {
            link.last_spooled_seq.store(seq, Relaxed);
        }
    }

    fn mirror_message(&mut self, tag: u8, body: &[u8]) {
        let Some((mirror, capture)) = self.mirror else {
            return;
        };
        // Held throughout: the session's other pump runs on this same thread,
        // so this lock is never contended.
        let mut capture = capture.lock().unwrap_or_else(|p| p.into_inner());
        let mut spooled_as = 0;
        match capture.server_message(tag, body, mirror.capturing()) {
            Finished::Nothing => {}
            Finished::Mirror(rec) => match mirror.spool_record(rec) {
                Spooled::Done(seq) => {
                    self.spooled(seq);
                    spooled_as = seq;
                    // A unit whose durable journal intent names its
                    // transaction id can be recovered from the source after
                    // any crash: its acknowledgement need not wait for the
                    // spool. Others wait for the sync round starting now.
                    if seq != crate::mirror::NEVER
                        && !capture.resolvable()
                        && mirror.spool.durable(seq) != Ok(true)
                    {
                        mirror.spool.want_sync();
                        self.unsynced = Some(seq);
                    }
                }
                Spooled::Full(rec) => {
                    // Not applied before it is spooled: reads stay on the
                    // source meanwhile.
                    self.spooled(crate::mirror::NEVER);
                    self.pending = Some(rec);
                }
            },
            Finished::Lost { bytes } => mirror.lost(&format!(
                "a committed unit of {bytes} bytes exceeded mirror.max_txn_bytes and was not mirrored; mirroring stopped, the target needs a re-sync"
            )),
        }
        // The unit is in the spool for good (or needs none): its journal
        // slot can go.
        if tag == READY_FOR_QUERY && self.pending.is_none() && self.unsynced.is_none() {
            capture.settle(spooled_as);
        }
    }
}

/// Reports an eligible read the source answered to the health monitor:
/// the source's own sample, and for a read the target had failed with a
/// query error, whether that was the target's fault (the source answered).
fn source_read_outcome(
    h: &crate::health::Health,
    link: &RouteLink,
    took: std::time::Duration,
    error: u8,
) {
    use crate::health::{Backend, Fault, Sample, SampleKind};
    let fell_back = link.fallback_read.swap(false, Relaxed);
    let mut s = Sample::new(
        Backend::Source,
        SampleKind::Read,
        (error == 2).then_some(Fault::Server),
    );
    // A fallback's time includes the target's attempt: not the source's.
    if !fell_back && error == 0 {
        s = s.latency(took);
    }
    h.record(s);
    if link.rerun_of_target_error.swap(false, Relaxed) {
        let shape = link.rerun_shape.load(Relaxed);
        let fault = (error == 0).then_some(Fault::Diverged);
        h.record(Sample::new(Backend::Target, SampleKind::Read, fault).shape(shape));
    }
}

impl BackendInspector<'_> {
    /// Answers to requests the proxy put into the source stream are still
    /// to come (see `RouteLink::source_owed`).
    fn owed(&self) -> bool {
        self.route
            .is_some_and(|(l, _)| l.source_owed.load(Relaxed) > 0)
    }

    /// What becomes of one message of such an answer: ParameterStatus and
    /// notifications are the client's, the rest is withheld.
    fn owed_message(&mut self, tag: u8) -> Verdict {
        self.run_had_owed = true;
        if matches!(tag, b'S' | b'A') {
            Verdict::Forward
        } else {
            Verdict::Drop
        }
    }

    /// Whether an ErrorResponse (or its first bytes) from the source ends
    /// the session (FATAL, PANIC); if so, nothing more is routed.
    fn note_source_fatal(&self, body: &[u8]) -> bool {
        let Some((link, _)) = self.route else {
            return false;
        };
        let fatal = matches!(parse_error_fields(body).severity, Some("FATAL" | "PANIC"));
        if fatal {
            link.source_ended.store(true, Relaxed);
        }
        fatal
    }

    /// An ErrorResponse (or its first bytes) from the source: remembered
    /// for the health report of the read it answers.
    fn note_source_error(&self, body: &[u8]) {
        let Some((link, _)) = self.route else {
            return;
        };
        self.note_source_fatal(body);
        let code = parse_error_fields(body).code.unwrap_or("");
        let level = if crate::health::is_server_fault(code) {
            2
        } else {
            1
        };
        link.source_read_error.fetch_max(level, Relaxed);
    }
}

impl Inspector for BackendInspector<'_> {
    #[inline]
    fn wants_body(&self, tag: u8, _body_len: usize) -> bool {
        tag == READY_FOR_QUERY
            || (self.mirror.is_some() && matches!(tag, b'C' | b'E' | b'I' | b's'))
    }

    fn max_inspected(&self) -> usize {
        self.max_inspected
    }

    fn peek(&self, tag: u8) -> usize {
        if tag == b'D' && self.shared.probe_active.load(Relaxed) {
            64
        } else if tag == ERROR_RESPONSE && self.route.is_some() {
            // Enough for the severity and SQLSTATE fields, which come first.
            96
        } else {
            0
        }
    }

    #[inline]
    fn header(&mut self, tag: u8, prefix: &[u8]) -> Result<Verdict, FrameError> {
        if self.owed() {
            if tag == ERROR_RESPONSE && self.note_source_fatal(prefix) {
                // The session is over: the client is told, as by Postgres.
                return Ok(Verdict::Forward);
            }
            return Ok(self.owed_message(tag));
        }
        if tag == ERROR_RESPONSE {
            self.note_source_error(prefix);
        }
        if let (b'1', Some((link, _))) = (tag, self.route) {
            // Answers a Parse the proxy added (before the probe counts it).
            let owed = link.drop_parse_complete.load(Relaxed);
            if owed > 0 {
                link.drop_parse_complete.store(owed - 1, Relaxed);
                return Ok(Verdict::Drop);
            }
        }
        Ok(self.probe_step(tag, prefix).unwrap_or(Verdict::Forward))
    }

    fn inspect(&mut self, tag: u8, body: &[u8]) -> Result<Verdict, FrameError> {
        if self.owed() {
            if tag == ERROR_RESPONSE && self.note_source_fatal(body) {
                return Ok(Verdict::Forward);
            }
            // An answer to a request the proxy put into the stream: the
            // mirror follows it, the client does not see it.
            self.mirror_message(tag, body);
            if tag == READY_FOR_QUERY {
                let status = parse_ready_for_query(body)?;
                self.shared.tx_status.store(status, Relaxed);
                self.shared.sub_in_flight(1);
                if let Some((link, _)) = self.route {
                    link.source_owed
                        .store(link.source_owed.load(Relaxed).saturating_sub(1), Relaxed);
                }
            }
            return Ok(self.owed_message(tag));
        }
        if let Some(v) = self.probe_step(tag, body) {
            return Ok(v);
        }
        if tag != READY_FOR_QUERY {
            if tag == ERROR_RESPONSE {
                self.note_source_error(body);
            }
            self.mirror_message(tag, body);
            return Ok(Verdict::Forward);
        }
        let status = parse_ready_for_query(body)?;
        self.mirror_message(tag, body);
        if let Some((link, metrics)) = self.route {
            let started = link
                .source_read_started
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            let error = link.source_read_error.swap(0, Relaxed);
            if let Some(t) = started {
                let took = t.elapsed();
                metrics.latency(false, took);
                if let Some(h) = &link.health {
                    source_read_outcome(h, link, took, error);
                }
            }
        }
        self.shared.tx_status.store(status, Relaxed);
        if self.shared.sub_in_flight(1) == 0 {
            if let Some((link, _)) = self.route {
                // A ParseComplete still owed now never comes (the Parse failed).
                link.drop_parse_complete.store(0, Relaxed);
            }
        }
        if self.shared.draining.load(Relaxed) && self.shared.is_idle() {
            return Ok(Verdict::ForwardAndStop);
        }
        Ok(Verdict::Forward)
    }

    /// A shadowed read's answer is copied on its way to the client (not
    /// from a run that held withheld answers: the copy would not be the
    /// client's answer alone).
    #[inline]
    fn forwarding(&mut self, bytes: &[u8]) {
        if let Some((link, _)) = self.route {
            if link.shadow_armed.load(Relaxed) && !self.run_had_owed {
                link.feed_tap(bytes);
            }
        }
    }

    fn writing(&mut self, done: bool, at_boundary: bool) {
        if done {
            self.run_had_owed = false;
        }
        self.shared
            .client_at_boundary
            .store(done && at_boundary, Relaxed);
        if let Some((link, _)) = self.route {
            link.backend_writing.store(!done, Relaxed);
            if done {
                link.client_free.notify_waiters();
            }
        }
    }

    fn hold(&mut self) -> Option<Hold<'_>> {
        // The source only speaks unprompted (notices, notifications) while
        // a routed request is being answered: that waits for the answer.
        let route = self.route.map(|(l, _)| l).filter(|l| l.target_busy());
        let (pending, unsynced) = (self.pending.take(), self.unsynced.take());
        let mirror = self
            .mirror
            .filter(|_| pending.is_some() || unsynced.is_some());
        if route.is_none() && mirror.is_none() {
            return None;
        }
        let link = self.route.map(|(l, _)| l);
        Some(Box::pin(async move {
            if let Some(link) = route {
                crate::router::wait_until(&link.target_idle, || !link.target_busy()).await;
            }
            let Some((mirror, capture)) = mirror else {
                return Ok(());
            };
            let mut seq = unsynced;
            if let Some(mut rec) = pending {
                mirror.metrics.backpressure_waits.inc();
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    match mirror.spool_record(rec) {
                        Spooled::Done(s) => {
                            if let Some(link) = link {
                                link.last_spooled_seq.store(s, Relaxed);
                            }
                            seq = (s != crate::mirror::NEVER).then_some(s);
                            break;
                        }
                        Spooled::Full(r) => rec = r,
                    }
                }
            }
            let synced = match seq {
                Some(seq) => mirror.spool.wait_durable(seq).await,
                None => Ok(()),
            };
            capture
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .settle(seq.unwrap_or(0));
            if let Err(why) = synced {
                mirror.sync_failed(&why);
                if mirror.on_full == crate::config::OnFull::Backpressure {
                    // Never acknowledge past a gap.
                    return Err(format!(
                        "pgshift could not make this commit durable in its mirror spool ({why}); the transaction committed on the source, and the target misses it"
                    ));
                }
            }
            Ok(())
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_inspector_counts_requests_and_rejects_unknown_types() {
        let shared = Shared::default();
        let mut st = PreparedStatements::new(10, 1024);
        let mut i = FrontendInspector::new(&shared, &mut st, 1024);
        i.inspect(QUERY, b"select 1\0").unwrap();
        i.header(SYNC, b"").unwrap();
        assert_eq!(shared.in_flight.load(Relaxed), 2);
        assert!(matches!(
            i.header(b'z', b""),
            Err(FrameError::UnknownType(b'z'))
        ));
        assert!(i.inspect(QUERY, b"no terminator").is_err());
        assert_eq!(i.inspect(TERMINATE, b"").unwrap(), Verdict::ForwardAndStop);
    }

    #[test]
    fn copy_in_via_extended_protocol_keeps_the_request_count_right() {
        // What tokio-postgres and libpq send for COPY FROM STDIN with the
        // extended protocol: the Sync after Execute is swallowed by the
        // server's copy-in mode, so there is one ReadyForQuery, not two.
        let shared = Shared::default();
        let mut st = PreparedStatements::new(10, 1024);
        let mut f = FrontendInspector::new(&shared, &mut st, 1024);
        f.header(BIND, b"").unwrap();
        f.header(EXECUTE, b"").unwrap();
        f.header(SYNC, b"").unwrap();
        f.header(b'd', b"").unwrap();
        f.header(COPY_DONE, b"").unwrap();
        f.header(SYNC, b"").unwrap();
        let mut b = BackendInspector::new(&shared);
        b.inspect(READY_FOR_QUERY, b"I").unwrap();
        assert_eq!(shared.in_flight.load(Relaxed), 0);
        assert!(shared.is_idle());
    }

    #[test]
    fn extended_messages_without_sync_are_not_idle() {
        let shared = Shared::default();
        let mut st = PreparedStatements::new(10, 1024);
        let mut f = FrontendInspector::new(&shared, &mut st, 1024);
        f.inspect(PARSE, b"\0select 1\0\0\0").unwrap();
        f.header(BIND, b"").unwrap();
        assert!(!shared.is_idle());
        f.header(SYNC, b"").unwrap();
        BackendInspector::new(&shared)
            .inspect(READY_FOR_QUERY, b"I")
            .unwrap();
        assert!(shared.is_idle());
    }

    #[test]
    fn backend_inspector_tracks_status_and_stops_when_draining_and_idle() {
        let shared = Shared::default();
        shared.in_flight.store(2, Relaxed);
        let mut b = BackendInspector::new(&shared);
        shared.draining.store(true, Relaxed);
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
