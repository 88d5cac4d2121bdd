//! The client side of startup and authentication, for connections the proxy
//! opens on its own behalf (the per-session target link). Supports the
//! methods Postgres offers for password logins: cleartext, md5 and
//! SCRAM-SHA-256 (without channel binding).

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

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
        let logged_in = login(&mut stream, startup, password)
            .await
            .map_err(|e| match e {
                LoginError::Io(e) => format!("I/O error during login: {e}"),
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

/// Sends `startup` (as protocol 3.0) and answers the server's authentication
/// requests with `password`, up to the first ReadyForQuery.
pub async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    startup: &StartupMessage,
    password: Option<&str>,
) -> Result<LoggedIn, LoginError> {
    let user = startup.get_bytes("user").unwrap_or_default().to_vec();
    stream.write_all(&startup.encode(0)).await?;
    let mut buf = BytesMut::with_capacity(1024);
    let mut out = BytesMut::new();
    let mut scram: Option<ScramSha256> = None;
    let mut key = None;
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
                    0 => {}
                    3 => frontend::password_message(need()?.as_bytes(), &mut out)?,
                    5 => {
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
                        let s = scram.as_mut().ok_or_else(|| {
                            LoginError::Protocol("SASL final without SASL".into())
                        })?;
                        s.finish(body)
                            .map_err(|e| LoginError::Protocol(format!("SCRAM: {e}")))?;
                    }
                    other => return Err(LoginError::Unsupported(other)),
                }
                if !out.is_empty() {
                    stream.write_all(&out).await?;
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
            READY_FOR_QUERY => return Ok(LoggedIn { key, leftover: buf }),
            // ParameterStatus, NoticeResponse, NegotiateProtocolVersion: nothing to do.
            _ => {}
        }
    }
}
