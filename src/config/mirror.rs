//! `[mirror]`: write mirroring, its spool and durability, and row images.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
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
