//! Health checks: a light, periodic look at each backend (`SELECT 1` on a
//! connection the check keeps, connecting and logging in again whenever a
//! check failed), feeding the same windows as the traffic, so a dead target
//! trips the `check_failures` rule even when no read is routed to it.
//!
//! The check logs in as `failback.check_user` (or else the user of the
//! most recent client session) to `failback.check_database`, the
//! maintenance database `postgres` by default: never to a client's own
//! database, which a client may need to itself (`CREATE DATABASE ...
//! TEMPLATE` refuses a database anyone else is connected to). A server that answers but
//! refuses the login (no password for that user, no such database) is up:
//! the check then counts as passed and is marked connect-only in status,
//! so a missing credential never fails a healthy backend back.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::{Db, Fault, Health, Sample, SampleKind};
use crate::net::connect::Upstream;
use crate::protocol::error::parse_error_fields;
use crate::protocol::frame::read_message;
use crate::protocol::message::{ERROR_RESPONSE, READY_FOR_QUERY};
use crate::protocol::startup::StartupMessage;
use crate::upstream::login::{login, LoginError};
use crate::upstream::passfile::PassFile;

/// One backend's check loop's fixed parts.
pub struct Checker {
    pub backend: Db,
    pub upstream: Upstream,
    pub passfile: Option<PassFile>,
}

/// How a check went.
enum Verdict {
    Up,
    /// Answers, but the check could not log in.
    UpConnectOnly(String),
    Down(String),
}

/// The check's own connection, kept between checks: logging in is the
/// expensive part of a check (a new server process), and under load it
/// alone took up to 2 s here, which would fail healthy servers.
struct Kept {
    stream: crate::net::Stream,
    buf: bytes::BytesMut,
    /// Who it is logged in as (a new one when that changes).
    startup: StartupMessage,
}

impl Checker {
    /// Checks every `check_interval_ms` until the process ends.
    pub async fn run(self, health: Arc<Health>) {
        let mut warned_connect_only = false;
        let mut kept: Option<Kept> = None;
        loop {
            let cfg = health.settings();
            tokio::time::sleep(Duration::from_millis(cfg.check_interval_ms)).await;
            let limit = Duration::from_millis(cfg.check_timeout_ms);
            let startup = self.startup(&health, &cfg);
            if kept.as_ref().map(|k| &k.startup) != startup.as_ref() {
                kept = None;
            }
            let started = Instant::now();
            let phase = std::sync::atomic::AtomicU8::new(0);
            let verdict =
                match tokio::time::timeout(limit, self.check(startup.as_ref(), &mut kept, &phase))
                    .await
                {
                    Ok(v) => v,
                    Err(_) => Verdict::Down(format!(
                        "no answer within {} ms while {}",
                        limit.as_millis(),
                        ["connecting", "logging in", "running SELECT 1"]
                            [phase.load(Relaxed).min(2) as usize]
                    )),
                };
            let took = started.elapsed();
            if took > Duration::from_millis(500) {
                debug!(
                    backend = self.backend.label(),
                    took_ms = took.as_millis() as u64,
                    "slow health check"
                );
            }
            let status = &health.checks[self.backend as usize];
            let fault = match verdict {
                Verdict::Up => {
                    status.connect_only.store(false, Relaxed);
                    None
                }
                Verdict::UpConnectOnly(why) => {
                    if !warned_connect_only {
                        warn!(backend = self.backend.label(), reason = %why,
                            "health check cannot log in; it checks that the server answers only");
                        warned_connect_only = true;
                    }
                    status.connect_only.store(true, Relaxed);
                    None
                }
                Verdict::Down(why) => {
                    // Whatever state the connection is in, start afresh.
                    kept = None;
                    debug!(backend = self.backend.label(), reason = %why, "health check failed");
                    *status.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                    Some(Fault::Check)
                }
            };
            if fault.is_some() {
                status.failures.fetch_add(1, Relaxed);
                status.failed.fetch_add(1, Relaxed);
            } else {
                status.failures.store(0, Relaxed);
                status.ok.fetch_add(1, Relaxed);
            }
            health.record(Sample::new(self.backend, SampleKind::Check, fault));
        }
    }

    fn startup(
        &self,
        health: &Health,
        cfg: &crate::config::FailbackConfig,
    ) -> Option<StartupMessage> {
        let last = health
            .last_startup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let user = cfg.check_user.clone().or_else(|| {
            last.as_ref()
                .and_then(|s| s.get("user").map(str::to_string))
        })?;
        let database = cfg
            .check_database
            .clone()
            .unwrap_or_else(|| "postgres".into());
        Some(StartupMessage::new(
            3,
            0,
            vec![
                (b"user".to_vec(), user.into_bytes()),
                (b"database".to_vec(), database.into_bytes()),
                (
                    b"application_name".to_vec(),
                    b"pgshift health check".to_vec(),
                ),
            ],
        ))
    }

    /// One check: `SELECT 1` on the kept connection, connecting and logging
    /// in first when there is none.
    async fn check(
        &self,
        startup: Option<&StartupMessage>,
        kept: &mut Option<Kept>,
        phase: &std::sync::atomic::AtomicU8,
    ) -> Verdict {
        if kept.is_none() {
            let mut stream = match self.upstream.connect().await {
                Ok(s) => s,
                Err(e) => return Verdict::Down(format!("{e:#}")),
            };
            let Some(startup) = startup else {
                return Verdict::UpConnectOnly("no user to log in as yet".into());
            };
            let user = startup.get("user").unwrap_or_default();
            let db = startup.database().unwrap_or_default();
            let password = self
                .passfile
                .as_ref()
                .and_then(|pf| pf.lookup(&self.upstream.host, self.upstream.port, db, user));
            phase.store(1, Relaxed);
            let buf = match login(&mut stream, startup, password, self.upstream.require_auth).await
            {
                Ok(l) => l.leftover,
                // The server is up; the check just cannot get in.
                Err(LoginError::NoPassword) => {
                    return Verdict::UpConnectOnly("no password for the check's user".into())
                }
                Err(e @ LoginError::NotAllowed { .. }) => {
                    return Verdict::UpConnectOnly(format!(
                        "{e} ({}.require_auth)",
                        self.upstream.name
                    ))
                }
                Err(LoginError::Refused { code, message })
                    if code.starts_with("28") || code == "3D000" =>
                {
                    return Verdict::UpConnectOnly(format!("{code} {message}"))
                }
                Err(e) => return Verdict::Down(e.to_string()),
            };
            *kept = Some(Kept {
                stream,
                buf,
                startup: startup.clone(),
            });
        }
        let Some(k) = kept.as_mut() else {
            return Verdict::Down("no connection".into());
        };
        phase.store(2, Relaxed);
        if let Err(e) = crate::net::send_all(&mut k.stream, b"Q\0\0\0\x0dSELECT 1\0").await {
            return Verdict::Down(format!("write failed: {e}"));
        }
        let mut failed = None;
        loop {
            match read_message(&mut k.stream, &mut k.buf, 1 << 20).await {
                Ok(Some(m)) if m.tag == READY_FOR_QUERY => break,
                Ok(Some(m)) if m.tag == ERROR_RESPONSE => {
                    let f = parse_error_fields(m.body());
                    failed = Some(format!(
                        "{} {}",
                        f.code.unwrap_or("?"),
                        f.message.unwrap_or("")
                    ));
                }
                Ok(Some(_)) => {}
                Ok(None) => return Verdict::Down("server closed the connection".into()),
                Err(e) => return Verdict::Down(format!("read failed: {e}")),
            }
        }
        match failed {
            Some(e) => Verdict::Down(e),
            None => Verdict::Up,
        }
    }
}
