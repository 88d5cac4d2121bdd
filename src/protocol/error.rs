//! ErrorResponse / NoticeResponse: building the ones the proxy originates and
//! reading the fields of the ones servers send.

use bytes::{BufMut, BytesMut};

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
pub fn parse_error_fields(mut body: &[u8]) -> ErrorFields<'_> {
    let mut out = ErrorFields::default();
    while let Some((&field, rest)) = body.split_first() {
        if field == 0 {
            break;
        }
        let Some(nul) = rest.iter().position(|&c| c == 0) else {
            break;
        };
        let value = std::str::from_utf8(&rest[..nul]).ok();
        match field {
            b'V' => out.severity = value,
            b'S' if out.severity.is_none() => out.severity = value,
            b'C' => out.code = value,
            b'M' => out.message = value,
            _ => {}
        }
        body = &rest[nul + 1..];
    }
    out
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
    fn parse_tolerates_truncation() {
        let f = parse_error_fields(b"SERROR\0C4200");
        assert_eq!(f.severity, Some("ERROR"));
        assert_eq!(f.code, None);
    }
}
