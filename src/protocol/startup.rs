//! The untagged packets a client may send first: StartupMessage,
//! SSLRequest, GSSENCRequest and CancelRequest.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Postgres' own bound on the first packet: MAX_STARTUP_PACKET_LENGTH,
/// which does not count the 4-byte length word.
pub const MAX_STARTUP_PACKET_LEN: usize = 10_000 + 4;

pub const CANCEL_REQUEST_CODE: u32 = (1234 << 16) | 5678;
pub const SSL_REQUEST_CODE: u32 = (1234 << 16) | 5679;
pub const GSSENC_REQUEST_CODE: u32 = (1234 << 16) | 5680;

/// Newest protocol minor version the proxy speaks (3.2, Postgres 18).
pub const LATEST_MINOR: u16 = 2;

#[derive(Debug)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    Startup(StartupMessage),
}

/// A BackendKeyData / CancelRequest key. The secret is 4 bytes in protocol
/// 3.0 and up to 256 bytes from 3.2 on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: Bytes,
}

impl CancelKey {
    pub fn encode_cancel_request(&self) -> BytesMut {
        let mut b = BytesMut::with_capacity(12 + self.secret.len());
        b.put_i32((12 + self.secret.len()) as i32);
        b.put_u32(CANCEL_REQUEST_CODE);
        b.put_i32(self.pid);
        b.put_slice(&self.secret);
        b
    }

    pub fn encode_backend_key_data(&self) -> BytesMut {
        let mut b = BytesMut::with_capacity(9 + self.secret.len());
        b.put_u8(b'K');
        b.put_i32((8 + self.secret.len()) as i32);
        b.put_i32(self.pid);
        b.put_slice(&self.secret);
        b
    }

    /// Parses a BackendKeyData body.
    pub fn from_backend_key_data(body: &[u8]) -> Result<Self, StartupError> {
        if body.len() < 8 || body.len() > 4 + 256 {
            return Err(StartupError::Malformed("invalid BackendKeyData length"));
        }
        Ok(CancelKey {
            pid: i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
            secret: Bytes::copy_from_slice(&body[4..]),
        })
    }
}

/// A StartupMessage: protocol version and parameters, in the client's order
/// and as the client's raw bytes (a LATIN1 user name must reach the server
/// unchanged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    params: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("invalid length of startup packet")]
    BadLength,
    #[error("{0}")]
    Malformed(&'static str),
    #[error(
        "unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.{LATEST_MINOR}"
    )]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl StartupMessage {
    pub fn new(major: u16, minor: u16, params: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        Self {
            major,
            minor,
            params,
        }
    }

    /// All parameters, in the order the client sent them.
    pub fn params(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.params
    }

    /// A parameter's raw value. When a name repeats, the last one wins, as
    /// in Postgres.
    pub fn get_bytes(&self, name: &str) -> Option<&[u8]> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// A parameter's value when it is valid UTF-8 (for logs and lookups).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.get_bytes(name)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The database: defaults to the user name, as in Postgres.
    pub fn database(&self) -> Option<&str> {
        match self.get_bytes("database") {
            Some(d) if !d.is_empty() => std::str::from_utf8(d).ok(),
            _ => self.get("user"),
        }
    }

    /// Encodes the message for a server, with the given minor version.
    pub fn encode(&self, minor: u16) -> BytesMut {
        let mut b = BytesMut::with_capacity(64);
        b.put_i32(0);
        b.put_u16(self.major);
        b.put_u16(minor);
        for (k, v) in &self.params {
            b.put_slice(k);
            b.put_u8(0);
            b.put_slice(v);
            b.put_u8(0);
        }
        b.put_u8(0);
        let len = b.len() as i32;
        b[..4].copy_from_slice(&len.to_be_bytes());
        b
    }

    fn parse(major: u16, minor: u16, mut rest: &[u8]) -> Result<Self, StartupError> {
        let mut params = Vec::new();
        loop {
            let key = take_cstr(&mut rest)?;
            if key.is_empty() {
                break;
            }
            let value = take_cstr(&mut rest)?;
            params.push((key, value));
        }
        if !rest.is_empty() {
            return Err(StartupError::Malformed(
                "invalid startup packet layout: expected terminator as last byte",
            ));
        }
        Ok(Self {
            major,
            minor,
            params,
        })
    }
}

fn take_cstr(rest: &mut &[u8]) -> Result<Vec<u8>, StartupError> {
    let nul = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or(StartupError::Malformed(
            "invalid startup packet layout: expected terminator as last byte",
        ))?;
    let s = rest[..nul].to_vec();
    *rest = &rest[nul + 1..];
    Ok(s)
}

/// Reads and decodes one startup-phase packet.
pub async fn read_startup_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
) -> Result<StartupPacket, StartupError> {
    let mut len_buf = [0u8; 4];
    rd.read_exact(&mut len_buf).await?;
    let len = i32::from_be_bytes(len_buf);
    if len < 8 || len as usize > MAX_STARTUP_PACKET_LEN {
        return Err(StartupError::BadLength);
    }
    let mut body = vec![0u8; len as usize - 4];
    rd.read_exact(&mut body).await?;
    decode_startup_body(&body)
}

/// Decodes a startup packet body (everything after its length field).
pub fn decode_startup_body(body: &[u8]) -> Result<StartupPacket, StartupError> {
    if body.len() < 4 {
        return Err(StartupError::BadLength);
    }
    let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = &body[4..];
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if !rest.is_empty() => Err(StartupError::BadLength),
        SSL_REQUEST_CODE => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => {
            if rest.len() < 8 || rest.len() > 4 + 256 {
                return Err(StartupError::BadLength);
            }
            Ok(StartupPacket::Cancel(CancelKey {
                pid: i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
                secret: Bytes::copy_from_slice(&rest[4..]),
            }))
        }
        _ => {
            let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
            if major != 3 {
                return Err(StartupError::UnsupportedVersion { major, minor });
            }
            Ok(StartupPacket::Startup(StartupMessage::parse(
                major, minor, rest,
            )?))
        }
    }
}

/// Builds a NegotiateProtocolVersion message.
pub fn negotiate_protocol_version(minor: u16, unrecognized: &[&str]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u8(b'v');
    b.put_i32(0);
    b.put_i32(((3u32 << 16) | minor as u32) as i32);
    b.put_i32(unrecognized.len() as i32);
    for o in unrecognized {
        b.put_slice(o.as_bytes());
        b.put_u8(0);
    }
    let len = (b.len() - 1) as i32;
    b[1..5].copy_from_slice(&len.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, rest: &[u8]) -> Vec<u8> {
        let mut v = code.to_be_bytes().to_vec();
        v.extend_from_slice(rest);
        v
    }

    #[test]
    fn decodes_startup_params_and_roundtrips() {
        let body = packet(3 << 16, b"user\0alice\0database\0db\0\0");
        let StartupPacket::Startup(m) = decode_startup_body(&body).unwrap() else {
            panic!()
        };
        assert_eq!(m.get("user"), Some("alice"));
        assert_eq!(m.database(), Some("db"));
        let enc = m.encode(0);
        assert_eq!(&enc[4..], &body[..]);
        assert_eq!(
            u32::from_be_bytes([enc[0], enc[1], enc[2], enc[3]]) as usize,
            enc.len()
        );
    }

    #[test]
    fn raw_bytes_survive_and_last_duplicate_wins() {
        let body = packet(
            3 << 16,
            b"user\0jos\xe9\0user\0bob\0application_name\0a\xff\0\0",
        );
        let StartupPacket::Startup(m) = decode_startup_body(&body).unwrap() else {
            panic!()
        };
        assert_eq!(m.get("user"), Some("bob"));
        assert_eq!(m.get_bytes("application_name"), Some(&b"a\xff"[..]));
        assert_eq!(m.get("application_name"), None);
        assert_eq!(&m.encode(0)[4..], &body[..]);
    }

    #[test]
    fn database_defaults_to_user() {
        let body = packet(3 << 16, b"user\0bob\0\0");
        let StartupPacket::Startup(m) = decode_startup_body(&body).unwrap() else {
            panic!()
        };
        assert_eq!(m.database(), Some("bob"));
    }

    #[test]
    fn rejects_unterminated_and_trailing_bytes() {
        assert!(decode_startup_body(&packet(3 << 16, b"user\0bob")).is_err());
        assert!(decode_startup_body(&packet(3 << 16, b"user\0bob\0\0x")).is_err());
    }

    #[test]
    fn rejects_other_major_versions() {
        assert!(matches!(
            decode_startup_body(&packet(2 << 16, b"\0")),
            Err(StartupError::UnsupportedVersion { major: 2, .. })
        ));
    }

    #[test]
    fn decodes_requests() {
        assert!(matches!(
            decode_startup_body(&packet(SSL_REQUEST_CODE, b"")),
            Ok(StartupPacket::SslRequest)
        ));
        assert!(matches!(
            decode_startup_body(&packet(GSSENC_REQUEST_CODE, b"")),
            Ok(StartupPacket::GssEncRequest)
        ));
        let StartupPacket::Cancel(k) =
            decode_startup_body(&packet(CANCEL_REQUEST_CODE, b"\0\0\0\x07abcd")).unwrap()
        else {
            panic!()
        };
        assert_eq!((k.pid, &k.secret[..]), (7, &b"abcd"[..]));
        assert!(decode_startup_body(&packet(CANCEL_REQUEST_CODE, b"\0\0\0\x07")).is_err());
    }

    #[test]
    fn cancel_key_encodings() {
        let k = CancelKey {
            pid: 42,
            secret: Bytes::from_static(b"wxyz"),
        };
        let c = k.encode_cancel_request();
        assert_eq!(c.len(), 16);
        let StartupPacket::Cancel(back) = decode_startup_body(&c[4..]).unwrap() else {
            panic!()
        };
        assert_eq!(back, k);
        let kd = k.encode_backend_key_data();
        assert_eq!(CancelKey::from_backend_key_data(&kd[5..]).unwrap(), k);
    }

    #[test]
    fn npv_message_layout() {
        let m = negotiate_protocol_version(2, &["_pq_.x"]);
        assert_eq!(m[0], b'v');
        assert_eq!(
            i32::from_be_bytes([m[1], m[2], m[3], m[4]]) as usize,
            m.len() - 1
        );
    }
}
