//! `[record]`: recording client sessions for `pgshift replay`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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
