//! A client session's first phase: TLS negotiation, the startup packet,
//! connecting to the source and relaying authentication, up to the source's
//! first ReadyForQuery.
//!
//! Authentication is relayed, not performed: the client authenticates to the
//! source through the proxy with whatever method the source asks for. The
//! proxy changes three things on the way: it never advertises
//! SCRAM-SHA-256-PLUS (channel binding would bind to the proxy's TLS session,
//! not the source's), it replaces the source's BackendKeyData with its own
//! key, and it answers protocol minor versions newer than it speaks with
//! NegotiateProtocolVersion.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWriteExt;

use crate::cancel::CancelGuard;
use crate::net::Stream;
use crate::protocol::error::parse_error_fields;
use crate::protocol::frame::{decode_header, read_message, Message};
use crate::protocol::message::{
    AUTHENTICATION, BACKEND_KEY_DATA, ERROR_RESPONSE, NEGOTIATE_PROTOCOL_VERSION, PASSWORD,
    READY_FOR_QUERY,
};
use crate::protocol::sqlstate;
use crate::protocol::startup::{
    negotiate_protocol_version, read_startup_packet, CancelKey, StartupError, StartupMessage,
    StartupPacket, LATEST_MINOR,
};
use crate::protocol::startup::{GSSENC_REQUEST_CODE, SSL_REQUEST_CODE};
use crate::proxy::Proxy;

/// Bound on what a client may send during authentication: Postgres'
/// PG_MAX_AUTH_TOKEN_LENGTH.
const CLIENT_AUTH_MAX_MESSAGE: usize = 65_535;
/// Bound on the source's messages before ReadyForQuery (it is trusted; this
/// only keeps a broken server from growing the buffer without end).
const SERVER_AUTH_MAX_MESSAGE: usize = 1 << 20;

/// Why a session ended before it was established.
#[derive(Debug)]
pub struct Failure {
    /// SQLSTATE to report to the client, when it can still be told.
    pub code: &'static str,
    pub message: String,
    /// The client already got its answer (the source's own error), or the
    /// stream is in no state to carry one.
    pub client_told: bool,
    /// The client went away by itself (a TCP health check, an impatient
    /// client): not a rejection, counted apart.
    pub client_gone: bool,
}

impl Failure {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            client_told: false,
            client_gone: false,
        }
    }
    fn told(message: impl Into<String>) -> Self {
        Self {
            code: "",
            message: message.into(),
            client_told: true,
            client_gone: false,
        }
    }
    fn client_gone(message: impl Into<String>) -> Self {
        Self {
            client_gone: true,
            ..Self::told(message)
        }
    }
}

impl From<StartupError> for Failure {
    fn from(e: StartupError) -> Self {
        match e {
            StartupError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Failure::client_gone("client closed the connection during startup")
            }
            StartupError::Io(e) => Failure::client_gone(format!("I/O error during startup: {e}")),
            // As Postgres does (a COMMERROR): logged, the connection closed
            // without a word. Some clients send a Terminate, or nothing
            // sensible, when they close before starting up.
            e @ StartupError::BadLength => Failure {
                code: sqlstate::PROTOCOL_VIOLATION,
                ..Failure::told(e.to_string())
            },
            e @ StartupError::UnsupportedVersion { .. } => {
                Failure::new(sqlstate::FEATURE_NOT_SUPPORTED, e.to_string())
            }
            e => Failure::new(sqlstate::PROTOCOL_VIOLATION, e.to_string()),
        }
    }
}

pub enum Negotiated {
    Cancel(CancelKey),
    Startup(StartupMessage),
}

/// Reads the client's first packets, answering SSLRequest and GSSENCRequest,
/// until a StartupMessage or CancelRequest. Upgrades `client` to TLS when
/// the client asks for it and the proxy has a certificate.
pub async fn negotiate(proxy: &Proxy, client: &mut Option<Stream>) -> Result<Negotiated, Failure> {
    // As in Postgres: each of SSLRequest and GSSENCRequest may be answered
    // once, and after TLS is up GSS encryption is no longer on offer.
    let mut ssl_done = false;
    let mut gss_done = false;
    let io = |e: std::io::Error| Failure::client_gone(e.to_string());
    // Postgres 17 clients may start TLS directly, without SSLRequest.
    if let (Some(acceptor), Some(Stream::Plain(tcp))) = (&proxy.tls, client.as_ref()) {
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await.map_err(io)? == 1 && first[0] == 0x16 {
            start_tls(acceptor, client, proxy).await?;
            (ssl_done, gss_done) = (true, true);
        }
    }
    loop {
        let stream = client
            .as_mut()
            .ok_or_else(|| Failure::told("connection lost"))?;
        match read_startup_packet(stream).await? {
            StartupPacket::SslRequest if !ssl_done => match &proxy.tls {
                Some(acceptor) => {
                    stream.write_all(b"S").await.map_err(io)?;
                    // read_startup_packet reads exactly the packet, so nothing the client
                    // sent early can leak into the TLS session (CVE-2021-23214).
                    start_tls(acceptor, client, proxy).await?;
                    (ssl_done, gss_done) = (true, true);
                }
                None => {
                    stream.write_all(b"N").await.map_err(io)?;
                    ssl_done = true;
                }
            },
            StartupPacket::GssEncRequest if !gss_done => {
                stream.write_all(b"N").await.map_err(io)?;
                gss_done = true;
            }
            StartupPacket::SslRequest => return Err(unsupported_request(SSL_REQUEST_CODE)),
            StartupPacket::GssEncRequest => return Err(unsupported_request(GSSENC_REQUEST_CODE)),
            StartupPacket::Cancel(key) => return Ok(Negotiated::Cancel(key)),
            StartupPacket::Startup(m) => {
                if m.get_bytes("user").is_none_or(<[u8]>::is_empty) {
                    return Err(Failure::new(
                        sqlstate::INVALID_AUTHORIZATION,
                        "no PostgreSQL user name specified in startup packet",
                    ));
                }
                return Ok(Negotiated::Startup(m));
            }
        }
    }
}

/// What Postgres answers to a repeated SSLRequest or GSSENCRequest: the
/// request code read as a protocol version it does not support.
fn unsupported_request(code: u32) -> Failure {
    Failure::new(
        sqlstate::FEATURE_NOT_SUPPORTED,
        format!(
            "unsupported frontend protocol {}.{}: server supports 3.0 to 3.{LATEST_MINOR}",
            code >> 16,
            code & 0xffff
        ),
    )
}

async fn start_tls(
    acceptor: &tokio_rustls::TlsAcceptor,
    client: &mut Option<Stream>,
    proxy: &Proxy,
) -> Result<(), Failure> {
    let Some(Stream::Plain(tcp)) = client.take() else {
        return Err(Failure::told("TLS requested twice"));
    };
    let tls = acceptor
        .accept(tcp)
        .await
        .map_err(|e| Failure::told(format!("TLS handshake failed: {e}")))?;
    proxy.metrics.client_tls.inc();
    *client = Some(Stream::ServerTls(Box::new(tls)));
    Ok(())
}

/// A session whose client is authenticated and whose source is ready.
pub struct Established {
    pub server: Stream,
    /// Bytes read from the client or the server and not yet forwarded.
    pub client_buf: BytesMut,
    pub server_buf: BytesMut,
    pub cancel_guard: Option<CancelGuard>,
}

/// Connects to the primary (`upstream::roles`), relays authentication and the post-auth messages
/// up to and including the first ReadyForQuery.
pub async fn connect_primary(
    proxy: &Arc<Proxy>,
    client: &mut Stream,
    startup: &StartupMessage,
) -> Result<Established, Failure> {
    let primary = proxy.databases.primary();
    let mut server = primary.upstream.connect().await.map_err(|e| {
        proxy.metrics.source_connect_failures.inc();
        Failure::new(
            sqlstate::CONNECTION_FAILURE,
            format!(
                "pgshift could not connect to the {}: {e:#}",
                primary.db.label()
            ),
        )
    })?;
    let io_err = |e: std::io::Error| Failure::told(format!("I/O error during authentication: {e}"));

    let minor = startup.minor.min(LATEST_MINOR);
    crate::net::send_all(&mut server, &startup.encode(minor))
        .await
        .map_err(io_err)?;
    let mut negotiated_minor = minor;

    let mut client_buf = BytesMut::with_capacity(1024);
    let mut server_buf = BytesMut::with_capacity(4096);
    let mut out = BytesMut::new();
    let mut first = true;
    let mut awaiting_client = false;
    let mut cancel_guard = None;
    loop {
        let msg = tokio::select! {
            m = read_message(&mut server, &mut server_buf, SERVER_AUTH_MAX_MESSAGE) => {
                m.map_err(io_err)?.ok_or_else(|| Failure::told("source closed the connection during authentication"))?
            }
            // The client speaks only when the source has asked it something
            // (a password, a SASL step). Anything it pipelines after that
            // waits in client_buf for the forwarder, which checks it.
            m = read_message(client, &mut client_buf, CLIENT_AUTH_MAX_MESSAGE), if awaiting_client => {
                match m {
                    Ok(Some(m)) if m.tag == PASSWORD => {
                        crate::net::send_all(&mut server, &m.frame).await.map_err(io_err)?;
                        awaiting_client = false;
                        continue;
                    }
                    Ok(Some(m)) => {
                        return Err(Failure::new(
                            sqlstate::PROTOCOL_VIOLATION,
                            format!("expected password response, got message type {}", m.tag),
                        ))
                    }
                    Ok(None) => return Err(Failure::client_gone("client closed the connection during authentication")),
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        return Err(Failure::new(sqlstate::PROTOCOL_VIOLATION, e.to_string()))
                    }
                    Err(e) => return Err(Failure::client_gone(format!("client I/O error during authentication: {e}"))),
                }
            }
        };
        if first && msg.tag != NEGOTIATE_PROTOCOL_VERSION && startup.minor > LATEST_MINOR {
            out.extend_from_slice(&negotiate_protocol_version(LATEST_MINOR, &[]));
        }
        first = false;
        match msg.tag {
            NEGOTIATE_PROTOCOL_VERSION => {
                let b = msg.body();
                if b.len() >= 4 {
                    negotiated_minor =
                        (u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0xffff) as u16;
                }
                out.extend_from_slice(&msg.frame);
            }
            AUTHENTICATION => {
                let b = msg.body();
                let code = if b.len() >= 4 {
                    i32::from_be_bytes([b[0], b[1], b[2], b[3]])
                } else {
                    -1
                };
                match code {
                    // AuthenticationOk, SASLFinal: nothing for the client to answer.
                    0 | 12 => {
                        awaiting_client = false;
                        out.extend_from_slice(&msg.frame);
                    }
                    10 => {
                        awaiting_client = true;
                        out.extend_from_slice(&without_channel_binding(&msg));
                    }
                    _ => {
                        awaiting_client = true;
                        out.extend_from_slice(&msg.frame);
                    }
                }
            }
            BACKEND_KEY_DATA => {
                let source_key = CancelKey::from_backend_key_data(msg.body())
                    .map_err(|e| Failure::new(sqlstate::PROTOCOL_VIOLATION, e.to_string()))?;
                let (proxy_key, guard) = proxy.cancels.register(source_key, negotiated_minor);
                cancel_guard = Some(guard);
                out.extend_from_slice(&proxy_key.encode_backend_key_data());
            }
            ERROR_RESPONSE => {
                // The source refused (wrong password, no such database...): the
                // client gets the source's own error, and the session ends.
                out.extend_from_slice(&msg.frame);
                let _ = crate::net::send_all(client, &out).await;
                let f = parse_error_fields(msg.body());
                return Err(Failure::told(format!(
                    "source refused the session: {} {}",
                    f.code.unwrap_or("?"),
                    f.message.unwrap_or("")
                )));
            }
            READY_FOR_QUERY => {
                out.extend_from_slice(&msg.frame);
                crate::net::send_all(client, &out).await.map_err(io_err)?;
                return Ok(Established {
                    server,
                    client_buf,
                    server_buf,
                    cancel_guard,
                });
            }
            // ParameterStatus, NoticeResponse and anything else: unchanged.
            _ => out.extend_from_slice(&msg.frame),
        }
        // Batch what the server sent back-to-back; flush before waiting.
        if !has_complete_message(&server_buf) && !out.is_empty() {
            crate::net::send_all(client, &out).await.map_err(io_err)?;
            out.clear();
        }
    }
}

fn has_complete_message(buf: &[u8]) -> bool {
    matches!(decode_header(buf, usize::MAX), Ok(Some(h)) if buf.len() >= h.frame_len())
}

/// AuthenticationSASL with SCRAM-SHA-256-PLUS removed from the mechanisms.
fn without_channel_binding(msg: &Message) -> BytesMut {
    let body = msg.body();
    let mut out = BytesMut::with_capacity(msg.frame.len());
    out.put_u8(AUTHENTICATION);
    out.put_i32(0);
    out.put_slice(&body[..4.min(body.len())]);
    for mech in body
        .get(4..)
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|m| !m.is_empty())
    {
        if mech != b"SCRAM-SHA-256-PLUS" {
            out.put_slice(mech);
            out.put_u8(0);
        }
    }
    out.put_u8(0);
    let len = (out.len() - 1) as i32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plus_mechanism_is_removed() {
        let mut frame = BytesMut::new();
        frame.put_u8(b'R');
        let body = b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
        frame.put_i32(4 + body.len() as i32);
        frame.put_slice(body);
        let out = without_channel_binding(&Message { tag: b'R', frame });
        assert_eq!(&out[5..], b"\0\0\0\x0aSCRAM-SHA-256\0\0");
        assert_eq!(
            i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize,
            out.len() - 1
        );
    }
}
