//! Length framing of protocol messages.
//!
//! After startup every message is `tag: u8, len: i32 (includes itself), body`.
//! The proxy reads only the five header bytes of most messages; the body is
//! forwarded without being looked at. Lengths are validated here so that no
//! caller can be made to reserve an unbounded buffer.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Size of a regular message header: tag byte plus the i32 length.
pub const HEADER_LEN: usize = 5;

/// The header of one regular (tagged) message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// Length of the body, excluding the tag and the length field.
    pub body_len: usize,
}

impl Header {
    /// Whole frame length: tag + length field + body.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.body_len
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid message length {len} for message type '{}'", char::from(*tag))]
    BadLength { tag: u8, len: i32 },
    #[error("message of type '{}' is {len} bytes, over the limit of {max}", char::from(*tag))]
    TooLarge { tag: u8, len: usize, max: usize },
    #[error("invalid frontend message type {0}")]
    UnknownType(u8),
    #[error("invalid message format: {0}")]
    Malformed(&'static str),
}

/// Decodes the header at the start of `buf` if all five bytes are there.
///
/// `max_body` bounds the body length the caller accepts for this stream.
#[inline]
pub fn decode_header(buf: &[u8], max_body: usize) -> Result<Option<Header>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::BadLength { tag, len });
    }
    let body_len = (len - 4) as usize;
    if body_len > max_body {
        return Err(FrameError::TooLarge {
            tag,
            len: body_len,
            max: max_body,
        });
    }
    Ok(Some(Header { tag, body_len }))
}

/// A whole message read during the (low-volume) startup and authentication
/// phase, or on the proxy's own side connections. Keeps the raw frame so it
/// can be forwarded unchanged.
#[derive(Debug)]
pub struct Message {
    pub tag: u8,
    pub frame: BytesMut,
}

impl Message {
    pub fn body(&self) -> &[u8] {
        &self.frame[HEADER_LEN..]
    }
}

/// Reads one complete tagged message, buffering in `buf`.
///
/// Bytes after the message stay in `buf` for the next call (or for the
/// forwarding loop that takes the buffer over). Returns `Ok(None)` on a clean
/// EOF before any byte of a new message.
pub async fn read_message<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max_body: usize,
) -> std::io::Result<Option<Message>> {
    loop {
        if let Some(h) = decode_header(buf, max_body).map_err(invalid_data)? {
            if buf.len() >= h.frame_len() {
                let frame = buf.split_to(h.frame_len());
                return Ok(Some(Message { tag: h.tag, frame }));
            }
            buf.reserve(h.frame_len() - buf.len());
        } else {
            buf.reserve(HEADER_LEN);
        }
        if rd.read_buf(buf).await? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed in the middle of a message",
            ));
        }
    }
}

pub fn invalid_data<E: Into<Box<dyn std::error::Error + Send + Sync>>>(e: E) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_needs_five_bytes() {
        assert_eq!(decode_header(b"Q\0\0\0", 100), Ok(None));
    }

    #[test]
    fn header_rejects_short_and_negative_lengths() {
        assert!(matches!(
            decode_header(b"Q\0\0\0\x03", 100),
            Err(FrameError::BadLength { .. })
        ));
        assert!(matches!(
            decode_header(b"Q\xff\xff\xff\xff", 100),
            Err(FrameError::BadLength { .. })
        ));
    }

    #[test]
    fn header_bounds_body() {
        assert_eq!(
            decode_header(b"Q\0\0\0\x0e", 100),
            Ok(Some(Header {
                tag: b'Q',
                body_len: 10
            }))
        );
        assert!(matches!(
            decode_header(b"Q\0\0\x10\0", 100),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn read_message_keeps_following_bytes() {
        let data: &[u8] = b"Z\0\0\0\x05IQ\0\0\0\x05x";
        let mut rd = data;
        let mut buf = BytesMut::new();
        let m = read_message(&mut rd, &mut buf, 1024)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((m.tag, m.body()), (b'Z', &b"I"[..]));
        let m = read_message(&mut rd, &mut buf, 1024)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((m.tag, m.body()), (b'Q', &b"x"[..]));
        assert!(read_message(&mut rd, &mut buf, 1024)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn read_message_reports_truncation() {
        let data: &[u8] = b"Z\0\0\0\x09ab";
        let mut rd = data;
        let mut buf = BytesMut::new();
        let e = read_message(&mut rd, &mut buf, 1024).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
