//! Configuration: the TOML file, its validation, and where an error is.
//!
//! Every rejection names the key and the line, because an operator editing
//! a live proxy's file needs to know exactly what to fix. Validation opens
//! the files the config points at (certificates, passfiles, token files) so
//! that `pgshift check` catches what would otherwise fail at first use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod hosts;
pub mod require_auth;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: ListenConfig,
    pub source: UpstreamConfig,
    pub target: UpstreamConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Write mirroring; absent = no mirror (and no spool directory).
    #[serde(default)]
    pub mirror: Option<MirrorConfig>,
    #[serde(default)]
    pub audit: AuditConfig,
    /// Read routing; every key changes live.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Shadow reads and result diffing; all but the sizes and the log path
    /// change live.
    #[serde(default)]
    pub shadow: ShadowConfig,
    /// The health monitor and automatic failback; every key changes live.
    #[serde(default)]
    pub failback: FailbackConfig,
    /// Recording client sessions for `pgshift replay`; every key changes
    /// live.
    #[serde(default)]
    pub record: RecordConfig,
}

/// Recording every client session's frontend messages into a capture (see
/// `record` and docs/record-replay.md). Off while `path` is unset.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RecordConfig {
    /// Base path of the capture: segments are `<path>.000001`, ... A
    /// recording never overwrites: if the first segment exists, it does not
    /// start (status says why).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Replace Bind and FunctionCall parameter values by NULL.
    #[serde(default)]
    pub redact_parameters: bool,
    /// A segment is closed and the next begun once it holds this much.
    #[serde(default = "default_record_max_file_bytes")]
    pub max_file_bytes: u64,
    /// Segments kept (the oldest are deleted); 0 keeps every segment.
    #[serde(default)]
    pub max_files: u32,
    /// Memory for recorded bytes not yet written, across all worker
    /// threads: when a thread's share is full, the session that could not
    /// be recorded stops being recorded (counted), and clients never wait.
    #[serde(default = "default_record_buffer_bytes")]
    pub buffer_bytes: usize,
    /// Largest message recorded; a session sending a larger one stops
    /// being recorded there (its capture is a prefix, marked incomplete).
    #[serde(default = "default_record_max_message_bytes")]
    pub max_message_bytes: usize,
}

impl Default for RecordConfig {
    fn default() -> Self {
        Self {
            path: None,
            redact_parameters: false,
            max_file_bytes: default_record_max_file_bytes(),
            max_files: 0,
            buffer_bytes: default_record_buffer_bytes(),
            max_message_bytes: default_record_max_message_bytes(),
        }
    }
}

fn default_record_max_file_bytes() -> u64 {
    256 << 20
}
fn default_record_buffer_bytes() -> usize {
    64 << 20
}
fn default_record_max_message_bytes() -> usize {
    16 << 20
}

impl RecordConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: &str| Err((format!("record.{k}"), m.to_string()));
        if self
            .path
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty() || p.is_dir())
        {
            return err(
                "path",
                "must be a file path (segments are <path>.000001, ...), not empty or a directory",
            );
        }
        if !((1 << 20)..=(1 << 40)).contains(&self.max_file_bytes) {
            return err("max_file_bytes", "must be between 1048576 (1 MiB) and 2^40");
        }
        if self.max_files > 1_000_000 {
            return err("max_files", "must be at most 1000000 (0 = keep all)");
        }
        if !((1 << 20)..=(1 << 34)).contains(&self.buffer_bytes) {
            return err("buffer_bytes", "must be between 1048576 (1 MiB) and 2^34");
        }
        if !((64 << 10)..=(1 << 30)).contains(&self.max_message_bytes) {
            return err("max_message_bytes", "must be between 65536 and 1073741824");
        }
        Ok(())
    }
}

/// When the target misbehaves, reads move back to the source by themselves
/// (see `health`). A threshold of 0 turns its rule off.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FailbackConfig {
    /// Off: the windows are still measured and shown, nothing trips.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Length of the rolling windows the rules look at.
    #[serde(default = "default_fb_window_s")]
    pub window_s: u64,
    /// Requests the target must have in the window before a rate or
    /// latency rule may trip.
    #[serde(default = "default_fb_min_samples")]
    pub min_samples: u64,
    /// Trip when the target's share of failed requests is above this (0 to
    /// 1; 0 = rule off).
    #[serde(default = "default_fb_error_rate")]
    pub max_error_rate: f64,
    /// Trip when the target's p95 read latency is above this (0 = off).
    #[serde(default)]
    pub max_p95_ms: f64,
    /// Trip when the target's p95 is above this many times the source's
    /// over the same window (0 = off) ...
    #[serde(default = "default_fb_p95_ratio")]
    pub max_p95_ratio: f64,
    /// ... and above this floor, so sub-millisecond jitter never trips it.
    #[serde(default = "default_fb_ratio_floor_ms")]
    pub ratio_floor_ms: f64,
    /// Trip when the mirror is further behind than this (stale reads;
    /// 0 = off).
    #[serde(default = "default_fb_lag_s")]
    pub max_mirror_lag_s: f64,
    /// Trip when this many health checks of the target fail in a row
    /// (0 = off): a dead target trips even with no reads routed to it.
    #[serde(default = "default_fb_check_failures")]
    pub check_failures: u32,
    /// "auto": probe and ramp back after `cooldown_s`; "manual": wait for
    /// `POST /resume` (`pgshift ctl resume`).
    #[serde(default)]
    pub recovery: Recovery,
    /// Quiet time after a trip before the first probe.
    #[serde(default = "default_fb_cooldown_s")]
    pub cooldown_s: u64,
    /// The share of reads the first probe step sends to the target
    /// (capped by `routing.read_percent`); each later step doubles it.
    #[serde(default = "default_fb_probe_percent")]
    pub probe_percent: f64,
    /// How long each probe step must stay quiet before the next one.
    #[serde(default = "default_fb_step_s")]
    pub step_s: u64,
    /// When the trouble is confined to a few query shapes, fail back only
    /// those (up to `max_fingerprints`) and keep routing the rest.
    #[serde(default)]
    pub per_fingerprint: bool,
    #[serde(default = "default_fb_max_fingerprints")]
    pub max_fingerprints: usize,
    /// Period of the health checks of both backends (`SELECT 1` on a kept
    /// connection, connecting again after a failure).
    #[serde(default = "default_fb_check_interval_ms")]
    pub check_interval_ms: u64,
    /// A check with no answer within this fails.
    #[serde(default = "default_fb_check_timeout_ms")]
    pub check_timeout_ms: u64,
    /// Who the checks log in as; unset: the user of the most recent client
    /// session (before any session, a check only connects).
    #[serde(default)]
    pub check_user: Option<String>,
    /// The database the checks log in to; unset: the maintenance database
    /// `postgres` (never a client's own, which it may need to itself).
    #[serde(default)]
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
            window_s: default_fb_window_s(),
            min_samples: default_fb_min_samples(),
            max_error_rate: default_fb_error_rate(),
            max_p95_ms: 0.0,
            max_p95_ratio: default_fb_p95_ratio(),
            ratio_floor_ms: default_fb_ratio_floor_ms(),
            max_mirror_lag_s: default_fb_lag_s(),
            check_failures: default_fb_check_failures(),
            recovery: Recovery::Auto,
            cooldown_s: default_fb_cooldown_s(),
            probe_percent: default_fb_probe_percent(),
            step_s: default_fb_step_s(),
            per_fingerprint: false,
            max_fingerprints: default_fb_max_fingerprints(),
            check_interval_ms: default_fb_check_interval_ms(),
            check_timeout_ms: default_fb_check_timeout_ms(),
            check_user: None,
            check_database: None,
        }
    }
}

fn default_fb_window_s() -> u64 {
    10
}
fn default_fb_min_samples() -> u64 {
    50
}
fn default_fb_error_rate() -> f64 {
    0.05
}
fn default_fb_p95_ratio() -> f64 {
    3.0
}
fn default_fb_ratio_floor_ms() -> f64 {
    10.0
}
fn default_fb_lag_s() -> f64 {
    30.0
}
fn default_fb_check_failures() -> u32 {
    3
}
fn default_fb_cooldown_s() -> u64 {
    30
}
fn default_fb_probe_percent() -> f64 {
    5.0
}
fn default_fb_step_s() -> u64 {
    10
}
fn default_fb_max_fingerprints() -> usize {
    5
}
fn default_fb_check_interval_ms() -> u64 {
    1_000
}
fn default_fb_check_timeout_ms() -> u64 {
    3_000
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

/// Shadow reads: a sampled share of eligible reads also runs on the other
/// database and the answers are compared (see `shadow`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// Share of eligible reads shadowed, 0 to 100 (fractions allowed).
    #[serde(default)]
    pub sample_percent: f64,
    /// Shadow reads running at once (restart to change).
    #[serde(default = "default_shadow_inflight")]
    pub max_inflight: usize,
    /// Shadow reads waiting for a slot; more are skipped and counted
    /// (restart to change).
    #[serde(default = "default_shadow_queue")]
    pub queue: usize,
    /// A shadow read (or re-check) with no complete answer within this is
    /// skipped and counted.
    #[serde(default = "default_shadow_timeout_ms")]
    pub timeout_ms: u64,
    /// How long a shadow read on the target waits for the mirror to apply
    /// what the source had acknowledged; longer is skipped and counted.
    #[serde(default = "default_shadow_max_wait_ms")]
    pub max_wait_ms: u64,
    /// Pause before a mismatch is re-checked on both sides.
    #[serde(default = "default_shadow_recheck_ms")]
    pub recheck_delay_ms: u64,
    /// Relative tolerance for float (and numeric) values: equal when
    /// |a - b| <= tolerance * max(1, |a|, |b|). 0 = exact (after rounding
    /// float8 to 15 significant digits).
    #[serde(default)]
    pub float_tolerance: f64,
    /// Columns left out of every comparison: `column` (any table) or
    /// `table.column` (the table the column comes from).
    #[serde(default)]
    pub ignore_columns: Vec<String>,
    /// Rows per result compared one by one; the rest are compared by count
    /// and a combined hash.
    #[serde(default = "default_shadow_max_rows")]
    pub max_rows_compared: usize,
    /// Leave bind parameters out of the mismatch log and API.
    #[serde(default)]
    pub redact_parameters: bool,
    /// JSON-lines file of confirmed mismatches (restart to change).
    #[serde(default = "default_mismatch_log")]
    pub mismatch_log: PathBuf,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        Self {
            sample_percent: 0.0,
            max_inflight: default_shadow_inflight(),
            queue: default_shadow_queue(),
            timeout_ms: default_shadow_timeout_ms(),
            max_wait_ms: default_shadow_max_wait_ms(),
            recheck_delay_ms: default_shadow_recheck_ms(),
            float_tolerance: 0.0,
            ignore_columns: Vec::new(),
            max_rows_compared: default_shadow_max_rows(),
            redact_parameters: false,
            mismatch_log: default_mismatch_log(),
        }
    }
}

fn default_shadow_inflight() -> usize {
    8
}
fn default_shadow_queue() -> usize {
    256
}
fn default_shadow_timeout_ms() -> u64 {
    5_000
}
fn default_shadow_max_wait_ms() -> u64 {
    2_000
}
fn default_shadow_recheck_ms() -> u64 {
    200
}
fn default_shadow_max_rows() -> usize {
    100_000
}
fn default_mismatch_log() -> PathBuf {
    PathBuf::from("pgshift-mismatches.jsonl")
}

impl ShadowConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: &str| Err((format!("shadow.{k}"), m.to_string()));
        if !(0.0..=100.0).contains(&self.sample_percent) {
            return err("sample_percent", "must be between 0 and 100");
        }
        if !(1..=1024).contains(&self.max_inflight) {
            return err("max_inflight", "must be between 1 and 1024");
        }
        if !(1..=100_000).contains(&self.queue) {
            return err("queue", "must be between 1 and 100000");
        }
        if !(1..=3_600_000).contains(&self.timeout_ms) {
            return err("timeout_ms", "must be between 1 and 3600000");
        }
        if self.max_wait_ms > 3_600_000 {
            return err("max_wait_ms", "must be at most 3600000");
        }
        if self.recheck_delay_ms > 600_000 {
            return err("recheck_delay_ms", "must be at most 600000");
        }
        if !(0.0..1.0).contains(&self.float_tolerance) {
            return err("float_tolerance", "must be at least 0 and below 1");
        }
        if !(1..=100_000_000).contains(&self.max_rows_compared) {
            return err("max_rows_compared", "must be between 1 and 100000000");
        }
        for c in &self.ignore_columns {
            let parts: Vec<&str> = c.split('.').collect();
            if parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
                return err("ignore_columns", "each entry is `column` or `table.column`");
            }
        }
        if self.mismatch_log.as_os_str().is_empty() {
            return err("mismatch_log", "must not be empty");
        }
        Ok(())
    }
}

/// Which reads go to the target (see `router`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Share of eligible reads sent to the target, 0 to 100 (fractions allowed).
    #[serde(default)]
    pub read_percent: f64,
    /// What is hashed to decide: one decision per session, per user, ...
    #[serde(default)]
    pub hash_key: HashKey,
    /// With `hash_key = "comment"`: the sqlcommenter key holding the value.
    #[serde(default = "default_comment_key")]
    pub comment_key: String,
    /// A routed read with no complete answer from the target within this
    /// runs on the source instead.
    #[serde(default = "default_target_timeout_ms")]
    pub target_timeout_ms: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            read_percent: 0.0,
            hash_key: HashKey::default(),
            comment_key: default_comment_key(),
            target_timeout_ms: default_target_timeout_ms(),
        }
    }
}

/// What a routing decision hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    #[default]
    Session,
    User,
    ApplicationName,
    ClientAddr,
    /// A key in the query's sqlcommenter comment, else the session.
    Comment,
}

fn default_comment_key() -> String {
    "route_key".into()
}
fn default_target_timeout_ms() -> u64 {
    2_000
}

impl RoutingConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: &str| Err((k.to_string(), m.to_string()));
        if !(0.0..=100.0).contains(&self.read_percent) {
            return err("routing.read_percent", "must be between 0 and 100");
        }
        if self.comment_key.is_empty()
            || !self
                .comment_key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            return err(
                "routing.comment_key",
                "must be a non-empty name of letters, digits, '_', '-' or '.'",
            );
        }
        if !(1..=3_600_000).contains(&self.target_timeout_ms) {
            return err("routing.target_timeout_ms", "must be between 1 and 3600000");
        }
        Ok(())
    }
}

/// The audit log (see `audit`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// JSON-lines file every change is appended to before it takes effect.
    #[serde(default = "default_audit_path")]
    pub path: PathBuf,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            path: default_audit_path(),
        }
    }
}

fn default_audit_path() -> PathBuf {
    PathBuf::from("pgshift-audit.jsonl")
}

/// What the mirror does when the spool reaches `max_spool_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Stop mirroring and record the gap: the target needs a re-sync.
    StopMirroring,
    /// Hold commit acknowledgements until the spool has room.
    Backpressure,
}

/// When the mirror's spool reaches stable storage (`mirror.fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// Every unit, and the in-flight journal entry of every commit, is on
    /// stable storage before the commit is acknowledged (one fdatasync
    /// serves every session waiting at that moment).
    #[default]
    Commit,
    /// Every `fsync_interval_ms`: a machine crash can lose that window
    /// (recorded as a gap at the next start).
    Interval,
    /// Left to the operating system (a proxy crash loses nothing; a
    /// machine crash can lose anything not yet written back).
    Off,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// Mirror writes to the target. Can be switched live (SIGHUP).
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_spool_dir")]
    pub spool_dir: PathBuf,
    #[serde(default = "default_max_spool_bytes")]
    pub max_spool_bytes: u64,
    #[serde(default = "default_on_full")]
    pub on_full: OnFull,
    /// Functions that write, so `SELECT f()` is mirrored (and never routed).
    #[serde(default)]
    pub write_functions: Vec<String>,
    /// Largest unit of work captured whole in memory.
    #[serde(default = "default_max_txn_bytes")]
    pub max_txn_bytes: usize,
    /// When a spooled unit is on stable storage: before the client sees
    /// its commit (`commit`, grouped across sessions), within
    /// `fsync_interval_ms` (`interval`), or when the OS writes it (`off`).
    #[serde(default)]
    pub fsync: FsyncPolicy,
    /// With `fsync = "interval"`: flush the spool to stable storage this often.
    #[serde(default = "default_fsync_interval_ms")]
    pub fsync_interval_ms: u64,
    /// JSON-lines log of divergences (default: `<spool_dir>/divergences.jsonl`).
    pub divergence_log: Option<PathBuf>,
    /// How long one unit may take on the target before it counts as failed.
    #[serde(default = "default_apply_timeout_ms")]
    pub apply_timeout_ms: u64,
    /// Exact values for writes that cannot be replayed to the same values
    /// (serial ids, clock and random defaults): applied from the source's
    /// row images (logical decoding). See docs/mirroring.md.
    #[serde(default)]
    pub row_images: RowImagesConfig,
}

/// `[mirror.row_images]`: where units whose statements would not give the
/// target the source's values are applied from the rows the source wrote,
/// read by logical decoding (`test_decoding`) on a slot per database.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RowImagesConfig {
    /// Source databases to read row images from (a replication slot each,
    /// made at start). Empty: none (such writes stay flagged).
    #[serde(default)]
    pub databases: Vec<String>,
    /// The source role that reads them: it needs the REPLICATION attribute
    /// (password from `source.passfile`).
    #[serde(default = "default_row_images_user")]
    pub user: String,
    /// How long a unit waits for its row images while the stream makes no
    /// progress before it is replayed as statements instead (and flagged).
    /// A stream that is behind but moving is waited for.
    #[serde(default = "default_row_images_wait_ms")]
    pub wait_ms: u64,
    /// Decoded transactions held for the applier, at most; past it the
    /// stream waits (and the slot keeps the source's WAL meanwhile).
    #[serde(default = "default_row_images_buffer")]
    pub max_buffer_bytes: usize,
    /// How often the target's sequences are brought to the source's values.
    #[serde(default = "default_sequence_sync_ms")]
    pub sequence_sync_ms: u64,
}

impl Default for RowImagesConfig {
    fn default() -> Self {
        Self {
            databases: Vec::new(),
            user: default_row_images_user(),
            wait_ms: default_row_images_wait_ms(),
            max_buffer_bytes: default_row_images_buffer(),
            sequence_sync_ms: default_sequence_sync_ms(),
        }
    }
}

fn default_row_images_user() -> String {
    "postgres".into()
}
fn default_row_images_wait_ms() -> u64 {
    5_000
}
fn default_row_images_buffer() -> usize {
    64 << 20
}
fn default_sequence_sync_ms() -> u64 {
    1_000
}

impl Default for MirrorConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            spool_dir: default_spool_dir(),
            max_spool_bytes: default_max_spool_bytes(),
            on_full: default_on_full(),
            write_functions: Vec::new(),
            max_txn_bytes: default_max_txn_bytes(),
            fsync: FsyncPolicy::default(),
            fsync_interval_ms: default_fsync_interval_ms(),
            divergence_log: None,
            apply_timeout_ms: default_apply_timeout_ms(),
            row_images: RowImagesConfig::default(),
        }
    }
}

impl MirrorConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: &str| Err((k.to_string(), m.to_string()));
        if !((1 << 20)..=(1 << 50)).contains(&self.max_spool_bytes) {
            return err(
                "mirror.max_spool_bytes",
                "must be between 1048576 (1 MiB) and 2^50",
            );
        }
        if !((64 << 10)..=(1 << 30)).contains(&self.max_txn_bytes) {
            return err(
                "mirror.max_txn_bytes",
                "must be between 65536 and 1073741824",
            );
        }
        if !(100..=3_600_000).contains(&self.apply_timeout_ms) {
            return err("mirror.apply_timeout_ms", "must be between 100 and 3600000");
        }
        if !(1..=3_600_000).contains(&self.fsync_interval_ms) {
            return err("mirror.fsync_interval_ms", "must be between 1 and 3600000");
        }
        if self.spool_dir.as_os_str().is_empty() {
            return err("mirror.spool_dir", "must not be empty");
        }
        if let Some(f) = self
            .write_functions
            .iter()
            .find(|f| f.trim().is_empty() || f.contains(char::is_whitespace))
        {
            return Err((
                "mirror.write_functions".into(),
                format!("{f:?} is not a function name"),
            ));
        }
        let r = &self.row_images;
        if let Some(d) = r
            .databases
            .iter()
            .find(|d| d.is_empty() || d.contains('\0'))
        {
            return Err((
                "mirror.row_images.databases".into(),
                format!("{d:?} is not a database name"),
            ));
        }
        if r.user.is_empty() || r.user.contains('\0') {
            return err("mirror.row_images.user", "must be a role name");
        }
        if !(1..=600_000).contains(&r.wait_ms) {
            return err("mirror.row_images.wait_ms", "must be between 1 and 600000");
        }
        if !((1 << 20)..=(1 << 34)).contains(&r.max_buffer_bytes) {
            return err(
                "mirror.row_images.max_buffer_bytes",
                "must be between 1048576 and 17179869184",
            );
        }
        if !(100..=3_600_000).contains(&r.sequence_sync_ms) {
            return err(
                "mirror.row_images.sequence_sync_ms",
                "must be between 100 and 3600000",
            );
        }
        Ok(())
    }
}

fn default_spool_dir() -> PathBuf {
    PathBuf::from("pgshift-spool")
}
fn default_max_spool_bytes() -> u64 {
    1 << 30
}
fn default_on_full() -> OnFull {
    OnFull::StopMirroring
}
fn default_max_txn_bytes() -> usize {
    64 << 20
}
fn default_fsync_interval_ms() -> u64 {
    1000
}
fn default_apply_timeout_ms() -> u64 {
    30_000
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Session worker threads, each a single-threaded runtime (0 = one per core).
    #[serde(default)]
    pub worker_threads: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    pub addr: SocketAddr,
    /// PEM certificate chain and key: when both are set, clients may use TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// libpq's sslmode values that make sense for a proxy's own connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, plain otherwise; no verification.
    Prefer,
    /// TLS or fail; the certificate is not verified.
    Require,
    /// TLS, certificate chain verified against `sslrootcert`, host name not checked.
    VerifyCa,
    /// TLS, chain verified against `sslrootcert` and the host name checked.
    VerifyFull,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub host: String,
    pub port: u16,
    #[serde(default = "default_sslmode")]
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    /// pgpass-format credentials for the proxy's own logins (target only).
    pub passfile: Option<PathBuf>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Target only: open one connection to the target per client session.
    #[serde(default = "default_true")]
    pub session_links: bool,
    /// Target only: seconds between liveness pings on an idle session link.
    #[serde(default = "default_keepalive_s")]
    pub keepalive_s: u64,
    /// Authentication methods the proxy's own logins accept from this
    /// server, as libpq's `require_auth` (default: not `password`).
    #[serde(default)]
    pub require_auth: crate::config::require_auth::RequireAuth,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Where the admin HTTP API listens; omit to disable it.
    #[serde(default = "default_admin_addr")]
    pub addr: Option<SocketAddr>,
    /// A file holding the bearer token every admin request must carry
    /// (owner-only: a file group or others may read is refused).
    pub token_file: Option<PathBuf>,
    /// Host names (or `name:port`) accepted in the Host header besides the
    /// listen address, `localhost`, `127.0.0.1` and `[::1]`: every other
    /// Host is refused (421), against DNS rebinding.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Show statement texts, parameters and rows in `/status`,
    /// `/mismatches` and `/audit` as they are; needs `token_file`.
    /// Otherwise literals are replaced by `$n` and data by `<redacted>`.
    #[serde(default)]
    pub show_data: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            addr: default_admin_addr(),
            token_file: None,
            allowed_hosts: Vec::new(),
            show_data: false,
        }
    }
}

impl AdminConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((format!("admin.{k}"), m));
        if self.show_data && self.token_file.is_none() {
            return err(
                "show_data",
                "needs admin.token_file: data is only shown to requests that carry the token"
                    .into(),
            );
        }
        if let Some(h) = self
            .allowed_hosts
            .iter()
            .find(|h| !hosts::valid_allowed_host(h))
        {
            return err(
                "allowed_hosts",
                format!(
                    "{h:?} is not a host name, IP address or [IPv6] address with an optional :port"
                ),
            );
        }
        match (self.addr, &self.token_file) {
            (Some(addr), None) if !addr.ip().is_loopback() => err(
                "addr",
                "without admin.token_file the admin API may only listen on a loopback address"
                    .into(),
            ),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "default_max_clients")]
    pub max_client_connections: usize,
    /// Time a client has from connecting to its first ReadyForQuery.
    #[serde(default = "default_startup_timeout_ms")]
    pub startup_timeout_ms: u64,
    /// Close a client session silent for this long (0 = never, as Postgres).
    #[serde(default)]
    pub idle_timeout_s: u64,
    /// Largest message the proxy buffers whole to inspect it (Query, Parse).
    /// Messages it only forwards stream through under Postgres' own 1 GiB bound.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// On SIGTERM, how long open transactions may take to finish.
    #[serde(default = "default_shutdown_timeout_s")]
    pub shutdown_timeout_s: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_client_connections: default_max_clients(),
            startup_timeout_ms: default_startup_timeout_ms(),
            idle_timeout_s: 0,
            max_message_bytes: default_max_message_bytes(),
            shutdown_timeout_s: default_shutdown_timeout_s(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter (`info`, `pgshift=debug`, ...); `RUST_LOG` wins.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_log_level(),
        }
    }
}

fn default_sslmode() -> SslMode {
    SslMode::Prefer
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_true() -> bool {
    true
}
fn default_keepalive_s() -> u64 {
    30
}
fn default_admin_addr() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9930)))
}
fn default_max_clients() -> usize {
    10_000
}
fn default_startup_timeout_ms() -> u64 {
    10_000
}
fn default_max_message_bytes() -> usize {
    256 << 20
}
fn default_shutdown_timeout_s() -> u64 {
    30
}
fn default_log_level() -> String {
    "info".into()
}

/// A rejected config: which key, on which line, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub key: Option<String>,
    pub line: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads, parses and validates a config file (syntax and values only:
    /// the files it names are read by `preflight::load`, which `check`,
    /// `run` and every reload use).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_checked(path, |_| Ok(()))
    }

    /// `load`, then `check` on the result; an error it returns (a key and
    /// a message) is reported with that key's line like any other.
    pub fn load_checked(
        path: &Path,
        check: impl FnOnce(&Config) -> Result<(), (String, String)>,
    ) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: None,
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse_checked(&text, &file, path.parent(), check)
    }

    /// Parses and validates config text; relative paths resolve against `base`.
    pub fn parse(text: &str, file: &str, base: Option<&Path>) -> Result<Config, ConfigError> {
        Self::parse_checked(text, file, base, |_| Ok(()))
    }

    /// `parse`, then `check` (see `load_checked`).
    pub fn parse_checked(
        text: &str,
        file: &str,
        base: Option<&Path>,
        check: impl FnOnce(&Config) -> Result<(), (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            let (key, line) = match e.span() {
                Some(span) => locate_span(text, span.start),
                None => (None, None),
            };
            ConfigError {
                file: file.into(),
                key,
                line,
                message: e.message().trim().to_string(),
            }
        })?;
        if let Some(base) = base.filter(|b| !b.as_os_str().is_empty()) {
            cfg.resolve_paths(base);
        }
        cfg.validate()
            .and_then(|()| check(&cfg))
            .map_err(|(key, message)| ConfigError {
                file: file.into(),
                line: line_of_key(text, &key),
                key: Some(key),
                message,
            })?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut Option<PathBuf>| {
            if let Some(p) = p.as_mut().filter(|p| p.is_relative()) {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.listen.tls_cert);
        fix(&mut self.listen.tls_key);
        for u in [&mut self.source, &mut self.target] {
            fix(&mut u.sslrootcert);
            fix(&mut u.passfile);
        }
        fix(&mut self.admin.token_file);
        if self.audit.path.is_relative() {
            self.audit.path = base.join(&self.audit.path);
        }
        if self.shadow.mismatch_log.is_relative() {
            self.shadow.mismatch_log = base.join(&self.shadow.mismatch_log);
        }
        fix(&mut self.record.path);
        if let Some(m) = self.mirror.as_mut() {
            fix(&mut m.divergence_log);
            if m.spool_dir.is_relative() {
                m.spool_dir = base.join(&m.spool_dir);
            }
        }
    }

    /// Semantic checks; the error names the offending key.
    fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((k.to_string(), m));
        if self.audit.path.as_os_str().is_empty() {
            return err("audit.path", "must not be empty".into());
        }
        match (&self.listen.tls_cert, &self.listen.tls_key) {
            (Some(_), None) => {
                return err(
                    "listen.tls_key",
                    "tls_cert is set but tls_key is not".into(),
                )
            }
            (None, Some(_)) => {
                return err(
                    "listen.tls_cert",
                    "tls_key is set but tls_cert is not".into(),
                )
            }
            (Some(_), Some(_)) | (None, None) => {}
        }
        for (name, u) in [("source", &self.source), ("target", &self.target)] {
            if u.host.is_empty() {
                return err(&format!("{name}.host"), "must not be empty".into());
            }
            if u.sslmode == SslMode::VerifyFull
                && rustls::pki_types::ServerName::try_from(u.host.as_str()).is_err()
            {
                return err(
                    &format!("{name}.host"),
                    format!(
                        "{:?} is not a valid DNS name or IP address, so sslmode verify-full cannot check the server's certificate against it",
                        u.host
                    ),
                );
            }
            if u.port == 0 {
                return err(
                    &format!("{name}.port"),
                    "must be between 1 and 65535".into(),
                );
            }
            if !(1..=600_000).contains(&u.connect_timeout_ms) {
                return err(
                    &format!("{name}.connect_timeout_ms"),
                    "must be between 1 and 600000".into(),
                );
            }
            if matches!(u.sslmode, SslMode::VerifyCa | SslMode::VerifyFull)
                && u.sslrootcert.is_none()
            {
                return err(
                    &format!("{name}.sslrootcert"),
                    "verify-ca and verify-full need a CA file".into(),
                );
            }
        }
        if let Some(m) = &self.mirror {
            m.validate()?;
        }
        self.routing.validate()?;
        self.shadow.validate()?;
        self.failback.validate()?;
        self.record.validate()?;
        if !(1..=86_400).contains(&self.target.keepalive_s) {
            return err("target.keepalive_s", "must be between 1 and 86400".into());
        }
        self.admin.validate()?;
        let l = &self.limits;
        if !(1..=1_000_000).contains(&l.max_client_connections) {
            return err(
                "limits.max_client_connections",
                "must be between 1 and 1000000".into(),
            );
        }
        if !(1..=3_600_000).contains(&l.startup_timeout_ms) {
            return err(
                "limits.startup_timeout_ms",
                "must be between 1 and 3600000".into(),
            );
        }
        if l.idle_timeout_s > 31_536_000 {
            return err(
                "limits.idle_timeout_s",
                "must be at most 31536000 (0 = never)".into(),
            );
        }
        if l.shutdown_timeout_s > 86_400 {
            return err("limits.shutdown_timeout_s", "must be at most 86400".into());
        }
        if !(1024..=(1 << 30)).contains(&l.max_message_bytes) {
            return err(
                "limits.max_message_bytes",
                "must be between 1024 and 1073741824".into(),
            );
        }
        if self.runtime.worker_threads > 1024 {
            return err(
                "runtime.worker_threads",
                "must be at most 1024 (0 = one per core)".into(),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return err("log.level", format!("not a valid filter: {e}"));
        }
        Ok(())
    }
}

/// 1-based line of a byte offset.
fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// For a parse error at `offset`: the dotted key written on that line (under
/// the nearest table header above it) and the line number.
fn locate_span(text: &str, offset: usize) -> (Option<String>, Option<usize>) {
    let line_no = line_at(text, offset);
    let mut table = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if i + 1 == line_no {
            if t.starts_with('[') {
                return (
                    Some(t.trim_matches(|c| c == '[' || c == ']').trim().to_string()),
                    Some(line_no),
                );
            }
            let key = t
                .split('=')
                .next()
                .map(str::trim)
                .filter(|k| !k.is_empty() && !k.starts_with('#'));
            let key = key.map(|k| {
                if table.is_empty() {
                    k.to_string()
                } else {
                    format!("{table}.{k}")
                }
            });
            return (key.or(Some(table).filter(|t| !t.is_empty())), Some(line_no));
        }
        if t.starts_with('[') && !t.starts_with("[[") {
            table = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        }
    }
    (None, Some(line_no))
}

/// Line where a dotted key (or, failing that, its nearest parent) is written.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let doc = toml_edit::Document::parse(text).ok()?;
    let mut item = doc.as_item();
    let mut best = None;
    for part in key.split('.') {
        match item.get(part) {
            Some(next) => {
                item = next;
                if let Some(span) = item.span() {
                    best = Some(line_at(text, span.start));
                } else if let Some(span) = item.as_table().and_then(|t| t.span()) {
                    best = Some(line_at(text, span.start));
                }
            }
            None => break,
        }
    }
    best
}

/// The smallest valid config (the three required sections), for tests
/// here and in `preflight`.
#[cfg(test)]
pub(crate) const MINIMAL_CONFIG: &str = r#"
[listen]
addr = "127.0.0.1:6432"

[source]
host = "127.0.0.1"
port = 54321

[target]
host = "127.0.0.1"
port = 54322
"#;

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = MINIMAL_CONFIG;

    #[test]
    fn the_example_proxy_toml_is_valid_and_mirrors() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(root.join("proxy.toml")).unwrap();
        let c = Config::parse(&text, "proxy.toml", Some(root)).unwrap();
        let m = c.mirror.expect("proxy.toml has a [mirror] section");
        assert!(m.enabled);
        assert_eq!(m.spool_dir, root.join(".pgshift/spool"));
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, "t.toml", None).unwrap();
        assert_eq!(c.source.sslmode, SslMode::Prefer);
        assert_eq!(c.admin.addr, Some("127.0.0.1:9930".parse().unwrap()));
        assert_eq!(c.limits.max_client_connections, 10_000);
        assert!(c.target.session_links);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = MINIMAL.replace("port = 54322", "port = 54322\nprot = 1");
        let e = Config::parse(&text, "t.toml", None).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("target.prot"));
        assert_eq!(e.line, Some(12));
        assert!(e.message.contains("unknown field"), "{}", e.message);
        assert!(
            e.to_string().starts_with("t.toml:12: key `target.prot`"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let text = MINIMAL.replace("port = 54321", "port = \"x\"");
        let e = Config::parse(&text, "t.toml", None).unwrap_err();
        assert_eq!((e.key.as_deref(), e.line), (Some("source.port"), Some(7)));
    }

    #[test]
    fn semantic_error_names_key_and_line() {
        let text = MINIMAL.replace("port = 54321", "port = 54321\nsslmode = \"verify-full\"");
        let e = Config::parse(&text, "t.toml", None).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("source.sslrootcert"));
        // The key is absent: the line of its table is the best location.
        assert_eq!(e.line, Some(5));
        let text = MINIMAL.replace("port = 54322", "port = 0");
        let e = Config::parse(&text, "t.toml", None).unwrap_err();
        assert_eq!((e.key.as_deref(), e.line), (Some("target.port"), Some(11)));
    }

    #[test]
    fn a_public_admin_address_without_a_token_is_rejected() {
        let text = format!("{MINIMAL}\n[admin]\naddr = \"0.0.0.0:9930\"\n");
        let e = Config::parse(&text, "t", None).unwrap_err();
        assert_eq!((e.key.as_deref(), e.line), (Some("admin.addr"), Some(14)));
    }

    #[test]
    fn shadow_keys_are_checked_with_their_line() {
        for (line, key) in [
            ("sample_percent = 101", "shadow.sample_percent"),
            ("max_inflight = 0", "shadow.max_inflight"),
            ("float_tolerance = 1.5", "shadow.float_tolerance"),
            ("ignore_columns = [\"a.b.c\"]", "shadow.ignore_columns"),
            ("max_rows_compared = 0", "shadow.max_rows_compared"),
        ] {
            let text = format!("{MINIMAL}\n[shadow]\n{line}\n");
            let e = Config::parse(&text, "t", None).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{line}");
            assert_eq!(e.line, Some(14), "{line}");
        }
        let text = format!("{MINIMAL}\n[shadow]\nsample_percent = 2.5\nignore_columns = [\"updated_at\", \"t.c\"]\n");
        let c = Config::parse(&text, "t", None).unwrap();
        assert_eq!(c.shadow.sample_percent, 2.5);
        assert_eq!(c.shadow.ignore_columns.len(), 2);
    }

    #[test]
    fn failback_keys_are_checked_with_their_line() {
        for (line, key) in [
            ("max_error_rate = 1.5", "failback.max_error_rate"),
            ("max_p95_ratio = 0.5", "failback.max_p95_ratio"),
            ("window_s = 0", "failback.window_s"),
            ("probe_percent = 0", "failback.probe_percent"),
            ("check_interval_ms = 5", "failback.check_interval_ms"),
            ("recovery = \"sometimes\"", "failback.recovery"),
        ] {
            let text = format!("{MINIMAL}\n[failback]\n{line}\n");
            let e = Config::parse(&text, "t", None).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{line}");
            assert_eq!(e.line, Some(14), "{line}");
        }
        let text = format!("{MINIMAL}\n[failback]\nrecovery = \"manual\"\nmax_p95_ms = 20\n");
        let c = Config::parse(&text, "t", None).unwrap();
        assert_eq!(c.failback.recovery, Recovery::Manual);
        assert_eq!(c.failback.max_p95_ms, 20.0);
        assert_eq!(
            Config::parse(MINIMAL, "t", None).unwrap().failback,
            FailbackConfig::default()
        );
    }

    #[test]
    fn missing_section_is_reported() {
        let text = MINIMAL.replace("[target]\nhost = \"127.0.0.1\"\nport = 54322\n", "");
        let e = Config::parse(&text, "t", None).unwrap_err();
        assert!(e.message.contains("target"), "{e}");
    }

    #[test]
    fn verify_full_needs_a_host_a_certificate_can_name() {
        let text = MINIMAL.replace(
            "host = \"127.0.0.1\"\nport = 54322",
            "host = \"db host\"\nport = 54322\nsslmode = \"verify-full\"",
        );
        let e = Config::parse(&text, "t", None).unwrap_err();
        assert_eq!((e.key.as_deref(), e.line), (Some("target.host"), Some(10)));
        assert!(e.message.contains("not a valid DNS name"), "{e}");
        // Other modes do not check the name: the host is only resolved.
        let text = MINIMAL.replace(
            "host = \"127.0.0.1\"\nport = 54322",
            "host = \"db host\"\nport = 54322",
        );
        Config::parse(&text, "t", None).unwrap();
    }

    #[test]
    fn require_auth_is_checked_with_its_line_and_defaults_to_no_cleartext() {
        use crate::config::require_auth::AuthMethod;
        let c = Config::parse(MINIMAL, "t", None).unwrap();
        for u in [&c.source, &c.target] {
            assert!(!u.require_auth.allows(AuthMethod::Password));
            assert!(u.require_auth.allows(AuthMethod::ScramSha256));
        }
        let text = MINIMAL.replace(
            "port = 54322",
            "port = 54322\nrequire_auth = \"scram-sha-256\"",
        );
        let c = Config::parse(&text, "t", None).unwrap();
        assert!(!c.target.require_auth.allows(AuthMethod::Md5));
        for bad in ["md5,!password", "kerberos", ""] {
            let text = MINIMAL.replace(
                "port = 54322",
                &format!("port = 54322\nrequire_auth = {bad:?}"),
            );
            let e = Config::parse(&text, "t", None).unwrap_err();
            assert_eq!(
                (e.key.as_deref(), e.line),
                (Some("target.require_auth"), Some(12)),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn admin_show_data_needs_a_token_file() {
        let text = format!("{MINIMAL}\n[admin]\nshow_data = true\n");
        let e = Config::parse(&text, "t", None).unwrap_err();
        assert_eq!(
            (e.key.as_deref(), e.line),
            (Some("admin.show_data"), Some(14))
        );
        assert!(e.message.contains("token_file"), "{e}");
        // Whether the token file is private is checked by `preflight`.
    }

    #[test]
    fn admin_allowed_hosts_are_host_names_or_addresses() {
        let text = format!(
            "{MINIMAL}\n[admin]\nallowed_hosts = [\"pgshift.internal\", \"10.0.0.5:9930\", \"[fd00::1]\"]\n"
        );
        let c = Config::parse(&text, "t", None).unwrap();
        assert_eq!(c.admin.allowed_hosts.len(), 3);
        for bad in ["a b", "http://x", "x:port", "[nope]", ""] {
            let text = format!("{MINIMAL}\n[admin]\nallowed_hosts = [{bad:?}]\n");
            let e = Config::parse(&text, "t", None).unwrap_err();
            assert_eq!(
                (e.key.as_deref(), e.line),
                (Some("admin.allowed_hosts"), Some(14)),
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_sslmode_value() {
        let text = MINIMAL.replace("port = 54321", "port = 54321\nsslmode = \"sometimes\"");
        let e = Config::parse(&text, "t", None).unwrap_err();
        assert_eq!(
            (e.key.as_deref(), e.line),
            (Some("source.sslmode"), Some(8))
        );
    }
}
