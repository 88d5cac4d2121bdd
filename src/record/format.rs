//! The capture file format (version 1), written by the recorder and read by
//! `pgshift replay`. Documented for users in `docs/record-replay.md`.
//!
//! A capture is one or more segment files, each self-contained:
//!
//! ```text
//! segment  = header record*
//! header   = "PGSHCAP\0" version:u16 flags:u16 segment:u32 start_unix_us:u64   (24 bytes)
//! record   = kind:u8 body_len:u32 crc32:u32 body                               (9 + body_len)
//! ```
//!
//! All integers in the fixed parts are big-endian. `crc32` (IEEE) covers the
//! kind byte and the body, so a flipped bit anywhere in a record is caught.
//! Bodies use LEB128 varints (`v`) for session ids and times; a time is
//! microseconds since the segment's `start_unix_us`.
//!
//! ```text
//! START    (1) = session:v at:v started_unix_us:v flags:u8 nparams:v (name\0 value\0)*
//! MESSAGE  (2) = session:v at:v tag:u8 payload            (a frontend message, no length word)
//! END      (3) = session:v at:v flags:u8
//! ```
//!
//! A session's START comes before its messages in every segment it spans:
//! when a segment rotates, the writer repeats the START of each open
//! session (flag `CONTINUED`). Readers skip unknown record kinds, so later
//! versions can add kinds without breaking old readers; a new version
//! number means an incompatible change.

use std::io::{self, Read};

use bytes::{BufMut, Bytes, BytesMut};

pub const MAGIC: &[u8; 8] = b"PGSHCAP\0";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 24;
pub const RECORD_HEADER_LEN: usize = 9;
/// Largest record body a reader accepts (a 1 GiB message plus its fields):
/// a corrupt length cannot make the reader allocate without bound.
pub const MAX_BODY: usize = (1 << 30) + 64;

/// Header flag: Bind and FunctionCall parameter values were replaced by NULL.
pub const FLAG_REDACTED: u16 = 1;

pub const KIND_START: u8 = 1;
pub const KIND_MESSAGE: u8 = 2;
pub const KIND_END: u8 = 3;

/// START flag: repeated at the top of a later segment for a session that
/// began earlier.
pub const START_CONTINUED: u8 = 1;
/// END flags: the session's recording stopped before the session ended
/// (its buffer was full, a message was too large to record, or recording
/// was switched off), so what was recorded is a prefix of what it sent.
pub const END_INCOMPLETE: u8 = 1;
/// ...and the session was still open when recording stopped.
pub const END_STILL_OPEN: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub version: u16,
    pub flags: u16,
    pub segment: u32,
    pub start_unix_us: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8..10].copy_from_slice(&self.version.to_be_bytes());
        h[10..12].copy_from_slice(&self.flags.to_be_bytes());
        h[12..16].copy_from_slice(&self.segment.to_be_bytes());
        h[16..24].copy_from_slice(&self.start_unix_us.to_be_bytes());
        h
    }
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Start {
        session: u64,
        at_us: u64,
        started_unix_us: u64,
        flags: u8,
        params: Vec<(String, String)>,
    },
    /// `frame` is the whole frontend message: tag, length word, payload.
    Message {
        session: u64,
        at_us: u64,
        frame: Bytes,
    },
    End {
        session: u64,
        at_us: u64,
        flags: u8,
    },
}

pub fn put_varint(out: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

fn get_varint(b: &mut &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Appends a record: header with checksum, then `body`.
pub fn put_record(out: &mut BytesMut, kind: u8, body: &[u8]) {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind]);
    crc.update(body);
    out.reserve(RECORD_HEADER_LEN + body.len());
    out.put_u8(kind);
    out.put_u32(body.len() as u32);
    out.put_u32(crc.finalize());
    out.put_slice(body);
}

pub fn start_body(
    out: &mut BytesMut,
    session: u64,
    at_us: u64,
    started_unix_us: u64,
    flags: u8,
    params: &[(Vec<u8>, Vec<u8>)],
) {
    put_varint(out, session);
    put_varint(out, at_us);
    put_varint(out, started_unix_us);
    out.put_u8(flags);
    put_varint(out, params.len() as u64);
    for (k, v) in params {
        out.put_slice(k);
        out.put_u8(0);
        out.put_slice(v);
        out.put_u8(0);
    }
}

/// A MESSAGE body: `tag` and `payload` are the message without its length.
pub fn message_body(out: &mut BytesMut, session: u64, at_us: u64, tag: u8, payload: &[u8]) {
    put_varint(out, session);
    put_varint(out, at_us);
    out.put_u8(tag);
    out.put_slice(payload);
}

pub fn end_body(out: &mut BytesMut, session: u64, at_us: u64, flags: u8) {
    put_varint(out, session);
    put_varint(out, at_us);
    out.put_u8(flags);
}

/// Why a capture cannot be read, always with where.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: String,
        #[source]
        source: io::Error,
    },
    #[error("{file}: not a pgshift capture (bad magic at offset 0)")]
    NotACapture { file: String },
    #[error("{file}: capture format version {version} is not supported (this pgshift reads version {VERSION})")]
    Version { file: String, version: u16 },
    #[error("{file}: truncated at offset {offset}: {what}")]
    Truncated {
        file: String,
        offset: u64,
        what: String,
    },
    #[error("{file}: corrupt record at offset {offset}: {what}")]
    Corrupt {
        file: String,
        offset: u64,
        what: String,
    },
}

/// Reads one segment's records in order, checking each checksum.
pub struct SegmentReader<R> {
    rd: R,
    file: String,
    pub header: SegmentHeader,
    /// Offset of the next record.
    offset: u64,
    body: Vec<u8>,
}

impl<R: Read> SegmentReader<R> {
    pub fn open(mut rd: R, file: impl Into<String>) -> Result<Self, FormatError> {
        let file = file.into();
        let mut h = [0u8; HEADER_LEN];
        let got = read_full(&mut rd, &mut h).map_err(|source| FormatError::Io {
            file: file.clone(),
            source,
        })?;
        if got < MAGIC.len() || &h[..8] != MAGIC {
            return Err(FormatError::NotACapture { file });
        }
        if got < HEADER_LEN {
            return Err(FormatError::Truncated {
                file,
                offset: got as u64,
                what: format!("the header has {got} of its {HEADER_LEN} bytes"),
            });
        }
        let be16 = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
        let version = be16(8);
        if version != VERSION {
            return Err(FormatError::Version { file, version });
        }
        let header = SegmentHeader {
            version,
            flags: be16(10),
            segment: u32::from_be_bytes([h[12], h[13], h[14], h[15]]),
            start_unix_us: u64::from_be_bytes([
                h[16], h[17], h[18], h[19], h[20], h[21], h[22], h[23],
            ]),
        };
        Ok(Self {
            rd,
            file,
            header,
            offset: HEADER_LEN as u64,
            body: Vec::new(),
        })
    }

    pub fn file(&self) -> &str {
        &self.file
    }

    /// The next record, `None` at a clean end of file. Unknown kinds are
    /// skipped (after their checksum is verified).
    pub fn next_record(&mut self) -> Result<Option<Record>, FormatError> {
        loop {
            let at = self.offset;
            let mut h = [0u8; RECORD_HEADER_LEN];
            let got = read_full(&mut self.rd, &mut h).map_err(|e| self.io(e))?;
            if got == 0 {
                return Ok(None);
            }
            if got < RECORD_HEADER_LEN {
                return Err(self.truncated(
                    at,
                    format!("a record header has {got} of its {RECORD_HEADER_LEN} bytes"),
                ));
            }
            let kind = h[0];
            let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
            let crc = u32::from_be_bytes([h[5], h[6], h[7], h[8]]);
            if len > MAX_BODY {
                return Err(self.corrupt(at, format!("record length {len} is over the limit")));
            }
            self.body.clear();
            let got = (&mut self.rd)
                .take(len as u64)
                .read_to_end(&mut self.body)
                .map_err(|e| self.io(e))?;
            if got < len {
                return Err(self.truncated(
                    at,
                    format!("the record (kind {kind}) says {len} bytes, {got} are left"),
                ));
            }
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&[kind]);
            hasher.update(&self.body);
            if hasher.finalize() != crc {
                return Err(
                    self.corrupt(at, format!("checksum mismatch (kind {kind}, {len} bytes)"))
                );
            }
            self.offset += (RECORD_HEADER_LEN + len) as u64;
            let decoded = match kind {
                KIND_START | KIND_MESSAGE | KIND_END => decode_body(kind, &self.body),
                _ => continue,
            };
            return decoded.map(Some).ok_or_else(|| {
                self.corrupt(at, format!("malformed body of a kind {kind} record"))
            });
        }
    }

    fn io(&self, source: io::Error) -> FormatError {
        FormatError::Io {
            file: self.file.clone(),
            source,
        }
    }
    fn truncated(&self, offset: u64, what: String) -> FormatError {
        FormatError::Truncated {
            file: self.file.clone(),
            offset,
            what,
        }
    }
    fn corrupt(&self, offset: u64, what: String) -> FormatError {
        FormatError::Corrupt {
            file: self.file.clone(),
            offset,
            what,
        }
    }
}

fn decode_body(kind: u8, mut b: &[u8]) -> Option<Record> {
    let session = get_varint(&mut b)?;
    let at_us = get_varint(&mut b)?;
    match kind {
        KIND_START => {
            let started_unix_us = get_varint(&mut b)?;
            let (&flags, rest) = b.split_first()?;
            b = rest;
            let n = get_varint(&mut b)?;
            let mut params = Vec::new();
            for _ in 0..n {
                let k = take_cstr(&mut b)?;
                let v = take_cstr(&mut b)?;
                params.push((k, v));
            }
            b.is_empty().then_some(Record::Start {
                session,
                at_us,
                started_unix_us,
                flags,
                params,
            })
        }
        KIND_MESSAGE => {
            let (&tag, payload) = b.split_first()?;
            let mut frame = BytesMut::with_capacity(5 + payload.len());
            frame.put_u8(tag);
            frame.put_u32(u32::try_from(payload.len() + 4).ok()?);
            frame.put_slice(payload);
            Some(Record::Message {
                session,
                at_us,
                frame: frame.freeze(),
            })
        }
        _ => {
            let (&flags, rest) = b.split_first()?;
            rest.is_empty().then_some(Record::End {
                session,
                at_us,
                flags,
            })
        }
    }
}

fn take_cstr(b: &mut &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0)?;
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    *b = &b[end + 1..];
    Some(s)
}

/// Reads until `buf` is full or EOF; returns how many bytes it got.
fn read_full(rd: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match rd.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_slice(
            &SegmentHeader {
                version: VERSION,
                flags: 0,
                segment: 1,
                start_unix_us: 1_700_000_000_000_000,
            }
            .encode(),
        );
        let mut body = BytesMut::new();
        start_body(
            &mut body,
            7,
            0,
            1_700_000_000_000_000,
            0,
            &[(b"user".to_vec(), b"app".to_vec())],
        );
        put_record(&mut out, KIND_START, &body);
        body.clear();
        message_body(&mut body, 7, 300, b'Q', b"SELECT 1\0");
        put_record(&mut out, KIND_MESSAGE, &body);
        body.clear();
        put_record(&mut out, 200, b"from a later version");
        end_body(&mut body, 7, 900, 0);
        put_record(&mut out, KIND_END, &body);
        out.to_vec()
    }

    /// Where the MESSAGE record starts: after the header and the START.
    fn second_record_offset() -> usize {
        let bytes = sample();
        let mut r = SegmentReader::open(&bytes[..], "t").expect("opens");
        r.next_record().expect("reads");
        r.offset as usize
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Record>, FormatError> {
        let mut r = SegmentReader::open(bytes, "t")?;
        let mut v = Vec::new();
        while let Some(rec) = r.next_record()? {
            v.push(rec);
        }
        Ok(v)
    }

    #[test]
    fn round_trips_and_skips_unknown_kinds() {
        let recs = read_all(&sample()).expect("reads");
        assert_eq!(recs.len(), 3);
        assert!(
            matches!(&recs[0], Record::Start { session: 7, params, .. } if params[0].1 == "app")
        );
        match &recs[1] {
            Record::Message { at_us, frame, .. } => {
                assert_eq!(*at_us, 300);
                assert_eq!(&frame[..], b"Q\0\0\0\x0dSELECT 1\0");
            }
            r => panic!("unexpected {r:?}"),
        }
        assert!(matches!(recs[2], Record::End { at_us: 900, .. }));
    }

    #[test]
    fn truncation_names_the_offset_of_the_cut_record() {
        let full = sample();
        let second_record = second_record_offset();
        for cut in [full.len() - 1, second_record + 3, second_record + 12] {
            let e = read_all(&full[..cut]).expect_err("truncated");
            let msg = e.to_string();
            assert!(matches!(e, FormatError::Truncated { .. }), "{msg}");
        }
        let e = read_all(&full[..second_record + 12]).expect_err("truncated");
        assert!(
            e.to_string().contains(&format!("offset {second_record}")),
            "{e}"
        );
        let e = read_all(&full[..10]).expect_err("short header");
        assert!(e.to_string().contains("header"), "{e}");
    }

    #[test]
    fn a_flipped_byte_is_a_checksum_error_at_its_record() {
        let mut bad = sample();
        let second_record = second_record_offset();
        bad[second_record + RECORD_HEADER_LEN + 4] ^= 0x20;
        let e = read_all(&bad).expect_err("corrupt");
        assert!(
            e.to_string().contains(&format!(
                "corrupt record at offset {second_record}: checksum"
            )),
            "{e}"
        );
        let e = read_all(b"PGDMP...").expect_err("not ours");
        assert!(matches!(e, FormatError::NotACapture { .. }));
        let mut v2 = sample();
        v2[9] = 2;
        assert!(matches!(
            read_all(&v2),
            Err(FormatError::Version { version: 2, .. })
        ));
    }

    #[test]
    fn varints_round_trip() {
        for v in [0, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut b = BytesMut::new();
            put_varint(&mut b, v);
            let mut s = &b[..];
            assert_eq!(get_varint(&mut s), Some(v));
            assert!(s.is_empty());
        }
    }
}
