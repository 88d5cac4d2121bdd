//! The accept loop and the proxy's lifecycle: limits on client connections,
//! the admin API beside it, and graceful shutdown on SIGTERM/SIGINT. This
//! runs on the main thread's runtime; sessions run on the `workers`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use std::sync::atomic::Ordering;
use tokio::net::TcpListener;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Semaphore};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::lifecycle::Phase;
use crate::proxy::Proxy;
use crate::workers::Workers;

/// Over-limit connections answered concurrently with "too many clients"
/// (each is cheap and bounded by the startup timeout); beyond this they are
/// closed without an answer.
const MAX_CONCURRENT_REJECTIONS: usize = 256;

pub async fn run(config: Config, config_path: std::path::PathBuf) -> anyhow::Result<()> {
    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    let listener = TcpListener::bind(config.listen.addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen.addr))?;
    let max_clients = config.limits.max_client_connections;
    let shutdown_timeout = Duration::from_secs(config.limits.shutdown_timeout_s);
    let admin = config.admin.clone();
    let workers_wanted = config.runtime.worker_threads;
    let proxy = Arc::new(Proxy::new(config, phase_rx)?);
    proxy.metrics.config_epoch.set(1);
    proxy.audit.record(
        "start",
        "start",
        serde_json::json!({"epoch": 1, "file": config_path.display().to_string(), "version": env!("CARGO_PKG_VERSION")}),
    ).with_context(|| format!("cannot write the audit log {}", proxy.audit.path().display()))?;
    let workers = Workers::start(workers_wanted, &proxy)?;
    info!(addr = %proxy.config.listen.addr, source = %proxy.databases.source().upstream.addr(), tls = proxy.tls.is_some(), workers = workers.len(), "pgshift listening");

    if let Some(addr) = admin.addr {
        let token = admin
            .token_file
            .as_deref()
            .map(crate::private_files::read_token)
            .transpose()?;
        let admin_listener = crate::admin::bind(addr).await?;
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move {
            if let Err(e) = crate::admin::serve(admin_listener, token, proxy).await {
                error!(error = %format!("{e:#}"), "admin API stopped");
            }
        });
    }

    let applier = start_mirror(&proxy, phase_tx.subscribe())?;
    start_shadow(&proxy)?;
    start_health(&proxy)?;

    let slots = Arc::new(Semaphore::new(max_clients));
    let rejections = Arc::new(Semaphore::new(MAX_CONCURRENT_REJECTIONS));
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    // The config file is watched by polling its content: editors replace
    // files in every way there is, and a read a second costs nothing.
    let mut watch = tokio::time::interval(CONFIG_POLL);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = file_digest(&config_path).await;
    // A changed file is read again after `CONFIG_SETTLE` and reloaded only
    // if it still reads the same: a poll can land in the middle of an
    // in-place write (truncated, half written), which must not count as
    // a rejected config.
    let mut settling: Option<(tokio::time::Instant, u64)> = None;
    loop {
        let settle_at = settling.map(|(at, _)| at);
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
            _ = sighup.recv() => {
                settling = None;
                seen = file_digest(&config_path).await;
                reload(&proxy, &config_path, "signal");
            }
            _ = watch.tick(), if settling.is_none() => {
                let now = file_digest(&config_path).await;
                if now != seen {
                    seen = now;
                    settling = now.map(|d| (tokio::time::Instant::now() + CONFIG_SETTLE, d));
                }
            }
            _ = async { tokio::time::sleep_until(settle_at.unwrap_or_else(tokio::time::Instant::now)).await }, if settle_at.is_some() => {
                let now = file_digest(&config_path).await;
                match (now, settling.take()) {
                    (Some(d), Some((_, before))) if d == before => {
                        reload(&proxy, &config_path, "file");
                    }
                    // Still changing: wait for it to settle again.
                    (Some(d), _) => {
                        settling = Some((tokio::time::Instant::now() + CONFIG_SETTLE, d));
                    }
                    (None, _) => {}
                }
                seen = now;
            }
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
    // Sessions are gone; let the applier finish the unit it is on and stop.
    let _ = phase_tx.send(Phase::Closing);
    if let Some(a) = applier {
        let _ = tokio::task::spawn_blocking(move || a.join()).await;
    }
    // A clean stop: the next start knows nothing was lost.
    if let Some(m) = proxy.mirror.clone() {
        let _ = tokio::task::spawn_blocking(move || {
            m.spool.stop_sync();
            m.spool.close();
        })
        .await;
    }
    // Every session has ended: the capture gets its last records.
    let rec = Arc::clone(&proxy);
    let _ = tokio::task::spawn_blocking(move || rec.record.close()).await;
    info!("pgshift stopped");
    Ok(())
}

/// Starts the mirror's applier (its own thread and runtime, so replaying on
/// the target never shares a thread with client sessions) and the spool's
/// periodic flush.
fn start_mirror(
    proxy: &Arc<Proxy>,
    phase: watch::Receiver<Phase>,
) -> anyhow::Result<Option<std::thread::JoinHandle<()>>> {
    let (Some(mirror), Some(cfg)) = (proxy.mirror.clone(), proxy.config.mirror.clone()) else {
        return Ok(None);
    };
    // The applier writes to the secondary; in-doubt units are resolved, and
    // row images read, on the primary.
    let (primary, secondary) = (
        proxy.databases.primary().clone(),
        proxy.databases.secondary().clone(),
    );
    {
        // Syncs the in-flight journal and the spool: on demand, one round
        // for every session waiting at that moment (`fsync = "commit"`),
        // or on a timer (`"interval"`).
        let m = Arc::clone(&mirror);
        let every = Duration::from_millis(cfg.fsync_interval_ms);
        std::thread::Builder::new()
            .name("pgshift-spool-sync".into())
            .spawn(move || {
                let journal = Arc::clone(&m.inflight);
                m.spool.sync_loop(
                    every,
                    &|| journal.sync(),
                    &|| journal.unsynced(),
                    &|synced| journal.release_files(synced),
                );
            })?;
    }
    let resolver = crate::mirror::recover::run(
        Arc::clone(&mirror),
        primary.upstream.clone(),
        primary.passfile.clone(),
        phase.clone(),
    );
    // A row image stream per configured database (`mirror::rows`).
    let streams: Vec<_> = mirror
        .rows
        .streams
        .values()
        .map(|s| {
            Ok(crate::mirror::rows::run(
                Arc::clone(s),
                primary.upstream.clone(),
                primary.passfile.clone(),
                mirror.rows.user.clone(),
                crate::mirror::rows::slot_name(&mirror.spool.id, &s.database),
                phase.clone(),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let applier = crate::mirror::apply::Applier::new(
        Arc::clone(&mirror),
        secondary.upstream,
        secondary.passfile,
    )
    .with_source(primary.upstream, primary.passfile, mirror.rows.user.clone());
    let handle = std::thread::Builder::new()
        .name("pgshift-mirror".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(async move {
                    // Units in doubt are resolved beside the applier, on its
                    // thread: off the hot path, and ready before it needs them;
                    // so are the row image streams.
                    let resolver = tokio::spawn(resolver);
                    let streams: Vec<_> = streams.into_iter().map(tokio::spawn).collect();
                    applier.run(phase).await;
                    resolver.abort();
                    for s in streams {
                        s.abort();
                    }
                }),
                Err(e) => error!(error = %e, "cannot start the mirror applier"),
            }
        })?;
    Ok(Some(handle))
}

/// Starts the shadow executor on its own thread (it ends with the process;
/// nothing it holds needs flushing: the mismatch log is written per line).
fn start_shadow(proxy: &Arc<Proxy>) -> anyhow::Result<()> {
    let Some(shadow) = proxy.shadow.clone() else {
        return Ok(());
    };
    let Some(jobs) = proxy
        .shadow_jobs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    else {
        return Ok(());
    };
    let cfg = &proxy.config;
    let mut exec = crate::shadow::exec::Exec::new(
        shadow,
        Arc::clone(&proxy.databases),
        proxy.mirror.clone(),
        cfg.shadow.max_inflight,
        cfg.limits.max_message_bytes,
    );
    exec.health = proxy.health.clone();
    crate::shadow::exec::start(exec, jobs)?;
    Ok(())
}

/// Starts the health monitor's thread and the health checks of both
/// backends (on a thread of their own).
fn start_health(proxy: &Arc<Proxy>) -> anyhow::Result<()> {
    let Some(health) = proxy.health.clone() else {
        return Ok(());
    };
    use crate::health::check::Checker;
    let dbs = &proxy.databases;
    let checkers = [dbs.source(), dbs.target()].map(|db| Checker {
        backend: db.db,
        upstream: db.upstream.clone(),
        passfile: db.passfile.clone(),
    });
    // Their own thread and runtime: a check times what the backend does,
    // not how busy the accept loop and the admin API are.
    let h = Arc::clone(&health);
    std::thread::Builder::new()
        .name("pgshift-checks".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(async move {
                    let tasks: Vec<_> = checkers
                        .into_iter()
                        .map(|c| tokio::spawn(c.run(Arc::clone(&h))))
                        .collect();
                    for t in tasks {
                        let _ = t.await;
                    }
                }),
                Err(e) => warn!(error = %e, "cannot start the health checks"),
            }
        })?;
    crate::failback::start(Arc::clone(proxy))
}

/// How often the config file is checked for changes.
const CONFIG_POLL: Duration = Duration::from_secs(1);
/// How long a changed config file must read the same before it is loaded.
const CONFIG_SETTLE: Duration = Duration::from_millis(250);

/// A digest of the config file's content (None when it cannot be read:
/// a file being replaced is not a change until it is back).
async fn file_digest(path: &std::path::Path) -> Option<u64> {
    tokio::fs::read(path)
        .await
        .ok()
        .map(|b| crate::classify::analyze::fnv1a(&b))
}

/// SIGHUP, or a changed file: re-reads the config file and applies what
/// changed in it since it was last loaded. `mirror.enabled` and every
/// `[routing]` key change live; any other changed section is reported as
/// needing a restart. An invalid file changes nothing: the rejection is
/// logged, counted, shown in status and audited. An applied change gets a
/// new epoch and is in the audit log before it takes effect.
fn reload(proxy: &Proxy, path: &std::path::Path, who: &str) {
    let _serial = proxy.change_lock.lock().unwrap_or_else(|p| p.into_inner());
    let new = match crate::preflight::load(path) {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, by = who, "config reload rejected; keeping the running config");
            proxy.metrics.config_rejections.inc();
            let entry = serde_json::json!({
                "file": e.file, "key": e.key, "line": e.line, "reason": e.message,
                "epoch": proxy.epoch.load(Ordering::Relaxed),
            });
            if let Err(e) = proxy.audit.record("config_rejected", who, entry.clone()) {
                error!(error = %e, "cannot write the audit log");
            }
            *proxy
                .last_rejection
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(entry);
            return;
        }
    };
    let mut file = proxy.file_config.lock().unwrap_or_else(|p| p.into_inner());
    let old = file.clone();
    let old_enabled = proxy.mirror.as_ref().map(|m| m.enabled());
    let new_enabled = match (&proxy.mirror, &new.mirror) {
        (Some(_), Some(nm)) if old.mirror.as_ref().map(|m| m.enabled) != Some(nm.enabled) => {
            Some(nm.enabled)
        }
        (Some(_), None) if old.mirror.is_some() => Some(false),
        _ => old_enabled,
    };
    // The mirror section compared without `enabled`, which changes live.
    let mirror_rest = new.mirror.clone().map(|mut m| {
        m.enabled = old.mirror.as_ref().is_some_and(|o| o.enabled);
        m
    });
    let restart: Vec<&str> = [
        ("listen", old.listen != new.listen),
        ("source", old.source != new.source),
        ("target", old.target != new.target),
        ("admin", old.admin != new.admin),
        ("limits", old.limits != new.limits),
        ("log", old.log != new.log),
        ("runtime", old.runtime != new.runtime),
        ("audit", old.audit != new.audit),
        (
            "shadow",
            (
                old.shadow.max_inflight,
                old.shadow.queue,
                &old.shadow.mismatch_log,
            ) != (
                new.shadow.max_inflight,
                new.shadow.queue,
                &new.shadow.mismatch_log,
            ),
        ),
        (
            "mirror",
            old.mirror.is_some() != new.mirror.is_some()
                || (old.mirror.is_some() && old.mirror != mirror_rest),
        ),
    ]
    .into_iter()
    .filter_map(|(section, changed)| changed.then_some(section))
    .collect();
    for section in &restart {
        warn!(
            section,
            "config reload: this section changed but is not reloaded live; restart to apply it"
        );
    }
    let mut changes = Vec::new();
    if old_enabled != new_enabled {
        changes.push(serde_json::json!({
            "key": "mirror.enabled", "old": old_enabled, "new": new_enabled,
        }));
    }
    // Routing: each key the file changed replaces the live value (which
    // the API may have changed since).
    let live = proxy.router.current();
    let mut routing = (*live).clone();
    let (o, n) = (&old.routing, &new.routing);
    if o.read_percent != n.read_percent {
        routing.read_percent = n.read_percent;
        routing.threshold = crate::router::policy::threshold(n.read_percent);
    }
    if o.hash_key != n.hash_key {
        routing.hash_key = n.hash_key;
    }
    if o.comment_key != n.comment_key {
        routing.comment_key = n.comment_key.clone();
    }
    if o.target_timeout_ms != n.target_timeout_ms {
        routing.target_timeout = Duration::from_millis(n.target_timeout_ms);
    }
    let routing_changed = routing != *live;
    if routing_changed {
        changes.push(serde_json::json!({
            "key": "routing", "old": live.to_json(), "new": routing.to_json(),
        }));
    }
    // Shadow: every key but the sizes and the log path, from the file.
    let shadow_new = crate::shadow::ShadowSettings::from_config(&new.shadow);
    let shadow_changed = proxy.shadow.as_ref().is_some_and(|sh| {
        let live = sh.settings();
        (*live != shadow_new).then(|| {
            changes.push(serde_json::json!({
                "key": "shadow", "old": live.to_json(), "new": shadow_new.to_json(),
            }));
        });
        *live != shadow_new
    });
    // Failback: every key live, from the file.
    let failback_changed = proxy.health.as_ref().is_some_and(|h| {
        let live = h.settings();
        let changed = *live != new.failback;
        if changed {
            changes.push(serde_json::json!({
                "key": "failback", "old": &*live, "new": &new.failback,
            }));
        }
        changed
    });
    let failback_new = new.failback.clone();
    // Record: any change stops the recording in force and starts the new
    // one (a new capture: recordings never append to an old one).
    let record_changed = old.record != new.record;
    if record_changed {
        changes.push(serde_json::json!({
            "key": "record", "old": &old.record, "new": &new.record,
        }));
    }
    let record_new = new.record.clone();
    *file = new;
    if changes.is_empty() {
        proxy.metrics.config_reloads_unchanged.inc();
        info!(restart_needed = ?restart, "config reloaded; nothing to change live");
        return;
    }
    let epoch = proxy.epoch.load(Ordering::Relaxed) + 1;
    let entry = serde_json::json!({
        "epoch": epoch, "file": path.display().to_string(),
        "changes": changes, "restart_needed": restart,
    });
    if let Err(e) = proxy.audit.record("config_reload", who, entry) {
        error!(error = %e, "config reload not applied: cannot write the audit log");
        proxy.metrics.config_rejections.inc();
        *file = old;
        return;
    }
    if let (Some(m), Some(on)) = (&proxy.mirror, new_enabled) {
        m.set_enabled(on);
    }
    if routing_changed {
        proxy.router.store(routing);
    }
    if let (true, Some(sh)) = (shadow_changed, &proxy.shadow) {
        sh.store(shadow_new);
    }
    if let (true, Some(h)) = (failback_changed, &proxy.health) {
        h.store(failback_new);
    }
    if record_changed {
        if let Some(why) = proxy.record.apply(&record_new) {
            let entry =
                serde_json::json!({ "epoch": epoch, "path": record_new.path, "reason": why });
            if let Err(e) = proxy.audit.record("record_not_started", who, entry) {
                error!(error = %e, "cannot write the audit log");
            }
        }
    }
    proxy.bump_epoch(epoch);
    info!(epoch, "config reloaded");
}
