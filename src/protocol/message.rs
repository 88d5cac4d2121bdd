//! Decoders for the few tagged messages whose contents the proxy inspects,
//! and one encoder for the few messages the proxy writes itself.
//!
//! Each decoder takes a complete, already length-checked message body and
//! borrows from it; none allocates or panics on malformed input.

use bytes::{BufMut, BytesMut};

use super::FrameError;

/// Appends one tagged message whose body is `parts`, concatenated.
pub fn put_message(out: &mut BytesMut, tag: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.reserve(5 + len);
    out.put_u8(tag);
    out.put_i32(len as i32 + 4);
    for p in parts {
        out.put_slice(p);
    }
}

// Frontend message tags.
pub const BIND: u8 = b'B';
pub const CLOSE: u8 = b'C';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const FLUSH: u8 = b'H';
pub const FUNCTION_CALL: u8 = b'F';
pub const PARSE: u8 = b'P';
pub const PASSWORD: u8 = b'p';
pub const QUERY: u8 = b'Q';
pub const SYNC: u8 = b'S';
pub const TERMINATE: u8 = b'X';

// Backend message tags.
pub const AUTHENTICATION: u8 = b'R';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
pub const PARAMETER_STATUS: u8 = b'S';
pub const READY_FOR_QUERY: u8 = b'Z';

/// Whether `tag` is a message a client may send after startup.
#[inline]
pub fn is_frontend_tag(tag: u8) -> bool {
    matches!(
        tag,
        BIND | CLOSE
            | COPY_DATA
            | COPY_DONE
            | COPY_FAIL
            | DESCRIBE
            | EXECUTE
            | FLUSH
            | FUNCTION_CALL
            | PARSE
            | PASSWORD
            | QUERY
            | SYNC
            | TERMINATE
    )
}

/// Splits one NUL-terminated string off the front of `buf`.
pub fn take_cstr<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], FrameError> {
    let nul = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(FrameError::Malformed("missing string terminator"))?;
    let s = &buf[..nul];
    *buf = &buf[nul + 1..];
    Ok(s)
}

/// Query: the SQL text.
pub fn parse_query(body: &[u8]) -> Result<&[u8], FrameError> {
    let mut b = body;
    take_cstr(&mut b)
}

/// Parse: (statement name, SQL text). Parameter types are not needed.
pub fn parse_parse(body: &[u8]) -> Result<(&[u8], &[u8]), FrameError> {
    let mut b = body;
    let name = take_cstr(&mut b)?;
    let query = take_cstr(&mut b)?;
    if b.len() < 2 {
        return Err(FrameError::Malformed(
            "Parse message without parameter count",
        ));
    }
    let n = u16::from_be_bytes([b[0], b[1]]) as usize;
    if b.len() != 2 + 4 * n {
        return Err(FrameError::Malformed(
            "Parse message parameter count does not match its length",
        ));
    }
    Ok((name, query))
}

/// Close: ('S' or 'P', name).
pub fn parse_close(body: &[u8]) -> Result<(u8, &[u8]), FrameError> {
    let (&kind, mut rest) = body
        .split_first()
        .ok_or(FrameError::Malformed("empty Close message"))?;
    if kind != b'S' && kind != b'P' {
        return Err(FrameError::Malformed("invalid Close message subtype"));
    }
    let name = take_cstr(&mut rest)?;
    Ok((kind, name))
}

/// ReadyForQuery: the transaction status byte ('I', 'T' or 'E').
pub fn parse_ready_for_query(body: &[u8]) -> Result<u8, FrameError> {
    match body {
        [s @ (b'I' | b'T' | b'E')] => Ok(*s),
        _ => Err(FrameError::Malformed("invalid ReadyForQuery status")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_message_fields() {
        let (n, q) = parse_parse(b"s1\0select $1\0\0\x01\0\0\0\x17").unwrap();
        assert_eq!((n, q), (&b"s1"[..], &b"select $1"[..]));
        assert!(parse_parse(b"s1\0select $1\0\0\x02\0\0\0\x17").is_err());
        assert!(parse_parse(b"s1\0select").is_err());
        assert!(parse_parse(b"s1\0select\0").is_err());
    }

    #[test]
    fn close_and_rfq() {
        assert_eq!(parse_close(b"Sfoo\0").unwrap(), (b'S', &b"foo"[..]));
        assert!(parse_close(b"Xfoo\0").is_err());
        assert!(parse_close(b"").is_err());
        assert_eq!(parse_ready_for_query(b"T").unwrap(), b'T');
        assert!(parse_ready_for_query(b"").is_err());
        assert!(parse_ready_for_query(b"IT").is_err());
    }

    #[test]
    fn query_needs_terminator() {
        assert_eq!(parse_query(b"select 1\0").unwrap(), b"select 1");
        assert!(parse_query(b"select 1").is_err());
    }
}
