//! The health monitor's costs: what every read pays on the hot path
//! (`Recorder::record`, and `shape_hash` in per-fingerprint mode), and what
//! the monitor thread pays per sample (draining, adding to a window).
//! Throughput is in samples (or statements), so a regression shows as
//! fewer per second.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgshift::config::FailbackConfig;
use pgshift::health::window::Window;
use pgshift::health::{shape_hash, Db, Health, HealthMetrics, Sample, SampleKind};

const BATCH: usize = 1000;

fn sample(i: usize) -> Sample {
    Sample::new(Db::Target, SampleKind::Read, None)
        .latency(Duration::from_micros(100 + (i as u64 % 900)))
        .shape(1 + (i as u64 % 8))
}

fn health(c: &mut Criterion) {
    let metrics = Arc::new(HealthMetrics::register(
        &mut prometheus_client::registry::Registry::default(),
    ));
    let h = Health::new(&FailbackConfig::default(), metrics);
    let mut spare = Vec::new();
    let mut g = c.benchmark_group("health");
    g.throughput(Throughput::Elements(BATCH as u64));
    // The hot path: one push per read, then the monitor's drain.
    g.bench_function("record_and_drain_1000", |b| {
        b.iter(|| {
            for i in 0..BATCH {
                h.record(black_box(sample(i)));
            }
            let mut n = 0usize;
            h.recorder.drain(&mut spare, |_| n += 1);
            black_box(n)
        })
    });
    // The monitor thread: samples into a window with per-shape totals.
    let mut w = Window::new(Duration::from_secs(10), true);
    let now = Instant::now();
    g.bench_function("window_add_1000", |b| {
        b.iter(|| {
            for i in 0..BATCH {
                w.add(now, black_box(&sample(i)));
            }
        })
    });
    g.finish();
    let mut g = c.benchmark_group("health_shape");
    g.throughput(Throughput::Elements(1));
    g.bench_function("shape_hash_pgbench_select", |b| {
        b.iter(|| {
            shape_hash(black_box(
                b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
            ))
        })
    });
    g.bench_function("shape_hash_literal_query", |b| {
        b.iter(|| {
            shape_hash(black_box(
                b"SELECT o.id, o.total FROM orders o WHERE o.customer_id = 42 AND o.status = 'open' ORDER BY o.created_at DESC LIMIT 20",
            ))
        })
    });
    g.finish();
}

criterion_group!(benches, health);
criterion_main!(benches);
