//! The in-flight journal: which sessions had a possibly committing write on
//! its way to the source, so that a crash cannot lose one silently.
//!
//! A unit is spooled only after the source acknowledged its commit. If the
//! proxy dies between the source committing and the spool append, the
//! source has a write the target will never get. Before a session forwards
//! anything that may commit a write (a COMMIT, an autocommit write), it
//! *arms* its slot here with the unit's statements; once the unit is settled
//! (spooled, or known not to have committed) it disarms it. A slot still
//! armed at start-up, or at the end of a session, is a unit *in doubt*:
//! the source may or may not have committed it, and it is not on the target.
//! It is reported as such (gaps.jsonl, status, metrics) so an operator can
//! check those rows; nothing is guessed.
//!
//! The file is an array of fixed-size slots written with single `pwrite`s
//! into the page cache: a SIGKILL cannot tear one.
//!
//! In memory, each armed slot also has an *arm number*, new each time the
//! slot goes from disarmed to armed. The applier uses them to order units
//! (`order`): a unit spooled while another session's arm was in flight is
//! applied only once that arm is over.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

const SLOT: usize = 1024;
const HEADER: usize = 1 + 8 + 8 + 8 + 2;
/// Statement text kept per slot (the rest is cut).
pub const MAX_TEXT: usize = SLOT - HEADER;
/// Upper bound on slots (sessions open at once); beyond it, sessions run
/// without a slot and that is counted.
const MAX_SLOTS: u32 = 1 << 20;
/// Slot format 2 added the transaction id (format 1 slots read as none).
const ARMED: u8 = 2;

/// A unit left armed by a previous process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InDoubt {
    pub session: u64,
    pub time_us: u64,
    /// The unit's transaction id on the source, when a probe read it.
    pub xid: Option<u64>,
    pub statements: String,
}

pub struct InFlight {
    file: File,
    slots: Mutex<Slots>,
    /// Armed slots and their arm numbers.
    armed: Mutex<HashMap<u32, u64>>,
    next_arm: AtomicU64,
    /// Identifies this process's arms (slots are reused across runs).
    pub run: u64,
    /// Woken whenever an arm ends.
    pub settled: Notify,
}

#[derive(Default)]
struct Slots {
    free: Vec<u32>,
    next: u32,
}

impl InFlight {
    /// Opens the journal in `dir`, returning what a previous process left
    /// armed, and clears it.
    pub fn open(dir: &Path) -> io::Result<(Self, Vec<InDoubt>)> {
        let path = dir.join("inflight");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)?;
        let mut left = Vec::new();
        let len = file.metadata()?.len();
        let mut off = 0u64;
        while off < len {
            // The last slot is as long as its last write: pad it.
            let mut slot = [0u8; SLOT];
            let n = (len - off).min(SLOT as u64) as usize;
            file.read_exact_at(&mut slot[..n], off)?;
            if let Some(d) = decode(&slot) {
                left.push(d);
            }
            off += SLOT as u64;
        }
        file.set_len(0)?;
        let run = super::capture::now_us() ^ ((std::process::id() as u64) << 44);
        Ok((
            Self {
                file,
                slots: Mutex::default(),
                armed: Mutex::default(),
                next_arm: AtomicU64::new(1),
                run,
                settled: Notify::new(),
            },
            left,
        ))
    }

    /// A slot for a new session, or `None` when all are taken.
    pub fn acquire(&self) -> Option<u32> {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = s.free.pop() {
            return Some(i);
        }
        if s.next >= MAX_SLOTS {
            return None;
        }
        s.next += 1;
        Some(s.next - 1)
    }

    /// Gives a disarmed slot back.
    pub fn release(&self, slot: u32) {
        self.disarm(slot);
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .free
            .push(slot);
    }

    /// Marks `slot` as holding a possibly committing unit; returns the arm
    /// number (unchanged while the slot stays armed).
    pub fn arm(
        &self,
        slot: u32,
        session: u64,
        time_us: u64,
        xid: Option<u64>,
        statements: &str,
    ) -> u64 {
        let arm = *self
            .armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(slot)
            .or_insert_with(|| self.next_arm.fetch_add(1, Ordering::Relaxed));
        self.write_slot(slot, session, time_us, xid, statements);
        arm
    }

    /// The armed unit's transaction id became known.
    pub fn set_xid(&self, slot: u32, xid: u64) {
        let at = slot as u64 * SLOT as u64 + 17;
        if let Err(e) = self.file.write_all_at(&(xid + 1).to_be_bytes(), at) {
            tracing::warn!(error = %e, "cannot write the mirror's in-flight journal");
        }
    }

    fn write_slot(
        &self,
        slot: u32,
        session: u64,
        time_us: u64,
        xid: Option<u64>,
        statements: &str,
    ) {
        let mut text = &statements.as_bytes()[..statements.len().min(MAX_TEXT)];
        // Cut on a character boundary.
        while std::str::from_utf8(text).is_err() {
            text = &text[..text.len() - 1];
        }
        let mut buf = [0u8; SLOT];
        buf[0] = ARMED;
        buf[1..9].copy_from_slice(&session.to_be_bytes());
        buf[9..17].copy_from_slice(&time_us.to_be_bytes());
        buf[17..25].copy_from_slice(&xid.map_or(0, |x| x + 1).to_be_bytes());
        buf[25..27].copy_from_slice(&(text.len() as u16).to_be_bytes());
        buf[HEADER..HEADER + text.len()].copy_from_slice(text);
        let n = HEADER + text.len();
        if let Err(e) = self.file.write_all_at(&buf[..n], slot as u64 * SLOT as u64) {
            tracing::warn!(error = %e, "cannot write the mirror's in-flight journal");
        }
    }

    pub fn disarm(&self, slot: u32) {
        let _ = self.file.write_all_at(&[0], slot as u64 * SLOT as u64);
        let was = self
            .armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&slot);
        if was.is_some() {
            self.settled.notify_waiters();
        }
    }

    /// The arms in flight now, but for `except`'s.
    pub fn snapshot(&self, except: Option<u32>) -> Vec<(u32, u64)> {
        let armed = self.armed.lock().unwrap_or_else(|p| p.into_inner());
        armed
            .iter()
            .filter(|(s, _)| Some(**s) != except)
            .map(|(&s, &a)| (s, a))
            .collect()
    }

    /// Whether arm `arm` of `slot` in process `run` is over.
    pub fn is_settled(&self, run: u64, slot: u32, arm: u64) -> bool {
        run != self.run
            || self
                .armed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&slot)
                != Some(&arm)
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

fn decode(slot: &[u8; SLOT]) -> Option<InDoubt> {
    if slot[0] != ARMED {
        return None;
    }
    let n = u16::from_be_bytes([slot[25], slot[26]]) as usize;
    if n > MAX_TEXT {
        return None;
    }
    Some(InDoubt {
        session: u64::from_be_bytes(slot[1..9].try_into().ok()?),
        time_us: u64::from_be_bytes(slot[9..17].try_into().ok()?),
        xid: u64::from_be_bytes(slot[17..25].try_into().ok()?).checked_sub(1),
        statements: String::from_utf8_lossy(&slot[HEADER..HEADER + n]).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn armed_slots_survive_a_reopen_and_disarmed_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let (j, left) = InFlight::open(dir.path()).unwrap();
        assert!(left.is_empty());
        let (a, b, c) = (
            j.acquire().unwrap(),
            j.acquire().unwrap(),
            j.acquire().unwrap(),
        );
        j.arm(a, 7, 100, None, "UPDATE t SET v = 1; COMMIT");
        j.set_xid(a, 741);
        j.arm(b, 8, 200, None, "INSERT INTO t VALUES (1)");
        j.disarm(b);
        let long = "é".repeat(MAX_TEXT); // cut on a character boundary
        j.arm(c, 9, 300, None, &long);
        drop(j);
        let (j, left) = InFlight::open(dir.path()).unwrap();
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(
            left[0],
            InDoubt {
                session: 7,
                time_us: 100,
                xid: Some(741),
                statements: "UPDATE t SET v = 1; COMMIT".into()
            }
        );
        assert_eq!(left[1].session, 9);
        assert!(left[1].statements.chars().all(|ch| ch == 'é'));
        assert_eq!(left[1].statements.len(), MAX_TEXT / 2 * 2);
        // Arm numbers: kept while armed, new after a disarm.
        let a1 = j.arm(a, 7, 100, None, "x");
        assert_eq!(j.arm(a, 7, 101, None, "x; y"), a1);
        assert_eq!(j.snapshot(None), vec![(a, a1)]);
        assert!(j.snapshot(Some(a)).is_empty());
        assert!(!j.is_settled(j.run, a, a1));
        assert!(j.is_settled(j.run + 1, a, a1));
        j.disarm(a);
        assert!(j.is_settled(j.run, a, a1));
        assert_ne!(j.arm(a, 7, 102, None, "z"), a1);
        j.disarm(a);
        // Reopening cleared the journal; released slots are reused.
        drop(j);
        let (j, left) = InFlight::open(dir.path()).unwrap();
        assert!(left.is_empty());
        let s = j.acquire().unwrap();
        j.release(s);
        assert_eq!(j.acquire(), Some(s));
    }
}
