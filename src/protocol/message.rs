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
    // memchr: every Query and Parse text is scanned for its end.
    let nul = memchr::memchr(0, buf).ok_or(FrameError::Malformed("missing string terminator"))?;
    let s = &buf[..nul];
    *buf = &buf[nul + 1..];
    Ok(s)
}

/// `count` length-prefixed values (length -1: NULL) off the front of
/// `rest`, as in a DataRow, a Bind or a FunctionCall.
pub fn take_values<'a>(
    rest: &mut &'a [u8],
    count: u16,
) -> Result<Vec<Option<&'a [u8]>>, FrameError> {
    let mut out = Vec::with_capacity(usize::from(count).min(rest.len() / 4));
    for _ in 0..count {
        out.push(take_value(rest)?);
    }
    Ok(out)
}

/// One length-prefixed value (length -1: NULL) off the front of `rest`.
pub fn take_value<'a>(rest: &mut &'a [u8]) -> Result<Option<&'a [u8]>, FrameError> {
    let (len, after) = rest
        .split_first_chunk::<4>()
        .ok_or(FrameError::Malformed("truncated value length"))?;
    let len = i32::from_be_bytes(*len);
    if len == -1 {
        *rest = after;
        return Ok(None);
    }
    let len = usize::try_from(len).map_err(|_| FrameError::Malformed("negative value length"))?;
    let (value, after) = after
        .split_at_checked(len)
        .ok_or(FrameError::Malformed("value longer than its message"))?;
    *rest = after;
    Ok(Some(value))
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

/// The names at the front of a Bind.
#[derive(Debug, PartialEq, Eq)]
pub struct BindNames<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    /// What follows them: formats, values, result formats (see [`parse_bind`]).
    pub rest: &'a [u8],
}

/// Bind: the portal and statement names only.
pub fn parse_bind_names(body: &[u8]) -> Result<BindNames<'_>, FrameError> {
    let mut rest = body;
    let portal = take_cstr(&mut rest)?;
    let statement = take_cstr(&mut rest)?;
    Ok(BindNames {
        portal,
        statement,
        rest,
    })
}

/// A Bind's names and parameters (result formats are not read).
#[derive(Debug, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    /// The parameter format codes as sent (Int16 each): none (all text),
    /// one (for all) or one per parameter.
    formats: &'a [u8],
    /// The parameter values (None: NULL).
    pub values: Vec<Option<&'a [u8]>>,
}

impl Bind<'_> {
    /// Whether parameter `i` is sent in binary.
    pub fn is_binary(&self, i: usize) -> bool {
        let at = if self.formats.len() == 2 { 0 } else { 2 * i };
        self.formats
            .get(at..at + 2)
            .is_some_and(|f| i16::from_be_bytes([f[0], f[1]]) == 1)
    }
}

/// Bind: names and parameters.
pub fn parse_bind(body: &[u8]) -> Result<Bind<'_>, FrameError> {
    let BindNames {
        portal,
        statement,
        rest: mut b,
    } = parse_bind_names(body)?;
    let n_formats = take_u16(&mut b)?;
    let (formats, mut b) =
        b.split_at_checked(2 * usize::from(n_formats))
            .ok_or(FrameError::Malformed(
                "Bind message truncated in its formats",
            ))?;
    let n_values = take_u16(&mut b)?;
    let values = take_values(&mut b, n_values)?;
    Ok(Bind {
        portal,
        statement,
        formats,
        values,
    })
}

fn take_u16(buf: &mut &[u8]) -> Result<u16, FrameError> {
    let (n, rest) = buf
        .split_first_chunk::<2>()
        .ok_or(FrameError::Malformed("message truncated at a count"))?;
    *buf = rest;
    Ok(u16::from_be_bytes(*n))
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
    fn bind_names_and_parameters() {
        // portal "p", statement "s", formats [0, 1], values "1", NULL, 0xff;
        // one result format.
        let body =
            b"p\0s\0\0\x02\0\0\0\x01\0\x03\0\0\0\x011\xff\xff\xff\xff\0\0\0\x01\xff\0\x01\0\x01";
        let bind = parse_bind(body).unwrap();
        assert_eq!((bind.portal, bind.statement), (&b"p"[..], &b"s"[..]));
        assert_eq!(bind.values, [Some(&b"1"[..]), None, Some(&b"\xff"[..])]);
        assert!(!bind.is_binary(0) && bind.is_binary(1) && !bind.is_binary(5));
        assert_eq!(parse_bind_names(body).unwrap().statement, b"s");
        // One format for every parameter.
        let all_binary = b"\0\0\0\x01\0\x01\0\x01\0\0\0\x01\x07\0\0";
        let bind = parse_bind(all_binary).unwrap();
        assert!(bind.is_binary(0) && bind.is_binary(3));
        for cut in 0..body.len() - 4 {
            assert!(parse_bind(&body[..cut]).is_err(), "cut at {cut}");
        }
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
