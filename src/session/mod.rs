//! One client session, from accept to close.
//!
//! `startup` takes the connection to an authenticated session on the source;
//! the session core (`pump`) then moves bytes both ways (the hot path), with
//! the configured policies as its hooks (`policies`). This module ties them
//! together and decides how a session ends and what the client is told.

pub mod policies;
pub mod startup;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, info, warn, Instrument};

use self::policies::{ClientPolicies, ServerPolicies};
use self::startup::{connect_primary, negotiate, Established, Failure, Negotiated};
use crate::lifecycle::Phase;
use crate::net::connect::set_keepalive;
use crate::net::Stream;
use crate::protocol::error::{error_response, Severity};
use crate::protocol::sqlstate;
use crate::protocol::startup::StartupMessage;
use crate::proxy::Proxy;
use crate::pump::core::{ClientCore, ClientSide, ServerSide};
use crate::pump::{pump, PumpEnd, PumpError, Woken};
use crate::router::decide::Decider;
use crate::router::link::{RouteLink, SessionKeys};
use crate::router::responder::{Responder, ResponderEnd, SharedWriter};
use crate::tracker::{PreparedStatements, Shared};
use crate::upstream::target::TargetLink;

/// Upper bounds on tracked prepared statements per session: count, and
/// bytes of their names and SQL text.
const MAX_TRACKED_STATEMENTS: usize = 100_000;
const MAX_TRACKED_STATEMENT_BYTES: usize = 16 << 20;
/// How long the proxy waits for a client to take a final error message.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// What woke a session's select: its end, a change of the proxy's phase
/// (false: the proxy is gone), or the idle timer.
enum Event {
    End(End),
    Phase(bool),
    IdleTick,
}

/// Serves one accepted connection. `_permit` holds its slot under
/// `limits.max_client_connections` until the session ends.
pub async fn serve(
    proxy: Arc<Proxy>,
    tcp: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    let id = proxy.next_session_id();
    proxy.metrics.client_connections.inc();
    // The span covers startup and the session's end; the forwarding in
    // between runs outside it, so the hot path pays no span enter/exit.
    let span = tracing::info_span!("session", id, %peer);
    let Some((mut client, startup, established)) =
        establish(&proxy, tcp).instrument(span.clone()).await
    else {
        return;
    };
    proxy.metrics.client_sessions_active.inc();
    // The target link logs in beside the session and never delays it.
    let target_link = proxy
        .targets
        .as_ref()
        .filter(|_| startup.get("replication").is_none())
        .map(|t| t.open(id, startup.clone()));
    if let (Some(h), Some(_)) = (&proxy.health, &target_link) {
        h.saw_session(&startup);
    }
    // Recorded from here: after authentication, so no password is.
    let recorder = proxy.record.session(id, &startup);
    let end = forward_session(
        &proxy,
        &mut client,
        established,
        id,
        &startup,
        peer,
        target_link,
        recorder.as_ref(),
    )
    .await;
    drop(recorder);
    proxy.metrics.client_sessions_active.dec();
    span.in_scope(|| info!(reason = %end, "session closed"));
}

/// Startup up to an authenticated session, bounded by the startup timeout.
async fn establish(
    proxy: &Arc<Proxy>,
    tcp: TcpStream,
) -> Option<(Stream, StartupMessage, Established)> {
    let _ = tcp.set_nodelay(true);
    set_keepalive(&tcp);
    let deadline = Instant::now() + Duration::from_millis(proxy.config.limits.startup_timeout_ms);

    let mut client = Some(Stream::Plain(tcp));
    let startup = match timeout_at(deadline, negotiate(proxy, &mut client)).await {
        Ok(Ok(Negotiated::Startup(m))) => m,
        Ok(Ok(Negotiated::Cancel(key))) => {
            proxy
                .cancels
                .cancel(
                    &key,
                    &proxy.databases.primary().upstream,
                    proxy.targets.as_ref().map(|t| &t.upstream),
                    &proxy.metrics.cancel,
                )
                .await;
            return None;
        }
        Ok(Err(f)) => return reject(proxy, client.as_mut(), f).await,
        Err(_) => return reject(proxy, client.as_mut(), startup_timeout()).await,
    };
    let mut client = client?;
    let established =
        match timeout_at(deadline, connect_primary(proxy, &mut client, &startup)).await {
            Ok(Ok(e)) => e,
            Ok(Err(f)) => return reject(proxy, Some(&mut client), f).await,
            Err(_) => return reject(proxy, Some(&mut client), startup_timeout()).await,
        };
    info!(
        user = startup.get("user").unwrap_or_default(),
        database = startup.database().unwrap_or_default(),
        application_name = startup.get("application_name").unwrap_or_default(),
        tls = client.is_tls(),
        source_tls = established.server.is_tls(),
        "session established"
    );
    Some((client, startup, established))
}

fn startup_timeout() -> Failure {
    Failure {
        code: sqlstate::PROTOCOL_VIOLATION,
        message: "timeout expired during startup".into(),
        client_told: false,
        client_gone: false,
    }
}

/// Ends a session that never got established, telling the client why when
/// it still can. Returns `None` so callers can `return reject(..).await`.
async fn reject<T>(proxy: &Proxy, client: Option<&mut Stream>, f: Failure) -> Option<T> {
    if f.client_gone {
        proxy.metrics.client_gone_in_startup.inc();
        debug!(reason = %f.message, "client left during startup");
        return None;
    }
    if f.code == sqlstate::PROTOCOL_VIOLATION {
        proxy.metrics.protocol_errors.inc();
    } else {
        proxy.metrics.client_rejected_startup.inc();
    }
    info!(reason = %f.message, "session not established");
    match (f.client_told, client) {
        (false, Some(client)) => send_fatal(client, f.code, &f.message).await,
        // A protocol error the client is not told of (an invalid startup
        // packet length): closed as Postgres closes it, after reading what
        // the client had sent, so that it sees an orderly close, not a reset.
        (true, Some(client)) if f.code == sqlstate::PROTOCOL_VIOLATION => {
            let _ = timeout(Duration::from_millis(50), async {
                let mut buf = [0u8; 8192];
                let mut left = 64usize << 10;
                while left > 0 {
                    match client.read(&mut buf).await {
                        Ok(n) if n > 0 => left = left.saturating_sub(n),
                        _ => break,
                    }
                }
            })
            .await;
            let _ = timeout(FINAL_WRITE_TIMEOUT, client.shutdown()).await;
        }
        _ => {}
    }
    None
}

/// Writes a FATAL ErrorResponse and closes, giving up on a client that does
/// not take it within `FINAL_WRITE_TIMEOUT`.
async fn send_fatal(client: &mut Stream, code: &str, message: &str) {
    let msg = error_response(Severity::Fatal, code, message);
    let _ = timeout(FINAL_WRITE_TIMEOUT, async {
        crate::net::send_all(client, &msg).await?;
        client.shutdown().await
    })
    .await;
}

/// Answers a connection over `limits.max_client_connections` as Postgres
/// does: SSL/GSS negotiation and the startup packet first (so libpq shows the
/// message), then `FATAL 53300`. Cancel requests are still honoured, since
/// cancelling is how a client frees a stuck slot.
pub async fn refuse_over_limit(proxy: Arc<Proxy>, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let deadline = Instant::now() + Duration::from_millis(proxy.config.limits.startup_timeout_ms);
    let mut client = Some(Stream::Plain(tcp));
    match timeout_at(deadline, negotiate(&proxy, &mut client)).await {
        Ok(Ok(Negotiated::Cancel(key))) => {
            proxy
                .cancels
                .cancel(
                    &key,
                    &proxy.databases.primary().upstream,
                    proxy.targets.as_ref().map(|t| &t.upstream),
                    &proxy.metrics.cancel,
                )
                .await
        }
        Ok(Ok(Negotiated::Startup(_))) => {
            if let Some(client) = client.as_mut() {
                send_fatal(
                    client,
                    sqlstate::TOO_MANY_CONNECTIONS,
                    "sorry, too many clients already",
                )
                .await;
            }
        }
        // Malformed, gone or too slow: it gets nothing more than a close.
        _ => {}
    }
}

/// Why an established session ended.
enum End {
    Client(Result<PumpEnd, PumpError>),
    Server(Result<PumpEnd, PumpError>),
    Target(ResponderEnd),
    Shutdown,
    IdleTimeout,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Client(Ok(PumpEnd::Stopped)) => write!(f, "client terminated"),
            End::Client(Ok(PumpEnd::Eof { mid_message })) => {
                write!(
                    f,
                    "client disconnected{}",
                    if *mid_message { " mid-message" } else { "" }
                )
            }
            End::Client(Err(e)) => write!(f, "client error: {e}"),
            End::Server(Ok(PumpEnd::Stopped)) => write!(f, "drained for shutdown"),
            End::Server(Ok(PumpEnd::Eof { .. })) => write!(f, "source closed the connection"),
            End::Server(Err(e)) => write!(f, "source error: {e}"),
            End::Target(ResponderEnd::LostInTransaction(why)) => {
                write!(f, "target failed inside a routed transaction: {why}")
            }
            End::Target(ResponderEnd::ClientGone(e)) => write!(f, "client write failed: {e}"),
            End::Target(ResponderEnd::SourceGone(e)) => write!(f, "source write failed: {e}"),
            End::Target(ResponderEnd::Drained) => write!(f, "drained for shutdown"),
            End::Shutdown => write!(f, "proxy shutting down"),
            End::IdleTimeout => write!(f, "idle timeout"),
        }
    }
}

type BoxRead<'a> = Box<dyn AsyncRead + Unpin + Send + 'a>;
type BoxWrite<'a> = Box<dyn AsyncWrite + Unpin + Send + 'a>;

/// Splits a stream into halves that can be driven concurrently: plain TCP
/// without any locking, TLS through tokio's split.
fn split(stream: &mut Stream) -> (BoxRead<'_>, BoxWrite<'_>) {
    match stream {
        Stream::Plain(tcp) => {
            let (r, w) = tcp.split();
            (Box::new(r), Box::new(w))
        }
        other => {
            let (r, w) = tokio::io::split(other);
            (Box::new(r), Box::new(w))
        }
    }
}

#[allow(clippy::too_many_arguments)] // the session's parts, each owned by `serve`
async fn forward_session(
    proxy: &Proxy,
    client: &mut Stream,
    est: Established,
    id: u64,
    startup: &StartupMessage,
    peer: SocketAddr,
    target_link: Option<TargetLink>,
    recorder: Option<&crate::record::SessionRecorder>,
) -> End {
    let Established {
        mut server,
        mut client_buf,
        mut server_buf,
        cancel_guard,
    } = est;
    let shared = Shared::default();
    // Replication connections speak another protocol: never mirrored.
    let capture = proxy
        .mirror
        .as_ref()
        .filter(|_| startup.get("replication").is_none())
        .map(|m| {
            std::sync::Mutex::new(crate::mirror::capture::Capture::new(
                std::sync::Arc::clone(&m.rules),
                id,
                startup.params().to_vec(),
                m.max_txn_bytes,
                Some(std::sync::Arc::clone(&m.inflight)),
            ))
        });
    let mut statements =
        PreparedStatements::new(MAX_TRACKED_STATEMENTS, MAX_TRACKED_STATEMENT_BYTES);
    let mut shutdown = proxy.shutdown.clone();
    let idle_timeout = Duration::from_secs(proxy.config.limits.idle_timeout_s);

    let link = RouteLink::new(proxy.health.clone());
    let end = {
        let (mut client_rd, client_wr) = split(client);
        let (mut server_rd, server_wr) = split(&mut server);
        // Both writers are shared with the routing responder, which writes
        // routed answers to the client and fallbacks to the source.
        let client_wr = std::sync::Mutex::new(client_wr);
        let server_wr = std::sync::Mutex::new(server_wr);
        let mut client_policies = ClientPolicies::default();
        client_policies.capture = capture.as_ref();
        client_policies.record = recorder;
        client_policies.mirror = proxy.mirror.as_deref().filter(|_| capture.is_some());
        let mut server_policies = ServerPolicies::default();
        if let (Some(m), Some(c)) = (proxy.mirror.as_deref(), capture.as_ref()) {
            server_policies.mirror = Some((m, c));
            server_policies.max_inspected = proxy.config.limits.max_message_bytes;
        }
        let has_responder = target_link.is_some();
        let responder = target_link.map(|target| {
            let keys = SessionKeys::new(
                id,
                startup.get("user").unwrap_or_default(),
                startup.get("application_name").unwrap_or_default(),
                &peer.ip().to_string(),
            );
            let mut decider = Decider::new(
                &link,
                &proxy.router,
                &proxy.metrics.route,
                proxy.mirror.as_deref(),
                keys,
                std::sync::Arc::clone(&proxy.rules),
            );
            if let Some(sh) = proxy.shadow.as_deref() {
                let info = crate::shadow::SessionInfo::new(startup);
                decider = decider.with_shadow(sh, std::sync::Arc::new(info));
            }
            client_policies.route = Some(decider);
            server_policies.route = Some((&link, &proxy.metrics.route));
            // Set before the pumps run: the first request may come before
            // the responder is first polled.
            link.ready
                .store(target.optimistic, std::sync::atomic::Ordering::Relaxed);
            Responder {
                link: &link,
                shared: &shared,
                client: &client_wr,
                source: &server_wr,
                router: &proxy.router,
                route_metrics: &proxy.metrics.route,
                target,
                capture: capture.as_ref(),
                cancel_key: cancel_guard
                    .as_ref()
                    .map(|g| std::sync::Arc::clone(&g.routed)),
                keepalive: Duration::from_secs(proxy.config.target.keepalive_s),
                max_message: proxy.config.limits.max_message_bytes,
                session_id: id,
            }
            .run()
        });
        let responder = async move {
            match responder {
                Some(r) => r.await,
                None => std::future::pending().await,
            }
        };
        let mut frontend = ClientSide::new(
            ClientCore::new(
                &shared,
                &mut statements,
                proxy.config.limits.max_message_bytes,
            ),
            client_policies,
        );
        let mut backend = ServerSide::new(&shared, server_policies);
        let mut client_out = SharedWriter(&client_wr);
        let mut server_out = SharedWriter(&server_wr);
        let to_server = pump(
            &mut *client_rd,
            &mut server_out,
            &mut client_buf,
            &mut frontend,
        );
        let to_client = pump(
            &mut *server_rd,
            &mut client_out,
            &mut server_buf,
            &mut backend,
        );
        tokio::pin!(to_server, to_client, responder);
        // Each pump is polled when its own socket (or what it waits on)
        // woke the task, not for every message of the other direction.
        // The responder too while it is parked (waiting for a request);
        // while it serves one it reads state the pumps change without
        // waking it, and is polled at every wake.
        let mut to_server = Woken::new(to_server);
        let mut to_client = Woken::new(to_client);
        let mut responder = Woken::new(responder);
        let mut seen_messages = 0;
        // Idle as Postgres means it, counting routed work too.
        let idle = || shared.is_idle() && !link.target_busy() && !link.in_target_txn();
        loop {
            let event = {
                let changed = shutdown.changed();
                tokio::pin!(changed);
                let mut changed = Woken::new(changed);
                let idle_tick = tokio::time::sleep(idle_timeout);
                tokio::pin!(idle_tick);
                let mut idle_tick = Woken::new(idle_tick);
                tokio::select! {
                    biased;
                    r = &mut to_server => Event::End(End::Client(r)),
                    r = &mut to_client => Event::End(End::Server(r)),
                    r = std::future::poll_fn(|cx| {
                        responder.poll_woken_or(cx, has_responder && !link.responder_parked())
                    }) => Event::End(End::Target(r)),
                    changed = &mut changed => Event::Phase(changed.is_ok()),
                    _ = &mut idle_tick, if !idle_timeout.is_zero() => Event::IdleTick,
                }
            };
            match event {
                Event::End(end) => break end,
                Event::Phase(open) => {
                    let phase = if open {
                        *shutdown.borrow_and_update()
                    } else {
                        Phase::Closing
                    };
                    match phase {
                        Phase::Running => {}
                        Phase::Draining => {
                            shared.draining.store(true, Ordering::Relaxed);
                            if idle() {
                                break End::Shutdown;
                            }
                        }
                        Phase::Closing => break End::Shutdown,
                    }
                }
                Event::IdleTick => {
                    // Like Postgres' idle_session_timeout: only sessions idle
                    // outside a transaction block, with nothing in flight.
                    let now = shared.client_messages.load(Ordering::Relaxed);
                    if now == seen_messages && idle() {
                        break End::IdleTimeout;
                    }
                    seen_messages = now;
                }
            }
        }
    };
    if let (Some(m), Some(c)) = (proxy.mirror.as_deref(), capture.as_ref()) {
        let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = c.end() {
            m.unit_in_doubt(
                d,
                "the session ended while this unit's commit was on its way to the source",
                false,
            );
            c.forget_in_doubt();
        }
    }
    if statements.overflowed {
        warn!(
            "more than {MAX_TRACKED_STATEMENTS} prepared statements; later ones were not tracked"
        );
    }

    // What the client is told, if anything, and whether the source gets a
    // polite Terminate before the connection closes.
    let (notice, terminate_server) = match &end {
        End::Client(Ok(PumpEnd::Stopped)) => (None, false), // Terminate already forwarded
        End::Client(Ok(PumpEnd::Eof { .. }))
        | End::Client(Err(PumpError::Read(_) | PumpError::Write(_))) => (None, false),
        End::Client(Err(PumpError::Protocol(e))) => {
            proxy.metrics.protocol_errors.inc();
            (Some((sqlstate::PROTOCOL_VIOLATION, e.to_string())), false)
        }
        End::Server(Ok(PumpEnd::Stopped)) | End::Shutdown => (
            Some((
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command".into(),
            )),
            true,
        ),
        End::Server(Ok(PumpEnd::Eof { .. }))
        | End::Server(Err(PumpError::Read(_) | PumpError::Write(_))) => (None, false),
        End::Target(ResponderEnd::Drained) => (
            Some((
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command".into(),
            )),
            true,
        ),
        // The client was told already, or cannot be.
        End::Target(_) => (None, true),
        End::Server(Err(PumpError::Protocol(e))) => (
            Some((
                sqlstate::PROTOCOL_VIOLATION,
                format!("invalid message from the source: {e}"),
            )),
            false,
        ),
        // A commit the mirror could not make durable: no acknowledgement.
        End::Server(Err(PumpError::Withheld(why))) | End::Client(Err(PumpError::Withheld(why))) => {
            (Some((sqlstate::IO_ERROR, why.clone())), true)
        }
        End::IdleTimeout => (
            Some((
                sqlstate::IDLE_SESSION_TIMEOUT,
                "terminating connection due to idle-session timeout".into(),
            )),
            true,
        ),
    };
    if let Some((code, message)) = notice {
        // Only append a message where the client stream is between messages.
        if shared.client_at_boundary.load(Ordering::Relaxed) {
            let msg = error_response(Severity::Fatal, code, &message);
            // Written out rather than `net::send_all`: with that generic
            // future here the compiler stopped inlining the pumps into this
            // function's poll (callgrind: 90 more instructions per
            // select-only transaction).
            let _ = timeout(FINAL_WRITE_TIMEOUT, async {
                client.write_all(&msg).await?;
                client.flush().await
            })
            .await;
        } else {
            debug!("client stream mid-message; closing without a final error");
        }
    }
    // A Terminate only between messages: in the middle of a streamed one
    // (a Bind, a CopyData) it would be read as that message's bytes.
    if terminate_server && shared.server_at_boundary.load(Ordering::Relaxed) {
        let _ = timeout(
            FINAL_WRITE_TIMEOUT,
            crate::net::send_all(&mut server, b"X\0\0\0\x04"),
        )
        .await;
    }
    let _ = timeout(FINAL_WRITE_TIMEOUT, server.shutdown()).await;
    let _ = timeout(FINAL_WRITE_TIMEOUT, client.shutdown()).await;
    end
}
