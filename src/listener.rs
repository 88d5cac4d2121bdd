//! The accept loop and the proxy's lifecycle: limits on client connections,
//! the admin API beside it, and graceful shutdown on SIGTERM/SIGINT. This
//! runs on the main thread's runtime; sessions run on the `workers`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Semaphore};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::proxy::{Phase, Proxy};
use crate::workers::Workers;

/// Over-limit connections answered concurrently with "too many clients"
/// (each is cheap and bounded by the startup timeout); beyond this they are
/// closed without an answer.
const MAX_CONCURRENT_REJECTIONS: usize = 256;

pub async fn run(config: Config) -> anyhow::Result<()> {
    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    let listener = TcpListener::bind(config.listen.addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen.addr))?;
    let max_clients = config.limits.max_client_connections;
    let shutdown_timeout = Duration::from_secs(config.limits.shutdown_timeout_s);
    let admin = config.admin.clone();
    let workers_wanted = config.runtime.worker_threads;
    let proxy = Arc::new(Proxy::new(config, phase_rx)?);
    let workers = Workers::start(workers_wanted, &proxy)?;
    info!(addr = %proxy.config.listen.addr, source = %proxy.source.addr(), tls = proxy.tls.is_some(), workers = workers.len(), "pgshift listening");

    if let Some(addr) = admin.addr {
        let token = admin
            .token_file
            .as_deref()
            .map(crate::admin::read_token)
            .transpose()?;
        let admin_listener = crate::admin::bind(addr).await?;
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move {
            if let Err(e) = crate::admin::serve(admin_listener, token, proxy).await {
                error!(error = %format!("{e:#}"), "admin API stopped");
            }
        });
    }

    let slots = Arc::new(Semaphore::new(max_clients));
    let rejections = Arc::new(Semaphore::new(MAX_CONCURRENT_REJECTIONS));
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => match Arc::clone(&slots).try_acquire_owned() {
                    Ok(permit) => workers.dispatch(tcp, peer, permit),
                    Err(_) => {
                        proxy.metrics.client_rejected_too_many.inc();
                        if let Ok(p) = Arc::clone(&rejections).try_acquire_owned() {
                            let proxy = Arc::clone(&proxy);
                            tokio::spawn(async move {
                                crate::session::refuse_over_limit(proxy, tcp).await;
                                drop(p);
                            });
                        }
                    }
                },
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }

    drop(listener);
    let open = max_clients - slots.available_permits();
    info!(
        open_sessions = open,
        timeout_s = shutdown_timeout.as_secs(),
        "shutting down: draining sessions"
    );
    let _ = phase_tx.send(Phase::Draining);
    let all_slots = u32::try_from(max_clients).unwrap_or(u32::MAX);
    if tokio::time::timeout(shutdown_timeout, slots.acquire_many(all_slots))
        .await
        .is_err()
    {
        let open = max_clients - slots.available_permits();
        warn!(
            open_sessions = open,
            "drain deadline passed: closing the remaining sessions"
        );
        let _ = phase_tx.send(Phase::Closing);
        let _ = tokio::time::timeout(Duration::from_secs(5), slots.acquire_many(all_slots)).await;
    }
    let _ = tokio::task::spawn_blocking(move || workers.join()).await;
    info!("pgshift stopped");
    Ok(())
}
