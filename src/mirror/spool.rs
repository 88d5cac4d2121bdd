//! The append-only spool: committed units of work on local disk, in the
//! order their commits were acknowledged, before anything is applied to the
//! target.
//!
//! Files are `<first seq>.spool` segments of framed records:
//! `[u32 length][u32 crc32][u64 seq][record]`, where the length and the CRC
//! cover seq and record. A record is written with one `write` under the
//! spool lock, which also assigns its sequence number.
//!
//! What survives what (`mirror.fsync`):
//! - `commit`: the sync thread fdatasyncs the live segment whenever a
//!   session waits for its unit, one call for everyone waiting at that
//!   moment, and the session forwards the commit acknowledgement only after
//!   that. Nothing acknowledged is lost to a machine crash.
//! - `interval`: the same thread syncs every `fsync_interval_ms`; a machine
//!   crash loses at most that window, and the next start records a gap.
//! - `off`: the page cache only. A proxy crash (SIGKILL) loses nothing in
//!   any mode: the kernel keeps what was written.
//!
//! Sequence numbers are never handed out twice, even when a crash loses the
//! tail that held them (the applier may have applied them already, and the
//! target's progress row would then skip their reuse): `seq.next` on disk
//! is always past every number handed out, reserved in blocks and synced
//! before a block is used.
//!
//! Segments are preallocated (`fallocate`, keeping the file size), so a
//! full disk shows up when a segment is created, as an error an append can
//! wait on, not as a failed fdatasync of data already written.
//!
//! A frame that fails its checksum in the middle of the spool is skipped
//! with a recorded gap (`SpoolReader`), never a stall; a torn frame at the
//! end of the newest segment (a crash mid-write) is cut off at open.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::sync::Notify;
use tracing::{error, warn};

use super::unit::MirroredUnit;
use crate::config::FsyncPolicy;

/// Segments are closed once past this size (or an eighth of the spool's
/// bound, so a small spool still frees space as it drains).
const SEGMENT_BYTES: u64 = 64 << 20;

fn segment_bytes(max_bytes: u64) -> u64 {
    (max_bytes / 8).clamp(64 << 10, SEGMENT_BYTES)
}
const FRAME_HEADER: usize = 4 + 4 + 8;
/// Largest record a reader accepts (a corrupt length must not allocate).
const MAX_RECORD: usize = 1 << 30;
/// Sequence numbers reserved on disk at a time.
const RESERVE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("spool full ({used} of {max} bytes)")]
    Full { used: u64, max: u64 },
    #[error("no space left on the spool's disk: {0}")]
    NoSpace(io::Error),
    #[error("spool write failed: {0}")]
    Io(#[from] io::Error),
    #[error("the spool could not be made durable earlier ({0}); nothing more is appended")]
    Failed(String),
}

fn is_no_space(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT)
}

struct Writer {
    file: File,
    /// (first seq, bytes) of every segment on disk, oldest first; the last
    /// one is being written.
    segments: VecDeque<(u64, u64)>,
    next_seq: u64,
    /// Every seq below this may have been handed out (it is on disk).
    reserved: u64,
    buf: BytesMut,
}

/// What the sync thread is asked to do.
#[derive(Default)]
struct SyncState {
    /// A session waits for a sync (commit mode).
    wanted: bool,
    /// The spool is shutting down.
    stop: bool,
}

pub struct Spool {
    dir: PathBuf,
    /// Held for the process's life (an exclusive lock on `lock`).
    _lock: File,
    /// Identifies this spool in the target's progress table.
    pub id: String,
    max_bytes: u64,
    policy: FsyncPolicy,
    writer: Mutex<Writer>,
    /// Highest sequence number appended (0 = none yet).
    last_seq: AtomicU64,
    /// Highest sequence number on stable storage (in `off` mode, what the
    /// last segment rotation synced).
    synced_seq: AtomicU64,
    bytes: AtomicU64,
    /// Set once an fdatasync failed: what was written since the last good
    /// one may be gone, so nothing is acknowledged on its strength again.
    failed: Mutex<Option<String>>,
    sync_state: Mutex<SyncState>,
    sync_cond: Condvar,
    /// Woken on every append (the applier waits on it).
    pub appended: Notify,
    /// Woken after every sync round (sessions waiting for durability).
    pub synced: Notify,
    /// Woken when space is released (backpressured sessions wait on it).
    pub released: Notify,
    /// What the previous process left behind, for the mirror's report.
    pub opened: Opened,
    /// Ranges of seqs handed out by no segment (skipped at a restart).
    skipped: Mutex<Vec<(u64, u64)>>,
    /// An append found the disk full since the last release.
    no_space: std::sync::atomic::AtomicBool,
}

/// How the previous process ended, as found at open.
#[derive(Debug, Clone, Default)]
pub struct Opened {
    /// It did not close the spool (it crashed or was killed).
    pub unclean: bool,
    /// The machine restarted since it opened the spool.
    pub rebooted: bool,
    /// Bytes of a torn frame cut off the end.
    pub torn_bytes: u64,
    /// The last seq on disk, and the first one this process hands out.
    pub last_on_disk: u64,
    pub next_seq: u64,
}

impl Opened {
    /// Whether acknowledged units may be missing from the spool: the
    /// machine restarted under a policy that acknowledged before syncing.
    pub fn may_have_lost(&self, policy: FsyncPolicy) -> bool {
        self.unclean && self.rebooted && policy != FsyncPolicy::Commit
    }
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.spool"))
}

fn list_segments(dir: &Path) -> io::Result<Vec<(u64, u64)>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".spool")) else {
            continue;
        };
        if let Ok(first) = stem.parse::<u64>() {
            v.push((first, e.metadata()?.len()));
        }
    }
    v.sort();
    Ok(v)
}

/// Writes `text` to `path` durably: a temporary file, fsync, rename, and
/// an fsync of the directory.
fn write_durably(dir: &Path, name: &str, text: &str) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = crate::private_files::options()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

/// The ranges in `skipped` ("from to" per line).
fn read_skipped(dir: &Path) -> Vec<(u64, u64)> {
    fs::read_to_string(dir.join("skipped"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (a, b) = l.split_once(' ')?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect()
}

/// This boot of the machine (a restart changes it).
fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Reserves the segment's blocks without changing its size, so later
/// writes into it cannot fail for lack of space (best effort: some
/// filesystems cannot).
fn preallocate(f: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(len).unwrap_or(libc::off_t::MAX);
    // SAFETY: fallocate on a valid, open file descriptor with in-range
    // arguments; it does not touch memory.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
        _ => Err(e),
    }
}

/// One frame read from a segment.
enum Frame {
    /// A whole record (seq, frame length).
    Record(u64, usize),
    /// The end of what the file holds (possibly a frame still being
    /// written).
    End,
    /// Bytes that are not a valid frame, with more data after them.
    Bad,
}

/// Reads one frame at the reader's position.
fn read_frame<R: Read>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<Frame> {
    let mut head = [0u8; FRAME_HEADER];
    match read_full(r, &mut head)? {
        0 => return Ok(Frame::End),
        n if n < FRAME_HEADER => return Ok(Frame::End),
        _ => {}
    }
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    if !(8..=MAX_RECORD).contains(&len) {
        // Preallocated space reads as zeros: that is the end, not damage.
        if head.iter().all(|&b| b == 0) {
            return Ok(Frame::End);
        }
        return Ok(Frame::Bad);
    }
    buf.resize(len - 8, 0);
    if read_full(r, buf)? < buf.len() {
        return Ok(Frame::End);
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&head[8..16]);
    h.update(buf);
    if h.finalize() != crc {
        return Ok(Frame::Bad);
    }
    let seq = u64::from_be_bytes([
        head[8], head[9], head[10], head[11], head[12], head[13], head[14], head[15],
    ]);
    Ok(Frame::Record(seq, FRAME_HEADER + buf.len()))
}

/// Reads as much of `buf` as the reader has; returns the count.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, cutting off a torn tail.
    pub fn open(dir: &Path, max_bytes: u64, policy: FsyncPolicy) -> io::Result<Self> {
        crate::private_files::private_dir(dir)?;
        // One proxy per spool: two appenders would interleave records.
        let lock = crate::private_files::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        lock.try_lock().map_err(|_| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                "the spool is in use by another pgshift process",
            )
        })?;
        let id_path = dir.join("spool.id");
        let id = match fs::read_to_string(&id_path) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
            _ => {
                let id = format!("{:016x}", rand::random::<u64>());
                write_durably(dir, "spool.id", &id)?;
                id
            }
        };
        // It is written into the target's progress table by name: a plain
        // token only, never anything that would need quoting.
        if id.len() > 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} must hold a plain token (letters, digits, _ or -, at most 64)",
                    id_path.display()
                ),
            ));
        }
        // How the last process ended: "<boot id> running|clean".
        let boot = boot_id();
        let mut opened = Opened::default();
        if let Ok(state) = fs::read_to_string(dir.join("state")) {
            let mut words = state.split_whitespace();
            let (b, how) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            opened.unclean = how != "clean";
            opened.rebooted = b != boot;
        }
        let mut segments: VecDeque<(u64, u64)> = list_segments(dir)?.into();
        let mut next_seq = 1;
        if let Some(&(first, _)) = segments.back() {
            // Find the last whole record of the newest segment.
            let path = segment_path(dir, first);
            let mut f = BufReader::new(File::open(&path)?);
            let mut good = 0u64;
            let mut last = first.saturating_sub(1);
            let mut buf = Vec::new();
            while let Frame::Record(seq, n) = read_frame(&mut f, &mut buf)? {
                good += n as u64;
                last = seq;
            }
            let len = fs::metadata(&path)?.len();
            if good < len {
                warn!(
                    segment = %path.display(),
                    cut = len - good,
                    "cutting a torn record off the end of the spool"
                );
                opened.torn_bytes = len - good;
                OpenOptions::new().write(true).open(&path)?.set_len(good)?;
            }
            if let Some(back) = segments.back_mut() {
                back.1 = good;
            }
            next_seq = last + 1;
        }
        opened.last_on_disk = next_seq - 1;
        // Never hand out a number a lost tail may have used.
        let reserved: u64 = fs::read_to_string(dir.join("seq.next"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1);
        next_seq = next_seq.max(reserved);
        opened.next_seq = next_seq;
        let mut skipped = read_skipped(dir);
        if next_seq > opened.last_on_disk + 1 {
            // These numbers are in no segment: the reader steps over them
            // (whether units were lost with them is the mirror's to say).
            skipped.push((opened.last_on_disk + 1, next_seq - 1));
            let text: String = skipped.iter().map(|(a, b)| format!("{a} {b}\n")).collect();
            write_durably(dir, "skipped", &text)?;
        }
        match segments.back().copied() {
            // An empty newest segment named for another seq: start one
            // named for the first seq it will hold (readers find segments
            // by their first seq).
            Some((first, 0)) if first != next_seq => {
                let _ = fs::remove_file(segment_path(dir, first));
                segments.pop_back();
                segments.push_back((next_seq, 0));
            }
            Some((_, 0)) => {}
            // Numbers skipped after it: each segment's seqs stay contiguous.
            Some(_) if next_seq > opened.last_on_disk + 1 => segments.push_back((next_seq, 0)),
            Some(_) => {}
            None => segments.push_back((next_seq, 0)),
        }
        let (first, _) = *segments.back().unwrap_or(&(next_seq, 0));
        let file = crate::private_files::options()
            .create(true)
            .append(true)
            .open(segment_path(dir, first))?;
        if let Err(e) = preallocate(&file, segment_bytes(max_bytes)) {
            warn!(error = %e, "cannot preallocate the spool segment");
        }
        let new_reserved = next_seq + RESERVE;
        write_durably(dir, "seq.next", &new_reserved.to_string())?;
        write_durably(dir, "state", &format!("{boot} running\n"))?;
        let bytes = segments.iter().map(|s| s.1).sum();
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
            id,
            max_bytes,
            policy,
            writer: Mutex::new(Writer {
                file,
                segments,
                next_seq,
                reserved: new_reserved,
                buf: BytesMut::new(),
            }),
            last_seq: AtomicU64::new(next_seq - 1),
            synced_seq: AtomicU64::new(next_seq - 1),
            bytes: AtomicU64::new(bytes),
            failed: Mutex::new(None),
            sync_state: Mutex::new(SyncState::default()),
            sync_cond: Condvar::new(),
            appended: Notify::new(),
            synced: Notify::new(),
            released: Notify::new(),
            opened,
            skipped: Mutex::new(skipped),
            no_space: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// When `seq` lies in a range skipped at a restart: the range's end.
    pub fn skipped_through(&self, seq: u64) -> Option<u64> {
        self.skipped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(a, b)| (*a..=*b).contains(&seq))
            .map(|r| r.1)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn policy(&self) -> FsyncPolicy {
        self.policy
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Acquire)
    }

    /// Highest seq known to be on stable storage.
    pub fn synced_seq(&self) -> u64 {
        self.synced_seq.load(Ordering::Acquire)
    }

    /// Highest seq the applier may apply: in commit mode only what is on
    /// stable storage (a unit applied and then lost in a machine crash
    /// would be on the target and not in the spool's account).
    pub fn applicable_seq(&self) -> u64 {
        match self.policy {
            FsyncPolicy::Commit => self.synced_seq(),
            _ => self.last_seq(),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Why the spool stopped taking records, if an fdatasync failed.
    pub fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Appends a record, assigning its sequence number. Fails with `Full`
    /// (and writes nothing) when it would pass `max_bytes`, and with
    /// `NoSpace` when the disk is full (nothing written either).
    pub fn append(&self, rec: &MirroredUnit) -> Result<u64, AppendError> {
        if let Some(why) = self.failure() {
            return Err(AppendError::Failed(why));
        }
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let w = &mut *w;
        w.buf.clear();
        w.buf.put_u32(0);
        w.buf.put_u32(0);
        w.buf.put_u64(w.next_seq);
        rec.encode(&mut w.buf);
        let len = w.buf.len() as u64;
        let used = self.bytes.load(Ordering::Relaxed);
        if used + len > self.max_bytes {
            return Err(AppendError::Full {
                used,
                max: self.max_bytes,
            });
        }
        if w.next_seq >= w.reserved {
            // The next block of numbers is on disk before one is used.
            let reserved = w.next_seq + RESERVE;
            write_durably(&self.dir, "seq.next", &reserved.to_string()).map_err(|e| {
                if is_no_space(&e) {
                    AppendError::NoSpace(e)
                } else {
                    AppendError::Io(e)
                }
            })?;
            w.reserved = reserved;
        }
        // The length covers seq and record, not itself or the CRC.
        let frame_len = (w.buf.len() - 8) as u32;
        w.buf[0..4].copy_from_slice(&frame_len.to_be_bytes());
        let crc = crc32fast::hash(&w.buf[8..]);
        w.buf[4..8].copy_from_slice(&crc.to_be_bytes());
        if let Err(e) = w.file.write_all(&w.buf) {
            // A partial write would leave a torn frame in the middle of the
            // file: cut back to the last whole record.
            let good = w.segments.back().map_or(0, |s| s.1);
            let _ = w.file.set_len(good);
            return Err(if is_no_space(&e) {
                self.no_space.store(true, Ordering::Relaxed);
                AppendError::NoSpace(e)
            } else {
                AppendError::Io(e)
            });
        }
        let seq = w.next_seq;
        w.next_seq += 1;
        if let Some(back) = w.segments.back_mut() {
            back.1 += len;
        }
        self.bytes.fetch_add(len, Ordering::Relaxed);
        if w.segments
            .back()
            .is_some_and(|s| s.1 >= segment_bytes(self.max_bytes))
        {
            self.rotate(w, seq);
        }
        self.last_seq.store(seq, Ordering::Release);
        self.appended.notify_one();
        Ok(seq)
    }

    /// Closes the live segment (synced first, so every record in a closed
    /// segment is on stable storage) and starts the next one.
    fn rotate(&self, w: &mut Writer, last: u64) {
        if let Err(e) = w.file.sync_data() {
            self.fail(&format!("fdatasync of a closed spool segment failed: {e}"));
            return;
        }
        self.synced_seq.fetch_max(last, Ordering::AcqRel);
        let opened = crate::private_files::options()
            .create(true)
            .append(true)
            .open(segment_path(&self.dir, w.next_seq))
            .and_then(|f| {
                preallocate(&f, segment_bytes(self.max_bytes))?;
                Ok(f)
            });
        match opened {
            Ok(f) => {
                w.file = f;
                w.segments.push_back((w.next_seq, 0));
            }
            Err(e) => {
                // Best left where it was: appends continue in the old
                // segment, which the disk has room for.
                let _ = fs::remove_file(segment_path(&self.dir, w.next_seq));
                warn!(error = %e, "could not start a new spool segment; continuing in the old one")
            }
        }
    }

    fn fail(&self, why: &str) {
        let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            error!(
                reason = why,
                "MIRROR SPOOL FAILED: nothing is acknowledged on its strength any more"
            );
            *f = Some(why.to_string());
        }
        drop(f);
        self.synced.notify_waiters();
    }

    /// Whether `seq` is durable enough for its commit to be acknowledged
    /// under the policy: `Ok(true)` yes, `Ok(false)` not yet, `Err` never
    /// (the spool failed).
    pub fn durable(&self, seq: u64) -> Result<bool, String> {
        if self.policy != FsyncPolicy::Commit {
            return Ok(true);
        }
        if self.synced_seq() >= seq {
            return Ok(true);
        }
        match self.failure() {
            Some(why) => Err(why),
            None => Ok(false),
        }
    }

    /// Asks the sync thread for a round (commit mode).
    pub fn want_sync(&self) {
        let mut s = self.sync_state.lock().unwrap_or_else(|p| p.into_inner());
        s.wanted = true;
        self.sync_cond.notify_one();
    }

    /// Waits until `seq` is durable (or the spool failed).
    pub async fn wait_durable(&self, seq: u64) -> Result<(), String> {
        loop {
            let notified = self.synced.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.durable(seq) {
                Ok(true) => return Ok(()),
                Err(why) => return Err(why),
                Ok(false) => {}
            }
            self.want_sync();
            notified.await;
        }
    }

    /// One sync round: fdatasyncs the live segment (and `also`, the
    /// in-flight journal, first) and publishes what it covered.
    pub fn sync_round(&self, also: &dyn Fn() -> io::Result<()>) {
        if self.failure().is_some() {
            return;
        }
        let (target, file) = {
            let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            (w.next_seq - 1, w.file.try_clone())
        };
        let r = also().and_then(|()| file.and_then(|f| f.sync_data()));
        match r {
            Ok(()) => {
                self.synced_seq.fetch_max(target, Ordering::AcqRel);
                self.synced.notify_waiters();
            }
            Err(e) => self.fail(&format!("fdatasync failed: {e}")),
        }
    }

    /// Whether records were appended since the last good sync round.
    fn unsynced(&self) -> bool {
        let last = self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next_seq
            - 1;
        last > self.synced_seq()
    }

    /// The sync thread's loop: rounds on demand (`commit`, and also every
    /// interval for what nobody waited on), on a timer (`interval`), or
    /// only at rotation (`off`). A timer round with nothing to sync (no
    /// record appended since the last round, `also_pending` false) is
    /// skipped: with mirroring switched off the disk is left alone. `after`
    /// gets the synced seq after each round (skipped ones too). Returns
    /// when `stop_sync` is called.
    pub fn sync_loop(
        &self,
        interval: Duration,
        also: &dyn Fn() -> io::Result<()>,
        also_pending: &dyn Fn() -> bool,
        after: &dyn Fn(u64),
    ) {
        loop {
            let mut on_demand = false;
            {
                let mut s = self.sync_state.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if s.stop {
                        return;
                    }
                    if s.wanted && self.policy == FsyncPolicy::Commit {
                        s.wanted = false;
                        on_demand = true;
                        break;
                    }
                    let wait = match self.policy {
                        FsyncPolicy::Off => Duration::from_secs(3600),
                        _ => interval,
                    };
                    let (guard, timeout) = self
                        .sync_cond
                        .wait_timeout(s, wait)
                        .unwrap_or_else(|p| p.into_inner());
                    s = guard;
                    if timeout.timed_out() && self.policy != FsyncPolicy::Off {
                        break;
                    }
                }
            }
            if on_demand || self.unsynced() || also_pending() {
                self.sync_round(also);
            }
            after(self.synced_seq());
        }
    }

    /// Ends `sync_loop`.
    pub fn stop_sync(&self) {
        let mut s = self.sync_state.lock().unwrap_or_else(|p| p.into_inner());
        s.stop = true;
        self.sync_cond.notify_all();
    }

    /// A clean shutdown: everything on stable storage, the reservation cut
    /// back to what was used, and the state marked clean.
    pub fn close(&self) {
        let next = {
            let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = w.file.sync_data() {
                warn!(error = %e, "spool fdatasync at shutdown failed");
                return;
            }
            w.next_seq
        };
        let _ = write_durably(&self.dir, "seq.next", &next.to_string());
        let _ = write_durably(&self.dir, "state", &format!("{} clean\n", boot_id()));
    }

    /// Flushes appended records to stable storage now.
    pub fn sync(&self) -> io::Result<()> {
        let (target, f) = {
            let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            (w.next_seq - 1, w.file.try_clone()?)
        };
        f.sync_data()?;
        self.synced_seq.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }

    /// Deletes segments whose records are all applied (seq <= `applied`).
    /// After the disk filled up, a live segment whose records are all
    /// applied is closed too, so its space can go.
    pub fn release(&self, applied: u64) {
        let mut freed = 0;
        {
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            let live_done =
                w.segments.len() == 1 && w.segments[0].1 > 0 && applied + 1 >= w.next_seq;
            if live_done && self.no_space.swap(false, Ordering::Relaxed) {
                // Nothing in it is needed: a new (empty) segment takes the
                // next records, and the old one goes below.
                match crate::private_files::options()
                    .create(true)
                    .append(true)
                    .open(segment_path(&self.dir, w.next_seq))
                {
                    Ok(f) => {
                        w.file = f;
                        let next = w.next_seq;
                        w.segments.push_back((next, 0));
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot start a new spool segment on a full disk");
                        self.no_space.store(true, Ordering::Relaxed);
                    }
                }
            }
            while w.segments.len() > 1 && w.segments[1].0 <= applied + 1 {
                let Some((first, bytes)) = w.segments.pop_front() else {
                    break;
                };
                match fs::remove_file(segment_path(&self.dir, first)) {
                    Ok(()) => freed += bytes,
                    Err(e) => {
                        warn!(error = %e, "could not delete an applied spool segment");
                        w.segments.push_front((first, bytes));
                        break;
                    }
                }
            }
        }
        if freed > 0 {
            self.bytes.fetch_sub(freed, Ordering::Relaxed);
            self.released.notify_waiters();
        }
    }

    /// The journal keys (run, slot, arm) of the records in the newest two
    /// segments: the units spooled just before a crash, whose journal DONE
    /// may be missing.
    pub fn recent_owners(&self) -> std::collections::HashSet<(u64, u32, u64)> {
        let firsts: Vec<u64> = {
            let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            w.segments.iter().rev().take(2).map(|s| s.0).collect()
        };
        let mut out = std::collections::HashSet::new();
        let mut buf = Vec::new();
        for first in firsts {
            let Ok(f) = File::open(segment_path(&self.dir, first)) else {
                continue;
            };
            let mut f = BufReader::new(f);
            while let Ok(Frame::Record(seq, _)) = read_frame(&mut f, &mut buf) {
                if let Ok(r) = MirroredUnit::decode(seq, &buf) {
                    if let Some((slot, arm)) = r.order.own {
                        out.insert((r.order.run, slot, arm));
                    }
                }
            }
        }
        out
    }

    /// Sequence number of the oldest record still on disk.
    pub fn first_seq(&self) -> u64 {
        let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.segments.front().map_or(1, |s| s.0)
    }
}

/// What reading the next record found.
#[derive(Debug)]
pub enum Read1 {
    Record(Box<MirroredUnit>),
    /// Not (or no longer) on disk: released, or not written yet.
    Missing,
    /// Records `from..=to` are unreadable (damaged frames): they are
    /// skipped, and the caller records a gap.
    Gap {
        from: u64,
        to: u64,
        why: String,
    },
}

/// Reads records in order, from any position, following appends.
pub struct SpoolReader {
    dir: PathBuf,
    file: Option<BufReader<File>>,
    /// First seq of the open segment.
    segment: u64,
    /// Sequence number of the next record the open file will yield.
    next: u64,
    buf: Vec<u8>,
}

impl SpoolReader {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            file: None,
            segment: 0,
            next: 0,
            buf: Vec::new(),
        }
    }

    /// The record with sequence number `want`, which the caller knows has
    /// been appended whole (`want <= spool.last_seq()`) and is in no
    /// skipped range.
    pub fn read(&mut self, want: u64) -> io::Result<Read1> {
        if self.file.is_none() || self.next > want {
            self.open_at(want)?;
        }
        if self.file.is_none() || self.segment > want {
            // Released (applied) already.
            return Ok(Read1::Missing);
        }
        loop {
            let Some(f) = self.file.as_mut() else {
                return Ok(Read1::Missing);
            };
            loop {
                let pos = f.stream_position()?;
                match read_frame(f, &mut self.buf)? {
                    Frame::Record(seq, _) => {
                        self.next = seq + 1;
                        if seq < want {
                            continue;
                        }
                        if seq > want {
                            // Each segment's seqs are contiguous: `want`
                            // is not there.
                            f.seek(SeekFrom::Start(pos))?;
                            self.next = seq;
                            return Ok(Read1::Gap {
                                from: want,
                                to: seq - 1,
                                why: "not in its segment".into(),
                            });
                        }
                        return match MirroredUnit::decode(seq, &self.buf) {
                            Ok(r) => Ok(Read1::Record(Box::new(r))),
                            Err(e) => Ok(Read1::Gap {
                                from: seq,
                                to: seq,
                                why: e.to_string(),
                            }),
                        };
                    }
                    Frame::Bad => {
                        // The record we want was appended whole, so this is
                        // damage, not a write in progress: find the next
                        // good frame and skip what lies between.
                        return self.skip_damage(pos, want);
                    }
                    Frame::End => {
                        // End of this segment (or of what is written so
                        // far): rewind over any partial frame, then go on in
                        // the next segment if there is one.
                        f.seek(SeekFrom::Start(pos))?;
                        break;
                    }
                }
            }
            match self.next_segment()? {
                None => return Ok(Read1::Missing),
                Some(first) if first > want => {
                    // The next segment holds later records: `want` was
                    // lost from the end of this one.
                    self.open_segment(first)?;
                    return Ok(Read1::Gap {
                        from: want,
                        to: first - 1,
                        why: "missing from the end of its segment".into(),
                    });
                }
                Some(first) => self.open_segment(first)?,
            }
        }
    }

    /// Looks for the next valid frame after damage at `pos`, byte by byte,
    /// in this segment, then at the start of the next one.
    fn skip_damage(&mut self, pos: u64, want: u64) -> io::Result<Read1> {
        let path = segment_path(&self.dir, self.segment);
        let data = fs::read(&path)?;
        let mut at = pos as usize + 1;
        while at + FRAME_HEADER <= data.len() {
            let mut cur = io::Cursor::new(&data[at..]);
            if let Frame::Record(seq, _) = read_frame(&mut cur, &mut self.buf)? {
                if seq > want && seq < want + (1 << 32) {
                    let mut f = BufReader::new(File::open(&path)?);
                    f.seek(SeekFrom::Start(at as u64))?;
                    self.file = Some(f);
                    self.next = seq;
                    return Ok(Read1::Gap {
                        from: want,
                        to: seq - 1,
                        why: format!("damaged frame at byte {pos} of {}", path.display()),
                    });
                }
            }
            at += 1;
        }
        match self.next_segment()? {
            Some(first) if first > want => {
                self.open_segment(first)?;
                Ok(Read1::Gap {
                    from: want,
                    to: first - 1,
                    why: format!("damaged frame at byte {pos} of {}", path.display()),
                })
            }
            _ => {
                // Damage at the end of the live segment with nothing good
                // after it yet: skip the one wanted record.
                self.file = None;
                Ok(Read1::Gap {
                    from: want,
                    to: want,
                    why: format!("damaged frame at byte {pos} of {}", path.display()),
                })
            }
        }
    }

    /// Lets go of the open segment once it is released (deleted): an open
    /// file keeps its disk space.
    pub fn forget_released(&mut self, first_on_disk: u64) {
        if self.file.is_some() && self.segment < first_on_disk {
            self.file = None;
        }
    }

    /// The first seq of the segment after the open one.
    fn next_segment(&self) -> io::Result<Option<u64>> {
        Ok(list_segments(&self.dir)?
            .into_iter()
            .map(|s| s.0)
            .find(|&first| first > self.segment))
    }

    fn open_segment(&mut self, first: u64) -> io::Result<()> {
        self.file = Some(BufReader::new(File::open(segment_path(&self.dir, first))?));
        self.segment = first;
        self.next = first;
        Ok(())
    }

    fn open_at(&mut self, want: u64) -> io::Result<()> {
        let segs = list_segments(&self.dir)?;
        let first = segs
            .iter()
            .rev()
            .find(|(first, _)| *first <= want)
            .or(segs.first())
            .map(|s| s.0);
        match first {
            Some(first) => self.open_segment(first)?,
            None => {
                self.file = None;
                self.next = want;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::unit::Segment;

    fn rec(session: u64, n: usize) -> MirroredUnit {
        MirroredUnit {
            session,
            segments: vec![Segment {
                messages: vec![b'x'; n],
                status: b'I',
                outcomes: vec![],
            }],
            ..Default::default()
        }
    }

    fn open(dir: &Path, max: u64) -> Spool {
        Spool::open(dir, max, FsyncPolicy::Off).unwrap()
    }

    fn session_of(r: Read1) -> u64 {
        match r {
            Read1::Record(r) => r.session,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn appends_in_order_reads_back_and_survives_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 1 << 20);
        for i in 1..=5 {
            assert_eq!(spool.append(&rec(i, 10)).unwrap(), i);
        }
        let mut r = SpoolReader::new(dir.path());
        assert_eq!(session_of(r.read(3).unwrap()), 3);
        assert_eq!(session_of(r.read(4).unwrap()), 4);
        assert_eq!(session_of(r.read(1).unwrap()), 1);
        assert!(matches!(r.read(6).unwrap(), Read1::Missing));
        spool.append(&rec(6, 10)).unwrap();
        assert_eq!(session_of(r.read(6).unwrap()), 6);
        spool.close();
        drop(spool);

        // A crash mid-write leaves half a frame: reopening cuts it off and
        // continues the numbering after the last whole record.
        let seg = segment_path(dir.path(), 1);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[0, 0, 1, 0, 9, 9]).unwrap();
        drop(f);
        let spool = open(dir.path(), 1 << 20);
        assert!(
            Spool::open(dir.path(), 1 << 20, FsyncPolicy::Off).is_err(),
            "second opener must be refused"
        );
        assert_eq!(spool.last_seq(), 6);
        assert_eq!(spool.opened.torn_bytes, 6);
        assert!(!spool.opened.unclean, "the first process closed cleanly");
        assert_eq!(spool.append(&rec(7, 10)).unwrap(), 7);
        let mut r = SpoolReader::new(dir.path());
        assert_eq!(session_of(r.read(7).unwrap()), 7);
        // Files are private to the proxy's user.
        use std::os::unix::fs::PermissionsExt;
        for e in fs::read_dir(dir.path()).unwrap() {
            let mode = e.unwrap().metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn numbers_are_never_reused_after_a_lost_tail() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 1 << 20);
        for i in 1..=10 {
            spool.append(&rec(i, 10)).unwrap();
        }
        // The process dies (no close), and a machine crash takes the last
        // four records with it.
        drop(spool);
        let seg = segment_path(dir.path(), 1);
        let data = fs::read(&seg).unwrap();
        let frame = data.len() / 10;
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len((frame * 6) as u64)
            .unwrap();
        let spool = open(dir.path(), 1 << 20);
        assert!(spool.opened.unclean);
        assert_eq!(spool.opened.last_on_disk, 6);
        let seq = spool.append(&rec(11, 10)).unwrap();
        assert!(seq > 10, "seq {seq} may have been applied before the crash");
        let mut r = SpoolReader::new(dir.path());
        assert_eq!(session_of(r.read(6).unwrap()), 6);
        assert!(matches!(
            r.read(7).unwrap(),
            Read1::Missing | Read1::Gap { .. }
        ));
        assert_eq!(session_of(r.read(seq).unwrap()), 11);
    }

    #[test]
    fn a_damaged_frame_in_a_closed_segment_becomes_a_gap_not_a_stall() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 1 << 20);
        for i in 1..=6 {
            spool.append(&rec(i, 100)).unwrap();
        }
        let seg = segment_path(dir.path(), 1);
        let mut data = fs::read(&seg).unwrap();
        let frame = data.len() / 6;
        // Flip a byte inside record 3's payload.
        data[frame * 2 + FRAME_HEADER + 20] ^= 0xff;
        fs::write(&seg, &data).unwrap();
        let mut r = SpoolReader::new(dir.path());
        assert_eq!(session_of(r.read(2).unwrap()), 2);
        match r.read(3).unwrap() {
            Read1::Gap { from: 3, to: 3, .. } => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(session_of(r.read(4).unwrap()), 4);
        // A damaged length word: the same.
        data[frame * 3] = 0xee;
        fs::write(&seg, &data).unwrap();
        let mut r = SpoolReader::new(dir.path());
        assert!(matches!(r.read(3).unwrap(), Read1::Gap { .. }));
        match r.read(4).unwrap() {
            Read1::Gap { from: 4, to: 4, .. } => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(session_of(r.read(5).unwrap()), 5);
    }

    #[test]
    fn commit_mode_acknowledges_only_what_a_sync_round_covered() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, FsyncPolicy::Commit).unwrap();
        let seq = spool.append(&rec(1, 10)).unwrap();
        assert_eq!(spool.durable(seq), Ok(false));
        assert_eq!(spool.applicable_seq(), 0);
        spool.sync_round(&|| Ok(()));
        assert_eq!(spool.durable(seq), Ok(true));
        assert_eq!(spool.applicable_seq(), seq);
        let seq = spool.append(&rec(2, 10)).unwrap();
        spool.sync_round(&|| Err(io::Error::other("EIO")));
        assert!(spool.durable(seq).is_err());
        assert!(matches!(
            spool.append(&rec(3, 10)),
            Err(AppendError::Failed(_))
        ));
    }

    #[test]
    fn timer_rounds_with_nothing_written_leave_the_disk_alone() {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path(), 1 << 20, FsyncPolicy::Interval).unwrap());
        let rounds = Arc::new(AtomicUsize::new(0));
        let ticks = Arc::new(AtomicUsize::new(0));
        let pending = Arc::new(AtomicBool::new(false));
        let thread = {
            let (spool, rounds, ticks, pending) = (
                Arc::clone(&spool),
                Arc::clone(&rounds),
                Arc::clone(&ticks),
                Arc::clone(&pending),
            );
            std::thread::spawn(move || {
                spool.sync_loop(
                    Duration::from_millis(5),
                    &|| {
                        rounds.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    },
                    &|| pending.load(Ordering::SeqCst),
                    &|_| {
                        ticks.fetch_add(1, Ordering::SeqCst);
                    },
                )
            })
        };
        let wait = |what: &str, f: &dyn Fn() -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !f() {
                assert!(std::time::Instant::now() < deadline, "{what}");
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        // Many ticks, nothing written: no round (no fdatasync).
        wait("20 ticks", &|| ticks.load(Ordering::SeqCst) >= 20);
        assert_eq!(rounds.load(Ordering::SeqCst), 0);
        // A record: the next tick syncs it, once.
        let seq = spool.append(&rec(1, 10)).unwrap();
        wait("the record synced", &|| spool.synced_seq() >= seq);
        let after_record = rounds.load(Ordering::SeqCst);
        assert!(after_record >= 1);
        let t = ticks.load(Ordering::SeqCst);
        wait("20 more ticks", &|| ticks.load(Ordering::SeqCst) >= t + 20);
        assert_eq!(rounds.load(Ordering::SeqCst), after_record);
        // The journal alone has something to sync: a round.
        pending.store(true, Ordering::SeqCst);
        wait("a round for the journal", &|| {
            rounds.load(Ordering::SeqCst) > after_record
        });
        spool.stop_sync();
        thread.join().unwrap();
    }

    #[test]
    fn refuses_past_max_bytes_and_releases_applied_segments() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 2000);
        let mut n = 0;
        loop {
            match spool.append(&rec(1, 100)) {
                Ok(_) => n += 1,
                Err(AppendError::Full { .. }) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(n > 5 && spool.bytes() <= 2000);
        // All in the live segment: releasing cannot delete it.
        spool.release(n);
        assert_eq!(spool.first_seq(), 1);

        // Segments rotate at an eighth of the bound (128 KiB here).
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 1 << 20);
        for _ in 0..40 {
            spool.append(&rec(1, 10_000)).unwrap();
        }
        let before = spool.bytes();
        assert!(list_segments(dir.path()).unwrap().len() >= 3);
        spool.release(20);
        assert!(spool.first_seq() > 1 && spool.first_seq() <= 21);
        assert!(spool.bytes() < before);
        // Everything after the released point is still readable.
        let mut r = SpoolReader::new(dir.path());
        assert!(matches!(
            r.read(spool.first_seq()).unwrap(),
            Read1::Record(_)
        ));
        match r.read(40).unwrap() {
            Read1::Record(rec) => assert_eq!(rec.seq, 40),
            other => panic!("{other:?}"),
        }
    }
}
