//! ErrorResponse / NoticeResponse: building the ones the proxy originates and
//! reading the fields of the ones servers send.

use bytes::{BufMut, BytesMut};

use super::message::take_cstr;
use super::FrameError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// Builds an ErrorResponse the way Postgres does (S, V, C, M fields).
pub fn error_response(severity: Severity, code: &str, message: &str) -> BytesMut {
    let mut b = BytesMut::with_capacity(32 + message.len());
    b.put_u8(b'E');
    b.put_i32(0);
    for (field, value) in [
        (b'S', severity.as_str()),
        (b'V', severity.as_str()),
        (b'C', code),
        (b'M', message),
    ] {
        b.put_u8(field);
        // Field values are C strings: never let an interior NUL cut one short.
        b.extend(value.bytes().filter(|&c| c != 0));
        b.put_u8(0);
    }
    b.put_u8(0);
    let len = (b.len() - 1) as i32;
    b[1..5].copy_from_slice(&len.to_be_bytes());
    b
}

/// The fields of an ErrorResponse or NoticeResponse body that the proxy uses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorFields<'a> {
    pub severity: Option<&'a str>,
    pub code: Option<&'a str>,
    pub message: Option<&'a str>,
}

/// Reads the fields of an ErrorResponse body; malformed bodies yield what
/// could be read before the malformation.
pub fn parse_error_fields(body: &[u8]) -> ErrorFields<'_> {
    let mut out = ErrorFields::default();
    let _malformed = read_error_fields(body, &mut out);
    out
}

/// Reads the fields of an ErrorResponse or NoticeResponse body, failing on
/// a malformed one (a field without its terminator, or no final one).
pub fn error_fields(body: &[u8]) -> Result<ErrorFields<'_>, FrameError> {
    let mut out = ErrorFields::default();
    read_error_fields(body, &mut out)?;
    Ok(out)
}

/// A value that is not UTF-8 is read as absent.
fn read_error_fields<'a>(mut body: &'a [u8], out: &mut ErrorFields<'a>) -> Result<(), FrameError> {
    loop {
        let Some((&field, mut rest)) = body.split_first() else {
            return Err(FrameError::Malformed(
                "error fields without their terminator",
            ));
        };
        if field == 0 {
            return if rest.is_empty() {
                Ok(())
            } else {
                Err(FrameError::Malformed("bytes after the error fields"))
            };
        }
        let value = std::str::from_utf8(take_cstr(&mut rest)?).ok();
        match field {
            b'V' => out.severity = value,
            b'S' if out.severity.is_none() => out.severity = value,
            b'C' => out.code = value,
            b'M' => out.message = value,
            _ => {}
        }
        body = rest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_parse_roundtrip() {
        let e = error_response(Severity::Fatal, "08P01", "bad\0 thing");
        assert_eq!(e[0], b'E');
        assert_eq!(
            i32::from_be_bytes([e[1], e[2], e[3], e[4]]) as usize,
            e.len() - 1
        );
        let f = parse_error_fields(&e[5..]);
        assert_eq!(f.severity, Some("FATAL"));
        assert_eq!(f.code, Some("08P01"));
        assert_eq!(f.message, Some("bad thing"));
    }

    #[test]
    fn strict_reading_fails_where_lenient_reading_stops() {
        let e = error_response(Severity::Error, "42P01", "no such table");
        let f = error_fields(&e[5..]).unwrap();
        assert_eq!((f.code, f.message), (Some("42P01"), Some("no such table")));
        for body in [&b"C123\0"[..], b"Cabc", b"", b"C1\0\0x"] {
            assert!(error_fields(body).is_err(), "{body:?}");
        }
        assert_eq!(parse_error_fields(b"C123\0").code, Some("123"));
    }

    #[test]
    fn parse_tolerates_truncation() {
        let f = parse_error_fields(b"SERROR\0C4200");
        assert_eq!(f.severity, Some("ERROR"));
        assert_eq!(f.code, None);
    }
}
