//! The client side of startup and authentication, for connections the proxy
//! opens on its own behalf (the per-session target link). Supports the
//! methods Postgres offers for password logins: cleartext, md5 and
//! SCRAM-SHA-256 (without channel binding), limited to those the
//! upstream's `require_auth` allows. A SCRAM exchange is only complete once
//! the server's final message proved it knows the password: a server that
//! says AuthenticationOk before that is refused.

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::require_auth::{AuthMethod, RequireAuth};
use crate::net::connect::Upstream;
use crate::net::Stream;
use crate::protocol::error::parse_error_fields;
use crate::protocol::frame::read_message;
use crate::protocol::message::{AUTHENTICATION, BACKEND_KEY_DATA, ERROR_RESPONSE, READY_FOR_QUERY};
use crate::protocol::startup::{CancelKey, StartupMessage};

/// Bound on any message during login (auth requests are tiny).
const LOGIN_MAX_MESSAGE: usize = 1 << 20;
/// How long a login may take once connected (a server that accepts TCP and
/// then says nothing must not hold a connection attempt forever).
pub const LOGIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Connects to `upstream` and logs in with `startup`, using the password
/// `passfile` holds for its user and database, within the connect timeout
/// plus `LOGIN_TIMEOUT`. Returns the stream and any bytes read past the
/// login's ReadyForQuery; errors are one line for logs and status.
pub async fn connect_and_login(
    upstream: &Upstream,
    passfile: Option<&super::passfile::PassFile>,
    startup: &StartupMessage,
) -> Result<
    (
        Stream,
        BytesMut,
        Option<crate::protocol::startup::CancelKey>,
    ),
    String,
> {
    let user = startup.get("user").unwrap_or_default();
    let database = startup.database().unwrap_or_default();
    let password = passfile.and_then(|pf| pf.lookup(&upstream.host, upstream.port, database, user));
    let limit = upstream.connect_timeout + LOGIN_TIMEOUT;
    let attempt = async {
        let mut stream = upstream.connect().await.map_err(|e| format!("{e:#}"))?;
        let logged_in = login(&mut stream, startup, password, upstream.require_auth)
            .await
            .map_err(|e| match e {
                LoginError::Io(e) => format!("I/O error during login: {e}"),
                e @ LoginError::NotAllowed { .. } => {
                    format!("{e} ({}.require_auth)", upstream.name)
                }
                e => e.to_string(),
            })?;
        Ok((stream, logged_in.leftover, logged_in.key))
    };
    tokio::time::timeout(limit, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no login within {} s", limit.as_secs())))
}

/// SCRAM's key derivation is deliberately expensive (4096 rounds of
/// HMAC-SHA-256 by default). Cap how many run at once, so a burst of target
/// logins (the target coming back, thousands of clients connecting) cannot
/// take every core from the forwarding threads.
static SCRAM_SLOTS: std::sync::LazyLock<tokio::sync::Semaphore> = std::sync::LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    tokio::sync::Semaphore::new(cores.div_ceil(2))
});

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("server refused the login: {code} {message}")]
    Refused { code: String, message: String },
    #[error("server asked for a password and the passfile has none for this user and database")]
    NoPassword,
    #[error("unsupported authentication request {0}")]
    Unsupported(i32),
    #[error("server asked for {}, which require_auth = \"{require}\" does not allow", method.describe())]
    NotAllowed {
        method: AuthMethod,
        require: RequireAuth,
    },
    #[error("server skipped SCRAM's final message: it did not prove it knows the password")]
    ScramSkippedFinal,
    #[error("protocol error during login: {0}")]
    Protocol(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What a completed login leaves behind.
#[derive(Debug)]
pub struct LoggedIn {
    pub key: Option<CancelKey>,
    /// Bytes the server sent after ReadyForQuery (normally none).
    pub leftover: BytesMut,
}

/// Where a login's SCRAM exchange is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sasl {
    NotStarted,
    /// AuthenticationSASL answered, the server's final message not yet
    /// received and verified.
    Started,
    Verified,
}

/// Sends `startup` (as protocol 3.0) and answers the server's authentication
/// requests with `password`, up to the first ReadyForQuery. A request for
/// a method `require` does not allow is refused before anything is sent
/// (the password above all).
pub async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    startup: &StartupMessage,
    password: Option<&str>,
    require: RequireAuth,
) -> Result<LoggedIn, LoginError> {
    let user = startup.get_bytes("user").unwrap_or_default().to_vec();
    crate::net::send_all(stream, &startup.encode(0)).await?;
    let mut buf = BytesMut::with_capacity(1024);
    let mut out = BytesMut::new();
    let mut scram: Option<ScramSha256> = None;
    let mut sasl = Sasl::NotStarted;
    // Whether the server asked for any authentication before its Ok.
    let mut asked = false;
    let mut authenticated = false;
    let mut key = None;
    let allow = |method: AuthMethod| {
        if require.allows(method) {
            Ok(())
        } else {
            Err(LoginError::NotAllowed { method, require })
        }
    };
    loop {
        let msg = read_message(stream, &mut buf, LOGIN_MAX_MESSAGE)
            .await?
            .ok_or_else(|| {
                LoginError::Protocol("server closed the connection during login".into())
            })?;
        let mut body = msg.body();
        match msg.tag {
            AUTHENTICATION => {
                if body.len() < 4 {
                    return Err(LoginError::Protocol("short authentication request".into()));
                }
                let code = body.get_i32();
                let need = || password.ok_or(LoginError::NoPassword);
                match code {
                    0 => {
                        if sasl == Sasl::Started {
                            return Err(LoginError::ScramSkippedFinal);
                        }
                        if !asked {
                            allow(AuthMethod::None)?;
                        }
                        authenticated = true;
                    }
                    3 => {
                        allow(AuthMethod::Password)?;
                        asked = true;
                        frontend::password_message(need()?.as_bytes(), &mut out)?
                    }
                    5 => {
                        allow(AuthMethod::Md5)?;
                        asked = true;
                        let salt: [u8; 4] = body
                            .get(..4)
                            .and_then(|s| s.try_into().ok())
                            .ok_or_else(|| LoginError::Protocol("short md5 salt".into()))?;
                        let hash = postgres_protocol::authentication::md5_hash(
                            &user,
                            need()?.as_bytes(),
                            salt,
                        );
                        frontend::password_message(hash.as_bytes(), &mut out)?;
                    }
                    10 => {
                        allow(AuthMethod::ScramSha256)?;
                        asked = true;
                        if sasl != Sasl::NotStarted {
                            return Err(LoginError::Protocol("SASL started twice".into()));
                        }
                        let offers_scram = body
                            .split(|&b| b == 0)
                            .any(|m| m == SCRAM_SHA_256.as_bytes());
                        if !offers_scram {
                            return Err(LoginError::Protocol(
                                "server offers no SASL mechanism we support".into(),
                            ));
                        }
                        let s = ScramSha256::new(need()?.as_bytes(), ChannelBinding::unsupported());
                        frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)?;
                        scram = Some(s);
                        sasl = Sasl::Started;
                    }
                    11 => {
                        let mut s = scram.take().ok_or_else(|| {
                            LoginError::Protocol("SASL continue without SASL".into())
                        })?;
                        // The PBKDF2 step is deliberately expensive: keep it off the async workers.
                        let data = body.to_vec();
                        let _slot = SCRAM_SLOTS
                            .acquire()
                            .await
                            .map_err(|e| LoginError::Protocol(e.to_string()))?;
                        let (s, r) = tokio::task::spawn_blocking(move || {
                            let r = s.update(&data);
                            (s, r)
                        })
                        .await
                        .map_err(|e| LoginError::Protocol(e.to_string()))?;
                        r.map_err(|e| LoginError::Protocol(format!("SCRAM: {e}")))?;
                        frontend::sasl_response(s.message(), &mut out)?;
                        scram = Some(s);
                    }
                    12 => {
                        let s = scram
                            .as_mut()
                            .filter(|_| sasl == Sasl::Started)
                            .ok_or_else(|| {
                                LoginError::Protocol("SASL final without SASL".into())
                            })?;
                        // Verifies the server's signature: it knows the password.
                        s.finish(body)
                            .map_err(|e| LoginError::Protocol(format!("SCRAM: {e}")))?;
                        sasl = Sasl::Verified;
                    }
                    other => return Err(LoginError::Unsupported(other)),
                }
                if !out.is_empty() {
                    crate::net::send_all(stream, &out).await?;
                    out.clear();
                }
            }
            ERROR_RESPONSE => {
                let f = parse_error_fields(body);
                return Err(LoginError::Refused {
                    code: f.code.unwrap_or("?????").into(),
                    message: f.message.unwrap_or_default().into(),
                });
            }
            BACKEND_KEY_DATA => {
                key = Some(
                    CancelKey::from_backend_key_data(body)
                        .map_err(|e| LoginError::Protocol(e.to_string()))?,
                )
            }
            READY_FOR_QUERY if !authenticated => {
                return Err(LoginError::Protocol(
                    "ReadyForQuery before AuthenticationOk".into(),
                ))
            }
            READY_FOR_QUERY => return Ok(LoggedIn { key, leftover: buf }),
            // ParameterStatus, NoticeResponse, NegotiateProtocolVersion: nothing to do.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// The server's side of a login: what it asks for, after the startup
    /// packet.
    enum Server {
        /// AuthenticationCleartextPassword, then Ok if the password came.
        Cleartext,
        /// No request: straight to AuthenticationOk.
        Trust,
        /// SASL, SASLContinue, then AuthenticationOk without SASLFinal.
        ScramWithoutFinal,
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn auth(code: i32, data: &[u8]) -> Vec<u8> {
        let mut b = code.to_be_bytes().to_vec();
        b.extend_from_slice(data);
        msg(b'R', &b)
    }

    /// Reads one tagged frontend message's body; None at EOF.
    async fn read_msg(s: &mut DuplexStream) -> Option<(u8, Vec<u8>)> {
        let tag = s.read_u8().await.ok()?;
        let len = s.read_i32().await.ok()?;
        let mut body = vec![0; len as usize - 4];
        s.read_exact(&mut body).await.ok()?;
        Some((tag, body))
    }

    /// Plays `server` and returns the frontend messages it received.
    async fn serve(mut s: DuplexStream, server: Server) -> Vec<(u8, Vec<u8>)> {
        let len = s.read_i32().await.unwrap();
        let mut startup = vec![0; len as usize - 4];
        s.read_exact(&mut startup).await.unwrap();
        let ok_ready = [auth(0, b""), msg(b'Z', b"I")].concat();
        let mut got = Vec::new();
        match server {
            Server::Trust => s.write_all(&ok_ready).await.unwrap(),
            Server::Cleartext => {
                s.write_all(&auth(3, b"")).await.unwrap();
                if let Some(m) = read_msg(&mut s).await {
                    got.push(m);
                    s.write_all(&ok_ready).await.unwrap();
                }
            }
            Server::ScramWithoutFinal => {
                s.write_all(&auth(10, b"SCRAM-SHA-256\0\0")).await.unwrap();
                let Some((tag, first)) = read_msg(&mut s).await else {
                    return got;
                };
                got.push((tag, first.clone()));
                // "SCRAM-SHA-256\0" len "n,,n=,r=<nonce>"
                let text = String::from_utf8_lossy(&first).into_owned();
                let nonce = text.rsplit("r=").next().unwrap().to_string();
                let server_first = format!("r={nonce}srvnonce,s=c2FsdHNhbHRzYWx0,i=4096");
                s.write_all(&auth(11, server_first.as_bytes()))
                    .await
                    .unwrap();
                if let Some(m) = read_msg(&mut s).await {
                    got.push(m);
                    // Ok, without AuthenticationSASLFinal (code 12).
                    s.write_all(&ok_ready).await.unwrap();
                }
            }
        }
        got
    }

    async fn run(
        server: Server,
        require: &str,
    ) -> (Result<LoggedIn, LoginError>, Vec<(u8, Vec<u8>)>) {
        let (mut client, srv) = tokio::io::duplex(1 << 16);
        let served = tokio::spawn(serve(srv, server));
        let startup = StartupMessage::new(3, 0, vec![(b"user".to_vec(), b"u".to_vec())]);
        let r = login(
            &mut client,
            &startup,
            Some("pw-secret"),
            require.parse().unwrap(),
        )
        .await;
        drop(client);
        (r, served.await.unwrap())
    }

    #[tokio::test]
    async fn a_cleartext_request_is_refused_by_default_before_the_password_is_sent() {
        let (r, got) = run(Server::Cleartext, crate::config::require_auth::DEFAULT).await;
        let e = r.unwrap_err();
        assert!(
            matches!(
                e,
                LoginError::NotAllowed {
                    method: AuthMethod::Password,
                    ..
                }
            ),
            "{e}"
        );
        let text = e.to_string();
        assert!(
            text.contains("cleartext password") && text.contains("require_auth"),
            "{text}"
        );
        assert!(got.is_empty(), "the password was sent: {got:?}");

        let (r, got) = run(Server::Cleartext, "password").await;
        r.unwrap();
        assert_eq!(got, vec![(b'p', b"pw-secret\0".to_vec())]);
    }

    #[tokio::test]
    async fn a_server_asking_nothing_needs_none() {
        run(Server::Trust, "scram-sha-256,md5,none")
            .await
            .0
            .unwrap();
        let e = run(Server::Trust, "scram-sha-256").await.0.unwrap_err();
        assert!(
            matches!(
                e,
                LoginError::NotAllowed {
                    method: AuthMethod::None,
                    ..
                }
            ),
            "{e}"
        );
        let e = run(Server::Trust, "!none").await.0.unwrap_err();
        assert!(e.to_string().contains("no authentication"), "{e}");
    }

    #[tokio::test]
    async fn ok_before_scram_final_is_refused() {
        for require in ["scram-sha-256", "!password"] {
            let (r, got) = run(Server::ScramWithoutFinal, require).await;
            let e = r.unwrap_err();
            assert!(matches!(e, LoginError::ScramSkippedFinal), "{e}");
            assert!(e
                .to_string()
                .contains("server skipped SCRAM's final message"));
            assert_eq!(got.len(), 2, "both SCRAM messages were sent");
        }
        let e = run(Server::ScramWithoutFinal, "md5").await.0.unwrap_err();
        assert!(
            matches!(
                e,
                LoginError::NotAllowed {
                    method: AuthMethod::ScramSha256,
                    ..
                }
            ),
            "{e}"
        );
    }
}
