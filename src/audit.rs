//! The audit log: every change of configuration or routing, and every
//! mirror gap, as one JSON line in `audit.path`, written and flushed to
//! stable storage *before* the change takes effect, so that no change can
//! be in force without its record. The most recent entries are also kept
//! in memory for `GET /audit`.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{json, Value};

/// Entries kept in memory for `GET /audit` (the file keeps all).
const RECENT: usize = 10_000;

pub struct Audit {
    path: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    file: File,
    recent: VecDeque<Value>,
}

impl Audit {
    /// Opens (creating) the log for appending. It is private (see
    /// `private_files`): entries can carry failed-back query texts.
    pub fn open(path: &Path) -> io::Result<Self> {
        crate::private_files::create_parent(path)?;
        let file = crate::private_files::open_append(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            inner: Mutex::new(Inner {
                file,
                recent: VecDeque::new(),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry: `kind` (what happened), `who` (file, signal, api,
    /// mirror, start) and the event's own fields, stamped with the time in
    /// Unix microseconds. Returns once the line is on stable storage; on an
    /// error the caller must not apply the change.
    pub fn record(&self, kind: &str, who: &str, fields: Value) -> io::Result<()> {
        let mut entry = json!({
            "time_us": crate::clock::now_us(),
            "kind": kind,
            "who": who,
        });
        if let (Some(e), Value::Object(f)) = (entry.as_object_mut(), fields) {
            e.extend(f);
        }
        let mut line = entry.to_string();
        line.push('\n');
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.file.write_all(line.as_bytes())?;
        inner.file.sync_data()?;
        if inner.recent.len() >= RECENT {
            inner.recent.pop_front();
        }
        inner.recent.push_back(entry);
        Ok(())
    }

    /// Entries recorded at or after `since_us` (Unix microseconds), oldest
    /// first, from those kept in memory.
    pub fn since(&self, since_us: u64) -> Vec<Value> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .recent
            .iter()
            .filter(|e| e["time_us"].as_u64().unwrap_or(0) >= since_us)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_reach_the_file_as_json_lines_and_are_served_since_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/audit.jsonl");
        let a = Audit::open(&path).unwrap();
        a.record("start", "start", json!({"epoch": 1})).unwrap();
        let t = crate::clock::now_us();
        a.record(
            "config_reload",
            "signal",
            json!({"epoch": 2, "changes": [{"key": "mirror.enabled", "old": true, "new": false}]}),
        )
        .unwrap();
        let lines: Vec<Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["kind"], "config_reload");
        assert_eq!(lines[1]["who"], "signal");
        assert_eq!(lines[1]["changes"][0]["new"], false);
        let recent = a.since(t);
        assert_eq!(recent.len(), 1);
        assert_eq!(recent[0], lines[1]);
        assert_eq!(a.since(0).len(), 2);
        // Reopening appends.
        drop(a);
        let a = Audit::open(&path).unwrap();
        a.record("start", "start", json!({})).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
    }
}
