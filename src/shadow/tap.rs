//! The hot path's part of a shadow read: copying the served answer.
//!
//! The tap sees the bytes forwarded to the client (by the source -> client
//! pump, or by the routing responder), walks just the message headers to
//! find the answer's ReadyForQuery, and copies the bytes. It hands them on
//! at the end of the answer (or every 64 KiB of a big one), and the job
//! itself goes to the executor with the first hand-over: a small answer
//! costs one cross-thread wake-up. It never waits: a full queue or
//! channel, or the global byte budget spent, makes it give up (counted).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::MAX_TAP_BYTES;

/// Hand-overs of one answer queued at most.
const CHANNEL_RUNS: usize = 64;
/// Bytes copied before they are handed over.
const HOLD: usize = 64 << 10;

/// A copied run of the served answer; gives its bytes back to the budget
/// when dropped, however the executor ends.
pub struct Chunk {
    pub bytes: Bytes,
    budget: Arc<AtomicUsize>,
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.bytes.len(), Relaxed);
    }
}

/// A job not yet handed to the executor, and where it goes.
pub struct Deferred {
    pub job: super::Job,
    pub queue: mpsc::Sender<super::Job>,
    pub metrics: super::ShadowMetrics,
}

pub struct Tap {
    tx: Option<mpsc::Sender<Chunk>>,
    budget: Arc<AtomicUsize>,
    held: Vec<u8>,
    deferred: Option<Box<Deferred>>,
    /// Header bytes of the message being walked.
    header: [u8; 5],
    header_len: usize,
    /// Body bytes of the current message still to come.
    body_left: usize,
    /// The current message is the ReadyForQuery that ends the answer.
    last: bool,
}

impl Tap {
    pub fn new(budget: Arc<AtomicUsize>) -> (Self, mpsc::Receiver<Chunk>) {
        let (tx, rx) = mpsc::channel(CHANNEL_RUNS);
        (
            Self {
                tx: Some(tx),
                budget,
                held: Vec::new(),
                deferred: None,
                header: [0; 5],
                header_len: 0,
                body_left: 0,
                last: false,
            },
            rx,
        )
    }

    /// The job goes to the executor with the first bytes handed over.
    pub fn defer(&mut self, d: Deferred) {
        self.deferred = Some(Box::new(d));
    }

    /// Copies forwarded bytes. Returns true once the answer is complete
    /// (or the tap gave up): the caller drops the tap.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut at = 0;
        let mut done = false;
        while at < bytes.len() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len() - at);
                self.body_left -= n;
                at += n;
                if self.body_left == 0 && self.last {
                    done = true;
                    break;
                }
                continue;
            }
            let n = (5 - self.header_len).min(bytes.len() - at);
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[at..at + n]);
            self.header_len += n;
            at += n;
            if self.header_len == 5 {
                self.header_len = 0;
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.body_left = len.saturating_sub(4);
                self.last = self.header[0] == b'Z';
                if self.body_left == 0 && self.last {
                    done = true;
                    break;
                }
            }
        }
        if self.tx.is_none() {
            return true;
        }
        self.held.extend_from_slice(&bytes[..at]);
        if (done || self.held.len() >= HOLD) && !self.flush() {
            return true;
        }
        if done {
            self.tx = None;
        }
        done
    }

    /// Hands the copied bytes over (and the job, the first time). False
    /// when the tap gave up.
    fn flush(&mut self) -> bool {
        let Some(tx) = &self.tx else {
            return false;
        };
        let bytes = std::mem::take(&mut self.held);
        let before = self.budget.fetch_add(bytes.len(), Relaxed);
        let len = bytes.len();
        let chunk = Chunk {
            bytes: Bytes::from(bytes),
            budget: Arc::clone(&self.budget),
        };
        // Dropping the chunk (if it was not sent) returns its bytes.
        if before + len > MAX_TAP_BYTES || tx.try_send(chunk).is_err() {
            self.give_up("served_incomplete");
            return false;
        }
        if let Some(d) = self.deferred.take() {
            let Deferred {
                job,
                queue,
                metrics,
            } = *d;
            match queue.try_send(job) {
                Ok(()) => metrics.queued.inc(),
                Err(_) => {
                    metrics.skip("queue_full");
                    self.tx = None;
                    return false;
                }
            };
        }
        true
    }

    fn give_up(&mut self, why: &'static str) {
        self.tx = None;
        self.held = Vec::new();
        // A job never handed over is counted here; one already running
        // sees the answer end early and counts it.
        if let Some(d) = self.deferred.take() {
            d.metrics.skip(why);
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // The served answer never completed here (the session ended, or a
        // routed read fell back to the source).
        if let Some(d) = self.deferred.take() {
            d.metrics.skip("served_incomplete");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn stops_at_ready_for_query_across_split_runs() {
        let budget = Arc::new(AtomicUsize::new(0));
        let (mut tap, mut rx) = Tap::new(Arc::clone(&budget));
        let mut answer = frame(b'T', b"\0\0");
        answer.extend(frame(b'D', b"\0\x01\0\0\0\x011"));
        answer.extend(frame(b'C', b"SELECT 1\0"));
        answer.extend(frame(b'Z', b"I"));
        let mut after = answer.clone();
        after.extend(frame(b'N', b"later notice"));
        // Byte by byte: the header walk must carry across runs.
        let mut done_at = None;
        for (i, b) in after.iter().enumerate() {
            if tap.feed(std::slice::from_ref(b)) {
                done_at = Some(i);
                break;
            }
        }
        assert_eq!(done_at, Some(answer.len() - 1));
        let mut got = Vec::new();
        while let Ok(c) = rx.try_recv() {
            got.extend_from_slice(&c.bytes);
        }
        assert_eq!(got, answer);
        assert_eq!(budget.load(Relaxed), 0, "chunks give their bytes back");
    }

    #[test]
    fn gives_up_when_the_channel_is_full() {
        let budget = Arc::new(AtomicUsize::new(0));
        let (mut tap, rx) = Tap::new(Arc::clone(&budget));
        // Each row is a hand-over of its own.
        let row = frame(b'D', &vec![0; HOLD]);
        let mut gave_up = false;
        for _ in 0..CHANNEL_RUNS + 1 {
            if tap.feed(&row) {
                gave_up = true;
                break;
            }
        }
        assert!(gave_up);
        assert_eq!(budget.load(Relaxed), CHANNEL_RUNS * row.len());
        drop(rx);
        assert_eq!(budget.load(Relaxed), 0);
    }
}
