//! The recording's writer thread: drains the per-thread buffers every few
//! milliseconds, cuts each session's byte runs into messages, and appends
//! them as records to the current segment, rotating by size.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use super::format::{self, SegmentHeader};
use super::{segment_path, Entry, Shard, Sink};
use crate::protocol::frame::{decode_header, FrameError, HEADER_LEN};

/// How often the buffers are drained. Short enough that a buffer of a
/// few MiB per thread holds the bursts of a busy proxy.
const DRAIN_EVERY: Duration = Duration::from_millis(20);

/// The segment being written.
pub(super) struct SegmentFile {
    out: BufWriter<File>,
    number: u32,
    start_unix_us: u64,
    bytes: u64,
}

impl SegmentFile {
    pub(super) fn create(
        base: &Path,
        number: u32,
        redacted: bool,
        start_unix_us: u64,
    ) -> anyhow::Result<Self> {
        let path = segment_path(base, number);
        // A capture holds every client's statements and parameters: the
        // segments are 0600 and directories the recording creates 0700
        // (`private_files`); an existing parent is left as it is.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::private_files::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        }
        let file = crate::private_files::create_new(&path)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let header = SegmentHeader {
            version: format::VERSION,
            flags: if redacted { format::FLAG_REDACTED } else { 0 },
            segment: number,
            start_unix_us,
        };
        out.write_all(&header.encode())
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        Ok(Self {
            out,
            number,
            start_unix_us,
            bytes: format::HEADER_LEN as u64,
        })
    }

    fn finish(mut self) -> std::io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()
    }
}

/// What the writer knows of an open session.
struct Session {
    params: Box<[(Vec<u8>, Vec<u8>)]>,
    started_unix_us: u64,
    /// Bytes of a message not complete yet.
    partial: Vec<u8>,
    /// Last time written, so times never go backwards within a session.
    last_us: u64,
}

pub(super) struct Writer {
    sink: Arc<Sink>,
    file: Option<SegmentFile>,
    sessions: HashMap<u64, Session>,
    /// Record body scratch and encoded records waiting for the file.
    body: BytesMut,
    out: BytesMut,
    /// Drained shard contents, kept to reuse their allocations.
    spare: Vec<Shard>,
}

impl Writer {
    pub(super) fn new(sink: Arc<Sink>, file: SegmentFile) -> Self {
        Self {
            spare: (0..sink.shards.len()).map(|_| Shard::default()).collect(),
            sink,
            file: Some(file),
            sessions: HashMap::new(),
            body: BytesMut::new(),
            out: BytesMut::new(),
        }
    }

    pub(super) fn run(mut self) {
        loop {
            let last = !self.sink.active.load(Relaxed);
            if let Err(e) = self.drain() {
                self.sink.fail(e);
                self.discard();
                break;
            }
            if last {
                let r = self.end_open_sessions().and_then(|()| {
                    self.file
                        .take()
                        .map_or(Ok(()), |f| f.finish().map_err(|e| e.to_string()))
                });
                if let Err(e) = r {
                    self.sink.fail(e);
                }
                break;
            }
            std::thread::park_timeout(DRAIN_EVERY);
        }
        self.sink.finished.store(true, Relaxed);
    }

    /// After a failure: nothing more is written; buffered bytes are let go.
    fn discard(&mut self) {
        for shard in &self.sink.shards {
            let mut s = shard.lock().unwrap_or_else(|p| p.into_inner());
            s.entries.clear();
            s.data.clear();
        }
        self.file = None;
    }

    /// Takes every shard's entries and writes them in time order.
    fn drain(&mut self) -> Result<(), String> {
        for (i, shard) in self.sink.shards.iter().enumerate() {
            let mut s = shard.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::swap(&mut *s, &mut self.spare[i]);
        }
        let spare = std::mem::take(&mut self.spare);
        // Sessions stay on one thread, so one shard holds all of a
        // session's entries in order; a stable sort by time merges shards
        // without reordering any session.
        let mut order: Vec<(u64, usize, usize)> = Vec::new();
        for (i, shard) in spare.iter().enumerate() {
            order.extend(shard.entries.iter().enumerate().map(|(j, e)| {
                let at = match e {
                    Entry::Start { at_us, .. }
                    | Entry::Bytes { at_us, .. }
                    | Entry::End { at_us, .. } => *at_us,
                };
                (at, i, j)
            }));
        }
        order.sort_by_key(|&(at, i, _)| (at, i));
        let mut result = Ok(());
        for &(_, i, j) in &order {
            result = self.entry(&spare[i].entries[j], &spare[i].data);
            if result.is_err() {
                break;
            }
        }
        self.spare = spare;
        for s in &mut self.spare {
            s.entries.clear();
            s.data.clear();
            // Let a burst's memory go once it has passed.
            if s.data.capacity() > self.sink.shard_cap {
                s.data.shrink_to(self.sink.shard_cap);
            }
        }
        result?;
        self.flush()
    }

    fn entry(&mut self, e: &Entry, data: &[u8]) -> Result<(), String> {
        match e {
            Entry::Start {
                session,
                at_us,
                params,
            } => {
                self.sessions.insert(
                    *session,
                    Session {
                        params: params.clone(),
                        started_unix_us: *at_us,
                        partial: Vec::new(),
                        last_us: *at_us,
                    },
                );
                self.write_start(*session, false)
            }
            Entry::Bytes {
                session,
                at_us,
                start,
                len,
            } => self.bytes(*session, *at_us, &data[*start..*start + *len]),
            Entry::End {
                session,
                at_us,
                incomplete,
            } => {
                let Some(s) = self.sessions.remove(session) else {
                    return Ok(());
                };
                let mut flags = if *incomplete {
                    format::END_INCOMPLETE
                } else {
                    0
                };
                if !s.partial.is_empty() {
                    flags |= format::END_INCOMPLETE;
                }
                self.write_end(*session, (*at_us).max(s.last_us), flags)
            }
        }
    }

    /// A run of client bytes: completes the session's partial message and
    /// writes every whole message in it.
    fn bytes(&mut self, session: u64, at_us: u64, run: &[u8]) -> Result<(), String> {
        // The session stays in the map meanwhile: a rotation repeats its START.
        let Some(s) = self.sessions.get_mut(&session) else {
            return Ok(()); // ended (incomplete) already
        };
        let at_us = at_us.max(s.last_us);
        s.last_us = at_us;
        let mut joined = std::mem::take(&mut s.partial);
        let mut rest: &[u8] = if joined.is_empty() {
            run
        } else {
            joined.extend_from_slice(run);
            &joined[..]
        };
        let max = self.sink.config.max_message_bytes;
        loop {
            let why = match decode_header(rest, max) {
                Ok(Some(h)) if rest.len() >= h.frame_len() => {
                    let payload = &rest[HEADER_LEN..h.frame_len()];
                    match self.message(session, at_us, h.tag, payload) {
                        Ok(()) => {
                            rest = &rest[h.frame_len()..];
                            continue;
                        }
                        Err(why) => why,
                    }
                }
                Ok(_) => break,
                Err(FrameError::TooLarge { len, .. }) => {
                    format!("a {len}-byte message is over record.max_message_bytes")
                }
                Err(e) => e.to_string(),
            };
            tracing::debug!(session, why, "session no longer recorded");
            self.sessions.remove(&session);
            self.sink.stats.sessions_incomplete.fetch_add(1, Relaxed);
            return self.write_end(session, at_us, format::END_INCOMPLETE);
        }
        let rest = rest.to_vec();
        if let Some(s) = self.sessions.get_mut(&session) {
            s.partial = rest;
        }
        Ok(())
    }

    /// One whole client message: left out, redacted or written as is.
    fn message(&mut self, session: u64, at_us: u64, tag: u8, payload: &[u8]) -> Result<(), String> {
        if tag == b'p' {
            // Password, SASL or GSS response: never recorded.
            self.sink.stats.passwords_skipped.fetch_add(1, Relaxed);
            return Ok(());
        }
        let redacted;
        let payload = match tag {
            b'B' | b'F' if self.sink.config.redact_parameters => {
                redacted = redact(tag, payload).ok_or("cannot parse a message to redact it")?;
                &redacted[..]
            }
            _ => payload,
        };
        let file = self.file.as_ref().ok_or("no segment open")?;
        self.body.clear();
        format::message_body(
            &mut self.body,
            session,
            at_us.saturating_sub(file.start_unix_us),
            tag,
            payload,
        );
        self.record(format::KIND_MESSAGE)?;
        self.sink.stats.messages.fetch_add(1, Relaxed);
        self.sink.metrics.messages.inc();
        Ok(())
    }

    fn write_start(&mut self, session: u64, continued: bool) -> Result<(), String> {
        let (Some(file), Some(s)) = (self.file.as_ref(), self.sessions.get(&session)) else {
            return Ok(());
        };
        self.body.clear();
        format::start_body(
            &mut self.body,
            session,
            if continued {
                0
            } else {
                s.started_unix_us.saturating_sub(file.start_unix_us)
            },
            s.started_unix_us,
            if continued {
                format::START_CONTINUED
            } else {
                0
            },
            &s.params,
        );
        self.record(format::KIND_START)
    }

    fn write_end(&mut self, session: u64, at_us: u64, flags: u8) -> Result<(), String> {
        let Some(file) = self.file.as_ref() else {
            return Ok(());
        };
        self.body.clear();
        format::end_body(
            &mut self.body,
            session,
            at_us.saturating_sub(file.start_unix_us),
            flags,
        );
        self.record(format::KIND_END)
    }

    /// Sessions still open when recording stops.
    fn end_open_sessions(&mut self) -> Result<(), String> {
        let at = crate::clock::now_us();
        let mut open: Vec<u64> = self.sessions.keys().copied().collect();
        open.sort_unstable();
        for id in open {
            self.sessions.remove(&id);
            self.write_end(id, at, format::END_INCOMPLETE | format::END_STILL_OPEN)?;
        }
        self.flush()
    }

    /// Encodes the body as a record; rotates when the segment is full.
    fn record(&mut self, kind: u8) -> Result<(), String> {
        let before = self.out.len();
        format::put_record(&mut self.out, kind, &self.body);
        let n = (self.out.len() - before) as u64;
        let full = match self.file.as_mut() {
            Some(f) => {
                f.bytes += n;
                f.bytes >= self.sink.config.max_file_bytes
            }
            None => false,
        };
        if self.out.len() >= 1 << 20 {
            self.flush()?;
        }
        if full {
            self.rotate()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        if self.out.is_empty() {
            return Ok(());
        }
        let Some(f) = self.file.as_mut() else {
            self.out.clear();
            return Ok(());
        };
        let n = self.out.len() as u64;
        let path = segment_path(&self.sink.path, f.number);
        f.out
            .write_all(&self.out)
            .and_then(|()| f.out.flush())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        self.out.clear();
        self.sink.stats.bytes_written.fetch_add(n, Relaxed);
        self.sink.metrics.bytes.inc_by(n);
        Ok(())
    }

    fn path_of(&self, n: u32) -> PathBuf {
        segment_path(&self.sink.path, n)
    }

    /// Closes the full segment and starts the next, repeating the START of
    /// every open session so each segment stands alone.
    fn rotate(&mut self) -> Result<(), String> {
        self.flush()?;
        let Some(old) = self.file.take() else {
            return Ok(());
        };
        let next = old.number + 1;
        let old_path = self.path_of(old.number);
        // The closed segment is flushed here and made durable on a thread
        // of its own: an fsync can take seconds on a busy disk, and the
        // buffers must keep draining meanwhile (a bench run that fsynced
        // here lost two sessions' recordings to full buffers).
        let mut out = old.out;
        out.flush()
            .map_err(|e| format!("cannot finish {}: {e}", old_path.display()))?;
        let synced = std::thread::Builder::new()
            .name("pgshift-record-sync".into())
            .spawn(move || {
                if let Err(e) = out.get_ref().sync_data() {
                    tracing::warn!(error = %e, file = %old_path.display(), "cannot sync a finished capture segment");
                }
            });
        if let Err(e) = synced {
            tracing::warn!(error = %e, "cannot start a thread to sync a capture segment");
        }
        let file = SegmentFile::create(
            &self.sink.path,
            next,
            self.sink.config.redact_parameters,
            crate::clock::now_us(),
        )
        .map_err(|e| format!("{e:#}"))?;
        self.file = Some(file);
        self.sink.stats.segment.store(next, Relaxed);
        let keep = self.sink.config.max_files;
        if keep > 0 && next > keep {
            let gone = self.path_of(next - keep);
            if std::fs::remove_file(&gone).is_ok() {
                self.sink.stats.segments_deleted.fetch_add(1, Relaxed);
            }
        }
        let mut open: Vec<u64> = self.sessions.keys().copied().collect();
        open.sort_unstable();
        for id in open {
            self.write_start(id, true)?;
        }
        Ok(())
    }
}

/// A Bind or FunctionCall with every parameter value replaced by NULL.
/// `None` when the message does not parse (it is then not recorded).
fn redact(tag: u8, payload: &[u8]) -> Option<Vec<u8>> {
    let mut p = payload;
    let mut out = Vec::with_capacity(payload.len());
    let take = |p: &mut &[u8], n: usize| -> Option<Vec<u8>> {
        let (a, b) = (p.get(..n)?, p.get(n..)?);
        *p = b;
        Some(a.to_vec())
    };
    let i16_at = |p: &[u8]| -> Option<usize> {
        let v = i16::from_be_bytes([*p.first()?, *p.get(1)?]);
        usize::try_from(v).ok()
    };
    if tag == b'B' {
        for _ in 0..2 {
            let end = p.iter().position(|&c| c == 0)?;
            out.extend(take(&mut p, end + 1)?);
        }
    } else {
        out.extend(take(&mut p, 4)?); // function oid
    }
    let nfmt = i16_at(p)?;
    out.extend(take(&mut p, 2 + 2 * nfmt)?);
    let nparams = i16_at(p)?;
    out.extend(take(&mut p, 2)?);
    for _ in 0..nparams {
        let len = i32::from_be_bytes(p.get(..4)?.try_into().ok()?);
        p = p.get(4..)?;
        if len > 0 {
            p = p.get(len as usize..)?;
        }
        out.extend((-1i32).to_be_bytes());
    }
    out.extend_from_slice(p); // result format codes
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redaction_nulls_every_parameter_and_keeps_the_rest() {
        // portal "", statement "s1", 1 format code (text), 2 params, 1 result format.
        let mut bind = b"\0s1\0\0\x01\0\0\0\x02".to_vec();
        bind.extend(5i32.to_be_bytes());
        bind.extend(b"hello");
        bind.extend((-1i32).to_be_bytes());
        bind.extend(b"\0\x01\0\x01");
        let r = redact(b'B', &bind).expect("parses");
        let mut want = b"\0s1\0\0\x01\0\0\0\x02".to_vec();
        want.extend((-1i32).to_be_bytes());
        want.extend((-1i32).to_be_bytes());
        want.extend(b"\0\x01\0\x01");
        assert_eq!(r, want);
        assert!(!r.windows(5).any(|w| w == b"hello"));
        assert_eq!(
            redact(b'B', &bind[..bind.len() - 12]),
            None,
            "a cut message"
        );
        // FunctionCall: oid, no format codes, one argument, result format.
        let mut call = 42u32.to_be_bytes().to_vec();
        call.extend(b"\0\0\0\x01");
        call.extend(3i32.to_be_bytes());
        call.extend(b"abc\0\0");
        let r = redact(b'F', &call).expect("parses");
        assert_eq!(r.len(), call.len() - 3);
        assert!(!r.windows(3).any(|w| w == b"abc"));
    }
}
