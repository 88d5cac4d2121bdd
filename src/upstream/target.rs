//! The per-session link to the target.
//!
//! Each client session gets its own connection to the target, logged in as
//! the same user and database, so later stages (mirroring, routing) have a
//! connection carrying that session's state. The link lives in a background
//! task: it never delays the client, and a target that is down or refuses
//! the login only shows up in logs and metrics. While idle the link sends a
//! Sync now and then and expects a ReadyForQuery back, and reconnects with
//! backoff when the connection is lost.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::login::connect_and_login;
use super::passfile::PassFile;
use crate::metrics::Metrics;
use crate::net::connect::Upstream;
use crate::protocol::error::parse_error_fields;
use crate::protocol::frame::read_message;
use crate::protocol::message::{ERROR_RESPONSE, READY_FOR_QUERY};
use crate::protocol::startup::StartupMessage;

const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long a goodbye may take.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything needed to open target links; shared by all sessions.
pub struct TargetLinks {
    pub upstream: Upstream,
    pub passfile: Option<PassFile>,
    pub keepalive: Duration,
    pub metrics: Arc<Metrics>,
}

/// A running link. Dropping it drops the stop sender, which tells the
/// link's task to send Terminate and end.
pub struct TargetLink {
    _stop: oneshot::Sender<()>,
}

enum Held {
    Stopped,
    Lost(String),
}

impl TargetLinks {
    /// Starts a link for a session whose client sent `startup`.
    pub fn open(self: &Arc<Self>, session_id: u64, startup: StartupMessage) -> TargetLink {
        let (stop_tx, stop_rx) = oneshot::channel();
        let links = Arc::clone(self);
        tokio::spawn(async move { links.run(session_id, startup, stop_rx).await });
        TargetLink { _stop: stop_tx }
    }

    async fn run(&self, session_id: u64, startup: StartupMessage, mut stop: oneshot::Receiver<()>) {
        let user = startup.get("user").unwrap_or_default().to_string();
        let database = startup.database().unwrap_or_default().to_string();
        let mut backoff = Duration::from_secs(1);
        let mut failures = 0u32;
        loop {
            let attempt = connect_and_login(&self.upstream, self.passfile.as_ref(), &startup);
            let connected = tokio::select! {
                r = attempt => r,
                _ = &mut stop => return,
            };
            match connected {
                Ok((stream, leftover)) => {
                    self.metrics.target_logins_ok.inc();
                    self.metrics.target_links_up.inc();
                    if failures > 0 {
                        info!(session_id, %user, %database, "target link re-established");
                    }
                    debug!(session_id, "target link up");
                    failures = 0;
                    backoff = Duration::from_secs(1);
                    let held = self.hold(stream, leftover, &mut stop).await;
                    self.metrics.target_links_up.dec();
                    match held {
                        Held::Stopped => return,
                        Held::Lost(why) => {
                            self.metrics.target_links_lost.inc();
                            warn!(session_id, %user, %database, reason = %why, "target link lost; reconnecting");
                        }
                    }
                }
                Err(why) => {
                    self.metrics.target_logins_failed.inc();
                    failures += 1;
                    // Loud once, then quiet: a refused login repeats on every retry.
                    if failures == 1 {
                        warn!(session_id, %user, %database, reason = %why, target = %self.upstream.addr(),
                            "target login failed; the client session continues on the source");
                    } else {
                        debug!(session_id, reason = %why, failures, "target login failed again");
                    }
                }
            }
            // Jitter, so thousands of links do not all retry in the same instant
            // when the target comes back.
            let pause = backoff.mul_f64(rand::random_range(0.5..1.5));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = &mut stop => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Keeps a logged-in link alive until told to stop or until it breaks.
    async fn hold(
        &self,
        mut stream: crate::net::Stream,
        mut buf: BytesMut,
        stop: &mut oneshot::Receiver<()>,
    ) -> Held {
        let mut ticker = tokio::time::interval(self.keepalive);
        ticker.reset(); // the first tick would fire at once
        let mut awaiting_pong = false;
        loop {
            tokio::select! {
                _ = &mut *stop => {
                    let _ = tokio::time::timeout(TERMINATE_TIMEOUT, async {
                        stream.write_all(b"X\0\0\0\x04").await?;
                        stream.shutdown().await
                    })
                    .await;
                    return Held::Stopped;
                }
                _ = ticker.tick() => {
                    if awaiting_pong {
                        return Held::Lost("no answer to keepalive within its interval".into());
                    }
                    if let Err(e) = stream.write_all(b"S\0\0\0\x04").await {
                        return Held::Lost(format!("keepalive write failed: {e}"));
                    }
                    awaiting_pong = true;
                }
                msg = read_message(&mut stream, &mut buf, 1 << 20) => match msg {
                    Ok(Some(m)) if m.tag == READY_FOR_QUERY => awaiting_pong = false,
                    Ok(Some(m)) if m.tag == ERROR_RESPONSE => {
                        let f = parse_error_fields(m.body());
                        if f.severity == Some("FATAL") || f.severity == Some("PANIC") {
                            return Held::Lost(format!("{} {}", f.code.unwrap_or("?"), f.message.unwrap_or("")));
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return Held::Lost("target closed the connection".into()),
                    Err(e) => return Held::Lost(format!("read failed: {e}")),
                },
            }
        }
    }
}
