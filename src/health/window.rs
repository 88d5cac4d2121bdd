//! Rolling windows: what each backend did over the last `window_s`.
//!
//! A window is ten slices of a tenth of its length each, plus running
//! totals: a sample is added to the newest slice and to the totals, and a
//! slice that ages out is subtracted from the totals. The rules read the
//! totals (so the window covers between 10 and 11 tenths of `window_s`).
//! Per query shape (target only, in per-fingerprint mode) the slices keep
//! coarser totals, merged only when a rule trips.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::{Fault, Sample};

const SLICES: u32 = 10;
/// Shapes kept per slice; the rest count under shape 0 ("other"), which is
/// never failed back on its own.
const MAX_SHAPES_PER_SLICE: usize = 64;

/// Microsecond histograms, 1 µs to 1 hour.
fn histogram(sigfig: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, sigfig)
        .unwrap_or_else(|_| Histogram::new(sigfig).unwrap_or_else(|_| unreachable!()))
}

/// Requests, failures and read latencies.
#[derive(Clone)]
pub struct Totals {
    pub requests: u64,
    /// Requests by `SampleKind` (index as in `SampleKind::ALL`).
    pub by_kind: [u64; 4],
    /// Failures by `Fault` (index as in `Fault::ALL`).
    pub faults: [u64; 6],
    /// Latencies of reads (and of timeouts), in microseconds.
    pub latency: Histogram<u64>,
}

impl Totals {
    pub fn new(sigfig: u8) -> Self {
        Self {
            requests: 0,
            by_kind: [0; 4],
            faults: [0; 6],
            latency: histogram(sigfig),
        }
    }

    pub fn errors(&self) -> u64 {
        self.faults.iter().sum()
    }

    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors() as f64 / self.requests as f64
        }
    }

    /// A latency quantile in milliseconds; `None` without samples.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        (!self.latency.is_empty()).then(|| self.latency.value_at_quantile(q) as f64 / 1000.0)
    }

    fn add(&mut self, s: &Sample) {
        self.requests += 1;
        self.by_kind[s.kind as usize] += 1;
        if let Some(f) = s.fault {
            self.faults[f as usize] += 1;
        }
        if s.latency_us > 0 {
            self.latency.saturating_record(s.latency_us as u64);
        }
    }

    /// Adds another's counts (histograms of any precision).
    pub fn merge(&mut self, o: &Totals) {
        self.requests += o.requests;
        for (a, b) in self.by_kind.iter_mut().zip(o.by_kind) {
            *a += b;
        }
        for (a, b) in self.faults.iter_mut().zip(o.faults) {
            *a += b;
        }
        let _ = self.latency.add(&o.latency);
    }

    /// Takes away counts added before; false when the histogram cannot
    /// (the caller then rebuilds).
    fn subtract(&mut self, o: &Totals) -> bool {
        self.requests = self.requests.saturating_sub(o.requests);
        for (a, b) in self.by_kind.iter_mut().zip(o.by_kind) {
            *a = a.saturating_sub(b);
        }
        for (a, b) in self.faults.iter_mut().zip(o.faults) {
            *a = a.saturating_sub(b);
        }
        self.latency.subtract(&o.latency).is_ok()
    }

    pub fn to_json(&self) -> serde_json::Value {
        let q = |q| self.quantile_ms(q);
        serde_json::json!({
            "requests": self.requests,
            "reads": self.by_kind[0], "mirror": self.by_kind[1],
            "shadow": self.by_kind[2], "checks": self.by_kind[3],
            "errors": self.errors(),
            "error_rate": self.error_rate(),
            "errors_by": Fault::ALL.iter().zip(self.faults)
                .filter(|(_, n)| *n > 0)
                .map(|(f, n)| (f.label().to_string(), serde_json::Value::from(n)))
                .collect::<serde_json::Map<_, _>>(),
            "latency_samples": self.latency.len(),
            "p50_ms": q(0.5), "p95_ms": q(0.95), "p99_ms": q(0.99),
        })
    }
}

struct Slice {
    start: Instant,
    totals: Totals,
    shapes: HashMap<u64, Totals>,
}

/// One backend's rolling window.
pub struct Window {
    slice_len: Duration,
    slices: VecDeque<Slice>,
    total: Totals,
    shapes: bool,
}

/// Precision of a backend's histograms: 2 significant digits (1%).
const SIGFIG: u8 = 2;
/// Per-shape histograms are coarser (10%): they only pick the culprits.
const SHAPE_SIGFIG: u8 = 1;

impl Window {
    /// `shapes`: keep per-shape totals too.
    pub fn new(length: Duration, shapes: bool) -> Self {
        Self {
            slice_len: (length / SLICES).max(Duration::from_millis(100)),
            slices: VecDeque::new(),
            total: Totals::new(SIGFIG),
            shapes,
        }
    }

    pub fn totals(&self) -> &Totals {
        &self.total
    }

    pub fn add(&mut self, now: Instant, s: &Sample) {
        let fresh = self
            .slices
            .back()
            .is_none_or(|b| now.saturating_duration_since(b.start) >= self.slice_len);
        if fresh {
            self.slices.push_back(Slice {
                start: now,
                totals: Totals::new(SIGFIG),
                shapes: HashMap::new(),
            });
        }
        let Some(slice) = self.slices.back_mut() else {
            return;
        };
        slice.totals.add(s);
        self.total.add(s);
        if self.shapes {
            let key = if slice.shapes.len() < MAX_SHAPES_PER_SLICE
                || slice.shapes.contains_key(&s.shape)
            {
                s.shape
            } else {
                0
            };
            slice
                .shapes
                .entry(key)
                .or_insert_with(|| Totals::new(SHAPE_SIGFIG))
                .add(s);
        }
    }

    /// Drops the slices older than the window.
    pub fn expire(&mut self, now: Instant) {
        let keep = self.slice_len * SLICES;
        let mut rebuild = false;
        while let Some(front) = self.slices.front() {
            if now.saturating_duration_since(front.start) < keep + self.slice_len {
                break;
            }
            if let Some(old) = self.slices.pop_front() {
                rebuild |= !self.total.subtract(&old.totals);
            }
        }
        if rebuild {
            let mut t = Totals::new(SIGFIG);
            for s in &self.slices {
                t.merge(&s.totals);
            }
            self.total = t;
        }
    }

    pub fn clear(&mut self) {
        self.slices.clear();
        self.total = Totals::new(SIGFIG);
    }

    /// Per-shape totals over the window (empty unless shapes are kept).
    pub fn shapes(&self) -> HashMap<u64, Totals> {
        let mut out: HashMap<u64, Totals> = HashMap::new();
        for s in &self.slices {
            for (k, t) in &s.shapes {
                out.entry(*k)
                    .or_insert_with(|| Totals::new(SHAPE_SIGFIG))
                    .merge(t);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Db, SampleKind};
    use super::*;

    fn read(ms: u64, fault: Option<Fault>) -> Sample {
        Sample::new(Db::Target, SampleKind::Read, fault).latency(Duration::from_millis(ms))
    }

    #[test]
    fn totals_follow_the_window_as_slices_age_out() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(10), false);
        for i in 0..100 {
            w.add(t0, &read(1 + i % 3, None));
        }
        w.add(t0, &read(50, Some(Fault::Timeout)));
        assert_eq!(w.totals().requests, 101);
        assert_eq!(w.totals().errors(), 1);
        let later = t0 + Duration::from_secs(5);
        for _ in 0..10 {
            w.add(later, &read(40, None));
        }
        w.expire(later);
        assert_eq!(w.totals().requests, 111);
        // 11 seconds on: the first slice is out, the second is in.
        let much_later = t0 + Duration::from_secs(11);
        w.expire(much_later);
        assert_eq!(w.totals().requests, 10);
        assert_eq!(w.totals().errors(), 0);
        let p95 = w.totals().quantile_ms(0.95).unwrap();
        assert!((39.0..41.0).contains(&p95), "{p95}");
        w.expire(t0 + Duration::from_secs(30));
        assert_eq!(w.totals().requests, 0);
        assert_eq!(w.totals().quantile_ms(0.95), None);
    }

    #[test]
    fn shapes_are_kept_up_to_a_bound_and_the_rest_is_other() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(10), true);
        for shape in 1..=100u64 {
            w.add(t0, &read(1, None).shape(shape));
        }
        let shapes = w.shapes();
        assert_eq!(shapes.len(), MAX_SHAPES_PER_SLICE + 1);
        assert_eq!(shapes[&0].requests, 100 - MAX_SHAPES_PER_SLICE as u64);
        assert_eq!(shapes.values().map(|t| t.requests).sum::<u64>(), 100);
    }
}
