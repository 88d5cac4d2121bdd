//! The hot path's part of a shadow read: copying the served answer.
//!
//! The tap sees the bytes forwarded to the client (by the source -> client
//! pump, or by the routing responder), walks just the message headers to
//! find the answer's ReadyForQuery, and sends a copy of each run into a
//! bounded channel. It never waits: a full channel, or the global byte
//! budget spent, makes it give up (the executor sees an incomplete answer
//! and counts the read as skipped).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::MAX_TAP_BYTES;

/// Runs of one answer queued at most (each at most a pump buffer).
const CHANNEL_RUNS: usize = 64;

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

pub struct Tap {
    tx: Option<mpsc::Sender<Chunk>>,
    budget: Arc<AtomicUsize>,
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
                header: [0; 5],
                header_len: 0,
                body_left: 0,
                last: false,
            },
            rx,
        )
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
        if !self.send(&bytes[..at]) {
            return true;
        }
        if done {
            self.tx = None;
        }
        done
    }

    /// False when the tap gave up.
    fn send(&mut self, bytes: &[u8]) -> bool {
        let Some(tx) = &self.tx else {
            return false;
        };
        if bytes.is_empty() {
            return true;
        }
        let before = self.budget.fetch_add(bytes.len(), Relaxed);
        let chunk = Chunk {
            bytes: Bytes::copy_from_slice(bytes),
            budget: Arc::clone(&self.budget),
        };
        if before + bytes.len() > MAX_TAP_BYTES || tx.try_send(chunk).is_err() {
            // Dropping the chunk (if it was not sent) returns its bytes.
            self.tx = None;
            return false;
        }
        true
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
        let row = frame(b'D', &[0; 100]);
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
