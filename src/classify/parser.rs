//! Classification by the real Postgres grammar (libpg_query).
//!
//! The statement's top-level node decides most cases. For queries, the
//! whole tree is searched (as JSON, so no node type is missed) for anything
//! that writes or locks: data-modifying CTEs, `SELECT INTO`, locking
//! clauses at any depth, and calls to writing or locking functions.

use pg_query::protobuf::{self, node::Node as N};
use serde_json::Value;

use super::reads::{self, Reads};
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
        // A plan (and with ANALYZE its timings) describes the server that
        // made it.
        N::ExplainStmt(e) => {
            let analyze = e.options.iter().any(|o| match &o.node {
                Some(N::DefElem(d)) => d.defname == "analyze" && !def_is_false(d),
                _ => false,
            });
            match e.query.as_ref().and_then(|q| q.node.as_ref()) {
                Some(inner) if analyze => match statement(inner, rules) {
                    Class::Read(_) => Class::Read(Reads::SERVER),
                    other => other,
                },
                _ => Class::Read(Reads::SERVER),
            }
        }
        N::CopyStmt(c) => {
            if c.is_from {
                Class::Write
            } else if c.is_program || !c.filename.is_empty() {
                // `COPY ... TO 'file'` / `TO PROGRAM`: writes on the server's
                // host (a file, a program's effects), not to the client.
                Class::Read(Reads::SERVER)
            } else {
                match (
                    c.query.as_ref().and_then(|q| q.node.as_ref()),
                    c.relation.as_ref(),
                ) {
                    (Some(inner), _) => statement(inner, rules),
                    (None, Some(r)) => Class::Read(reads::relation(
                        (!r.schemaname.is_empty()).then_some(r.schemaname.as_str()),
                        &r.relname,
                    )),
                    (None, None) => Class::READ,
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
        N::VariableShowStmt(_) => Class::Read(Reads::SERVER),
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
        // A cursor is the session's, on the server that declared it.
        N::DeclareCursorStmt(d) => match d.query.as_ref().and_then(|q| q.node.as_ref()) {
            Some(inner) => match statement(inner, rules) {
                Class::Write => Class::Write,
                Class::Lock => Class::Lock,
                Class::Read(r) => Class::Read(r.and(Reads::SESSION)),
                _ => Class::Read(Reads::SESSION),
            },
            None => Class::Write,
        },
        N::FetchStmt(_) | N::ClosePortalStmt(_) => Class::Read(Reads::SESSION),
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
    let mut found = Class::READ;
    let mut reads = Reads::DATA;
    walk(&tree, rules, &mut found, &mut reads);
    match found {
        Class::Read(_) => Class::Read(reads),
        other => other,
    }
}

/// Raises `found` to Lock or Write on anything that locks or writes, and
/// `reads` on what makes the read server-local or call unknown functions.
fn walk(v: &Value, rules: &Rules, found: &mut Class, reads: &mut Reads) {
    if *found == Class::Write {
        return;
    }
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                match k.as_str() {
                    "RangeVar" => {
                        let text = |f: &str| child.get(f).and_then(Value::as_str).unwrap_or("");
                        let schema = text("schemaname");
                        *reads = reads.and(reads::relation(
                            (!schema.is_empty()).then_some(schema),
                            text("relname"),
                        ));
                    }
                    "ColumnRef" => {
                        let last = names(child.get("fields")).pop();
                        if last.is_some_and(|c| reads::is_system_column(&c)) {
                            *reads = reads.and(Reads::SERVER);
                        }
                    }
                    "type_name" | "typeName" => {
                        let last = names(child.get("names")).pop();
                        if last.is_some_and(|t| reads::is_server_type(&t)) {
                            *reads = reads.and(Reads::SERVER);
                        }
                    }
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
                        let parts = names(child.get("funcname"));
                        if let Some(bare) = parts.last() {
                            match rules.function(&parts.join(".")) {
                                Some(Class::Write) => {
                                    *found = Class::Write;
                                    return;
                                }
                                Some(Class::Lock) => *found = Class::Lock,
                                _ => {
                                    let schema =
                                        (parts.len() > 1).then(|| parts[parts.len() - 2].as_str());
                                    *reads = reads.and(reads::function(schema, bare));
                                }
                            }
                        }
                    }
                    _ => {}
                }
                walk(child, rules, found, reads);
            }
        }
        Value::Array(items) => {
            for item in items {
                walk(item, rules, found, reads);
            }
        }
        _ => {}
    }
}

/// The String parts of a name list (`funcname`, `fields`, `names`), as the
/// grammar folded them.
fn names(list: Option<&Value>) -> Vec<String> {
    list.and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| p.get("node")?.get("String")?.get("sval")?.as_str())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}
