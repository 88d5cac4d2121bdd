//! The append-only spool: committed units of work on local disk, in commit
//! order, before anything is applied to the target.
//!
//! Files are `<first seq>.spool` segments of framed records:
//! `[u32 length][u32 crc32][u64 seq][record]`, where the length and the CRC
//! cover seq and record. A record is written with one `write` under the
//! spool lock, which also assigns its sequence number, so the order in the
//! file is the order in which sessions saw their commits acknowledged. The
//! page cache keeps an appended record through a proxy crash (SIGKILL
//! included); `fsync_interval_ms` bounds what a machine crash can lose.
//! On open, a torn record at the end of the last segment is cut off.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::{BufMut, BytesMut};
use tokio::sync::Notify;
use tracing::warn;

use super::record::TxnRecord;

/// Segments are closed once past this size (or an eighth of the spool's
/// bound, so a small spool still frees space as it drains).
const SEGMENT_BYTES: u64 = 64 << 20;

fn segment_bytes(max_bytes: u64) -> u64 {
    (max_bytes / 8).clamp(64 << 10, SEGMENT_BYTES)
}
const FRAME_HEADER: usize = 4 + 4 + 8;
/// Largest record a reader accepts (a corrupt length must not allocate).
const MAX_RECORD: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("spool full ({used} of {max} bytes)")]
    Full { used: u64, max: u64 },
    #[error("spool write failed: {0}")]
    Io(#[from] io::Error),
}

struct Writer {
    file: File,
    /// (first seq, bytes) of every segment on disk, oldest first; the last
    /// one is being written.
    segments: VecDeque<(u64, u64)>,
    next_seq: u64,
    buf: BytesMut,
}

pub struct Spool {
    dir: PathBuf,
    /// Held for the process's life (an exclusive lock on `lock`).
    _lock: File,
    /// Identifies this spool in the target's progress table.
    pub id: String,
    max_bytes: u64,
    writer: Mutex<Writer>,
    /// Highest sequence number appended (0 = none yet).
    last_seq: AtomicU64,
    bytes: AtomicU64,
    /// Woken on every append (the applier waits on it).
    pub appended: Notify,
    /// Woken when space is released (backpressured sessions wait on it).
    pub released: Notify,
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

/// Reads one frame at the reader's position: `Ok(None)` at a clean end or
/// a torn/corrupt tail.
fn read_frame<R: Read>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<Option<(u64, usize)>> {
    let mut head = [0u8; FRAME_HEADER];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(head[0..4].try_into().unwrap_or_default()) as usize;
    let crc = u32::from_be_bytes(head[4..8].try_into().unwrap_or_default());
    if !(8..=MAX_RECORD).contains(&len) {
        return Ok(None);
    }
    buf.resize(len - 8, 0);
    match r.read_exact(buf) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&head[8..16]);
    h.update(buf);
    if h.finalize() != crc {
        return Ok(None);
    }
    let seq = u64::from_be_bytes(head[8..16].try_into().unwrap_or_default());
    Ok(Some((seq, FRAME_HEADER + buf.len())))
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, cutting off a torn tail.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        // One proxy per spool: two appenders would interleave records.
        let lock = OpenOptions::new()
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
                fs::write(&id_path, &id)?;
                id
            }
        };
        let mut segments: VecDeque<(u64, u64)> = list_segments(dir)?.into();
        let mut next_seq = 1;
        if let Some(&(first, _)) = segments.back() {
            // Find the last whole record of the newest segment.
            let path = segment_path(dir, first);
            let mut f = BufReader::new(File::open(&path)?);
            let mut good = 0u64;
            let mut last = first.saturating_sub(1);
            let mut buf = Vec::new();
            while let Some((seq, n)) = read_frame(&mut f, &mut buf)? {
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
                OpenOptions::new().write(true).open(&path)?.set_len(good)?;
            }
            if let Some(back) = segments.back_mut() {
                back.1 = good;
            }
            next_seq = last + 1;
        }
        if segments.is_empty() {
            segments.push_back((next_seq, 0));
        }
        let (first, _) = *segments.back().unwrap_or(&(next_seq, 0));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(dir, first))?;
        let bytes = segments.iter().map(|s| s.1).sum();
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
            id,
            max_bytes,
            writer: Mutex::new(Writer {
                file,
                segments,
                next_seq,
                buf: BytesMut::new(),
            }),
            last_seq: AtomicU64::new(next_seq - 1),
            bytes: AtomicU64::new(bytes),
            appended: Notify::new(),
            released: Notify::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Acquire)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Appends a record, assigning its sequence number. Fails with `Full`
    /// (and writes nothing) when it would pass `max_bytes`.
    pub fn append(&self, rec: &TxnRecord) -> Result<u64, AppendError> {
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
            return Err(e.into());
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
            // Rotate: the next record starts a new segment file.
            let _ = w.file.sync_data();
            match OpenOptions::new()
                .create(true)
                .append(true)
                .open(segment_path(&self.dir, w.next_seq))
            {
                Ok(f) => {
                    w.file = f;
                    w.segments.push_back((w.next_seq, 0));
                }
                Err(e) => {
                    warn!(error = %e, "could not start a new spool segment; continuing in the old one")
                }
            }
        }
        self.last_seq.store(seq, Ordering::Release);
        self.appended.notify_one();
        Ok(seq)
    }

    /// Flushes appended records to stable storage.
    pub fn sync(&self) -> io::Result<()> {
        let f = {
            let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            w.file.try_clone()?
        };
        f.sync_data()
    }

    /// Deletes segments whose records are all applied (seq <= `applied`).
    pub fn release(&self, applied: u64) {
        let mut freed = 0;
        {
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
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

    /// Sequence number of the oldest record still on disk.
    pub fn first_seq(&self) -> u64 {
        let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.segments.front().map_or(1, |s| s.0)
    }
}

/// Reads records in order, from any position, following appends.
pub struct SpoolReader {
    dir: PathBuf,
    file: Option<BufReader<File>>,
    /// Sequence number of the next record the open file will yield.
    next: u64,
    buf: Vec<u8>,
}

impl SpoolReader {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            file: None,
            next: 0,
            buf: Vec::new(),
        }
    }

    /// The record with sequence number `want`, which the caller knows has
    /// been appended (`want <= spool.last_seq()`). `Ok(None)` if it is no
    /// longer (or not yet) on disk.
    pub fn read(&mut self, want: u64) -> io::Result<Option<TxnRecord>> {
        if self.file.is_none() || self.next > want {
            self.open_at(want)?;
        }
        loop {
            let Some(f) = self.file.as_mut() else {
                return Ok(None);
            };
            loop {
                let pos = f.stream_position()?;
                match read_frame(f, &mut self.buf)? {
                    Some((seq, _)) => {
                        self.next = seq + 1;
                        if seq < want {
                            continue;
                        }
                        if seq > want {
                            return Ok(None);
                        }
                        return TxnRecord::decode(seq, &self.buf)
                            .map(Some)
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                    None => {
                        // End of this segment (or of what is written so
                        // far): rewind over any partial frame, then go on in
                        // the segment that starts where this one ended.
                        f.seek(SeekFrom::Start(pos))?;
                        break;
                    }
                }
            }
            let next_path = segment_path(&self.dir, self.next);
            if !next_path.exists() {
                return Ok(None);
            }
            self.file = Some(BufReader::new(File::open(next_path)?));
        }
    }

    fn open_at(&mut self, want: u64) -> io::Result<()> {
        let segs = list_segments(&self.dir)?;
        let first = segs
            .iter()
            .rev()
            .find(|(first, _)| *first <= want)
            .or(segs.first())
            .map(|s| s.0);
        self.file = match first {
            Some(first) => Some(BufReader::new(File::open(segment_path(&self.dir, first))?)),
            None => None,
        };
        self.next = first.unwrap_or(want);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::record::Segment;

    fn rec(session: u64, n: usize) -> TxnRecord {
        TxnRecord {
            session,
            segments: vec![Segment {
                messages: vec![b'x'; n],
                status: b'I',
                outcomes: vec![],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn appends_in_order_reads_back_and_survives_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        for i in 1..=5 {
            assert_eq!(spool.append(&rec(i, 10)).unwrap(), i);
        }
        let mut r = SpoolReader::new(dir.path());
        assert_eq!(r.read(3).unwrap().unwrap().session, 3);
        assert_eq!(r.read(4).unwrap().unwrap().session, 4);
        assert_eq!(r.read(1).unwrap().unwrap().session, 1);
        assert!(r.read(6).unwrap().is_none());
        spool.append(&rec(6, 10)).unwrap();
        assert_eq!(r.read(6).unwrap().unwrap().session, 6);
        drop(spool);

        // A crash mid-write leaves half a frame: reopening cuts it off and
        // continues the numbering after the last whole record.
        let seg = segment_path(dir.path(), 1);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[0, 0, 1, 0, 9, 9]).unwrap();
        drop(f);
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(
            Spool::open(dir.path(), 1 << 20).is_err(),
            "second opener must be refused"
        );
        assert_eq!(spool.last_seq(), 6);
        assert_eq!(spool.append(&rec(7, 10)).unwrap(), 7);
        let mut r = SpoolReader::new(dir.path());
        assert_eq!(r.read(7).unwrap().unwrap().session, 7);
    }

    #[test]
    fn refuses_past_max_bytes_and_releases_applied_segments() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 2000).unwrap();
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
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
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
        assert!(r.read(spool.first_seq()).unwrap().is_some());
        assert_eq!(r.read(40).unwrap().unwrap().seq, 40);
    }
}
