//! What the admin API hides unless `admin.show_data` is set.
//!
//! `/status`, `/mismatches` and `/audit` carry what clients sent and what
//! the databases answered: statement texts (mirror divergences,
//! non-deterministic statements, in-doubt units, failed-back query
//! shapes, shadow mismatches), bind parameters, result rows and error
//! messages that quote values. The API is reachable by anyone who can
//! reach its port (without a token, loopback only), so by default those
//! are redacted: statement texts are shown with every literal replaced by
//! `$1..$n` (`pg_query::normalize`; a text it cannot parse, such as one
//! cut short for status, becomes `<redacted>`), and the other data values
//! are replaced by `<redacted>`.
//!
//! The redaction goes by key name, over the whole response, so a field
//! added under one of these names anywhere is covered too.

use serde_json::Value;

/// What a hidden value is replaced by.
pub const REDACTED: &str = "<redacted>";

/// Keys whose string values are SQL texts: shown normalised.
const STATEMENT_KEYS: &[&str] = &["statement", "statements", "query"];

/// Keys whose values are data: bind parameters (`parameters`), result rows
/// (`source_rows`, `target_rows`), sentences quoting values (`detail`, as
/// in `served 1 vs shadow 2`) and server error messages (`target_error`:
/// Postgres quotes input values in them). Replaced whole; `null` stays.
const DATA_KEYS: &[&str] = &[
    "parameters",
    "source_rows",
    "target_rows",
    "detail",
    "target_error",
];

/// A statement text with its literals replaced by `$1..$n`, or
/// `<redacted>` when it does not parse.
pub fn statement(text: &str) -> String {
    match std::panic::catch_unwind(|| pg_query::normalize(text)) {
        Ok(Ok(normalized)) => normalized,
        _ => REDACTED.into(),
    }
}

/// Redacts a response in place (see the module comment).
pub fn redact(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if STATEMENT_KEYS.contains(&key.as_str()) {
                    redact_statements(value);
                } else if DATA_KEYS.contains(&key.as_str()) {
                    if !value.is_null() {
                        *value = Value::String(REDACTED.into());
                    }
                } else {
                    redact(value);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// A statement key's value: a text, a list of texts, or anything else
/// (replaced whole unless null: it is not a shape we know to be safe).
fn redact_statements(v: &mut Value) {
    match v {
        Value::Null => {}
        Value::String(s) => *s = statement(s),
        Value::Array(items) => items.iter_mut().for_each(redact_statements),
        other => *other = Value::String(REDACTED.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn literals_become_placeholders_and_unparsable_text_is_hidden() {
        assert_eq!(
            statement("SELECT * FROM t WHERE name = 'alice' AND id = 42"),
            "SELECT * FROM t WHERE name = $1 AND id = $2"
        );
        // Parameters already there are kept; the literals number after them.
        assert_eq!(
            statement("UPDATE t SET v = $1 WHERE k = 'secret'"),
            "UPDATE t SET v = $1 WHERE k = $2"
        );
        assert_eq!(
            statement("INSERT INTO t VALUES (1, 'x'); DELETE FROM t WHERE v = 'y'"),
            "INSERT INTO t VALUES ($1, $2); DELETE FROM t WHERE v = $3"
        );
        // Cut short for status (or not SQL at all): nothing of it is shown.
        assert_eq!(statement("INSERT INTO t VALUES ('secr..."), REDACTED);
        assert_eq!(statement("not sql 'secret'"), REDACTED);
        assert!(!statement("ALTER ROLE bob PASSWORD 'hunter2'").contains("hunter2"));
    }

    #[test]
    fn every_statement_and_data_key_is_redacted_wherever_it_is() {
        let mut v = json!({
            "mirror": {"report": {
                "divergences": [{"statement": "UPDATE t SET v = 'secret-1'", "source": "UPDATE 1",
                                 "target": "ERROR 22P02", "target_error": "invalid input syntax for type integer: \"secret-2\""}],
                "nondeterministic": [{"statement": "INSERT INTO t VALUES (now(), 'secret-3')", "tables": ["t"]}],
                "gaps": [{"kind": "in_doubt", "statements": "INSERT INTO t VALUES ('secret-4')", "reason": "stopped"}],
            }},
            "fingerprints": [{"fingerprint": "ab12", "query": "SELECT 'secret-5'",
                "last_confirmed": {"query": "SELECT $1", "parameters": [["secret-6"]],
                    "difference": {"kind": "rows", "detail": "column 1 differs: source secret-7 vs target x",
                                   "source_rows": [["secret-8"]], "target_rows": [[null]]},
                    "first_seen": {"detail": "secret-9"}}}],
            "noise": [{"query": "SELECT 1 LIMIT 'secret-10'", "reason": "two runs on the source differ", "detail": "secret-11"}],
            "scope": [{"shape": "00ff", "query": null}],
            "redacted_already": {"parameters": null},
        });
        redact(&mut v);
        let text = v.to_string();
        assert!(!text.contains("secret"), "{v:#}");
        let d = &v["mirror"]["report"]["divergences"][0];
        assert_eq!(d["statement"], "UPDATE t SET v = $1");
        assert_eq!(d["source"], "UPDATE 1");
        assert_eq!(d["target"], "ERROR 22P02");
        assert_eq!(d["target_error"], REDACTED);
        assert_eq!(
            v["mirror"]["report"]["gaps"][0]["statements"],
            "INSERT INTO t VALUES ($1)"
        );
        assert_eq!(v["mirror"]["report"]["gaps"][0]["reason"], "stopped");
        let f = &v["fingerprints"][0];
        assert_eq!(f["fingerprint"], "ab12");
        assert_eq!(f["last_confirmed"]["parameters"], REDACTED);
        assert_eq!(f["last_confirmed"]["difference"]["kind"], "rows");
        assert_eq!(f["last_confirmed"]["difference"]["source_rows"], REDACTED);
        assert_eq!(v["noise"][0]["reason"], "two runs on the source differ");
        assert_eq!(v["scope"][0]["query"], Value::Null);
        assert_eq!(v["redacted_already"]["parameters"], Value::Null);
    }
}
