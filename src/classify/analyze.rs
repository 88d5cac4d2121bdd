//! What the mirror (and the differ) need to know about a statement beyond
//! its class: the standard pg_query fingerprint, the tables it writes, the
//! non-deterministic functions it calls, whether it may run inside a
//! transaction block, and whether it has a top-level ORDER BY.
//!
//! This runs off the hot path (in the mirror's applier), once per distinct
//! statement text.

use pg_query::protobuf::node::Node as N;
use serde_json::Value;

/// Functions whose result differs between the source and a replay.
const NONDETERMINISTIC: &[&str] = &[
    "now",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "timeofday",
    "random",
    "random_normal",
    "gen_random_uuid",
    "uuidv4",
    "uuidv7",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "nextval",
    "setseed",
    "pg_backend_pid",
    "inet_client_addr",
    "txid_current",
    "pg_current_xact_id",
];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Analysis {
    /// pg_query's fingerprint, as hex (what other Postgres tools show).
    pub fingerprint: String,
    /// Tables the statement inserts into, updates, deletes from, merges
    /// into or truncates, as written (`schema.table` or `table`).
    pub written_tables: Vec<String>,
    /// For an INSERT: its target table and explicit column list (empty when
    /// the statement names none).
    pub insert: Option<(String, Vec<String>)>,
    /// Non-deterministic functions called (`now`, `random`, `nextval`, the
    /// `CURRENT_TIMESTAMP` family, ...).
    pub nondeterministic: Vec<String>,
    /// Must run outside a transaction block (VACUUM, CREATE DATABASE,
    /// CREATE INDEX CONCURRENTLY, COMMIT PREPARED, ...).
    pub non_transactional: bool,
    /// Has explicit transaction control (BEGIN, COMMIT, SAVEPOINT, ...).
    pub transaction_control: bool,
    /// A top-level ORDER BY (the result's row order is defined).
    pub ordered: bool,
    /// The grammar rejected the text.
    pub invalid: bool,
    /// Every effect it has on the database shows in the rows it writes
    /// (DML, reads, transaction control, session settings): its unit can be
    /// applied from row images instead (DDL, TRUNCATE, large objects and
    /// the like cannot).
    pub row_safe: bool,
    /// A two-phase commit step and its global transaction id: what the
    /// mirror checks in `pg_prepared_xacts` to know whether it happened.
    pub two_phase: Option<(TwoPhase, String)>,
}

/// The steps of a two-phase commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwoPhase {
    /// PREPARE TRANSACTION: the transaction is prepared, not committed.
    Prepare,
    /// COMMIT PREPARED.
    Commit,
    /// ROLLBACK PREPARED.
    Rollback,
}

/// Analyzes one statement (or a multi-statement string, merged).
pub fn analyze(sql: &str) -> Analysis {
    let mut a = Analysis {
        row_safe: true,
        ..Analysis::default()
    };
    match std::panic::catch_unwind(|| pg_query::fingerprint(sql, 0, 0)) {
        Ok(Ok(f)) => a.fingerprint = f.hex,
        _ => {
            a.invalid = true;
            a.fingerprint = format!("text:{:016x}", fnv1a(sql.as_bytes()));
            return a;
        }
    }
    let Ok(Ok(parsed)) = std::panic::catch_unwind(|| pg_query::parse(sql, 0)) else {
        a.invalid = true;
        return a;
    };
    for raw in &parsed.protobuf.stmts {
        let Some(node) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
            continue;
        };
        top_level(node, &mut a);
        if let Ok(tree) = serde_json::to_value(node) {
            walk(&tree, &mut a);
        }
    }
    a.written_tables.sort();
    a.written_tables.dedup();
    a.nondeterministic.sort();
    a.nondeterministic.dedup();
    a
}

fn relation_name(r: &pg_query::protobuf::RangeVar) -> String {
    if r.schemaname.is_empty() {
        r.relname.clone()
    } else {
        format!("{}.{}", r.schemaname, r.relname)
    }
}

fn top_level(node: &N, a: &mut Analysis) {
    a.row_safe &= matches!(
        node,
        N::SelectStmt(_)
            | N::InsertStmt(_)
            | N::UpdateStmt(_)
            | N::DeleteStmt(_)
            | N::MergeStmt(_)
            | N::TransactionStmt(_)
            | N::VariableSetStmt(_)
            | N::VariableShowStmt(_)
            | N::CopyStmt(_)
            | N::PrepareStmt(_)
            | N::ExecuteStmt(_)
            | N::DeallocateStmt(_)
            | N::DeclareCursorStmt(_)
            | N::FetchStmt(_)
            | N::ClosePortalStmt(_)
            | N::LockStmt(_)
            | N::ExplainStmt(_)
    );
    match node {
        N::SelectStmt(s) => a.ordered |= !s.sort_clause.is_empty(),
        N::InsertStmt(i) => {
            if let Some(r) = &i.relation {
                let cols = i
                    .cols
                    .iter()
                    .filter_map(|c| match &c.node {
                        Some(N::ResTarget(t)) => Some(t.name.clone()),
                        _ => None,
                    })
                    .collect();
                a.insert = Some((relation_name(r), cols));
            }
        }
        N::TransactionStmt(t) => {
            use pg_query::protobuf::TransactionStmtKind as K;
            a.transaction_control = true;
            let step = match K::try_from(t.kind) {
                Ok(K::TransStmtPrepare) => Some(TwoPhase::Prepare),
                Ok(K::TransStmtCommitPrepared) => Some(TwoPhase::Commit),
                Ok(K::TransStmtRollbackPrepared) => Some(TwoPhase::Rollback),
                _ => None,
            };
            if let Some(step) = step {
                a.non_transactional |= step != TwoPhase::Prepare;
                a.two_phase = Some((step, t.gid.clone()));
            }
        }
        N::VacuumStmt(v) => a.non_transactional |= v.is_vacuumcmd,
        // A procedure or DO block may commit on its own: it runs as the
        // source ran it, outside a transaction block.
        N::CallStmt(_) | N::DoStmt(_) => a.non_transactional = true,
        N::CreatedbStmt(_)
        | N::DropdbStmt(_)
        | N::CreateTableSpaceStmt(_)
        | N::DropTableSpaceStmt(_)
        | N::AlterSystemStmt(_)
        | N::CreateSubscriptionStmt(_)
        | N::DropSubscriptionStmt(_) => a.non_transactional = true,
        N::IndexStmt(i) => a.non_transactional |= i.concurrent,
        N::DropStmt(d) => a.non_transactional |= d.concurrent,
        // DISCARD ALL and whole-schema/database REINDEX refuse a transaction block.
        N::DiscardStmt(d) => {
            a.non_transactional |= d.target == pg_query::protobuf::DiscardMode::DiscardAll as i32
        }
        N::ReindexStmt(r) => {
            use pg_query::protobuf::ReindexObjectType as R;
            a.non_transactional |= matches!(
                R::try_from(r.kind),
                Ok(R::ReindexObjectSchema | R::ReindexObjectSystem | R::ReindexObjectDatabase)
            );
            a.non_transactional |= r
                .params
                .iter()
                .any(|p| matches!(&p.node, Some(N::DefElem(d)) if d.defname == "concurrently"))
        }
        N::ExplainStmt(e) => {
            if let Some(inner) = e.query.as_ref().and_then(|q| q.node.as_ref()) {
                top_level(inner, a);
            }
        }
        _ => {}
    }
}

fn walk(v: &Value, a: &mut Analysis) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                match k.as_str() {
                    "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                        if let Some(t) = child.get("relation").and_then(range_var) {
                            a.written_tables.push(t);
                        }
                    }
                    "TruncateStmt" => {
                        if let Some(rels) = child.get("relations").and_then(Value::as_array) {
                            for r in rels {
                                if let Some(t) = r.get("node").and_then(|n| n.get("RangeVar")) {
                                    if let Some(t) = range_var(t) {
                                        a.written_tables.push(t);
                                    }
                                }
                            }
                        }
                    }
                    "FuncCall" => {
                        if let Some(parts) = child.get("funcname").and_then(Value::as_array) {
                            if let Some(name) = parts
                                .last()
                                .and_then(|p| p.get("node")?.get("String")?.get("sval")?.as_str())
                            {
                                if NONDETERMINISTIC.contains(&name) {
                                    a.nondeterministic.push(name.to_string());
                                }
                            }
                        }
                    }
                    // CURRENT_TIMESTAMP, LOCALTIME, CURRENT_DATE, ...: all
                    // read the clock (the user-name ones are stable).
                    "SqlvalueFunction" => {
                        if let Some(op) = child.get("op").and_then(Value::as_i64) {
                            // SVFOP_CURRENT_DATE (1) ..= SVFOP_LOCALTIMESTAMP_N (9)
                            if (1..=9).contains(&op) {
                                a.nondeterministic.push(sql_value_function(op).into());
                            }
                        }
                    }
                    _ => {}
                }
                walk(child, a);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| walk(i, a)),
        _ => {}
    }
}

fn sql_value_function(op: i64) -> &'static str {
    match op {
        1 => "current_date",
        2 | 3 => "current_time",
        4 | 5 => "current_timestamp",
        6 | 7 => "localtime",
        _ => "localtimestamp",
    }
}

fn range_var(v: &Value) -> Option<String> {
    let rel = v.get("relname")?.as_str()?;
    match v.get("schemaname").and_then(Value::as_str) {
        Some(s) if !s.is_empty() => Some(format!("{s}.{rel}")),
        _ => Some(rel.to_string()),
    }
}

/// A stable 64-bit hash for texts the grammar rejects.
pub fn fnv1a(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &x in b {
        h ^= x as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_history_insert_is_flagged_by_current_timestamp() {
        let a = analyze(
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 2, 3, 4, CURRENT_TIMESTAMP)",
        );
        assert_eq!(a.written_tables, ["pgbench_history"]);
        assert_eq!(a.nondeterministic, ["current_timestamp"]);
        let (t, cols) = a.insert.unwrap();
        assert_eq!(t, "pgbench_history");
        assert_eq!(cols, ["tid", "bid", "aid", "delta", "mtime"]);
        assert_eq!(a.fingerprint.len(), 16);
    }

    #[test]
    fn fingerprint_ignores_literals_and_matches_pg_query() {
        let a = analyze("UPDATE t SET v = 1 WHERE id = 2");
        let b = analyze("update t set v = 99 where id = 3");
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(a.written_tables, ["t"]);
        assert!(a.nondeterministic.is_empty());
    }

    #[test]
    fn finds_nested_writes_functions_and_transaction_rules() {
        let a = analyze("WITH x AS (DELETE FROM s.a RETURNING *) INSERT INTO b SELECT *, now(), gen_random_uuid() FROM x");
        assert_eq!(a.written_tables, ["b", "s.a"]);
        assert_eq!(a.nondeterministic, ["gen_random_uuid", "now"]);
        assert!(analyze("VACUUM t").non_transactional);
        assert!(!analyze("ANALYZE t").non_transactional);
        assert!(analyze("DISCARD ALL").non_transactional);
        assert!(!analyze("DISCARD TEMP").non_transactional);
        assert!(analyze("REINDEX SCHEMA s").non_transactional);
        assert!(!analyze("REINDEX TABLE t").non_transactional);
        assert!(analyze("CREATE INDEX CONCURRENTLY i ON t (a)").non_transactional);
        assert!(analyze("COMMIT PREPARED 'x'").non_transactional);
        assert!(analyze("CALL p()").non_transactional);
        assert!(analyze("INSERT INTO t VALUES (1); UPDATE t SET a = 2").row_safe);
        assert!(!analyze("INSERT INTO t VALUES (1); CREATE TABLE u (a int)").row_safe);
        assert!(!analyze("TRUNCATE t").row_safe);
        assert!(analyze("DO $$ BEGIN COMMIT; END $$").non_transactional);
        assert!(analyze("BEGIN").transaction_control);
        assert!(analyze("SELECT a FROM t ORDER BY a").ordered);
        assert!(!analyze("SELECT a FROM (SELECT a FROM t ORDER BY a) s").ordered);
        assert_eq!(analyze("TRUNCATE a, b.c").written_tables, ["a", "b.c"]);
        assert!(analyze("selec 1").invalid);
    }
}
