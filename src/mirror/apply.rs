//! The applier: replays spooled units on the target, one at a time, in
//! source commit order (`order::Sequencer` picks the next one), each on a
//! target connection that carries its session's state, and compares every
//! outcome with the source's.
//!
//! Exactly once: each database on the target holds a progress row
//! (`pgshift_mirror.progress`, keyed by the spool's id) that the applier
//! updates *inside* the transaction it applies, so a unit and its progress
//! mark commit together. The row holds the spool position up to which
//! everything is applied, and the few positions above it applied early
//! (commit order differs a little from spool order). After a restart or a
//! lost connection the applier reads the row and skips what is already
//! there. Units that cannot carry
//! the mark inside their transaction (VACUUM, several transactions in one
//! query string, ...) are marked right after, and counted as applied at
//! least once.
//!
//! Each unit goes out as one write (state sync, re-prepares, the unit's own
//! messages, the mark) and its answers are read back in one pass: one round
//! trip per unit.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::watch;
use tracing::{info, warn};

use super::order::{Entry, Sequencer};
use super::report::{Divergence, NonDeterministic};
use super::rows::{Change, Column, Value};
use super::spool::{Read1, SpoolReader};
use super::unit::{MirroredUnit, Outcome};
use super::Mirror;
use crate::classify::analyze::{analyze, Analysis, TwoPhase};
use crate::classify::lexer;
use crate::lifecycle::Phase;
use crate::net::connect::Upstream;
use crate::net::Stream;
use crate::protocol::error::parse_error_fields;
use crate::protocol::frame::{read_message, HEADER_LEN};
use crate::protocol::message::{parse_bind_names, put_message, take_cstr};
use crate::protocol::rows;
use crate::protocol::startup::StartupMessage;
use crate::upstream::login::connect_and_login;
use crate::upstream::passfile::PassFile;

/// The progress table. Creating it needs CREATE on the database; an
/// operator can run this once as the database owner instead (and grant
/// SELECT, INSERT, UPDATE on it to the application roles).
///
/// Columns added by later versions are added only where missing: an
/// ALTER TABLE would wait for the table's lock, which a unit's progress mark
/// still running on the target holds.
pub const PROGRESS_DDL: &str = "CREATE SCHEMA IF NOT EXISTS pgshift_mirror; \
    CREATE TABLE IF NOT EXISTS pgshift_mirror.progress (spool_id text PRIMARY KEY, seq bigint NOT NULL, above bigint[] NOT NULL DEFAULT '{}', pending bigint, applied_at timestamptz NOT NULL DEFAULT now()); \
    DO $pgshift$ BEGIN \
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = 'pgshift_mirror.progress'::pg_catalog.regclass AND attname = 'above') THEN \
    ALTER TABLE pgshift_mirror.progress ADD COLUMN above bigint[] NOT NULL DEFAULT '{}'; END IF; \
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = 'pgshift_mirror.progress'::pg_catalog.regclass AND attname = 'pending') THEN \
    ALTER TABLE pgshift_mirror.progress ADD COLUMN pending bigint; END IF; \
    END $pgshift$";

/// Units read ahead of the one being applied, at most (count, bytes). The
/// sequencer needs the units spooled after the next one in commit order.
const MAX_BUFFERED: usize = 100_000;
const MAX_BUFFERED_BYTES: usize = 256 << 20;

/// What a target database's progress row says is applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Progress {
    low: u64,
    above: Vec<u64>,
    /// A unit that cannot carry its mark inside its own transaction (a
    /// CALL or DO that commits, VACUUM, ...) was started and not finished:
    /// it may have partly applied.
    pending: Option<u64>,
}

impl Progress {
    fn has(&self, seq: u64) -> bool {
        seq <= self.low || self.above.contains(&seq)
    }

    /// Reads `above` as Postgres prints a bigint[] (`{1,2}`).
    fn parse_above(text: &str) -> Vec<u64> {
        text.trim_matches(|c| c == '{' || c == '}')
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .collect()
    }
}

/// Close target connections of sessions idle this long (each holds a
/// database a client may need to itself: `CREATE DATABASE ... TEMPLATE`
/// refuses a database anyone else is connected to).
const IDLE_CLOSE: Duration = Duration::from_secs(10);
/// Give up on a unit after this many failed attempts (timeouts, lost
/// connections while it ran) and record it as a divergence.
const MAX_ATTEMPTS: u32 = 5;

/// How long a decoded transaction no unit claims yet is kept for one that
/// may still reach the spool (see `rows::Stream::pass`).
const UNCLAIMED_ROW_IMAGES: Duration = Duration::from_secs(30);
const MAX_TARGET_MESSAGE: usize = 1 << 30;
const MAX_BACKOFF: Duration = Duration::from_secs(10);

struct Conn {
    stream: Stream,
    buf: BytesMut,
    database: String,
    /// Session state version this connection has (None = unknown).
    state_version: Option<u64>,
    /// Prepared statements on this connection: name -> Parse message.
    prepared: HashMap<Vec<u8>, Vec<u8>>,
    last_used: Instant,
    /// The target backend's process id (from BackendKeyData).
    pid: Option<i32>,
}

/// A target backend left running a unit the applier gave up waiting for:
/// it must be gone (terminated, its transaction rolled back or committed)
/// before the unit is tried again, or both could apply it.
#[derive(Debug, Clone)]
struct Abandoned {
    pid: i32,
    session: u64,
}

/// Why a unit could not be applied now.
enum Retry {
    /// Connecting or logging in failed.
    Connect(String),
    /// The connection broke or timed out while the unit was in flight.
    Lost(String),
}

/// One response group: the answers up to a ReadyForQuery.
#[derive(Debug, Default)]
struct Answer {
    outcomes: Vec<Outcome>,
    /// Error messages, by position in `outcomes`.
    errors: Vec<(usize, String)>,
    status: u8,
    rows: Vec<Vec<Option<String>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Internal,
    Mark,
    Segment(usize),
    /// The row changes of a unit applied from row images.
    Rows,
}

/// The spool as the applier reads it: records read ahead, and the
/// sequencer that orders them.
struct Feed {
    reader: SpoolReader,
    /// Next seq to read.
    next: u64,
    seq: Sequencer,
    records: HashMap<u64, MirroredUnit>,
    bytes: usize,
}

impl Feed {
    /// Reads what the spool has beyond what is buffered (within the read
    /// ahead bound); returns how many records were added.
    fn refill(&mut self, mirror: &Mirror) -> usize {
        let mut added = 0;
        while self.next <= mirror.spool.last_seq()
            && self.records.len() < MAX_BUFFERED
            && self.bytes < MAX_BUFFERED_BYTES
        {
            if let Some(end) = mirror.spool.skipped_through(self.next) {
                // Numbers no unit was spooled under (a restart skipped them).
                self.seq.skip_to(end);
                self.next = end + 1;
                continue;
            }
            match self.reader.read(self.next) {
                Ok(Read1::Record(rec)) => {
                    self.bytes += record_bytes(&rec);
                    self.seq.push(Entry {
                        seq: rec.seq,
                        key: rec.order.clone(),
                    });
                    self.records.insert(rec.seq, *rec);
                    self.next += 1;
                    added += 1;
                }
                Ok(Read1::Missing) => {
                    // Not on disk: released already (applied); move to
                    // what exists.
                    let first = mirror.spool.first_seq();
                    if self.next < first {
                        self.next = first;
                        self.seq.skip_to(first - 1);
                    } else {
                        break;
                    }
                }
                Ok(Read1::Gap { from, to, why }) => {
                    let to = to.min(mirror.spool.last_seq()).max(from);
                    warn!(from, to, reason = %why, "unreadable spool records; skipping them");
                    mirror.unreadable(from, to, &why);
                    self.seq.skip_to(to);
                    self.next = to + 1;
                }
                Err(e) => {
                    let seq = self.next;
                    warn!(seq, error = %e, "unreadable spool record; skipping it");
                    mirror.unreadable(seq, seq, &e.to_string());
                    self.seq.skip_to(seq);
                    self.next += 1;
                }
            }
        }
        added
    }

    /// Removes unit `seq` as done; `rec` is its record if the caller took
    /// it out of `records`.
    fn take(&mut self, seq: u64, rec: Option<&MirroredUnit>) {
        self.seq.applied(seq);
        let gone = self.records.remove(&seq);
        if let Some(r) = gone.as_ref().or(rec) {
            self.bytes = self.bytes.saturating_sub(record_bytes(r));
        }
    }

    /// When the oldest unapplied unit was acknowledged (spool order is
    /// close enough to time order for a lag figure).
    fn oldest_committed_us(&self) -> u64 {
        self.seq
            .first()
            .and_then(|s| self.records.get(&s))
            .map_or(0, |r| r.committed_at_us)
    }
}

fn record_bytes(r: &MirroredUnit) -> usize {
    r.segments.iter().map(|s| s.messages.len()).sum::<usize>() + 256
}

pub struct Applier {
    mirror: Arc<Mirror>,
    upstream: Upstream,
    passfile: Option<PassFile>,
    conns: HashMap<u64, Conn>,
    /// Progress per target database, or None when the progress table is
    /// unavailable (no privileges).
    progress: HashMap<String, Option<Progress>>,
    analyses: HashMap<String, Arc<Analysis>>,
    /// An attempt given up on while it may still run on the target.
    abandoned: Option<Abandoned>,
    /// The source as the row images' user, and its connections per
    /// database.
    source: Option<(Upstream, Option<PassFile>, String)>,
    source_conns: HashMap<String, Conn>,
    /// The startup parameters of the last unit applied per database (a
    /// connection as that session's user syncs the sequences there).
    last_startup: HashMap<String, StartupParams>,
    last_sequence_sync: Instant,
    /// Key and generated columns per (database, table), for row images.
    tables: HashMap<(String, String), Arc<TableMeta>>,
    /// Databases where units were applied from rows since the last
    /// sequence sync (their sequences were not advanced on the target).
    sequences_dirty: std::collections::HashSet<String>,
    /// Non-deterministic default columns per (database, table).
    defaults: HashMap<(String, String), Vec<(String, String)>>,
    attempts: u32,
}

impl Applier {
    pub fn new(mirror: Arc<Mirror>, upstream: Upstream, passfile: Option<PassFile>) -> Self {
        Self {
            mirror,
            upstream,
            passfile,
            source: None,
            source_conns: HashMap::new(),
            last_startup: HashMap::new(),
            last_sequence_sync: Instant::now(),
            conns: HashMap::new(),
            progress: HashMap::new(),
            analyses: HashMap::new(),
            abandoned: None,
            tables: HashMap::new(),
            sequences_dirty: Default::default(),
            defaults: HashMap::new(),
            attempts: 0,
        }
    }

    /// The source, for what row images need from it (the WAL position a
    /// unit's rows must be decoded by, sequence values): as `user`, with
    /// the password `passfile` holds.
    pub fn with_source(
        mut self,
        source: Upstream,
        passfile: Option<PassFile>,
        user: String,
    ) -> Self {
        self.source = Some((source, passfile, user));
        self
    }

    /// Applies records until shutdown reaches Closing.
    pub async fn run(mut self, mut shutdown: watch::Receiver<Phase>) {
        let spool_dir = self.mirror.spool.dir().to_path_buf();
        let applied_path = spool_dir.join("applied");
        let local_applied: u64 = std::fs::read_to_string(&applied_path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let start = (local_applied + 1).max(self.mirror.spool.first_seq());
        self.mirror.applied_seq.store(start - 1, Ordering::Relaxed);
        let mut feed = Feed {
            reader: SpoolReader::new(&spool_dir),
            next: start,
            seq: Sequencer::new(start - 1),
            records: HashMap::new(),
            bytes: 0,
        };
        let mut backoff = Duration::from_millis(100);
        let mut last_housekeeping = Instant::now();
        let mut saved = start - 1;
        let mut waiting_for_order = false;
        let mut retry_seq: Option<u64> = None;
        info!(from_seq = start, spool_id = %self.mirror.spool.id, "mirror applier started");
        loop {
            if *shutdown.borrow() == Phase::Closing {
                break;
            }
            let low = feed.seq.low();
            if last_housekeeping.elapsed() >= Duration::from_secs(1) {
                last_housekeeping = Instant::now();
                if low != saved {
                    let tmp = spool_dir.join("applied.tmp");
                    if crate::private_files::write(&tmp, low.to_string()).is_ok() {
                        let _ = std::fs::rename(&tmp, &applied_path);
                    }
                    saved = low;
                }
                self.mirror.spool.release(low);
                feed.reader.forget_released(self.mirror.spool.first_seq());
                self.conns.retain(|_, c| c.last_used.elapsed() < IDLE_CLOSE);
                self.source_conns
                    .retain(|_, c| c.last_used.elapsed() < IDLE_CLOSE);
                self.publish_gauges(low);
                self.pass_row_images(&feed);
                if self.last_sequence_sync.elapsed() >= self.sequence_sync_every() {
                    self.last_sequence_sync = Instant::now();
                    self.sync_sequences().await;
                }
            }
            // A unit chosen once (ready, nothing new read) stays the next
            // one while its apply is retried: anything spooled since has a
            // higher key, and reading it now would only cost memory and CPU
            // while the target is away.
            let seq = match retry_seq.take() {
                Some(seq) => seq,
                None => {
                    feed.refill(&self.mirror);
                    let mirror = Arc::clone(&self.mirror);
                    let settled = mirror.inflight.settled.notified();
                    let inflight = &mirror.inflight;
                    let Some(choice) = feed
                        .seq
                        .choose(|run, slot, arm| inflight.is_settled(run, slot, arm))
                    else {
                        self.mirror.oldest_unapplied_us.store(0, Ordering::Relaxed);
                        self.publish_gauges(low);
                        let appended = self.mirror.spool.appended.notified();
                        tokio::select! {
                            _ = appended => {}
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                            _ = shutdown.changed() => {}
                        }
                        continue;
                    };
                    if !choice.ready {
                        // A commit in flight on another session may still come
                        // with a lower key: wait for it to be spooled or dropped.
                        if !waiting_for_order {
                            self.mirror.metrics.order_waits.inc();
                            waiting_for_order = true;
                        }
                        tokio::select! {
                            _ = settled => {}
                            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                            _ = shutdown.changed() => {}
                        }
                        continue;
                    }
                    waiting_for_order = false;
                    // What settled may have just been spooled: look again with it.
                    if feed.refill(&self.mirror) > 0 {
                        continue;
                    }
                    if choice.seq > self.mirror.spool.applicable_seq() {
                        // Read ahead (so its place in commit order is known)
                        // but not on stable storage yet: a unit applied and
                        // then lost in a machine crash would be on the target
                        // and out of the spool's account.
                        let synced = self.mirror.spool.synced.notified();
                        self.mirror.spool.want_sync();
                        tokio::select! {
                            _ = synced => {}
                            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                            _ = shutdown.changed() => {}
                        }
                        continue;
                    }
                    choice.seq
                }
            };
            self.mirror
                .oldest_unapplied_us
                .store(feed.oldest_committed_us(), Ordering::Relaxed);
            let Some(rec) = feed.records.remove(&seq) else {
                feed.take(seq, None);
                continue;
            };
            let after = feed.seq.if_applied(seq);
            match self.apply(&rec, &after).await {
                Ok(now) => {
                    self.attempts = 0;
                    backoff = Duration::from_millis(100);
                    self.mirror.report.set_apply_state(None);
                    if now {
                        self.mirror.metrics.applied.inc();
                    } else {
                        self.mirror.metrics.already_applied.inc();
                    }
                    feed.take(seq, Some(&rec));
                    self.mirror
                        .applied_seq
                        .store(feed.seq.low(), Ordering::Relaxed);
                }
                Err(retry) => {
                    let (msg, counts) = match retry {
                        Retry::Connect(m) => (format!("cannot reach the target: {m}"), false),
                        Retry::Lost(m) => {
                            // The unit may have committed before the link
                            // died: read the target's progress row again.
                            self.progress.remove(rec.database());
                            (format!("lost the target while applying: {m}"), true)
                        }
                    };
                    self.conns.remove(&rec.session);
                    if counts {
                        self.attempts += 1;
                    }
                    if self.attempts >= MAX_ATTEMPTS {
                        // Its last attempt must not go on by itself (behind a
                        // lock, say) and apply it after all.
                        if let Some(a) = self.abandoned.take() {
                            if let Err(Retry::Connect(e) | Retry::Lost(e)) =
                                self.end_abandoned(&rec, &a).await
                            {
                                warn!(pid = a.pid, error = %e, "cannot end the last attempt of a unit given up; trying again before the next unit");
                                self.abandoned = Some(a);
                            }
                        }
                        self.give_up(&rec, &msg);
                        self.attempts = 0;
                        feed.take(seq, Some(&rec));
                        self.mirror
                            .applied_seq
                            .store(feed.seq.low(), Ordering::Relaxed);
                        continue;
                    }
                    self.mirror
                        .report
                        .set_apply_state(Some(format!("waiting at seq {}: {msg}", rec.seq)));
                    warn!(seq = rec.seq, error = %msg, "mirror apply delayed; retrying");
                    retry_seq = Some(rec.seq);
                    feed.records.insert(rec.seq, rec);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        let applied = feed.seq.low();
        let _ = crate::private_files::write(&applied_path, applied.to_string());
        for (_, mut c) in self.conns.drain() {
            let _ = crate::net::send_all(&mut c.stream, b"X\0\0\0\x04").await;
        }
        info!(applied_seq = applied, "mirror applier stopped");
    }

    fn publish_gauges(&self, applied: u64) {
        let m = &self.mirror.metrics;
        let last = self.mirror.spool.last_seq();
        m.lag_transactions.set(last.saturating_sub(applied) as i64);
        let oldest = self.mirror.oldest_unapplied_us.load(Ordering::Relaxed);
        m.lag_ms.set(if oldest == 0 {
            0
        } else {
            (crate::clock::now_us().saturating_sub(oldest) / 1000) as i64
        });
        m.spool_bytes.set(self.mirror.spool.bytes() as i64);
        m.target_connections.set(self.conns.len() as i64);
        m.nondeterministic
            .set(self.mirror.report.nondeterministic_count() as i64);
    }

    fn give_up(&self, rec: &MirroredUnit, why: &str) {
        let d = Divergence {
            time_us: crate::clock::now_us(),
            seq: rec.seq,
            session: rec.session,
            fingerprint: "apply-failed".into(),
            statement: first_statement(rec),
            source: "committed".into(),
            target: format!("not applied after {MAX_ATTEMPTS} attempts"),
            target_error: Some(why.to_string()),
            segment: 0,
            position: 0,
        };
        self.mirror.divergence(d);
        // The target misses a committed unit: that is a gap, and the
        // target needs a re-sync.
        self.mirror.unapplied(rec.seq, rec.xid, why);
    }

    async fn connect(&mut self, rec: &MirroredUnit) -> Result<Conn, Retry> {
        let mut conn = self.connect_bare(rec).await?;
        if !self.progress.contains_key(&conn.database) {
            let p = self.setup_progress(&mut conn).await?;
            self.progress.insert(conn.database.clone(), p);
        }
        Ok(conn)
    }

    /// A connection as the unit's session, nothing read or set up on it.
    async fn connect_bare(&mut self, rec: &MirroredUnit) -> Result<Conn, Retry> {
        let database = rec.database().to_string();
        let params = rec
            .startup
            .iter()
            .filter(|(k, _)| k != b"replication")
            .cloned()
            .collect();
        let startup = StartupMessage::new(3, 0, params);
        let (stream, buf, key) =
            connect_and_login(&self.upstream, self.passfile.as_ref(), &startup)
                .await
                .map_err(Retry::Connect)?;
        let conn = Conn {
            stream,
            buf,
            database: database.clone(),
            state_version: None,
            prepared: HashMap::new(),
            last_used: Instant::now(),
            pid: key.map(|k| k.pid),
        };
        Ok(conn)
    }

    /// Creates (if needed) and reads this database's progress row.
    async fn setup_progress(&self, conn: &mut Conn) -> Result<Option<Progress>, Retry> {
        let id = self.mirror.spool.id.as_str();
        // Separate messages: creating the table needs CREATE on the
        // database, which an operator may have done for us already.
        let mut out = BytesMut::new();
        query(&mut out, PROGRESS_DDL);
        param_query(
            &mut out,
            "INSERT INTO pgshift_mirror.progress (spool_id, seq) VALUES ($1, 0) ON CONFLICT DO NOTHING",
            &[id],
        );
        param_query(
            &mut out,
            "SELECT seq, above, pending FROM pgshift_mirror.progress WHERE spool_id = $1",
            &[id],
        );
        let answers = self.round_trip(conn, &out, 3).await?;
        let failed = answers[2]
            .errors
            .first()
            .or(answers[1].errors.first())
            .map(|(_, e)| e.clone());
        if let Some(e) = failed {
            let created = answers[0]
                .errors
                .first()
                .map(|(_, e)| e.as_str())
                .unwrap_or("");
            warn!(database = %conn.database, error = %e, create_error = %created,
                "cannot use the mirror progress table on the target; applying at least once (see docs/mirroring.md to create it)");
            self.mirror.report.set_apply_state(Some(format!(
                "progress table unavailable in database {}: {e}",
                conn.database
            )));
            return Ok(None);
        }
        let row = answers[2].rows.first();
        let low = row
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|s| s.parse().ok());
        let above = row
            .and_then(|r| r.get(1).cloned().flatten())
            .map(|a| Progress::parse_above(&a))
            .unwrap_or_default();
        let pending = row
            .and_then(|r| r.get(2).cloned().flatten())
            .and_then(|s| s.parse().ok());
        Ok(low.map(|low| Progress {
            low,
            above,
            pending,
        }))
    }

    /// Writes `out` and reads `groups` ReadyForQuery-terminated answers.
    async fn round_trip(
        &self,
        conn: &mut Conn,
        out: &[u8],
        groups: usize,
    ) -> Result<Vec<Answer>, Retry> {
        round_trip_on(conn, out, groups, self.mirror.apply_timeout)
            .await
            .map_err(Retry::Lost)
    }

    fn analysis(&mut self, sql: &str) -> Arc<Analysis> {
        let key = lexer::shape_key(sql).unwrap_or_else(|| sql.to_string());
        if let Some(a) = self.analyses.get(&key) {
            return Arc::clone(a);
        }
        if self.analyses.len() > 50_000 {
            self.analyses.clear();
        }
        let a = Arc::new(analyze(sql));
        self.analyses.insert(key, Arc::clone(&a));
        a
    }

    /// Applies one unit; `Ok(false)` when the target had applied it already.
    /// `after` is the progress once this unit is applied.
    async fn apply(&mut self, rec: &MirroredUnit, after: &(u64, Vec<u64>)) -> Result<bool, Retry> {
        if !self.mirror.rows.streams.is_empty() {
            self.last_startup
                .insert(rec.database().to_string(), rec.startup.clone());
        }
        if let Some(a) = self.abandoned.take() {
            if let Err(e) = self.end_abandoned(rec, &a).await {
                self.abandoned = Some(a);
                return Err(e);
            }
            // Whatever it did is in the progress row now: read it again.
            self.progress.remove(rec.database());
        }
        let mut conn = match self.conns.remove(&rec.session) {
            Some(c) => c,
            None => self.connect(rec).await?,
        };
        let r = self.apply_on(&mut conn, rec, after).await;
        match &r {
            Ok(_) => {
                conn.last_used = Instant::now();
                self.conns.insert(rec.session, conn);
            }
            // The unit may still be running (or waiting for a lock) there.
            Err(Retry::Lost(_)) => {
                self.abandoned = conn.pid.map(|pid| Abandoned {
                    pid,
                    session: rec.session,
                })
            }
            Err(Retry::Connect(_)) => {}
        }
        r
    }

    /// Makes sure the backend of an abandoned attempt is gone: terminates
    /// it from a fresh connection (as the same role, which may signal its
    /// own backends) and waits until it has left `pg_stat_activity`.
    async fn end_abandoned(&mut self, rec: &MirroredUnit, a: &Abandoned) -> Result<(), Retry> {
        // Nothing but the termination on this connection: whatever else
        // could wait for the locks the abandoned attempt holds.
        let mut conn = self.connect_bare(rec).await?;
        let pid = a.pid;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = BytesMut::new();
        query(
            &mut out,
            &format!("SELECT pg_catalog.pg_terminate_backend({pid})"),
        );
        let answers = self.round_trip(&mut conn, &out, 1).await?;
        if let Some((_, e)) = answers[0].errors.first() {
            warn!(pid, session = a.session, error = %e, "cannot terminate an abandoned apply attempt on the target");
        }
        loop {
            let mut out = BytesMut::new();
            query(
                &mut out,
                &format!("SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE pid = {pid}"),
            );
            let answers = self.round_trip(&mut conn, &out, 1).await?;
            let left = answers[0]
                .rows
                .first()
                .and_then(|r| r.first().cloned().flatten())
                .unwrap_or_default();
            if left == "0" {
                info!(
                    pid,
                    session = a.session,
                    "abandoned apply attempt ended on the target"
                );
                self.conns.insert(rec.session, conn);
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Retry::Lost(format!(
                    "the target backend {pid} running an abandoned attempt is still there"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether a transaction with global id `gid` is prepared on the
    /// target (in any database: gids are cluster-wide).
    async fn is_prepared(&self, conn: &mut Conn, gid: &str) -> Result<bool, Retry> {
        let mut out = BytesMut::new();
        param_query(
            &mut out,
            "SELECT count(*) FROM pg_catalog.pg_prepared_xacts WHERE gid = $1",
            &[gid],
        );
        let answers = self.round_trip(conn, &out, 1).await?;
        let n = answers
            .first()
            .and_then(|a| a.rows.first())
            .and_then(|r| r.first().cloned().flatten())
            .unwrap_or_default();
        Ok(n != "0")
    }

    /// Records `rec` as applied (found applied after an interruption).
    async fn mark_applied(
        &mut self,
        conn: &mut Conn,
        rec: &MirroredUnit,
        after: &(u64, Vec<u64>),
    ) -> Result<(), Retry> {
        let mut out = BytesMut::new();
        query(&mut out, &progress_mark(&self.mirror.spool.id, after));
        let answers = self.round_trip(conn, &out, 1).await?;
        if let Some((_, msg)) = answers.first().and_then(|a| a.errors.first()) {
            warn!(seq = rec.seq, error = %msg, "could not record mirror progress on the target");
        }
        if let Some(Some(p)) = self.progress.get_mut(&conn.database) {
            *p = Progress {
                low: after.0,
                above: after.1.clone(),
                pending: None,
            };
        }
        info!(
            seq = rec.seq,
            "an interrupted two-phase commit step was found applied on the target"
        );
        Ok(())
    }

    async fn apply_on(
        &mut self,
        conn: &mut Conn,
        rec: &MirroredUnit,
        after: &(u64, Vec<u64>),
    ) -> Result<bool, Retry> {
        if !self.progress.contains_key(&conn.database) {
            // Forgotten after a lost attempt: what it did is on the target
            // now, or never will be.
            let p = self.setup_progress(conn).await?;
            self.progress.insert(conn.database.clone(), p);
        }
        let progress = self.progress.get(&conn.database).cloned().flatten();
        if progress.as_ref().is_some_and(|p| p.has(rec.seq)) {
            return Ok(false); // applied before a restart or a lost connection
        }
        // What the unit's statements are, for the outcome check, the
        // non-determinism flags and the choice of how to mark progress.
        let statements: Vec<Vec<String>> = rec
            .segments
            .iter()
            .map(|s| segment_statements(&s.messages, conn, rec))
            .collect();
        // A two-phase commit step: whether it happened shows in
        // pg_prepared_xacts, so it is marked outside its transaction (a mark
        // inside a prepared transaction would hold the progress row until
        // COMMIT PREPARED, which waits for it) and an interrupted one is
        // settled exactly.
        let two_phase = statements
            .iter()
            .flatten()
            .find_map(|t| self.analysis(t).two_phase.clone());
        if progress
            .as_ref()
            .is_some_and(|p| p.pending == Some(rec.seq))
        {
            match &two_phase {
                Some((step, gid)) => {
                    let prepared = self.is_prepared(conn, gid).await?;
                    // PREPARE happened if the gid is there; COMMIT or
                    // ROLLBACK PREPARED if it is gone.
                    if prepared == (*step == TwoPhase::Prepare) {
                        self.mark_applied(conn, rec, after).await?;
                        return Ok(false);
                    }
                    // It did not happen: it runs now.
                }
                None => {
                    // Started and not finished (it could not carry its mark
                    // inside its transaction): running it again could apply
                    // part of it twice. The target needs a re-sync instead.
                    self.mirror.unapplied(
                        rec.seq,
                        rec.xid,
                        "it was interrupted on the target after it began, and it commits on its own, so it may have partly applied",
                    );
                    return Ok(false);
                }
            }
        }
        let mut transactional = true;
        let mut txn_control = false;
        let mut row_safe = true;
        let mut writes_seen = false;
        let mut flags = Vec::new();
        for text in statements.iter().flatten() {
            let a = self.analysis(text);
            transactional &= !a.non_transactional;
            txn_control |= a.transaction_control;
            row_safe &= a.row_safe && !a.invalid;
            writes_seen |= !a.written_tables.is_empty();
            if let Some(n) = self.nondeterminism(conn, text, &a).await? {
                flags.push(n);
            }
        }
        // A unit mirrored for its transaction id alone wrote through
        // functions: what they wrote shows only in its rows.
        let opaque = !writes_seen && rec.xid.is_some();
        if !flags.is_empty() || opaque {
            // A prepared transaction's rows are decoded only when it is
            // committed, in a later unit: it is applied as statements.
            let rows_apply = row_safe && transactional && two_phase.is_none();
            let why_not = match self.rows_for(conn, rec, rows_apply).await? {
                Ok(rows) => {
                    for n in flags {
                        self.mirror.report.nondeterministic(n, None);
                    }
                    return self
                        .apply_rows(conn, rec, after, progress.as_ref(), rows)
                        .await;
                }
                Err(why) => why,
            };
            for n in flags {
                self.mirror.report.nondeterministic(n, Some(&why_not));
            }
            self.mirror
                .metrics
                .nondeterministic
                .set(self.mirror.report.nondeterministic_count() as i64);
        }

        if !transactional {
            // CREATE DATABASE, VACUUM, ...: the applier's other connections
            // must not hold the databases such a statement may need.
            self.conns.clear();
        }
        let mut out = BytesMut::new();
        let mut expect = Vec::new();
        if conn.state_version != Some(rec.state_version) {
            query(&mut out, "DEALLOCATE ALL");
            query(&mut out, "RESET ALL");
            expect.extend([Expect::Internal, Expect::Internal]);
            for s in &rec.state {
                query(&mut out, &String::from_utf8_lossy(s));
                expect.push(Expect::Internal);
            }
            conn.prepared.clear();
        }
        let mut prepared_any = false;
        for (name, parse) in &rec.prepared {
            if conn.prepared.get(name) != Some(parse) {
                if conn.prepared.contains_key(name) || name.is_empty() {
                    close_statement(&mut out, name);
                }
                out.extend_from_slice(parse);
                conn.prepared.insert(name.clone(), parse.clone());
                prepared_any = true;
            }
        }
        if prepared_any {
            out.extend_from_slice(b"S\0\0\0\x04");
            expect.push(Expect::Internal);
        }
        // The spool id is checked to be a plain token when the spool opens:
        // it needs no quoting.
        let id = &self.mirror.spool.id;
        let mark = progress.as_ref().map(|_| progress_mark(id, after));
        let single_autocommit = rec.segments.len() == 1 && rec.segments[0].status == b'I';
        // In a block, the mark goes in just before the request that commits
        // it: by then the transaction is open and as writable as it will be
        // (a READ ONLY one made READ WRITE, say).
        let n = rec.segments.len();
        let mark_after =
            (n >= 2 && rec.segments[n - 2].status == b'T' && two_phase.is_none()).then(|| n - 2);
        let mut marked_inside = false;
        if let (Some(m), true) = (&mark, single_autocommit && transactional && !txn_control) {
            // An autocommit unit: wrap it with the mark in one transaction.
            query(&mut out, "BEGIN");
            query(&mut out, m);
            expect.extend([Expect::Internal, Expect::Mark]);
            out.extend_from_slice(&rec.segments[0].messages);
            expect.push(Expect::Segment(0));
            query(&mut out, "COMMIT");
            expect.push(Expect::Internal);
        } else {
            for (i, seg) in rec.segments.iter().enumerate() {
                out.extend_from_slice(&seg.messages);
                expect.push(Expect::Segment(i));
                if Some(i) == mark_after {
                    // The mark commits (or rolls back) with the unit.
                    if let Some(m) = &mark {
                        query(&mut out, m);
                        expect.push(Expect::Mark);
                        marked_inside = true;
                    }
                }
            }
            if !marked_inside {
                if let Some(m) = &mark {
                    // Marked after it, with a pending mark before it: an
                    // interruption in between is found and reported, never
                    // applied twice.
                    let mut before = BytesMut::new();
                    query(
                        &mut before,
                        &format!(
                            "UPDATE pgshift_mirror.progress SET pending = {} WHERE spool_id = '{id}'",
                            rec.seq
                        ),
                    );
                    before.extend_from_slice(&out);
                    out = before;
                    expect.insert(0, Expect::Mark);
                    query(&mut out, m);
                    expect.push(Expect::Mark);
                } else {
                    self.mirror.report.at_least_once();
                }
            }
        }
        let answers = self.round_trip(conn, &out, expect.len()).await?;
        for seg in &rec.segments {
            track_prepared(&seg.messages, conn);
        }
        conn.state_version = Some(rec.post_state_version);
        for (e, a) in expect.iter().zip(&answers) {
            for o in &a.outcomes {
                if let Outcome::Error(code) = o {
                    self.mirror.report.target_error(code);
                    self.mirror
                        .metrics
                        .target_errors
                        .get_or_create(&vec![("class", code.get(..2).unwrap_or("??").to_string())])
                        .inc();
                }
            }
            match e {
                Expect::Segment(i) => self.compare(rec, *i, a, &statements[*i]),
                Expect::Mark => {
                    if let Some((_, msg)) = a.errors.first() {
                        warn!(seq = rec.seq, error = %msg, "could not record mirror progress on the target");
                    }
                }
                Expect::Internal | Expect::Rows => {
                    if let Some((_, msg)) = a.errors.first() {
                        warn!(seq = rec.seq, error = %msg, "target rejected the mirror's session setup");
                    }
                }
            }
        }
        if let Some(p) = self.progress.get_mut(&conn.database) {
            if p.is_some() {
                *p = Some(Progress {
                    low: after.0,
                    above: after.1.clone(),
                    pending: None,
                });
            }
        }
        Ok(true)
    }

    /// The outcome check: the target must answer each step as the source did.
    fn compare(&mut self, rec: &MirroredUnit, i: usize, target: &Answer, statements: &[String]) {
        let source = &rec.segments[i];
        if rec.recovered && source.outcomes.is_empty() {
            // Recovered after a crash: the source's answers to this request
            // were never read, so there is nothing to compare with.
            return;
        }
        let n = source.outcomes.len().max(target.outcomes.len());
        // The health monitor: the target failed what the source did not.
        if let Some(h) = self.mirror.health.get() {
            use crate::health::{Db, Fault, Sample, SampleKind};
            let failed = (0..n).any(|pos| {
                matches!(target.outcomes.get(pos), Some(Outcome::Error(_)))
                    && !matches!(source.outcomes.get(pos), Some(Outcome::Error(_)))
            });
            let fault = failed.then_some(Fault::Diverged);
            h.record(Sample::new(Db::Target, SampleKind::Mirror, fault));
        }
        for pos in 0..n {
            let s = source.outcomes.get(pos);
            let t = target.outcomes.get(pos);
            if s == t {
                continue;
            }
            let statement = statements
                .get(pos)
                .or(statements.last())
                .cloned()
                .unwrap_or_default();
            // A read of the catalog (type OIDs, statistics) counts rows only
            // that server has: both answered it, the counts may differ.
            let both_selected = matches!(
                (s, t),
                (Some(Outcome::Complete(a)), Some(Outcome::Complete(b)))
                    if a.starts_with("SELECT ") && b.starts_with("SELECT ")
            );
            if both_selected && crate::classify::is_server_local_read(&statement) {
                continue;
            }
            let fingerprint = if statement.is_empty() {
                "unknown".to_string()
            } else {
                self.analysis(&statement).fingerprint.clone()
            };
            let d = Divergence {
                time_us: crate::clock::now_us(),
                seq: rec.seq,
                session: rec.session,
                fingerprint,
                statement,
                source: s.map_or("nothing".into(), |o| o.to_string()),
                target: t.map_or("nothing".into(), |o| o.to_string()),
                target_error: target
                    .errors
                    .iter()
                    .find(|(p, _)| *p == pos)
                    .map(|(_, m)| m.clone()),
                segment: i,
                position: pos,
            };
            self.mirror.divergence(d);
            // One divergence per segment: what follows an error is skipped
            // on both sides anyway.
            return;
        }
    }

    /// Why a statement's replay cannot produce the source's values, if it
    /// cannot.
    async fn nondeterminism(
        &mut self,
        conn: &mut Conn,
        text: &str,
        a: &Analysis,
    ) -> Result<Option<NonDeterministic>, Retry> {
        if a.written_tables.is_empty() {
            return Ok(None);
        }
        let mut reasons: Vec<String> = a
            .nondeterministic
            .iter()
            .map(|f| format!("calls {f}()"))
            .collect();
        if let Some((table, cols)) = &a.insert {
            let key = (conn.database.clone(), table.clone());
            if !self.defaults.contains_key(&key) {
                let d = self.volatile_defaults(conn, table).await?;
                self.defaults.insert(key.clone(), d);
            }
            for (col, expr) in self.defaults.get(&key).into_iter().flatten() {
                if cols.is_empty() || !cols.iter().any(|c| c == col) {
                    reasons.push(format!("column {col} defaults to {expr}"));
                }
            }
        }
        Ok((!reasons.is_empty()).then(|| NonDeterministic {
            fingerprint: a.fingerprint.clone(),
            statement: super::report::truncate(text, 500),
            tables: a.written_tables.clone(),
            reasons,
            applied_as_rows: 0,
            replayed_as_statements: 0,
            why_not_rows: None,
        }))
    }

    /// The statements that apply this unit's transaction from the source's
    /// row images, or why there are none (then it is replayed as it ran).
    async fn rows_for(
        &mut self,
        conn: &mut Conn,
        rec: &MirroredUnit,
        row_safe: bool,
    ) -> Result<Result<Vec<RowStatement>, String>, Retry> {
        let Some(stream) = self.mirror.rows.stream(rec.database()).cloned() else {
            return Ok(Err(format!(
                "no row images for database {} (mirror.row_images.databases)",
                rec.database()
            )));
        };
        if !row_safe {
            return Ok(Err(
                "the unit has statements rows cannot reproduce (DDL, TRUNCATE, CALL, PREPARE TRANSACTION, ...)".into(),
            ));
        }
        let Some(xid) = rec.xid else {
            return Ok(Err(
                "its transaction id is not known (no order probe)".into()
            ));
        };
        // The source's WAL position now is past the unit's commit: once the
        // stream is past it too, a transaction not decoded wrote no rows.
        let committed_before = self.source_insert_lsn(rec.database()).await.ok();
        let Some(tx) = stream
            .take(xid, committed_before, self.mirror.rows.wait)
            .await
        else {
            return Ok(Err(format!(
                "its row images did not arrive within mirror.row_images.wait_ms ({})",
                stream.state.lock().unwrap_or_else(|p| p.into_inner())
            )));
        };
        if let Err(why) = tx.usable() {
            return Ok(Err(why));
        }
        let mut out = Vec::with_capacity(tx.changes.len());
        for change in &tx.changes {
            match self.row_statement(conn, change).await? {
                Some(st) => out.push(st),
                None => {
                    return Ok(Err(format!(
                        "a row of {} cannot be found on the target without a key",
                        change_table(change)
                    )))
                }
            }
        }
        Ok(Ok(out))
    }

    /// Applies a unit from its transaction's row images, in one target
    /// transaction with its progress mark and with triggers and foreign
    /// keys off (`session_replication_role = replica`, as logical
    /// replication applies rows): each change must touch exactly one row.
    async fn apply_rows(
        &mut self,
        conn: &mut Conn,
        rec: &MirroredUnit,
        after: &(u64, Vec<u64>),
        progress: Option<&Progress>,
        rows: Vec<RowStatement>,
    ) -> Result<bool, Retry> {
        let mut out = BytesMut::new();
        query(&mut out, "BEGIN");
        query(&mut out, "SET LOCAL session_replication_role = replica");
        let mut expect = vec![Expect::Internal, Expect::Internal];
        if progress.is_some() {
            query(&mut out, &progress_mark(&self.mirror.spool.id, after));
            expect.push(Expect::Mark);
        }
        let mut texts = Vec::with_capacity(rows.len());
        for (sql, params) in rows {
            row_query(&mut out, &sql, &params);
            texts.push(sql);
        }
        put_message(&mut out, b'S', &[]);
        expect.push(Expect::Rows);
        query(&mut out, "COMMIT");
        expect.push(Expect::Internal);
        let answers = self.round_trip(conn, &out, expect.len()).await?;
        // The session's own state on this connection is no longer known
        // (the unit's SETs did not run here), nor its unnamed statement.
        conn.state_version = None;
        conn.prepared.remove(&b""[..]);
        let mut failed = None;
        for (e, a) in expect.iter().zip(&answers) {
            match e {
                Expect::Rows => {
                    for (i, o) in a.outcomes.iter().enumerate() {
                        let one = matches!(o, Outcome::Complete(t) if t.ends_with(" 1"));
                        if !one && failed.is_none() {
                            let why = a
                                .errors
                                .iter()
                                .find(|(p, _)| *p == i)
                                .map(|(_, m)| m.clone());
                            failed = Some((i, o.to_string(), why));
                        }
                    }
                }
                Expect::Mark | Expect::Internal => {
                    if let Some((_, msg)) = a.errors.first() {
                        failed.get_or_insert((0, "ERROR".into(), Some(msg.clone())));
                    }
                }
                Expect::Segment(_) => {}
            }
        }
        if let Some((i, target, error)) = failed {
            let statement = texts.get(i).cloned().unwrap_or_default();
            self.mirror.divergence(Divergence {
                time_us: crate::clock::now_us(),
                seq: rec.seq,
                session: rec.session,
                fingerprint: "row-image".into(),
                statement,
                source: "1 row".into(),
                target,
                target_error: error,
                segment: 0,
                position: i,
            });
        }
        self.sequences_dirty.insert(conn.database.clone());
        if let Some(p) = self.progress.get_mut(&conn.database) {
            if p.is_some() {
                *p = Some(Progress {
                    low: after.0,
                    above: after.1.clone(),
                    pending: None,
                });
            }
        }
        Ok(true)
    }

    /// The statement (and its parameters) that applies one row change;
    /// `None` when the row cannot be found (no key).
    async fn row_statement(
        &mut self,
        conn: &mut Conn,
        change: &Change,
    ) -> Result<Option<RowStatement>, Retry> {
        let value = |v: &Value| match v {
            Value::Text(t) => Some(t.clone()),
            _ => None,
        };
        Ok(Some(match change {
            Change::Insert { table, row } => {
                let meta = self.table_meta(conn, table).await?;
                let cols: Vec<&Column> = row
                    .iter()
                    .filter(|(c, _)| !meta.generated.contains(c))
                    .collect();
                let names: Vec<&str> = cols.iter().map(|(c, _)| c.as_str()).collect();
                let marks: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
                (
                    format!(
                        "INSERT INTO {table} ({}) OVERRIDING SYSTEM VALUE VALUES ({})",
                        names.join(", "),
                        marks.join(", ")
                    ),
                    cols.iter().map(|(_, v)| value(v)).collect(),
                )
            }
            Change::Update { table, old, row } => {
                let meta = self.table_meta(conn, table).await?;
                let key: Vec<Column> = match old {
                    Some(old) => old.clone(),
                    None => row
                        .iter()
                        .filter(|(c, _)| meta.key.contains(c))
                        .cloned()
                        .collect(),
                };
                let set: Vec<&Column> = row
                    .iter()
                    .filter(|(c, v)| *v != Value::Unchanged && !meta.generated.contains(c))
                    .collect();
                let mut params: Vec<Option<String>> = set.iter().map(|(_, v)| value(v)).collect();
                let assigns: Vec<String> = set
                    .iter()
                    .enumerate()
                    .map(|(i, (c, _))| format!("{c} = ${}", i + 1))
                    .collect();
                if key.is_empty() || set.is_empty() {
                    return Ok(None);
                }
                let conds = key_conditions(&key, &mut params);
                (
                    format!("UPDATE {table} SET {} WHERE {conds}", assigns.join(", ")),
                    params,
                )
            }
            Change::Delete { table, old } => {
                if old.is_empty() {
                    return Ok(None);
                }
                let mut params = Vec::new();
                let conds = key_conditions(old, &mut params);
                (format!("DELETE FROM {table} WHERE {conds}"), params)
            }
            Change::Unusable(_) => return Ok(None),
        }))
    }

    fn sequence_sync_every(&self) -> Duration {
        self.mirror.rows.sequence_sync
    }

    /// A connection to `database` on the source as the row images' user.
    async fn source_conn(&mut self, database: &str) -> Result<&mut Conn, String> {
        if !self.source_conns.contains_key(database) {
            let Some((source, passfile, user)) = &self.source else {
                return Err("no source connection configured".into());
            };
            let params = vec![
                (b"user".to_vec(), user.clone().into_bytes()),
                (b"database".to_vec(), database.as_bytes().to_vec()),
                (b"application_name".to_vec(), b"pgshift mirror".to_vec()),
            ];
            let (stream, buf, key) = connect_and_login(
                source,
                passfile.as_ref(),
                &StartupMessage::new(3, 0, params),
            )
            .await?;
            self.source_conns.insert(
                database.to_string(),
                Conn {
                    stream,
                    buf,
                    database: database.to_string(),
                    state_version: None,
                    prepared: HashMap::new(),
                    last_used: Instant::now(),
                    pid: key.map(|k| k.pid),
                },
            );
        }
        let c = self
            .source_conns
            .get_mut(database)
            .ok_or("no source connection")?;
        c.last_used = Instant::now();
        Ok(c)
    }

    /// Runs one query on the source (dropping the connection on failure).
    async fn source_query(&mut self, database: &str, out: &[u8]) -> Result<Answer, String> {
        let timeout = self.mirror.apply_timeout;
        let conn = self.source_conn(database).await?;
        let r = round_trip_on(conn, out, 1, timeout).await;
        match r {
            Ok(mut a) => Ok(a.remove(0)),
            Err(e) => {
                self.source_conns.remove(database);
                Err(e)
            }
        }
    }

    /// The source's WAL insert position now.
    async fn source_insert_lsn(&mut self, database: &str) -> Result<u64, String> {
        let mut out = BytesMut::new();
        query(&mut out, "SELECT pg_catalog.pg_current_wal_insert_lsn()");
        let a = self.source_query(database, &out).await?;
        let text = a
            .rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .ok_or("no WAL position")?;
        let (hi, lo) = text.split_once('/').ok_or("bad WAL position")?;
        Ok(
            (u64::from_str_radix(hi, 16).map_err(|e| e.to_string())? << 32)
                | u64::from_str_radix(lo, 16).map_err(|e| e.to_string())?,
        )
    }

    /// Decoded transactions no unit still to apply needs are let go, so the
    /// slot can move on.
    fn pass_row_images(&self, feed: &Feed) {
        if self.mirror.rows.streams.is_empty() {
            return;
        }
        let needed: std::collections::HashSet<u32> = feed
            .records
            .values()
            .filter_map(|r| r.xid.map(|x| x as u32))
            .collect();
        // Everything decoded before the lowest order key still to apply is
        // done with, but for units still waiting.
        let lowest = feed
            .records
            .values()
            .filter_map(|r| r.order.lsn)
            .min()
            .unwrap_or(u64::MAX);
        for s in self.mirror.rows.streams.values() {
            s.pass(lowest, |x| needed.contains(&x), UNCLAIMED_ROW_IMAGES);
        }
    }

    /// Brings the target's sequences to the source's values, in databases
    /// where units were applied from rows (which set ids explicitly and so
    /// do not advance sequences on the target).
    async fn sync_sequences(&mut self) {
        let dbs: Vec<String> = self.sequences_dirty.drain().collect();
        for db in dbs {
            if let Err(e) = self.sync_sequences_in(&db).await {
                warn!(database = %db, error = %e, "cannot bring the target's sequences to the source's values; retrying");
                self.sequences_dirty.insert(db);
            }
        }
    }

    async fn sync_sequences_in(&mut self, db: &str) -> Result<(), String> {
        let list =
            "SELECT pg_catalog.format('%I.%I', schemaname, sequencename), last_value, start_value \
                    FROM pg_catalog.pg_sequences ORDER BY 1";
        let mut out = BytesMut::new();
        query(&mut out, list);
        let source = self.source_query(db, &out).await?;
        let Some(startup) = self.last_startup.get(db).cloned() else {
            return Ok(());
        };
        let session = u64::MAX - 1;
        let rec = MirroredUnit {
            startup,
            ..MirroredUnit::default()
        };
        let mut conn = match self.conns.remove(&session) {
            Some(c) if c.database == db => c,
            _ => self.connect(&rec).await.map_err(|r| match r {
                Retry::Connect(e) | Retry::Lost(e) => e,
            })?,
        };
        let target = self
            .round_trip(&mut conn, &out, 1)
            .await
            .map_err(|r| match r {
                Retry::Connect(e) | Retry::Lost(e) => e,
            })?;
        let on_target: HashMap<String, Option<String>> = target[0]
            .rows
            .iter()
            .filter_map(|r| Some((r.first()?.clone()?, r.get(1)?.clone())))
            .collect();
        let mut fix = BytesMut::new();
        let mut n = 0;
        for row in &source.rows {
            let (Some(Some(name)), Some(last), Some(Some(start))) =
                (row.first(), row.get(1), row.get(2))
            else {
                continue;
            };
            if on_target.get(name) == Some(last) || !on_target.contains_key(name) {
                continue;
            }
            match last {
                Some(v) => param_query(
                    &mut fix,
                    "SELECT pg_catalog.setval($1::pg_catalog.regclass, $2::bigint, true)",
                    &[name, v],
                ),
                None => param_query(
                    &mut fix,
                    "SELECT pg_catalog.setval($1::pg_catalog.regclass, $2::bigint, false)",
                    &[name, start],
                ),
            }
            n += 1;
        }
        if n > 0 {
            let answers = self
                .round_trip(&mut conn, &fix, n)
                .await
                .map_err(|r| match r {
                    Retry::Connect(e) | Retry::Lost(e) => e,
                })?;
            if let Some((_, e)) = answers.iter().find_map(|a| a.errors.first()) {
                return Err(e.clone());
            }
            info!(database = %db, sequences = n, "target sequences brought to the source's values");
        }
        self.conns.insert(session, conn);
        Ok(())
    }

    /// Key and generated columns of a table on the target (cached).
    async fn table_meta(&mut self, conn: &mut Conn, table: &str) -> Result<Arc<TableMeta>, Retry> {
        let k = (conn.database.clone(), table.to_string());
        if let Some(m) = self.tables.get(&k) {
            return Ok(Arc::clone(m));
        }
        let sql = "SELECT pg_catalog.quote_ident(a.attname), \
               a.attgenerated <> '' AS generated, \
               EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = a.attrelid \
                       AND (i.indisreplident OR (i.indisprimary AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index r WHERE r.indrelid = a.attrelid AND r.indisreplident))) \
                       AND a.attnum = ANY (i.indkey)) AS key \
             FROM pg_catalog.pg_attribute a \
             WHERE a.attrelid = pg_catalog.to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped";
        let mut out = BytesMut::new();
        param_query(&mut out, sql, &[table]);
        let answers = self.round_trip(conn, &out, 1).await?;
        let mut meta = TableMeta::default();
        for row in &answers[0].rows {
            if let [Some(name), Some(generated), Some(key)] = &row[..] {
                if generated == "t" {
                    meta.generated.push(name.clone());
                }
                if key == "t" {
                    meta.key.push(name.clone());
                }
            }
        }
        let meta = Arc::new(meta);
        self.tables.insert(k, Arc::clone(&meta));
        Ok(meta)
    }

    /// Columns of `table` (as the session resolves it) whose default or
    /// identity generates values: serial, identity, now(), random UUIDs.
    async fn volatile_defaults(
        &self,
        conn: &mut Conn,
        table: &str,
    ) -> Result<Vec<(String, String)>, Retry> {
        let sql = "SELECT a.attname, CASE WHEN a.attidentity <> '' THEN 'identity' ELSE pg_catalog.pg_get_expr(d.adbin, d.adrelid) END \
             FROM pg_catalog.pg_attribute a LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attrelid = pg_catalog.to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
             AND (a.attidentity <> '' OR d.adbin IS NOT NULL)";
        let mut out = BytesMut::new();
        param_query(&mut out, sql, &[table]);
        let answers = self.round_trip(conn, &out, 1).await?;
        let mut v = Vec::new();
        for row in &answers[0].rows {
            if let [Some(col), Some(expr)] = &row[..] {
                let e = expr.to_ascii_lowercase();
                let volatile = e == "identity"
                    || [
                        "nextval(",
                        "now(",
                        "random(",
                        "uuid",
                        "clock_timestamp(",
                        "current_timestamp",
                        "statement_timestamp(",
                        "transaction_timestamp(",
                        "localtimestamp",
                        "current_date",
                        "current_time",
                        "timeofday(",
                    ]
                    .iter()
                    .any(|f| e.contains(f));
                if volatile {
                    v.push((col.clone(), expr.clone()));
                }
            }
        }
        Ok(v)
    }
}

/// Writes `out` and reads `groups` ReadyForQuery-terminated answers, all
/// within `limit`.
async fn round_trip_on(
    conn: &mut Conn,
    out: &[u8],
    groups: usize,
    limit: Duration,
) -> Result<Vec<Answer>, String> {
    let io = async {
        crate::net::send_all(&mut conn.stream, out).await?;
        let mut answers = Vec::with_capacity(groups);
        let mut cur = Answer::default();
        while answers.len() < groups {
            let msg = read_message(&mut conn.stream, &mut conn.buf, MAX_TARGET_MESSAGE)
                .await?
                .ok_or_else(|| std::io::Error::other("the server closed the connection"))?;
            let body = msg.body();
            match msg.tag {
                b'C' => cur.outcomes.push(Outcome::Complete(
                    String::from_utf8_lossy(body.strip_suffix(b"\0").unwrap_or(body)).into_owned(),
                )),
                b'E' => {
                    let f = parse_error_fields(body);
                    cur.errors.push((
                        cur.outcomes.len(),
                        f.message.unwrap_or_default().to_string(),
                    ));
                    cur.outcomes
                        .push(Outcome::Error(f.code.unwrap_or("XX000").to_string()));
                }
                b'I' => cur.outcomes.push(Outcome::Empty),
                b's' => cur.outcomes.push(Outcome::Suspended),
                rows::DATA_ROW => cur.rows.push(data_row(body)),
                b'Z' => {
                    cur.status = body.first().copied().unwrap_or(b'I');
                    answers.push(std::mem::take(&mut cur));
                }
                _ => {}
            }
        }
        Ok::<_, std::io::Error>(answers)
    };
    match tokio::time::timeout(limit, io).await {
        Ok(Ok(a)) => Ok(a),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} ms", limit.as_millis())),
    }
}

/// Appends a simple Query message.
fn query(out: &mut BytesMut, sql: &str) {
    put_message(out, b'Q', &[sql.as_bytes(), b"\0"]);
}

/// Name of the applier's own prepared statement for catalog queries (so
/// the replayed session's unnamed statement is left alone).
const OWN_STATEMENT: &[u8] = b"__pgshift_catalog";

/// A client session's startup parameters, as the spool keeps them.
type StartupParams = Vec<(Vec<u8>, Vec<u8>)>;

/// One row change as a statement with its text parameters (None: NULL).
type RowStatement = (String, Vec<Option<String>>);

/// A table's columns that locate a row (replica identity, else primary
/// key) and those the server generates (they cannot be written).
#[derive(Debug, Default)]
struct TableMeta {
    key: Vec<String>,
    generated: Vec<String>,
}

fn change_table(c: &Change) -> &str {
    match c {
        Change::Insert { table, .. }
        | Change::Update { table, .. }
        | Change::Delete { table, .. } => table,
        Change::Unusable(_) => "a table",
    }
}

/// `k1 = $n AND k2 IS NULL ...` for the key's values (appended to `params`).
fn key_conditions(key: &[Column], params: &mut Vec<Option<String>>) -> String {
    key.iter()
        .map(|(c, v)| match v {
            Value::Text(t) => {
                params.push(Some(t.clone()));
                format!("{c} = ${}", params.len())
            }
            _ => format!("{c} IS NULL"),
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Appends one row change on the unnamed statement (Parse, Bind, Execute;
/// the caller ends the run with one Sync).
fn row_query(out: &mut BytesMut, sql: &str, params: &[Option<String>]) {
    put_message(
        out,
        b'P',
        &[b"\0", sql.as_bytes(), b"\0", &0i16.to_be_bytes()],
    );
    let mut bind = BytesMut::new();
    bind.extend_from_slice(b"\0\0");
    bind.extend_from_slice(&0i16.to_be_bytes());
    bind.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        match p {
            Some(v) => {
                bind.extend_from_slice(&(v.len() as i32).to_be_bytes());
                bind.extend_from_slice(v.as_bytes());
            }
            None => bind.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    bind.extend_from_slice(&0i16.to_be_bytes());
    put_message(out, b'B', &[&bind]);
    put_message(out, b'E', &[b"\0", &0i32.to_be_bytes()]);
}

/// The statement that records a unit applied: `after` is the new low
/// water mark and the applied sequence numbers above it. The spool id is
/// checked to be a plain token when the spool opens: it needs no quoting.
fn progress_mark(spool_id: &str, after: &(u64, Vec<u64>)) -> String {
    let above: Vec<String> = after.1.iter().map(u64::to_string).collect();
    format!(
        "UPDATE pgshift_mirror.progress SET seq = {}, above = '{{{}}}', pending = NULL, applied_at = now() WHERE spool_id = '{spool_id}'",
        after.0,
        above.join(","),
    )
}

/// Appends a query with text parameters bound, not quoted into its text
/// (Parse, Bind, Execute, Close, Sync: one ReadyForQuery-ended answer).
fn param_query(out: &mut BytesMut, sql: &str, params: &[&str]) {
    put_message(out, b'C', &[b"S", OWN_STATEMENT, b"\0"]);
    put_message(
        out,
        b'P',
        &[
            OWN_STATEMENT,
            b"\0",
            sql.as_bytes(),
            b"\0",
            &0i16.to_be_bytes(),
        ],
    );
    let mut bind = BytesMut::new();
    bind.extend_from_slice(b"\0");
    bind.extend_from_slice(OWN_STATEMENT);
    bind.extend_from_slice(b"\0");
    bind.extend_from_slice(&0i16.to_be_bytes());
    bind.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        bind.extend_from_slice(&(p.len() as i32).to_be_bytes());
        bind.extend_from_slice(p.as_bytes());
    }
    bind.extend_from_slice(&0i16.to_be_bytes());
    put_message(out, b'B', &[&bind]);
    put_message(out, b'E', &[b"\0", &0i32.to_be_bytes()]);
    put_message(out, b'C', &[b"S", OWN_STATEMENT, b"\0"]);
    put_message(out, b'S', &[]);
}

fn close_statement(out: &mut BytesMut, name: &[u8]) {
    put_message(out, b'C', &[b"S", name, b"\0"]);
}

/// A DataRow's values as text (a malformed row: no values).
fn data_row(body: &[u8]) -> Vec<Option<String>> {
    rows::data_row(body)
        .unwrap_or_default()
        .into_iter()
        .map(|v| v.map(|v| String::from_utf8_lossy(v).into_owned()))
        .collect()
}

/// Walks the frames of a segment's messages.
fn frames(mut msgs: &[u8], mut f: impl FnMut(u8, &[u8])) {
    while msgs.len() >= HEADER_LEN {
        let len = u32::from_be_bytes([msgs[1], msgs[2], msgs[3], msgs[4]]) as usize;
        let total = 1 + len;
        if len < 4 || msgs.len() < total {
            return;
        }
        f(msgs[0], &msgs[HEADER_LEN..total]);
        msgs = &msgs[total..];
    }
}

/// The statements a segment runs, in the order their outcomes come back:
/// each statement of a Query, and the statement behind each Execute.
fn segment_statements(msgs: &[u8], conn: &Conn, rec: &MirroredUnit) -> Vec<String> {
    let mut out = Vec::new();
    let mut parsed: HashMap<Vec<u8>, String> = HashMap::new();
    let mut portals: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let text_of = |name: &[u8], parsed: &HashMap<Vec<u8>, String>| -> String {
        if let Some(t) = parsed.get(name) {
            return t.clone();
        }
        // Prepared by an earlier unit: the record carries its Parse (the
        // connection may not hold it yet).
        rec.prepared
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
            .or_else(|| conn.prepared.get(name))
            .and_then(|p| {
                let mut b = &p[HEADER_LEN..];
                take_cstr(&mut b).ok()?;
                take_cstr(&mut b)
                    .ok()
                    .map(|t| String::from_utf8_lossy(t).into_owned())
            })
            .unwrap_or_default()
    };
    frames(msgs, |tag, body| {
        let mut b = body;
        match tag {
            b'Q' => {
                if let Ok(t) = take_cstr(&mut b) {
                    let t = String::from_utf8_lossy(t);
                    match lexer::split(&t) {
                        Ok(parts) if !parts.is_empty() => {
                            out.extend(parts.iter().map(|p| p.to_string()))
                        }
                        _ => out.push(t.into_owned()),
                    }
                }
            }
            b'P' => {
                if let (Ok(n), Ok(t)) = (take_cstr(&mut b), take_cstr(&mut b)) {
                    parsed.insert(n.to_vec(), String::from_utf8_lossy(t).into_owned());
                }
            }
            b'B' => {
                if let Ok(names) = parse_bind_names(body) {
                    portals.insert(names.portal.to_vec(), names.statement.to_vec());
                }
            }
            b'E' => {
                if let Ok(p) = take_cstr(&mut b) {
                    let stmt = portals.get(p).cloned().unwrap_or_default();
                    out.push(text_of(&stmt, &parsed));
                }
            }
            _ => {}
        }
    });
    out
}

/// Keeps the connection's prepared-statement map in step with what a
/// replayed segment did.
fn track_prepared(msgs: &[u8], conn: &mut Conn) {
    frames(msgs, |tag, body| {
        let mut b = body;
        match tag {
            b'P' => {
                if let Ok(n) = take_cstr(&mut b) {
                    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
                    frame.push(b'P');
                    frame.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
                    frame.extend_from_slice(body);
                    conn.prepared.insert(n.to_vec(), frame);
                }
            }
            b'C' if body.first() == Some(&b'S') => {
                let mut b = &body[1..];
                if let Ok(n) = take_cstr(&mut b) {
                    conn.prepared.remove(n);
                }
            }
            b'Q' => {
                conn.prepared.remove(&b""[..]);
                let text = String::from_utf8_lossy(body).to_ascii_lowercase();
                if text.contains("deallocate") || text.contains("discard") {
                    conn.prepared.clear();
                }
            }
            _ => {}
        }
    });
}

fn first_statement(rec: &MirroredUnit) -> String {
    let mut s = String::new();
    if let Some(seg) = rec.segments.first() {
        frames(&seg.messages, |tag, body| {
            if s.is_empty() && (tag == b'Q' || tag == b'P') {
                let mut b = body;
                if tag == b'P' {
                    let _ = take_cstr(&mut b);
                }
                if let Ok(t) = take_cstr(&mut b) {
                    s = String::from_utf8_lossy(t).into_owned();
                }
            }
        });
    }
    s
}
