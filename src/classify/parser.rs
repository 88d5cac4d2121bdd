//! Classification by the real Postgres grammar (libpg_query).
//!
//! The statement's top-level node decides most cases. For queries, the
//! whole tree is searched (as JSON, so no node type is missed) for anything
//! that writes or locks: data-modifying CTEs, `SELECT INTO`, locking
//! clauses at any depth, and calls to writing or locking functions.

use pg_query::protobuf::{self, node::Node as N};
use serde_json::Value;

use super::{Class, Rules, SessionOp};

/// One class per statement; a string the grammar rejects is one `Write`
/// (Postgres will reject it too, and nothing is lost by mirroring an error).
pub fn classify(sql: &str, rules: &Rules) -> Vec<Class> {
    // libpg_query is C behind a safe wrapper; a panic in the wrapper must
    // not take the session down.
    let parsed = std::panic::catch_unwind(|| pg_query::parse(sql, 0));
    let Ok(Ok(parsed)) = parsed else {
        return vec![Class::Write];
    };
    parsed
        .protobuf
        .stmts
        .iter()
        .map(
            |raw| match raw.stmt.as_ref().and_then(|s| s.node.as_ref()) {
                Some(node) => statement(node, rules),
                None => Class::Write,
            },
        )
        .collect()
}

fn statement(node: &N, rules: &Rules) -> Class {
    match node {
        N::SelectStmt(_) => query(node, rules),
        N::InsertStmt(_) | N::UpdateStmt(_) | N::DeleteStmt(_) | N::MergeStmt(_) => Class::Write,
        N::ExplainStmt(e) => {
            let analyze = e.options.iter().any(|o| match &o.node {
                Some(N::DefElem(d)) => d.defname == "analyze" && !def_is_false(d),
                _ => false,
            });
            match e.query.as_ref().and_then(|q| q.node.as_ref()) {
                Some(inner) if analyze => statement(inner, rules),
                _ => Class::Read,
            }
        }
        N::CopyStmt(c) => {
            if c.is_from {
                Class::Write
            } else {
                match c.query.as_ref().and_then(|q| q.node.as_ref()) {
                    Some(inner) => statement(inner, rules),
                    None => Class::Read,
                }
            }
        }
        N::TransactionStmt(t) => {
            use protobuf::TransactionStmtKind as K;
            match K::try_from(t.kind) {
                Ok(K::TransStmtBegin | K::TransStmtStart) => {
                    let read_only = t.options.iter().any(|o| match &o.node {
                        Some(N::DefElem(d)) => {
                            d.defname == "transaction_read_only" && !def_is_false(d)
                        }
                        _ => false,
                    });
                    Class::Begin { read_only }
                }
                // These finish a prepared transaction: data changes the
                // target must repeat, outside any transaction block.
                Ok(K::TransStmtCommitPrepared | K::TransStmtRollbackPrepared) => Class::Write,
                Ok(_) => Class::TxnControl,
                Err(_) => Class::Write,
            }
        }
        N::VariableSetStmt(v) => {
            use protobuf::VariableSetKind as K;
            if v.name == "TRANSACTION" {
                Class::TxnControl
            } else if K::try_from(v.kind) == Ok(K::VarResetAll) {
                Class::Session(SessionOp::ResetAll)
            } else if v.is_local {
                Class::Session(SessionOp::SetLocal)
            } else {
                Class::Session(SessionOp::Set)
            }
        }
        N::ConstraintsSetStmt(_) => Class::TxnControl,
        N::VariableShowStmt(_) => Class::Read,
        N::DiscardStmt(d) => {
            use protobuf::DiscardMode as M;
            let mode = M::try_from(d.target);
            Class::Session(SessionOp::Discard {
                all: mode == Ok(M::DiscardAll),
                temp: matches!(mode, Ok(M::DiscardAll | M::DiscardTemp)),
            })
        }
        N::PrepareStmt(p) => {
            let body = match p.query.as_ref().and_then(|q| q.node.as_ref()) {
                Some(inner) => statement(inner, rules),
                None => Class::Write,
            };
            Class::Session(SessionOp::Prepare {
                name: p.name.clone(),
                body: Box::new(body),
            })
        }
        N::ExecuteStmt(e) => Class::Execute {
            name: e.name.clone(),
        },
        N::DeallocateStmt(d) => Class::Session(SessionOp::Deallocate {
            name: (!d.isall).then(|| d.name.clone()),
        }),
        N::DeclareCursorStmt(d) => match d.query.as_ref().and_then(|q| q.node.as_ref()) {
            Some(inner) => match statement(inner, rules) {
                Class::Write => Class::Write,
                Class::Lock => Class::Lock,
                _ => Class::Read,
            },
            None => Class::Write,
        },
        N::FetchStmt(_) | N::ClosePortalStmt(_) => Class::Read,
        N::ListenStmt(_) | N::UnlistenStmt(_) | N::LoadStmt(_) => {
            Class::Session(SessionOp::SourceOnly)
        }
        N::LockStmt(_) => Class::Lock,
        // DDL, DO, CALL, VACUUM, TRUNCATE, GRANT, NOTIFY, CHECKPOINT, ...
        _ => Class::Write,
    }
}

/// `DEFAULT false`-style options: `(ANALYZE false)`, `(ANALYZE off)`.
fn def_is_false(d: &protobuf::DefElem) -> bool {
    match d.arg.as_ref().and_then(|a| a.node.as_ref()) {
        Some(N::Boolean(b)) => !b.boolval,
        Some(N::String(s)) => matches!(s.sval.to_ascii_lowercase().as_str(), "false" | "off" | "0"),
        Some(N::AConst(c)) => {
            matches!(
                &c.val,
                Some(protobuf::a_const::Val::Ival(i)) if i.ival == 0
            ) || matches!(&c.val, Some(protobuf::a_const::Val::Boolval(b)) if !b.boolval)
        }
        _ => false,
    }
}

/// A SELECT (or VALUES, TABLE, set operation): searches the whole tree.
fn query(node: &N, rules: &Rules) -> Class {
    let Ok(tree) = serde_json::to_value(node) else {
        return Class::Write;
    };
    let mut found = Class::Read;
    walk(&tree, rules, &mut found);
    found
}

/// Raises `found` to Lock or Write on anything that locks or writes.
fn walk(v: &Value, rules: &Rules, found: &mut Class) {
    if *found == Class::Write {
        return;
    }
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                match k.as_str() {
                    "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                        *found = Class::Write;
                        return;
                    }
                    "into_clause" if !child.is_null() => {
                        *found = Class::Write;
                        return;
                    }
                    "locking_clause" if child.as_array().is_some_and(|a| !a.is_empty()) => {
                        *found = Class::Lock;
                    }
                    "FuncCall" => {
                        if let Some(name) = func_name(child) {
                            match rules.function(&name) {
                                Some(Class::Write) => {
                                    *found = Class::Write;
                                    return;
                                }
                                Some(Class::Lock) => *found = Class::Lock,
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
                walk(child, rules, found);
            }
        }
        Value::Array(items) => {
            for item in items {
                walk(item, rules, found);
            }
        }
        _ => {}
    }
}

/// `schema.name` of a FuncCall node, lower-cased as the grammar folds it.
fn func_name(call: &Value) -> Option<String> {
    let parts = call.get("funcname")?.as_array()?;
    let names: Vec<&str> = parts
        .iter()
        .filter_map(|p| p.get("node")?.get("String")?.get("sval")?.as_str())
        .collect();
    (!names.is_empty()).then(|| names.join("."))
}
