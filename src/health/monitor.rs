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
//! blamed shapes get none), through `router::Limit`; `read_percent` stays
//! as configured. Probing: the cap is `probe_percent`, doubled every
//! `step_s` while the rules stay quiet. With `recovery = "manual"` the
//! machine stays tripped until `POST /resume` lifts the cap. Every
//! transition is audited (rule, measured values, thresholds, windows)
//! before it applies, with a new epoch, like any routing change.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::rules::{self, Breach, Inputs};
use super::window::Window;
use super::{Backend, Fault, Health, Kind, Sample};
use crate::config::{FailbackConfig, Recovery};
use crate::proxy::Proxy;
use crate::router::Limit;

/// How often the monitor looks: reads leave a tripped target within this
/// (plus the rules' own time) of the window crossing a threshold.
pub const TICK: Duration = Duration::from_millis(100);

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

/// A routing change a tick decided on. It is applied (audited, with an
/// fsync) after the state lock is released, so `/status` never waits on
/// the disk.
struct Change {
    kind: &'static str,
    settings: crate::router::Settings,
    extra: serde_json::Value,
    /// A trip: applied before it is audited, and even when the audit log
    /// cannot be written (the application comes first; logged loudly).
    force: bool,
    then: Phase,
    trip_rule: Option<&'static str>,
    clear_target: bool,
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
        self.windows[Backend::Target as usize].clear();
    }

    /// One look: take the samples, update the windows, run the rules and
    /// the state machine. The caller holds `proxy.change_lock`.
    pub fn tick(&mut self, health: &Health, proxy: &Proxy, now: Instant) {
        let cfg = health.settings();
        if self.built != (cfg.window_s, cfg.per_fingerprint) {
            let len = Duration::from_secs(cfg.window_s);
            self.windows = [
                Window::new(len, false),
                Window::new(len, cfg.per_fingerprint),
            ];
            self.built = (cfg.window_s, cfg.per_fingerprint);
        }
        let m = &health.metrics;
        let mut spare = std::mem::take(&mut self.spare);
        // Counted here and added to the metrics once per label set per
        // tick: resolving a label set per sample cost more than the rest.
        let mut requests = [[0u64; 4]; 2];
        let mut faults = [[0u64; 6]; 2];
        health.recorder.drain(&mut spare, |s| {
            self.windows[s.backend as usize].add(now, s);
            requests[s.backend as usize][s.kind as usize] += 1;
            if let Some(f) = s.fault {
                faults[s.backend as usize][f as usize] += 1;
            }
        });
        self.spare = spare;
        for b in [Backend::Source, Backend::Target] {
            for k in Kind::ALL {
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
        for w in &mut self.windows {
            w.expire(now);
        }
        for b in [Backend::Source, Backend::Target] {
            let t = self.windows[b as usize].totals();
            let l = vec![("backend", b.label())];
            m.window_p95_us
                .get_or_create(&l)
                .set(t.quantile_ms(0.95).map_or(0, |ms| (ms * 1000.0) as i64));
            m.window_error_ppm
                .get_or_create(&l)
                .set((t.error_rate() * 1e6) as i64);
        }
        let source = self.windows[Backend::Source as usize].totals();
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

        let routing = proxy.router.current();
        if self.phase != Phase::Healthy && routing.limit.is_none() {
            self.resumed();
        }
        m.state.set(match self.phase {
            Phase::Healthy => 0,
            Phase::Tripped { .. } => 1,
            Phase::Probing { .. } => 2,
        });
        m.read_cap.set((routing.effective_percent() * 100.0) as i64);
        if !cfg.enabled || proxy.targets.is_none() {
            return;
        }
        let target = self.windows[Backend::Target as usize].totals();
        let inputs = Inputs {
            target,
            source_p95_ms: self.source_baseline.map(|(p, _)| p),
            mirror_lag_s: proxy
                .mirror
                .as_ref()
                .map(|_| proxy.metrics.mirror.lag_ms.get() as f64 / 1000.0),
            check_failures: health.checks[Backend::Target as usize]
                .failures
                .load(std::sync::atomic::Ordering::Relaxed),
        };
        let breaches = rules::evaluate(&cfg, &inputs);
        let checks_ok = inputs.check_failures == 0;
        match self.phase.clone() {
            Phase::Healthy => {
                if !breaches.is_empty() {
                    let scope = self.scope_for(&cfg, &breaches, &inputs, None);
                    self.trip(health, proxy, &cfg, &breaches, scope, "healthy", now);
                }
            }
            Phase::Tripped { since, scope, rule } => {
                if !breaches.is_empty() {
                    // Still failing (checks, the mirror, or in per-shape
                    // mode the other shapes): widen the scope if needed,
                    // and the cooldown starts again.
                    let wider = match &scope {
                        Scope::All => Scope::All,
                        Scope::Shapes(have) => self.scope_for(&cfg, &breaches, &inputs, Some(have)),
                    };
                    if wider != scope {
                        self.trip(health, proxy, &cfg, &breaches, wider, "tripped", now);
                    } else {
                        self.phase = Phase::Tripped {
                            since: now,
                            scope,
                            rule,
                        };
                    }
                } else if cfg.recovery == Recovery::Auto
                    && checks_ok
                    && now.saturating_duration_since(since) >= Duration::from_secs(cfg.cooldown_s)
                {
                    let percent = cfg.probe_percent.min(routing.read_percent);
                    self.step(proxy, percent, scope, rule, now, "failback_probe");
                }
            }
            Phase::Probing {
                since,
                percent,
                scope,
                rule,
            } => {
                if !breaches.is_empty() {
                    let during = format!("probing at {percent}%");
                    let scope = match scope {
                        Scope::All => Scope::All,
                        Scope::Shapes(have) => {
                            match self.scope_for(&cfg, &breaches, &inputs, Some(&have)) {
                                Scope::Shapes(s) => {
                                    Scope::Shapes(s.union(&have).copied().collect())
                                }
                                Scope::All => Scope::All,
                            }
                        }
                    };
                    self.trip(health, proxy, &cfg, &breaches, scope, &during, now);
                } else if checks_ok
                    && now.saturating_duration_since(since) >= Duration::from_secs(cfg.step_s)
                {
                    let next = percent * 2.0;
                    if next >= routing.read_percent {
                        self.recover(proxy, percent, &rule);
                    } else {
                        self.step(proxy, next, scope, rule, now, "failback_step");
                    }
                }
            }
        }
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
        let shapes = self.windows[Backend::Target as usize].shapes();
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

    #[allow(clippy::too_many_arguments)]
    fn trip(
        &mut self,
        health: &Health,
        proxy: &Proxy,
        cfg: &FailbackConfig,
        breaches: &[Breach],
        scope: Scope,
        during: &str,
        now: Instant,
    ) {
        let first = &breaches[0];
        let shapes_json = scope_json(health, &scope);
        let evidence = serde_json::json!({
            "rule": first.rule,
            "measured": first.measured,
            "threshold": first.threshold,
            "unit": first.unit,
            "breaches": breaches.iter().map(Breach::to_json).collect::<Vec<_>>(),
            "scope": shapes_json,
            "during": during,
            "window_s": cfg.window_s,
            "windows": {
                "source": self.windows[Backend::Source as usize].totals().to_json(),
                "target": self.windows[Backend::Target as usize].totals().to_json(),
            },
            "source_p95_baseline_ms": self.source_baseline.map(|(p, _)| p),
            "mirror_lag_ms": proxy.mirror.as_ref().map(|_| proxy.metrics.mirror.lag_ms.get()),
            "checks": {
                "target_failures_in_a_row": health.checks[Backend::Target as usize].failures.load(std::sync::atomic::Ordering::Relaxed),
            },
            "recovery": cfg.recovery,
        });
        let limit = Limit {
            percent: 0.0,
            threshold: 0,
            shapes: match &scope {
                Scope::All => None,
                Scope::Shapes(s) => Some(s.clone()),
            },
            why: format!("tripped: {}", first.rule),
        };
        let mut new = (*proxy.router.current()).clone();
        new.limit = Some(Arc::new(limit));
        self.pending = Some(Change {
            kind: "failback_trip",
            settings: new,
            extra: evidence,
            force: true,
            then: Phase::Tripped {
                since: now,
                scope,
                rule: first.rule.to_string(),
            },
            trip_rule: Some(first.rule),
            // What follows is judged on fresh samples only.
            clear_target: true,
        });
    }

    /// Probe or ramp step: a higher cap.
    fn step(
        &mut self,
        proxy: &Proxy,
        percent: f64,
        scope: Scope,
        rule: String,
        now: Instant,
        kind: &'static str,
    ) {
        let mut new = (*proxy.router.current()).clone();
        new.limit = Some(Arc::new(Limit {
            percent,
            threshold: crate::router::policy::threshold(percent),
            shapes: match &scope {
                Scope::All => None,
                Scope::Shapes(s) => Some(s.clone()),
            },
            why: format!("probing after {rule}"),
        }));
        let extra = serde_json::json!({
            "percent": percent,
            "tripped_by": rule,
            "target_window": self.windows[Backend::Target as usize].totals().to_json(),
        });
        self.pending = Some(Change {
            kind,
            settings: new,
            extra,
            force: false,
            then: Phase::Probing {
                since: now,
                percent,
                scope,
                rule,
            },
            trip_rule: None,
            clear_target: kind == "failback_probe",
        });
    }

    fn recover(&mut self, proxy: &Proxy, last_percent: f64, rule: &str) {
        let mut new = (*proxy.router.current()).clone();
        new.limit = None;
        let extra = serde_json::json!({
            "after_percent": last_percent,
            "tripped_by": rule,
            "target_window": self.windows[Backend::Target as usize].totals().to_json(),
        });
        self.pending = Some(Change {
            kind: "failback_recovered",
            settings: new,
            extra,
            force: false,
            then: Phase::Healthy,
            trip_rule: None,
            clear_target: false,
        });
    }

    /// The state follows a change once it is applied.
    fn commit(&mut self, health: &Health, c: Change) {
        if let Some(rule) = c.trip_rule {
            warn!(rule, scope = %c.extra["scope"], measured = %c.extra["measured"],
                threshold = %c.extra["threshold"], "target unhealthy: reads fail back to the source");
            health
                .metrics
                .trips
                .get_or_create(&vec![("rule", rule)])
                .inc();
            self.trips += 1;
            self.last_trip = Some(c.extra);
        } else if let Phase::Probing { percent, .. } = &c.then {
            info!(percent, "failback: probing the target");
        } else {
            info!("failback: the target is back at the configured share");
        }
        if c.clear_target {
            self.windows[Backend::Target as usize].clear();
        }
        self.phase = c.then;
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
            "last_trip": self.last_trip,
            "window_s": cfg.window_s,
            "windows": {
                "source": self.windows[Backend::Source as usize].totals().to_json(),
                "target": self.windows[Backend::Target as usize].totals().to_json(),
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

/// Runs the monitor until the process ends.
pub fn start(proxy: Arc<Proxy>) -> anyhow::Result<()> {
    let Some(health) = proxy.health.clone() else {
        return Ok(());
    };
    std::thread::Builder::new()
        .name("pgshift-health".into())
        .spawn(move || loop {
            std::thread::sleep(TICK);
            // Held through the change, so no reload or API change lands
            // between the decision and its application.
            let _serial = proxy.change_lock.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let change = {
                let mut st = health.state.lock().unwrap_or_else(|p| p.into_inner());
                st.tick(&health, &proxy, now);
                st.pending.take()
            };
            let Some(c) = change else {
                continue;
            };
            let r = if c.force {
                proxy.set_routing_urgently(c.kind, "health", c.settings.clone(), c.extra.clone())
            } else {
                proxy.set_routing(c.kind, "health", c.settings.clone(), c.extra.clone())
            };
            let applied = match r {
                Ok(_) => true,
                Err(e) => {
                    error!(error = %e.reason, kind = c.kind, "failback change");
                    c.force
                }
            };
            if applied {
                let mut st = health.state.lock().unwrap_or_else(|p| p.into_inner());
                st.commit(&health, c);
            }
        })?;
    Ok(())
}
