//! What a replay measured, and how it is shown: text for people, `--json`
//! for machines.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Distinct statement fingerprints tracked; later ones count as "other".
const MAX_FINGERPRINTS: usize = 10_000;
/// Fingerprints listed as the slowest.
const SLOWEST: usize = 10;

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 hour at 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| unreachable!("valid histogram bounds"))
}

struct Shape {
    text: String,
    latency: Histogram<u64>,
}

/// Counters the session tasks update as they go.
pub struct Stats {
    pub statements: AtomicU64,
    pub requests: AtomicU64,
    pub errors_total: AtomicU64,
    pub sessions_started: AtomicU64,
    pub sessions_failed: AtomicU64,
    /// Sessions whose connection broke mid-replay.
    pub sessions_lost: AtomicU64,
    /// Sessions ended unfinished after `--duration` and its grace.
    pub sessions_cut: AtomicU64,
    /// Session tasks in each phase right now (index: `Phase as usize`),
    /// for saying what the cut sessions were waiting for.
    in_phase: [AtomicU64; Phase::ALL.len()],
    /// The dispatcher had to pause reading (see `MAX_QUEUED_BYTES`).
    pub dispatch_paused: std::sync::atomic::AtomicBool,
    /// COPY FROM STDIN statements failed on purpose (csvlog: no data).
    pub copy_skipped: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    shapes: Mutex<HashMap<String, Shape>>,
    errors: Mutex<BTreeMap<String, u64>>,
    connect_errors: Mutex<BTreeMap<String, u64>>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            statements: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            errors_total: AtomicU64::new(0),
            sessions_started: AtomicU64::new(0),
            sessions_failed: AtomicU64::new(0),
            sessions_lost: AtomicU64::new(0),
            sessions_cut: AtomicU64::new(0),
            in_phase: Default::default(),
            dispatch_paused: std::sync::atomic::AtomicBool::new(false),
            copy_skipped: AtomicU64::new(0),
            latency: Mutex::new(histogram()),
            shapes: Mutex::new(HashMap::new()),
            errors: Mutex::new(BTreeMap::new()),
            connect_errors: Mutex::new(BTreeMap::new()),
        }
    }
}

/// What a session task is waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Sessions that ended before it started, as recorded.
    EarlierSessions,
    /// Its connection and login.
    Login,
    /// Its next message from the input.
    Input,
    /// The server to take what it sent.
    Sending,
    /// The server's answer.
    Answer,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::EarlierSessions,
        Phase::Login,
        Phase::Input,
        Phase::Sending,
        Phase::Answer,
    ];

    fn name(self) -> &'static str {
        match self {
            Phase::EarlierSessions => "earlier sessions to end",
            Phase::Login => "login",
            Phase::Input => "input",
            Phase::Sending => "the server to take a request",
            Phase::Answer => "an answer",
        }
    }
}

/// A session task's current phase, counted in `Stats` while it lasts.
pub struct InPhase<'a> {
    stats: &'a Stats,
    phase: Phase,
}

impl InPhase<'_> {
    pub fn set(&mut self, phase: Phase) {
        if phase != self.phase {
            self.stats.in_phase[self.phase as usize].fetch_sub(1, Relaxed);
            self.stats.in_phase[phase as usize].fetch_add(1, Relaxed);
            self.phase = phase;
        }
    }
}

impl Drop for InPhase<'_> {
    fn drop(&mut self) {
        self.stats.in_phase[self.phase as usize].fetch_sub(1, Relaxed);
    }
}

impl Stats {
    /// Counts a session task in `phase` until the returned guard moves it
    /// on or is dropped.
    pub fn enter(&self, phase: Phase) -> InPhase<'_> {
        self.in_phase[phase as usize].fetch_add(1, Relaxed);
        InPhase { stats: self, phase }
    }

    /// The session tasks in each phase that has any, e.g. "2 waiting for
    /// an answer".
    pub fn phases(&self) -> String {
        let mut out = Vec::new();
        for p in Phase::ALL {
            let n = self.in_phase[p as usize].load(Relaxed);
            if n > 0 {
                out.push(format!("{n} waiting for {}", p.name()));
            }
        }
        out.join(", ")
    }

    /// One request answered (up to ReadyForQuery): its latency, the SQL it
    /// ran (the last statement of the request), how many statements it
    /// held and the SQLSTATEs of its errors.
    pub fn request(&self, micros: u64, sql: Option<&str>, statements: u64, errors: &[String]) {
        self.requests.fetch_add(1, Relaxed);
        self.statements.fetch_add(statements, Relaxed);
        let micros = micros.max(1);
        let _ = self
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(micros);
        if let Some(sql) = sql {
            let key = crate::classify::lexer::shape_key(sql).unwrap_or_else(|| sql.to_string());
            let mut shapes = self.shapes.lock().unwrap_or_else(|p| p.into_inner());
            let key = if shapes.len() >= MAX_FINGERPRINTS && !shapes.contains_key(&key) {
                "other".to_string()
            } else {
                key
            };
            let shape = shapes.entry(key).or_insert_with(|| Shape {
                text: one_line(sql, 120),
                latency: histogram(),
            });
            let _ = shape.latency.record(micros);
        }
        if !errors.is_empty() {
            self.errors_total.fetch_add(errors.len() as u64, Relaxed);
            let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
            for code in errors {
                *e.entry(code.clone()).or_default() += 1;
            }
        }
    }

    pub fn connect_failed(&self, why: &str) {
        self.sessions_failed.fetch_add(1, Relaxed);
        *self
            .connect_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(one_line(why, 200))
            .or_default() += 1;
    }

    pub fn report(&self, meta: Meta, elapsed_s: f64) -> ReplayReport {
        let latency = Latency::of(&self.latency.lock().unwrap_or_else(|p| p.into_inner()));
        let shapes = self.shapes.lock().unwrap_or_else(|p| p.into_inner());
        let mut slowest: Vec<Fingerprint> = shapes
            .values()
            .map(|s| Fingerprint {
                text: s.text.clone(),
                count: s.latency.len(),
                latency_ms: Latency::of(&s.latency),
            })
            .collect();
        slowest.sort_by(|a, b| b.latency_ms.p99.total_cmp(&a.latency_ms.p99));
        slowest.truncate(SLOWEST);
        let statements = self.statements.load(Relaxed);
        let achieved = if elapsed_s > 0.0 {
            statements as f64 / elapsed_s
        } else {
            0.0
        };
        let recorded = if meta.recorded_s > 0.0 {
            meta.recorded_statements as f64 / meta.recorded_s
        } else {
            0.0
        };
        ReplayReport {
            sessions: Sessions {
                in_capture: meta.sessions,
                started: self.sessions_started.load(Relaxed),
                failed_to_connect: self.sessions_failed.load(Relaxed),
                lost: self.sessions_lost.load(Relaxed),
                cut: self.sessions_cut.load(Relaxed),
            },
            statements,
            requests: self.requests.load(Relaxed),
            elapsed_s,
            rate: Rate {
                achieved_per_s: achieved,
                recorded_per_s: recorded,
                ratio: if recorded > 0.0 {
                    achieved / recorded
                } else {
                    0.0
                },
            },
            latency_ms: latency,
            slowest,
            errors_total: self.errors_total.load(Relaxed),
            dispatch_paused: self.dispatch_paused.load(Relaxed),
            copy_skipped: self.copy_skipped.load(Relaxed),
            errors_by_sqlstate: self
                .errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            connect_errors: self
                .connect_errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            meta,
        }
    }
}

fn one_line(s: &str, max: usize) -> String {
    let mut out: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if out.len() > max {
        let mut cut = max;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// What the replay was asked to do and what the input held.
#[derive(Debug, Clone, Serialize)]
pub struct Meta {
    pub input: String,
    pub format: String,
    pub server: String,
    pub speed: String,
    pub passes: u64,
    /// Sessions and statements in the input (after `--sessions`), and the
    /// time from its first to its last event.
    pub sessions: u64,
    pub recorded_statements: u64,
    pub recorded_s: f64,
    /// The capture's parameters were redacted when recorded.
    pub redacted: bool,
}

#[derive(Debug, Serialize)]
pub struct ReplayReport {
    pub meta: Meta,
    pub sessions: Sessions,
    pub statements: u64,
    pub requests: u64,
    pub elapsed_s: f64,
    pub rate: Rate,
    pub latency_ms: Latency,
    pub slowest: Vec<Fingerprint>,
    pub errors_total: u64,
    /// Reading paused because sessions fell far behind the input.
    pub dispatch_paused: bool,
    /// COPY FROM STDIN statements a csvlog holds without their data:
    /// failed on purpose with CopyFail, not counted as errors.
    pub copy_skipped: u64,
    pub errors_by_sqlstate: BTreeMap<String, u64>,
    pub connect_errors: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct Sessions {
    pub in_capture: u64,
    pub started: u64,
    pub failed_to_connect: u64,
    pub lost: u64,
    /// Still waiting (on the server, mostly) when `--duration` and its
    /// grace ran out: ended without their answer.
    pub cut: u64,
}

#[derive(Debug, Serialize)]
pub struct Rate {
    pub achieved_per_s: f64,
    pub recorded_per_s: f64,
    pub ratio: f64,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Self {
                p50: 0.0,
                p95: 0.0,
                p99: 0.0,
                max: 0.0,
                mean: 0.0,
            };
        }
        Self {
            p50: ms(h.value_at_quantile(0.50)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Fingerprint {
    pub text: String,
    pub count: u64,
    pub latency_ms: Latency,
}

impl ReplayReport {
    /// Whether the replay ran cleanly: every session connected and
    /// stayed connected, and no statement failed.
    pub fn clean(&self) -> bool {
        self.errors_total == 0 && self.sessions.failed_to_connect == 0 && self.sessions.lost == 0
    }

    pub fn text(&self) -> String {
        use std::fmt::Write;
        let m = &self.meta;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "replayed {} ({}) against {} at speed {}{}",
            m.input,
            m.format,
            m.server,
            m.speed,
            if m.passes > 1 {
                format!(", {} passes", m.passes)
            } else {
                String::new()
            }
        );
        if m.redacted {
            let _ = writeln!(
                s,
                "note: the capture's parameters were redacted (sent as NULL)"
            );
        }
        let _ = writeln!(
            s,
            "sessions: {} in the input, {} started, {} failed to connect, {} lost mid-replay{}",
            self.sessions.in_capture,
            self.sessions.started,
            self.sessions.failed_to_connect,
            self.sessions.lost,
            if self.sessions.cut > 0 {
                format!(", {} cut unfinished at the end", self.sessions.cut)
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            s,
            "statements: {} in {} requests, {:.1} s (recorded: {} in {:.1} s)",
            self.statements, self.requests, self.elapsed_s, m.recorded_statements, m.recorded_s
        );
        let _ = writeln!(
            s,
            "rate: {:.0} statements/s achieved, {:.0}/s recorded ({:.2}x)",
            self.rate.achieved_per_s, self.rate.recorded_per_s, self.rate.ratio
        );
        let l = &self.latency_ms;
        let _ = writeln!(
            s,
            "latency (request to ReadyForQuery), ms: p50 {:.3}  p95 {:.3}  p99 {:.3}  max {:.3}  mean {:.3}",
            l.p50, l.p95, l.p99, l.max, l.mean
        );
        if !self.slowest.is_empty() {
            let _ = writeln!(s, "slowest fingerprints (by p99), ms:");
            let _ = writeln!(
                s,
                "  {:>9} {:>9} {:>9} {:>9} {:>9}  statement",
                "count", "p50", "p95", "p99", "max"
            );
            for f in &self.slowest {
                let l = &f.latency_ms;
                let _ = writeln!(
                    s,
                    "  {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3}  {}",
                    f.count, l.p50, l.p95, l.p99, l.max, f.text
                );
            }
        }
        if self.errors_by_sqlstate.is_empty() {
            let _ = writeln!(s, "errors: none");
        } else {
            let list: Vec<String> = self
                .errors_by_sqlstate
                .iter()
                .map(|(c, n)| format!("{c} ×{n}"))
                .collect();
            let _ = writeln!(s, "errors by SQLSTATE: {}", list.join(", "));
        }
        if self.copy_skipped > 0 {
            let _ = writeln!(
                s,
                "COPY FROM STDIN skipped (no data in a csvlog): {}",
                self.copy_skipped
            );
        }
        if self.dispatch_paused {
            let _ = writeln!(s, "note: sessions fell so far behind that reading the input paused (timing between sessions was not kept)");
        }
        for (why, n) in &self.connect_errors {
            let _ = writeln!(s, "connect failures ×{n}: {why}");
        }
        s
    }
}
