//! The per-session link to the target.
//!
//! Each client session gets its own connection to the target, logged in as
//! the same user and database, so routed reads run with that session's
//! identity. Logging in (and again after a loss, with backoff) happens in a
//! background task: it never delays the client, and a target that is down
//! or refuses the login only shows up in logs and metrics. Each logged-in
//! connection is handed to the session's responder (`router::responder`),
//! which keeps it alive while idle and asks for another when it breaks.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, info, warn};

use super::login::connect_and_login;
use super::passfile::PassFile;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::net::connect::Upstream;
use crate::net::Stream;
use crate::protocol::startup::StartupMessage;

const MAX_BACKOFF: Duration = Duration::from_secs(60);

type Labels = Vec<(&'static str, &'static str)>;

/// The target links' counters, exported by the admin API's `/metrics`.
pub struct LinkMetrics {
    pub logins_ok: Counter,
    pub logins_failed: Counter,
    /// Logged-in connections that exist now.
    pub links_up: Gauge,
    pub links_lost: Counter,
}

impl LinkMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let logins = Family::<Labels, Counter>::default();
        registry.register(
            "target_logins",
            "Proxy logins to the target, by result",
            logins.clone(),
        );
        let links_up = Gauge::default();
        registry.register(
            "target_links_up",
            "Per-session target connections currently up",
            links_up.clone(),
        );
        let links_lost = Counter::default();
        registry.register(
            "target_links_lost",
            "Target connections lost after login",
            links_lost.clone(),
        );
        let logins_ok = logins.get_or_create(&vec![("result", "ok")]).clone();
        let logins_failed = logins.get_or_create(&vec![("result", "failed")]).clone();
        Self {
            logins_ok,
            logins_failed,
            links_up,
            links_lost,
        }
    }
}

/// Everything needed to open target links; shared by all sessions.
pub struct TargetLinks {
    pub upstream: Upstream,
    pub passfile: Option<PassFile>,
    pub keepalive: Duration,
    pub metrics: Arc<LinkMetrics>,
    /// Whether the most recent target login (any session's) failed: a new
    /// session then does not count on its link before it is up.
    pub last_login_failed: std::sync::atomic::AtomicBool,
}

/// A running link. Dropping it drops the stop sender, which ends the
/// link's task.
pub struct TargetLink {
    _stop: oneshot::Sender<()>,
    /// Logged-in connections, one at a time.
    pub conns: mpsc::Receiver<Conn>,
    /// Tells the task the session lost its connection and wants another.
    pub want: Arc<Notify>,
    /// Target logins were working when the link started: reads may be
    /// routed before the first connection is up (they wait for it).
    pub optimistic: bool,
}

/// A logged-in target connection; counted in `links_up` while it
/// exists.
pub struct Conn {
    pub stream: Stream,
    /// Bytes read past the login.
    pub buf: BytesMut,
    /// Its BackendKeyData, to cancel a routed query running on it.
    pub key: Option<crate::protocol::startup::CancelKey>,
    metrics: Arc<LinkMetrics>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.metrics.links_up.dec();
    }
}

impl TargetLinks {
    /// Starts a link for a session whose client sent `startup`.
    pub fn open(self: &Arc<Self>, session_id: u64, startup: StartupMessage) -> TargetLink {
        let (stop_tx, stop_rx) = oneshot::channel();
        let (conn_tx, conn_rx) = mpsc::channel(1);
        let want = Arc::new(Notify::new());
        let links = Arc::clone(self);
        let w = Arc::clone(&want);
        tokio::spawn(async move { links.run(session_id, startup, stop_rx, conn_tx, w).await });
        TargetLink {
            _stop: stop_tx,
            conns: conn_rx,
            want,
            optimistic: !self
                .last_login_failed
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    async fn run(
        &self,
        session_id: u64,
        startup: StartupMessage,
        mut stop: oneshot::Receiver<()>,
        conns: mpsc::Sender<Conn>,
        want: Arc<Notify>,
    ) {
        let user = startup.get("user").unwrap_or_default().to_string();
        let database = startup.database().unwrap_or_default().to_string();
        let mut backoff = Duration::from_secs(1);
        let mut failures = 0u32;
        let mut ever_up = false;
        loop {
            let attempt = connect_and_login(&self.upstream, self.passfile.as_ref(), &startup);
            let connected = tokio::select! {
                r = attempt => r,
                _ = &mut stop => return,
            };
            match connected {
                Ok((stream, buf, key)) => {
                    self.last_login_failed
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    self.metrics.logins_ok.inc();
                    self.metrics.links_up.inc();
                    if failures > 0 || ever_up {
                        info!(session_id, %user, %database, "target link re-established");
                    }
                    debug!(session_id, "target link up");
                    ever_up = true;
                    failures = 0;
                    backoff = Duration::from_secs(1);
                    let conn = Conn {
                        stream,
                        buf,
                        key,
                        metrics: Arc::clone(&self.metrics),
                    };
                    if conns.send(conn).await.is_err() {
                        return; // the session is gone
                    }
                    tokio::select! {
                        _ = want.notified() => {}
                        _ = &mut stop => return,
                    }
                    self.metrics.links_lost.inc();
                }
                Err(why) => {
                    self.last_login_failed
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    self.metrics.logins_failed.inc();
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
}
