//! Cancel keys. Clients get a BackendKeyData whose pid is the source
//! backend's real pid (so it matches `pg_backend_pid()` and the pid in
//! NotificationResponse, which applications compare) but whose secret is
//! minted by the proxy. A CancelRequest therefore only works through the
//! proxy, which maps it to the backend's real key.

use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use rand::Rng;
use tokio::io::AsyncReadExt;
use tracing::{debug, warn};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::net::connect::Upstream;
use crate::protocol::startup::CancelKey;

/// CancelRequests received, by outcome (exported by `/metrics`).
pub struct CancelMetrics {
    pub forwarded: Counter,
    pub unknown_key: Counter,
}

impl CancelMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let cancels = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        registry.register(
            "cancel_requests",
            "CancelRequests received, by outcome",
            cancels.clone(),
        );
        let forwarded = cancels
            .get_or_create(&vec![("result", "forwarded")])
            .clone();
        let unknown_key = cancels
            .get_or_create(&vec![("result", "unknown_key")])
            .clone();
        Self {
            forwarded,
            unknown_key,
        }
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    /// Backend pid -> (proxy-issued secret, the source backend's key, the
    /// target backend's key while a routed request runs there).
    keys: DashMap<i32, (Bytes, CancelKey, RoutedKey)>,
}

/// The target backend key of a session's routed request in flight: a
/// cancel must reach the backend that runs the query.
pub type RoutedKey = Arc<std::sync::Mutex<Option<CancelKey>>>;

/// Removes a session's key when the session ends.
pub struct CancelGuard {
    registry: Arc<CancelRegistry>,
    pid: i32,
    secret: Bytes,
    /// Set by the routing responder while a routed request runs.
    pub routed: RoutedKey,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        // Only our own entry: the pid may already belong to a newer backend.
        self.registry
            .keys
            .remove_if(&self.pid, |_, (secret, _, _)| *secret == self.secret);
    }
}

impl CancelRegistry {
    /// Registers a session whose source backend has `source_key` and returns
    /// the key to give the client: the same pid, a fresh secret of the length
    /// the negotiated protocol allows (4 bytes in 3.0, 32 from 3.2 on).
    pub fn register(
        self: &Arc<Self>,
        source_key: CancelKey,
        protocol_minor: u16,
    ) -> (CancelKey, CancelGuard) {
        let mut rng = rand::rng();
        let secret_len = if protocol_minor >= 2 { 32 } else { 4 };
        let secret: Bytes = (0..secret_len)
            .map(|_| rng.random::<u8>())
            .collect::<Vec<_>>()
            .into();
        let pid = source_key.pid;
        // An entry already under this pid belongs to a backend that has
        // exited (Postgres reuses pids): the new session replaces it.
        let routed = RoutedKey::default();
        self.keys
            .insert(pid, (secret.clone(), source_key, Arc::clone(&routed)));
        let guard = CancelGuard {
            registry: Arc::clone(self),
            pid,
            secret: secret.clone(),
            routed,
        };
        (CancelKey { pid, secret }, guard)
    }

    /// The source key for a proxy key, if the secret matches.
    pub fn resolve(&self, key: &CancelKey) -> Option<CancelKey> {
        self.resolve_both(key).map(|(s, _)| s)
    }

    /// The source key, and the target key of a routed request running now.
    fn resolve_both(&self, key: &CancelKey) -> Option<(CancelKey, Option<CancelKey>)> {
        let entry = self.keys.get(&key.pid)?;
        let (secret, source, routed) = entry.value();
        if !constant_time_eq(secret, &key.secret) {
            return None;
        }
        let routed = routed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Some((source.clone(), routed))
    }

    /// Handles a CancelRequest for a known key: forwards it to the backend
    /// that runs the session's request now, as Postgres signals the one
    /// backend it has. While a routed request runs on the target it goes
    /// there only: the source backend is idle or runs a request pipelined
    /// behind the routed one (which a cancel on one backend would not
    /// reach), and a needless signal there could land late, on the
    /// session's next statement. As in Postgres, the requester gets no
    /// answer either way.
    pub async fn cancel(
        &self,
        key: &CancelKey,
        source: &Upstream,
        target: Option<&Upstream>,
        metrics: &CancelMetrics,
    ) {
        let Some((source_key, routed)) = self.resolve_both(key) else {
            metrics.unknown_key.inc();
            debug!(pid = key.pid, "cancel request with an unknown key");
            return;
        };
        metrics.forwarded.inc();
        match (target, routed) {
            (Some(target), Some(k)) => {
                debug!(
                    pid = key.pid,
                    target_pid = k.pid,
                    "cancel forwarded to the target"
                );
                send_cancel(target, &k).await
            }
            _ => {
                debug!(pid = key.pid, "cancel forwarded to the source");
                send_cancel(source, &source_key).await
            }
        }
        debug!(pid = key.pid, "cancel delivered");
    }
}

/// How long a forwarded cancel waits for the server to close its
/// connection (it does so once it has signalled the backend).
const CANCEL_DONE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Sends one CancelRequest and waits until the server has closed the
/// connection. Postgres signals the backend before it closes, and clients
/// (libpq's PQcancel, psycopg, asyncpg) wait for that close before they
/// send their next query: closing the client's cancel connection earlier
/// would let the cancel land on the client's next statement.
async fn send_cancel(upstream: &Upstream, key: &CancelKey) {
    match upstream.connect().await {
        Ok(mut s) => {
            if let Err(e) = crate::net::send_all(&mut s, &key.encode_cancel_request()).await {
                warn!(error = %e, upstream = %upstream.addr(), "could not send cancel request");
                return;
            }
            let drained = tokio::time::timeout(CANCEL_DONE_WAIT, async {
                let mut buf = [0u8; 64];
                // The server sends nothing; anything it does send is dropped.
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            })
            .await;
            if drained.is_err() {
                warn!(upstream = %upstream.addr(), "the server did not close the cancel connection within 30 s");
            }
        }
        Err(e) => {
            warn!(error = %format!("{e:#}"), upstream = %upstream.addr(), "could not connect to cancel")
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_the_pid_and_resolve_only_with_the_right_secret_while_guarded() {
        let reg = Arc::new(CancelRegistry::default());
        let src = CancelKey {
            pid: 99,
            secret: Bytes::from_static(b"abcd"),
        };
        let (proxy_key, guard) = reg.register(src.clone(), 0);
        assert_eq!(proxy_key.pid, 99);
        assert_eq!(proxy_key.secret.len(), 4);
        assert_eq!(reg.resolve(&proxy_key), Some(src.clone()));
        let wrong = CancelKey {
            pid: 99,
            secret: Bytes::from_static(b"zzzz"),
        };
        assert_eq!(reg.resolve(&wrong), None);
        drop(guard);
        assert_eq!(reg.resolve(&proxy_key), None);
    }

    #[test]
    fn a_reused_pid_survives_the_old_sessions_guard() {
        let reg = Arc::new(CancelRegistry::default());
        let old_src = CancelKey {
            pid: 7,
            secret: Bytes::from_static(b"old!"),
        };
        let (_, old_guard) = reg.register(old_src, 0);
        let new_src = CancelKey {
            pid: 7,
            secret: Bytes::from_static(b"new!"),
        };
        let (new_key, _new_guard) = reg.register(new_src.clone(), 0);
        drop(old_guard);
        assert_eq!(reg.resolve(&new_key), Some(new_src));
    }

    #[test]
    fn protocol_3_2_gets_long_secrets() {
        let reg = Arc::new(CancelRegistry::default());
        let (k, _g) = reg.register(
            CancelKey {
                pid: 1,
                secret: Bytes::from_static(&[0; 32]),
            },
            2,
        );
        assert_eq!(k.secret.len(), 32);
    }
}
