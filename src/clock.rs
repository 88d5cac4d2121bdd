//! Small shared helpers every layer may use: wall-clock time as the proxy
//! writes it in its files and reports, and the per-thread shard index that
//! keeps hot counters and histograms from sharing a lock across workers.
//! This module imports nothing from the crate: it is the bottom layer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// How many shards per-thread state is split into.
///
/// Latency histograms and recorder queues are sharded by thread: a worker
/// records into its own shard, so two workers never wait on each other's
/// lock (a lock held by a descheduled thread would stall every session of
/// the waiting worker). Readers (status, metrics) merge the shards.
pub const SHARDS: usize = 16;

/// This thread's shard, in `0..SHARDS`.
pub fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    MINE.with(|s| *s)
}
