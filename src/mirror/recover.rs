//! Units in doubt, resolved against the source.
//!
//! A unit is in doubt when its commit was sent to the source and the proxy
//! never read the answer: the process died (its in-flight journal intent
//! has no DONE), or the session's connection ended first. The intent holds
//! the whole unit and, when a probe read it before the commit was sent,
//! its transaction id. The source's `pg_xact_status(xid)` then says what
//! happened: a committed unit is spooled from the intent (marked
//! `recovered`: its last answers were never read, so they are not
//! compared), an aborted one is dropped, one still in progress is asked
//! about again shortly. Only a unit with no transaction id (an autocommit
//! statement whose probe answer never arrived), or whose id the source no
//! longer knows, stays in doubt: reported, and the target needs a re-sync.
//!
//! The proxy asks the source as the unit's own user, in its database, with
//! the password `source.passfile` holds for them (or none, where the source
//! trusts the proxy's host).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use super::inflight::InDoubt;
use super::unit::MirroredUnit;
use super::{Mirror, Spooled};
use crate::lifecycle::Phase;
use crate::net::connect::Upstream;
use crate::net::Stream;
use crate::protocol::frame::read_message;
use crate::protocol::message::put_message;
use crate::protocol::startup::StartupMessage;
use crate::upstream::login::connect_and_login;
use crate::upstream::passfile::PassFile;

/// Units waiting to be resolved.
#[derive(Default)]
pub struct Recovery {
    queue: Mutex<VecDeque<Waiting>>,
    wake: Notify,
    /// Units queued or being asked about (for status).
    pending: AtomicU64,
    /// Units resolved as committed (spooled again) and as aborted.
    pub committed: AtomicU64,
    pub aborted: AtomicU64,
    /// The previous process's journal is done with once this reaches 0.
    startup_left: AtomicU64,
}

struct Waiting {
    d: InDoubt,
    why: String,
    since: Instant,
    not_before: Instant,
    startup: bool,
}

/// What the source says about a transaction id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Committed,
    Aborted,
    InProgress,
    /// Too old (or in the future): the source cannot say.
    Unknown,
}

/// Give up asking about one unit after this long (the source unreachable,
/// or the transaction still running).
const MAX_WAIT: Duration = Duration::from_secs(600);

impl Recovery {
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    fn push(&self, d: InDoubt, why: &str, startup: bool) {
        let now = Instant::now();
        self.pending.fetch_add(1, Ordering::Relaxed);
        if startup {
            self.startup_left.fetch_add(1, Ordering::Relaxed);
        }
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(Waiting {
                d,
                why: why.to_string(),
                since: now,
                not_before: now,
                startup,
            });
        self.wake.notify_one();
    }
}

impl Mirror {
    /// A unit whose commit outcome is unknown: resolved against the source
    /// when it can be, reported in doubt otherwise. `startup`: left by a
    /// previous process (its journal files go once all such are done).
    pub fn unit_in_doubt(&self, d: InDoubt, why: &str, startup: bool) {
        match (&d.unit, d.xid, d.spooled_as) {
            // Acknowledged and spooled, then lost from the spool's end by
            // a machine crash: it committed for sure.
            (Some(_), _, Some(_)) | (Some(_), Some(_), _) => self.recovery.push(d, why, startup),
            _ => {
                let why = if d.xid.is_none() {
                    format!("{why}; its transaction id was not known before its commit was sent, so the source cannot be asked")
                } else {
                    format!("{why}; its statements were not journaled whole")
                };
                self.in_doubt(d.session, d.time_us, &d.statements, &why);
            }
        }
    }

    /// Spools a unit that committed on the source; false when the spool
    /// is full (backpressure) and it must be tried again.
    fn spool_recovered(&self, mut unit: MirroredUnit, d: &InDoubt, outcome: &str) -> bool {
        unit.recovered = true;
        unit.seq = 0;
        unit.xid = d.xid.or(unit.xid);
        unit.order = Default::default();
        unit.post_state_version = u64::MAX;
        // The request that committed it ended the transaction; requests
        // before it were inside one.
        let n = unit.segments.len();
        for (i, seg) in unit.segments.iter_mut().enumerate() {
            if i + 1 == n {
                seg.status = b'I';
            } else if seg.outcomes.is_empty() {
                seg.status = b'T';
            }
        }
        match self.spool_record(Box::new(unit)) {
            Spooled::Done(seq) => {
                info!(session = d.session, xid = ?d.xid, seq, "a unit in doubt {outcome}: spooled for the target");
                self.report
                    .resolved(d.session, d.xid, outcome, &d.statements, seq);
                self.recovery.committed.fetch_add(1, Ordering::Relaxed);
                true
            }
            Spooled::Full(_) => false,
        }
    }
}

/// Resolves queued units until shutdown: one connection to the source per
/// user and database, kept while there is work.
pub async fn run(
    mirror: Arc<Mirror>,
    source: Upstream,
    passfile: Option<PassFile>,
    mut shutdown: watch::Receiver<Phase>,
) {
    let rec = &mirror.recovery;
    let mut conns: HashMap<(String, String), (Stream, BytesMut)> = HashMap::new();
    loop {
        if rec.startup_left.load(Ordering::Relaxed) == 0 {
            mirror.inflight.recovered();
        }
        if *shutdown.borrow() == Phase::Closing {
            return;
        }
        let next = {
            let mut q = rec.queue.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            match q.iter().position(|w| w.not_before <= now) {
                Some(i) => q.remove(i),
                None => None,
            }
        };
        let Some(mut w) = next else {
            conns.clear();
            let wait = {
                let q = rec.queue.lock().unwrap_or_else(|p| p.into_inner());
                q.iter()
                    .map(|w| w.not_before.saturating_duration_since(Instant::now()))
                    .min()
                    .unwrap_or(Duration::from_secs(5))
            };
            tokio::select! {
                _ = rec.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        };
        let status = if w.d.spooled_as.is_some() {
            Ok(Status::Committed)
        } else {
            ask(&source, passfile.as_ref(), &mut conns, &w.d).await
        };
        let done = match status {
            Ok(Status::Committed) => {
                let outcome = if w.d.spooled_as.is_some() {
                    "committed (acknowledged and spooled, then cut off the spool by a machine restart)"
                } else {
                    "committed on the source (pg_xact_status)"
                };
                let spooled = match w.d.unit.clone() {
                    Some(unit) => mirror.spool_recovered(unit, &w.d, outcome),
                    None => true,
                };
                if !spooled {
                    // The spool is full: again once the applier frees space.
                    w.not_before = Instant::now() + Duration::from_millis(200);
                }
                spooled
            }
            Ok(Status::Aborted) => {
                info!(session = w.d.session, xid = ?w.d.xid, "a unit in doubt did not commit on the source; nothing to mirror");
                mirror.report.resolved(
                    w.d.session,
                    w.d.xid,
                    "aborted on the source (pg_xact_status): nothing to mirror",
                    &w.d.statements,
                    0,
                );
                rec.aborted.fetch_add(1, Ordering::Relaxed);
                true
            }
            Ok(Status::Unknown) => {
                mirror.in_doubt(
                    w.d.session,
                    w.d.time_us,
                    &w.d.statements,
                    &format!(
                        "{}; the source no longer knows transaction {:?}",
                        w.why, w.d.xid
                    ),
                );
                true
            }
            Ok(Status::InProgress) | Err(_) if w.since.elapsed() >= MAX_WAIT => {
                let detail = match &status {
                    Err(e) => format!("the source could not be asked: {e}"),
                    _ => "the transaction was still in progress on the source".into(),
                };
                mirror.in_doubt(
                    w.d.session,
                    w.d.time_us,
                    &w.d.statements,
                    &format!("{}; {detail} for {} s", w.why, MAX_WAIT.as_secs()),
                );
                true
            }
            Ok(Status::InProgress) => {
                w.not_before = Instant::now() + Duration::from_millis(200);
                false
            }
            Err(e) => {
                warn!(error = %e, xid = ?w.d.xid, "cannot ask the source about a unit in doubt; retrying");
                mirror
                    .report
                    .set_apply_state(Some(format!("resolving units in doubt: {e}")));
                w.not_before = Instant::now() + Duration::from_secs(2);
                false
            }
        };
        if done {
            rec.pending.fetch_sub(1, Ordering::Relaxed);
            if w.startup {
                rec.startup_left.fetch_sub(1, Ordering::Relaxed);
            }
        } else {
            rec.queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_back(w);
        }
    }
}

/// `pg_xact_status` of the unit's transaction, as its user in its database.
async fn ask(
    source: &Upstream,
    passfile: Option<&PassFile>,
    conns: &mut HashMap<(String, String), (Stream, BytesMut)>,
    d: &InDoubt,
) -> Result<Status, String> {
    let (Some(unit), Some(xid)) = (&d.unit, d.xid) else {
        return Ok(Status::Unknown);
    };
    let key = (
        unit.param("user").unwrap_or_default().to_string(),
        unit.database().to_string(),
    );
    if !conns.contains_key(&key) {
        let params = vec![
            (b"user".to_vec(), key.0.clone().into_bytes()),
            (b"database".to_vec(), key.1.clone().into_bytes()),
            (
                b"application_name".to_vec(),
                b"pgshift in-doubt resolution".to_vec(),
            ),
        ];
        let (stream, buf, _) =
            connect_and_login(source, passfile, &StartupMessage::new(3, 0, params)).await?;
        conns.insert(key.clone(), (stream, buf));
    }
    let Some((stream, buf)) = conns.get_mut(&key) else {
        return Err("no connection".into());
    };
    // The id is a number the proxy formats itself: no quoting to get wrong.
    let sql = format!("SELECT pg_catalog.pg_xact_status('{xid}'::pg_catalog.xid8)");
    let mut out = BytesMut::new();
    put_message(&mut out, b'Q', &[sql.as_bytes(), b"\0"]);
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        crate::net::send_all(stream, &out).await?;
        let mut answer = None;
        let mut error = None;
        loop {
            let m = read_message(stream, buf, 1 << 20)
                .await?
                .ok_or_else(|| std::io::Error::other("the source closed the connection"))?;
            match m.tag {
                b'D' => answer = Some(first_text(m.body())),
                b'E' => {
                    let f = crate::protocol::error::parse_error_fields(m.body());
                    error = Some(format!(
                        "{} {}",
                        f.code.unwrap_or("?"),
                        f.message.unwrap_or("")
                    ))
                }
                b'Z' => return Ok::<_, std::io::Error>((answer, error)),
                _ => {}
            }
        }
    })
    .await;
    let (answer, error) = match r {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            conns.remove(&key);
            return Err(e.to_string());
        }
        Err(_) => {
            conns.remove(&key);
            return Err("no answer within 10 s".into());
        }
    };
    if let Some(e) = error {
        return Err(e);
    }
    Ok(match answer.flatten().as_deref() {
        Some("committed") => Status::Committed,
        Some("aborted") => Status::Aborted,
        Some("in progress") => Status::InProgress,
        _ => Status::Unknown,
    })
}

/// The first column of a DataRow as text (`None` for NULL).
fn first_text(body: &[u8]) -> Option<String> {
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let len = usize::try_from(len).ok()?;
    Some(String::from_utf8_lossy(body.get(6..6 + len)?).into_owned())
}
