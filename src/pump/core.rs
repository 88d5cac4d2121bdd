//! What every session keeps track of, whatever policies are on, and the
//! hooks through which policies take part.
//!
//! The core's two inspectors (`ClientSide`, `ServerSide`) do the session's
//! own bookkeeping: which message types a client may send, how many
//! requests are unanswered, the transaction status, the prepared
//! statements, when a draining session may end. Everything else a policy
//! does (mirroring, read routing, shadow reads, health samples, recording)
//! it does in the hooks below, called in the order the messages flow:
//!
//! Client -> source, for each message: first `ClientHooks::divert`
//! (complete messages) or `release_before` (streamed ones), where a policy
//! may take the message off the source stream (routing it elsewhere) or put
//! messages it held before it; then `released`, those held messages on
//! their way to the source; then `to_source`, the message itself, before
//! the core counts it. For the run of bytes about to be written: `hold`,
//! `forwarding`, `hold_seen`, `writing`.
//!
//! Source -> client, for each message: first `ServerHooks::intercept`, where
//! a policy may take the message over (an answer to a request of the
//! proxy's own, withheld from the client); then `message`, and at a
//! ReadyForQuery `ready`, the core's record of the status, `after_ready`.
//! For the run: `hold`, `forwarding`, `writing`.
//!
//! `()` implements both hook traits with nothing: a session without
//! policies, as the unit tests below run it.

use std::sync::atomic::Ordering::Relaxed;

use bytes::{Bytes, BytesMut};

use super::forward::{Hold, Inspector, Verdict};
use crate::protocol::frame::FrameError;
use crate::protocol::message::{
    is_frontend_tag, parse_close, parse_parse, parse_query, parse_ready_for_query, BIND, CLOSE,
    COPY_DONE, COPY_FAIL, DESCRIBE, EXECUTE, FLUSH, FUNCTION_CALL, PARSE, QUERY, READY_FOR_QUERY,
    SYNC, TERMINATE,
};
use crate::tracker::{PreparedStatements, Shared};

/// A client message on its way to the source, as the core decoded it.
#[derive(Debug, Clone, Copy)]
pub enum SourceMessage<'a> {
    Query {
        /// The whole body (the text and its terminator).
        body: &'a [u8],
        text: &'a [u8],
    },
    Parse {
        name: &'a [u8],
        query: &'a [u8],
        /// The parameter type count and OIDs.
        types: &'a [u8],
    },
    Close {
        kind: u8,
        name: &'a [u8],
    },
    /// Any other message: its tag and the first `peek` bytes of its body
    /// (the whole body when it was shown whole).
    Other {
        tag: u8,
        prefix: &'a [u8],
    },
}

/// What a policy made of a complete client message, before the source saw
/// it.
#[derive(Debug)]
pub enum Diverted {
    /// Nothing: it goes to the source.
    No,
    /// Taken off the source stream (held, or sent elsewhere).
    Taken,
    /// It goes to the source, after these messages the policy held.
    Release(Bytes),
}

/// The policies' part in the client -> source direction. Every method has
/// a default that does nothing.
pub trait ClientHooks {
    /// Beyond the messages the core reads whole (Query, Parse, Close,
    /// Terminate): whether this one's body is wanted whole (it is at most
    /// the core's `max_inspected`).
    fn wants_body(&self, _core: &ClientCore<'_>, _tag: u8, _len: usize) -> bool {
        false
    }
    /// How many leading body bytes a streamed message's hooks need.
    fn peek(&self, _core: &ClientCore<'_>, _tag: u8) -> usize {
        0
    }
    /// A complete message, first.
    fn divert(
        &mut self,
        _core: &mut ClientCore<'_>,
        _tag: u8,
        _body: &[u8],
    ) -> Result<Diverted, FrameError> {
        Ok(Diverted::No)
    }
    /// A streamed message cannot be held: messages held so far go to the
    /// source before it.
    fn release_before(&mut self, _core: &mut ClientCore<'_>) -> Option<Bytes> {
        None
    }
    /// Held client messages on their way to the source: returns them as
    /// the source gets them. The hook counts them (`ClientCore::count`).
    fn released(&mut self, core: &mut ClientCore<'_>, frames: Bytes) -> Bytes {
        core.count_frames(&frames);
        frames
    }
    /// A message on its way to the source, before the core counts it.
    fn to_source(&mut self, _core: &mut ClientCore<'_>, _msg: SourceMessage<'_>) -> Verdict {
        Verdict::Forward
    }
    /// Before a write (`false`) and after it (`true`).
    fn writing(&mut self, _core: &ClientCore<'_>, _done: bool) {}
    /// The bytes about to be written, as received.
    fn forwarding(&mut self, _bytes: &[u8]) {}
    /// Something that must finish before those bytes go out.
    fn hold(&mut self, _core: &ClientCore<'_>) -> Option<Hold<'_>> {
        None
    }
    /// Something that must finish after `forwarding` and before the write.
    fn hold_seen(&mut self) -> Option<Hold<'_>> {
        None
    }
}

/// The policies' part in the source -> client direction.
pub trait ServerHooks {
    /// Beyond ReadyForQuery: whether this message's body is wanted whole.
    fn wants_body(&self, _tag: u8) -> bool {
        false
    }
    /// Largest body a hook wants whole (the core's is ReadyForQuery's).
    fn max_inspected(&self) -> usize {
        16
    }
    /// How many leading body bytes a streamed message's hooks need.
    fn peek(&self, _core: &ServerCore<'_>, _tag: u8) -> usize {
        0
    }
    /// Every message first (`whole`: the body is complete, else the first
    /// `peek` bytes): `Some` when a policy takes it over. The core then
    /// keeps no account of it; a hook taking over the answer to a request
    /// the core counted calls `ServerCore::answered` at its ReadyForQuery.
    fn intercept(
        &mut self,
        _core: &ServerCore<'_>,
        _tag: u8,
        _bytes: &[u8],
        _whole: bool,
    ) -> Result<Option<Verdict>, FrameError> {
        Ok(None)
    }
    /// A message the client gets (a ReadyForQuery too, before `ready`).
    fn message(&mut self, _core: &ServerCore<'_>, _tag: u8, _bytes: &[u8], _whole: bool) {}
    /// A ReadyForQuery the client gets, before the core records it.
    fn ready(&mut self, _core: &ServerCore<'_>, _status: u8) {}
    /// After the core recorded it: `in_flight` requests are unanswered.
    fn after_ready(&mut self, _core: &ServerCore<'_>, _in_flight: u32) {}
    /// Before a write (`false`) and after it (`true`).
    fn writing(&mut self, _core: &ServerCore<'_>, _done: bool) {}
    /// The bytes about to be written to the client, as received.
    fn forwarding(&mut self, _bytes: &[u8]) {}
    /// Something that must finish before those bytes go out.
    fn hold(&mut self) -> Option<Hold<'_>> {
        None
    }
}

impl ClientHooks for () {}
impl ServerHooks for () {}

/// The client side's own state.
pub struct ClientCore<'a> {
    pub shared: &'a Shared,
    /// The session's prepared statements (the one map every policy reads).
    pub statements: &'a mut PreparedStatements,
    pub max_inspected: usize,
    /// Syncs sent since the last Execute or Query. Postgres ignores Syncs
    /// that reach it during COPY FROM STDIN, and a driver sends one right
    /// after the Execute that starts the copy: those get no ReadyForQuery
    /// and are taken back out of `in_flight` when the copy ends.
    syncs_since_execute: u32,
    /// Client messages seen.
    msg_no: u64,
    /// The run being assembled holds bytes for the source.
    run_source: bool,
    /// The client sent Terminate.
    terminating: bool,
}

impl<'a> ClientCore<'a> {
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
            msg_no: 0,
            run_source: false,
            terminating: false,
        }
    }

    /// The number of the client message being looked at (from 1).
    pub fn msg_no(&self) -> u64 {
        self.msg_no
    }

    /// The run about to be written holds bytes for the source.
    pub fn run_holds_source_bytes(&self) -> bool {
        self.run_source
    }

    /// The client sent Terminate.
    pub fn terminating(&self) -> bool {
        self.terminating
    }

    /// Nothing in flight on the source, outside a block and a batch.
    pub fn source_idle(&self) -> bool {
        let s = self.shared;
        s.in_flight.load(Relaxed) == 0
            && s.tx_status.load(Relaxed) == b'I'
            && !s.mid_batch.load(Relaxed)
    }

    /// Nothing in flight and no batch open: this message starts a request.
    pub fn at_request_start(&self) -> bool {
        self.shared.in_flight.load(Relaxed) == 0 && !self.shared.mid_batch.load(Relaxed)
    }

    /// Every client message: a type a client may send, counted for idle
    /// detection and numbered.
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

    /// Request bookkeeping for a message the source gets (Query, Parse and
    /// Close are counted where they are decoded).
    pub fn count(&mut self, tag: u8) {
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

    /// `count` for each complete message of `frames`.
    pub fn count_frames(&mut self, frames: &[u8]) {
        let mut at = 0;
        while let Ok(Some(h)) =
            crate::protocol::frame::decode_header(&frames[at..], usize::MAX >> 1)
        {
            if frames.len() - at < h.frame_len() {
                break;
            }
            self.count(h.tag);
            at += h.frame_len();
        }
    }
}

/// Client -> source: the core's bookkeeping with the policies' hooks.
pub struct ClientSide<'a, H> {
    pub core: ClientCore<'a>,
    pub hooks: H,
}

impl<'a, H: ClientHooks> ClientSide<'a, H> {
    pub fn new(core: ClientCore<'a>, hooks: H) -> Self {
        Self { core, hooks }
    }

    /// A streamed message (or one shown whole that the core does not
    /// decode) on its way to the source.
    fn other_to_source(&mut self, tag: u8, prefix: &[u8]) -> Verdict {
        let v = self
            .hooks
            .to_source(&mut self.core, SourceMessage::Other { tag, prefix });
        self.core.count(tag);
        v
    }

    /// A complete message on its way to the source.
    fn whole_to_source(&mut self, tag: u8, body: &[u8]) -> Result<Verdict, FrameError> {
        let core = &mut self.core;
        Ok(match tag {
            QUERY => {
                let text = parse_query(body)?;
                let v = self
                    .hooks
                    .to_source(core, SourceMessage::Query { body, text });
                core.shared.add_in_flight(1);
                core.syncs_since_execute = 0;
                v
            }
            PARSE => {
                let (name, query) = parse_parse(body)?;
                let types = &body[name.len() + query.len() + 2..];
                let v = self
                    .hooks
                    .to_source(core, SourceMessage::Parse { name, query, types });
                core.shared.mid_batch.store(true, Relaxed);
                core.statements.on_parse_typed(name, query, types);
                v
            }
            CLOSE => {
                let (kind, name) = parse_close(body)?;
                let v = self
                    .hooks
                    .to_source(core, SourceMessage::Close { kind, name });
                core.shared.mid_batch.store(true, Relaxed);
                if kind == b'S' {
                    core.statements.on_close(name);
                }
                v
            }
            TERMINATE => {
                core.terminating = true;
                Verdict::ForwardAndStop
            }
            // A message shown whole only because a policy might have held
            // it: as if streamed.
            _ => self.other_to_source(tag, body),
        })
    }
}

/// `frames` written ahead of whatever `v` says about the message.
pub fn before(frames: Bytes, v: Verdict) -> Verdict {
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

impl<H: ClientHooks> Inspector for ClientSide<'_, H> {
    #[inline]
    fn wants_body(&self, tag: u8, body_len: usize) -> bool {
        matches!(tag, QUERY | PARSE | CLOSE | TERMINATE)
            || (body_len <= self.core.max_inspected
                && self.hooks.wants_body(&self.core, tag, body_len))
    }

    fn max_inspected(&self) -> usize {
        self.core.max_inspected
    }

    fn peek(&self, tag: u8) -> usize {
        self.hooks.peek(&self.core, tag)
    }

    #[inline]
    fn header(&mut self, tag: u8, prefix: &[u8]) -> Result<Verdict, FrameError> {
        self.core.saw_message(tag)?;
        let held = self.hooks.release_before(&mut self.core);
        self.core.run_source = true;
        Ok(match held {
            Some(frames) => {
                let frames = self.hooks.released(&mut self.core, frames);
                let v = self.other_to_source(tag, prefix);
                before(frames, v)
            }
            None => self.other_to_source(tag, prefix),
        })
    }

    fn inspect(&mut self, tag: u8, body: &[u8]) -> Result<Verdict, FrameError> {
        self.core.saw_message(tag)?;
        match self.hooks.divert(&mut self.core, tag, body)? {
            Diverted::Taken => Ok(Verdict::Drop),
            Diverted::Release(frames) => {
                let frames = self.hooks.released(&mut self.core, frames);
                self.core.run_source = true;
                let v = self.whole_to_source(tag, body)?;
                Ok(before(frames, v))
            }
            Diverted::No => {
                self.core.run_source = true;
                self.whole_to_source(tag, body)
            }
        }
    }

    fn writing(&mut self, done: bool, at_boundary: bool) {
        self.core
            .shared
            .server_at_boundary
            .store(done && at_boundary, Relaxed);
        self.hooks.writing(&self.core, done);
        if done {
            self.core.run_source = false;
        }
    }

    fn forwarding(&mut self, bytes: &[u8]) {
        self.hooks.forwarding(bytes);
    }

    fn hold(&mut self) -> Option<Hold<'_>> {
        self.hooks.hold(&self.core)
    }

    fn hold_seen(&mut self) -> Option<Hold<'_>> {
        self.hooks.hold_seen()
    }
}

/// The source side's own state.
pub struct ServerCore<'a> {
    pub shared: &'a Shared,
}

impl ServerCore<'_> {
    /// A request the core counted is answered (its ReadyForQuery said
    /// `status`): returns how many remain unanswered.
    pub fn answered(&self, status: u8) -> u32 {
        self.shared.tx_status.store(status, Relaxed);
        self.shared.sub_in_flight(1)
    }
}

/// Source -> client: follows ReadyForQuery for the transaction status and
/// the end of each request, and ends a draining session once it is idle.
pub struct ServerSide<'a, H> {
    pub core: ServerCore<'a>,
    pub hooks: H,
}

impl<'a, H: ServerHooks> ServerSide<'a, H> {
    pub fn new(shared: &'a Shared, hooks: H) -> Self {
        Self {
            core: ServerCore { shared },
            hooks,
        }
    }
}

impl<H: ServerHooks> Inspector for ServerSide<'_, H> {
    #[inline]
    fn wants_body(&self, tag: u8, _body_len: usize) -> bool {
        tag == READY_FOR_QUERY || self.hooks.wants_body(tag)
    }

    fn max_inspected(&self) -> usize {
        self.hooks.max_inspected().max(16)
    }

    fn peek(&self, tag: u8) -> usize {
        self.hooks.peek(&self.core, tag)
    }

    #[inline]
    fn header(&mut self, tag: u8, prefix: &[u8]) -> Result<Verdict, FrameError> {
        if let Some(v) = self.hooks.intercept(&self.core, tag, prefix, false)? {
            return Ok(v);
        }
        self.hooks.message(&self.core, tag, prefix, false);
        Ok(Verdict::Forward)
    }

    fn inspect(&mut self, tag: u8, body: &[u8]) -> Result<Verdict, FrameError> {
        if let Some(v) = self.hooks.intercept(&self.core, tag, body, true)? {
            return Ok(v);
        }
        self.hooks.message(&self.core, tag, body, true);
        if tag != READY_FOR_QUERY {
            return Ok(Verdict::Forward);
        }
        let status = parse_ready_for_query(body)?;
        self.hooks.ready(&self.core, status);
        let left = self.core.answered(status);
        self.hooks.after_ready(&self.core, left);
        let s = self.core.shared;
        if s.draining.load(Relaxed) && s.is_idle() {
            return Ok(Verdict::ForwardAndStop);
        }
        Ok(Verdict::Forward)
    }

    fn writing(&mut self, done: bool, at_boundary: bool) {
        self.core
            .shared
            .client_at_boundary
            .store(done && at_boundary, Relaxed);
        self.hooks.writing(&self.core, done);
    }

    fn forwarding(&mut self, bytes: &[u8]) {
        self.hooks.forwarding(bytes);
    }

    fn hold(&mut self) -> Option<Hold<'_>> {
        self.hooks.hold()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_inspector_counts_requests_and_rejects_unknown_types() {
        let shared = Shared::default();
        let mut st = PreparedStatements::new(10, 1024);
        let mut i = ClientSide::new(ClientCore::new(&shared, &mut st, 1024), ());
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
        let mut f = ClientSide::new(ClientCore::new(&shared, &mut st, 1024), ());
        f.header(BIND, b"").unwrap();
        f.header(EXECUTE, b"").unwrap();
        f.header(SYNC, b"").unwrap();
        f.header(b'd', b"").unwrap();
        f.header(COPY_DONE, b"").unwrap();
        f.header(SYNC, b"").unwrap();
        let mut b = ServerSide::new(&shared, ());
        b.inspect(READY_FOR_QUERY, b"I").unwrap();
        assert_eq!(shared.in_flight.load(Relaxed), 0);
        assert!(shared.is_idle());
    }

    #[test]
    fn extended_messages_without_sync_are_not_idle() {
        let shared = Shared::default();
        let mut st = PreparedStatements::new(10, 1024);
        let mut f = ClientSide::new(ClientCore::new(&shared, &mut st, 1024), ());
        f.inspect(PARSE, b"\0select 1\0\0\0").unwrap();
        f.header(BIND, b"").unwrap();
        assert!(!shared.is_idle());
        f.header(SYNC, b"").unwrap();
        ServerSide::new(&shared, ())
            .inspect(READY_FOR_QUERY, b"I")
            .unwrap();
        assert!(shared.is_idle());
    }

    #[test]
    fn backend_inspector_tracks_status_and_stops_when_draining_and_idle() {
        let shared = Shared::default();
        shared.in_flight.store(2, Relaxed);
        let mut b = ServerSide::new(&shared, ());
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

    // ---- A session run in memory: real pumps, a scripted source.

    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// A source that answers each Query with CommandComplete and each Sync
    /// with ReadyForQuery (Idle), until its client closes.
    async fn scripted_source(mut io: tokio::io::DuplexStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while buf.len() >= 5 {
                let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize + 1;
                if buf.len() < len {
                    break;
                }
                let tag = buf[0];
                buf.drain(..len);
                let answer = match tag {
                    QUERY => [msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")].concat(),
                    SYNC => msg(b'Z', b"I"),
                    PARSE => msg(b'1', b""),
                    TERMINATE => return,
                    _ => Vec::new(),
                };
                if io.write_all(&answer).await.is_err() {
                    return;
                }
            }
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Hooks that write down what they are called with, and take every
    /// Query whose text starts with "divert" off the source stream.
    #[derive(Clone, Default)]
    struct Journal(Arc<Mutex<Vec<String>>>);

    impl Journal {
        fn note(&self, s: String) {
            self.0.lock().unwrap().push(s);
        }
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl ClientHooks for Journal {
        fn divert(
            &mut self,
            core: &mut ClientCore<'_>,
            tag: u8,
            body: &[u8],
        ) -> Result<Diverted, FrameError> {
            self.note(format!("divert {} #{}", tag as char, core.msg_no()));
            Ok(if body.starts_with(b"divert") {
                Diverted::Taken
            } else {
                Diverted::No
            })
        }
        fn to_source(&mut self, core: &mut ClientCore<'_>, msg: SourceMessage<'_>) -> Verdict {
            let what = match msg {
                SourceMessage::Query { text, .. } => {
                    format!("query {}", String::from_utf8_lossy(text))
                }
                SourceMessage::Parse { query, .. } => {
                    format!("parse {}", String::from_utf8_lossy(query))
                }
                SourceMessage::Close { .. } => "close".into(),
                SourceMessage::Other { tag, .. } => format!("other {}", tag as char),
            };
            // Before the core counts the message.
            self.note(format!(
                "to_source {what} in_flight={}",
                core.shared.in_flight.load(Relaxed)
            ));
            Verdict::Forward
        }
        fn forwarding(&mut self, bytes: &[u8]) {
            self.note(format!("forwarding {}", bytes.len()));
        }
        fn writing(&mut self, _core: &ClientCore<'_>, done: bool) {
            self.note(format!("writing done={done}"));
        }
    }

    impl ServerHooks for Journal {
        fn message(&mut self, _core: &ServerCore<'_>, tag: u8, _bytes: &[u8], whole: bool) {
            self.note(format!("message {} whole={whole}", tag as char));
        }
        fn ready(&mut self, core: &ServerCore<'_>, status: u8) {
            self.note(format!(
                "ready {} in_flight={}",
                status as char,
                core.shared.in_flight.load(Relaxed)
            ));
        }
        fn after_ready(&mut self, _core: &ServerCore<'_>, in_flight: u32) {
            self.note(format!("after_ready in_flight={in_flight}"));
        }
    }

    /// Runs a session of `requests` (each written at once, read back until
    /// `answers` ReadyForQuery messages came) through the core with the
    /// journal's hooks.
    async fn session(requests: &[Vec<u8>], answers: usize) -> (Shared, Vec<String>, Vec<u8>) {
        let (mut app, client_end) = tokio::io::duplex(1 << 16);
        let (proxy_end, source_end) = tokio::io::duplex(1 << 16);
        let source = tokio::spawn(scripted_source(source_end));
        let shared = Shared::default();
        let journal = Journal::default();
        let mut st = PreparedStatements::new(10, 1 << 16);
        let (mut client_rd, mut client_wr) = tokio::io::split(client_end);
        let (mut proxy_rd, mut proxy_wr) = tokio::io::split(proxy_end);
        let mut front =
            ClientSide::new(ClientCore::new(&shared, &mut st, 1 << 16), journal.clone());
        let mut back = ServerSide::new(&shared, journal.clone());
        let (mut cbuf, mut sbuf) = (BytesMut::new(), BytesMut::new());
        let to_source = crate::pump::pump(&mut client_rd, &mut proxy_wr, &mut cbuf, &mut front);
        let to_client = crate::pump::pump(&mut proxy_rd, &mut client_wr, &mut sbuf, &mut back);
        let app_side = async {
            let mut got = Vec::new();
            for r in requests {
                app.write_all(r).await.unwrap();
            }
            let mut chunk = [0u8; 4096];
            while got.windows(6).filter(|w| w == b"Z\0\0\0\x05I").count() < answers {
                let n = app.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the session closed early");
                got.extend_from_slice(&chunk[..n]);
            }
            app.write_all(&msg(TERMINATE, b"")).await.unwrap();
            got
        };
        // The client pump ends at Terminate; the server pump when the
        // source closes after it.
        let (got, a, _) = tokio::join!(app_side, to_source, to_client);
        a.unwrap();
        source.await.unwrap();
        drop(front);
        let journal = journal.take();
        (shared, journal, got)
    }

    #[tokio::test]
    async fn hooks_are_called_in_message_order_around_the_cores_bookkeeping() {
        let (shared, journal, got) = session(&[msg(QUERY, b"select 1\0")], 1).await;
        assert_eq!(got, [msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")].concat());
        assert!(shared.is_idle());
        assert_eq!(
            journal[..4],
            [
                "divert Q #1",
                "to_source query select 1 in_flight=0",
                "forwarding 14",
                "writing done=false",
            ]
        );
        // The answer: CommandComplete streamed, ReadyForQuery read whole,
        // with the core's count taken between `ready` and `after_ready`.
        let answer: Vec<&String> = journal
            .iter()
            .filter(|l| l.starts_with("message") || l.contains("ready"))
            .collect();
        assert_eq!(
            answer,
            [
                "message C whole=false",
                "message Z whole=true",
                "ready I in_flight=1",
                "after_ready in_flight=0",
            ]
        );
    }

    #[tokio::test]
    async fn a_diverted_message_is_not_forwarded_nor_counted() {
        let mut parse = b"s\0select 2\0".to_vec();
        parse.extend_from_slice(&[0, 0]);
        let requests = [
            msg(QUERY, b"divert me\0"),
            msg(PARSE, &parse),
            msg(SYNC, b""),
            msg(QUERY, b"select 3\0"),
        ];
        // The diverted Query gets no answer from the source: two come.
        let (shared, journal, got) = session(&requests, 2).await;
        assert!(shared.is_idle(), "nothing left in flight");
        assert!(!journal.iter().any(|l| l.contains("query divert")));
        assert!(journal
            .iter()
            .any(|l| l == "to_source parse select 2 in_flight=0"));
        assert!(journal.iter().any(|l| l == "to_source other S in_flight=0"));
        // (How many are in flight then depends on how fast the source was.)
        assert!(journal
            .iter()
            .any(|l| l.starts_with("to_source query select 3 ")));
        assert_eq!(
            got,
            [
                msg(b'1', b""),
                msg(b'Z', b"I"),
                msg(b'C', b"SELECT 1\0"),
                msg(b'Z', b"I")
            ]
            .concat()
        );
    }
}
