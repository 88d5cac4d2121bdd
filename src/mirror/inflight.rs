//! The in-flight journal: every unit whose commit is on its way to the
//! source, written down whole before the commit is sent, so that a crash
//! between the source committing and the spool append loses nothing.
//!
//! A unit is spooled only after the source acknowledged its commit. Before
//! a session forwards anything that may commit a write (a COMMIT, an
//! autocommit write), it *arms* its slot: an INTENT record holding the
//! whole unit as it stands (the spool record minus the answers still to
//! come) and, when a probe has read it, the unit's transaction id. Once
//! the unit is settled (spooled, or known not to have committed) a DONE
//! record says so, with the spool position. At start-up, an intent with no
//! DONE is a unit *in doubt*: with its transaction id, the source's
//! `pg_xact_status()` says whether it committed, and a committed one is
//! spooled from the intent (`recover`). An intent whose DONE names a spool
//! position a machine crash cut off the spool is spooled again the same way.
//!
//! The journal is a sequence of files `journal.<n>`, each a run of framed
//! records `[u32 length][u32 crc32][kind][body]`, appended under one lock.
//! With `mirror.fsync = "commit"` the sync thread makes the intent durable
//! before its commit goes out (one fdatasync for every session waiting at
//! that moment). A file is deleted once every intent in it is settled and
//! the spool is synced past the units it settled.
//!
//! In memory, each armed slot has an *arm number*, new each time the slot
//! goes from disarmed to armed. The applier uses them to order units
//! (`order`): a unit spooled while another session's arm was in flight is
//! applied only once that arm is over.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::{BufMut, BytesMut};
use tokio::sync::Notify;
use tracing::warn;

use super::unit::MirroredUnit;

/// Upper bound on slots (sessions open at once); beyond it, sessions run
/// without a slot and that is counted.
const MAX_SLOTS: u32 = 1 << 20;
/// A journal file is closed once past this size.
const FILE_BYTES: u64 = 16 << 20;
/// Largest record a reader accepts.
const MAX_RECORD: usize = 1 << 30;

const INTENT: u8 = 1;
const XID: u8 = 2;
const DONE: u8 = 3;
/// More of an armed unit: its later requests (pipelined, or autocommit
/// statements in a row), appended to the intent.
const MORE: u8 = 4;

/// A unit left without a DONE by a previous process (or by a session that
/// ended with its commit in flight), or one whose spool record was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InDoubt {
    pub session: u64,
    pub time_us: u64,
    /// The unit's transaction id on the source, when a probe read it.
    pub xid: Option<u64>,
    /// The unit as it stood when its commit was sent (`None` if the record
    /// could not be decoded, or came from a journal of an older version).
    pub unit: Option<MirroredUnit>,
    /// Its statement texts, for reports.
    pub statements: String,
    /// The journal's key of its arm (run, slot, arm number), which its
    /// spool record carries too when it made it there.
    pub key: Option<(u64, u32, u64)>,
    /// It was settled as spooled at this position, so it committed for
    /// sure; the spool lost it (a machine crash under `fsync = "commit"`
    /// after the intent was synced and before the record was).
    pub spooled_as: Option<u64>,
}

/// The statement texts of a unit (Query texts and Parse texts), cut at 2000
/// bytes.
pub fn statements_of(r: &MirroredUnit) -> String {
    let mut out = String::new();
    for seg in &r.segments {
        let mut m = &seg.messages[..];
        while m.len() >= 5 && out.len() < 2000 {
            let len = u32::from_be_bytes([m[1], m[2], m[3], m[4]]) as usize;
            if len < 4 || m.len() < 1 + len {
                break;
            }
            let body = &m[5..1 + len];
            let text = match m[0] {
                b'Q' => body.split(|&b| b == 0).next(),
                b'P' => body.split(|&b| b == 0).nth(1),
                _ => None,
            };
            if let Some(t) = text.filter(|t| !t.is_empty()) {
                if !out.is_empty() {
                    out.push_str("; ");
                }
                out.push_str(&String::from_utf8_lossy(t));
            }
            m = &m[1 + len..];
        }
    }
    if out.len() > 2000 {
        let mut end = 2000;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

struct JournalFile {
    number: u64,
    /// Intents in this file not settled yet: (slot, arm).
    open: HashSet<(u32, u64)>,
    /// Highest spool seq settled in this file.
    max_seq: u64,
}

struct Log {
    file: File,
    bytes: u64,
    /// Files of this process, oldest first; the last one is written.
    files: VecDeque<JournalFile>,
    /// Which file holds each armed slot's latest intent.
    slot_file: HashMap<u32, u64>,
    buf: BytesMut,
}

pub struct InFlight {
    dir: PathBuf,
    log: Mutex<Log>,
    slots: Mutex<Slots>,
    /// Armed slots and their arm numbers.
    armed: Mutex<HashMap<u32, u64>>,
    next_arm: AtomicU64,
    /// Identifies this process's arms (slots are reused across runs).
    pub run: u64,
    /// Writes made to the journal, and how many of them a sync covered (a
    /// commit in `fsync = "commit"` mode waits for its intent's write).
    written: AtomicU64,
    synced: AtomicU64,
    /// Files a previous process left, kept until recovery is done with them.
    recovery_files: Mutex<Vec<PathBuf>>,
    /// Woken whenever an arm ends.
    pub settled: Notify,
}

#[derive(Default)]
struct Slots {
    free: Vec<u32>,
    next: u32,
}

fn journal_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("journal.{n:010}"))
}

fn list_journals(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix("journal."))
            .and_then(|n| n.parse::<u64>().ok())
        {
            v.push((n, e.path()));
        }
    }
    v.sort();
    Ok(v)
}

fn open_file(path: &Path) -> io::Result<File> {
    crate::private_files::open_append(path)
}

/// One journal record as read back.
enum Entry {
    Intent {
        run: u64,
        slot: u32,
        arm: u64,
        session: u64,
        time_us: u64,
        xid: Option<u64>,
        unit: Vec<u8>,
    },
    Xid {
        run: u64,
        slot: u32,
        arm: u64,
        xid: u64,
    },
    Done {
        run: u64,
        slot: u32,
        arm: u64,
        seq: u64,
    },
    More {
        run: u64,
        slot: u32,
        arm: u64,
        unit: Vec<u8>,
    },
}

fn take<const N: usize>(b: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = b.split_first_chunk::<N>()?;
    *b = rest;
    Some(*head)
}

fn decode(kind: u8, mut b: &[u8]) -> Option<Entry> {
    let b = &mut b;
    let run = u64::from_be_bytes(take(b)?);
    let slot = u32::from_be_bytes(take(b)?);
    let arm = u64::from_be_bytes(take(b)?);
    Some(match kind {
        INTENT => Entry::Intent {
            run,
            slot,
            arm,
            session: u64::from_be_bytes(take(b)?),
            time_us: u64::from_be_bytes(take(b)?),
            xid: u64::from_be_bytes(take(b)?).checked_sub(1),
            unit: b.to_vec(),
        },
        XID => Entry::Xid {
            run,
            slot,
            arm,
            xid: u64::from_be_bytes(take(b)?),
        },
        DONE => Entry::Done {
            run,
            slot,
            arm,
            seq: u64::from_be_bytes(take(b)?),
        },
        MORE => Entry::More {
            run,
            slot,
            arm,
            unit: b.to_vec(),
        },
        _ => return None,
    })
}

/// Reads every whole record of a journal file (a torn or damaged tail ends
/// it: nothing after a crash mid-write can be trusted).
fn read_entries(path: &Path) -> io::Result<Vec<Entry>> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let mut out = Vec::new();
    let mut at = 0;
    while at + 9 <= data.len() {
        let len = u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        let crc = u32::from_be_bytes([data[at + 4], data[at + 5], data[at + 6], data[at + 7]]);
        if !(1..=MAX_RECORD).contains(&len) || at + 8 + len > data.len() {
            break;
        }
        let body = &data[at + 8..at + 8 + len];
        if crc32fast::hash(body) != crc {
            break;
        }
        if let Some(e) = decode(body[0], &body[1..]) {
            out.push(e);
        }
        at += 8 + len;
    }
    Ok(out)
}

impl InFlight {
    /// Opens the journal in `dir`, returning the units a previous process
    /// left in doubt or settled as spooled (the caller checks those against
    /// the spool). Its files stay until `recovered()`.
    pub fn open(dir: &Path) -> io::Result<(Self, Vec<InDoubt>)> {
        let old = list_journals(dir)?;
        // Legacy journal of fixed slots (statement texts only): its units
        // cannot be recovered, only reported.
        let mut left = legacy_slots(&dir.join("inflight"))?;
        let mut intents: HashMap<(u64, u32, u64), InDoubt> = HashMap::new();
        let mut order: Vec<(u64, u32, u64)> = Vec::new();
        for (_, path) in &old {
            for e in read_entries(path)? {
                match e {
                    Entry::Intent {
                        run,
                        slot,
                        arm,
                        session,
                        time_us,
                        xid,
                        unit,
                    } => {
                        let key = (run, slot, arm);
                        if !intents.contains_key(&key) {
                            order.push(key);
                        }
                        let prev_xid = intents.get(&key).and_then(|d| d.xid);
                        let unit = MirroredUnit::decode(0, &unit).ok();
                        intents.insert(
                            key,
                            InDoubt {
                                session,
                                time_us,
                                xid: xid.or(prev_xid),
                                statements: unit.as_ref().map(statements_of).unwrap_or_default(),
                                unit,
                                key: Some(key),
                                spooled_as: None,
                            },
                        );
                    }
                    Entry::More {
                        run,
                        slot,
                        arm,
                        unit,
                    } => {
                        if let Some(d) = intents.get_mut(&(run, slot, arm)) {
                            match (d.unit.as_mut(), MirroredUnit::decode(0, &unit)) {
                                (Some(u), Ok(more)) => {
                                    u.segments.extend(more.segments);
                                    u.prepared.extend(more.prepared);
                                    d.xid = d.xid.or(more.xid);
                                    d.statements = statements_of(u);
                                }
                                // A part that cannot be read: the unit
                                // cannot be replayed whole.
                                _ => d.unit = None,
                            }
                        }
                    }
                    Entry::Xid {
                        run,
                        slot,
                        arm,
                        xid,
                    } => {
                        if let Some(d) = intents.get_mut(&(run, slot, arm)) {
                            d.xid = Some(xid);
                        }
                    }
                    Entry::Done {
                        run,
                        slot,
                        arm,
                        seq,
                    } => {
                        if seq == 0 {
                            intents.remove(&(run, slot, arm));
                        } else if let Some(d) = intents.get_mut(&(run, slot, arm)) {
                            d.spooled_as = Some(seq);
                        }
                    }
                }
            }
        }
        left.extend(order.into_iter().filter_map(|k| intents.remove(&k)));
        let first = old.last().map_or(1, |(n, _)| n + 1);
        let path = journal_path(dir, first);
        let file = open_file(&path)?;
        let run = crate::clock::now_us() ^ ((std::process::id() as u64) << 44);
        let mut files = VecDeque::new();
        files.push_back(JournalFile {
            number: first,
            open: HashSet::new(),
            max_seq: 0,
        });
        Ok((
            Self {
                dir: dir.to_path_buf(),
                log: Mutex::new(Log {
                    file,
                    bytes: 0,
                    files,
                    slot_file: HashMap::new(),
                    buf: BytesMut::new(),
                }),
                slots: Mutex::default(),
                armed: Mutex::default(),
                next_arm: AtomicU64::new(1),
                run,
                written: AtomicU64::new(0),
                synced: AtomicU64::new(0),
                recovery_files: Mutex::new(old.into_iter().map(|(_, p)| p).collect()),
                settled: Notify::new(),
            },
            left,
        ))
    }

    /// The previous process's files are no longer needed: everything they
    /// held is spooled again or reported.
    pub fn recovered(&self) {
        let files = std::mem::take(
            &mut *self
                .recovery_files
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for f in files {
            let _ = fs::remove_file(f);
        }
        let _ = fs::remove_file(self.dir.join("inflight"));
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
        self.disarm(slot, 0);
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .free
            .push(slot);
    }

    /// Writes one record (kind, then the common head, then `body`); a DONE
    /// carries the spool seq it settled as (0: none).
    fn append(
        &self,
        kind: u8,
        slot: u32,
        arm: u64,
        seq: u64,
        body: impl FnOnce(&mut BytesMut),
    ) -> io::Result<()> {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let log = &mut *log;
        log.buf.clear();
        log.buf.put_u32(0);
        log.buf.put_u32(0);
        log.buf.put_u8(kind);
        log.buf.put_u64(self.run);
        log.buf.put_u32(slot);
        log.buf.put_u64(arm);
        body(&mut log.buf);
        let len = (log.buf.len() - 8) as u32;
        log.buf[0..4].copy_from_slice(&len.to_be_bytes());
        let crc = crc32fast::hash(&log.buf[8..]);
        log.buf[4..8].copy_from_slice(&crc.to_be_bytes());
        if let Err(e) = log.file.write_all(&log.buf) {
            // A torn record would end the journal for a reader: cut it off.
            let _ = log.file.set_len(log.bytes);
            warn!(error = %e, "cannot write the mirror's in-flight journal");
            return Err(e);
        }
        log.bytes += log.buf.len() as u64;
        let number = log.files.back().map_or(0, |f| f.number);
        match kind {
            INTENT => {
                if let Some(prev) = log.slot_file.insert(slot, number) {
                    if prev != number {
                        if let Some(f) = log.files.iter_mut().find(|f| f.number == prev) {
                            f.open.remove(&(slot, arm));
                        }
                    }
                }
                if let Some(f) = log.files.back_mut() {
                    f.open.insert((slot, arm));
                }
            }
            DONE => {
                // The file holding the intent stays until the spool holds
                // the unit on stable storage.
                if let Some(n) = log.slot_file.remove(&slot) {
                    if let Some(f) = log.files.iter_mut().find(|f| f.number == n) {
                        f.open.remove(&(slot, arm));
                        f.max_seq = f.max_seq.max(seq);
                    }
                }
            }
            _ => {}
        }
        if log.bytes >= FILE_BYTES {
            let next = number + 1;
            // The closed file must reach the disk before it can be relied on.
            if let Err(e) = log.file.sync_data() {
                warn!(error = %e, "cannot sync the mirror's in-flight journal");
            }
            match open_file(&journal_path(&self.dir, next)) {
                Ok(f) => {
                    log.file = f;
                    log.bytes = 0;
                    log.files.push_back(JournalFile {
                        number: next,
                        open: HashSet::new(),
                        max_seq: 0,
                    });
                }
                Err(e) => warn!(error = %e, "cannot start a new in-flight journal file"),
            }
        }
        self.written.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Marks `slot` as holding a possibly committing unit, written whole;
    /// returns the arm number (unchanged while the slot stays armed) and
    /// the journal write to wait for in `fsync = "commit"` mode.
    pub fn arm(&self, slot: u32, unit: &MirroredUnit) -> io::Result<(u64, u64)> {
        let arm = *self
            .armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(slot)
            .or_insert_with(|| self.next_arm.fetch_add(1, Ordering::Relaxed));
        self.append(INTENT, slot, arm, 0, |b| {
            b.put_u64(unit.session);
            b.put_u64(unit.committed_at_us);
            b.put_u64(unit.xid.map_or(0, |x| x + 1));
            unit.encode(b);
        })?;
        Ok((arm, self.written()))
    }

    /// More of the armed unit (its requests since the last arm).
    pub fn arm_more(&self, slot: u32, more: &MirroredUnit) -> io::Result<(u64, u64)> {
        let Some(arm) = self.arm_of(slot) else {
            return self.arm(slot, more);
        };
        self.append(MORE, slot, arm, 0, |b| more.encode(b))?;
        Ok((arm, self.written()))
    }

    /// The armed unit's transaction id became known.
    pub fn set_xid(&self, slot: u32, xid: u64) {
        let Some(arm) = self.arm_of(slot) else {
            return;
        };
        let _ = self.append(XID, slot, arm, 0, |b| b.put_u64(xid));
    }

    fn arm_of(&self, slot: u32) -> Option<u64> {
        self.armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&slot)
            .copied()
    }

    /// The armed unit is settled: spooled as `seq`, or (0) known not to
    /// need mirroring.
    pub fn disarm(&self, slot: u32, seq: u64) {
        let Some(arm) = self
            .armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&slot)
        else {
            return;
        };
        let _ = self.append(DONE, slot, arm, seq, |b| b.put_u64(seq));
        self.settled.notify_waiters();
    }

    /// The number of the last write made (its sync is `synced() >= it`).
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    pub fn synced(&self) -> u64 {
        self.synced.load(Ordering::Acquire)
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
        run != self.run || self.arm_of(slot) != Some(arm)
    }

    /// Whether records were written since the last `sync`.
    pub fn unsynced(&self) -> bool {
        self.written() > self.synced()
    }

    /// Makes every record written so far durable.
    pub fn sync(&self) -> io::Result<()> {
        let (upto, file) = {
            let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            (self.written(), log.file.try_clone()?)
        };
        file.sync_data()?;
        self.synced.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    /// Deletes closed files with nothing open whose settled units the spool
    /// holds on stable storage (through `spool_synced`).
    pub fn release_files(&self, spool_synced: u64) {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        while log.files.len() > 1 {
            let Some(f) = log.files.front() else {
                break;
            };
            if !f.open.is_empty() || f.max_seq > spool_synced {
                break;
            }
            let n = f.number;
            log.files.pop_front();
            let _ = fs::remove_file(journal_path(&self.dir, n));
        }
        // The file being written, once nothing in it is needed, starts over
        // (a small disk must not fill up with settled intents).
        let done = log.files.len() == 1
            && log
                .files
                .back()
                .is_some_and(|f| f.open.is_empty() && f.max_seq <= spool_synced);
        if done && log.bytes > 0 && log.file.set_len(0).is_ok() {
            log.bytes = 0;
            if let Some(f) = log.files.back_mut() {
                f.max_seq = 0;
            }
        }
    }
}

/// Units the slot journal of earlier versions (`inflight`, 1 KiB slots of
/// statement text) left armed: reported, they cannot be replayed.
fn legacy_slots(path: &Path) -> io::Result<Vec<InDoubt>> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for slot in data.chunks(1024) {
        let (version, header) = match slot.first() {
            Some(1) => (1, 19),
            Some(2) => (2, 27),
            _ => continue,
        };
        if slot.len() < header {
            continue;
        }
        let be = |r: std::ops::Range<usize>| {
            slot.get(r)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0)
        };
        let n = u16::from_be_bytes([slot[header - 2], slot[header - 1]]) as usize;
        let text = slot.get(header..header + n).unwrap_or_default();
        out.push(InDoubt {
            session: be(1..9),
            time_us: be(9..17),
            xid: if version == 2 {
                be(17..25).checked_sub(1)
            } else {
                None
            },
            unit: None,
            statements: String::from_utf8_lossy(text).into_owned(),
            key: None,
            spooled_as: None,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::unit::Segment;

    fn unit(session: u64, sql: &str) -> MirroredUnit {
        let mut m = vec![b'Q'];
        m.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        m.extend_from_slice(sql.as_bytes());
        m.push(0);
        MirroredUnit {
            session,
            committed_at_us: 100,
            segments: vec![Segment {
                messages: m,
                status: b'I',
                outcomes: vec![],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn intents_without_a_done_survive_a_restart_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (j, left) = InFlight::open(dir.path()).unwrap();
        assert!(left.is_empty());
        let (a, b, c) = (
            j.acquire().unwrap(),
            j.acquire().unwrap(),
            j.acquire().unwrap(),
        );
        let (arm_a, _) = j.arm(a, &unit(7, "UPDATE t SET v = 1")).unwrap();
        j.set_xid(a, 741);
        // More of the unit: appended to the intent.
        let (again, _) = j.arm_more(a, &unit(7, "COMMIT")).unwrap();
        assert_eq!(again, arm_a);
        j.arm(b, &unit(8, "INSERT INTO t VALUES (1)")).unwrap();
        j.disarm(b, 0);
        j.arm(c, &unit(9, "DELETE FROM t")).unwrap();
        j.disarm(c, 12);
        drop(j);
        let (j, left) = InFlight::open(dir.path()).unwrap();
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(left[0].session, 7);
        assert_eq!(left[0].xid, Some(741));
        assert_eq!(left[0].statements, "UPDATE t SET v = 1; COMMIT");
        assert_eq!(left[0].spooled_as, None);
        assert_eq!(left[1].session, 9);
        assert_eq!(left[1].spooled_as, Some(12));
        // Until recovery is done the old files stay; then they go.
        assert!(list_journals(dir.path()).unwrap().len() >= 2);
        j.recovered();
        assert_eq!(list_journals(dir.path()).unwrap().len(), 1);
        drop(j);
        let (_, left) = InFlight::open(dir.path()).unwrap();
        assert!(left.is_empty());
    }

    #[test]
    fn arm_numbers_order_and_settle() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = InFlight::open(dir.path()).unwrap();
        let a = j.acquire().unwrap();
        let (a1, w1) = j.arm(a, &unit(7, "x")).unwrap();
        assert_eq!(j.arm_more(a, &unit(7, "y")).unwrap().0, a1);
        assert!(j.written() > w1);
        assert_eq!(j.snapshot(None), vec![(a, a1)]);
        assert!(j.snapshot(Some(a)).is_empty());
        assert!(!j.is_settled(j.run, a, a1));
        assert!(j.is_settled(j.run + 1, a, a1));
        j.disarm(a, 0);
        assert!(j.is_settled(j.run, a, a1));
        assert_ne!(j.arm(a, &unit(7, "z")).unwrap().0, a1);
        j.disarm(a, 0);
        assert!(j.synced() < j.written());
        j.sync().unwrap();
        assert_eq!(j.synced(), j.written());
        let s = j.acquire().unwrap();
        j.release(s);
        assert_eq!(j.acquire(), Some(s));
    }

    #[test]
    fn a_torn_tail_ends_the_journal_and_the_rest_counts() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = InFlight::open(dir.path()).unwrap();
        let a = j.acquire().unwrap();
        j.arm(a, &unit(1, "UPDATE t SET v = 2")).unwrap();
        drop(j);
        let (_, path) = list_journals(dir.path()).unwrap().pop().unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(&[0, 0, 0, 40, 1, 2]).unwrap();
        drop(f);
        let (_, left) = InFlight::open(dir.path()).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].statements, "UPDATE t SET v = 2");
    }
}
