//! Postgres csvlog to replay events.
//!
//! Reads a log written with `log_destination = 'csvlog'` and
//! `log_statement = 'all'` (PostgreSQL 13 to 17; older layouts with at least
//! 23 columns read too) and turns the logged statements back into frontend
//! messages, so `pgshift replay --format csvlog FILE` can replay them.
//!
//! What is replayed:
//! - `statement: <sql>` rows (simple query protocol, including psql and
//!   `-M simple` clients) become one `Query` message with the SQL as logged;
//!   a multi-statement string stays one `Query`, as it was sent.
//! - `execute <name>: <sql>` rows (extended protocol, named or unnamed
//!   statements and portals) become `Parse`, `Bind`, `Execute`, `Sync`, all
//!   with the unnamed statement and portal, text-format parameters taken from
//!   the row's `parameters: $1 = '...'` detail, and no row limit. Parameter
//!   types are left for the server to infer, as the log does not name them.
//! - Sessions are told apart by the `session_id` column and numbered 1, 2, 3…
//!   in the order of their first statement. A session's `Start` (with `user`,
//!   `database` and `application_name` from that first statement's row) comes
//!   just before its first message; its `End` comes at its `disconnection:`
//!   row (`log_disconnections = on`), or at the end of the file, at the latest
//!   time seen in it, for sessions still open then.
//! - Times are the `log_time` column, read to the millisecond, as Unix
//!   microseconds of the written wall-clock time: the zone abbreviation is
//!   ignored, as only differences between times matter (a daylight-saving
//!   change inside the log shifts the timing by the offset).
//!
//! What is not replayed, or not as it happened:
//! - Anything that is not in the log. COPY data never is, so a
//!   `COPY ... FROM STDIN` is replayed as its statement alone and the target
//!   waits for data that will not come (`COPY ... TO STDOUT` replays fine);
//!   likewise function-call (`F`) messages and cancel requests.
//! - Rows that are not statements are skipped and counted: connection
//!   received/authorized lines, `duration:` lines (which would double the
//!   statements when `log_min_duration_statement` is set too), `parse` and
//!   `bind` lines, errors and their context, checkpoints, autovacuum, and
//!   `execute fetch from` rows, which continue a suspended portal (the replay
//!   executes every portal to completion in one `Execute`).
//! - Statements are logged before they run, including those that failed, so
//!   statements that failed originally will fail again (and a failure inside
//!   an explicit transaction aborts the rest of it, as it did originally).
//! - Parameters are only as good as the log: with `log_parameter_max_length`
//!   set they may be truncated (`'abc...'`), and with it at 0 they are absent,
//!   so the `Bind` carries none and fails. Binary parameters are logged, and
//!   so replayed, in text form.
//! - Pipelining and transaction boundaries of the extended protocol: each
//!   `execute` is followed by its own `Sync`, so statements that a client
//!   pipelined under one `Sync` outside an explicit transaction each commit
//!   on their own.
//! - The messages must be in English (`lc_messages = 'C'` or `en_*`): a
//!   translated `statement:` prefix is not recognised. Without
//!   `log_disconnections` every session stays open to the end of the file.
//!   Rotated files are one stream: concatenate them in order.
//!
//! The SQL and parameter bytes are passed through as they are in the file
//! (the encoding of each row's database), never re-encoded.
//!
//! The file is streamed one row at a time; memory is bounded by the open
//! sessions (one map entry each) and the largest row.

use std::collections::{HashMap, VecDeque};
use std::io::Read;

use bytes::{BufMut, Bytes, BytesMut};

use super::source::Event;

/// Columns of a csvlog row (PostgreSQL 13 to 17 layout; 14 and later add
/// more after `application_name`).
const COL_LOG_TIME: usize = 0;
const COL_USER: usize = 1;
const COL_DATABASE: usize = 2;
const COL_SESSION_ID: usize = 5;
const COL_SEVERITY: usize = 11;
const COL_MESSAGE: usize = 13;
const COL_DETAIL: usize = 14;
const COL_APPLICATION: usize = 22;
/// A csvlog row has at least this many fields (`application_name` included).
const MIN_FIELDS: usize = COL_APPLICATION + 1;

/// The most parameters a `Bind` can carry (its count is 16 bits).
const MAX_PARAMS: usize = u16::MAX as usize;

/// A row that could not be read. `line` is the line of the file where the
/// row (record) starts; a row can span several lines.
#[derive(Debug, thiserror::Error)]
pub enum CsvlogError {
    #[error("{file}, line {line}: cannot read csv: {source}")]
    Csv {
        file: String,
        line: u64,
        source: csv::Error,
    },
    #[error("{file}, line {line}: row has {fields} fields, a csvlog row has at least 23")]
    ShortRow {
        file: String,
        line: u64,
        fields: usize,
    },
    #[error("{file}, line {line}: malformed log_time {value:?}")]
    BadTime {
        file: String,
        line: u64,
        value: String,
    },
    #[error("{file}, line {line}: malformed parameters: {reason}")]
    BadParameters {
        file: String,
        line: u64,
        reason: String,
    },
    #[error("{file}, line {line}: statement too large for a protocol message")]
    TooLarge { file: String, line: u64 },
}

/// Reads a csvlog file and yields replay events in file order.
pub struct CsvlogReader<R: Read> {
    csv: csv::Reader<R>,
    file: String,
    record: csv::ByteRecord,
    /// Events of the last row read (or the final `End`s), not yet returned.
    pending: VecDeque<Event>,
    /// Open sessions that have had statements: session_id → number.
    open: HashMap<Vec<u8>, u64>,
    next_session: u64,
    /// The latest log_time seen, for the `End`s at the end of the file.
    last_us: u64,
    rows: u64,
    skipped: u64,
    eof: bool,
}

impl<R: Read> CsvlogReader<R> {
    /// Reads the csvlog `rd`; `file` names it in errors.
    pub fn new(rd: R, file: impl Into<String>) -> Self {
        let csv = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(rd);
        CsvlogReader {
            csv,
            file: file.into(),
            record: csv::ByteRecord::new(),
            pending: VecDeque::new(),
            open: HashMap::new(),
            next_session: 1,
            last_us: 0,
            rows: 0,
            skipped: 0,
            eof: false,
        }
    }

    /// Next event in file order; None at the end (after the End events of
    /// sessions still open).
    ///
    /// After an error the reader carries on with the next row if called again.
    pub fn next_event(&mut self) -> Result<Option<Event>, CsvlogError> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(Some(ev));
            }
            if self.eof {
                return Ok(None);
            }
            let before = self.csv.position().line();
            let mut record = std::mem::take(&mut self.record);
            let read = self.csv.read_byte_record(&mut record);
            let result = match read {
                Ok(true) => {
                    self.rows += 1;
                    let line = record.position().map_or(before, |p| p.line());
                    self.row(&record, line)
                }
                Ok(false) => {
                    self.eof = true;
                    self.close_all();
                    Ok(())
                }
                Err(source) => {
                    let line = source.position().map_or(before, |p| p.line());
                    Err(CsvlogError::Csv {
                        file: self.file.clone(),
                        line,
                        source,
                    })
                }
            };
            self.record = record;
            result?;
        }
    }

    /// Rows read so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Rows read so far that gave no event: everything but statements and the
    /// disconnections of sessions that had statements.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Turns one row into events on `pending`.
    fn row(&mut self, rec: &csv::ByteRecord, line: u64) -> Result<(), CsvlogError> {
        if rec.len() < MIN_FIELDS {
            return Err(CsvlogError::ShortRow {
                file: self.file.clone(),
                line,
                fields: rec.len(),
            });
        }
        let time = field(rec, COL_LOG_TIME);
        let at_us = parse_log_time(time).ok_or_else(|| CsvlogError::BadTime {
            file: self.file.clone(),
            line,
            value: String::from_utf8_lossy(time).into_owned(),
        })?;
        self.last_us = self.last_us.max(at_us);

        if field(rec, COL_SEVERITY) != b"LOG" {
            self.skipped += 1;
            return Ok(());
        }
        let message = field(rec, COL_MESSAGE);
        if let Some(sql) = message.strip_prefix(b"statement: ") {
            let frame = query_frame(sql).ok_or_else(|| self.too_large(line))?;
            let session = self.session(rec, at_us);
            self.pending.push_back(Event::Message {
                session,
                at_us,
                frame,
            });
        } else if message.starts_with(b"execute fetch from ") {
            self.skipped += 1;
        } else if let Some(sql) = message
            .strip_prefix(b"execute ")
            .and_then(|rest| split_once(rest, b": "))
            .map(|(_name, sql)| sql)
        {
            let params = parse_parameters(field(rec, COL_DETAIL)).map_err(|reason| {
                CsvlogError::BadParameters {
                    file: self.file.clone(),
                    line,
                    reason,
                }
            })?;
            let frames = extended_frames(sql, &params).ok_or_else(|| self.too_large(line))?;
            let session = self.session(rec, at_us);
            for frame in frames {
                self.pending.push_back(Event::Message {
                    session,
                    at_us,
                    frame,
                });
            }
        } else if message.starts_with(b"disconnection: ") {
            match self.open.remove(field(rec, COL_SESSION_ID)) {
                Some(session) => self.pending.push_back(Event::End { session, at_us }),
                None => self.skipped += 1,
            }
        } else {
            self.skipped += 1;
        }
        Ok(())
    }

    /// The number of the row's session, opening it (queueing its `Start`)
    /// if this is its first statement.
    fn session(&mut self, rec: &csv::ByteRecord, at_us: u64) -> u64 {
        let id = field(rec, COL_SESSION_ID);
        if let Some(&n) = self.open.get(id) {
            return n;
        }
        let session = self.next_session;
        self.next_session += 1;
        self.open.insert(id.to_vec(), session);
        let params = [
            ("user", COL_USER),
            ("database", COL_DATABASE),
            ("application_name", COL_APPLICATION),
        ]
        .into_iter()
        .filter_map(|(name, col)| {
            let value = field(rec, col);
            (!value.is_empty()).then(|| {
                (
                    name.to_string(),
                    String::from_utf8_lossy(value).into_owned(),
                )
            })
        })
        .collect();
        self.pending.push_back(Event::Start {
            session,
            at_us,
            params,
        });
        session
    }

    /// Queues the `End` of every session still open, in order of first
    /// statement, at the latest time seen.
    fn close_all(&mut self) {
        let mut open: Vec<u64> = self.open.drain().map(|(_, n)| n).collect();
        open.sort_unstable();
        let at_us = self.last_us;
        self.pending.extend(
            open.into_iter()
                .map(|session| Event::End { session, at_us }),
        );
    }

    fn too_large(&self, line: u64) -> CsvlogError {
        CsvlogError::TooLarge {
            file: self.file.clone(),
            line,
        }
    }
}

fn field(rec: &csv::ByteRecord, col: usize) -> &[u8] {
    rec.get(col).unwrap_or_default()
}

fn split_once<'a>(s: &'a [u8], sep: &[u8]) -> Option<(&'a [u8], &'a [u8])> {
    let at = s.windows(sep.len()).position(|w| w == sep)?;
    Some((s.get(..at)?, s.get(at + sep.len()..)?))
}

/// Parses `YYYY-MM-DD HH:MM:SS[.fraction][ ZONE]` into Unix microseconds of
/// that wall-clock time, ignoring the zone. Years 1970 to 9999.
fn parse_log_time(s: &[u8]) -> Option<u64> {
    let mut p = Cursor(s);
    let year = p.digits(4)?;
    p.byte(b'-')?;
    let month = p.digits(2)?;
    p.byte(b'-')?;
    let day = p.digits(2)?;
    p.byte(b' ')?;
    let hour = p.digits(2)?;
    p.byte(b':')?;
    let minute = p.digits(2)?;
    p.byte(b':')?;
    let second = p.digits(2)?;
    let mut micros = 0;
    if p.byte(b'.').is_some() {
        let n = p.0.iter().take_while(|b| b.is_ascii_digit()).count();
        if !(1..=6).contains(&n) {
            return None;
        }
        micros = p.digits(n)? * 10u64.pow((6 - n) as u32);
    }
    // The zone, if any, follows a space; it is not needed.
    if !(p.0.is_empty() || p.0.first() == Some(&b' ')) {
        return None;
    }
    if !(1970..=9999).contains(&year)
        || !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let seconds = ((days * 24 + hour) * 60 + minute) * 60 + second;
    Some(seconds * 1_000_000 + micros)
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn byte(&mut self, b: u8) -> Option<()> {
        let rest = self.0.strip_prefix(&[b])?;
        self.0 = rest;
        Some(())
    }

    /// Exactly `n` ASCII digits as a number.
    fn digits(&mut self, n: usize) -> Option<u64> {
        let (num, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        let mut v = 0u64;
        for &b in num {
            if !b.is_ascii_digit() {
                return None;
            }
            v = v * 10 + u64::from(b - b'0');
        }
        self.0 = rest;
        Some(v)
    }
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a valid date on or after it (Howard Hinnant's
/// `days_from_civil`, for years from 1970 only).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses an execute row's detail, `parameters: $1 = '42', $2 = NULL, ...`
/// (values quoted with doubled quotes, NULL bare), into the values in order.
/// An empty detail, or one that is not a parameter list, means none.
fn parse_parameters(detail: &[u8]) -> Result<Vec<Option<Vec<u8>>>, String> {
    let Some(mut s) = detail.strip_prefix(b"parameters: ") else {
        return Ok(Vec::new());
    };
    let mut params = Vec::new();
    loop {
        let n = params.len() + 1;
        if n > MAX_PARAMS {
            return Err(format!("more than {MAX_PARAMS} parameters"));
        }
        let name = format!("${n} = ");
        s = s
            .strip_prefix(name.as_bytes())
            .ok_or_else(|| format!("expected `{name}` at {:?}", excerpt(s)))?;
        if let Some(rest) = s.strip_prefix(b"NULL") {
            params.push(None);
            s = rest;
        } else if let Some(rest) = s.strip_prefix(b"'") {
            let mut value = Vec::new();
            let mut i = 0;
            loop {
                match (rest.get(i), rest.get(i + 1)) {
                    (None, _) => return Err(format!("unterminated value of ${n}")),
                    (Some(b'\''), Some(b'\'')) => {
                        value.push(b'\'');
                        i += 2;
                    }
                    (Some(b'\''), _) => {
                        i += 1;
                        break;
                    }
                    (Some(&c), _) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
            params.push(Some(value));
            s = rest.get(i..).unwrap_or_default();
        } else {
            return Err(format!(
                "expected a quoted value or NULL for ${n} at {:?}",
                excerpt(s)
            ));
        }
        if s.is_empty() {
            return Ok(params);
        }
        s = s
            .strip_prefix(b", ")
            .ok_or_else(|| format!("expected `, ` after ${n} at {:?}", excerpt(s)))?;
    }
}

fn excerpt(s: &[u8]) -> String {
    String::from_utf8_lossy(s.get(..20).unwrap_or(s)).into_owned()
}

/// A message being built: tag and a length word to fill in.
fn message(tag: u8, body: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(body.saturating_add(5));
    buf.put_u8(tag);
    buf.put_i32(0);
    buf
}

/// Fills in the length word; None if the message is too large.
fn finish(mut buf: BytesMut) -> Option<Bytes> {
    let len = i32::try_from(buf.len().checked_sub(1)?).ok()?;
    buf.get_mut(1..5)?.copy_from_slice(&len.to_be_bytes());
    Some(buf.freeze())
}

/// `Query`: the SQL, NUL-terminated.
fn query_frame(sql: &[u8]) -> Option<Bytes> {
    let mut q = message(b'Q', sql.len() + 1);
    q.put_slice(sql);
    q.put_u8(0);
    finish(q)
}

/// `Parse`, `Bind`, `Execute`, `Sync` for one execution, all unnamed, with
/// text parameters and results.
fn extended_frames(sql: &[u8], params: &[Option<Vec<u8>>]) -> Option<[Bytes; 4]> {
    let mut parse = message(b'P', sql.len() + 4);
    parse.put_u8(0); // unnamed statement
    parse.put_slice(sql);
    parse.put_u8(0);
    parse.put_i16(0); // no parameter types: inferred
    let parse = finish(parse)?;

    let values: usize = params
        .iter()
        .map(|p| 4 + p.as_ref().map_or(0, Vec::len))
        .sum();
    let mut bind = message(b'B', values + 8);
    bind.put_u8(0); // unnamed portal
    bind.put_u8(0); // unnamed statement
    bind.put_i16(0); // all parameters text
    bind.put_u16(u16::try_from(params.len()).ok()?);
    for p in params {
        match p {
            Some(v) => {
                bind.put_i32(i32::try_from(v.len()).ok()?);
                bind.put_slice(v);
            }
            None => bind.put_i32(-1),
        }
    }
    bind.put_i16(0); // all results text
    let bind = finish(bind)?;

    let mut execute = message(b'E', 5);
    execute.put_u8(0); // unnamed portal
    execute.put_i32(0); // all rows
    let execute = finish(execute)?;

    let sync = finish(message(b'S', 0))?;
    Some([parse, bind, execute, sync])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../../tests/fixtures/csvlog/pg15-sample.csv");

    /// A csv field, quoted the way csvlog quotes text.
    fn quote(s: &str) -> String {
        format!("\"{}\"", s.replace('"', "\"\""))
    }

    /// A PostgreSQL 15 csvlog row of a client backend.
    fn row(time: &str, session: &str, severity: &str, message: &str, detail: &str) -> String {
        let detail = if detail.is_empty() {
            String::new()
        } else {
            quote(detail)
        };
        format!(
            "{time},\"alice\",\"shop\",4242,\"10.0.0.7:50000\",{session},3,\"idle\",\
             2026-11-22 10:00:00 UTC,3/7,0,{severity},00000,{},{detail},,,,,,,,\
             \"app\",\"client backend\",,0\n",
            quote(message)
        )
    }

    fn read_all(text: &str) -> Vec<Event> {
        let mut rd = CsvlogReader::new(text.as_bytes(), "test.csv");
        let mut events = Vec::new();
        while let Some(ev) = rd.next_event().unwrap() {
            events.push(ev);
        }
        events
    }

    fn frames(events: &[Event]) -> Vec<(u64, Bytes)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Message { session, frame, .. } => Some((*session, frame.clone())),
                _ => None,
            })
            .collect()
    }

    fn query(sql: &str) -> Bytes {
        query_frame(sql.as_bytes()).unwrap()
    }

    #[test]
    fn log_time_parsed_to_unix_micros() {
        assert_eq!(
            parse_log_time(b"2026-11-22 10:00:00.123 UTC"),
            Some(1_795_341_600_123_000)
        );
        assert_eq!(
            parse_log_time(b"2000-02-29 23:59:59.999 CET"),
            Some(951_868_799_999_000)
        );
        assert_eq!(parse_log_time(b"1970-01-01 00:00:01.5"), Some(1_500_000));
        assert_eq!(parse_log_time(b"1970-01-01 00:00:01 +03"), Some(1_000_000));
        for bad in [
            &b""[..],
            b"garbage",
            b"2026-13-01 00:00:00.000 UTC",
            b"2026-02-29 00:00:00.000 UTC",
            b"2026-11-22 24:00:00.000 UTC",
            b"2026-11-22 10:00:00.1234567 UTC",
            b"2026-11-22 10:00:00.",
            b"2026-11-22T10:00:00.000",
            b"2026-11-22 10:00:00.000UTC",
            b"1969-12-31 23:59:59.000 UTC",
            b"2026-1-22 10:00:00.000 UTC",
        ] {
            assert_eq!(
                parse_log_time(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn parameters_quotes_null_commas_newlines() {
        let detail = "parameters: $1 = '42', $2 = NULL, $3 = 'it''s', \
                      $4 = 'a, $5 = ''x'', b\nnext line', $5 = '', $6 = 'NULL'";
        let params = parse_parameters(detail.as_bytes()).unwrap();
        let want: Vec<Option<Vec<u8>>> = vec![
            Some(b"42".to_vec()),
            None,
            Some(b"it's".to_vec()),
            Some(b"a, $5 = 'x', b\nnext line".to_vec()),
            Some(Vec::new()),
            Some(b"NULL".to_vec()),
        ];
        assert_eq!(params, want);
        assert_eq!(parse_parameters(b""), Ok(Vec::new()));
        assert_eq!(parse_parameters(b"something else"), Ok(Vec::new()));
    }

    #[test]
    fn parameters_malformed_are_errors() {
        for bad in [
            "parameters: $2 = '1'",
            "parameters: $1 = '1', $3 = '2'",
            "parameters: $1 = 'unterminated",
            "parameters: $1 = 42",
            "parameters: $1 = '1' $2 = '2'",
            "parameters: $1 = '1',",
            "parameters: ",
        ] {
            assert!(parse_parameters(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn extended_frames_byte_exact() {
        let text = row(
            "2026-11-22 10:00:00.500 UTC",
            "6b031f58.222d",
            "LOG",
            "execute P_1: UPDATE t SET a = a + $1 WHERE id = $2 AND b IS $3",
            "parameters: $1 = '-32', $2 = '9862', $3 = NULL",
        );
        let events = read_all(&text);
        let sql = b"UPDATE t SET a = a + $1 WHERE id = $2 AND b IS $3";

        let mut parse = vec![b'P'];
        parse.extend_from_slice(&(4 + 1 + sql.len() as i32 + 1 + 2).to_be_bytes());
        parse.push(0);
        parse.extend_from_slice(sql);
        parse.extend_from_slice(&[0, 0, 0]);

        let bind: &[u8] = &[
            b'B', 0, 0, 0, 31, // length
            0, 0, // portal, statement
            0, 0, // no parameter format codes: text
            0, 3, // 3 parameters
            0, 0, 0, 3, b'-', b'3', b'2', //
            0, 0, 0, 4, b'9', b'8', b'6', b'2', //
            0xff, 0xff, 0xff, 0xff, // NULL
            0, 0, // no result format codes: text
        ];
        let execute: &[u8] = &[b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0];
        let sync: &[u8] = &[b'S', 0, 0, 0, 4];

        let at_us = 1_795_341_600_500_000;
        assert_eq!(
            events,
            vec![
                Event::Start {
                    session: 1,
                    at_us,
                    params: vec![
                        ("user".into(), "alice".into()),
                        ("database".into(), "shop".into()),
                        ("application_name".into(), "app".into()),
                    ],
                },
                Event::Message {
                    session: 1,
                    at_us,
                    frame: Bytes::from(parse)
                },
                Event::Message {
                    session: 1,
                    at_us,
                    frame: Bytes::copy_from_slice(bind)
                },
                Event::Message {
                    session: 1,
                    at_us,
                    frame: Bytes::copy_from_slice(execute)
                },
                Event::Message {
                    session: 1,
                    at_us,
                    frame: Bytes::copy_from_slice(sync)
                },
                Event::End { session: 1, at_us },
            ]
        );
    }

    #[test]
    fn execute_without_detail_has_no_parameters() {
        let text = row(
            "2026-11-22 10:00:00.500 UTC",
            "s1",
            "LOG",
            "execute <unnamed>: BEGIN",
            "",
        );
        let f = frames(&read_all(&text));
        assert_eq!(f.len(), 4);
        assert_eq!(&f[0].1[..], b"P\0\0\0\x0d\0BEGIN\0\0\0");
        assert_eq!(&f[1].1[..], b"B\0\0\0\x0c\0\0\0\0\0\0\0\0");
    }

    #[test]
    fn fetch_from_and_other_rows_skipped() {
        let t = "2026-11-22 10:00:00.000 UTC";
        let text = [
            row(
                t,
                "s1",
                "LOG",
                "connection authorized: user=alice database=shop",
                "",
            ),
            row(t, "s1", "LOG", "execute S_1/C_2: SELECT * FROM big", ""),
            row(
                t,
                "s1",
                "LOG",
                "execute fetch from S_1/C_2: SELECT * FROM big",
                "",
            ),
            row(
                t,
                "s1",
                "LOG",
                "duration: 0.120 ms  statement: SELECT 1",
                "",
            ),
            row(t, "s1", "ERROR", "relation \"nope\" does not exist", ""),
            row(t, "s1", "LOG", "execute", ""),
            row(
                t,
                "s2",
                "LOG",
                "disconnection: session time: 0:00:00.001",
                "",
            ),
        ]
        .concat();
        let mut rd = CsvlogReader::new(text.as_bytes(), "test.csv");
        let mut events = Vec::new();
        while let Some(ev) = rd.next_event().unwrap() {
            events.push(ev);
        }
        // Start, P, B, E, S, and the End at end of file.
        assert_eq!(events.len(), 6);
        assert_eq!(frames(&events).len(), 4);
        assert!(matches!(events[5], Event::End { session: 1, .. }));
        assert_eq!(rd.rows(), 7);
        assert_eq!(rd.skipped(), 6);
    }

    #[test]
    fn multi_line_statement_and_quotes() {
        let events = read_all(SAMPLE);
        let f = frames(&events);
        let multi =
            "select n,\n       n * 2 as doubled\n  from generate_series(1, 3) as n\n where n > 1;";
        assert!(f.iter().any(|(_, q)| *q == query(multi)));
        assert!(f
            .iter()
            .any(|(_, q)| *q == query("select 'it''s a quote' as q, 42 as \"answer\";")));
        let insert = "insert into notes values (1, 'line one\nline two, with \"double quotes\" and a comma');";
        assert!(f.iter().any(|(_, q)| *q == query(insert)));
    }

    #[test]
    fn sample_sessions_numbered_and_paired() {
        let mut rd = CsvlogReader::new(SAMPLE.as_bytes(), "pg15-sample.csv");
        let mut events = Vec::new();
        while let Some(ev) = rd.next_event().unwrap() {
            events.push(ev);
        }
        assert_eq!(rd.rows(), 221);
        let messages = events
            .iter()
            .filter(|e| matches!(e, Event::Message { .. }))
            .count() as u64;

        // Sessions start in order 1, 2, 3..., each before its messages, and
        // end exactly once, after them.
        let mut started = Vec::new();
        let mut ended = Vec::new();
        for ev in &events {
            match ev {
                Event::Start {
                    session, params, ..
                } => {
                    assert_eq!(*session, started.len() as u64 + 1);
                    assert!(params.iter().any(|(k, v)| k == "user" && v == "postgres"));
                    started.push(*session);
                }
                Event::Message { session, .. } => {
                    assert!(started.contains(session) && !ended.contains(session));
                }
                Event::End { session, .. } => {
                    assert!(started.contains(session) && !ended.contains(session));
                    ended.push(*session);
                }
            }
        }
        // createdb, psql, pgbench -i, and per mode the setup session and two
        // clients.
        assert_eq!(started.len(), 12);
        ended.sort_unstable();
        assert_eq!(ended, started);
        // Every row but the statements (one row per Query, four messages
        // per execute) and the 12 disconnections is skipped.
        let queries = frames(&events).iter().filter(|(_, f)| f[0] == b'Q').count() as u64;
        let executes = (messages - queries) / 4;
        assert_eq!(rd.skipped(), rd.rows() - queries - executes - 12);

        let first = &events[0];
        assert_eq!(
            first,
            &Event::Start {
                session: 1,
                at_us: parse_log_time(b"2026-11-22 16:59:00.262").unwrap(),
                params: vec![
                    ("user".into(), "postgres".into()),
                    ("database".into(), "postgres".into()),
                    ("application_name".into(), "createdb".into()),
                ],
            }
        );

        // All three pgbench modes are there: simple (two clients sending
        // Query with literals), extended and prepared (two clients each,
        // logged as `execute <unnamed>` and `execute P_n`, replayed alike).
        let f = frames(&events);
        let sessions_with = |tag: u8, text: &[u8]| {
            let mut s: Vec<u64> = f
                .iter()
                .filter(|(_, fr)| fr[0] == tag && fr.windows(text.len()).any(|w| w == text))
                .map(|(n, _)| *n)
                .collect();
            s.sort_unstable();
            s.dedup();
            s.len()
        };
        assert_eq!(
            sessions_with(b'Q', b"UPDATE pgbench_accounts SET abalance = abalance + "),
            2
        );
        assert_eq!(sessions_with(b'P', b"abalance + $1 WHERE aid = $2;"), 4);
        assert_eq!(sessions_with(b'B', b"\0\0"), 4);
        // COPY FROM STDIN is replayed as its statement alone.
        assert!(f
            .iter()
            .any(|(_, fr)| *fr == query("copy pgbench_accounts from stdin with (freeze on)")));

        // Times are in file order per session and never run backwards past
        // the End.
        let mut last: HashMap<u64, u64> = HashMap::new();
        for ev in &events {
            let prev = last.insert(ev.session(), ev.at_us()).unwrap_or(0);
            assert!(ev.at_us() >= prev);
        }
    }

    #[test]
    fn open_sessions_end_at_eof_in_order() {
        let text = [
            row(
                "2026-11-22 10:00:01.000 UTC",
                "b",
                "LOG",
                "statement: SELECT 1",
                "",
            ),
            row(
                "2026-11-22 10:00:02.000 UTC",
                "a",
                "LOG",
                "statement: SELECT 2",
                "",
            ),
            row(
                "2026-11-22 10:00:03.000 UTC",
                "c",
                "LOG",
                "statement: SELECT 3",
                "",
            ),
            row(
                "2026-11-22 10:00:04.000 UTC",
                "c",
                "LOG",
                "disconnection: session time: 0:00:03.000",
                "",
            ),
            row(
                "2026-11-22 10:00:05.000 UTC",
                "b",
                "LOG",
                "statement: SELECT 4",
                "",
            ),
            row(
                "2026-11-22 10:00:09.250 UTC",
                "",
                "LOG",
                "checkpoint starting: time",
                "",
            ),
        ]
        .concat();
        let events = read_all(&text);
        let base = parse_log_time(b"2026-11-22 10:00:00.000").unwrap();
        let ends: Vec<(u64, u64)> = events
            .iter()
            .filter_map(|e| match e {
                Event::End { session, at_us } => Some((*session, at_us - base)),
                _ => None,
            })
            .collect();
        // b is 1, a is 2, c is 3 (ended by its disconnection).
        assert_eq!(ends, vec![(3, 4_000_000), (1, 9_250_000), (2, 9_250_000)]);
        let f = frames(&events);
        assert_eq!(f.last(), Some(&(1, query("SELECT 4"))));
    }

    #[test]
    fn session_reopened_after_disconnection_gets_new_number() {
        let t = "2026-11-22 10:00:00.000 UTC";
        let text = [
            row(t, "a", "LOG", "statement: SELECT 1", ""),
            row(
                t,
                "a",
                "LOG",
                "disconnection: session time: 0:00:00.001",
                "",
            ),
            row(t, "a", "LOG", "statement: SELECT 2", ""),
        ]
        .concat();
        let sessions: Vec<u64> = read_all(&text).iter().map(Event::session).collect();
        assert_eq!(sessions, vec![1, 1, 1, 2, 2, 2]);
    }

    #[test]
    fn short_row_is_an_error_naming_the_line() {
        let text = format!(
            "{}{}2026-11-22 10:00:02.000 UTC,\"alice\",\"shop\",4242\n",
            row(
                "2026-11-22 10:00:00.000 UTC",
                "a",
                "LOG",
                "statement: SELECT\n1",
                ""
            ),
            row(
                "2026-11-22 10:00:01.000 UTC",
                "a",
                "LOG",
                "statement: SELECT 2",
                ""
            ),
        );
        let mut rd = CsvlogReader::new(text.as_bytes(), "prod.csv");
        let mut events = 0;
        let err = loop {
            match rd.next_event() {
                Ok(Some(_)) => events += 1,
                Ok(None) => panic!("no error"),
                Err(e) => break e,
            }
        };
        assert_eq!(events, 3);
        assert!(matches!(
            err,
            CsvlogError::ShortRow {
                line: 4,
                fields: 4,
                ..
            }
        ));
        let msg = err.to_string();
        assert!(msg.contains("prod.csv") && msg.contains("line 4"), "{msg}");
        // The reader carries on after the error.
        assert!(matches!(
            rd.next_event(),
            Ok(Some(Event::End { session: 1, .. }))
        ));
        assert!(matches!(rd.next_event(), Ok(None)));
    }

    #[test]
    fn bad_time_is_an_error_naming_the_line() {
        let text = [
            row(
                "2026-11-22 10:00:00.000 UTC",
                "a",
                "LOG",
                "checkpoint\nstarting",
                "",
            ),
            row(
                "2026-11-22 25:00:00.000 UTC",
                "a",
                "LOG",
                "statement: SELECT 1",
                "",
            ),
        ]
        .concat();
        let mut rd = CsvlogReader::new(text.as_bytes(), "prod.csv");
        let err = rd.next_event().unwrap_err();
        assert!(matches!(err, CsvlogError::BadTime { line: 3, .. }));
        let msg = err.to_string();
        assert!(msg.contains("prod.csv") && msg.contains("line 3"), "{msg}");
        assert!(msg.contains("25:00:00"), "{msg}");
    }

    #[test]
    fn bad_parameters_is_an_error_naming_the_line() {
        let text = row(
            "2026-11-22 10:00:00.000 UTC",
            "a",
            "LOG",
            "execute <unnamed>: SELECT $1",
            "parameters: $1 = 'oops",
        );
        let err = CsvlogReader::new(text.as_bytes(), "prod.csv")
            .next_event()
            .unwrap_err();
        assert!(matches!(err, CsvlogError::BadParameters { line: 1, .. }));
        assert!(err.to_string().starts_with("prod.csv, line 1: "), "{err}");
    }

    #[test]
    fn junk_input_never_panics() {
        let mut inputs: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"\n\n\n".to_vec(),
            b"\"unterminated".to_vec(),
            vec![0xff, 0xfe, b',', b'"', 0, b'\n'],
        ];
        // Every prefix of the sample, and a few byte flips.
        let sample = SAMPLE.as_bytes();
        for cut in (0..sample.len()).step_by(997) {
            inputs.push(sample[..cut].to_vec());
            let mut flipped = sample.to_vec();
            flipped[cut] ^= 0x55;
            inputs.push(flipped);
        }
        for input in inputs {
            let mut rd = CsvlogReader::new(&input[..], "junk.csv");
            for _ in 0..100_000 {
                if let Ok(None) = rd.next_event() {
                    break;
                }
            }
        }
    }
}
