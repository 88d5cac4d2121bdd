//! The hot path: moving bytes between an established client and its source
//! connection.
//!
//! Each direction is one `pump`: read whatever the socket has, walk the
//! message headers in the buffer, let an `Inspector` look at the few message
//! types it cares about, and write the whole run of inspected bytes out in
//! one call. Messages nobody inspects (DataRow, CopyData, Bind, ...) are
//! streamed through as they arrive, whatever their size, without waiting for
//! their end. Nothing is re-encoded; the only copy is the socket read itself.
//!
//! The one exception is the mirror's order probe (`mirror::order`): an
//! inspector may put a few bytes of its own before a message, replace an
//! inspected message, or drop a message. Only then is the run assembled in
//! a fresh buffer before it is written.

use std::future::Future;
use std::io;
use std::pin::Pin;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::frame::{decode_header, FrameError, HEADER_LEN};

/// Postgres' own bound on a message body: PQ_LARGE_MESSAGE_LIMIT
/// (MaxAllocSize - 1) counts the 4-byte length word too.
pub const MAX_STREAMED_MESSAGE: usize = (1 << 30) - 2 - 4;

/// Buffers start at this size, so idle sessions hold little memory...
const MIN_READ: usize = 2 * 1024;
/// ...and double while reads keep filling them, up to this.
const MAX_READ: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    /// Forward this message, then end the pump.
    ForwardAndStop,
    /// Do not forward this message (it answers a request the proxy made).
    Drop,
    /// Write these bytes first, then the message.
    Before(Bytes),
    /// Write these bytes instead of the message (inspected messages only;
    /// for a streamed one this acts as `Before`).
    Replace(Bytes),
}

/// What a pump needs to know about its direction's messages.
pub trait Inspector {
    /// Whether the message with this tag and body length must be buffered
    /// whole and shown to `inspect`; the rest are streamed and only `header`
    /// sees them.
    fn wants_body(&self, tag: u8, body_len: usize) -> bool;
    /// Largest body of an inspected message.
    fn max_inspected(&self) -> usize;
    /// How many leading body bytes of a streamed message `header` needs
    /// (it gets fewer only when the body is shorter).
    fn peek(&self, _tag: u8) -> usize {
        0
    }
    /// Sees every streamed message's tag (and the first `peek` bytes of its
    /// body), before the rest of the body arrives.
    fn header(&mut self, tag: u8, prefix: &[u8]) -> Result<Verdict, FrameError>;
    /// Sees an inspected message's complete body.
    fn inspect(&mut self, tag: u8, body: &[u8]) -> Result<Verdict, FrameError>;
    /// Called before a write (`false`) and after it (`true`, with whether the
    /// bytes written end on a message boundary).
    fn writing(&mut self, _done: bool, _at_boundary: bool) {}
    /// Sees the bytes about to be written, as received: without what the
    /// inspector added or dropped (mirroring captures them). Called after
    /// `hold`, so whatever went out on the same stream meanwhile is seen
    /// first.
    fn forwarding(&mut self, _bytes: &[u8]) {}
    /// Something that must finish before those bytes go out, or are even
    /// seen by `forwarding` (a routed request's answer not relayed yet; a
    /// commit acknowledgement waiting for spool space or stable storage).
    /// An error ends the pump instead: those bytes must never go out.
    fn hold(&mut self) -> Option<Hold<'_>> {
        None
    }
    /// Something that must finish after `forwarding` saw the bytes and
    /// before they go out (a journal entry `forwarding` wrote must reach
    /// stable storage).
    fn hold_seen(&mut self) -> Option<Hold<'_>> {
        None
    }
}

pub type Hold<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

#[derive(Debug)]
pub enum PumpEnd {
    /// The inspector asked to stop (Terminate sent, or draining).
    Stopped,
    /// The reading side closed the connection.
    Eof { mid_message: bool },
}

#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error(transparent)]
    Protocol(#[from] FrameError),
    #[error("read failed: {0}")]
    Read(io::Error),
    #[error("write failed: {0}")]
    Write(io::Error),
    /// What was to be forwarded must not be (a commit acknowledgement the
    /// mirror cannot vouch for).
    #[error("{0}")]
    Withheld(String),
}

/// Moves messages from `rd` to `wr` until EOF, an error, or the inspector
/// asks to stop. `buf` may already hold bytes read earlier.
pub async fn pump<R, W, I>(
    rd: &mut R,
    wr: &mut W,
    buf: &mut BytesMut,
    insp: &mut I,
) -> Result<PumpEnd, PumpError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
    I: Inspector,
{
    // Bytes of a streamed message still to come after what is in `buf`.
    let mut streaming: usize = 0;
    // Whether those bytes are dropped rather than forwarded.
    let mut dropping = false;
    let mut last_read = 0;
    let mut last_read_filled = false;
    // Changes to the bytes in `buf`: (offset, bytes to skip, bytes to put
    // there). Empty on all but a few runs.
    let mut edits: Vec<(usize, usize, Bytes)> = Vec::new();
    loop {
        let mut pos = 0;
        let mut stop = false;
        // Walk what the buffer holds. A malformed message ends the walk with
        // an error, but the valid messages before it are still forwarded,
        // as Postgres would have received and answered them.
        let scanned: Result<(), FrameError> = 'scan: loop {
            if streaming > 0 {
                let n = streaming.min(buf.len() - pos);
                if dropping && n > 0 {
                    edits.push((pos, n, Bytes::new()));
                }
                pos += n;
                streaming -= n;
                if streaming > 0 {
                    break 'scan Ok(());
                }
                dropping = false;
                continue;
            }
            let h = match decode_header(&buf[pos..], MAX_STREAMED_MESSAGE) {
                Ok(Some(h)) => h,
                Ok(None) => break 'scan Ok(()),
                Err(e) => break 'scan Err(e),
            };
            if !insp.wants_body(h.tag, h.body_len) {
                let want = insp.peek(h.tag).min(h.body_len);
                if buf.len() - pos < HEADER_LEN + want {
                    break 'scan Ok(());
                }
                let prefix = &buf[pos + HEADER_LEN..pos + HEADER_LEN + want];
                match insp.header(h.tag, prefix) {
                    Ok(Verdict::Drop) => dropping = true,
                    Ok(Verdict::Before(b) | Verdict::Replace(b)) => edits.push((pos, 0, b)),
                    Ok(_) => {}
                    Err(e) => break 'scan Err(e),
                }
                streaming = h.frame_len();
                continue;
            }
            if h.body_len > insp.max_inspected() {
                break 'scan Err(FrameError::TooLarge {
                    tag: h.tag,
                    len: h.body_len,
                    max: insp.max_inspected(),
                });
            }
            let available = buf.len() - pos;
            if available < h.frame_len() {
                // Grow as the bytes arrive rather than trusting the length
                // field with a whole allocation up front.
                buf.reserve((h.frame_len() - available).min(MAX_READ));
                break 'scan Ok(());
            }
            match insp.inspect(h.tag, &buf[pos + HEADER_LEN..pos + h.frame_len()]) {
                Ok(verdict) => {
                    match verdict {
                        Verdict::Forward => {}
                        Verdict::ForwardAndStop => stop = true,
                        Verdict::Drop => edits.push((pos, h.frame_len(), Bytes::new())),
                        Verdict::Before(b) => edits.push((pos, 0, b)),
                        Verdict::Replace(b) => edits.push((pos, h.frame_len(), b)),
                    }
                    pos += h.frame_len();
                    if stop {
                        break 'scan Ok(());
                    }
                }
                Err(e) => break 'scan Err(e),
            }
        };
        if pos > 0 {
            if let Some(wait) = insp.hold() {
                wait.await.map_err(PumpError::Withheld)?;
            }
            insp.forwarding(&buf[..pos]);
            if let Some(wait) = insp.hold_seen() {
                wait.await.map_err(PumpError::Withheld)?;
            }
            insp.writing(false, false);
            if edits.is_empty() {
                wr.write_all(&buf[..pos]).await.map_err(PumpError::Write)?;
            } else {
                let out = apply_edits(&buf[..pos], &edits);
                edits.clear();
                if !out.is_empty() {
                    wr.write_all(&out).await.map_err(PumpError::Write)?;
                }
            }
            wr.flush().await.map_err(PumpError::Write)?;
            insp.writing(true, streaming == 0 || dropping);
            buf.advance(pos);
        }
        scanned?;
        if stop {
            return Ok(PumpEnd::Stopped);
        }
        // Size the next read from the last one: grow while reads fill the
        // space, and give memory back once a buffer is far larger than what
        // recent reads needed (after a big result, or a big query).
        if buf.len() < MAX_READ && buf.capacity() > 4 * MAX_READ {
            *buf = BytesMut::from(&buf[..]);
        } else if buf.is_empty() && buf.capacity() > 4 * MIN_READ && last_read < buf.capacity() / 8
        {
            *buf = BytesMut::new();
        }
        let want = if last_read_filled {
            (buf.capacity() * 2).clamp(MIN_READ, MAX_READ)
        } else {
            MIN_READ
        };
        if buf.capacity() - buf.len() < want / 2 {
            buf.reserve(want);
        }
        let spare = buf.capacity() - buf.len();
        last_read = rd.read_buf(buf).await.map_err(PumpError::Read)?;
        if last_read == 0 {
            return Ok(PumpEnd::Eof {
                mid_message: !buf.is_empty() || streaming > 0,
            });
        }
        last_read_filled = last_read == spare;
    }
}

/// The bytes of `run` with `edits` (sorted by offset) applied.
fn apply_edits(run: &[u8], edits: &[(usize, usize, Bytes)]) -> Vec<u8> {
    let extra: usize = edits.iter().map(|(_, _, b)| b.len()).sum();
    let mut out = Vec::with_capacity(run.len() + extra);
    let mut at = 0;
    for (off, skip, insert) in edits {
        out.extend_from_slice(&run[at..*off]);
        out.extend_from_slice(insert);
        at = off + skip;
    }
    out.extend_from_slice(&run[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inspects 'Q', stops after 'X', counts headers.
    struct Probe {
        inspected: Vec<(u8, Vec<u8>)>,
        headers: Vec<u8>,
        max: usize,
    }

    impl Default for Probe {
        fn default() -> Self {
            Self {
                inspected: Vec::new(),
                headers: Vec::new(),
                max: 64,
            }
        }
    }

    impl Inspector for Probe {
        fn wants_body(&self, tag: u8, _len: usize) -> bool {
            tag == b'Q' || tag == b'X'
        }
        fn max_inspected(&self) -> usize {
            self.max
        }
        fn peek(&self, tag: u8) -> usize {
            if tag == b'B' {
                4
            } else {
                0
            }
        }
        fn header(&mut self, tag: u8, prefix: &[u8]) -> Result<Verdict, FrameError> {
            self.headers.push(tag);
            Ok(match (tag, prefix) {
                (b'D', _) => Verdict::Drop,
                (b'B', b"keep") => Verdict::Before(Bytes::from_static(b"<before>")),
                _ => Verdict::Forward,
            })
        }
        fn inspect(&mut self, tag: u8, body: &[u8]) -> Result<Verdict, FrameError> {
            self.inspected.push((tag, body.to_vec()));
            Ok(match (tag, body) {
                (b'X', _) => Verdict::ForwardAndStop,
                (b'Q', b"drop me\0") => Verdict::Drop,
                (b'Q', b"replace me\0") => Verdict::Replace(Bytes::from_static(b"<new>")),
                _ => Verdict::Forward,
            })
        }
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// Pumps `input` delivered in 3-byte pieces through a pipe of
    /// `capacity` bytes, to exercise partial headers and bodies.
    async fn pump_in_pieces(input: &[u8], capacity: usize) -> (PumpEnd, Vec<u8>, Probe) {
        let (mut tx, mut rx) = tokio::io::duplex(capacity);
        let feed = input.to_vec();
        let writer = tokio::spawn(async move {
            for chunk in feed.chunks(3) {
                tx.write_all(chunk).await.unwrap();
            }
        });
        let mut out = Vec::new();
        let mut probe = Probe::default();
        let mut buf = BytesMut::new();
        let end = pump(&mut rx, &mut out, &mut buf, &mut probe).await.unwrap();
        writer.abort();
        (end, out, probe)
    }

    #[tokio::test]
    async fn forwards_bytes_unchanged_and_inspects_selected_messages() {
        let big = vec![7u8; 100_000]; // streamed: larger than max_inspected
        let mut input = msg(b'Q', b"select 1\0");
        input.extend(msg(b'd', &big));
        input.extend(msg(b'Q', b"x\0"));
        input.extend(msg(b'X', b""));
        input.extend(msg(b'Q', b"after terminate\0"));
        let (end, out, probe) = pump_in_pieces(&input, 7).await;
        assert!(matches!(end, PumpEnd::Stopped));
        let upto_terminate = input.len() - msg(b'Q', b"after terminate\0").len();
        assert_eq!(out, &input[..upto_terminate]);
        assert_eq!(probe.headers, vec![b'd']);
        assert_eq!(probe.inspected.len(), 3);
        assert_eq!(probe.inspected[0], (b'Q', b"select 1\0".to_vec()));
    }

    #[tokio::test]
    async fn edits_insert_replace_and_drop_messages_even_when_streamed_in_pieces() {
        let big = vec![7u8; 50_000];
        let mut input = msg(b'Q', b"drop me\0");
        input.extend(msg(b'D', &big)); // streamed and dropped across reads
        input.extend(msg(b'B', b"keep this"));
        input.extend(msg(b'Q', b"replace me\0"));
        input.extend(msg(b'B', b"other"));
        input.extend(msg(b'X', b""));
        let (end, out, probe) = pump_in_pieces(&input, 5).await;
        assert!(matches!(end, PumpEnd::Stopped));
        let mut want = b"<before>".to_vec();
        want.extend(msg(b'B', b"keep this"));
        want.extend_from_slice(b"<new>");
        want.extend(msg(b'B', b"other"));
        want.extend(msg(b'X', b""));
        assert_eq!(out, want);
        assert_eq!(probe.headers, vec![b'D', b'B', b'B']);
    }

    #[tokio::test]
    async fn rejects_oversized_inspected_message_and_bad_length() {
        let mut probe = Probe::default();
        let input = msg(b'Q', &[b'a'; 65]);
        let mut buf = BytesMut::new();
        let r = pump(&mut &input[..], &mut Vec::new(), &mut buf, &mut probe).await;
        assert!(matches!(
            r,
            Err(PumpError::Protocol(FrameError::TooLarge { .. }))
        ));
        let mut buf = BytesMut::new();
        let bad: &[u8] = b"Q\0\0\0\x02";
        let r = pump(&mut &bad[..], &mut Vec::new(), &mut buf, &mut probe).await;
        assert!(matches!(
            r,
            Err(PumpError::Protocol(FrameError::BadLength { .. }))
        ));
    }

    #[tokio::test]
    async fn valid_messages_before_a_bad_one_are_still_forwarded() {
        let mut probe = Probe::default();
        let mut input = msg(b'Q', b"select 1\0");
        input.extend_from_slice(b"Q\0\0\0\x02");
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let r = pump(&mut &input[..], &mut out, &mut buf, &mut probe).await;
        assert!(matches!(
            r,
            Err(PumpError::Protocol(FrameError::BadLength { .. }))
        ));
        assert_eq!(out, msg(b'Q', b"select 1\0"));
    }

    #[tokio::test]
    async fn a_big_inspected_message_is_not_reserved_up_front_and_is_released() {
        // A header announcing 50 MB, with only a little body behind it.
        let mut probe = Probe {
            max: 64 << 20,
            ..Probe::default()
        };
        let mut input = b"Q".to_vec();
        input.extend_from_slice(&((50i32 << 20) + 4).to_be_bytes());
        input.extend_from_slice(&[b'a'; 1000]);
        let mut buf = BytesMut::new();
        let r = pump(&mut &input[..], &mut Vec::new(), &mut buf, &mut probe)
            .await
            .unwrap();
        assert!(matches!(r, PumpEnd::Eof { mid_message: true }));
        assert!(
            buf.capacity() < 1 << 20,
            "reserved {} bytes for an unfinished message",
            buf.capacity()
        );

        // A 3 MB message that does arrive is forwarded, and its buffer is
        // given back afterwards.
        let big = vec![b'b'; 3 << 20];
        let mut body = big.clone();
        body.push(0);
        let input = msg(b'Q', &body);
        let (mut tx, mut rx) = tokio::io::duplex(1 << 16);
        let writer = tokio::spawn(async move {
            tx.write_all(&input).await.unwrap();
            // keep the stream open so the pump waits in a read afterwards
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        });
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            pump(&mut rx, &mut out, &mut buf, &mut probe),
        )
        .await;
        writer.await.unwrap();
        assert_eq!(out.len(), big.len() + 1 + 5);
        assert!(
            buf.capacity() <= 4 * MAX_READ,
            "kept {} bytes after the message",
            buf.capacity()
        );
    }

    #[tokio::test]
    async fn eof_reports_truncated_message() {
        let mut probe = Probe::default();
        let input = &msg(b'd', b"abcdef")[..7];
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let r = pump(&mut &input[..], &mut out, &mut buf, &mut probe)
            .await
            .unwrap();
        assert!(matches!(r, PumpEnd::Eof { mid_message: true }));
        // Streamed bytes were forwarded as they came.
        assert_eq!(out.len(), 7);
    }
}
