//! The statement classifier shared by mirroring and routing.
//!
//! For every statement the proxy sees (each statement of a simple-protocol
//! string, each Parse text, each PREPARE body) it answers: read, write,
//! lock, transaction control or session state. The answer on the hot path
//! comes from a lexical pass (`lexer`) for the shapes it can judge with
//! certainty; everything else goes to the real Postgres grammar (libpg_query,
//! `parser`), whose answers are cached per statement text. The corpus tests
//! below check that the two agree wherever the lexical pass answers.
//!
//! Anything neither can classify is a write: mirroring an unneeded statement
//! costs little, missing a write loses data.

pub mod analyze;
pub mod lexer;
mod parser;
pub mod reads;

use std::collections::HashMap;
use std::sync::Arc;

use lexer::Token;
pub use reads::{Reads, Scope};

/// What one statement does, as far as mirroring and routing care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// Reads only: may be routed when its scope is table data (see
    /// `reads`), is mirrored only inside a write transaction or when a
    /// function it calls turns out to have written.
    Read(Reads),
    /// Changes data, schema, sequences or anything a target must repeat.
    Write,
    /// Takes locks without writing (`SELECT ... FOR UPDATE`, `LOCK`,
    /// advisory locks): never routed, mirrored only inside a write
    /// transaction.
    Lock,
    /// `BEGIN` / `START TRANSACTION`.
    Begin { read_only: bool },
    /// `COMMIT`, `ROLLBACK`, savepoints, `SET TRANSACTION`, two-phase commit.
    TxnControl,
    /// Changes session state the mirror must reproduce.
    Session(SessionOp),
    /// `EXECUTE name`: whatever `name`'s PREPARE body is.
    Execute { name: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionOp {
    /// `SET`, `SET SESSION ...`, `SET ROLE`, `RESET name`.
    Set,
    /// `SET LOCAL`: lasts only until the end of the transaction.
    SetLocal,
    /// `RESET ALL`.
    ResetAll,
    /// `DISCARD ALL | TEMP | PLANS | SEQUENCES`.
    Discard { all: bool, temp: bool },
    /// `PREPARE name AS body`.
    Prepare { name: String, body: Box<Class> },
    /// `DEALLOCATE name`, or all of them (`None`).
    Deallocate { name: Option<String> },
    /// `LISTEN` / `UNLISTEN` / `LOAD`: session state that must stay on the
    /// source and is not mirrored.
    SourceOnly,
}

impl Class {
    /// A read of table data that calls nothing unknown.
    pub const READ: Class = Class::Read(Reads::DATA);

    /// Whether the target must run this statement even outside a write
    /// transaction.
    pub fn is_write(&self) -> bool {
        matches!(self, Class::Write)
    }

    /// A read any server with the same data answers the same way.
    pub fn is_portable_read(&self) -> bool {
        matches!(self, Class::Read(r) if r.scope == Scope::Data)
    }
}

/// Functions whose call makes a SELECT a write (sequences, large objects,
/// notifications, session settings) or a lock.
const WRITE_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "set_config",
    "pg_notify",
    "lo_create",
    "lo_creat",
    "lo_import",
    "lo_unlink",
    "lo_put",
    "lo_from_bytea",
    "lowrite",
    "lo_truncate",
    "lo_truncate64",
    "dblink_exec",
    "pg_logical_emit_message",
];

fn is_lock_function(name: &str) -> bool {
    name.starts_with("pg_advisory") || name.starts_with("pg_try_advisory")
}

/// Whether `sql` holds one of `words` (lower-case ASCII) as a whole word,
/// in any case: a cheap pre-check before classifying, run on every
/// statement while routing links are open. Jumps with `memchr` between the
/// places the words' first letters occur (when they have at most three
/// first bytes, both cases counted), and compares only there.
pub fn mentions_word(sql: &[u8], words: &[&[u8]]) -> bool {
    let mut firsts = [0u8; 3];
    let mut n = 0;
    for w in words {
        let Some(&c) = w.first() else { continue };
        for b in [c.to_ascii_lowercase(), c.to_ascii_uppercase()] {
            if !firsts[..n.min(3)].contains(&b) {
                if n < 3 {
                    firsts[n] = b;
                }
                n += 1;
            }
        }
    }
    let at = |i: usize| word_at(sql, i, words);
    match n {
        0 => false,
        1 => memchr::memchr_iter(firsts[0], sql).any(at),
        2 => memchr::memchr2_iter(firsts[0], firsts[1], sql).any(at),
        3 => memchr::memchr3_iter(firsts[0], firsts[1], firsts[2], sql).any(at),
        _ => (0..sql.len()).any(at),
    }
}

fn is_word_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Whether one of `words` starts a word at `i` and ends there too.
fn word_at(sql: &[u8], i: usize, words: &[&[u8]]) -> bool {
    let starts = sql[i].is_ascii_alphabetic() && (i == 0 || !is_word_byte(sql[i - 1]));
    starts
        && words.iter().any(|w| {
            sql.get(i..i + w.len())
                .is_some_and(|s| s.eq_ignore_ascii_case(w))
                && sql.get(i + w.len()).is_none_or(|&c| !is_word_byte(c))
        })
}

/// The first word of each statement in `sql` (at the start of the text and
/// after each `;`, past whitespace and comments), as written. A `;` inside
/// a literal or a comment starts a statement here that the server would not
/// see: a pre-check built on this may say yes too often, never too rarely.
pub fn statement_first_words(sql: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::once(0)
        .chain(memchr::memchr_iter(b';', sql).map(|i| i + 1))
        .filter_map(|start| first_word(sql.get(start..)?))
}

/// The word `sql` starts with, past whitespace and comments (None: it
/// starts with something else, or is blank).
pub fn first_word(sql: &[u8]) -> Option<&[u8]> {
    let rest = skip_blanks(sql)?;
    let len = rest
        .iter()
        .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_'))
        .unwrap_or(rest.len());
    (len > 0).then(|| &rest[..len])
}

/// `sql` past leading whitespace and comments (`--` to the end of the
/// line, `/* */` nested); None inside an unterminated comment.
fn skip_blanks(mut sql: &[u8]) -> Option<&[u8]> {
    loop {
        sql = sql.trim_ascii_start();
        if let Some(rest) = sql.strip_prefix(b"--") {
            sql = rest
                .iter()
                .position(|&c| c == b'\n')
                .map_or(&[][..], |n| &rest[n..]);
        } else if sql.starts_with(b"/*") {
            let mut depth = 0usize;
            let mut i = 0;
            loop {
                match sql.get(i..i + 2)? {
                    b"/*" => {
                        depth += 1;
                        i += 2;
                    }
                    b"*/" => {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => i += 1,
                }
            }
            sql = &sql[i..];
        } else {
            return Some(sql);
        }
    }
}

/// Whether a statement in `sql` starts with one of `words` (lower-case
/// ASCII), in any case: the pre-check for statements the classifier knows
/// by their first word (see [`statement_first_words`]).
pub fn starts_with_word(sql: &[u8], words: &[&[u8]]) -> bool {
    statement_first_words(sql).any(|w| words.iter().any(|k| w.eq_ignore_ascii_case(k)))
}

/// Words without which a statement is no `Class::Session` operation, no
/// CALL and no DO (the classifier finds those only where one of these
/// words starts a statement).
pub const SESSION_OP_WORDS: &[&[u8]] = &[
    b"set",
    b"reset",
    b"discard",
    b"deallocate",
    b"prepare",
    b"listen",
    b"unlisten",
    b"load",
    b"call",
    b"do",
];

/// Whether `sql` is one read of server-local state (the catalog, OIDs,
/// statistics): its answer differs between two servers holding the same
/// data, so the mirror's outcome check does not compare its row count.
pub fn is_server_local_read(sql: &str) -> bool {
    matches!(
        parser::classify(sql, &Rules::default()).as_slice(),
        [Class::Read(r)] if r.scope == Scope::Server
    )
}

/// The classifier's configuration: functions the operator names as writing.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// Lower-cased function names, bare (`audit_log`) or schema-qualified
    /// (`app.audit_log`); a bare name matches in any schema.
    pub write_functions: Vec<String>,
}

impl Rules {
    pub fn new(write_functions: &[String]) -> Self {
        Self {
            write_functions: write_functions
                .iter()
                .map(|f| f.to_ascii_lowercase())
                .collect(),
        }
    }

    /// Classifies a function by its (possibly qualified, lower-cased) name.
    fn function(&self, qualified: &str) -> Option<Class> {
        let bare = qualified.rsplit('.').next().unwrap_or(qualified);
        if WRITE_FUNCTIONS.contains(&bare) {
            return Some(Class::Write);
        }
        if is_lock_function(bare) {
            return Some(Class::Lock);
        }
        if self
            .write_functions
            .iter()
            .any(|w| w == qualified || w == bare)
        {
            return Some(Class::Write);
        }
        None
    }
}

impl Rules {
    /// Whether a call to a function with this bare name might write or lock
    /// in some schema (the lexical pass does not resolve qualification).
    fn may_write_or_lock(&self, bare: &str) -> bool {
        self.function(bare).is_some()
            || self
                .write_functions
                .iter()
                .any(|w| w.rsplit('.').next() == Some(bare))
    }
}

/// Upper bound on the text cached per classifier.
const CACHE_BYTES: usize = 8 << 20;

/// Classifies statements, caching what the parser had to decide.
///
/// One per worker thread (or per session owner): no locking on the hot path.
pub struct Classifier {
    rules: Arc<Rules>,
    cache: HashMap<Box<str>, Arc<[Class]>>,
    cache_bytes: usize,
    /// Statements the lexical pass decided / the parser decided / cache hits.
    pub stats: Stats,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub lexical: u64,
    pub parsed: u64,
    pub cached: u64,
}

impl Classifier {
    pub fn new(rules: Arc<Rules>) -> Self {
        Self {
            rules,
            cache: HashMap::new(),
            cache_bytes: 0,
            stats: Stats::default(),
        }
    }

    pub fn rules(&self) -> &Arc<Rules> {
        &self.rules
    }

    /// Classifies each statement of a query string (one entry per
    /// non-empty statement; an empty string gives none).
    pub fn classify(&mut self, sql: &str) -> Arc<[Class]> {
        if let Some(c) = self.lexical_all(sql) {
            self.stats.lexical += 1;
            return c.into();
        }
        if let Some(c) = self.cache.get(sql) {
            self.stats.cached += 1;
            return Arc::clone(c);
        }
        self.stats.parsed += 1;
        let classes: Arc<[Class]> = parser::classify(sql, &self.rules).into();
        if self.cache_bytes + sql.len() > CACHE_BYTES {
            // Simple and bounded: start over rather than track recency.
            self.cache.clear();
            self.cache_bytes = 0;
        }
        self.cache_bytes += sql.len();
        self.cache.insert(sql.into(), Arc::clone(&classes));
        classes
    }

    fn lexical_all(&self, sql: &str) -> Option<Vec<Class>> {
        let stmts = lexer::split(sql).ok()?;
        stmts.iter().map(|s| lexical(s, &self.rules)).collect()
    }
}

/// Lower-cased words and structure of one statement, for the lexical pass.
struct Shape<'a> {
    words: Vec<(Token<'a>, usize)>,
}

impl<'a> Shape<'a> {
    fn word(&self, i: usize) -> Option<String> {
        match self.words.get(i)?.0 {
            Token::Word(w) => Some(w.to_ascii_lowercase()),
            _ => None,
        }
    }
    fn is(&self, i: usize, kw: &str) -> bool {
        matches!(self.words.get(i), Some((Token::Word(w), _)) if w.eq_ignore_ascii_case(kw))
    }
    fn any_word(&self, kws: &[&str]) -> bool {
        self.words.iter().any(
            |(t, _)| matches!(t, Token::Word(w) if kws.iter().any(|k| w.eq_ignore_ascii_case(k))),
        )
    }
}

/// The lexical pass: `Some(class)` only when the statement's shape makes the
/// answer certain; `None` sends it to the parser.
fn lexical(stmt: &str, rules: &Rules) -> Option<Class> {
    let mut words = Vec::new();
    lexer::tokens(stmt, |t, at| words.push((t, at))).ok()?;
    let s = Shape { words };
    let first = s.word(0)?;
    match first.as_str() {
        "select" | "values" | "table" | "with" | "show" => {
            if first == "show" {
                // The session's and the server's settings.
                return Some(Class::Read(Reads::SERVER));
            }
            // Anything that could make a query write or lock, or a
            // syntax the lexer does not follow, goes to the parser.
            if s.any_word(&[
                "insert", "update", "delete", "merge", "into", "for", "share", "lock",
            ]) {
                return None;
            }
            // Function calls (a word followed by `(`) other than portable
            // built-ins, qualified names, and words that may name system
            // catalogs, columns or types: the parser decides.
            for (i, (t, _)) in s.words.iter().enumerate() {
                let (name, quoted) = match t {
                    Token::Word(w) => (w.to_ascii_lowercase(), false),
                    Token::Quoted(q) => (q.to_string(), true),
                    _ => continue,
                };
                if reads::lexical_word_is_suspect(&name) {
                    return None;
                }
                if !matches!(s.words.get(i + 1), Some((Token::Open, _))) {
                    continue;
                }
                let qualified =
                    i > 0 && matches!(s.words.get(i - 1), Some((Token::Other(b'.'), _)));
                if qualified || rules.may_write_or_lock(&name) {
                    return None;
                }
                let call = if quoted {
                    Some(reads::function(None, &name))
                } else {
                    reads::lexical_call(&name)
                };
                if call.is_some_and(|r| r != Reads::DATA) {
                    return None;
                }
            }
            Some(Class::READ)
        }
        "insert" | "update" | "delete" | "merge" | "truncate" | "create" | "alter" | "drop"
        | "grant" | "revoke" | "comment" | "reindex" | "cluster" | "vacuum" | "analyze"
        | "analyse" | "refresh" | "call" | "do" | "notify" | "reassign" | "checkpoint"
        | "import" => {
            // `CREATE FUNCTION ... BEGIN ATOMIC ... END` has `;` inside its
            // body, which only the parser splits right.
            if s.any_word(&["atomic"]) {
                return None;
            }
            Some(Class::Write)
        }
        "lock" => Some(Class::Lock),
        "begin" | "start" => {
            if first == "start" && !s.is(1, "transaction") {
                return None;
            }
            if first == "begin" && s.is(1, "atomic") {
                return None;
            }
            let read_only = s
                .words
                .windows(2)
                .any(|w| matches!((w[0].0, w[1].0), (Token::Word(a), Token::Word(b)) if a.eq_ignore_ascii_case("read") && b.eq_ignore_ascii_case("only")));
            Some(Class::Begin { read_only })
        }
        "commit" | "end" | "rollback" | "abort" | "savepoint" | "release" => {
            // COMMIT PREPARED / ROLLBACK PREPARED finish another
            // transaction's writes: the parser decides those.
            if s.any_word(&["prepared"]) {
                return None;
            }
            Some(Class::TxnControl)
        }
        "set" => {
            if s.is(1, "transaction") || s.is(1, "constraints") {
                Some(Class::TxnControl)
            } else if s.is(1, "local") {
                Some(Class::Session(SessionOp::SetLocal))
            } else {
                Some(Class::Session(SessionOp::Set))
            }
        }
        "reset" => {
            if s.is(1, "all") {
                Some(Class::Session(SessionOp::ResetAll))
            } else {
                Some(Class::Session(SessionOp::Set))
            }
        }
        "listen" | "unlisten" | "load" => Some(Class::Session(SessionOp::SourceOnly)),
        // Cursors are the session's: wherever they were declared.
        "fetch" | "move" | "close" => Some(Class::Read(Reads::SESSION)),
        // COPY, EXPLAIN, PREPARE, EXECUTE, DEALLOCATE, DISCARD, DECLARE and
        // anything unusual: the parser.
        _ => None,
    }
}

#[cfg(test)]
mod tests;
