//! `pgshift replay`: replays recorded client sessions against a server (a
//! Postgres server directly, or pgshift in front of one, where the replay
//! exercises mirroring, routing, shadow reads and failback as live traffic
//! would).
//!
//! Layers, from the file to the socket:
//! - `source`: the events a replay reads (session start, message, end);
//!   `capture` reads them from a pgshift capture, `csvlog` from a Postgres
//!   csvlog written with `log_statement = 'all'`.
//! - this module: a reader thread streams the events (the input is checked
//!   whole first, so a corrupt file is rejected before anything runs); a
//!   dispatcher keeps their timing (scaled by `--speed`) and hands each
//!   session's messages, in order, to that session's task.
//! - `conn`: each task's connection, login, and reading of the answers.
//! - `report`: latency histograms, errors by SQLSTATE, rates.

pub mod capture;
pub mod conn;
pub mod csvlog;
pub mod report;
pub mod source;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use self::conn::{Answer, Answers, Target};
use self::report::{Meta, Phase, ReplayReport, Stats};
use self::source::Event;
use crate::net::send_all;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    /// The recorded gaps between messages, divided by this factor.
    Factor(f64),
    /// No waiting: each session sends its next message as soon as the
    /// previous answer is in.
    Max,
}

impl std::str::FromStr for Speed {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("max") {
            return Ok(Speed::Max);
        }
        match s.parse::<f64>() {
            Ok(f) if f.is_finite() && f > 0.0 => Ok(Speed::Factor(f)),
            _ => Err(format!(
                "{s:?}: give a factor above 0 (1 = recorded timing, 2 = twice as fast) or `max`"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Capture,
    Csvlog,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub input: PathBuf,
    pub format: Format,
    pub url: String,
    pub speed: Speed,
    /// Replay only the first N sessions (by start).
    pub sessions: Option<u64>,
    /// Start over at the end, until `duration`.
    pub looped: bool,
    pub duration: Option<Duration>,
    pub progress: bool,
}

/// Bytes of messages queued for session tasks before the dispatcher waits.
///
/// The dispatcher must not wait on any one session: replayed sessions do
/// not interleave exactly as recorded, so a session can block on a lock
/// held by another whose next message is still in the input; waiting for
/// the blocked one's queue to drain would then never end. So the queues
/// are unbounded each and bounded together: only when this much is
/// queued (the input is that far ahead of the slowest session) does the
/// dispatcher pause, and the report says so.
const MAX_QUEUED_BYTES: u64 = 512 << 20;

enum Reader {
    Capture(capture::CaptureReader),
    Csvlog(Box<csvlog::CsvlogReader<std::io::BufReader<std::fs::File>>>),
}

impl Reader {
    fn open(opts: &Options) -> anyhow::Result<Self> {
        Ok(match opts.format {
            Format::Capture => Reader::Capture(capture::CaptureReader::open(capture::segments(
                &opts.input,
            )?)),
            Format::Csvlog => {
                let f = std::fs::File::open(&opts.input)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", opts.input.display()))?;
                Reader::Csvlog(Box::new(csvlog::CsvlogReader::new(
                    std::io::BufReader::with_capacity(1 << 20, f),
                    opts.input.display().to_string(),
                )))
            }
        })
    }

    fn next_event(&mut self) -> anyhow::Result<Option<Event>> {
        match self {
            Reader::Capture(r) => r.next_event().map_err(Into::into),
            Reader::Csvlog(r) => r.next_event().map_err(Into::into),
        }
    }

    fn redacted(&self) -> bool {
        matches!(self, Reader::Capture(r) if r.flags & crate::record::format::FLAG_REDACTED != 0)
    }
}

/// Admits the first `limit` sessions of one pass and gives each a number
/// unique across passes.
struct Admission {
    limit: Option<u64>,
    admitted: u64,
    ids: HashMap<u64, u64>,
}

impl Admission {
    fn new(limit: Option<u64>) -> Self {
        Self {
            limit,
            admitted: 0,
            ids: HashMap::new(),
        }
    }

    /// The event renumbered, or `None` when its session is not replayed.
    fn admit(&mut self, ev: Event, next_id: &mut u64) -> Option<Event> {
        match ev {
            Event::Start {
                session,
                at_us,
                params,
            } => {
                if self.limit.is_some_and(|l| self.admitted >= l) {
                    return None;
                }
                self.admitted += 1;
                *next_id += 1;
                self.ids.insert(session, *next_id);
                Some(Event::Start {
                    session: *next_id,
                    at_us,
                    params,
                })
            }
            Event::Message {
                session,
                at_us,
                frame,
            } => self.ids.get(&session).map(|&id| Event::Message {
                session: id,
                at_us,
                frame,
            }),
            Event::End { session, at_us } => self
                .ids
                .remove(&session)
                .map(|id| Event::End { session: id, at_us }),
        }
    }
}

/// Reads the whole input once: rejects a corrupt or truncated file before
/// anything is replayed, and counts what a pass holds.
fn prescan(opts: &Options) -> anyhow::Result<Meta> {
    let mut r = Reader::open(opts)?;
    let mut adm = Admission::new(opts.sessions);
    let mut next = 0;
    let (mut first, mut last) = (None, 0u64);
    let mut statements = 0;
    while let Some(ev) = r.next_event()? {
        let Some(ev) = adm.admit(ev, &mut next) else {
            continue;
        };
        first.get_or_insert(ev.at_us());
        last = last.max(ev.at_us());
        if let Event::Message { frame, .. } = &ev {
            if matches!(frame.first(), Some(b'Q' | b'E' | b'F')) {
                statements += 1;
            }
        }
    }
    Ok(Meta {
        input: opts.input.display().to_string(),
        format: match opts.format {
            Format::Capture => "pgshift capture".into(),
            Format::Csvlog => "csvlog".into(),
        },
        server: String::new(),
        speed: match opts.speed {
            Speed::Max => "max".into(),
            Speed::Factor(f) => format!("{f}x"),
        },
        passes: 0,
        sessions: adm.admitted,
        recorded_statements: statements,
        recorded_s: first.map_or(0.0, |f| last.saturating_sub(f) as f64 / 1e6),
        redacted: r.redacted(),
    })
}

/// Runs a replay to the end (or `--duration`) and reports.
pub fn run(opts: Options) -> anyhow::Result<ReplayReport> {
    let mut meta = prescan(&opts)?;
    let target = Arc::new(Target::from_url(&opts.url)?);
    meta.server = target.addr();
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    rt.block_on(replay(opts, meta, target))
}

/// What the reader thread sends the dispatcher.
enum Feed {
    /// A pass begins: its timing starts over.
    Pass,
    Event(Event),
}

async fn replay(
    opts: Options,
    mut meta: Meta,
    target: Arc<Target>,
) -> anyhow::Result<ReplayReport> {
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    // Passes the dispatcher began (the reader may be further ahead).
    let mut passes = 0;
    let (tx, mut rx) = mpsc::channel::<Feed>(8192);
    let reader = {
        let (opts, stop) = (opts.clone(), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("replay-reader".into())
            .spawn(move || -> anyhow::Result<()> {
                let mut next_id = 0;
                loop {
                    let mut r = Reader::open(&opts)?;
                    let mut adm = Admission::new(opts.sessions);
                    if tx.blocking_send(Feed::Pass).is_err() {
                        return Ok(());
                    }
                    while let Some(ev) = r.next_event()? {
                        if stop.load(Relaxed) {
                            return Ok(());
                        }
                        if let Some(ev) = adm.admit(ev, &mut next_id) {
                            if tx.blocking_send(Feed::Event(ev)).is_err() {
                                return Ok(());
                            }
                        }
                    }
                    if !opts.looped || stop.load(Relaxed) || adm.admitted == 0 {
                        return Ok(());
                    }
                }
            })?
    };

    let started = Instant::now();
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let progress = spawn_progress(&opts, &meta, Arc::clone(&stats), started);
    let mut tasks = tokio::task::JoinSet::new();
    let mut senders: HashMap<u64, mpsc::UnboundedSender<Bytes>> = HashMap::new();
    let queued = Arc::new(AtomicU64::new(0));
    // Each session's "finished" flag: while it runs, and once its End has
    // been dispatched (until it is seen finished).
    let mut running: HashMap<u64, tokio::sync::watch::Receiver<bool>> = HashMap::new();
    let mut ended: Vec<tokio::sync::watch::Receiver<bool>> = Vec::new();
    let mut paused = false;
    let (mut base_at, mut base_us) = (tokio::time::Instant::now(), None::<u64>);
    loop {
        let feed = match deadline {
            Some(d) => tokio::time::timeout_at(d, rx.recv())
                .await
                .unwrap_or_default(),
            None => rx.recv().await,
        };
        let Some(feed) = feed else { break };
        let ev = match feed {
            Feed::Pass => {
                // A new pass starts once the last one's sessions are done,
                // so passes do not pile up ahead of the server. Their input
                // is over: a session whose end was not dispatched (none
                // recorded, or not admitted) would otherwise wait for more
                // forever, and this wait with it, past --duration.
                senders.clear();
                if !join_all(&mut tasks, deadline, &stop, &stats).await {
                    break;
                }
                passes += 1;
                (base_at, base_us) = (tokio::time::Instant::now(), None);
                continue;
            }
            Feed::Event(ev) => ev,
        };
        if let Speed::Factor(f) = opts.speed {
            let base = *base_us.get_or_insert(ev.at_us());
            let due =
                base_at + Duration::from_secs_f64(ev.at_us().saturating_sub(base) as f64 / 1e6 / f);
            if due > tokio::time::Instant::now() + Duration::from_millis(1) {
                match deadline {
                    Some(d) if d < due => {
                        tokio::time::sleep_until(d).await;
                        break;
                    }
                    _ => tokio::time::sleep_until(due).await,
                }
            }
        }
        match ev {
            Event::Start {
                session, params, ..
            } => {
                let (stx, srx) = mpsc::unbounded_channel();
                senders.insert(session, stx);
                let (done_tx, done_rx) = tokio::sync::watch::channel(false);
                running.insert(session, done_rx);
                // Sessions that ended before this one started, as recorded,
                // end before it starts here too (its task waits; the
                // dispatcher does not).
                ended.retain(|d| !*d.borrow());
                let after = ended.clone();
                tasks.spawn(run_session(
                    Arc::clone(&target),
                    params,
                    Queue {
                        rx: srx,
                        queued: Arc::clone(&queued),
                        after,
                        _done: Done(done_tx),
                    },
                    Arc::clone(&stats),
                    Arc::clone(&stop),
                    opts.format == Format::Csvlog,
                ));
            }
            Event::Message { session, frame, .. } => {
                while queued.load(Relaxed) > MAX_QUEUED_BYTES {
                    if deadline.is_some_and(|d| d <= tokio::time::Instant::now()) {
                        break;
                    }
                    if !paused {
                        paused = true;
                        stats.dispatch_paused.store(true, Relaxed);
                        tracing::warn!("more than {MAX_QUEUED_BYTES} bytes queued for slow sessions: reading paused");
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                if deadline.is_some_and(|d| d <= tokio::time::Instant::now()) {
                    break; // paused past the end
                }
                if let Some(s) = senders.get(&session) {
                    let len = frame.len() as u64;
                    queued.fetch_add(len, Relaxed);
                    if s.send(frame).is_err() {
                        // The session's task ended; the frame is not queued.
                        queued.fetch_sub(len, Relaxed);
                        senders.remove(&session);
                    }
                }
            }
            Event::End { session, .. } => {
                senders.remove(&session);
                ended.extend(running.remove(&session));
            }
        }
        // Reap finished tasks as we go, so a long replay holds only live ones.
        while tasks.try_join_next().is_some() {}
    }
    // Input done (or time is up): sessions finish what they were sent,
    // but not past --duration.
    drop(rx);
    senders.clear();
    join_all(&mut tasks, deadline, &stop, &stats).await;
    stop.store(true, Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.abort();
    }
    let read = tokio::task::spawn_blocking(move || reader.join())
        .await
        .map_err(|e| anyhow::anyhow!("reader: {e}"))?;
    match read {
        Ok(r) => r?,
        Err(_) => anyhow::bail!("the input reader panicked"),
    }
    meta.passes = passes;
    Ok(stats.report(meta, elapsed))
}

/// How often a session waiting for its next frame looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// How long session tasks may go on after `--duration` ran out: a request
/// in flight gets its answer, a session waiting for earlier ones to end
/// still starts and stops. Whatever is still waiting then is cut: its
/// connection is dropped, and the report counts it.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Waits for every session task; at `deadline` tells them to stop and
/// waits `STOP_GRACE` more, then cuts the rest. Returns whether the
/// deadline had not passed.
async fn join_all(
    tasks: &mut tokio::task::JoinSet<()>,
    deadline: Option<tokio::time::Instant>,
    stop: &AtomicBool,
    stats: &Stats,
) -> bool {
    let Some(deadline) = deadline else {
        while tasks.join_next().await.is_some() {}
        return !stop.load(Relaxed);
    };
    if !stop.load(Relaxed) {
        loop {
            match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                Ok(Some(_)) => {}
                Ok(None) => return true,
                Err(_) => break,
            }
        }
        stop.store(true, Relaxed);
    }
    let cut_at = deadline + STOP_GRACE;
    loop {
        match tokio::time::timeout_at(cut_at, tasks.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => return false,
            Err(_) => {
                let left = tasks.len() as u64;
                tracing::warn!(
                    "--duration ran out {} s ago: cutting {left} sessions still waiting ({})",
                    STOP_GRACE.as_secs(),
                    stats.phases()
                );
                stats.sessions_cut.fetch_add(left, Relaxed);
                tasks.shutdown().await;
                return false;
            }
        }
    }
}

/// Progress on stderr while the replay runs: a bar on a terminal, a line
/// every ten seconds otherwise.
fn spawn_progress(
    opts: &Options,
    meta: &Meta,
    stats: Arc<Stats>,
    started: Instant,
) -> Option<tokio::task::JoinHandle<()>> {
    if !opts.progress {
        return None;
    }
    let tty = std::io::stderr().is_terminal();
    let total = (!opts.looped).then_some(meta.recorded_statements);
    Some(tokio::spawn(async move {
        let bar = match (tty, total) {
            (true, Some(t)) => indicatif::ProgressBar::new(t),
            (true, None) => indicatif::ProgressBar::new_spinner(),
            (false, _) => indicatif::ProgressBar::hidden(),
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} statements  {msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        let mut last = (Instant::now(), 0u64);
        let mut since_line = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let done = stats.statements.load(Relaxed);
            let dt = last.0.elapsed().as_secs_f64();
            let rate = if dt > 0.0 {
                (done - last.1) as f64 / dt
            } else {
                0.0
            };
            last = (Instant::now(), done);
            let msg = format!(
                "{rate:.0}/s  sessions {}  errors {}",
                stats.sessions_started.load(Relaxed),
                stats.errors_total.load(Relaxed)
            );
            bar.set_position(done);
            bar.set_message(msg.clone());
            if !tty && since_line.elapsed() >= Duration::from_secs(10) {
                since_line = Instant::now();
                eprintln!(
                    "replay: {:.0} s, {done} statements, {msg}",
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }))
}

/// A session's messages, and the dispatcher's count of queued bytes.
struct Queue {
    rx: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicU64>,
    /// Sessions to wait for before starting.
    after: Vec<tokio::sync::watch::Receiver<bool>>,
    _done: Done,
}

/// Tells the sessions waiting for this one that it has finished, however
/// its task ends.
struct Done(tokio::sync::watch::Sender<bool>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

impl Queue {
    async fn recv(&mut self) -> Option<Bytes> {
        let f = self.rx.recv().await?;
        self.queued.fetch_sub(f.len() as u64, Relaxed);
        Some(f)
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // What the session never took is no longer queued.
        self.rx.close();
        while let Ok(f) = self.rx.try_recv() {
            self.queued.fetch_sub(f.len() as u64, Relaxed);
        }
    }
}

/// Where a session's current request stands.
#[derive(Default)]
struct Request {
    started: Option<Instant>,
    sql: Option<Arc<str>>,
    statements: u64,
    /// The request holds a simple Query (a COPY it starts ends at CopyDone).
    simple: bool,
}

/// Replays one session: logs in, sends its messages in order, and after
/// each one that asks for an answer (Sync, Query, FunctionCall, the end of
/// a simple-protocol COPY) reads up to ReadyForQuery.
async fn run_session(
    target: Arc<Target>,
    params: Vec<(String, String)>,
    mut rx: Queue,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    // A csvlog has the COPY statement but not its data.
    no_copy_data: bool,
) {
    let mut phase = stats.enter(Phase::EarlierSessions);
    for mut before in std::mem::take(&mut rx.after) {
        // An error means the other task is gone: finished too.
        let _ = before.wait_for(|done| *done).await;
    }
    if stop.load(Relaxed) {
        return; // --duration ran out while it waited
    }
    phase.set(Phase::Login);
    let startup = target.startup(&params);
    let (stream, leftover) = match target.connect(&startup).await {
        Ok(s) => s,
        Err(why) => {
            stats.connect_failed(&why);
            return;
        }
    };
    stats.sessions_started.fetch_add(1, Relaxed);
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut answers = Answers::new(leftover);
    let mut out = BytesMut::with_capacity(8192);
    // Statement and portal names to SQL text, for the fingerprints.
    let mut statements: HashMap<Bytes, Arc<str>> = HashMap::new();
    let mut portals: HashMap<Bytes, Arc<str>> = HashMap::new();
    let mut req = Request::default();
    let mut errors = Vec::new();
    let mut copying = false;
    let mut terminated = false;
    loop {
        // Waiting for the next frame, the session still notices that
        // --duration ran out (its input may never end).
        phase.set(Phase::Input);
        let frame = match tokio::time::timeout(STOP_CHECK, rx.recv()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) if stop.load(Relaxed) => break,
            Err(_) => continue,
        };
        if stop.load(Relaxed) {
            break;
        }
        let tag = frame.first().copied().unwrap_or(0);
        let body = frame.slice(5.min(frame.len())..);
        let mut wait = false;
        match tag {
            b'Q' => {
                req.sql = Some(cstr_text(&body, 0));
                req.statements += 1;
                req.simple = true;
                wait = true;
            }
            b'P' => {
                if let Some((name, rest)) = split_cstr(&body) {
                    if statements.len() < 100_000 || statements.contains_key(&name) {
                        statements.insert(name, cstr_text(&rest, 0));
                    }
                }
            }
            b'B' => {
                if let Some((portal, rest)) = split_cstr(&body) {
                    if let Some((stmt, _)) = split_cstr(&rest) {
                        if let Some(sql) = statements.get(&stmt) {
                            if portals.len() < 100_000 || portals.contains_key(&portal) {
                                portals.insert(portal, Arc::clone(sql));
                            }
                        }
                    }
                }
            }
            b'E' => {
                if let Some((portal, _)) = split_cstr(&body) {
                    req.sql = portals.get(&portal).cloned();
                }
                req.statements += 1;
            }
            b'F' => {
                req.statements += 1;
                wait = true;
            }
            b'S' => wait = !copying,
            b'c' | b'f' => {
                copying = false;
                wait = req.simple;
            }
            b'X' => terminated = true,
            _ => {}
        }
        req.started.get_or_insert_with(Instant::now);
        out.extend_from_slice(&frame);
        if !wait && !terminated && out.len() < 64 << 10 {
            continue;
        }
        phase.set(Phase::Sending);
        // Flushed: a TLS stream may hold what it could not send yet.
        if send_all(&mut wr, &out).await.is_err() {
            stats.sessions_lost.fetch_add(1, Relaxed);
            return;
        }
        out.clear();
        if terminated {
            break;
        }
        if !wait {
            continue;
        }
        phase.set(Phase::Answer);
        match answers.until_ready(&mut rd, &mut errors).await {
            Ok(Answer::Ready) => {
                let micros = req.started.map_or(0, |s| s.elapsed().as_micros() as u64);
                stats.request(micros, req.sql.as_deref(), req.statements, &errors);
                errors.clear();
                req = Request::default();
            }
            Ok(Answer::CopyIn) if no_copy_data => {
                // Fail the COPY at once (its error is expected, not counted).
                stats.copy_skipped.fetch_add(1, Relaxed);
                let mut fail = BytesMut::new();
                crate::protocol::message::put_message(
                    &mut fail,
                    b'f',
                    &[b"no COPY data in the log being replayed\0"],
                );
                let mut ignored = Vec::new();
                let ok = send_all(&mut wr, &fail).await.is_ok()
                    && answers.until_ready(&mut rd, &mut ignored).await.is_ok();
                if !ok {
                    stats.sessions_lost.fetch_add(1, Relaxed);
                    return;
                }
                let micros = req.started.map_or(0, |s| s.elapsed().as_micros() as u64);
                stats.request(micros, req.sql.as_deref(), req.statements, &errors);
                errors.clear();
                req = Request::default();
            }
            Ok(Answer::CopyIn) => copying = true,
            Err(_) => {
                stats.sessions_lost.fetch_add(1, Relaxed);
                return;
            }
        }
    }
    if !terminated {
        let _ = send_all(&mut wr, b"X\0\0\0\x04").await;
    }
    let _ = wr.shutdown().await;
}

/// Splits a NUL-terminated string off the front.
fn split_cstr(b: &Bytes) -> Option<(Bytes, Bytes)> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((b.slice(..end), b.slice(end + 1..)))
}

fn cstr_text(b: &[u8], from: usize) -> Arc<str> {
    let b = b.get(from..).unwrap_or_default();
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    Arc::from(String::from_utf8_lossy(&b[..end]).as_ref())
}
