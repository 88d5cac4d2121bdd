//! The trip rules, and which query shapes to blame.
//!
//! Pure functions of the windows, so they are tested without a clock.

use std::collections::HashMap;

use super::window::Totals;
use crate::config::FailbackConfig;

/// What the rules look at, besides the settings.
pub struct Inputs<'a> {
    pub target: &'a Totals,
    /// The source's p95 to compare the target's with: this window's, or
    /// the last window that had enough source reads (at 100% routing the
    /// source serves none).
    pub source_p95_ms: Option<f64>,
    pub mirror_lag_s: Option<f64>,
    /// Failed health checks of the target in a row.
    pub check_failures: u32,
}

/// A rule that tripped, with what it measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Breach {
    pub rule: &'static str,
    pub measured: f64,
    pub threshold: f64,
    pub unit: &'static str,
    /// Samples the measurement rests on.
    pub samples: u64,
}

impl Breach {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "rule": self.rule, "measured": self.measured, "threshold": self.threshold,
            "unit": self.unit, "samples": self.samples,
        })
    }

    /// Rules about the target as a whole, never about some of its queries.
    fn whole_target(&self) -> bool {
        matches!(self.rule, "health_check" | "mirror_lag")
    }
}

/// Every rule that trips now.
pub fn evaluate(cfg: &FailbackConfig, i: &Inputs) -> Vec<Breach> {
    let mut out = Vec::new();
    let t = i.target;
    if cfg.check_failures > 0 && i.check_failures >= cfg.check_failures {
        out.push(Breach {
            rule: "health_check",
            measured: i.check_failures as f64,
            threshold: cfg.check_failures as f64,
            unit: "failed checks in a row",
            samples: i.check_failures as u64,
        });
    }
    if cfg.max_error_rate > 0.0 && t.requests >= cfg.min_samples {
        let rate = t.error_rate();
        if rate > cfg.max_error_rate {
            out.push(Breach {
                rule: "error_rate",
                measured: rate,
                threshold: cfg.max_error_rate,
                unit: "failed share of requests",
                samples: t.requests,
            });
        }
    }
    let reads = t.latency.len();
    if reads >= cfg.min_samples {
        if let Some(p95) = t.quantile_ms(0.95) {
            if cfg.max_p95_ms > 0.0 && p95 > cfg.max_p95_ms {
                out.push(Breach {
                    rule: "p95",
                    measured: p95,
                    threshold: cfg.max_p95_ms,
                    unit: "ms",
                    samples: reads,
                });
            }
            if let Some(limit) = ratio_limit_ms(cfg, i.source_p95_ms) {
                if p95 > limit {
                    out.push(Breach {
                        rule: "p95_ratio",
                        measured: p95,
                        threshold: limit,
                        unit: "ms (the source's p95 times max_p95_ratio)",
                        samples: reads,
                    });
                }
            }
        }
    }
    if let Some(lag) = i.mirror_lag_s {
        if cfg.max_mirror_lag_s > 0.0 && lag > cfg.max_mirror_lag_s {
            out.push(Breach {
                rule: "mirror_lag",
                measured: lag,
                threshold: cfg.max_mirror_lag_s,
                unit: "s",
                samples: 1,
            });
        }
    }
    out
}

/// The target p95 above which the ratio rule trips.
fn ratio_limit_ms(cfg: &FailbackConfig, source_p95_ms: Option<f64>) -> Option<f64> {
    let s = source_p95_ms?;
    (cfg.max_p95_ratio > 0.0).then(|| (s * cfg.max_p95_ratio).max(cfg.ratio_floor_ms))
}

/// Per-fingerprint mode: the few shapes that explain the breaches, or
/// `None` when the trouble is not confined to at most `max_fingerprints`
/// of them. Shapes are taken greedily, worst first (failures, then reads
/// slower than the threshold), until what is left breaks no rule.
pub fn blame(
    cfg: &FailbackConfig,
    breaches: &[Breach],
    i: &Inputs,
    shapes: &HashMap<u64, Totals>,
) -> Option<Vec<u64>> {
    if breaches.is_empty() || breaches.iter().any(Breach::whole_target) {
        return None;
    }
    let slow_us = breaches
        .iter()
        .filter(|b| b.rule.starts_with("p95"))
        .map(|b| (b.threshold * 1000.0) as u64)
        .min();
    let score = |t: &Totals| {
        let slow = slow_us.map_or(0, |us| {
            t.latency
                .iter_recorded()
                .filter(|v| v.value_iterated_to() > us)
                .map(|v| v.count_at_value())
                .sum::<u64>()
        });
        (t.errors(), slow)
    };
    let mut ranked: Vec<(u64, (u64, u64))> = shapes
        .iter()
        .filter(|(k, _)| **k != 0)
        .map(|(k, t)| (*k, score(t)))
        .filter(|(_, s)| *s != (0, 0))
        .collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut blamed = Vec::new();
    for (shape, _) in ranked.into_iter().take(cfg.max_fingerprints) {
        blamed.push(shape);
        let rest = rest_of(i.target, shapes, &blamed);
        let quiet = evaluate(
            cfg,
            &Inputs {
                target: &rest,
                source_p95_ms: i.source_p95_ms,
                mirror_lag_s: None,
                check_failures: 0,
            },
        )
        .is_empty();
        if quiet {
            blamed.sort_unstable();
            return Some(blamed);
        }
    }
    None
}

/// The target's window without some shapes (latency from the coarser
/// per-shape histograms).
fn rest_of(total: &Totals, shapes: &HashMap<u64, Totals>, without: &[u64]) -> Totals {
    let mut rest = Totals::new(1);
    rest.requests = total.requests;
    rest.by_kind = total.by_kind;
    rest.faults = total.faults;
    for (k, t) in shapes {
        if without.contains(k) {
            rest.requests = rest.requests.saturating_sub(t.requests);
            for (a, b) in rest.faults.iter_mut().zip(t.faults) {
                *a = a.saturating_sub(b);
            }
        } else {
            let _ = rest.latency.add(&t.latency);
        }
    }
    rest
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::window::Window;
    use super::super::{Db, Fault, Sample, SampleKind};
    use super::*;

    fn cfg() -> FailbackConfig {
        FailbackConfig {
            min_samples: 20,
            max_p95_ms: 0.0,
            ..FailbackConfig::default()
        }
    }

    fn read(shape: u64, ms: u64, fault: Option<Fault>) -> Sample {
        Sample::new(Db::Target, SampleKind::Read, fault)
            .latency(Duration::from_millis(ms))
            .shape(shape)
    }

    fn inputs(t: &Totals, source_p95_ms: Option<f64>) -> Inputs<'_> {
        Inputs {
            target: t,
            source_p95_ms,
            mirror_lag_s: None,
            check_failures: 0,
        }
    }

    fn window(samples: &[Sample]) -> Window {
        let mut w = Window::new(Duration::from_secs(10), true);
        let now = Instant::now();
        for s in samples {
            w.add(now, s);
        }
        w
    }

    #[test]
    fn nothing_trips_below_min_samples_or_thresholds() {
        let mut samples: Vec<Sample> = (0..19).map(|_| read(1, 1, Some(Fault::Server))).collect();
        let w = window(&samples);
        assert!(evaluate(&cfg(), &inputs(w.totals(), Some(1.0))).is_empty());
        // Enough samples, 4% errors, p95 under 3x the source's: quiet.
        samples = (0..96).map(|_| read(1, 2, None)).collect();
        samples.extend((0..4).map(|_| read(1, 2, Some(Fault::Timeout))));
        let w = window(&samples);
        assert!(evaluate(&cfg(), &inputs(w.totals(), Some(1.0))).is_empty());
    }

    #[test]
    fn error_rate_and_latency_rules_report_what_they_measured() {
        let mut samples: Vec<Sample> = (0..90).map(|_| read(1, 60, None)).collect();
        samples.extend((0..10).map(|_| read(1, 60, Some(Fault::Diverged))));
        let w = window(&samples);
        let c = FailbackConfig {
            max_p95_ms: 20.0,
            ..cfg()
        };
        let b = evaluate(&c, &inputs(w.totals(), Some(1.0)));
        let rules: Vec<&str> = b.iter().map(|b| b.rule).collect();
        assert_eq!(rules, ["error_rate", "p95", "p95_ratio"]);
        assert!((b[0].measured - 0.1).abs() < 1e-9);
        assert!((59.0..61.0).contains(&b[1].measured), "{:?}", b[1]);
        assert_eq!(b[1].threshold, 20.0);
        // The ratio rule's threshold: 3 x 1 ms, raised to the 10 ms floor.
        assert_eq!(b[2].threshold, 10.0);
        // Without a source baseline the ratio rule cannot judge.
        let b = evaluate(&c, &inputs(w.totals(), None));
        assert!(b.iter().all(|b| b.rule != "p95_ratio"));
    }

    #[test]
    fn checks_and_mirror_lag_trip_without_traffic() {
        let w = window(&[]);
        let i = Inputs {
            target: w.totals(),
            source_p95_ms: None,
            mirror_lag_s: Some(45.0),
            check_failures: 3,
        };
        let rules: Vec<&str> = evaluate(&cfg(), &i).iter().map(|b| b.rule).collect();
        assert_eq!(rules, ["health_check", "mirror_lag"]);
    }

    #[test]
    fn one_slow_shape_is_blamed_alone_and_a_general_slowdown_is_not() {
        // Shape 7 is slow, shapes 1..=5 are fine.
        let mut samples: Vec<Sample> = (0..200).map(|i| read(1 + i % 5, 1, None)).collect();
        samples.extend((0..40).map(|_| read(7, 80, None)));
        let w = window(&samples);
        let c = cfg();
        let i = inputs(w.totals(), Some(1.0));
        let b = evaluate(&c, &i);
        assert_eq!(b.iter().map(|b| b.rule).collect::<Vec<_>>(), ["p95_ratio"]);
        assert_eq!(blame(&c, &b, &i, &w.shapes()), Some(vec![7]));
        // Everything slow: no handful of shapes explains it.
        let samples: Vec<Sample> = (0..300).map(|i| read(1 + i % 10, 80, None)).collect();
        let w = window(&samples);
        let i = inputs(w.totals(), Some(1.0));
        let b = evaluate(&c, &i);
        assert!(!b.is_empty());
        assert_eq!(blame(&c, &b, &i, &w.shapes()), None);
    }

    #[test]
    fn a_failing_shape_is_blamed_but_not_for_whole_target_rules() {
        let mut samples: Vec<Sample> = (0..200).map(|i| read(1 + i % 4, 1, None)).collect();
        samples.extend((0..30).map(|_| read(9, 1, Some(Fault::Diverged))));
        let w = window(&samples);
        let c = cfg();
        let i = inputs(w.totals(), Some(1.0));
        let b = evaluate(&c, &i);
        assert_eq!(b[0].rule, "error_rate");
        assert_eq!(blame(&c, &b, &i, &w.shapes()), Some(vec![9]));
        let i = Inputs {
            check_failures: 5,
            ..inputs(w.totals(), Some(1.0))
        };
        let b = evaluate(&c, &i);
        assert_eq!(blame(&c, &b, &i, &w.shapes()), None);
    }
}
