//! One mirrored unit of work as it sits in the spool: the client messages
//! the source committed, with what the source answered, and what the target
//! connection needs to carry the same session state.
//!
//! The encoding is a small length-prefixed binary format (the messages are
//! binary anyway); decoding is bounds-checked because a spool file is
//! input like any other.

use bytes::{Buf, BufMut, BytesMut};

use super::order::OrderKey;

/// What the source answered to one statement or protocol step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// CommandComplete with its tag (`INSERT 0 1`, `COMMIT`, ...).
    Complete(String),
    /// ErrorResponse with its SQLSTATE.
    Error(String),
    /// EmptyQueryResponse.
    Empty,
    /// PortalSuspended (an Execute with a row limit).
    Suspended,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Complete(t) => write!(f, "{t}"),
            Outcome::Error(c) => write!(f, "ERROR {c}"),
            Outcome::Empty => write!(f, "EMPTY"),
            Outcome::Suspended => write!(f, "SUSPENDED"),
        }
    }
}

/// Client messages up to one ReadyForQuery, and the source's answers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Segment {
    /// Raw frontend messages, exactly as the client sent them.
    pub messages: Vec<u8>,
    /// Transaction status in the source's ReadyForQuery.
    pub status: u8,
    pub outcomes: Vec<Outcome>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MirroredUnit {
    /// Position in the spool (assigned when appended).
    pub seq: u64,
    /// The client session it came from (unique within one spool).
    pub session: u64,
    /// When the source acknowledged the commit (Unix microseconds).
    pub committed_at_us: u64,
    /// The client's startup parameters (user, database, options, ...).
    pub startup: Vec<(Vec<u8>, Vec<u8>)>,
    /// Session state before this unit: a version, and the SET / PREPARE
    /// statements that rebuild it on a fresh connection.
    pub state_version: u64,
    pub state: Vec<Vec<u8>>,
    /// The session's state version after this unit ran.
    pub post_state_version: u64,
    /// Parse messages for prepared statements this unit uses but did not
    /// prepare itself.
    pub prepared: Vec<(Vec<u8>, Vec<u8>)>,
    pub segments: Vec<Segment>,
    /// The unit's top-level transaction id on the source, when a probe
    /// read it (`pg_current_xact_id_if_assigned()`).
    pub xid: Option<u64>,
    /// Recovered after a crash from the in-flight journal: the source
    /// committed it (`pg_xact_status`), but the answers to its last
    /// request were never read, so they are not compared.
    pub recovered: bool,
    /// Its place in source commit order (see `order`).
    pub order: OrderKey,
}

#[derive(Debug, thiserror::Error)]
#[error("corrupt spool record: {0}")]
pub struct DecodeError(&'static str);

/// Version 2 added the order key, version 3 the transaction id and flags;
/// older records read without them.
const VERSION: u8 = 3;
const RECOVERED: u8 = 1;

fn put_bytes(b: &mut BytesMut, v: &[u8]) {
    b.put_u32(v.len() as u32);
    b.put_slice(v);
}

fn get_bytes(b: &mut &[u8]) -> Result<Vec<u8>, DecodeError> {
    if b.remaining() < 4 {
        return Err(DecodeError("truncated length"));
    }
    let n = b.get_u32() as usize;
    if b.remaining() < n {
        return Err(DecodeError("truncated field"));
    }
    let v = b[..n].to_vec();
    b.advance(n);
    Ok(v)
}

fn get_u64(b: &mut &[u8]) -> Result<u64, DecodeError> {
    if b.remaining() < 8 {
        return Err(DecodeError("truncated integer"));
    }
    Ok(b.get_u64())
}

fn get_u32(b: &mut &[u8]) -> Result<u32, DecodeError> {
    if b.remaining() < 4 {
        return Err(DecodeError("truncated count"));
    }
    Ok(b.get_u32())
}

fn get_u8(b: &mut &[u8]) -> Result<u8, DecodeError> {
    if b.remaining() < 1 {
        return Err(DecodeError("truncated byte"));
    }
    Ok(b.get_u8())
}

/// Counts come from the file: never pre-allocate more than the bytes left
/// could hold.
fn capacity(n: u32, b: &[u8]) -> usize {
    (n as usize).min(b.len() / 4)
}

impl MirroredUnit {
    /// Encodes everything but `seq`, which the spool frame carries.
    pub fn encode(&self, b: &mut BytesMut) {
        b.put_u8(VERSION);
        b.put_u64(self.session);
        b.put_u64(self.committed_at_us);
        let k = &self.order;
        b.put_u64(k.lsn.map_or(0, |l| l.saturating_add(1)));
        b.put_u64(k.run);
        let (slot, arm) = k.own.unwrap_or((u32::MAX, 0));
        b.put_u32(slot);
        b.put_u64(arm);
        b.put_u32(k.deps.len() as u32);
        for &(slot, arm) in &k.deps {
            b.put_u32(slot);
            b.put_u64(arm);
        }
        b.put_u64(self.xid.map_or(0, |x| x.saturating_add(1)));
        b.put_u8(if self.recovered { RECOVERED } else { 0 });
        b.put_u32(self.startup.len() as u32);
        for (k, v) in &self.startup {
            put_bytes(b, k);
            put_bytes(b, v);
        }
        b.put_u64(self.state_version);
        b.put_u32(self.state.len() as u32);
        for s in &self.state {
            put_bytes(b, s);
        }
        b.put_u64(self.post_state_version);
        b.put_u32(self.prepared.len() as u32);
        for (name, parse) in &self.prepared {
            put_bytes(b, name);
            put_bytes(b, parse);
        }
        b.put_u32(self.segments.len() as u32);
        for seg in &self.segments {
            put_bytes(b, &seg.messages);
            b.put_u8(seg.status);
            b.put_u32(seg.outcomes.len() as u32);
            for o in &seg.outcomes {
                match o {
                    Outcome::Complete(t) => {
                        b.put_u8(b'C');
                        put_bytes(b, t.as_bytes());
                    }
                    Outcome::Error(c) => {
                        b.put_u8(b'E');
                        put_bytes(b, c.as_bytes());
                    }
                    Outcome::Empty => b.put_u8(b'I'),
                    Outcome::Suspended => b.put_u8(b's'),
                }
            }
        }
    }

    pub fn decode(seq: u64, mut b: &[u8]) -> Result<Self, DecodeError> {
        let b = &mut b;
        let version = get_u8(b)?;
        if !(1..=VERSION).contains(&version) {
            return Err(DecodeError("unknown record version"));
        }
        let mut r = MirroredUnit {
            seq,
            session: get_u64(b)?,
            committed_at_us: get_u64(b)?,
            ..Default::default()
        };
        if version >= 2 {
            let lsn = get_u64(b)?;
            r.order.lsn = lsn.checked_sub(1);
            r.order.run = get_u64(b)?;
            let (slot, arm) = (get_u32(b)?, get_u64(b)?);
            r.order.own = (slot != u32::MAX).then_some((slot, arm));
            let n = get_u32(b)?;
            r.order.deps.reserve((n as usize).min(b.len() / 12));
            for _ in 0..n {
                r.order.deps.push((get_u32(b)?, get_u64(b)?));
            }
        }
        if version >= 3 {
            r.xid = get_u64(b)?.checked_sub(1);
            r.recovered = get_u8(b)? & RECOVERED != 0;
        }
        let n = get_u32(b)?;
        r.startup.reserve(capacity(n, b));
        for _ in 0..n {
            r.startup.push((get_bytes(b)?, get_bytes(b)?));
        }
        r.state_version = get_u64(b)?;
        let n = get_u32(b)?;
        for _ in 0..n {
            r.state.push(get_bytes(b)?);
        }
        r.post_state_version = get_u64(b)?;
        let n = get_u32(b)?;
        for _ in 0..n {
            r.prepared.push((get_bytes(b)?, get_bytes(b)?));
        }
        let n = get_u32(b)?;
        r.segments.reserve(capacity(n, b));
        for _ in 0..n {
            let messages = get_bytes(b)?;
            let status = get_u8(b)?;
            let k = get_u32(b)?;
            let mut outcomes = Vec::with_capacity(capacity(k, b));
            for _ in 0..k {
                outcomes.push(match get_u8(b)? {
                    b'C' => Outcome::Complete(
                        String::from_utf8(get_bytes(b)?).map_err(|_| DecodeError("tag"))?,
                    ),
                    b'E' => Outcome::Error(
                        String::from_utf8(get_bytes(b)?).map_err(|_| DecodeError("sqlstate"))?,
                    ),
                    b'I' => Outcome::Empty,
                    b's' => Outcome::Suspended,
                    _ => return Err(DecodeError("unknown outcome")),
                });
            }
            r.segments.push(Segment {
                messages,
                status,
                outcomes,
            });
        }
        if !b.is_empty() {
            return Err(DecodeError("trailing bytes"));
        }
        Ok(r)
    }

    /// The startup parameter `name`, if the client sent it.
    pub fn param(&self, name: &str) -> Option<&str> {
        startup_param(&self.startup, name)
    }

    /// The database the session used (defaults to the user name, as in Postgres).
    pub fn database(&self) -> &str {
        self.param("database")
            .or_else(|| self.param("user"))
            .unwrap_or_default()
    }
}

/// A startup parameter by name (the last one wins, as in Postgres).
pub fn startup_param<'a>(startup: &'a [(Vec<u8>, Vec<u8>)], name: &str) -> Option<&'a str> {
    startup
        .iter()
        .rev()
        .find(|(k, _)| k == name.as_bytes())
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_damage() {
        let r = MirroredUnit {
            seq: 7,
            session: 3,
            committed_at_us: 1_700_000_000_000_000,
            startup: vec![(b"user".to_vec(), b"app".to_vec())],
            state_version: 2,
            state: vec![b"SET search_path = a".to_vec()],
            post_state_version: 2,
            prepared: vec![(b"s1".to_vec(), b"P....".to_vec())],
            segments: vec![Segment {
                messages: b"Q\0\0\0\x0bbegin;\0".to_vec(),
                status: b'T',
                outcomes: vec![
                    Outcome::Complete("BEGIN".into()),
                    Outcome::Error("23505".into()),
                    Outcome::Empty,
                    Outcome::Suspended,
                ],
            }],
            xid: Some(4_294_967_302),
            recovered: true,
            order: OrderKey {
                lsn: Some(0x16B3748),
                run: 99,
                own: Some((4, 17)),
                deps: vec![(1, 5), (2, 9)],
            },
        };
        let mut b = BytesMut::new();
        r.encode(&mut b);
        assert_eq!(MirroredUnit::decode(7, &b).unwrap(), r);
        for cut in 0..b.len() {
            assert!(MirroredUnit::decode(7, &b[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(r.database(), "app");
    }
}
