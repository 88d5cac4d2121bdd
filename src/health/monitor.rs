//! The failback state machine, on its own thread.
//!
//! ```text
//!   healthy --rule trips--> tripped --cooldown, checks pass--> probing
//!      ^                       ^                                 |  |
//!      |                       +---------rule trips--------------+  |
//!      +------------ ramped back to routing.read_percent -----------+
//! ```
//!
//! Tripped: the target gets no reads (or, in per-fingerprint mode, the
//! blamed shapes get none), through a cap on routing (`RoutingCap`, which
//! `failback` turns into `router::Limit`); `read_percent` stays
//! as configured. Probing: the cap is `probe_percent`, doubled every
//! `step_s` while the rules stay quiet. With `recovery = "manual"` the
//! machine stays tripped until `POST /resume` lifts the cap. Every
//! transition is audited (rule, measured values, thresholds, windows)
//! before it applies, with a new epoch, like any routing change.
//!
//! A rule "trips" only once its breach has held (`SUSTAIN_TICKS`): one
//! tick's worth of bad luck in a window of few samples is not a failing
//! target.
//!
//! A tick is two halves: `Monitor::decide`, a pure function of the
//! windows, the settings, what the monitor reads from the rest of the
//! proxy (`Outside`) and the time it is given, which returns a `Decision`
//! (a new cap on routing, what to audit, the next state); and the effects
//! (`Monitor::tick` turns the decision into a routing cap and audit
//! evidence; the monitor thread in `failback` applies them and then
//! `commit`s). This module knows neither the proxy nor the router: what it
//! reads of them comes in as `Outside`, what it asks of them goes out as a
//! `Change`. The unit tests below drive `decide` with synthetic samples and
//! `Instant`s.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::rules::{self, Breach, Inputs};
use super::window::Window;
use super::{Db, Fault, Health, Sample, SampleKind};
use crate::config::{FailbackConfig, Recovery};

/// How often the monitor looks: reads leave a tripped target within this
/// (plus the rules' own time) of the window crossing a threshold.
pub const TICK: Duration = Duration::from_millis(100);

/// A breach of a rule on the windows (`error_rate`, `p95`, `p95_ratio`)
/// trips only when it has held on this many consecutive ticks (half a
/// second) *and* the target's window took in at least `min_samples` more
/// samples of the kind the rule measures (requests for the error rate,
/// served reads for the latency rules) since the breach began. So a
/// handful of slow or failed requests among the first ones in a window
/// (a session's first routed read waiting for its target login, say)
/// cannot trip: they must still breach the rule after another
/// `min_samples` samples, and a window frozen by a stall (no new samples)
/// cannot trip either. `mirror_lag` needs the ticks only (it is one
/// gauge); `health_check` trips at once (`check_failures` failed checks in
/// a row are persistence already). While tripped, any breach (held or not)
/// restarts the cooldown; while probing, any breach holds the next step and
/// a held one trips again.
pub const SUSTAIN_TICKS: u32 = 5;

/// Which reads a failback covers.
#[derive(Debug, Clone, PartialEq)]
pub enum Scope {
    All,
    Shapes(HashSet<u64>),
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Healthy,
    Tripped {
        since: Instant,
        scope: Scope,
        rule: String,
    },
    Probing {
        since: Instant,
        percent: f64,
        scope: Scope,
        rule: String,
    },
}

/// What a tick reads from outside the health monitor.
#[derive(Debug, Clone)]
pub struct Outside {
    /// `routing.read_percent` as configured.
    pub read_percent: f64,
    /// The share of reads routed now, with any cap applied.
    pub effective_percent: f64,
    /// No health cap in force: none was set, or a resume lifted it.
    pub uncapped: bool,
    /// There is a target to route to.
    pub has_target: bool,
    /// The mirror's lag, when there is a mirror.
    pub mirror_lag_ms: Option<i64>,
    /// Failed health checks of the target in a row.
    pub check_failures: u32,
}

impl Outside {
    fn mirror_lag_s(&self) -> Option<f64> {
        self.mirror_lag_ms.map(|ms| ms as f64 / 1000.0)
    }
}

/// The cap on routing a change asks for (`failback` makes it a
/// `router::Limit`).
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingCap {
    /// The most of the eligible reads that may go to the target.
    pub percent: f64,
    /// Only these statement shapes are capped; `None`: every read.
    pub shapes: Option<HashSet<u64>>,
    /// Why, for status and the audit log.
    pub why: String,
}

/// The cap on the target's share a decision sets.
#[derive(Debug, Clone, PartialEq)]
struct Cap {
    percent: f64,
    scope: Scope,
}

/// How long a breach held before it tripped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    ticks: u32,
    /// Samples of the rule's kind the target's window took in since the
    /// breach began.
    new_samples: u64,
}

/// A transition one tick decided on: the pure part, before any effect.
#[derive(Debug, Clone, PartialEq)]
struct Decision {
    /// `failback_trip`, `failback_probe`, `failback_step` or
    /// `failback_recovered` (the audit entry's kind).
    kind: &'static str,
    /// The cap from now on; `None` lifts it.
    cap: Option<Cap>,
    /// A trip's rule, or the rule of the trip being recovered from.
    rule: String,
    /// A trip's held breaches, the first one named; empty otherwise.
    breaches: Vec<Breach>,
    /// A trip: what the machine was doing ("healthy", "tripped", "probing
    /// at 20%").
    during: String,
    /// A trip: how long its first breach held.
    held: Option<Held>,
    /// A recovery: the last share before the cap was lifted.
    after_percent: Option<f64>,
    /// The state once the change is applied.
    then: Phase,
    /// The target's window starts afresh once applied: what follows is
    /// judged on fresh samples only.
    clear_target: bool,
}

impl Decision {
    fn is_trip(&self) -> bool {
        self.kind == "failback_trip"
    }
}

/// A routing change a tick decided on. It is applied (audited, with an
/// fsync) after the state lock is released, so `/status` never waits on
/// the disk.
pub struct Change {
    decision: Decision,
    /// The cap from now on; `None` lifts it.
    pub cap: Option<RoutingCap>,
    /// The audit entry's evidence.
    pub extra: serde_json::Value,
    /// A trip: applied before it is audited, and even when the audit log
    /// cannot be written (the application comes first; logged loudly).
    pub force: bool,
}

impl Change {
    /// The audit entry's kind (`failback_trip`, `failback_probe`, ...).
    pub fn kind(&self) -> &'static str {
        self.decision.kind
    }
}

/// A rule's run of breaching ticks.
#[derive(Debug, Clone, Copy)]
struct Streak {
    ticks: u32,
    /// `Taken` of the rule's kind at the run's first tick.
    taken_at_start: u64,
}

/// Samples the target's window ever took in (never decreases).
#[derive(Debug, Clone, Copy, Default)]
struct Taken {
    requests: u64,
    latencies: u64,
}

impl Taken {
    /// What `rule` rests on; `None` for rules that are not about samples.
    fn of(&self, rule: &str) -> Option<u64> {
        match rule {
            "error_rate" => Some(self.requests),
            "p95" | "p95_ratio" => Some(self.latencies),
            _ => None,
        }
    }
}

/// What the monitor thread keeps (behind `Health::state`).
pub struct Monitor {
    pending: Option<Change>,
    windows: [Window; 2],
    /// The settings the windows were built for.
    built: (u64, bool),
    phase: Phase,
    /// The source's p95 from the last window with enough source reads.
    source_baseline: Option<(f64, Instant)>,
    last_trip: Option<serde_json::Value>,
    trips: u64,
    spare: Vec<Sample>,
    /// The rules breaching now, and since when.
    streaks: HashMap<&'static str, Streak>,
    taken: Taken,
}

impl Monitor {
    pub fn new(cfg: &FailbackConfig) -> Self {
        let len = Duration::from_secs(cfg.window_s);
        Self {
            pending: None,
            windows: [
                Window::new(len, false),
                Window::new(len, cfg.per_fingerprint),
            ],
            built: (cfg.window_s, cfg.per_fingerprint),
            phase: Phase::Healthy,
            source_baseline: None,
            last_trip: None,
            trips: 0,
            spare: Vec::new(),
            streaks: HashMap::new(),
            taken: Taken::default(),
        }
    }

    fn state_name(&self) -> &'static str {
        match self.phase {
            Phase::Healthy => "healthy",
            Phase::Tripped { .. } => "tripped",
            Phase::Probing { .. } => "probing",
        }
    }

    /// A resume through the API lifted the cap: start afresh.
    pub fn resumed(&mut self) {
        if self.phase != Phase::Healthy {
            info!("failback lifted by resume; the health monitor starts afresh");
        }
        self.phase = Phase::Healthy;
        self.windows[Db::Target as usize].clear();
        self.streaks.clear();
    }

    /// New windows when their settings changed.
    fn fit(&mut self, cfg: &FailbackConfig) {
        if self.built != (cfg.window_s, cfg.per_fingerprint) {
            let len = Duration::from_secs(cfg.window_s);
            self.windows = [
                Window::new(len, false),
                Window::new(len, cfg.per_fingerprint),
            ];
            self.built = (cfg.window_s, cfg.per_fingerprint);
        }
    }

    /// One sample into its backend's window.
    fn add(&mut self, now: Instant, s: &Sample) {
        self.windows[s.backend as usize].add(now, s);
        if s.backend == Db::Target {
            self.taken.requests += 1;
            if s.latency_us > 0 {
                self.taken.latencies += 1;
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        for w in &mut self.windows {
            w.expire(now);
        }
    }

    /// One look: take the samples, update the windows, decide, and leave
    /// the change (if any) in `pending` for the monitor thread to apply
    /// (`take_change`). The caller holds the proxy's change lock.
    pub fn tick(&mut self, health: &Health, outside: &Outside, now: Instant) {
        let cfg = health.settings();
        self.fit(&cfg);
        let m = &health.metrics;
        let mut spare = std::mem::take(&mut self.spare);
        // Counted here and added to the metrics once per label set per
        // tick: resolving a label set per sample cost more than the rest.
        let mut requests = [[0u64; 4]; 2];
        let mut faults = [[0u64; 6]; 2];
        health.recorder.drain(&mut spare, |s| {
            self.add(now, s);
            requests[s.backend as usize][s.kind as usize] += 1;
            if let Some(f) = s.fault {
                faults[s.backend as usize][f as usize] += 1;
            }
        });
        self.spare = spare;
        for b in [Db::Source, Db::Target] {
            for k in SampleKind::ALL {
                let n = requests[b as usize][k as usize];
                if n > 0 {
                    m.requests
                        .get_or_create(&vec![("backend", b.label()), ("kind", k.label())])
                        .inc_by(n);
                }
            }
            for f in Fault::ALL {
                let n = faults[b as usize][f as usize];
                if n > 0 {
                    m.errors
                        .get_or_create(&vec![("backend", b.label()), ("fault", f.label())])
                        .inc_by(n);
                }
            }
        }
        let dropped = health
            .recorder
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed);
        m.samples_dropped
            .inc_by(dropped.saturating_sub(m.samples_dropped.get()));
        self.expire(now);
        for b in [Db::Source, Db::Target] {
            let t = self.windows[b as usize].totals();
            let l = vec![("backend", b.label())];
            m.window_p95_us
                .get_or_create(&l)
                .set(t.quantile_ms(0.95).map_or(0, |ms| (ms * 1000.0) as i64));
            m.window_error_ppm
                .get_or_create(&l)
                .set((t.error_rate() * 1e6) as i64);
        }

        let decision = self.decide(&cfg, outside, now);
        m.state.set(match self.phase {
            Phase::Healthy => 0,
            Phase::Tripped { .. } => 1,
            Phase::Probing { .. } => 2,
        });
        m.read_cap.set((outside.effective_percent * 100.0) as i64);
        self.pending = decision.map(|d| self.change(health, &cfg, outside, d));
    }

    /// The change the last tick decided on, for the monitor thread.
    pub fn take_change(&mut self) -> Option<Change> {
        self.pending.take()
    }

    /// The pure half of a tick: from the windows (already fed and expired
    /// up to `now`), the settings and what the rest of the proxy says, the
    /// transition to make, if any. It updates the source baseline and the
    /// breach streaks, notices a resume, and restarts a cooldown that a
    /// breach interrupts; every other change of state waits for `commit`
    /// (`settle`), once the decision has been applied.
    fn decide(&mut self, cfg: &FailbackConfig, out: &Outside, now: Instant) -> Option<Decision> {
        let source = self.windows[Db::Source as usize].totals();
        if source.latency.len() >= cfg.min_samples {
            self.source_baseline = source.quantile_ms(0.95).map(|p| (p, now));
        }
        let stale = Duration::from_secs(cfg.window_s * 10);
        if self
            .source_baseline
            .is_some_and(|(_, at)| now.saturating_duration_since(at) > stale)
        {
            self.source_baseline = None;
        }
        if self.phase != Phase::Healthy && out.uncapped {
            self.resumed();
        }
        if !cfg.enabled || !out.has_target {
            self.streaks.clear();
            return None;
        }
        let inputs = Inputs {
            target: self.windows[Db::Target as usize].totals(),
            source_p95_ms: self.source_baseline.map(|(p, _)| p),
            mirror_lag_s: out.mirror_lag_s(),
            check_failures: out.check_failures,
        };
        let breaches = rules::evaluate(cfg, &inputs);
        let (held, first_held) = hold(&mut self.streaks, self.taken, cfg, &breaches);
        let checks_ok = out.check_failures == 0;
        match self.phase.clone() {
            Phase::Healthy => {
                if !held.is_empty() {
                    let scope = self.scope_for(cfg, &held, &inputs, None);
                    return Some(trip(held, first_held, scope, "healthy".into(), now));
                }
            }
            Phase::Tripped { since, scope, rule } => {
                if !breaches.is_empty() {
                    // Still failing (checks, the mirror, or in per-shape
                    // mode the other shapes): widen the scope if a held
                    // breach needs it, and the cooldown starts again.
                    if let (Scope::Shapes(have), false) = (&scope, held.is_empty()) {
                        let wider = self.scope_for(cfg, &held, &inputs, Some(have));
                        if wider != scope {
                            return Some(trip(held, first_held, wider, "tripped".into(), now));
                        }
                    }
                    self.phase = Phase::Tripped {
                        since: now,
                        scope,
                        rule,
                    };
                } else if cfg.recovery == Recovery::Auto
                    && checks_ok
                    && now.saturating_duration_since(since) >= Duration::from_secs(cfg.cooldown_s)
                {
                    let percent = cfg.probe_percent.min(out.read_percent);
                    return Some(step("failback_probe", percent, scope, rule, now));
                }
            }
            Phase::Probing {
                since,
                percent,
                scope,
                rule,
            } => {
                if !held.is_empty() {
                    let during = format!("probing at {percent}%");
                    let scope = match scope {
                        Scope::All => Scope::All,
                        Scope::Shapes(have) => {
                            match self.scope_for(cfg, &held, &inputs, Some(&have)) {
                                Scope::Shapes(s) => {
                                    Scope::Shapes(s.union(&have).copied().collect())
                                }
                                Scope::All => Scope::All,
                            }
                        }
                    };
                    return Some(trip(held, first_held, scope, during, now));
                } else if breaches.is_empty()
                    && checks_ok
                    && now.saturating_duration_since(since) >= Duration::from_secs(cfg.step_s)
                {
                    let next = percent * 2.0;
                    if next >= out.read_percent {
                        return Some(Decision {
                            kind: "failback_recovered",
                            cap: None,
                            rule,
                            breaches: Vec::new(),
                            during: String::new(),
                            held: None,
                            after_percent: Some(percent),
                            then: Phase::Healthy,
                            clear_target: false,
                        });
                    }
                    return Some(step("failback_step", next, scope, rule, now));
                }
            }
        }
        None
    }

    /// Which reads to fail back: some shapes (per-fingerprint mode, when a
    /// few explain the breaches; joined with those already failed back),
    /// else all.
    fn scope_for(
        &self,
        cfg: &FailbackConfig,
        breaches: &[Breach],
        inputs: &Inputs,
        have: Option<&HashSet<u64>>,
    ) -> Scope {
        if !cfg.per_fingerprint {
            return Scope::All;
        }
        let shapes = self.windows[Db::Target as usize].shapes();
        match rules::blame(cfg, breaches, inputs, &shapes) {
            Some(blamed) => {
                let mut set: HashSet<u64> = blamed.into_iter().collect();
                if let Some(have) = have {
                    set.extend(have);
                }
                if set.len() <= cfg.max_fingerprints {
                    Scope::Shapes(set)
                } else {
                    Scope::All
                }
            }
            None => Scope::All,
        }
    }

    /// The effects' half: the routing settings a decision asks for, and
    /// the evidence its audit entry carries.
    fn change(&self, health: &Health, cfg: &FailbackConfig, out: &Outside, d: Decision) -> Change {
        let cap = d.cap.as_ref().map(|cap| RoutingCap {
            percent: cap.percent,
            shapes: match &cap.scope {
                Scope::All => None,
                Scope::Shapes(s) => Some(s.clone()),
            },
            why: if d.is_trip() {
                format!("tripped: {}", d.rule)
            } else {
                format!("probing after {}", d.rule)
            },
        });
        let target_window = self.windows[Db::Target as usize].totals().to_json();
        let extra = match (&d.cap, d.breaches.first()) {
            (Some(cap), Some(first)) if d.is_trip() => serde_json::json!({
                "rule": first.rule,
                "measured": first.measured,
                "threshold": first.threshold,
                "unit": first.unit,
                "breaches": d.breaches.iter().map(Breach::to_json).collect::<Vec<_>>(),
                "held": d.held.map(|h| serde_json::json!({
                    "ticks": h.ticks, "new_samples": h.new_samples,
                })),
                "scope": scope_json(health, &cap.scope),
                "during": d.during,
                "window_s": cfg.window_s,
                "windows": {
                    "source": self.windows[Db::Source as usize].totals().to_json(),
                    "target": target_window,
                },
                "source_p95_baseline_ms": self.source_baseline.map(|(p, _)| p),
                "mirror_lag_ms": out.mirror_lag_ms,
                "checks": {
                    "target_failures_in_a_row": out.check_failures,
                },
                "recovery": cfg.recovery,
            }),
            (Some(cap), _) => serde_json::json!({
                "percent": cap.percent,
                "tripped_by": d.rule,
                "target_window": target_window,
            }),
            (None, _) => serde_json::json!({
                "after_percent": d.after_percent,
                "tripped_by": d.rule,
                "target_window": target_window,
            }),
        };
        Change {
            force: d.is_trip(),
            decision: d,
            cap,
            extra,
        }
    }

    /// The state follows a change once it is applied.
    pub fn commit(&mut self, health: &Health, c: Change) {
        let Change {
            decision, extra, ..
        } = c;
        if let Some(first) = decision.breaches.first().filter(|_| decision.is_trip()) {
            warn!(rule = first.rule, scope = %extra["scope"], measured = %extra["measured"],
                threshold = %extra["threshold"], "target unhealthy: reads fail back to the source");
            health
                .metrics
                .trips
                .get_or_create(&vec![("rule", first.rule)])
                .inc();
            self.last_trip = Some(extra);
        } else if let Phase::Probing { percent, .. } = &decision.then {
            info!(percent, "failback: probing the target");
        } else {
            info!("failback: the target is back at the configured share");
        }
        self.settle(&decision);
    }

    /// The state part of `commit`.
    fn settle(&mut self, d: &Decision) {
        if d.clear_target {
            self.windows[Db::Target as usize].clear();
        }
        if d.is_trip() {
            self.trips += 1;
        }
        self.phase = d.then.clone();
        self.streaks.clear();
    }

    pub fn status(&self, health: &Health) -> serde_json::Value {
        let cfg = health.settings();
        let now = Instant::now();
        let (since, scope, rule, percent) = match &self.phase {
            Phase::Healthy => (None, None, None, None),
            Phase::Tripped { since, scope, rule } => {
                (Some(*since), Some(scope), Some(rule), Some(0.0))
            }
            Phase::Probing {
                since,
                percent,
                scope,
                rule,
            } => (Some(*since), Some(scope), Some(rule), Some(*percent)),
        };
        let next = match &self.phase {
            Phase::Healthy => None,
            Phase::Tripped { since, .. } => Some(match cfg.recovery {
                Recovery::Manual => "waiting for resume (pgshift ctl resume)".to_string(),
                Recovery::Auto => {
                    let left = Duration::from_secs(cfg.cooldown_s)
                        .saturating_sub(now.saturating_duration_since(*since));
                    format!(
                        "probe at {}% in {} s (once checks pass)",
                        cfg.probe_percent,
                        left.as_secs()
                    )
                }
            }),
            Phase::Probing { since, percent, .. } => {
                let left = Duration::from_secs(cfg.step_s)
                    .saturating_sub(now.saturating_duration_since(*since));
                Some(format!(
                    "next step from {percent}% in {} s if quiet",
                    left.as_secs()
                ))
            }
        };
        let mut breaching: Vec<_> = self
            .streaks
            .iter()
            .map(|(rule, s)| serde_json::json!({"rule": rule, "ticks": s.ticks}))
            .collect();
        breaching.sort_by(|a, b| a["rule"].as_str().cmp(&b["rule"].as_str()));
        serde_json::json!({
            "enabled": cfg.enabled,
            "state": self.state_name(),
            "rule": rule,
            "scope": scope.map(|s| scope_json(health, s)),
            "cap_percent": percent,
            "for_s": since.map(|s| now.saturating_duration_since(s).as_secs_f64()),
            "next": next,
            "recovery": cfg.recovery,
            "trips": self.trips,
            // Rules breaching now that have not held long enough to trip.
            "breaching": breaching,
            "last_trip": self.last_trip,
            "window_s": cfg.window_s,
            "windows": {
                "source": self.windows[Db::Source as usize].totals().to_json(),
                "target": self.windows[Db::Target as usize].totals().to_json(),
            },
            "source_p95_baseline_ms": self.source_baseline.map(|(p, _)| p),
        })
    }
}

fn scope_json(health: &Health, scope: &Scope) -> serde_json::Value {
    match scope {
        Scope::All => "all reads".into(),
        Scope::Shapes(s) => {
            let mut v: Vec<_> = s.iter().copied().collect();
            v.sort_unstable();
            v.into_iter()
                .map(|h| serde_json::json!({"shape": format!("{h:016x}"), "query": health.shape_name(h)}))
                .collect()
        }
    }
}

/// Counts this tick's breaches into their streaks (a rule quiet on this
/// tick starts over); returns the breaches that held (see
/// `SUSTAIN_TICKS`), in `rules::evaluate`'s order, and how long the first
/// of them held.
fn hold(
    streaks: &mut HashMap<&'static str, Streak>,
    taken: Taken,
    cfg: &FailbackConfig,
    breaches: &[Breach],
) -> (Vec<Breach>, Option<Held>) {
    streaks.retain(|rule, _| breaches.iter().any(|b| b.rule == *rule));
    let mut held = Vec::new();
    let mut first = None;
    for b in breaches {
        let taken_now = taken.of(b.rule);
        let s = streaks.entry(b.rule).or_insert(Streak {
            ticks: 0,
            taken_at_start: taken_now.unwrap_or(0),
        });
        s.ticks += 1;
        let new_samples = taken_now.map_or(0, |t| t.saturating_sub(s.taken_at_start));
        let holds = b.rule == "health_check"
            || (s.ticks >= SUSTAIN_TICKS
                && taken_now.is_none_or(|_| new_samples >= cfg.min_samples));
        if holds {
            first.get_or_insert(Held {
                ticks: s.ticks,
                new_samples,
            });
            held.push(b.clone());
        }
    }
    (held, first)
}

/// A trip on `held` (non-empty): cap `scope` at 0%.
fn trip(
    held: Vec<Breach>,
    first_held: Option<Held>,
    scope: Scope,
    during: String,
    now: Instant,
) -> Decision {
    let rule = held
        .first()
        .map_or_else(String::new, |b| b.rule.to_string());
    Decision {
        kind: "failback_trip",
        cap: Some(Cap {
            percent: 0.0,
            scope: scope.clone(),
        }),
        rule: rule.clone(),
        breaches: held,
        during,
        held: first_held,
        after_percent: None,
        then: Phase::Tripped {
            since: now,
            scope,
            rule,
        },
        clear_target: true,
    }
}

/// A probe or ramp step: cap `scope` at `percent`.
fn step(kind: &'static str, percent: f64, scope: Scope, rule: String, now: Instant) -> Decision {
    Decision {
        kind,
        cap: Some(Cap {
            percent,
            scope: scope.clone(),
        }),
        rule: rule.clone(),
        breaches: Vec::new(),
        during: String::new(),
        held: None,
        after_percent: None,
        then: Phase::Probing {
            since: now,
            percent,
            scope,
            rule,
        },
        // The probe is judged on fresh samples; a step keeps the window.
        clear_target: kind == "failback_probe",
    }
}

#[cfg(test)]
mod tests {
    //! The state machine on synthetic time: samples go straight into the
    //! windows, `now` moves one `TICK` per tick, and each decision is
    //! applied as the monitor thread applies it (the router's cap follows
    //! it, `settle` updates the state).

    use super::*;

    fn cfg() -> FailbackConfig {
        FailbackConfig {
            window_s: 10,
            min_samples: 20,
            max_error_rate: 0.05,
            max_p95_ms: 0.0,
            max_p95_ratio: 0.0,
            ratio_floor_ms: 10.0,
            max_mirror_lag_s: 30.0,
            check_failures: 3,
            recovery: Recovery::Auto,
            cooldown_s: 30,
            probe_percent: 10.0,
            step_s: 10,
            per_fingerprint: false,
            max_fingerprints: 5,
            ..FailbackConfig::default()
        }
    }

    /// Ticks in `secs` seconds.
    fn ticks_in(secs: u64) -> u32 {
        (Duration::from_secs(secs).as_millis() / TICK.as_millis()) as u32
    }

    struct Sim {
        m: Monitor,
        cfg: FailbackConfig,
        out: Outside,
        now: Instant,
        /// The cap the router holds: what the last decision set, or
        /// nothing after a resume.
        cap: Option<Cap>,
    }

    impl Sim {
        fn new(cfg: FailbackConfig, read_percent: f64) -> Self {
            Self {
                m: Monitor::new(&cfg),
                cfg,
                out: Outside {
                    read_percent,
                    uncapped: true,
                    effective_percent: read_percent,
                    has_target: true,
                    mirror_lag_ms: None,
                    check_failures: 0,
                },
                now: Instant::now(),
                cap: None,
            }
        }

        /// `n` reads of `shape` the target served in `ms`, the first
        /// `failed` of them failed (server errors).
        fn target(&mut self, shape: u64, n: u32, ms: u64, failed: u32) {
            for i in 0..n {
                let fault = (i < failed).then_some(Fault::Server);
                let s = Sample::new(Db::Target, SampleKind::Read, fault)
                    .latency(Duration::from_millis(ms))
                    .shape(shape);
                self.m.add(self.now, &s);
            }
        }

        fn source(&mut self, n: u32, ms: u64) {
            for _ in 0..n {
                let s = Sample::new(Db::Source, SampleKind::Read, None)
                    .latency(Duration::from_millis(ms));
                self.m.add(self.now, &s);
            }
        }

        /// One tick later: the decision, applied.
        fn tick(&mut self) -> Option<Decision> {
            self.now += TICK;
            self.m.expire(self.now);
            self.out.uncapped = self.cap.is_none();
            let d = self.m.decide(&self.cfg, &self.out, self.now);
            if let Some(d) = &d {
                self.cap = d.cap.clone();
                self.m.settle(d);
            }
            d
        }

        /// `n` ticks with `feed` before each: the decisions, with the tick
        /// (counted from 1 in this call) each came on.
        fn run(&mut self, n: u32, mut feed: impl FnMut(&mut Sim)) -> Vec<(u32, Decision)> {
            let mut out = Vec::new();
            for i in 1..=n {
                feed(self);
                if let Some(d) = self.tick() {
                    out.push((i, d));
                }
            }
            out
        }

        /// Ticks with `feed` before each until a decision (at most `max`):
        /// the tick it came on and the decision.
        fn until_decision(&mut self, max: u32, mut feed: impl FnMut(&mut Sim)) -> (u32, Decision) {
            for i in 1..=max {
                feed(self);
                if let Some(d) = self.tick() {
                    return (i, d);
                }
            }
            panic!("no decision in {max} ticks");
        }

        /// What `POST /resume` does to the router.
        fn resume(&mut self) {
            self.cap = None;
        }

        fn state(&self) -> &'static str {
            self.m.state_name()
        }

        /// Trips on failed health checks, which then pass again.
        fn trip_by_checks(&mut self) -> Decision {
            self.out.check_failures = self.cfg.check_failures;
            let d = self.tick().expect("a trip on failed checks");
            assert_eq!((d.kind, d.rule.as_str()), ("failback_trip", "health_check"));
            self.out.check_failures = 0;
            d
        }

        fn target_requests(&self) -> u64 {
            self.m.windows[Db::Target as usize].totals().requests
        }
    }

    /// (kind, cap percent) of each decision, for ramp sequences.
    fn steps(ds: &[(u32, Decision)]) -> Vec<(u32, &'static str, Option<f64>)> {
        ds.iter()
            .map(|(i, d)| (*i, d.kind, d.cap.as_ref().map(|c| c.percent)))
            .collect()
    }

    fn healthy(s: &mut Sim) {
        s.target(1, 20, 1, 0);
    }

    #[test]
    fn error_rate_trips_once_the_breach_has_held() {
        let mut s = Sim::new(cfg(), 50.0);
        assert!(s.run(20, |s| s.target(1, 10, 1, 0)).is_empty());
        // 20% of the new requests fail: the window's rate passes 5% on the
        // 7th tick (14 of 270), and holds 5 ticks and 40 more requests
        // later, on the 11th (22 of 310).
        let d = s.run(11, |s| s.target(1, 10, 1, 2));
        assert_eq!(d.len(), 1, "{d:#?}");
        let (at, d) = &d[0];
        assert_eq!(*at, 11);
        assert_eq!(d.kind, "failback_trip");
        assert_eq!(d.rule, "error_rate");
        assert_eq!(d.during, "healthy");
        assert_eq!(
            d.cap,
            Some(Cap {
                percent: 0.0,
                scope: Scope::All
            })
        );
        assert_eq!(d.breaches.len(), 1);
        assert_eq!(d.breaches[0].measured, 22.0 / 310.0);
        assert_eq!(d.breaches[0].threshold, 0.05);
        assert_eq!(
            d.held,
            Some(Held {
                ticks: SUSTAIN_TICKS,
                new_samples: 40
            })
        );
        assert_eq!(s.state(), "tripped");
        assert_eq!(s.m.trips, 1);
        // What follows is judged on fresh samples.
        assert_eq!(s.target_requests(), 0);
    }

    #[test]
    fn a_breach_that_does_not_hold_trips_nothing() {
        let c = FailbackConfig {
            max_p95_ms: 20.0,
            ..cfg()
        };
        // Three sessions' first reads waited half a second for their
        // target logins: the first 20 reads breach the p95 rule, but once
        // 60 are in (tick 3) the three are 5% and the p95 is fast again.
        let mut s = Sim::new(c.clone(), 50.0);
        s.target(1, 3, 500, 0);
        s.target(1, 17, 1, 0);
        assert!(s.tick().is_none());
        assert_eq!(s.m.streaks["p95"].ticks, 1);
        assert!(s.run(100, healthy).is_empty());
        assert_eq!(s.state(), "healthy");
        assert!(s.m.streaks.is_empty());

        // The same breach in a window that takes in nothing more (a stall):
        // it holds on every tick but never on new samples, then ages out.
        let mut s = Sim::new(c.clone(), 50.0);
        s.target(1, 3, 500, 0);
        s.target(1, 17, 1, 0);
        assert!(s.run(ticks_in(12), |_| {}).is_empty());
        assert_eq!(s.target_requests(), 0, "the window emptied");

        // Sustained, the same share of slow reads trips on the 5th tick.
        let mut s = Sim::new(c, 50.0);
        let d = s.run(10, |s| {
            s.target(1, 3, 500, 0);
            s.target(1, 17, 1, 0);
        });
        assert_eq!(d.len(), 1, "{d:#?}");
        assert_eq!(d[0].0, SUSTAIN_TICKS);
        assert_eq!(d[0].1.rule, "p95");
        assert_eq!(
            d[0].1.held,
            Some(Held {
                ticks: SUSTAIN_TICKS,
                new_samples: 80
            })
        );
    }

    #[test]
    fn p95_trips_on_the_absolute_threshold() {
        let c = FailbackConfig {
            max_p95_ms: 25.0,
            ..cfg()
        };
        let mut s = Sim::new(c, 50.0);
        assert!(s.run(10, healthy).is_empty());
        // 50 ms added: 20 of 220 reads are slow on the first tick.
        let d = s.run(10, |s| s.target(1, 20, 60, 0));
        assert_eq!(d.len(), 1, "{d:#?}");
        let (at, d) = &d[0];
        assert_eq!(*at, SUSTAIN_TICKS);
        assert_eq!(d.rule, "p95");
        let p95 = d.breaches[0].measured;
        assert!((60.0..60.7).contains(&p95), "{p95}");
        assert_eq!(d.breaches[0].threshold, 25.0);
        assert_eq!(d.breaches[0].unit, "ms");
        assert_eq!(d.cap.as_ref().map(|c| c.percent), Some(0.0));
    }

    #[test]
    fn p95_ratio_compares_with_the_source_baseline() {
        let c = FailbackConfig {
            max_p95_ratio: 3.0,
            ..cfg()
        };
        // No source reads, no baseline: the ratio rule cannot judge.
        let mut s = Sim::new(c.clone(), 100.0);
        assert!(s.run(50, |s| s.target(1, 20, 40, 0)).is_empty());
        assert_eq!(s.m.source_baseline, None);

        // Source 2 ms: the limit is the 10 ms floor (not 6 ms).
        let mut s = Sim::new(c.clone(), 50.0);
        assert!(s
            .run(10, |s| {
                s.source(20, 2);
                s.target(1, 20, 5, 0);
            })
            .is_empty());
        let d = s.run(10, |s| {
            s.source(20, 2);
            s.target(1, 20, 30, 0);
        });
        assert_eq!(d.len(), 1, "{d:#?}");
        assert_eq!(d[0].0, SUSTAIN_TICKS);
        assert_eq!(d[0].1.rule, "p95_ratio");
        assert_eq!(d[0].1.breaches[0].threshold, 10.0);

        // Source 8 ms: the limit is three times that; 20 ms passes, 30 ms
        // trips, on the baseline of the last window with source reads
        // (at 100% the source serves none).
        let mut s = Sim::new(c, 100.0);
        assert!(s
            .run(20, |s| {
                s.source(20, 8);
                s.target(1, 20, 20, 0);
            })
            .is_empty());
        let baseline = s.m.source_baseline.map(|(p, _)| p).unwrap();
        assert!((8.0..8.1).contains(&baseline), "{baseline}");
        let d = s.run(ticks_in(20), |s| s.target(1, 20, 30, 0));
        assert_eq!(d.len(), 1, "{d:#?}");
        assert_eq!(d[0].1.rule, "p95_ratio");
        assert_eq!(d[0].1.breaches[0].threshold, baseline * 3.0);
    }

    #[test]
    fn failed_health_checks_trip_at_once_and_cap_everything() {
        let c = FailbackConfig {
            per_fingerprint: true,
            ..cfg()
        };
        let mut s = Sim::new(c, 50.0);
        s.out.check_failures = 2;
        assert!(s.run(50, |_| {}).is_empty());
        s.out.check_failures = 3;
        let d = s.tick().expect("trip");
        assert_eq!(d.rule, "health_check");
        assert_eq!(
            d.held,
            Some(Held {
                ticks: 1,
                new_samples: 0
            })
        );
        // Never some shapes only: the whole target failed its checks.
        assert_eq!(d.cap.map(|c| c.scope), Some(Scope::All));
        assert_eq!(s.state(), "tripped");
    }

    #[test]
    fn mirror_lag_trips_once_it_has_held() {
        let mut s = Sim::new(cfg(), 50.0);
        s.out.mirror_lag_ms = Some(45_000);
        assert!(s.run(SUSTAIN_TICKS - 1, |_| {}).is_empty());
        s.out.mirror_lag_ms = Some(1_000);
        assert!(s.tick().is_none());
        // Starts over.
        s.out.mirror_lag_ms = Some(45_000);
        let d = s.run(SUSTAIN_TICKS, |_| {});
        assert_eq!(steps(&d), [(SUSTAIN_TICKS, "failback_trip", Some(0.0))]);
        assert_eq!(d[0].1.rule, "mirror_lag");
    }

    #[test]
    fn the_cooldown_waits_for_quiet_and_passing_checks() {
        let cooldown = ticks_in(cfg().cooldown_s);
        // Quiet from the trip on: the probe comes exactly one cooldown later.
        let mut s = Sim::new(cfg(), 100.0);
        s.trip_by_checks();
        let d = s.run(cooldown + 10, healthy);
        assert_eq!(steps(&d), [(cooldown, "failback_probe", Some(10.0))]);

        // A breach restarts the cooldown; a failing check (below the
        // rule's threshold) holds the probe back.
        let mut s = Sim::new(cfg(), 100.0);
        s.trip_by_checks();
        assert!(s.run(200, healthy).is_empty());
        s.out.check_failures = 3;
        assert!(s.tick().is_none());
        assert_eq!(s.state(), "tripped");
        s.out.check_failures = 1;
        assert!(s.run(cooldown + 100, healthy).is_empty());
        s.out.check_failures = 0;
        let d = s.run(5, healthy);
        assert_eq!(steps(&d), [(1, "failback_probe", Some(10.0))]);

        // Checks pass from the breach on: one cooldown after it.
        let mut s = Sim::new(cfg(), 100.0);
        s.trip_by_checks();
        assert!(s.run(200, healthy).is_empty());
        s.out.check_failures = 3;
        assert!(s.tick().is_none());
        s.out.check_failures = 0;
        let d = s.run(cooldown + 10, healthy);
        assert_eq!(steps(&d), [(cooldown, "failback_probe", Some(10.0))]);
        // The probe is judged on fresh samples.
        let fresh = s.target_requests();
        assert!(fresh <= 10 * 20, "{fresh}");
    }

    #[test]
    fn probe_and_ramp_double_the_share_up_to_read_percent() {
        let cooldown = ticks_in(cfg().cooldown_s);
        let step = ticks_in(cfg().step_s);
        let mut s = Sim::new(cfg(), 100.0);
        s.trip_by_checks();
        let d = s.run(cooldown + 5 * step, healthy);
        assert_eq!(
            steps(&d),
            [
                (cooldown, "failback_probe", Some(10.0)),
                (cooldown + step, "failback_step", Some(20.0)),
                (cooldown + 2 * step, "failback_step", Some(40.0)),
                (cooldown + 3 * step, "failback_step", Some(80.0)),
                (cooldown + 4 * step, "failback_recovered", None),
            ]
        );
        let last = &d[4].1;
        assert_eq!(last.after_percent, Some(80.0));
        assert_eq!(last.rule, "health_check");
        assert_eq!(s.state(), "healthy");
        assert_eq!(s.cap, None);

        // The share is capped by read_percent.
        let c = FailbackConfig {
            probe_percent: 5.0,
            ..cfg()
        };
        let mut s = Sim::new(c.clone(), 50.0);
        s.trip_by_checks();
        let d = s.run(cooldown + 5 * step, healthy);
        let percents: Vec<_> = steps(&d).into_iter().map(|(_, k, p)| (k, p)).collect();
        assert_eq!(
            percents,
            [
                ("failback_probe", Some(5.0)),
                ("failback_step", Some(10.0)),
                ("failback_step", Some(20.0)),
                ("failback_step", Some(40.0)),
                ("failback_recovered", None),
            ]
        );
        let mut s = Sim::new(c, 3.0);
        s.trip_by_checks();
        let d = s.run(cooldown + 2 * step, healthy);
        assert_eq!(
            steps(&d),
            [
                (cooldown, "failback_probe", Some(3.0)),
                (cooldown + step, "failback_recovered", None),
            ]
        );
    }

    #[test]
    fn a_breach_during_the_ramp_trips_again_and_the_probe_starts_over() {
        let cooldown = ticks_in(cfg().cooldown_s);
        let step = ticks_in(cfg().step_s);
        let mut s = Sim::new(cfg(), 100.0);
        s.trip_by_checks();
        let d = s.run(cooldown + step, healthy);
        assert_eq!(d.last().map(|(_, d)| d.kind), Some("failback_step"));
        assert_eq!(s.cap.as_ref().map(|c| c.percent), Some(20.0));
        // Every read fails at 20% (and at 0% none is routed).
        let (_, d) = s.until_decision(50, |s| s.target(1, 20, 1, 20));
        assert_eq!((d.kind, d.rule.as_str()), ("failback_trip", "error_rate"));
        assert_eq!(d.during, "probing at 20%");
        assert_eq!(s.cap.as_ref().map(|c| c.percent), Some(0.0));
        assert_eq!(s.state(), "tripped");
        assert_eq!(s.m.trips, 2);
        // Then a cooldown and the probe at probe_percent again, not 40%.
        let d = s.run(cooldown + 1, |_| {});
        assert_eq!(steps(&d), [(cooldown, "failback_probe", Some(10.0))]);
    }

    #[test]
    fn a_step_waits_while_a_rule_breaches_without_holding() {
        let cooldown = ticks_in(cfg().cooldown_s);
        let step = ticks_in(cfg().step_s);
        let mut s = Sim::new(cfg(), 100.0);
        s.trip_by_checks();
        assert_eq!(s.run(cooldown, healthy).len(), 1);
        assert!(s.run(step - 2, healthy).is_empty());
        // Lagging on the tick the step is due and the three after it:
        // four ticks, not enough to trip.
        s.out.mirror_lag_ms = Some(45_000);
        assert!(s.run(SUSTAIN_TICKS - 1, healthy).is_empty());
        s.out.mirror_lag_ms = Some(1_000);
        let d = s.run(3, healthy);
        assert_eq!(steps(&d), [(1, "failback_step", Some(20.0))]);
    }

    #[test]
    fn manual_recovery_stays_tripped_until_resume() {
        let c = FailbackConfig {
            recovery: Recovery::Manual,
            ..cfg()
        };
        let mut s = Sim::new(c, 100.0);
        s.trip_by_checks();
        // Checks pass, reads are fine, ten cooldowns go by: nothing.
        assert!(s.run(ticks_in(10 * cfg().cooldown_s), healthy).is_empty());
        assert_eq!(s.state(), "tripped");
        assert_eq!(s.cap.as_ref().map(|c| c.percent), Some(0.0));
        // A resume lifts the cap: healthy again, on fresh samples.
        s.resume();
        assert!(s.tick().is_none());
        assert_eq!(s.state(), "healthy");
        assert_eq!(s.target_requests(), 0);
        assert!(s.run(50, healthy).is_empty());
        // And it trips again when the target fails again.
        let (_, d) = s.until_decision(50, |s| s.target(1, 20, 1, 20));
        assert_eq!((d.kind, d.rule.as_str()), ("failback_trip", "error_rate"));
        assert_eq!(s.m.trips, 2);
    }

    #[test]
    fn per_fingerprint_mode_caps_only_the_failing_shapes() {
        let c = FailbackConfig {
            per_fingerprint: true,
            ..cfg()
        };
        let fine = |s: &mut Sim, but: &[u64]| {
            for shape in 1..=5 {
                if !but.contains(&shape) {
                    s.target(shape, 4, 1, 0);
                }
            }
        };
        let mut s = Sim::new(c, 100.0);
        // Shape 9 fails every time: 4 of 24 requests.
        let (at, d) = s.until_decision(50, |s| {
            fine(s, &[]);
            s.target(9, 4, 1, 4);
        });
        assert_eq!(at, SUSTAIN_TICKS);
        assert_eq!(
            d.cap,
            Some(Cap {
                percent: 0.0,
                scope: Scope::Shapes(HashSet::from([9]))
            })
        );
        // Shape 9 gets no reads now; the others are fine.
        assert!(s.run(50, |s| fine(s, &[])).is_empty());
        // Shape 4 fails too: the scope widens to both.
        let (_, d) = s.until_decision(100, |s| {
            fine(s, &[4]);
            s.target(4, 4, 1, 4);
        });
        let both = Scope::Shapes(HashSet::from([4, 9]));
        assert_eq!(d.kind, "failback_trip");
        assert_eq!(d.during, "tripped");
        assert_eq!(d.cap.as_ref().map(|c| &c.scope), Some(&both));
        assert_eq!(s.state(), "tripped");
        assert_eq!(s.m.trips, 2);
        // Probing covers those two shapes only.
        let d = s.run(ticks_in(cfg().cooldown_s) + 1, |s| fine(s, &[4]));
        assert_eq!(d.len(), 1, "{d:#?}");
        assert_eq!(
            d[0].1.cap,
            Some(Cap {
                percent: 10.0,
                scope: both
            })
        );
    }

    #[test]
    fn nothing_trips_when_disabled_or_without_a_target() {
        for c in [
            FailbackConfig {
                enabled: false,
                ..cfg()
            },
            cfg(),
        ] {
            let enabled = c.enabled;
            let mut s = Sim::new(c, 50.0);
            s.out.has_target = !enabled;
            s.out.check_failures = 10;
            assert!(s.run(50, |s| s.target(1, 20, 1, 20)).is_empty());
            assert_eq!(s.state(), "healthy");
        }
    }
}
