//! What shadow reads found: counters, mismatches grouped by fingerprint,
//! learned noise, and the mismatch log (one JSON line per confirmed
//! mismatch, written as it is confirmed).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};

use crate::clock::now_us;

type Labels = Vec<(&'static str, String)>;

/// Fingerprints given their own metric series; later ones share "other",
/// so a workload of ad-hoc queries cannot grow the exposition without end.
const MAX_LABELLED_FINGERPRINTS: usize = 500;
/// Fingerprints tracked in `/mismatches` (and noise entries).
const MAX_GROUPS: usize = 10_000;
/// Query text kept per fingerprint.
const MAX_QUERY_CHARS: usize = 2_000;

#[derive(Clone)]
pub struct ShadowMetrics {
    /// Compared reads by outcome: match, mismatch_confirmed,
    /// mismatch_transient, noise.
    pub compared: Family<Labels, Counter>,
    /// Shadow reads not compared, by reason.
    pub skipped: Family<Labels, Counter>,
    /// Mismatches by fingerprint and kind (confirmed, transient).
    pub mismatches: Family<Labels, Counter>,
    pub queued: Gauge,
    pub inflight: Gauge,
    pub noise_fingerprints: Gauge,
    pub tap_bytes: Gauge,
    pub connections: Gauge,
}

impl ShadowMetrics {
    pub fn register(r: &mut Registry) -> Self {
        let m = Self {
            compared: Family::default(),
            skipped: Family::default(),
            mismatches: Family::default(),
            queued: Gauge::default(),
            inflight: Gauge::default(),
            noise_fingerprints: Gauge::default(),
            tap_bytes: Gauge::default(),
            connections: Gauge::default(),
        };
        r.register(
            "shadow_compared",
            "Shadow reads compared, by outcome (match, mismatch_confirmed, mismatch_transient, noise)",
            m.compared.clone(),
        );
        r.register(
            "shadow_skipped",
            "Sampled reads not compared, by reason",
            m.skipped.clone(),
        );
        r.register(
            "shadow_mismatches",
            "Shadow mismatches by statement fingerprint and kind (confirmed, transient)",
            m.mismatches.clone(),
        );
        r.register(
            "shadow_queued",
            "Shadow reads waiting for an executor slot",
            m.queued.clone(),
        );
        r.register(
            "shadow_inflight",
            "Shadow reads running",
            m.inflight.clone(),
        );
        r.register(
            "shadow_noise_fingerprints",
            "Statement fingerprints learned as non-deterministic and excluded",
            m.noise_fingerprints.clone(),
        );
        r.register(
            "shadow_tap_bytes",
            "Bytes of served answers copied and not yet compared",
            m.tap_bytes.clone(),
        );
        r.register(
            "shadow_connections",
            "Connections the shadow executor holds (both sides)",
            m.connections.clone(),
        );
        m
    }

    pub fn skip(&self, reason: &'static str) {
        self.skipped
            .get_or_create(&vec![("reason", reason.into())])
            .inc();
    }

    pub fn outcome(&self, outcome: &'static str) {
        self.compared
            .get_or_create(&vec![("outcome", outcome.into())])
            .inc();
    }

    fn family_json(f: &Family<Labels, Counter>, names: &[&'static str], label: &str) -> Value {
        let mut out = serde_json::Map::new();
        for n in names {
            let v = f
                .get_or_create(&vec![(label_static(label), (*n).into())])
                .get();
            out.insert((*n).into(), v.into());
        }
        Value::Object(out)
    }

    pub fn snapshot(&self) -> Value {
        json!({
            "compared": Self::family_json(&self.compared, &["match", "mismatch_confirmed", "mismatch_transient", "noise"], "outcome"),
            "skipped": Self::family_json(&self.skipped, SKIP_REASONS, "reason"),
            "queued": self.queued.get(),
            "inflight": self.inflight.get(),
            "noise_fingerprints": self.noise_fingerprints.get(),
            "tap_bytes": self.tap_bytes.get(),
            "connections": self.connections.get(),
        })
    }
}

/// Every reason a sampled read is not compared (the status lists them all).
pub const SKIP_REASONS: &[&str] = &[
    "queue_full",
    "served_incomplete",
    "mirror_wait",
    "timeout",
    "connect",
    "setup",
    "noise",
    "too_large",
    "malformed",
];

fn label_static(l: &str) -> &'static str {
    match l {
        "outcome" => "outcome",
        _ => "reason",
    }
}

/// One fingerprint's mismatches.
struct Group {
    query: String,
    confirmed: u64,
    transient: u64,
    first_seen_us: u64,
    last_seen_us: u64,
    /// The last confirmed mismatch, as logged.
    last: Option<Value>,
}

struct Noise {
    query: String,
    reason: String,
    /// What differed, when that is why (values: redacted by the admin API).
    detail: Option<String>,
    learned_at_us: u64,
    /// Reads of it skipped since.
    skipped: u64,
}

pub struct MismatchReport {
    path: PathBuf,
    log: Mutex<Option<File>>,
    groups: Mutex<HashMap<String, Group>>,
    noise: Mutex<HashMap<String, Noise>>,
    labelled: Mutex<std::collections::HashSet<String>>,
    pub metrics: ShadowMetrics,
}

impl MismatchReport {
    /// Opens (appends to) the mismatch log.
    pub fn open(path: &Path, metrics: ShadowMetrics) -> anyhow::Result<Self> {
        // Private: it holds statement texts, parameters and rows.
        crate::private_files::create_parent(path).map_err(|e| {
            anyhow::anyhow!("cannot create the directory of {}: {e}", path.display())
        })?;
        let file = crate::private_files::open_append(path)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            log: Mutex::new(Some(file)),
            groups: Mutex::default(),
            noise: Mutex::default(),
            labelled: Mutex::default(),
            metrics,
        })
    }

    fn fingerprint_label(&self, fp: &str) -> String {
        let mut l = self.labelled.lock().unwrap_or_else(|p| p.into_inner());
        if l.contains(fp) {
            return fp.to_string();
        }
        if l.len() < MAX_LABELLED_FINGERPRINTS {
            l.insert(fp.to_string());
            return fp.to_string();
        }
        "other".into()
    }

    fn group<'a>(
        groups: &'a mut HashMap<String, Group>,
        fp: &str,
        query: &str,
    ) -> Option<&'a mut Group> {
        if !groups.contains_key(fp) && groups.len() >= MAX_GROUPS {
            return None;
        }
        let now = now_us();
        Some(groups.entry(fp.to_string()).or_insert_with(|| Group {
            query: truncate(query),
            confirmed: 0,
            transient: 0,
            first_seen_us: now,
            last_seen_us: now,
            last: None,
        }))
    }

    /// A mismatch that did not persist through the re-check.
    pub fn transient(&self, fp: &str, query: &str) {
        self.metrics.outcome("mismatch_transient");
        self.metrics
            .mismatches
            .get_or_create(&vec![
                ("fingerprint", self.fingerprint_label(fp)),
                ("kind", "transient".into()),
            ])
            .inc();
        let mut g = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = Self::group(&mut g, fp, query) {
            g.transient += 1;
            g.last_seen_us = now_us();
        }
    }

    /// A confirmed mismatch: logged (one JSON line), counted, listed.
    pub fn confirmed(&self, fp: &str, query: &str, mut entry: Value) {
        self.metrics.outcome("mismatch_confirmed");
        self.metrics
            .mismatches
            .get_or_create(&vec![
                ("fingerprint", self.fingerprint_label(fp)),
                ("kind", "confirmed".into()),
            ])
            .inc();
        let time = now_us();
        if let Some(o) = entry.as_object_mut() {
            o.insert("time_us".into(), time.into());
        }
        {
            let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = log.as_mut() {
                let mut line = entry.to_string();
                line.push('\n');
                if let Err(e) = f.write_all(line.as_bytes()) {
                    tracing::error!(error = %e, path = %self.path.display(), "cannot write the mismatch log; further mismatches are only in /mismatches");
                    *log = None;
                }
            }
        }
        tracing::warn!(fingerprint = fp, detail = %entry["difference"]["detail"], "shadow read mismatch confirmed");
        let mut g = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = Self::group(&mut g, fp, query) {
            g.confirmed += 1;
            g.last_seen_us = time;
            g.last = Some(entry);
        }
    }

    /// Whether this fingerprint was learned as noise (counts the skip).
    pub fn is_noise(&self, fp: &str) -> bool {
        let mut n = self.noise.lock().unwrap_or_else(|p| p.into_inner());
        match n.get_mut(fp) {
            Some(e) => {
                e.skipped += 1;
                true
            }
            None => false,
        }
    }

    /// Learns a fingerprint as non-deterministic: its reads are no longer
    /// compared. `detail` says what differed (it may hold values).
    pub fn learn_noise(&self, fp: &str, query: &str, reason: &str, detail: Option<&str>) {
        let mut n = self.noise.lock().unwrap_or_else(|p| p.into_inner());
        if n.contains_key(fp) || n.len() >= MAX_GROUPS {
            return;
        }
        tracing::info!(
            fingerprint = fp,
            reason,
            "shadow reads of this statement are excluded as non-deterministic"
        );
        n.insert(
            fp.to_string(),
            Noise {
                query: truncate(query),
                reason: reason.to_string(),
                detail: detail.map(str::to_string),
                learned_at_us: now_us(),
                skipped: 0,
            },
        );
        self.metrics.noise_fingerprints.set(n.len() as i64);
    }

    /// `GET /mismatches`: grouped by fingerprint, most confirmed first.
    pub fn to_json(&self, fingerprint: Option<&str>) -> Value {
        let groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<(&String, &Group)> = groups
            .iter()
            .filter(|(fp, _)| fingerprint.is_none_or(|f| f == fp.as_str()))
            .collect();
        list.sort_by(|a, b| {
            (b.1.confirmed, b.1.transient, b.1.last_seen_us).cmp(&(
                a.1.confirmed,
                a.1.transient,
                a.1.last_seen_us,
            ))
        });
        let fps: Vec<Value> = list
            .into_iter()
            .map(|(fp, g)| {
                json!({
                    "fingerprint": fp,
                    "query": g.query,
                    "confirmed": g.confirmed,
                    "transient": g.transient,
                    "first_seen_us": g.first_seen_us,
                    "last_seen_us": g.last_seen_us,
                    "last_confirmed": g.last,
                })
            })
            .collect();
        let noise = self.noise.lock().unwrap_or_else(|p| p.into_inner());
        let mut noise: Vec<Value> = noise
            .iter()
            .map(|(fp, n)| {
                json!({
                    "fingerprint": fp,
                    "query": n.query,
                    "reason": n.reason,
                    "detail": n.detail,
                    "learned_at_us": n.learned_at_us,
                    "skipped": n.skipped,
                })
            })
            .collect();
        noise.sort_by_key(|n| n["learned_at_us"].as_u64());
        json!({
            "counts": self.metrics.snapshot(),
            "mismatch_log": self.path.display().to_string(),
            "fingerprints": fps,
            "noise": noise,
        })
    }
}

fn truncate(s: &str) -> String {
    if s.chars().count() <= MAX_QUERY_CHARS {
        return s.to_string();
    }
    let mut t: String = s.chars().take(MAX_QUERY_CHARS).collect();
    t.push('…');
    t
}
