//! Source commit order for the mirror.
//!
//! The spool holds units in the order the proxy *read* commit
//! acknowledgements, and that is not always the order the source committed
//! them: Postgres releases a transaction's locks before it sends the
//! acknowledgement, so a transaction that waited for another's row lock can
//! be acknowledged, read and spooled first. Replaying such a pair in spool
//! order changes the result (`v = v * 31 + k` twice, swapped).
//!
//! The order key is the source's WAL insert position read *inside* each
//! unit, after its writes and before its commit: the order probe. If unit B
//! saw unit A's effects (it waited for A's lock, or its snapshot had A), B's
//! probe ran after A's commit record was inserted, so `LSN(B) > LSN(A)`.
//! Independent units may come out in either order, which is harmless.
//!
//! The probe rides along with the client's own request, so it costs no
//! round trip, and its answers are dropped before they reach the client:
//! - a COMMIT in a block that wrote: a request of our own just before it
//!   (a simple Query, or for an extended-protocol COMMIT a named
//!   Parse/Bind/Execute/Close/Sync that leaves the client's unnamed
//!   statement and portals alone);
//! - an autocommit INSERT/UPDATE/DELETE/MERGE as a simple Query: the probe
//!   appended to the query string, so it runs in the same implicit
//!   transaction after the statement;
//! - the same with the extended protocol: our Parse/Bind/Execute/Close put
//!   before the client's Sync.
//!
//! Other shapes (DDL and COPY outside a block, multi-statement strings,
//! pipelined requests) carry no key; they are applied where they were
//! spooled, as before.
//!
//! The applier (`Sequencer`) may apply a unit only once every unit that
//! could still arrive with a lower key is in: each unit records which
//! sessions had a commit in flight when it was spooled (the in-flight
//! journal's armed slots), and waits until those have settled.

use std::collections::{BTreeMap, BTreeSet};

use bytes::{Bytes, BytesMut};

use crate::classify::lexer::{self, Token};
use crate::protocol::message::put_message as message;

/// What the probe asks the source: the WAL insert position (the order key)
/// and the transaction's top-level id, if it has one (a unit that was
/// assigned an id wrote something, whatever the classifier thought). Both
/// functions are callable by any role; both are schema-qualified, so a
/// function of the same name earlier on the client's search_path cannot
/// answer instead (PostgreSQL 13 or later).
pub const PROBE_SQL: &str =
    "SELECT pg_catalog.pg_current_wal_insert_lsn(), pg_catalog.pg_current_xact_id_if_assigned()";
/// Name of the probe's prepared statement and portal on the source.
const PROBE_NAME: &[u8] = b"__pgshift_order_probe";

/// A unit's place in source commit order, and what the applier must wait
/// for before it may apply the unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderKey {
    /// The probe's WAL position, when the unit's shape allowed a probe.
    pub lsn: Option<u64>,
    /// The proxy process that spooled the unit (slots and arm numbers are
    /// per process).
    pub run: u64,
    /// This unit's own in-flight arm: (slot, arm number).
    pub own: Option<(u32, u64)>,
    /// Other sessions' arms in flight when the unit was spooled.
    pub deps: Vec<(u32, u64)>,
}

/// How a request's first statement relates to the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A lone `COMMIT` / `END` (not `COMMIT PREPARED`).
    Commit,
    /// A lone INSERT, UPDATE, DELETE or MERGE.
    Dml,
    /// A lone SELECT, VALUES or WITH that calls functions which may write
    /// (or holds a data-modifying word): the probe's transaction id tells.
    Calls,
    Other,
}

impl Shape {
    /// A lone statement the probe may follow in the same request.
    pub fn takes_trailing_probe(self) -> bool {
        matches!(self, Shape::Dml | Shape::Calls)
    }
}

/// Looks at the words of `sql` only (the classifier already decided
/// whether it writes). Runs for every request of a mirrored session, so it
/// allocates nothing.
pub fn shape(sql: &str) -> Shape {
    let mut first: Option<&str> = None;
    let mut second: Option<&str> = None;
    let mut statements = 0;
    let mut in_statement = false;
    let mut extra = false;
    // A word, then `(`: a call unless the word is a keyword or a known
    // portable built-in.
    let mut last_word: Option<&str> = None;
    let mut calls = false;
    let ok = lexer::tokens(sql, |t, _| match t {
        Token::Semicolon => {
            if in_statement {
                statements += 1;
            }
            in_statement = false;
        }
        t => {
            if !in_statement && statements > 0 {
                extra = true;
            }
            in_statement = true;
            match t {
                Token::Open => {
                    if let Some(w) = last_word {
                        calls |= called(w);
                    }
                }
                Token::Word(w)
                    if ["insert", "update", "delete", "merge"]
                        .iter()
                        .any(|k| w.eq_ignore_ascii_case(k)) =>
                {
                    calls = true
                }
                _ => {}
            }
            last_word = match t {
                Token::Word(w) | Token::Quoted(w) => Some(w),
                _ => None,
            };
            if let Token::Word(w) = t {
                if statements == 0 {
                    if first.is_none() {
                        first = Some(w);
                    } else if second.is_none() {
                        second = Some(w);
                    }
                }
            } else if statements == 0 && first.is_none() {
                // Something before the first word (a parenthesis): not a
                // shape the probe handles.
                extra = true;
            }
        }
    });
    let Some(w) = first.filter(|_| ok.is_ok() && !extra) else {
        return Shape::Other;
    };
    let is = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    if is(w, "commit") && !second.is_some_and(|s| is(s, "prepared")) || is(w, "end") {
        Shape::Commit
    } else if ["insert", "update", "delete", "merge"]
        .iter()
        .any(|k| is(w, k))
    {
        Shape::Dml
    } else if calls
        && ["select", "values", "with", "table"]
            .iter()
            .any(|k| is(w, k))
    {
        Shape::Calls
    } else {
        Shape::Other
    }
}

/// Whether `word(` calls a function that may write: anything but grammar
/// words and portable built-ins (erring towards a probe is harmless).
fn called(word: &str) -> bool {
    let mut lower = [0u8; 48];
    let Some(buf) = lower.get_mut(..word.len()) else {
        return true;
    };
    for (d, s) in buf.iter_mut().zip(word.bytes()) {
        *d = s.to_ascii_lowercase();
    }
    let Ok(w) = std::str::from_utf8(buf) else {
        return true;
    };
    crate::classify::reads::lexical_call(w).is_some_and(|r| r.calls)
}

/// The probe as a simple Query of its own (before a simple COMMIT).
pub fn standalone_query() -> Bytes {
    let mut out = BytesMut::new();
    message(&mut out, b'Q', &[PROBE_SQL.as_bytes(), b"\0"]);
    out.freeze()
}

/// The probe as named extended-protocol messages, with a Sync of its own
/// (before an extended COMMIT) or without (before an autocommit Sync).
pub fn extended(with_sync: bool) -> Bytes {
    let mut out = BytesMut::new();
    let name: &[u8] = PROBE_NAME;
    // Closing first makes the probe immune to a leftover of an earlier one
    // that failed half-way (closing what does not exist is no error): the
    // probe must never fail, since before an autocommit Sync its failure
    // would roll the client's write back.
    message(&mut out, b'C', &[b"P", name, b"\0"]);
    message(&mut out, b'C', &[b"S", name, b"\0"]);
    message(
        &mut out,
        b'P',
        &[
            name,
            b"\0",
            PROBE_SQL.as_bytes(),
            b"\0",
            &0i16.to_be_bytes(),
        ],
    );
    // Bind: portal, statement, no parameter formats, no parameters, no
    // result formats (text).
    message(
        &mut out,
        b'B',
        &[name, b"\0", name, b"\0", &[0, 0, 0, 0, 0, 0]],
    );
    message(&mut out, b'E', &[name, b"\0", &0i32.to_be_bytes()]);
    // The portal outlives its statement's Close until the transaction
    // ends: close both.
    message(&mut out, b'C', &[b"P", name, b"\0"]);
    message(&mut out, b'C', &[b"S", name, b"\0"]);
    if with_sync {
        message(&mut out, b'S', &[]);
    }
    out.freeze()
}

/// The client's COMMIT Query with the probe put first: its answers are
/// the first three messages (RowDescription, DataRow, CommandComplete).
pub fn prepended_query(query_body: &[u8]) -> Bytes {
    let text = query_body.strip_suffix(b"\0").unwrap_or(query_body);
    let mut out = BytesMut::with_capacity(text.len() + PROBE_SQL.len() + 8);
    message(&mut out, b'Q', &[PROBE_SQL.as_bytes(), b";", text, b"\0"]);
    out.freeze()
}

/// Answers to `extended(false)`: two CloseCompletes, ParseComplete,
/// BindComplete, DataRow, CommandComplete, two CloseCompletes.
pub const EXTENDED_ANSWERS: u32 = 8;
/// Answers to the probe in `prepended_query`.
pub const PREPENDED_ANSWERS: u32 = 3;

/// The client's Query with the probe appended (an autocommit DML).
pub fn appended_query(query_body: &[u8]) -> Bytes {
    let text = query_body.strip_suffix(b"\0").unwrap_or(query_body);
    let mut out = BytesMut::with_capacity(text.len() + PROBE_SQL.len() + 8);
    // A newline ends a trailing `--` comment.
    message(&mut out, b'Q', &[text, b"\n;", PROBE_SQL.as_bytes(), b"\0"]);
    out.freeze()
}

/// What one probe read on the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeRow {
    /// The WAL insert position.
    pub lsn: u64,
    /// The top-level transaction id (a full 64-bit `xid8`), when the
    /// transaction has been assigned one (it wrote).
    pub xid: Option<u64>,
}

/// Parses the probe's DataRow: `X/Y` in hex, then a decimal xid or NULL.
pub fn key_from_row(body: &[u8]) -> Option<ProbeRow> {
    let cols = u16::from_be_bytes([*body.first()?, *body.get(1)?]);
    if cols != 2 {
        return None;
    }
    let mut rest = body.get(2..)?;
    let mut column = || -> Option<Option<&[u8]>> {
        let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        rest = rest.get(4..)?;
        if len < 0 {
            return Some(None);
        }
        let len = usize::try_from(len).ok()?;
        let v = rest.get(..len)?;
        rest = rest.get(len..)?;
        Some(Some(v))
    };
    let lsn = std::str::from_utf8(column()??).ok()?;
    let xid = match column()? {
        None => None,
        Some(x) => Some(std::str::from_utf8(x).ok()?.parse::<u64>().ok()?),
    };
    let (hi, lo) = lsn.split_once('/')?;
    Some(ProbeRow {
        lsn: (u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?,
        xid,
    })
}

/// Where the session is in the answers to a request that carries a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Probe {
    #[default]
    Idle,
    /// Our own request goes first: everything up to and including its
    /// ReadyForQuery is ours.
    Standalone,
    /// Our statements go first in the client's request: the first `left`
    /// answers are ours.
    Leading {
        left: u32,
    },
    /// The client's answers come first: `left` more completions, then ours
    /// up to the ReadyForQuery (which is the client's).
    Trailing {
        left: u32,
        extended: bool,
    },
    Ours,
    /// An error ended the request before our part ran.
    Skipping,
}

/// What to do with one message from the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Forward,
    Drop,
    /// Dropped, and it carried the order key and the transaction id.
    Key(ProbeRow),
    /// Dropped: the probe failed (the unit gets no key).
    Failed,
    /// Forwarded: the probe failed after the client's statement, which the
    /// failure rolled back; the client must see the error.
    ForwardFailed,
}

impl Probe {
    pub fn active(&self) -> bool {
        *self != Probe::Idle
    }

    /// Follows one message (`body` may be only a prefix for DataRow).
    pub fn step(&mut self, tag: u8, body: &[u8]) -> Step {
        // Asynchronous messages are the client's whatever the state.
        if matches!(tag, b'N' | b'A' | b'S') {
            return Step::Forward;
        }
        match *self {
            Probe::Idle => Step::Forward,
            Probe::Standalone => match tag {
                b'Z' => {
                    *self = Probe::Idle;
                    Step::Drop
                }
                b'D' => key_from_row(body).map_or(Step::Failed, Step::Key),
                b'E' => Step::Failed,
                _ => Step::Drop,
            },
            Probe::Leading { left } => {
                if tag == b'E' {
                    // Ours failed: the client's COMMIT did not run, and the
                    // client must hear why.
                    *self = Probe::Skipping;
                    return Step::ForwardFailed;
                }
                *self = if left <= 1 {
                    Probe::Idle
                } else {
                    Probe::Leading { left: left - 1 }
                };
                if tag == b'D' {
                    key_from_row(body).map_or(Step::Failed, Step::Key)
                } else {
                    Step::Drop
                }
            }
            Probe::Trailing { left, extended } => {
                let done = if extended {
                    matches!(tag, b'1' | b'2' | b'3' | b'C' | b'I' | b's' | b'T' | b'n')
                } else {
                    matches!(tag, b'C' | b'I')
                };
                match tag {
                    b'E' => *self = Probe::Skipping,
                    b'Z' => *self = Probe::Idle,
                    _ if done && left <= 1 => *self = Probe::Ours,
                    _ if done => {
                        *self = Probe::Trailing {
                            left: left - 1,
                            extended,
                        }
                    }
                    _ => {}
                }
                Step::Forward
            }
            Probe::Ours => match tag {
                b'Z' => {
                    *self = Probe::Idle;
                    Step::Forward
                }
                // The probe failed after the client's statement: the
                // implicit transaction is rolled back, and the client must
                // hear why.
                b'E' => {
                    *self = Probe::Skipping;
                    Step::ForwardFailed
                }
                b'D' => key_from_row(body).map_or(Step::Failed, Step::Key),
                _ => Step::Drop,
            },
            Probe::Skipping => {
                if tag == b'Z' {
                    *self = Probe::Idle;
                }
                Step::Forward
            }
        }
    }
}

/// One spooled unit as the sequencer sees it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub key: OrderKey,
}

/// Chooses which buffered unit the applier applies next.
#[derive(Debug, Default)]
pub struct Sequencer {
    /// Read from the spool, not yet applied, by seq.
    buffered: BTreeMap<u64, OrderKey>,
    /// The buffered units that carry a key, in key order.
    by_lsn: BTreeSet<(u64, u64)>,
    /// The buffered units without one.
    barriers: BTreeSet<u64>,
    /// Highest seq read from the spool.
    read_through: u64,
    /// Seqs applied ahead of a lower unapplied one.
    applied_above: BTreeSet<u64>,
}

/// The next unit to apply, and whether the arms it waits for have all
/// settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub seq: u64,
    pub ready: bool,
}

impl Sequencer {
    pub fn new(read_through: u64) -> Self {
        Self {
            read_through,
            ..Self::default()
        }
    }

    pub fn push(&mut self, e: Entry) {
        self.read_through = self.read_through.max(e.seq);
        match e.key.lsn {
            Some(lsn) => self.by_lsn.insert((lsn, e.seq)),
            None => self.barriers.insert(e.seq),
        };
        self.buffered.insert(e.seq, e.key);
    }

    pub fn len(&self) -> usize {
        self.buffered.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buffered.is_empty()
    }

    /// The lowest buffered seq.
    pub fn first(&self) -> Option<u64> {
        self.buffered.keys().next().copied()
    }

    /// `settled(run, slot, arm)` says whether that arm is over.
    pub fn choose(&self, settled: impl Fn(u64, u32, u64) -> bool) -> Option<Choice> {
        let barrier = self
            .barriers
            .first()
            .and_then(|b| Some((*b, self.buffered.get(b)?)));
        // The lowest key before the first unit without one, or spooled
        // after it while in flight when it was spooled (it belongs before).
        let keyed = self.by_lsn.iter().map(|&(_, seq)| seq).find(|&seq| {
            let Some((b, bk)) = barrier else {
                return true;
            };
            seq < b
                || self
                    .buffered
                    .get(&seq)
                    .is_some_and(|k| k.run == bk.run && k.own.is_some_and(|o| bk.deps.contains(&o)))
        });
        let seq = keyed.or(barrier.map(|(b, _)| b))?;
        let k = self.buffered.get(&seq)?;
        let ready = k.deps.iter().all(|&(slot, arm)| settled(k.run, slot, arm));
        Some(Choice { seq, ready })
    }

    /// Seqs up to `seq` will never be read (released, or unreadable).
    pub fn skip_to(&mut self, seq: u64) {
        self.read_through = self.read_through.max(seq);
    }

    /// What `(low(), above())` will be once `seq` is applied: the progress
    /// mark written inside that unit's transaction.
    pub fn if_applied(&self, seq: u64) -> (u64, Vec<u64>) {
        let low = self
            .buffered
            .keys()
            .find(|&&s| s != seq)
            .map_or(self.read_through, |s| s - 1);
        let mut above: Vec<u64> = self
            .applied_above
            .iter()
            .copied()
            .chain(std::iter::once(seq))
            .filter(|&s| s > low)
            .collect();
        above.sort_unstable();
        above.dedup();
        (low, above)
    }

    /// Takes unit `seq` out as applied.
    pub fn applied(&mut self, seq: u64) {
        let Some(k) = self.buffered.remove(&seq) else {
            return;
        };
        match k.lsn {
            Some(lsn) => self.by_lsn.remove(&(lsn, seq)),
            None => self.barriers.remove(&seq),
        };
        self.applied_above.insert(seq);
        let low = self.low();
        self.applied_above = self.applied_above.split_off(&(low + 1));
    }

    /// Every seq up to this one is applied.
    pub fn low(&self) -> u64 {
        self.first().map_or(self.read_through, |s| s - 1)
    }

    /// Seqs above `low()` already applied.
    pub fn above(&self) -> impl Iterator<Item = u64> + '_ {
        self.applied_above.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(shape("COMMIT"), Shape::Commit);
        assert_eq!(shape("end;"), Shape::Commit);
        assert_eq!(shape(" /* x */ commit and chain ;"), Shape::Commit);
        assert_eq!(shape("COMMIT PREPARED 'x'"), Shape::Other);
        assert_eq!(shape("(select 1)"), Shape::Other);
        assert_eq!(shape("Delete from t"), Shape::Dml);
        assert_eq!(shape("update t set v = 1 where id = 2;"), Shape::Dml);
        assert_eq!(shape("-- c\nINSERT INTO t VALUES (1)"), Shape::Dml);
        assert_eq!(
            shape("UPDATE t SET v = 1; UPDATE t SET v = 2"),
            Shape::Other
        );
        assert_eq!(shape("UPDATE t SET v = 1; COMMIT"), Shape::Other);
        assert_eq!(shape("BEGIN"), Shape::Other);
        assert_eq!(shape("copy t from stdin"), Shape::Other);
        assert_eq!(shape("SELECT f()"), Shape::Calls);
        assert_eq!(shape("select app.touch($1)"), Shape::Calls);
        assert_eq!(shape("SELECT count(*) FROM t WHERE a IN (1)"), Shape::Other);
        assert_eq!(shape("SELECT abalance FROM t WHERE aid = $1"), Shape::Other);
        assert_eq!(
            shape("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d"),
            Shape::Calls
        );
        assert_eq!(shape("SELECT f(); SELECT 1"), Shape::Other);
        assert_eq!(shape("update t set s = 'unterminated"), Shape::Other);
        assert_eq!(shape(""), Shape::Other);
    }

    #[test]
    fn appended_query_keeps_the_client_text_first() {
        let q = appended_query(b"UPDATE t SET v = 1 -- note\0");
        assert_eq!(
            &q[5..],
            format!("UPDATE t SET v = 1 -- note\n;{PROBE_SQL}\0").as_bytes()
        );
        assert_eq!(
            i32::from_be_bytes(q[1..5].try_into().unwrap()) as usize,
            q.len() - 1
        );
    }

    /// A probe DataRow: the LSN text and no xid.
    fn row(text: &str) -> Vec<u8> {
        row_xid(text, None)
    }

    fn row_xid(text: &str, xid: Option<&str>) -> Vec<u8> {
        let mut v = 2u16.to_be_bytes().to_vec();
        v.extend((text.len() as i32).to_be_bytes());
        v.extend(text.as_bytes());
        match xid {
            Some(x) => {
                v.extend((x.len() as i32).to_be_bytes());
                v.extend(x.as_bytes());
            }
            None => v.extend((-1i32).to_be_bytes()),
        }
        v
    }

    fn key(lsn: u64, xid: Option<u64>) -> Step {
        Step::Key(ProbeRow { lsn, xid })
    }

    #[test]
    fn probe_rows_parse_and_garbage_is_rejected() {
        assert_eq!(
            key_from_row(&row("0/16B3748")),
            Some(ProbeRow {
                lsn: 0x16B3748,
                xid: None
            })
        );
        assert_eq!(
            key_from_row(&row_xid("1A/0", Some("4294967302"))),
            Some(ProbeRow {
                lsn: 0x1A << 32,
                xid: Some(4294967302)
            })
        );
        assert_eq!(key_from_row(&row("zz")), None);
        assert_eq!(key_from_row(&row_xid("0/1", Some("-3"))), None);
        // One column (an old probe, or a function answering instead).
        assert_eq!(key_from_row(&[0, 1, 0, 0, 0, 3, b'0', b'/', b'1']), None);
        assert_eq!(key_from_row(&[0, 2, 0, 0, 0, 9, b'0']), None);
        assert_eq!(key_from_row(&[]), None);
    }

    #[test]
    fn standalone_probe_drops_everything_up_to_its_ready_for_query() {
        let mut p = Probe::Standalone;
        assert_eq!(p.step(b'T', b""), Step::Drop);
        assert_eq!(p.step(b'N', b""), Step::Forward);
        assert_eq!(p.step(b'D', &row("0/10")), key(16, None));
        assert_eq!(p.step(b'C', b"SELECT 1\0"), Step::Drop);
        assert_eq!(p.step(b'Z', b"T"), Step::Drop);
        assert_eq!(p.step(b'C', b"COMMIT\0"), Step::Forward);
        assert!(!p.active());
    }

    #[test]
    fn leading_probe_drops_its_own_answers_then_forwards_the_client_s() {
        let q = prepended_query(b"END;\0");
        assert_eq!(&q[5..], format!("{PROBE_SQL};END;\0").as_bytes());
        let mut p = Probe::Leading {
            left: PREPENDED_ANSWERS,
        };
        assert_eq!(p.step(b'T', b""), Step::Drop);
        assert_eq!(p.step(b'S', b""), Step::Forward);
        assert_eq!(p.step(b'D', &row("0/30")), key(48, None));
        assert_eq!(p.step(b'C', b"SELECT 1\0"), Step::Drop);
        assert!(!p.active());
        assert_eq!(p.step(b'C', b"COMMIT\0"), Step::Forward);
        let mut p = Probe::Leading { left: 3 };
        assert_eq!(p.step(b'E', b""), Step::ForwardFailed);
        assert_eq!(p.step(b'Z', b"E"), Step::Forward);
        assert!(!p.active());
    }

    #[test]
    fn trailing_probe_forwards_the_client_part_and_the_final_ready() {
        // UPDATE ... RETURNING, then our SELECT, in one simple Query.
        let mut p = Probe::Trailing {
            left: 1,
            extended: false,
        };
        for tag in [b'T', b'D', b'C'] {
            assert_eq!(p.step(tag, &row("client")), Step::Forward);
        }
        assert_eq!(p.step(b'T', b""), Step::Drop);
        assert_eq!(p.step(b'D', &row("0/20")), key(32, None));
        assert_eq!(p.step(b'C', b""), Step::Drop);
        assert_eq!(p.step(b'Z', b"I"), Step::Forward);
        assert!(!p.active());

        // Extended: Parse, Bind, Execute of the client, then ours.
        let mut p = Probe::Trailing {
            left: 3,
            extended: true,
        };
        for tag in [b'1', b'2', b'C'] {
            assert_eq!(p.step(tag, b""), Step::Forward);
        }
        for tag in [b'3', b'3', b'1', b'2'] {
            assert_eq!(p.step(tag, b""), Step::Drop);
        }
        assert_eq!(p.step(b'D', &row("0/1")), key(1, None));
        for tag in [b'C', b'3', b'3'] {
            assert_eq!(p.step(tag, b""), Step::Drop);
        }
        assert_eq!(p.step(b'Z', b"I"), Step::Forward);

        // The client's statement fails: ours never runs.
        let mut p = Probe::Trailing {
            left: 1,
            extended: false,
        };
        assert_eq!(p.step(b'E', b""), Step::Forward);
        assert_eq!(p.step(b'Z', b"I"), Step::Forward);
        assert!(!p.active());
    }

    fn entry(seq: u64, lsn: Option<u64>, own: u32, deps: &[u32]) -> Entry {
        Entry {
            seq,
            key: OrderKey {
                lsn,
                run: 1,
                own: Some((own, 1)),
                deps: deps.iter().map(|&d| (d, 1)).collect(),
            },
        }
    }

    #[test]
    fn sequencer_applies_by_lsn_once_in_flight_commits_settled() {
        let mut s = Sequencer::new(0);
        // Spooled B (lsn 20) while A's commit (slot 1) was in flight; A
        // comes later with a lower lsn.
        s.push(entry(1, Some(20), 2, &[1]));
        let unsettled = |_, slot, _| slot != 1;
        assert_eq!(
            s.choose(unsettled),
            Some(Choice {
                seq: 1,
                ready: false
            })
        );
        s.push(entry(2, Some(10), 1, &[]));
        let c = s.choose(|_, _, _| true).unwrap();
        assert_eq!(
            c,
            Choice {
                seq: 2,
                ready: true
            }
        );
        assert_eq!(s.if_applied(2), (0, vec![2]));
        s.applied(c.seq);
        assert_eq!(s.if_applied(1), (2, vec![]));
        assert_eq!(s.low(), 0);
        assert_eq!(s.above().collect::<Vec<_>>(), vec![2]);
        let c = s.choose(|_, _, _| true).unwrap();
        assert_eq!(c.seq, 1);
        s.applied(c.seq);
        assert_eq!(s.low(), 2);
        assert_eq!(s.above().count(), 0);
        assert_eq!(s.choose(|_, _, _| true), None);
    }

    #[test]
    fn a_unit_without_a_key_waits_for_those_before_it_and_their_late_peers() {
        let mut s = Sequencer::new(0);
        s.push(entry(1, Some(50), 1, &[]));
        s.push(entry(2, None, 2, &[3])); // barrier; slot 3 was in flight
        s.push(entry(3, Some(5), 4, &[])); // after the barrier
        s.push(entry(4, Some(40), 3, &[])); // slot 3's unit: before it
        let mut order = Vec::new();
        while let Some(c) = s.choose(|_, _, _| true) {
            s.applied(c.seq);
            order.push(c.seq);
        }
        assert_eq!(order, vec![4, 1, 2, 3]);
    }
}
