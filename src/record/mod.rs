//! Recording client sessions for `pgshift replay`.
//!
//! The hot path's part is small on purpose: a session that is being
//! recorded copies each run of bytes the client sent (what the frontend
//! pump forwards, as received) into its worker thread's buffer, with a
//! timestamp, under a lock only the writer's drain contends for. It never
//! waits: when the buffer is full, that session stops being recorded (its
//! capture is a prefix, marked incomplete) and the drop is counted.
//!
//! Everything else happens on the writer thread (`writer`): cutting the
//! byte runs into messages, leaving out password messages, redacting
//! parameters, encoding records (`format`), rotating segments.
//!
//! Sessions are recorded from the first message after authentication, so
//! passwords and SASL exchanges never reach the recorder. A session that
//! began before recording was switched on is not recorded (its earlier
//! statements, prepared statements and transaction state would be missing).

pub mod format;
pub mod metrics;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use tracing::{info, warn};

use crate::clock::now_us;
use crate::config::RecordConfig;
use crate::protocol::startup::StartupMessage;

/// Per-thread buffers (the same sharding as the router's histograms).
const SHARDS: usize = crate::clock::SHARDS;

/// What the hot path leaves for the writer.
enum Entry {
    Start {
        session: u64,
        at_us: u64,
        params: Box<[(Vec<u8>, Vec<u8>)]>,
    },
    /// `len` bytes the client sent, at `start` in the shard's `data`.
    Bytes {
        session: u64,
        at_us: u64,
        start: usize,
        len: usize,
    },
    End {
        session: u64,
        at_us: u64,
        incomplete: bool,
    },
}

#[derive(Default)]
struct Shard {
    entries: Vec<Entry>,
    data: Vec<u8>,
}

/// Counters of one recording, shown in status.
#[derive(Default)]
pub struct Stats {
    pub sessions: AtomicU64,
    pub sessions_incomplete: AtomicU64,
    pub messages: AtomicU64,
    /// Password messages seen after authentication and left out.
    pub passwords_skipped: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Byte runs not recorded because a buffer was full, and their bytes.
    pub dropped_runs: AtomicU64,
    pub dropped_bytes: AtomicU64,
    pub segment: AtomicU32,
    pub segments_deleted: AtomicU64,
}

/// One recording: from switching it on (or a new path) to switching it off.
pub struct Sink {
    config: RecordConfig,
    path: PathBuf,
    active: AtomicBool,
    shards: Vec<Mutex<Shard>>,
    /// Bytes one shard may hold before its sessions stop being recorded.
    shard_cap: usize,
    pub stats: Stats,
    started_unix_us: u64,
    /// Why recording stopped by itself (a write error), for status.
    error: Mutex<Option<String>>,
    /// The writer thread; taken when the recording is stopped and joined.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The writer is done: every record is written and the file flushed.
    finished: AtomicBool,
    metrics: Arc<metrics::RecordMetrics>,
}

impl Sink {
    /// Starts a recording at `cfg.path`: creates the first segment and the
    /// writer thread.
    fn start(
        cfg: &RecordConfig,
        metrics: Arc<metrics::RecordMetrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let path = cfg
            .path
            .clone()
            .ok_or_else(|| anyhow::anyhow!("record.path is not set"))?;
        let first = segment_path(&path, 1);
        if first.exists() {
            anyhow::bail!(
                "{} exists: a recording never overwrites; choose a new record.path or move the old capture",
                first.display()
            );
        }
        let started_unix_us = now_us();
        let file = writer::SegmentFile::create(&path, 1, cfg.redact_parameters, started_unix_us)?;
        let shard_cap = (cfg.buffer_bytes / SHARDS).max(64 << 10);
        let sink = Arc::new(Self {
            config: cfg.clone(),
            path,
            active: AtomicBool::new(true),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            shard_cap,
            stats: Stats::default(),
            started_unix_us,
            error: Mutex::new(None),
            writer: Mutex::new(None),
            finished: AtomicBool::new(false),
            metrics,
        });
        sink.stats.segment.store(1, Relaxed);
        let w = writer::Writer::new(Arc::clone(&sink), file);
        let handle = std::thread::Builder::new()
            .name("pgshift-record".into())
            .spawn(move || w.run())?;
        *sink.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(sink)
    }

    fn shard(&self) -> &Mutex<Shard> {
        &self.shards[crate::clock::shard()]
    }

    /// Stops taking new bytes; the writer drains what is buffered, ends the
    /// open sessions and closes the file. `wait` joins it.
    fn stop(&self, wait: bool) {
        self.active.store(false, Relaxed);
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            h.thread().unpark();
            if wait {
                let _ = h.join();
            }
        }
    }

    /// Called by the writer when it cannot go on.
    fn fail(&self, why: String) {
        warn!(error = %why, path = %self.path.display(), "recording stopped");
        self.active.store(false, Relaxed);
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    fn status(&self) -> serde_json::Value {
        let s = &self.stats;
        serde_json::json!({
            "path": self.path.display().to_string(),
            "active": self.active.load(Relaxed),
            "finished": self.finished.load(Relaxed),
            "started_unix_us": self.started_unix_us,
            "segment": s.segment.load(Relaxed),
            "current_file": segment_path(&self.path, s.segment.load(Relaxed)).display().to_string(),
            "redact_parameters": self.config.redact_parameters,
            "sessions": s.sessions.load(Relaxed),
            "sessions_incomplete": s.sessions_incomplete.load(Relaxed),
            "messages": s.messages.load(Relaxed),
            "bytes_written": s.bytes_written.load(Relaxed),
            "dropped_runs": s.dropped_runs.load(Relaxed),
            "dropped_bytes": s.dropped_bytes.load(Relaxed),
            "passwords_skipped": s.passwords_skipped.load(Relaxed),
            "segments_deleted": s.segments_deleted.load(Relaxed),
            "buffer_bytes": self.config.buffer_bytes,
            "error": self.error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        })
    }
}

/// The segment file `n` of the capture at `base`: `<base>.000001`, ...
pub fn segment_path(base: &Path, n: u32) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(format!(".{n:06}"));
    PathBuf::from(s)
}

/// The proxy's recording switch: the recording in force, if any.
pub struct Recording {
    current: ArcSwapOption<Sink>,
    /// The last recording stopped (for status), and why a start failed.
    last: Mutex<Option<Arc<Sink>>>,
    start_error: Mutex<Option<String>>,
    /// The `[record]` section in force.
    config: Mutex<RecordConfig>,
    metrics: Arc<metrics::RecordMetrics>,
}

impl Recording {
    pub fn new(cfg: &RecordConfig, metrics: Arc<metrics::RecordMetrics>) -> Self {
        let r = Self {
            current: ArcSwapOption::empty(),
            last: Mutex::new(None),
            start_error: Mutex::new(None),
            config: Mutex::new(cfg.clone()),
            metrics,
        };
        r.apply(cfg);
        r
    }

    /// Makes `cfg` the recording in force: a changed section stops the
    /// current recording (which finishes its file in the background) and,
    /// if `path` is set, starts a new one. Returns the start error, if any
    /// (also kept for status).
    pub fn apply(&self, cfg: &RecordConfig) -> Option<String> {
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = cfg.clone();
        let old = self.current.swap(None);
        if let Some(old) = old {
            old.stop(false);
            info!(path = %old.path.display(), "recording stopped");
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(old);
        }
        let mut err = self.start_error.lock().unwrap_or_else(|p| p.into_inner());
        *err = None;
        if cfg.path.is_none() {
            self.metrics.active.set(0);
            return None;
        }
        match Sink::start(cfg, Arc::clone(&self.metrics)) {
            Ok(sink) => {
                info!(path = %sink.path.display(), "recording client sessions");
                self.metrics.active.set(1);
                self.current.store(Some(sink));
                None
            }
            Err(e) => {
                let why = format!("{e:#}");
                warn!(error = %why, "recording not started");
                self.metrics.active.set(0);
                *err = Some(why.clone());
                Some(why)
            }
        }
    }

    /// A new session: recorded when a recording is on (not for replication
    /// connections, which speak another protocol).
    pub fn session(&self, id: u64, startup: &StartupMessage) -> Option<SessionRecorder> {
        let sink = self.current.load_full()?;
        if !sink.active.load(Relaxed) || startup.get("replication").is_some() {
            return None;
        }
        sink.stats.sessions.fetch_add(1, Relaxed);
        let params: Box<[(Vec<u8>, Vec<u8>)]> = startup.params().to_vec().into_boxed_slice();
        let at_us = now_us();
        sink.shard()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .push(Entry::Start {
                session: id,
                at_us,
                params,
            });
        Some(SessionRecorder {
            sink,
            session: id,
            stopped: AtomicBool::new(false),
        })
    }

    pub fn config(&self) -> RecordConfig {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// At shutdown: finish the file (waits for the writer).
    pub fn close(&self) {
        if let Some(s) = self.current.swap(None) {
            s.stop(true);
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
        }
        self.metrics.active.set(0);
    }

    pub fn status(&self) -> serde_json::Value {
        let current = self.current.load_full();
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner()).clone();
        serde_json::json!({
            "recording": current.as_ref().is_some_and(|s| s.active.load(Relaxed)),
            "current": current.map(|s| s.status()),
            "last": last.map(|s| s.status()),
            "start_error": self.start_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        })
    }
}

/// One session's handle on the recording, held by its frontend inspector.
pub struct SessionRecorder {
    sink: Arc<Sink>,
    session: u64,
    /// Recording of this session stopped (buffer full): the rest of it is
    /// not recorded, so what is recorded stays a consistent prefix.
    stopped: AtomicBool,
}

impl SessionRecorder {
    /// Bytes the client sent, as forwarded to the source (whole messages or
    /// parts of one). Never waits; a full buffer ends this session's
    /// recording.
    #[inline]
    pub fn client_bytes(&self, bytes: &[u8]) {
        if bytes.is_empty() || self.stopped.load(Relaxed) || !self.sink.active.load(Relaxed) {
            return;
        }
        let at_us = now_us();
        let mut shard = self.sink.shard().lock().unwrap_or_else(|p| p.into_inner());
        if shard.data.len() + bytes.len() > self.sink.shard_cap {
            // The end marker is tiny and bounded by the number of sessions.
            shard.entries.push(Entry::End {
                session: self.session,
                at_us,
                incomplete: true,
            });
            drop(shard);
            self.stopped.store(true, Relaxed);
            let s = &self.sink.stats;
            s.dropped_runs.fetch_add(1, Relaxed);
            s.dropped_bytes.fetch_add(bytes.len() as u64, Relaxed);
            s.sessions_incomplete.fetch_add(1, Relaxed);
            self.sink.metrics.dropped_runs.inc();
            return;
        }
        let start = shard.data.len();
        shard.data.extend_from_slice(bytes);
        shard.entries.push(Entry::Bytes {
            session: self.session,
            at_us,
            start,
            len: bytes.len(),
        });
    }
}

impl Drop for SessionRecorder {
    fn drop(&mut self) {
        if self.stopped.load(Relaxed) || !self.sink.active.load(Relaxed) {
            return;
        }
        self.sink
            .shard()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .push(Entry::End {
                session: self.session,
                at_us: now_us(),
                incomplete: false,
            });
    }
}
