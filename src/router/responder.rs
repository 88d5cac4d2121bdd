//! The routing half beside the pumps: runs each routed request on the
//! session's target connection and relays the answer to the client.
//!
//! The answer is held until it is complete (or bigger than `RELAY_HOLD`),
//! so a target that fails before that costs the client nothing: the
//! request goes to the source instead, as if it had never left (transparent
//! fallback). Failures that count: no connection, a broken one, no answer
//! within `routing.target_timeout_ms`, or an error that is not the query's
//! fault (`super::is_fallback_code`). Any other error but a cancel falls
//! back too: the source's answer decides what the client sees, and when
//! the source answers, the health monitor counts the target's error as the
//! target's fault (a table missing there, a grant, a type).
//!
//! Every outcome on the target is reported to the health monitor.
//!
//! Before a request, the target session is brought up to date: the
//! session's SET/RESET/DISCARD statements are repeated, statements closed
//! on the source are closed here, and each named statement the request
//! binds is prepared here the first time it is used (answers to the
//! proxy's own messages never reach the client).
//!
//! Ordering: a request only went to the target when the source had nothing
//! in flight, and the pumps hold source traffic while a routed request is
//! unanswered, so answers reach the client in request order.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWrite;
use tracing::{debug, info, warn};

use super::link::{RouteLink, Routed};
use super::{is_fallback_code, Fallback, RouteMetrics, Router};
use crate::protocol::error::{error_response, parse_error_fields, Severity};
use crate::protocol::frame::read_message;
use crate::protocol::message::{
    parse_ready_for_query, put_message, ERROR_RESPONSE, PARAMETER_STATUS, READY_FOR_QUERY,
};
use crate::protocol::rows;
use crate::protocol::sqlstate;
use crate::tracker::{Shared, StateOp, Statement};
use crate::upstream::target::{Conn, TargetLink};

/// Answers up to this size are held whole (and can still fall back).
const RELAY_HOLD: usize = 64 << 10;
/// Most statements kept prepared on one target connection.
const MAX_PREPARED: usize = 10_000;
/// The read-only guard every target session runs with: a routed "read"
/// that writes fails there (25006) and runs on the source instead.
const GUARD: &str = "SET default_transaction_read_only = on";

/// A writer shared by a pump and the responder. They are futures of one
/// task: the lock is held only inside one poll, never across an await, so
/// it is never contended; who may write when is decided by the flags in
/// `RouteLink` and `Shared`.
pub struct SharedWriter<'m, W: ?Sized>(pub &'m Mutex<W>);

impl<W: AsyncWrite + Unpin + ?Sized> AsyncWrite for SharedWriter<'_, W> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        std::pin::Pin::new(&mut *w).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        std::pin::Pin::new(&mut *w).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        std::pin::Pin::new(&mut *w).poll_shutdown(cx)
    }
}

/// Why the responder ended the session.
#[derive(Debug)]
pub enum ResponderEnd {
    /// The target failed inside a routed transaction: its state is gone
    /// and the source never had it.
    LostInTransaction(String),
    /// Writing to the client failed.
    ClientGone(io::Error),
    /// Writing a fallback to the source failed.
    SourceGone(io::Error),
    /// Draining, and the session is idle.
    Drained,
}

/// How a routed request went on the target.
enum Outcome {
    Served,
    /// Failed before any byte reached the client: run it on the source.
    Fallback(Fallback, String),
    /// Failed after part of the answer reached the client.
    Broken(String),
}

/// One connection's session state, as the proxy brought it.
struct Live {
    conn: Conn,
    /// `(StateLog::restarts, ops applied)`.
    applied: (u64, usize),
    guarded: bool,
    /// Named statements prepared on this connection.
    prepared: HashMap<Box<[u8]>, Statement>,
    /// Those of them the proxy prepared whose Describe named types by OIDs
    /// of the target's own: requests binding them run on the source.
    local_typed: std::collections::HashSet<Box<[u8]>>,
    /// The last request that ended a transaction committed it.
    committed: bool,
    /// An answer the proxy gave up reading is still on its way: the next
    /// request would read it as its own, so the connection is dropped.
    mid_answer: bool,
}

pub struct Responder<'a, C: ?Sized, S: ?Sized> {
    pub link: &'a RouteLink,
    pub shared: &'a Shared,
    pub client: &'a Mutex<C>,
    pub source: &'a Mutex<S>,
    pub router: &'a Router,
    pub route_metrics: &'a RouteMetrics,
    pub target: TargetLink,
    /// The mirror's view of the session: a request that falls back reaches
    /// the source after all, and the mirror must follow it.
    pub capture: Option<&'a Mutex<crate::mirror::capture::Capture>>,
    /// Where a client's CancelRequest finds the target backend running
    /// its routed query.
    pub cancel_key: Option<crate::cancel::RoutedKey>,
    pub keepalive: Duration,
    pub max_message: usize,
    pub session_id: u64,
}

impl<C, S> Responder<'_, C, S>
where
    C: AsyncWrite + Unpin + ?Sized,
    S: AsyncWrite + Unpin + ?Sized,
{
    /// Serves routed requests until the session ends (the caller drops this
    /// future) or something forces the session to end.
    pub async fn run(mut self) -> ResponderEnd {
        let mut live: Option<Live> = None;
        let mut link_gone = false;
        // Before the first connection is up, reads may be routed (and wait
        // for it) when target logins were working.
        let mut first = self.target.optimistic;
        let mut ticker = tokio::time::interval(self.keepalive);
        ticker.reset();
        loop {
            self.link.ready.store(live.is_some() || first, Relaxed);
            let next = self
                .link
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front();
            if let Some(req) = next {
                let queued = req.started.elapsed();
                if queued > Duration::from_millis(50) {
                    debug!(
                        session_id = self.session_id,
                        queued_ms = queued.as_millis() as u64,
                        "routed request waited before the responder took it"
                    );
                }
                if live.is_none() && first && !link_gone {
                    // Wait for the first login, within the request's timeout.
                    let left = self
                        .router
                        .settings()
                        .target_timeout
                        .saturating_sub(req.started.elapsed());
                    match tokio::time::timeout(left, self.target.conns.recv()).await {
                        Ok(Some(conn)) => live = Some(Live::new(conn)),
                        Ok(None) => link_gone = true,
                        Err(_) => {}
                    }
                    first = false;
                    ticker.reset();
                }
                if let Err(end) = self.serve(&mut live, req).await {
                    return end;
                }
                if self.shared.draining.load(Relaxed)
                    && self.shared.is_idle()
                    && !self.link.target_busy()
                    && !self.link.in_target_txn()
                {
                    return ResponderEnd::Drained;
                }
                continue;
            }
            // Parked while it waits on these three, each of which wakes it,
            // and while the arm that woke runs (a keepalive ping waits only
            // on the target connection); cleared at the end of this turn,
            // before a request is served.
            self.link.set_responder_parked(true);
            let _unpark = Unpark(self.link);
            tokio::select! {
                _ = self.link.request_ready.notified() => {}
                c = self.target.conns.recv(), if live.is_none() && !link_gone => match c {
                    Some(conn) => {
                        live = Some(Live::new(conn));
                        first = false;
                        ticker.reset();
                    }
                    // The link task ended: no more connections this session.
                    None => link_gone = true,
                },
                _ = ticker.tick(), if live.is_some() => {
                    if let Some(l) = live.as_mut() {
                        if let Err(why) = self.ping(l).await {
                            self.lose(&mut live, &why);
                        }
                    }
                }
            }
        }
    }

    fn set_cancel_key(&self, key: Option<crate::protocol::startup::CancelKey>) {
        if let Some(slot) = &self.cancel_key {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = key;
        }
    }

    /// Drops a broken connection and asks the link for another.
    fn lose(&self, live: &mut Option<Live>, why: &str) {
        if live.take().is_some() {
            warn!(
                session_id = self.session_id,
                reason = why,
                "target link lost; reconnecting"
            );
            self.target.want.notify_one();
        }
        self.link.ready.store(false, Relaxed);
    }

    /// Idle liveness check: a Sync must get a ReadyForQuery back.
    async fn ping(&self, l: &mut Live) -> Result<(), String> {
        let limit = self.keepalive.min(Duration::from_secs(10));
        let r = tokio::time::timeout(limit, async {
            crate::net::send_all(&mut l.conn.stream, b"S\0\0\0\x04").await?;
            loop {
                match read_message(&mut l.conn.stream, &mut l.conn.buf, self.max_message).await? {
                    Some(m) if m.tag == READY_FOR_QUERY => return Ok(()),
                    Some(m) if m.tag == ERROR_RESPONSE => {
                        let f = parse_error_fields(m.body());
                        if f.severity == Some("FATAL") || f.severity == Some("PANIC") {
                            return Err(io::Error::other(format!(
                                "{} {}",
                                f.code.unwrap_or("?"),
                                f.message.unwrap_or("")
                            )));
                        }
                    }
                    Some(_) => {}
                    None => return Err(io::Error::other("target closed the connection")),
                }
            }
        })
        .await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("keepalive failed: {e}")),
            Err(_) => Err("no answer to keepalive".into()),
        }
    }

    async fn serve(
        &mut self,
        live: &mut Option<Live>,
        mut req: Routed,
    ) -> Result<(), ResponderEnd> {
        if let Some(why) = req.refuse.take() {
            let out = error_response(Severity::Fatal, sqlstate::PROGRAM_LIMIT_EXCEEDED, &why);
            let _ = self.write_client(&out).await;
            return Err(ResponderEnd::LostInTransaction(why));
        }
        let outcome = match live.as_mut() {
            None => Outcome::Fallback(Fallback::Connection, "no target connection".into()),
            Some(l) => {
                self.set_cancel_key(l.conn.key.clone());
                let o = self.on_target(l, &mut req).await;
                self.set_cancel_key(None);
                o
            }
        };
        if live.as_ref().is_some_and(|l| l.mid_answer) {
            self.lose(
                live,
                "the target did not finish an answer the client does not get",
            );
        }
        let done = |this: &Self| {
            let left = this.link.target_in_flight.load(Relaxed).saturating_sub(1);
            this.link.target_in_flight.store(left, Relaxed);
            this.link.responder_writing.store(false, Relaxed);
            this.link.target_idle.notify_waiters();
        };
        self.report(&outcome, &req);
        if let Some((frames, requests)) = req.internal.take() {
            // The routed transaction moves to the source: whatever became of
            // the target's (rolled back, or lost with its connection), the
            // source gets what it had run, before anything else.
            if !matches!(outcome, Outcome::Served) {
                self.lose(
                    live,
                    "the target failed while a transaction moved to the source",
                );
            }
            self.link.target_tx.store(b'I', Relaxed);
            let r = self.inject_source(&frames, requests).await;
            done(self);
            return r.map_err(ResponderEnd::SourceGone);
        }
        match outcome {
            Outcome::Served => {
                self.route_metrics.latency(true, req.started.elapsed());
                if req.counted {
                    self.route_metrics.read(true);
                }
                let ended = req.in_txn && !self.link.in_target_txn();
                if ended {
                    // The routed transaction is over: the session changes it
                    // made reach the source (all of them if it committed).
                    let committed = live.as_ref().is_some_and(|l| l.committed);
                    let (frames, n) = self
                        .link
                        .source_queue
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take(committed);
                    if n > 0 {
                        let r = self.inject_source(&frames, n).await;
                        done(self);
                        return r.map_err(ResponderEnd::SourceGone);
                    }
                }
                done(self);
                Ok(())
            }
            Outcome::Fallback(why, detail) => {
                // After an error answer the connection is still good.
                if !matches!(
                    why,
                    Fallback::ServerError | Fallback::QueryError | Fallback::Types
                ) {
                    self.lose(live, &detail);
                } else {
                    debug!(session_id = self.session_id, reason = %detail, "routed read failed on the target");
                }
                if req.in_txn {
                    // Its transaction lives on the target only.
                    done(self);
                    self.end_in_txn(&detail).await;
                    return Err(ResponderEnd::LostInTransaction(detail));
                }
                self.route_metrics.fallback(why);
                if req.counted {
                    self.route_metrics.read(false);
                }
                // A shadow read compares the target's answer: this one has none.
                req.shadow = None;
                self.link.fallback_read.store(true, Relaxed);
                if why == Fallback::QueryError {
                    self.link.rerun_shape.store(req.shape, Relaxed);
                    self.link.rerun_of_target_error.store(true, Relaxed);
                }
                let r = self.to_source(&req).await;
                done(self);
                r.map_err(ResponderEnd::SourceGone)
            }
            Outcome::Broken(_) if self.link.source_ended.load(Relaxed) => {
                // The source ended the session (its FATAL went to the
                // client): nothing is the target's fault, nothing more is
                // written.
                done(self);
                Err(ResponderEnd::ClientGone(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the source ended the session",
                )))
            }
            Outcome::Broken(detail) => {
                self.lose(live, &detail);
                self.route_metrics.target_failures_after_start.inc();
                // The client has part of an answer: end it with an error,
                // as Postgres ends a query that fails while sending rows.
                let msg = format!("pgshift: the target failed while sending this result: {detail}");
                let mut out = error_response(Severity::Error, sqlstate::CONNECTION_FAILURE, &msg);
                let in_txn = req.in_txn;
                if !in_txn {
                    put_message(&mut out, READY_FOR_QUERY, &[b"I"]);
                }
                let r = self.write_client(&out).await;
                done(self);
                if in_txn {
                    return Err(ResponderEnd::LostInTransaction(detail));
                }
                r.map_err(ResponderEnd::ClientGone)
            }
        }
    }

    /// Tells the health monitor how the target did. A query error is
    /// reported once the source has answered the same read (session/policies.rs).
    fn report(&self, outcome: &Outcome, req: &Routed) {
        use crate::health::{Db, Fault, Sample, SampleKind};
        let Some(h) = &self.link.health else {
            return;
        };
        let took = req.started.elapsed();
        let s = Sample::new(Db::Target, SampleKind::Read, None).shape(req.shape);
        let s = match outcome {
            // The target's own time: a wait for the session's target login
            // (or for its session state to be replayed) is not the target
            // being slow; the client's whole wait is in route_metrics.
            Outcome::Served => s.latency(req.target_started.map_or(took, |t| t.elapsed())),
            Outcome::Fallback(Fallback::QueryError | Fallback::Types, _) => return,
            // The guard stopped a "read" that writes: not the target's fault.
            Outcome::Fallback(Fallback::ServerError, d) if d.starts_with("25006") => s,
            // The client waited this long before the fallback began.
            Outcome::Fallback(Fallback::Timeout, _) => Sample {
                fault: Some(Fault::Timeout),
                ..s.latency(took)
            },
            // The source ended the session: the client left, not the target.
            Outcome::Broken(_) if self.link.source_ended.load(Relaxed) => return,
            Outcome::Fallback(Fallback::Connection, _) | Outcome::Broken(_) => Sample {
                fault: Some(Fault::Connection),
                ..s
            },
            Outcome::Fallback(Fallback::ServerError, _) => Sample {
                fault: Some(Fault::Server),
                ..s
            },
            Outcome::Fallback(Fallback::Setup, _) => Sample {
                fault: Some(Fault::Setup),
                ..s
            },
        };
        h.record(s);
    }

    /// The target failed inside a routed transaction: tell the client why
    /// before the session ends.
    async fn end_in_txn(&self, detail: &str) {
        let msg = format!(
            "pgshift: the target failed inside a read-only transaction routed to it: {detail}"
        );
        let out = error_response(Severity::Fatal, sqlstate::CONNECTION_FAILURE, &msg);
        let _ = self.write_client(&out).await;
        self.link.target_tx.store(b'I', Relaxed);
    }

    /// Runs the request on the source instead: its bytes go out as the
    /// client sent them, and the source's answer reaches the client through
    /// the usual pump.
    async fn to_source(&self, req: &Routed) -> io::Result<()> {
        // Wait until the source stream is between messages and the
        // frontend pump is not writing.
        self.link
            .wait_stream_free(&self.link.source_free, || {
                !self.link.frontend_writing.load(Relaxed)
                    && self.shared.server_at_boundary.load(Relaxed)
            })
            .await;
        self.shared.add_in_flight(1);
        self.link.put_into_source(1);
        if let Some(c) = self.capture {
            c.lock()
                .unwrap_or_else(|p| p.into_inner())
                .inject(&req.frames);
        }
        self.link.time_source_read(Some(req.started));
        crate::net::send_all(&mut SharedWriter(self.source), &req.frames).await
    }

    /// Puts requests of the proxy's own into the source stream (their
    /// answers are withheld by the backend pump): a routed transaction's
    /// statements when it moves to the source, or the session changes it
    /// made. The mirror sees them there too.
    async fn inject_source(&self, frames: &[u8], requests: u32) -> io::Result<()> {
        if requests == 0 {
            return Ok(());
        }
        self.link
            .wait_stream_free(&self.link.source_free, || {
                !self.link.frontend_writing.load(Relaxed)
                    && self.shared.server_at_boundary.load(Relaxed)
            })
            .await;
        self.shared.add_in_flight(requests);
        self.link.put_into_source(requests);
        self.link
            .source_owed
            .store(self.link.source_owed.load(Relaxed) + requests, Relaxed);
        if let Some(c) = self.capture {
            c.lock().unwrap_or_else(|p| p.into_inner()).inject(frames);
        }
        crate::net::send_all(&mut SharedWriter(self.source), frames).await
    }

    /// Waits until the client stream is free, then writes. An answer
    /// starts only once the source has answered everything sent to it
    /// before (a routed read that fell back to the source, the proxy's own
    /// requests): answers reach the client in request order.
    async fn write_client(&self, bytes: &[u8]) -> io::Result<()> {
        if !self.link.responder_writing.load(Relaxed) {
            self.link
                .wait_stream_free(&self.link.client_free, || {
                    self.link.source_ended.load(Relaxed)
                        || (!self.link.source_owes_responder()
                            && !self.link.backend_writing.load(Relaxed)
                            && self.shared.client_at_boundary.load(Relaxed))
                })
                .await;
            self.link.responder_writing.store(true, Relaxed);
        }
        if self.link.source_ended.load(Relaxed) {
            // The source's FATAL went to the client: Postgres would answer
            // nothing after it.
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the source ended the session",
            ));
        }
        crate::net::send_all(&mut SharedWriter(self.client), bytes).await
    }

    /// Brings the target session up to date: the read-only guard, the
    /// session state the source got, and closes. One round trip, only when
    /// something changed.
    async fn sync_state(&self, l: &mut Live) -> Result<(), (Fallback, String)> {
        let (restarts, ops, upto) = {
            let log = self.link.state.lock().unwrap_or_else(|p| p.into_inner());
            let from = if log.restarts == l.applied.0 {
                l.applied.1
            } else {
                0
            };
            let from = from.min(log.ops.len());
            (log.restarts, log.ops[from..].to_vec(), log.ops.len())
        };
        if ops.is_empty() && l.guarded && l.applied.0 == restarts {
            return Ok(());
        }
        let mut sql = String::new();
        let mut closes: Vec<Box<[u8]>> = Vec::new();
        for op in &ops {
            match op {
                StateOp::Sql(s) => {
                    sql.push_str(s.trim_end_matches([';', ' ', '\n', '\t', '\r']));
                    sql.push_str(";\n");
                }
                StateOp::Reset(s, drops) => {
                    sql.push_str(s.trim_end_matches([';', ' ', '\n', '\t', '\r']));
                    sql.push_str(";\n");
                    if *drops {
                        l.prepared.clear();
                    }
                }
                StateOp::Close(name) => {
                    if l.prepared.remove(name).is_some() {
                        closes.push(name.clone());
                    }
                }
                StateOp::CloseAll => closes.extend(l.prepared.drain().map(|(n, _)| n)),
            }
        }
        sql.push_str(GUARD);
        let mut out = BytesMut::new();
        put_message(&mut out, b'Q', &[sql.as_bytes(), b"\0"]);
        let mut readies = 1;
        if !closes.is_empty() {
            for n in &closes {
                put_message(&mut out, b'C', &[b"S", n, b"\0"]);
            }
            put_message(&mut out, b'S', &[]);
            readies += 1;
        }
        let timeout = self.router.settings().target_timeout;
        let r = tokio::time::timeout(timeout, async {
            crate::net::send_all(&mut l.conn.stream, &out).await?;
            let mut failed: Option<String> = None;
            while readies > 0 {
                let Some(m) =
                    read_message(&mut l.conn.stream, &mut l.conn.buf, self.max_message).await?
                else {
                    return Err(io::Error::other("target closed the connection"));
                };
                match m.tag {
                    READY_FOR_QUERY => readies -= 1,
                    ERROR_RESPONSE => {
                        let f = parse_error_fields(m.body());
                        failed.get_or_insert_with(|| {
                            format!("{} {}", f.code.unwrap_or("?"), f.message.unwrap_or(""))
                        });
                    }
                    _ => {}
                }
            }
            Ok(failed)
        })
        .await;
        match r {
            Ok(Ok(None)) => {
                l.applied = (restarts, upto);
                l.guarded = true;
                Ok(())
            }
            Ok(Ok(Some(err))) => {
                // The target cannot reproduce this session's state: its
                // reads stay on the source.
                self.link.pin(
                    self.route_metrics,
                    "the target session refused this session's settings",
                );
                info!(session_id = self.session_id, error = %err, "session settings failed on the target");
                Err((Fallback::Setup, err))
            }
            Ok(Err(e)) => Err((Fallback::Connection, e.to_string())),
            Err(_) => Err((
                Fallback::Timeout,
                "no answer while syncing session state".into(),
            )),
        }
    }

    /// Runs one routed request on the target and relays its answer.
    async fn on_target(&self, l: &mut Live, req: &mut Routed) -> Outcome {
        if let Err((why, detail)) = self.sync_state(l).await {
            return Outcome::Fallback(why, detail);
        }
        req.target_started = Some(Instant::now());
        // Statements this request binds, prepared here on first use (and
        // described, to see the types they name).
        // (Inside a routed transaction nothing can run elsewhere.)
        if !req.in_txn
            && req
                .statements
                .iter()
                .any(|(name, st)| l.local_typed.contains(name) && l.prepared.get(name) == Some(st))
        {
            return Outcome::Fallback(
                Fallback::Types,
                "a statement it binds names types by OIDs of the target's own".into(),
            );
        }
        let mut out = BytesMut::new();
        let mut own_answers = 0usize;
        let mut own_local_types = false;
        // The statements being described, in order.
        let mut describing = std::collections::VecDeque::new();
        for (name, st) in &req.statements {
            match l.prepared.get(name) {
                Some(have) if have == st => continue,
                Some(_) => {
                    put_message(&mut out, b'C', &[b"S", name, b"\0"]);
                    own_answers += 1;
                }
                None if l.prepared.len() >= MAX_PREPARED => {
                    return Outcome::Fallback(
                        Fallback::Setup,
                        "too many statements prepared on the target".into(),
                    )
                }
                None => {}
            }
            put_message(&mut out, b'P', &[name, b"\0", &st.query, b"\0", &st.types]);
            put_message(&mut out, b'D', &[b"S", name, b"\0"]);
            own_answers += 3;
            l.prepared.insert(name.clone(), st.clone());
            l.local_typed.remove(name);
            describing.push_back(name.clone());
        }
        // A request without a Sync of its own (Flush) gets one after the
        // proxy's Parses, so that their failure cannot swallow it.
        let mut own_sync = false;
        if req.flushed && own_answers > 0 {
            put_message(&mut out, b'S', &[]);
            own_sync = true;
        }
        out.put_slice(&req.frames);
        // What a Flush-ended request gets back before it is over.
        let mut expected = req.flushed.then(|| expected_answers(&req.frames));
        // The proxy's own request: its answer is not the client's.
        let relay = req.internal.is_none();
        let mut last_commit = false;
        let deadline =
            (!req.in_txn).then(|| Instant::now() + self.router.settings().target_timeout);
        let io_deadline = |d: Option<Instant>| async move {
            match d {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        let write = tokio::select! {
            r = crate::net::send_all(&mut l.conn.stream, &out) => r,
            _ = io_deadline(deadline) => return Outcome::Fallback(Fallback::Timeout, "target did not take the request in time".into()),
        };
        if let Err(e) = write {
            return Outcome::Fallback(Fallback::Connection, format!("write failed: {e}"));
        }
        let written_at = req.started.elapsed();
        let mut held = BytesMut::new();
        let mut sent_any = false;
        let mut own_failed: Option<String> = None;
        loop {
            // Until something reached the client, the deadline stands.
            let limit = if sent_any { None } else { deadline };
            let msg = tokio::select! {
                m = read_message(&mut l.conn.stream, &mut l.conn.buf, self.max_message) => m,
                _ = io_deadline(limit) => {
                    debug!(session_id = self.session_id, held = held.len(), own_answers,
                        buffered = l.conn.buf.len(), waited_ms = req.started.elapsed().as_millis() as u64,
                        written_ms = written_at.as_millis() as u64,
                        "routed read timed out");
                    return Outcome::Fallback(Fallback::Timeout, "no answer within routing.target_timeout_ms".into());
                }
            };
            let m = match msg {
                Ok(Some(m)) => m,
                Ok(None) => return self.failed(sent_any, "target closed the connection".into()),
                Err(e) => return self.failed(sent_any, format!("read failed: {e}")),
            };
            if own_answers > 0 && own_failed.is_none() {
                match m.tag {
                    b'1' | b'3' => {
                        own_answers -= 1;
                        continue;
                    }
                    // A statement's Describe: its parameter types, then its
                    // columns (or NoData). Result formats come with each
                    // Bind, so a record column counts whatever the format.
                    b't' | b'T' | b'n' => {
                        own_answers -= 1;
                        if m.tag != b'n' && names_local_types(m.tag, m.body(), false) {
                            if let Some(name) = describing.front() {
                                l.local_typed.insert(name.clone());
                            }
                            own_local_types |= !req.in_txn;
                        }
                        if m.tag != b't' {
                            describing.pop_front();
                        }
                        continue;
                    }
                    ERROR_RESPONSE => {
                        let f = parse_error_fields(m.body());
                        own_failed = Some(format!(
                            "preparing a statement failed: {} {}",
                            f.code.unwrap_or("?"),
                            f.message.unwrap_or("")
                        ));
                        // The rest of the batch is skipped up to its Sync.
                        continue;
                    }
                    _ => {}
                }
            }
            if own_sync && own_failed.is_none() && m.tag == READY_FOR_QUERY {
                // The answer to the proxy's own Sync after its Parses.
                own_sync = false;
                continue;
            }
            if own_local_types && own_failed.is_none() {
                // The client's request ran too; its answer is not relayed.
                if m.tag != READY_FOR_QUERY || req.flushed {
                    self.finish_request(l, req.flushed).await;
                }
                return Outcome::Fallback(
                    Fallback::Types,
                    "a statement it binds names types by OIDs of the target's own".into(),
                );
            }
            if let Some(why) = &own_failed {
                if m.tag == READY_FOR_QUERY {
                    l.prepared.clear();
                    l.local_typed.clear();
                    // Statements left on the connection would clash later.
                    return Outcome::Fallback(
                        Fallback::Setup,
                        format!("{why}; dropping the connection"),
                    );
                }
                continue;
            }
            match m.tag {
                // Inside a routed transaction every error is the client's
                // answer: nothing can run elsewhere.
                ERROR_RESPONSE if !sent_any && !req.in_txn => {
                    let f = parse_error_fields(m.body());
                    let code = f.code.unwrap_or("");
                    // A cancel (the client's, or its statement_timeout)
                    // is the client's answer.
                    if code != sqlstate::QUERY_CANCELED {
                        let detail = format!("{code} {}", f.message.unwrap_or(""));
                        let why = if is_fallback_code(code) {
                            Fallback::ServerError
                        } else {
                            Fallback::QueryError
                        };
                        // Let the target finish its answer, so the
                        // connection stays usable.
                        self.finish_request(l, req.flushed).await;
                        return Outcome::Fallback(why, detail);
                    }
                }
                // Type OIDs past the built-in ones differ between the
                // clusters: the source answers this one. (In a routed
                // transaction it cannot; see docs/routing.md.)
                b'T' | b't'
                    if !sent_any && !req.in_txn && names_local_types(m.tag, m.body(), true) =>
                {
                    self.finish_request(l, req.flushed).await;
                    return Outcome::Fallback(
                        Fallback::Types,
                        "the answer names types by OIDs of the target's own".into(),
                    );
                }
                // The source owns the session's parameters and LISTENs. A
                // session setting that lifts the read-only guard (any way
                // it was set) is put back before the next request.
                PARAMETER_STATUS => {
                    if guard_lifted(m.body()) {
                        l.guarded = false;
                    }
                    continue;
                }
                b'A' => continue,
                b'C' => last_commit = m.body().starts_with(b"COMMIT\0"),
                _ => {}
            }
            if relay {
                held.extend_from_slice(&m.frame);
                if req.shadow.as_mut().is_some_and(|t| t.feed(&m.frame)) {
                    req.shadow = None;
                }
            }
            let mut done = m.tag == READY_FOR_QUERY;
            if done {
                if let Ok(status) = parse_ready_for_query(m.body()) {
                    self.link.target_tx.store(status, Relaxed);
                    if status == b'I' {
                        l.committed = last_commit;
                    }
                }
            }
            if let Some(left) = expected.as_mut() {
                // A Flush-ended request is over once each of its messages
                // is answered, or one failed (the rest wait for a Sync).
                if m.tag == ERROR_RESPONSE {
                    *left = 0;
                } else if matches!(
                    m.tag,
                    b'1' | b'2' | b'3' | b't' | b'T' | b'n' | b'C' | b'I' | b's'
                ) {
                    *left = left.saturating_sub(1);
                }
                done |= *left == 0;
            }
            if done && relay {
                track_client_statements(l, &req.frames);
            }
            if done || held.len() >= RELAY_HOLD {
                if let Err(e) = self.write_client(&held).await {
                    // Nothing more can reach the client; the session ends
                    // through its pumps.
                    return Outcome::Broken(format!("client write failed: {e}"));
                }
                sent_any = true;
                held.clear();
            }
            if done {
                return Outcome::Served;
            }
        }
    }

    fn failed(&self, sent_any: bool, detail: String) -> Outcome {
        if sent_any {
            Outcome::Broken(detail)
        } else {
            Outcome::Fallback(Fallback::Connection, detail)
        }
    }

    /// Reads the rest of an answer the client will not get, up to its
    /// ReadyForQuery; a request that ended with a Flush gets a Sync first
    /// (it has none to end it).
    async fn finish_request(&self, l: &mut Live, flushed: bool) {
        if flushed
            && crate::net::send_all(&mut l.conn.stream, b"S\0\0\0\x04")
                .await
                .is_err()
        {
            l.mid_answer = true;
            return;
        }
        self.drain_to_ready(l).await;
    }

    /// Reads the rest of a failed answer, bounded by the timeout; a
    /// connection that does not get there is marked `mid_answer`, and
    /// dropped once the request is over.
    async fn drain_to_ready(&self, l: &mut Live) {
        let timeout = self.router.settings().target_timeout;
        let ready = tokio::time::timeout(timeout, async {
            while let Ok(Some(m)) =
                read_message(&mut l.conn.stream, &mut l.conn.buf, self.max_message).await
            {
                if m.tag == READY_FOR_QUERY {
                    return true;
                }
            }
            false
        })
        .await;
        if ready != Ok(true) {
            l.mid_answer = true;
        }
    }
}

/// OIDs below this are the built-in objects every cluster of a major
/// version shares (Postgres' FirstNormalObjectId).
const FIRST_NORMAL_OID: u32 = 16_384;
/// `record` and `record[]`: in binary they carry their members' type OIDs.
const RECORD_OIDS: [u32; 2] = [2249, 2287];

/// Whether a RowDescription (`T`) or ParameterDescription (`t`) names a
/// type by an OID the cluster gave it itself, or a record sent in binary
/// (whose members are named by OID inside the values; with
/// `formats_known` false, a statement's Describe, any record). Anything that does
/// not parse is left to the client to judge (false).
fn names_local_types(tag: u8, body: &[u8], formats_known: bool) -> bool {
    if tag == rows::PARAMETER_DESCRIPTION {
        return rows::parameter_description(body)
            .is_ok_and(|mut types| types.any(|oid| oid >= FIRST_NORMAL_OID));
    }
    // A field after a malformed one is not read; the fields before it are.
    rows::row_description(body).map_while(Result::ok).any(|f| {
        f.type_oid >= FIRST_NORMAL_OID
            || ((f.format == 1 || !formats_known) && RECORD_OIDS.contains(&f.type_oid))
    })
}

/// The answers a Flush-ended request gets (one per Parse, Bind, Close and
/// portal Describe, two per statement Describe, one final one per Execute;
/// rows aside).
fn expected_answers(frames: &[u8]) -> u32 {
    let mut n = 0;
    let mut at = 0;
    while let Ok(Some(h)) = crate::protocol::frame::decode_header(&frames[at..], usize::MAX >> 1) {
        if frames.len() - at < h.frame_len() {
            break;
        }
        n += match (h.tag, frames.get(at + 5)) {
            (b'P' | b'B' | b'C' | b'E', _) => 1,
            (b'D', Some(b'S')) => 2,
            (b'D', _) => 1,
            _ => 0,
        };
        at += h.frame_len();
    }
    n
}

/// A ParameterStatus saying the target session's default transaction mode
/// is read-write again.
fn guard_lifted(body: &[u8]) -> bool {
    let mut parts = body.split(|&b| b == 0);
    parts.next() == Some(b"default_transaction_read_only") && parts.next() == Some(b"off")
}

/// The client's own Parses and Closes that ran on the target connection:
/// its prepared statements there.
fn track_client_statements(l: &mut Live, frames: &[u8]) {
    let mut at = 0;
    while let Ok(Some(h)) = crate::protocol::frame::decode_header(&frames[at..], usize::MAX >> 1) {
        if frames.len() - at < h.frame_len() {
            break;
        }
        let mut body = &frames[at + 5..at + h.frame_len()];
        match h.tag {
            b'P' => {
                if let (Ok(name), Ok(query)) = (
                    crate::protocol::message::take_cstr(&mut body),
                    crate::protocol::message::take_cstr(&mut body),
                ) {
                    if !name.is_empty() {
                        l.prepared.insert(
                            name.into(),
                            Statement {
                                query: query.into(),
                                types: body.into(),
                            },
                        );
                    }
                }
            }
            b'C' if body.first() == Some(&b'S') => {
                let mut b = &body[1..];
                if let Ok(name) = crate::protocol::message::take_cstr(&mut b) {
                    l.prepared.remove(name);
                }
            }
            _ => {}
        }
        at += h.frame_len();
    }
}

impl Live {
    fn new(conn: Conn) -> Self {
        Self {
            conn,
            applied: (u64::MAX, 0),
            guarded: false,
            prepared: HashMap::new(),
            local_typed: Default::default(),
            committed: false,
            mid_answer: false,
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        // A polite goodbye where it cannot block (plain TCP); the target
        // otherwise logs the connection as reset.
        if let crate::net::Stream::Plain(tcp) = &self.conn.stream {
            let _ = tcp.try_write(b"X\0\0\0\x04");
        }
    }
}

/// Clears the responder's parked flag when its wait ends (or is dropped).
struct Unpark<'a>(&'a RouteLink);

impl Drop for Unpark<'_> {
    fn drop(&mut self) {
        self.0.set_responder_parked(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A RowDescription body with these (type oid, format) columns.
    fn row_description(cols: &[(u32, u16)]) -> Vec<u8> {
        let mut b = (cols.len() as u16).to_be_bytes().to_vec();
        for (oid, format) in cols {
            b.extend_from_slice(b"col\0");
            b.extend_from_slice(&0u32.to_be_bytes());
            b.extend_from_slice(&0u16.to_be_bytes());
            b.extend_from_slice(&oid.to_be_bytes());
            b.extend_from_slice(&(-1i16).to_be_bytes());
            b.extend_from_slice(&(-1i32).to_be_bytes());
            b.extend_from_slice(&format.to_be_bytes());
        }
        b
    }

    #[test]
    fn answers_naming_the_clusters_own_types_are_told_apart() {
        // int4, text, int4[]: built in, in either format.
        assert!(!names_local_types(
            b'T',
            &row_description(&[(23, 0), (25, 1), (1007, 1)]),
            true
        ));
        // A user type (an enum, a composite, an extension's type).
        assert!(names_local_types(
            b'T',
            &row_description(&[(23, 0), (16_500, 0)]),
            true
        ));
        // A record: in text it is just text, in binary its members carry OIDs.
        assert!(!names_local_types(
            b'T',
            &row_description(&[(2249, 0)]),
            true
        ));
        assert!(names_local_types(
            b'T',
            &row_description(&[(23, 1), (2249, 1)]),
            true
        ));
        assert!(names_local_types(
            b'T',
            &row_description(&[(2287, 1)]),
            true
        ));
        // ParameterDescription: a list of OIDs.
        let params = |oids: &[u32]| {
            let mut b = (oids.len() as u16).to_be_bytes().to_vec();
            oids.iter()
                .for_each(|o| b.extend_from_slice(&o.to_be_bytes()));
            b
        };
        assert!(!names_local_types(b't', &params(&[23, 25]), true));
        assert!(names_local_types(b't', &params(&[23, 20_000]), true));
        // Cut short: left to the client.
        let mut short = row_description(&[(16_500, 0)]);
        short.truncate(8);
        assert!(!names_local_types(b'T', &short, true));
        assert!(!names_local_types(b'T', &[], true));
        // A statement's Describe: the formats come later, a record counts.
        assert!(names_local_types(
            b'T',
            &row_description(&[(2249, 0)]),
            false
        ));
        assert!(!names_local_types(
            b'T',
            &row_description(&[(23, 0)]),
            false
        ));
    }
}
