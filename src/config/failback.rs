//! `[failback]`: the health monitor's thresholds and how reads move back.

use serde::{Deserialize, Serialize};

/// When the target misbehaves, reads move back to the source by themselves
/// (see `health`). A threshold of 0 turns its rule off.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailbackConfig {
    /// Off: the windows are still measured and shown, nothing trips.
    pub enabled: bool,
    /// Length of the rolling windows the rules look at.
    pub window_s: u64,
    /// Requests the target must have in the window before a rate or
    /// latency rule may trip.
    pub min_samples: u64,
    /// Trip when the target's share of failed requests is above this (0 to
    /// 1; 0 = rule off).
    pub max_error_rate: f64,
    /// Trip when the target's p95 read latency is above this (0 = off).
    pub max_p95_ms: f64,
    /// Trip when the target's p95 is above this many times the source's
    /// over the same window (0 = off) ...
    pub max_p95_ratio: f64,
    /// ... and above this floor, so sub-millisecond jitter never trips it.
    pub ratio_floor_ms: f64,
    /// Trip when the mirror is further behind than this (stale reads;
    /// 0 = off).
    pub max_mirror_lag_s: f64,
    /// Trip when this many health checks of the target fail in a row
    /// (0 = off): a dead target trips even with no reads routed to it.
    pub check_failures: u32,
    /// "auto": probe and ramp back after `cooldown_s`; "manual": wait for
    /// `POST /resume` (`pgshift ctl resume`).
    pub recovery: Recovery,
    /// Quiet time after a trip before the first probe.
    pub cooldown_s: u64,
    /// The share of reads the first probe step sends to the target
    /// (capped by `routing.read_percent`); each later step doubles it.
    pub probe_percent: f64,
    /// How long each probe step must stay quiet before the next one.
    pub step_s: u64,
    /// When the trouble is confined to a few query shapes, fail back only
    /// those (up to `max_fingerprints`) and keep routing the rest.
    pub per_fingerprint: bool,
    pub max_fingerprints: usize,
    /// Period of the health checks of both backends (`SELECT 1` on a kept
    /// connection, connecting again after a failure).
    pub check_interval_ms: u64,
    /// A check with no answer within this fails.
    pub check_timeout_ms: u64,
    /// Who the checks log in as; unset: the user of the most recent client
    /// session (before any session, a check only connects).
    pub check_user: Option<String>,
    /// The database the checks log in to; unset: the maintenance database
    /// `postgres` (never a client's own, which it may need to itself).
    pub check_database: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Recovery {
    #[default]
    Auto,
    Manual,
}

impl Default for FailbackConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window_s: 10,
            min_samples: 50,
            max_error_rate: 0.05,
            max_p95_ms: 0.0,
            max_p95_ratio: 3.0,
            ratio_floor_ms: 10.0,
            max_mirror_lag_s: 30.0,
            check_failures: 3,
            recovery: Recovery::Auto,
            cooldown_s: 30,
            probe_percent: 5.0,
            step_s: 10,
            per_fingerprint: false,
            max_fingerprints: 5,
            check_interval_ms: 1_000,
            check_timeout_ms: 3_000,
            check_user: None,
            check_database: None,
        }
    }
}

impl FailbackConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: &str| Err((format!("failback.{k}"), m.to_string()));
        let finite_nonneg = |v: f64| v.is_finite() && v >= 0.0;
        if !(1..=3_600).contains(&self.window_s) {
            return err("window_s", "must be between 1 and 3600");
        }
        if !(1..=1_000_000_000).contains(&self.min_samples) {
            return err("min_samples", "must be between 1 and 1000000000");
        }
        if !(0.0..=1.0).contains(&self.max_error_rate) {
            return err("max_error_rate", "must be between 0 and 1 (0 = rule off)");
        }
        if !finite_nonneg(self.max_p95_ms) {
            return err("max_p95_ms", "must be a number of milliseconds, 0 or more");
        }
        if !finite_nonneg(self.max_p95_ratio)
            || (self.max_p95_ratio > 0.0 && self.max_p95_ratio < 1.0)
        {
            return err("max_p95_ratio", "must be 0 (off) or at least 1");
        }
        if !finite_nonneg(self.ratio_floor_ms) {
            return err(
                "ratio_floor_ms",
                "must be a number of milliseconds, 0 or more",
            );
        }
        if !finite_nonneg(self.max_mirror_lag_s) {
            return err("max_mirror_lag_s", "must be a number of seconds, 0 or more");
        }
        if self.check_failures > 1_000 {
            return err("check_failures", "must be between 0 and 1000");
        }
        if self.cooldown_s > 86_400 {
            return err("cooldown_s", "must be at most 86400");
        }
        if !(self.probe_percent > 0.0 && self.probe_percent <= 100.0) {
            return err("probe_percent", "must be above 0 and at most 100");
        }
        if !(1..=86_400).contains(&self.step_s) {
            return err("step_s", "must be between 1 and 86400");
        }
        if !(1..=1_000).contains(&self.max_fingerprints) {
            return err("max_fingerprints", "must be between 1 and 1000");
        }
        if !(100..=3_600_000).contains(&self.check_interval_ms) {
            return err("check_interval_ms", "must be between 100 and 3600000");
        }
        if !(1..=600_000).contains(&self.check_timeout_ms) {
            return err("check_timeout_ms", "must be between 1 and 600000");
        }
        for (k, v) in [
            ("check_user", &self.check_user),
            ("check_database", &self.check_database),
        ] {
            if v.as_deref()
                .is_some_and(|v| v.is_empty() || v.contains('\0'))
            {
                return err(k, "must be a non-empty name without NUL");
            }
        }
        Ok(())
    }
}
