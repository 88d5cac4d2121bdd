//! Row images: the rows each source transaction wrote, read by logical
//! decoding, for the units whose statements would not give the target the
//! source's values.
//!
//! Statement replay is exact for deterministic writes. It is not for a
//! serial or identity id taken by concurrent transactions that commit in
//! another order, a `now()` / `clock_timestamp()` / `gen_random_uuid()`
//! default, or `ORDER BY random() LIMIT`: the target computes its own
//! values. For such a unit (the applier's determinism check flags it) the
//! applier applies the rows its transaction wrote on the source instead,
//! found by the transaction id its order probe read (MySQL's MIXED binlog
//! format is the model: statements where safe, rows where not).
//!
//! Per configured database, a replication connection streams the changes
//! of a logical slot (`test_decoding`, which every Postgres ships) in
//! commit order. Decoded transactions wait here, bounded, until the applier
//! takes the one it needs or passes them; the slot's confirmed position
//! advances only over transactions the applier is done with, so a restart
//! resumes where it must. When the buffer is full the stream waits (the
//! slot keeps the source's WAL meanwhile: `max_slot_wal_keep_size` bounds
//! that on the source).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::lifecycle::Phase;
use crate::net::connect::Upstream;
use crate::protocol::error::parse_error_fields;
use crate::protocol::frame::read_message;
use crate::protocol::message::put_message;
use crate::protocol::startup::StartupMessage;
use crate::upstream::login::connect_and_login;
use crate::upstream::passfile::PassFile;

/// A column value as `test_decoding` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// The value's text (unquoted).
    Text(String),
    /// A TOASTed value the UPDATE did not change: not printed.
    Unchanged,
}

/// One column: its name as an SQL identifier (quoted where needed) and
/// value.
pub type Column = (String, Value);

/// One row change of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Insert {
        table: String,
        row: Vec<Column>,
    },
    Update {
        table: String,
        /// The old key, when the key changed (or REPLICA IDENTITY FULL).
        old: Option<Vec<Column>>,
        row: Vec<Column>,
    },
    Delete {
        table: String,
        old: Vec<Column>,
    },
    /// Something rows cannot reproduce (TRUNCATE, a DELETE or UPDATE on a
    /// table without a replica identity, output it cannot read).
    Unusable(String),
}

/// A decoded transaction.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The 32-bit transaction id `test_decoding` prints.
    pub xid: u32,
    pub commit_lsn: u64,
    pub changes: Vec<Change>,
    bytes: usize,
    /// When the stream delivered it (set by `push`).
    arrived: Option<Instant>,
}

impl Decoded {
    /// Whether every change can be applied as a row.
    pub fn usable(&self) -> Result<(), String> {
        match self.changes.iter().find_map(|c| match c {
            Change::Unusable(why) => Some(why.clone()),
            _ => None,
        }) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }
}

#[derive(Default)]
struct Buffer {
    /// Decoded transactions by commit LSN (commit order), and where each
    /// xid is.
    txns: BTreeMap<u64, Decoded>,
    by_xid: HashMap<u32, u64>,
    bytes: usize,
    /// Highest commit LSN the stream delivered.
    decoded_through: u64,
    /// Position the slot may confirm: every transaction committed up to it
    /// is taken or passed.
    confirmable: u64,
}

/// The decoded stream of one database.
pub struct Stream {
    pub database: String,
    buffer: Mutex<Buffer>,
    /// Woken when a transaction arrives.
    arrived: Notify,
    /// Woken when space is freed.
    freed: Notify,
    max_bytes: usize,
    /// How far the source's stream has gone (its keepalives' sent
    /// position): a transaction committed below it and not here wrote no
    /// rows.
    end: AtomicU64,
    /// Asks the stream for a keepalive now (the applier waits on `end`).
    ping: Notify,
    /// "connecting", "streaming", or why it stopped.
    pub state: Mutex<String>,
    pub transactions: AtomicU64,
    pub taken: AtomicU64,
}

impl Stream {
    fn new(database: &str, max_bytes: usize) -> Self {
        Self {
            database: database.to_string(),
            buffer: Mutex::default(),
            arrived: Notify::new(),
            freed: Notify::new(),
            max_bytes,
            end: AtomicU64::new(0),
            ping: Notify::new(),
            state: Mutex::new("connecting".into()),
            transactions: AtomicU64::new(0),
            taken: AtomicU64::new(0),
        }
    }

    fn buffer(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn confirmable(&self) -> u64 {
        self.buffer().confirmable
    }

    fn buffered_bytes(&self) -> usize {
        self.buffer().bytes
    }

    fn reached(&self, lsn: u64) {
        self.end.fetch_max(lsn, Ordering::AcqRel);
        self.arrived.notify_waiters();
    }

    fn push(&self, mut t: Decoded) {
        t.arrived = Some(Instant::now());
        let mut b = self.buffer();
        b.decoded_through = b.decoded_through.max(t.commit_lsn);
        if b.txns.is_empty() {
            b.confirmable = b.confirmable.max(t.commit_lsn.saturating_sub(1));
        }
        b.bytes += t.bytes;
        b.by_xid.insert(t.xid, t.commit_lsn);
        b.txns.insert(t.commit_lsn, t);
        drop(b);
        self.transactions.fetch_add(1, Ordering::Relaxed);
        self.arrived.notify_waiters();
    }

    /// Takes transaction `xid` (the low 32 bits of the unit's xid8) once
    /// the stream has it. Once the stream has gone past `committed_before`
    /// (a WAL position the source had reached after the transaction
    /// committed) without it, it wrote no rows: `None` at once. Otherwise it
    /// waits as long as the stream makes progress (its position moves or
    /// transactions arrive), and gives up (`None`) only after `wait` without
    /// any: a stream that is behind but moving (a loaded source or machine)
    /// is waited for, because replaying the unit's statements instead would
    /// make its generated values differ; a stream that is down is not. With
    /// no `committed_before` (the source's position could not be read) it
    /// waits `wait` at most: nothing then bounds the wait.
    pub async fn take(
        &self,
        xid8: u64,
        committed_before: Option<u64>,
        wait: Duration,
    ) -> Option<Decoded> {
        let xid = xid8 as u32;
        let mut deadline = Instant::now() + wait;
        let progress = || {
            (
                self.end.load(Ordering::Acquire),
                self.transactions.load(Ordering::Relaxed),
            )
        };
        let mut seen = progress();
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if committed_before.is_some_and(|lsn| self.end.load(Ordering::Acquire) >= lsn) {
                // One last look: it may have come with that keepalive's data.
                let mut b = self.buffer();
                if !b.by_xid.contains_key(&xid) {
                    drop(b);
                    return None;
                }
                b.advance_confirmable();
            }
            self.ping.notify_one();
            {
                let mut b = self.buffer();
                if let Some(lsn) = b.by_xid.remove(&xid) {
                    let t = b.txns.remove(&lsn);
                    if let Some(t) = &t {
                        b.bytes -= t.bytes;
                    }
                    b.advance_confirmable();
                    drop(b);
                    self.freed.notify_waiters();
                    self.taken.fetch_add(1, Ordering::Relaxed);
                    return t;
                }
            }
            if tokio::time::timeout_at(deadline.into(), arrived)
                .await
                .is_err()
            {
                // After a stall of the whole machine the timer can fire
                // before the stream's task has read what arrived meanwhile:
                // let it run once before judging.
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                // Without the source's position there is no point the
                // stream must reach: no waiting past `wait` then.
                let now = progress();
                if now == seen || committed_before.is_none() {
                    return None;
                }
                seen = now;
                deadline = Instant::now() + wait;
            }
        }
    }

    /// Drops transactions committed before `lsn` that no unit still to be
    /// applied needs (`needed` says which xids are) and that have waited
    /// `unclaimed` for one to claim them. The grace is what keeps a
    /// transaction decoded before its unit reached the spool (the source
    /// commits before the proxy spools the unit; on a loaded machine the
    /// stream can be first): without it the rows would be gone when the
    /// unit comes. A buffer more than three quarters full drops unclaimed
    /// transactions without waiting, so writes that no unit will claim (an
    /// application writing to the source directly) cannot stall the stream.
    pub fn pass(&self, lsn: u64, needed: impl Fn(u32) -> bool, unclaimed: Duration) {
        let mut b = self.buffer();
        let crowded = b.bytes > self.max_bytes / 4 * 3;
        let old: Vec<(u64, u32)> = b
            .txns
            .range(..lsn)
            .filter(|(_, t)| crowded || t.arrived.is_none_or(|at| at.elapsed() >= unclaimed))
            .map(|(l, t)| (*l, t.xid))
            .filter(|(_, x)| !needed(*x))
            .collect();
        if old.is_empty() {
            return;
        }
        for (l, x) in old {
            if let Some(t) = b.txns.remove(&l) {
                b.bytes -= t.bytes;
            }
            b.by_xid.remove(&x);
        }
        b.advance_confirmable();
        drop(b);
        self.freed.notify_waiters();
    }

    pub fn status(&self) -> serde_json::Value {
        let b = self.buffer();
        serde_json::json!({
            "database": self.database,
            "state": self.state.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            "buffered_transactions": b.txns.len(),
            "buffered_bytes": b.bytes,
            "decoded_through_lsn": lsn_text(b.decoded_through),
            "confirmed_lsn": lsn_text(b.confirmable),
            "transactions_decoded": self.transactions.load(Ordering::Relaxed),
            "transactions_applied_as_rows": self.taken.load(Ordering::Relaxed),
        })
    }

    fn set_state(&self, s: &str) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s.to_string();
    }
}

impl Buffer {
    /// Everything before the oldest buffered transaction is done with.
    fn advance_confirmable(&mut self) {
        self.confirmable = match self.txns.keys().next() {
            Some(first) => self.confirmable.max(first.saturating_sub(1)),
            None => self.confirmable.max(self.decoded_through),
        };
    }
}

pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// The row image streams of the configured databases.
#[derive(Default)]
pub struct RowImages {
    pub streams: HashMap<String, Arc<Stream>>,
    pub wait: Duration,
    pub sequence_sync: Duration,
    pub user: String,
}

impl RowImages {
    pub fn new(cfg: &crate::config::RowImagesConfig) -> Self {
        Self {
            streams: cfg
                .databases
                .iter()
                .map(|d| (d.clone(), Arc::new(Stream::new(d, cfg.max_buffer_bytes))))
                .collect(),
            wait: Duration::from_millis(cfg.wait_ms),
            sequence_sync: Duration::from_millis(cfg.sequence_sync_ms),
            user: cfg.user.clone(),
        }
    }

    pub fn stream(&self, database: &str) -> Option<&Arc<Stream>> {
        self.streams.get(database)
    }

    pub fn status(&self) -> serde_json::Value {
        let mut v: Vec<_> = self.streams.values().map(|s| s.status()).collect();
        v.sort_by(|a, b| a["database"].as_str().cmp(&b["database"].as_str()));
        serde_json::Value::Array(v)
    }
}

/// The slot for `database` of this spool.
pub fn slot_name(spool_id: &str, database: &str) -> String {
    // Slot names allow lower-case letters, digits and underscores only.
    let h = crate::classify::analyze::fnv1a(database.as_bytes());
    let id: String = spool_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .take(16)
        .collect();
    format!("pgshift_{id}_{:08x}", h as u32)
}

/// Streams one database's row images until shutdown, reconnecting with
/// backoff.
pub async fn run(
    stream: Arc<Stream>,
    source: Upstream,
    passfile: Option<PassFile>,
    user: String,
    slot: String,
    mut shutdown: watch::Receiver<Phase>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        if *shutdown.borrow() == Phase::Closing {
            return;
        }
        let r = tokio::select! {
            r = stream_once(&stream, &source, passfile.as_ref(), &user, &slot) => r,
            _ = shutdown.changed() => continue,
        };
        let why = match r {
            Ok(()) => "the source ended the replication stream".to_string(),
            Err(e) => e,
        };
        warn!(database = %stream.database, error = %why, "row image stream stopped; reconnecting");
        stream.set_state(&format!("reconnecting: {why}"));
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// One replication session: make or reuse the slot, stream, decode.
async fn stream_once(
    stream: &Stream,
    source: &Upstream,
    passfile: Option<&PassFile>,
    user: &str,
    slot: &str,
) -> Result<(), String> {
    let params = vec![
        (b"user".to_vec(), user.as_bytes().to_vec()),
        (b"database".to_vec(), stream.database.as_bytes().to_vec()),
        (b"replication".to_vec(), b"database".to_vec()),
        (b"application_name".to_vec(), b"pgshift row images".to_vec()),
    ];
    let (mut conn, mut buf, _) =
        connect_and_login(source, passfile, &StartupMessage::new(3, 0, params)).await?;
    // The slot name is made of [a-z0-9_] only: no quoting needed.
    match simple(
        &mut conn,
        &mut buf,
        &format!("CREATE_REPLICATION_SLOT {slot} LOGICAL test_decoding"),
    )
    .await
    {
        Ok(()) => info!(database = %stream.database, slot, "created the row image slot"),
        // 42710: it exists (a restart): go on from where it stands.
        Err(e) if e.starts_with("42710") => {}
        Err(e) => return Err(format!("cannot create the replication slot {slot}: {e}")),
    }
    let mut out = BytesMut::new();
    let start = format!(
        "START_REPLICATION SLOT {slot} LOGICAL 0/0 (\"include-xids\" '1', \"skip-empty-xacts\" '1')"
    );
    put_message(&mut out, b'Q', &[start.as_bytes(), b"\0"]);
    crate::net::send_all(&mut conn, &out)
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let m = read_message(&mut conn, &mut buf, 1 << 30)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the source closed the connection")?;
        match m.tag {
            b'W' => break,
            b'E' => return Err(error_text(m.body())),
            _ => {}
        }
    }
    stream.set_state("streaming");
    let mut decoder = Decoder::default();
    let mut last_status = Instant::now();
    loop {
        // Bounded: while the applier has not taken enough, the stream waits
        // (answering keepalives so the source keeps the connection).
        while stream.buffered_bytes() > stream.max_bytes {
            stream.set_state("waiting for the applier (buffer full)");
            let freed = stream.freed.notified();
            let _ = tokio::time::timeout(Duration::from_secs(1), freed).await;
            send_status(&mut conn, stream.confirmable(), false).await?;
        }
        let m = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(5), read_message(&mut conn, &mut buf, 1 << 30)) => match r {
                Ok(r) => r
                    .map_err(|e| e.to_string())?
                    .ok_or("the source closed the connection")?,
                Err(_) => {
                    send_status(&mut conn, stream.confirmable(), false).await?;
                    last_status = Instant::now();
                    continue;
                }
            },
            // The applier waits on how far the stream is: ask for a
            // keepalive, which says.
            _ = stream.ping.notified() => {
                send_status(&mut conn, stream.confirmable(), true).await?;
                last_status = Instant::now();
                continue;
            }
        };
        match m.tag {
            b'd' => {
                let body = m.body();
                match body.first() {
                    Some(b'w') if body.len() >= 25 => {
                        let start = u64::from_be_bytes(body[1..9].try_into().unwrap_or_default());
                        let text = String::from_utf8_lossy(&body[25..]);
                        if let Some(t) = decoder.line(start, &text) {
                            stream.push(t);
                        }
                        if decoder.current.is_none() {
                            stream.reached(start);
                        }
                    }
                    Some(b'k') if body.len() >= 18 => {
                        let sent = u64::from_be_bytes(body[1..9].try_into().unwrap_or_default());
                        if decoder.current.is_none() {
                            stream.reached(sent);
                        }
                        if body[17] == 1 {
                            send_status(&mut conn, stream.confirmable(), false).await?;
                            last_status = Instant::now();
                        }
                    }
                    _ => {}
                }
            }
            b'E' => return Err(error_text(m.body())),
            b'c' => return Ok(()),
            _ => {}
        }
        if last_status.elapsed() >= Duration::from_secs(1) {
            send_status(&mut conn, stream.confirmable(), false).await?;
            last_status = Instant::now();
        }
    }
}

fn error_text(body: &[u8]) -> String {
    let f = parse_error_fields(body);
    format!("{} {}", f.code.unwrap_or("?"), f.message.unwrap_or(""))
}

/// Runs a replication command, reading up to its ReadyForQuery.
async fn simple(
    conn: &mut crate::net::Stream,
    buf: &mut BytesMut,
    sql: &str,
) -> Result<(), String> {
    let mut out = BytesMut::new();
    put_message(&mut out, b'Q', &[sql.as_bytes(), b"\0"]);
    crate::net::send_all(conn, &out)
        .await
        .map_err(|e| e.to_string())?;
    let mut err = None;
    loop {
        let m = read_message(conn, buf, 1 << 20)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the source closed the connection")?;
        match m.tag {
            b'E' => err = Some(error_text(m.body())),
            b'Z' => return err.map_or(Ok(()), Err),
            _ => {}
        }
    }
}

/// Standby status update: everything up to `lsn` may go; `reply` asks
/// the source for a keepalive at once.
async fn send_status(conn: &mut crate::net::Stream, lsn: u64, reply: bool) -> Result<(), String> {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
        - 946_684_800_000_000;
    let mut body = BytesMut::with_capacity(34);
    body.put_u8(b'r');
    body.put_u64(lsn);
    body.put_u64(lsn);
    body.put_u64(lsn);
    body.put_i64(micros);
    body.put_u8(reply as u8);
    let mut out = BytesMut::new();
    put_message(&mut out, b'd', &[&body]);
    crate::net::send_all(conn, &out)
        .await
        .map_err(|e| e.to_string())
}

/// Turns `test_decoding` lines into transactions.
#[derive(Default)]
struct Decoder {
    current: Option<Decoded>,
}

impl Decoder {
    /// One line; a whole transaction at its COMMIT.
    fn line(&mut self, lsn: u64, line: &str) -> Option<Decoded> {
        if let Some(x) = line.strip_prefix("BEGIN ") {
            self.current = Some(Decoded {
                xid: x.trim().parse().unwrap_or(0),
                commit_lsn: 0,
                changes: Vec::new(),
                bytes: 64,
                arrived: None,
            });
            return None;
        }
        if line.starts_with("COMMIT") {
            let mut t = self.current.take()?;
            t.commit_lsn = lsn;
            return Some(t);
        }
        let t = self.current.as_mut()?;
        t.bytes += line.len() + 64;
        t.changes.push(parse_change(line));
        None
    }
}

/// `table <schema>.<name>: <ACTION>: <columns>`.
pub fn parse_change(line: &str) -> Change {
    let unusable = || Change::Unusable(format!("cannot apply: {}", truncate(line)));
    let Some(rest) = line.strip_prefix("table ") else {
        // A logical message or something newer: not a row.
        return unusable();
    };
    let Some((table, rest)) = split_identifier_path(rest) else {
        return unusable();
    };
    let Some(rest) = rest.strip_prefix(": ") else {
        return unusable();
    };
    let (action, cols) = match rest.find(": ") {
        Some(i) => (&rest[..i], &rest[i + 2..]),
        None => (rest.trim_end_matches(':'), ""),
    };
    match action {
        "INSERT" => match parse_columns(cols) {
            Some(row) => Change::Insert { table, row },
            None => unusable(),
        },
        "UPDATE" => {
            if let Some(r) = cols.strip_prefix("old-key: ") {
                let Some(i) = r.find(" new-tuple: ") else {
                    return unusable();
                };
                match (parse_columns(&r[..i]), parse_columns(&r[i + 12..])) {
                    (Some(old), Some(row)) => Change::Update {
                        table,
                        old: Some(old),
                        row,
                    },
                    _ => unusable(),
                }
            } else if cols.starts_with("(no-tuple-data)") {
                Change::Unusable(format!("{table} has no replica identity"))
            } else {
                match parse_columns(cols) {
                    Some(row) => Change::Update {
                        table,
                        old: None,
                        row,
                    },
                    None => unusable(),
                }
            }
        }
        "DELETE" => {
            if cols.starts_with("(no-tuple-data)") {
                return Change::Unusable(format!("{table} has no replica identity"));
            }
            match parse_columns(cols) {
                Some(old) => Change::Delete { table, old },
                None => unusable(),
            }
        }
        _ => unusable(),
    }
}

fn truncate(s: &str) -> String {
    crate::mirror::report::truncate(s, 200)
}

/// Reads one SQL identifier (quoted or not) at the start of `s`.
fn identifier(s: &str) -> Option<(&str, &str)> {
    if let Some(r) = s.strip_prefix('"') {
        let mut i = 0;
        let b = r.as_bytes();
        while i < b.len() {
            if b[i] == b'"' {
                if b.get(i + 1) == Some(&b'"') {
                    i += 2;
                    continue;
                }
                return Some((&s[..i + 2], &r[i + 1..]));
            }
            i += 1;
        }
        None
    } else {
        let end = s
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
            .unwrap_or(s.len());
        (end > 0).then(|| (&s[..end], &s[end..]))
    }
}

/// `schema.name` as two identifiers, kept as SQL text.
fn split_identifier_path(s: &str) -> Option<(String, &str)> {
    let (schema, rest) = identifier(s)?;
    let rest = rest.strip_prefix('.')?;
    let (name, rest) = identifier(rest)?;
    Some((format!("{schema}.{name}"), rest))
}

/// `name[type]:value name[type]:value ...`.
fn parse_columns(mut s: &str) -> Option<Vec<Column>> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start_matches(' ');
        if s.is_empty() {
            return Some(out);
        }
        let (name, rest) = identifier(s)?;
        let rest = rest.strip_prefix('[')?;
        // The type ends at the `]:` before the value.
        let end = rest.find("]:")?;
        let rest = &rest[end + 2..];
        let (value, rest) = if let Some(r) = rest.strip_prefix('\'') {
            let mut v = String::new();
            let mut chars = r.char_indices();
            let mut after = None;
            while let Some((i, c)) = chars.next() {
                if c == '\'' {
                    if r[i + 1..].starts_with('\'') {
                        v.push('\'');
                        chars.next();
                        continue;
                    }
                    after = Some(&r[i + 1..]);
                    break;
                }
                v.push(c);
            }
            (Value::Text(v), after?)
        } else if let Some(r) = rest.strip_prefix("B'") {
            let end = r.find('\'')?;
            (Value::Text(r[..end].to_string()), &r[end + 1..])
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            let word = &rest[..end];
            let v = match word {
                "null" => Value::Null,
                "unchanged-toast-datum" => Value::Unchanged,
                w => Value::Text(w.to_string()),
            };
            (v, &rest[end..])
        };
        out.push((name.to_string(), value));
        s = rest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn test_decoding_lines_become_changes() {
        assert_eq!(
            parse_change("table public.t: INSERT: id[integer]:1 note[text]:'it''s' at[timestamp with time zone]:'2026-12-07 03:00:00+00' n[numeric]:null"),
            Change::Insert {
                table: "public.t".into(),
                row: vec![
                    ("id".into(), t("1")),
                    ("note".into(), t("it's")),
                    ("at".into(), t("2026-12-07 03:00:00+00")),
                    ("n".into(), Value::Null),
                ],
            }
        );
        assert_eq!(
            parse_change("table \"My Schema\".\"A \"\"t\"\"\": UPDATE: old-key: id[bigint]:1 new-tuple: id[bigint]:2 \"Big Col\"[text]:unchanged-toast-datum ok[boolean]:true b[bit varying]:B'101' a[integer[]]:'{1,2}'"),
            Change::Update {
                table: "\"My Schema\".\"A \"\"t\"\"\"".into(),
                old: Some(vec![("id".into(), t("1"))]),
                row: vec![
                    ("id".into(), t("2")),
                    ("\"Big Col\"".into(), Value::Unchanged),
                    ("ok".into(), t("true")),
                    ("b".into(), t("101")),
                    ("a".into(), t("{1,2}")),
                ],
            }
        );
        assert_eq!(
            parse_change("table public.t: DELETE: id[integer]:7"),
            Change::Delete {
                table: "public.t".into(),
                old: vec![("id".into(), t("7"))]
            }
        );
        assert!(matches!(
            parse_change("table public.h: DELETE: (no-tuple-data)"),
            Change::Unusable(_)
        ));
        assert!(matches!(
            parse_change("table public.h: TRUNCATE: (no-flags)"),
            Change::Unusable(_)
        ));
        assert!(matches!(
            parse_change("message: transactional: 1 prefix: x, sz: 1 content:y"),
            Change::Unusable(_)
        ));
    }

    #[test]
    fn transactions_are_cut_at_commit() {
        let mut d = Decoder::default();
        assert!(d.line(10, "BEGIN 741").is_none());
        assert!(d
            .line(11, "table public.t: INSERT: id[integer]:1")
            .is_none());
        let tx = d.line(12, "COMMIT 741").unwrap();
        assert_eq!((tx.xid, tx.commit_lsn, tx.changes.len()), (741, 12, 1));
        assert!(tx.usable().is_ok());
    }

    #[test]
    fn a_crowded_buffer_lets_unclaimed_transactions_go_at_once() {
        let s = Stream::new("db", 1000);
        for i in 0..8u32 {
            s.push(Decoded {
                xid: 10 + i,
                commit_lsn: 100 * (u64::from(i) + 1),
                changes: vec![],
                bytes: 100,
                arrived: None,
            });
        }
        // 800 of 1000 bytes: past three quarters, no grace; 13 is claimed.
        s.pass(u64::MAX, |x| x == 13, Duration::from_secs(60));
        let b = s.buffer();
        assert_eq!(b.txns.len(), 1);
        assert!(b.by_xid.contains_key(&13));
    }

    #[tokio::test]
    async fn a_stream_that_moves_is_waited_for_past_wait() {
        let s = Arc::new(Stream::new("db", 1 << 20));
        let feeder = {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                // 1.5 s of progress below where the unit committed, then
                // its transaction: longer than the 1 s `wait`.
                for i in 1..=30u64 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    s.reached(i * 10);
                }
                s.push(Decoded {
                    xid: 20,
                    commit_lsn: 5_000,
                    changes: vec![],
                    bytes: 100,
                    arrived: None,
                });
            })
        };
        let t0 = Instant::now();
        let got = s.take(20, Some(10_000), Duration::from_secs(1)).await;
        assert_eq!(got.map(|t| t.commit_lsn), Some(5_000));
        assert!(t0.elapsed() >= Duration::from_millis(1_500));
        feeder.await.unwrap();
        // Without the source's position nothing bounds the wait: `wait` it is,
        // moving stream or not.
        let feeder = {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                for i in 1..=30u64 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    s.reached(1_000 + i);
                }
            })
        };
        assert!(s.take(21, None, Duration::from_millis(300)).await.is_none());
        feeder.await.unwrap();
    }

    #[tokio::test]
    async fn the_applier_takes_what_it_needs_and_passes_the_rest() {
        let s = Stream::new("db", 1 << 20);
        let tx = |xid: u32, lsn: u64| Decoded {
            xid,
            commit_lsn: lsn,
            changes: vec![],
            bytes: 100,
            arrived: None,
        };
        s.push(tx(5, 100));
        s.push(tx(6, 200));
        s.push(tx(7, 300));
        // xid8 with an epoch: matched on its low 32 bits.
        let got = s.take((1 << 32) | 6, None, Duration::from_millis(10)).await;
        assert_eq!(got.map(|t| t.commit_lsn), Some(200));
        // 5 is still buffered: nothing before it may be confirmed.
        assert_eq!(s.buffer().confirmable, 99);
        // Not yet claimed for long enough: kept.
        s.pass(250, |x| x == 7, Duration::from_secs(60));
        assert_eq!(s.buffer().confirmable, 99);
        s.pass(250, |x| x == 7, Duration::ZERO);
        assert_eq!(s.buffer().confirmable, 299);
        assert!(s.take(8, None, Duration::from_millis(10)).await.is_none());
        // The stream went past where 9 committed without it: no wait.
        s.reached(400);
        let t0 = Instant::now();
        assert!(s
            .take(9, Some(350), Duration::from_secs(30))
            .await
            .is_none());
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(s
            .take(7, Some(350), Duration::from_millis(10))
            .await
            .is_some());
        assert_eq!(s.buffer().confirmable, 300);
        assert!(slot_name("ab12-CD", "app").starts_with("pgshift_ab12cd_"));
    }
}
