//! The policies of one session, as the session core's hooks: the mirror's
//! capture (order probes, spooling each committed unit before its
//! acknowledgement), read routing (holding batches, diverting reads to the
//! target, answers owed by the source), the shadow tap, health samples and
//! the recording. `pump::core` does the session's own bookkeeping and calls
//! these in message order; this module composes the policies that are
//! configured, each of which lives in its own module.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

use crate::mirror::capture::{Capture, Finished};
use crate::mirror::order::{self, Probe, Shape, Step};
use crate::mirror::unit::MirroredUnit;
use crate::mirror::{Mirror, Spooled};
use crate::protocol::error::parse_error_fields;
use crate::protocol::frame::HEADER_LEN;
use crate::protocol::message::{
    parse_close, parse_parse, parse_query, parse_ready_for_query, BIND, CLOSE, DESCRIBE,
    ERROR_RESPONSE, EXECUTE, FLUSH, PARSE, QUERY, READY_FOR_QUERY, SYNC,
};
use crate::protocol::FrameError;
use crate::pump::core::{
    before, ClientCore, ClientHooks, Diverted, ServerCore, ServerHooks, SourceMessage,
};
use crate::pump::{Hold, Verdict};
use crate::router::batch::BatchStep;
use crate::router::decide::{Decider, QueryRoute};
use crate::router::link::RouteLink;
use crate::router::RouteMetrics;
use crate::tracker::Shared;

/// The policies' part in the client -> source direction: the mirror's
/// order probes and capture, read routing, and the recording.
#[derive(Default)]
pub struct ClientPolicies<'a> {
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

impl ClientPolicies<'_> {
    /// Whether this message starts a request with nothing else in flight
    /// (only then is the capture's view current, and the block status known).
    fn at_request_start(&self, core: &ClientCore<'_>) -> bool {
        self.capture.is_some() && core.at_request_start()
    }

    /// Decides on an order probe for a request starting with a statement
    /// whose text is `sql`. A COMMIT of a block that wrote gets the probe
    /// first in its request, or as a request of its own while the probe is
    /// not yet known to work for this user and database; an autocommit
    /// write (`Shape::Dml`, which the caller handles) gets one only where it
    /// is known to work. Until that is known, the session's first request
    /// is preceded by a probe that only checks.
    fn probe_for_start(
        &mut self,
        core: &ClientCore<'_>,
        sql: &[u8],
        extended: bool,
    ) -> Option<(Shape, Verdict)> {
        let capture = self.capture?;
        let shared = core.shared;
        let status = shared.tx_status.load(Relaxed);
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
            shared.probe_active.store(true, Relaxed);
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
                shared.probe_active.store(true, Relaxed);
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
                shared.probe_active.store(true, Relaxed);
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
    fn plan_message(&mut self, core: &ClientCore<'_>, tag: u8, statement: Option<&[u8]>) {
        let Some(plan) = self.plan.as_mut() else {
            return;
        };
        match tag {
            PARSE | DESCRIBE | CLOSE => plan.completions += 1,
            BIND => {
                plan.completions += 1;
                let dml = statement
                    .and_then(|name| core.statements.get(name))
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
    fn plan_sync(&mut self, core: &ClientCore<'_>) -> Verdict {
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
        core.shared.probe_active.store(true, Relaxed);
        Verdict::Before(order::extended(false))
    }

    /// A plan for a request that starts with a statement taking a trailing
    /// probe.
    fn new_plan(core: &ClientCore<'_>) -> ProbePlan {
        ProbePlan {
            fits: true,
            orders: core.shared.tx_status.load(Relaxed) == b'I',
            ..ProbePlan::default()
        }
    }

    /// The statement name a Bind refers to (from its first bytes).
    fn bind_statement(prefix: &[u8]) -> Option<&[u8]> {
        crate::protocol::message::parse_bind_names(prefix)
            .ok()
            .map(|names| names.statement)
    }

    /// The mirror must not see client message `n`: it went to the target.
    fn hide(&self, n: u64) {
        if let Some(c) = self.capture {
            c.lock().unwrap_or_else(|p| p.into_inner()).hide(n);
        }
    }

    /// A Bind or Describe of a statement the source has not got (parsed in
    /// a routed batch or inside the routed transaction): the Parse the
    /// source gets first (its answer is dropped).
    fn reparse_if_stale(&self, core: &ClientCore<'_>, tag: u8, body: &[u8]) -> Option<Bytes> {
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
        let st = core.statements.statement(name)?;
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

    /// A streamed message (or a non-inspected one shown whole) bound for
    /// the source.
    fn other_to_source(&mut self, core: &mut ClientCore<'_>, tag: u8, prefix: &[u8]) -> Verdict {
        let mut verdict = Verdict::Forward;
        let reparse = self.reparse_if_stale(core, tag, prefix);
        if let (Some(f), Some(c)) = (&reparse, self.capture) {
            c.lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert_before(core.msg_no(), f.clone());
        }
        if tag != PARSE
            && self
                .route
                .as_ref()
                .is_some_and(|r| r.observing() || r.engaged())
        {
            let at_start = core.source_idle();
            let name = (tag == BIND)
                .then(|| Self::bind_statement(prefix))
                .flatten();
            let statements = &*core.statements;
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
            if tag == BIND && self.at_request_start(core) {
                self.plan = None;
                let text = statement.and_then(|n| core.statements.get(n)).cloned();
                if let Some((shape, v)) = text.and_then(|t| self.probe_for_start(core, &t, true)) {
                    verdict = v;
                    if shape.takes_trailing_probe() {
                        self.plan = Some(Self::new_plan(core));
                    }
                }
            }
            self.plan_message(core, tag, statement);
            if tag == SYNC {
                verdict = self.plan_sync(core);
            }
        }
        match reparse {
            Some(f) => before(f, verdict),
            None => verdict,
        }
    }
}

/// Enough of a Bind for its portal and statement names.
const BIND_PEEK: usize = 256;

impl ClientHooks for ClientPolicies<'_> {
    #[inline]
    fn wants_body(&self, core: &ClientCore<'_>, tag: u8, body_len: usize) -> bool {
        self.route
            .as_ref()
            .is_some_and(|r| r.collects(tag, body_len, core.source_idle()))
    }

    fn peek(&self, _core: &ClientCore<'_>, tag: u8) -> usize {
        let routing = || self.route.as_ref().is_some_and(|r| r.engaged());
        if (tag == BIND && (self.capture.is_some() || routing())) || (tag == DESCRIBE && routing())
        {
            BIND_PEEK
        } else {
            0
        }
    }

    /// Routing's say on a complete message: taken when routing held it or
    /// sent it to the target, released messages before it when it ends a
    /// held batch that goes to the source.
    fn divert(
        &mut self,
        core: &mut ClientCore<'_>,
        tag: u8,
        body: &[u8],
    ) -> Result<Diverted, FrameError> {
        let source_idle = core.source_idle();
        let Some(r) = self.route.as_mut() else {
            return Ok(Diverted::No);
        };
        if tag == QUERY && !r.holding() {
            let text = parse_query(body)?;
            if r.route_query(body, text, source_idle) == QueryRoute::Target {
                self.hide(core.msg_no());
                return Ok(Diverted::Taken);
            }
            return Ok(Diverted::No);
        }
        if !r.holding()
            && (body.len() > core.max_inspected || !r.collects(tag, body.len(), source_idle))
        {
            return Ok(Diverted::No);
        }
        let step = match tag {
            PARSE | BIND | DESCRIBE | EXECUTE | CLOSE | SYNC | FLUSH => {
                if tag == PARSE {
                    let (name, query) = parse_parse(body)?;
                    let types = &body[name.len() + query.len() + 2..];
                    core.statements.on_parse_typed(name, query, types);
                } else if tag == CLOSE {
                    parse_close(body)?;
                }
                let Some(r) = self.route.as_mut() else {
                    return Ok(Diverted::No);
                };
                r.batch_message(tag, body, core.statements)
            }
            _ => BatchStep::Release(r.release().unwrap_or_default()),
        };
        match step {
            BatchStep::Held => {
                self.hide(core.msg_no());
                core.shared.mid_batch.store(true, Relaxed);
                Ok(Diverted::Taken)
            }
            BatchStep::Routed => {
                self.hide(core.msg_no());
                core.shared.mid_batch.store(false, Relaxed);
                Ok(Diverted::Taken)
            }
            BatchStep::Release(frames) => Ok(Diverted::Release(frames)),
        }
    }

    /// A message that cannot be held ends a held batch: the batch goes to
    /// the source first.
    fn release_before(&mut self, _core: &mut ClientCore<'_>) -> Option<Bytes> {
        match self.route.as_mut() {
            Some(r) if r.holding() => r.release(),
            _ => None,
        }
    }

    /// Held messages go to the source just before the current message:
    /// the mirror sees them there, and the request counters catch up.
    /// Returns the frames as the source gets them: with the Parse of a
    /// statement the source has not got put before the Bind or Describe
    /// that uses it.
    fn released(&mut self, core: &mut ClientCore<'_>, frames: Bytes) -> Bytes {
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
            if let Some(p) = self.reparse_if_stale(core, h.tag, &frame[HEADER_LEN..]) {
                let o = out.get_or_insert_with(|| BytesMut::from(&frames[..at]));
                o.extend_from_slice(&p);
            }
            if let Some(o) = out.as_mut() {
                o.extend_from_slice(frame);
            }
            core.count(h.tag);
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
                .insert_before(core.msg_no(), frames.clone());
        }
        frames
    }

    fn to_source(&mut self, core: &mut ClientCore<'_>, msg: SourceMessage<'_>) -> Verdict {
        let mut verdict = Verdict::Forward;
        match msg {
            SourceMessage::Query { body, text } => {
                if let Some(r) = self.route.as_mut() {
                    r.source_statement(text);
                }
                if self.at_request_start(core) {
                    match self.probe_for_start(core, text, false) {
                        Some((shape, _)) if shape.takes_trailing_probe() => {
                            if let Some(c) = self.capture {
                                let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
                                c.probe = Probe::Trailing {
                                    left: 1,
                                    extended: false,
                                };
                                let s = core.shared;
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
            }
            SourceMessage::Parse { name, query, .. } => {
                let at_start = core.source_idle();
                if let Some(r) = self.route.as_mut() {
                    r.source_statement(query);
                    if r.observing() || r.engaged() {
                        r.observe_source(PARSE, at_start, |r| r.is_read(query));
                    }
                }
                if self.at_request_start(core) {
                    self.plan = None;
                    if let Some((shape, v)) = self.probe_for_start(core, query, true) {
                        verdict = v;
                        if shape.takes_trailing_probe() {
                            self.plan = Some(Self::new_plan(core));
                        }
                    }
                }
                if let Some(r) = self.route.as_ref() {
                    r.link.take_source_stale(name);
                }
                self.plan_message(core, PARSE, None);
            }
            SourceMessage::Close { kind, name } => {
                if let Some(r) = self.route.as_mut() {
                    r.observe_source(CLOSE, false, |_| false);
                }
                if kind == b'S' {
                    if let Some(r) = self.route.as_ref() {
                        r.source_close(name);
                    }
                }
                self.plan_message(core, CLOSE, None);
            }
            SourceMessage::Other { tag, prefix } => {
                verdict = self.other_to_source(core, tag, prefix);
            }
        }
        verdict
    }

    fn writing(&mut self, _core: &ClientCore<'_>, done: bool) {
        if let Some(r) = self.route.as_ref() {
            r.link.frontend_writing.store(!done, Relaxed);
            if done {
                r.link.stream_freed(&r.link.source_free);
            }
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
    /// that order). Not a Terminate: it goes to the source at once, without
    /// waiting for a routed answer nobody will read, so the source backend
    /// leaves as soon as it would without the proxy.
    fn hold(&mut self, core: &ClientCore<'_>) -> Option<Hold<'_>> {
        let link =
            self.route.as_ref().map(|r| r.link).filter(|l| {
                core.run_holds_source_bytes() && !core.terminating() && l.target_busy()
            })?;
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

/// The policies' part in the source -> client direction. With mirroring,
/// it shows the mirror what the source answered, and puts each committed
/// write unit in the spool before the client sees the commit
/// acknowledgement; with routing, it withholds answers to requests the
/// proxy put into the source stream, times eligible reads for the health
/// monitor, and copies shadowed answers.
pub struct ServerPolicies<'a> {
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
    /// The run being forwarded holds (part of) an answer to a request the
    /// responder put into the source stream: it is not held for a routed
    /// answer (which waits for it).
    run_answers: bool,
    /// Read routing, when the proxy has a target.
    pub route: Option<(&'a RouteLink, &'a RouteMetrics)>,
}

impl Default for ServerPolicies<'_> {
    fn default() -> Self {
        Self {
            mirror: None,
            max_inspected: 16,
            pending: None,
            unsynced: None,
            run_had_owed: false,
            run_answers: false,
            route: None,
        }
    }
}

impl ServerPolicies<'_> {
    /// Follows the order probe's answers: `Some(Drop)` for the probe's own
    /// messages, which the client must not see.
    fn probe_step(&mut self, shared: &Shared, tag: u8, body: &[u8]) -> Option<Verdict> {
        if !shared.probe_active.load(Relaxed) {
            return None;
        }
        let (mirror, capture) = self.mirror?;
        let mut c = capture.lock().unwrap_or_else(|p| p.into_inner());
        let step = c.probe.step(tag, body);
        if !c.probe.active() {
            shared.probe_active.store(false, Relaxed);
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
    use crate::health::{Db, Fault, Sample, SampleKind};
    let fell_back = link.fallback_read.swap(false, Relaxed);
    let mut s = Sample::new(
        Db::Source,
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
        h.record(Sample::new(Db::Target, SampleKind::Read, fault).shape(shape));
    }
}

impl ServerPolicies<'_> {
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

impl ServerHooks for ServerPolicies<'_> {
    #[inline]
    fn wants_body(&self, tag: u8) -> bool {
        self.mirror.is_some() && matches!(tag, b'C' | b'E' | b'I' | b's')
    }

    fn max_inspected(&self) -> usize {
        self.max_inspected
    }

    fn peek(&self, core: &ServerCore<'_>, tag: u8) -> usize {
        if tag == b'D' && core.shared.probe_active.load(Relaxed) {
            64
        } else if tag == ERROR_RESPONSE && self.route.is_some() {
            // Enough for the severity and SQLSTATE fields, which come first.
            96
        } else {
            0
        }
    }

    fn intercept(
        &mut self,
        core: &ServerCore<'_>,
        tag: u8,
        bytes: &[u8],
        whole: bool,
    ) -> Result<Option<Verdict>, FrameError> {
        if self.route.is_some_and(|(l, _)| l.source_owes_responder()) {
            self.run_answers = true;
        }
        if !whole {
            if self.owed() {
                if tag == ERROR_RESPONSE && self.note_source_fatal(bytes) {
                    // The session is over: the client is told, as by Postgres.
                    return Ok(Some(Verdict::Forward));
                }
                return Ok(Some(self.owed_message(tag)));
            }
            if tag == ERROR_RESPONSE {
                self.note_source_error(bytes);
            }
            if let (b'1', Some((link, _))) = (tag, self.route) {
                // Answers a Parse the proxy added (before the probe counts it).
                let owed = link.drop_parse_complete.load(Relaxed);
                if owed > 0 {
                    link.drop_parse_complete.store(owed - 1, Relaxed);
                    return Ok(Some(Verdict::Drop));
                }
            }
            return Ok(self.probe_step(core.shared, tag, bytes));
        }
        if self.owed() {
            if tag == ERROR_RESPONSE && self.note_source_fatal(bytes) {
                return Ok(Some(Verdict::Forward));
            }
            // An answer to a request the proxy put into the stream: the
            // mirror follows it, the client does not see it.
            self.mirror_message(tag, bytes);
            if tag == READY_FOR_QUERY {
                let status = parse_ready_for_query(bytes)?;
                core.answered(status);
                if let Some((link, _)) = self.route {
                    link.source_ready();
                    link.source_owed
                        .store(link.source_owed.load(Relaxed).saturating_sub(1), Relaxed);
                }
            }
            return Ok(Some(self.owed_message(tag)));
        }
        Ok(self.probe_step(core.shared, tag, bytes))
    }

    fn message(&mut self, _core: &ServerCore<'_>, tag: u8, body: &[u8], whole: bool) {
        if !whole || tag == READY_FOR_QUERY {
            return;
        }
        if tag == ERROR_RESPONSE {
            self.note_source_error(body);
        }
        self.mirror_message(tag, body);
    }

    fn ready(&mut self, _core: &ServerCore<'_>, status: u8) {
        self.mirror_message(READY_FOR_QUERY, &[status]);
        if let Some((link, metrics)) = self.route {
            link.source_ready();
            let started = link.take_source_read();
            let error = match link.source_read_error.load(Relaxed) {
                0 => 0,
                _ => link.source_read_error.swap(0, Relaxed),
            };
            if let Some(t) = started {
                let took = t.elapsed();
                metrics.latency(false, took);
                if let Some(h) = &link.health {
                    source_read_outcome(h, link, took, error);
                }
            }
        }
    }

    fn after_ready(&mut self, _core: &ServerCore<'_>, in_flight: u32) {
        if in_flight == 0 {
            if let Some((link, _)) = self.route {
                // A ParseComplete still owed now never comes (the Parse failed).
                link.drop_parse_complete.store(0, Relaxed);
            }
        }
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

    fn writing(&mut self, _core: &ServerCore<'_>, done: bool) {
        if done {
            self.run_had_owed = false;
            self.run_answers = false;
        }
        if let Some((link, _)) = self.route {
            link.backend_writing.store(!done, Relaxed);
            if done {
                link.stream_freed(&link.client_free);
            }
        }
    }

    fn hold(&mut self) -> Option<Hold<'_>> {
        // The source only speaks unprompted (notices, notifications) while
        // a routed request is being answered: that waits for the answer.
        // Not an answer to a request sent to the source (a routed read that
        // fell back there): a later routed answer waits for it instead.
        let route = self
            .route
            .map(|(l, _)| l)
            .filter(|l| !self.run_answers && l.target_busy());
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
