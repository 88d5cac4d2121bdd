//! A READ ONLY transaction routed to the target: what each statement in it
//! may do there.
//!
//! The client opened the transaction READ ONLY, and the target session
//! runs it READ ONLY, so nothing in it can write there. What the target
//! must not do is act for the source in other ways:
//!
//! - **Before the transaction has read anything**, anything but a read
//!   (`SET TRANSACTION READ WRITE` above all, which Postgres allows until
//!   the first query, but also a write, a session setting, a server-local
//!   read) moves the transaction to the source: the target's is rolled
//!   back, the source gets the statements the target had run in it (their
//!   answers withheld, as the client has them already), then the statement
//!   itself. The client cannot tell: it is as if the transaction had run on
//!   the source from the start.
//! - **Once it has read**, statements run on the target, and Postgres'
//!   own rules give the client exactly the source's answers: a write fails
//!   with 25006, `SET TRANSACTION READ WRITE` with 25001. Session state
//!   changed in the transaction (SET, RESET, SET ROLE, LISTEN, PREPARE,
//!   DEALLOCATE) is also queued for the source: transactional changes are
//!   replayed there if the transaction commits (minus what a `ROLLBACK TO
//!   SAVEPOINT` undid), the others (PREPARE, DEALLOCATE) whatever happens.
//!   Their answers are withheld; the ParameterStatus messages they cause
//!   reach the client.
//!
//! Weak point: a server-local read (`pg_stat_activity`, `SHOW port`) after
//! the transaction's first read is answered by the target.

use bytes::{Bytes, BytesMut};

use crate::classify::{Class, Scope, SessionOp};
use crate::protocol::message::put_message;

/// What one statement of a routed transaction needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judged {
    /// The target, as it is; `read`: it takes a snapshot.
    Target { read: bool },
    /// The source: the transaction must move there first.
    Migrate,
    /// The target, and the source too once the transaction is over.
    AlsoSource { transactional: bool },
    /// Savepoint bookkeeping for the queued session changes (target).
    Savepoint(SavepointOp),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SavepointOp {
    Define(String),
    Release(String),
    RollbackTo(String),
}

/// Words that make a transaction-control or SET LOCAL statement lift the
/// read-only mode.
fn lifts_read_only(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    (lower.contains("read") && lower.contains("write")) || lower.contains("transaction_read_only")
}

/// Judges one statement of a routed transaction, given whether the
/// transaction has read already.
pub fn judge(class: &Class, sql: &str, has_read: bool) -> Judged {
    let before = |then: Judged| if has_read { then } else { Judged::Migrate };
    match class {
        Class::Read(r) => match r.scope {
            Scope::Data | Scope::Session => Judged::Target { read: true },
            Scope::Server => before(Judged::Target { read: true }),
        },
        Class::TxnControl => {
            if lifts_read_only(sql) {
                return before(Judged::Target { read: false });
            }
            match savepoint_op(sql) {
                Some(op) => Judged::Savepoint(op),
                // COMMIT, ROLLBACK, SET TRANSACTION ISOLATION, SET
                // CONSTRAINTS; PREPARE TRANSACTION would leave a prepared
                // transaction on the wrong server.
                None if sql.to_ascii_lowercase().contains("prepare") => {
                    before(Judged::Target { read: false })
                }
                None => Judged::Target { read: false },
            }
        }
        Class::Session(SessionOp::SetLocal) => {
            if lifts_read_only(sql) {
                before(Judged::Target { read: false })
            } else {
                Judged::Target { read: false }
            }
        }
        Class::Session(
            SessionOp::Set
            | SessionOp::ResetAll
            | SessionOp::Discard { .. }
            | SessionOp::SourceOnly,
        ) => before(Judged::AlsoSource {
            transactional: true,
        }),
        // Prepared statements outlive a rollback.
        Class::Session(SessionOp::Prepare { .. } | SessionOp::Deallocate { .. }) => {
            before(Judged::AlsoSource {
                transactional: false,
            })
        }
        // A nested BEGIN: a warning from either server.
        Class::Begin { .. } => Judged::Target { read: false },
        // Writes and locks fail on the target as on the source once the
        // transaction has read (it is READ ONLY on both).
        Class::Write | Class::Lock | Class::Execute { .. } => before(Judged::Target { read: true }),
    }
}

/// SAVEPOINT / RELEASE / ROLLBACK TO, with the savepoint's name as
/// Postgres folds it.
fn savepoint_op(sql: &str) -> Option<SavepointOp> {
    use pg_query::protobuf::{node::Node as N, TransactionStmtKind as K};
    let parsed = std::panic::catch_unwind(|| pg_query::parse(sql, 0))
        .ok()?
        .ok()?;
    let stmt = parsed
        .protobuf
        .stmts
        .first()?
        .stmt
        .as_ref()?
        .node
        .as_ref()?;
    let N::TransactionStmt(t) = stmt else {
        return None;
    };
    let name = t.savepoint_name.clone();
    match K::try_from(t.kind).ok()? {
        K::TransStmtSavepoint => Some(SavepointOp::Define(name)),
        K::TransStmtRelease => Some(SavepointOp::Release(name)),
        K::TransStmtRollbackTo => Some(SavepointOp::RollbackTo(name)),
        _ => None,
    }
}

/// Most bytes of session changes queued for the source in one routed
/// transaction; beyond it the session ends (a client cannot make the proxy
/// hold an unbounded buffer).
pub const MAX_QUEUED_BYTES: usize = 1 << 20;

/// Session changes a routed transaction made on the target that the
/// source must make too once it is over.
#[derive(Debug, Default)]
pub struct SourceQueue {
    ops: Vec<(Bytes, bool)>,
    /// Savepoints defined, with how many ops were queued when each was.
    savepoints: Vec<(String, usize)>,
    bytes: usize,
}

impl SourceQueue {
    /// Queues a statement for the source; false when the bound is passed.
    pub fn push(&mut self, sql: &str, transactional: bool) -> bool {
        let mut f = BytesMut::with_capacity(sql.len() + 6);
        put_message(&mut f, b'Q', &[sql.as_bytes(), b"\0"]);
        self.bytes += f.len();
        self.ops.push((f.freeze(), transactional));
        self.bytes <= MAX_QUEUED_BYTES
    }

    pub fn savepoint(&mut self, op: &SavepointOp) {
        match op {
            SavepointOp::Define(n) => self.savepoints.push((n.clone(), self.ops.len())),
            SavepointOp::Release(n) => {
                if let Some(i) = self.savepoints.iter().rposition(|(s, _)| s == n) {
                    self.savepoints.truncate(i);
                }
            }
            SavepointOp::RollbackTo(n) => {
                if let Some(i) = self.savepoints.iter().rposition(|(s, _)| s == n) {
                    let mark = self.savepoints[i].1;
                    self.savepoints.truncate(i + 1);
                    // Transactional changes made since are undone; the
                    // others (prepared statements) stand.
                    let mut k = 0;
                    self.ops.retain(|(_, transactional)| {
                        k += 1;
                        k <= mark || !transactional
                    });
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The frames for the source once the transaction is over, and how many
    /// requests they are: everything if it committed, else only the
    /// changes a rollback does not undo.
    pub fn take(&mut self, committed: bool) -> (Bytes, u32) {
        let mut out = BytesMut::new();
        let mut n = 0;
        for (f, transactional) in self.ops.drain(..) {
            if committed || !transactional {
                out.extend_from_slice(&f);
                n += 1;
            }
        }
        self.savepoints.clear();
        self.bytes = 0;
        (out.freeze(), n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{Classifier, Reads, Rules};
    use std::sync::Arc;

    fn j(sql: &str, has_read: bool) -> Judged {
        let mut c = Classifier::new(Arc::new(Rules::default()));
        let cls = c.classify(sql);
        judge(&cls[0], sql, has_read)
    }

    #[test]
    fn before_the_first_read_anything_but_a_read_moves_the_transaction() {
        assert_eq!(j("SELECT 1", false), Judged::Target { read: true });
        assert_eq!(j("SET TRANSACTION READ WRITE", false), Judged::Migrate);
        assert_eq!(j("SET transaction_read_only = off", false), Judged::Migrate);
        assert_eq!(
            j("SET LOCAL transaction_read_only = off", false),
            Judged::Migrate
        );
        assert_eq!(j("INSERT INTO t VALUES (1)", false), Judged::Migrate);
        assert_eq!(j("SET search_path = app", false), Judged::Migrate);
        assert_eq!(j("SELECT * FROM pg_stat_activity", false), Judged::Migrate);
        assert_eq!(j("SHOW port", false), Judged::Migrate);
        // Transaction-local settings and savepoints stay.
        assert_eq!(
            j("SET LOCAL statement_timeout = 5", false),
            Judged::Target { read: false }
        );
        assert_eq!(
            j("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", false),
            Judged::Target { read: false }
        );
        assert_eq!(j("COMMIT", false), Judged::Target { read: false });
        assert_eq!(
            j("SAVEPOINT a", false),
            Judged::Savepoint(SavepointOp::Define("a".into()))
        );
    }

    #[test]
    fn after_a_read_the_target_answers_and_session_changes_reach_the_source_too() {
        assert_eq!(
            j("SET TRANSACTION READ WRITE", true),
            Judged::Target { read: false }
        );
        assert_eq!(
            j("INSERT INTO t VALUES (1)", true),
            Judged::Target { read: true }
        );
        assert_eq!(
            j("SET search_path = app", true),
            Judged::AlsoSource {
                transactional: true
            }
        );
        assert_eq!(
            j("PREPARE p AS SELECT 1", true),
            Judged::AlsoSource {
                transactional: false
            }
        );
        assert_eq!(
            j("ROLLBACK TO SAVEPOINT \"A b\"", true),
            Judged::Savepoint(SavepointOp::RollbackTo("A b".into()))
        );
        let _ = Reads::DATA;
    }

    #[test]
    fn the_queue_follows_savepoints_and_the_outcome() {
        let mut q = SourceQueue::default();
        q.push("SET a = 1", true);
        q.savepoint(&SavepointOp::Define("s".into()));
        q.push("SET b = 2", true);
        q.push("PREPARE p AS SELECT 1", false);
        q.savepoint(&SavepointOp::RollbackTo("s".into()));
        let (f, n) = q.take(true);
        assert_eq!(n, 2, "SET b was rolled back, PREPARE stands");
        assert!(f.windows(9).any(|w| w == b"SET a = 1"));
        assert!(!f.windows(9).any(|w| w == b"SET b = 2"));
        q.push("SET a = 1", true);
        q.push("DEALLOCATE p", false);
        let (_, n) = q.take(false);
        assert_eq!(n, 1, "a rollback keeps only DEALLOCATE");
        assert!(q.is_empty());
    }
}
