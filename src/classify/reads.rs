//! What a read needs from the server that answers it.
//!
//! Routing may send a read to the target only when the target's answer
//! cannot differ from the source's for a reason other than their data: a
//! read of statistics, backends, WAL positions, settings, system catalogs
//! (whose OIDs differ between clusters), system columns (`ctid`, `xmin`)
//! or admin functions with side effects (`pg_cancel_backend`) answers only
//! about the server that runs it, so it stays on the client's own server.
//! Anything the lists below cannot vouch for is treated that way.
//!
//! The mirror needs a second fact: whether a read calls functions that may
//! write (a user function, or a built-in it does not know). Such a unit
//! gets the order probe, whose transaction id says whether it wrote.

/// Where a read may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Table data and portable built-ins: any server holding the same data
    /// gives the same answer.
    Data,
    /// The session's cursors: the server the cursor lives on.
    Session,
    /// Server-local state: only the client's own server can answer.
    Server,
}

/// A read, as routing and the mirror see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reads {
    pub scope: Scope,
    /// It calls functions the classifier cannot vouch for: they may write.
    pub calls: bool,
}

impl Reads {
    /// A read of table data that calls nothing unknown.
    pub const DATA: Reads = Reads {
        scope: Scope::Data,
        calls: false,
    };
    pub const SERVER: Reads = Reads {
        scope: Scope::Server,
        calls: false,
    };
    pub const SESSION: Reads = Reads {
        scope: Scope::Session,
        calls: false,
    };

    /// Both facts of two parts of one statement.
    pub fn and(self, other: Reads) -> Reads {
        Reads {
            scope: self.scope.max(other.scope),
            calls: self.calls || other.calls,
        }
    }
}

/// Built-in functions with no side effect whose answer depends only on
/// their arguments, the data and the clock: portable across servers.
const PORTABLE: &[&str] = &[
    // aggregates and window functions
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "array_agg",
    "string_agg",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "bool_and",
    "bool_or",
    "every",
    "bit_and",
    "bit_or",
    "bit_xor",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "corr",
    "covar_pop",
    "covar_samp",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "row_number",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "ntile",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "nth_value",
    // numbers
    "abs",
    "cbrt",
    "ceil",
    "ceiling",
    "degrees",
    "div",
    "exp",
    "factorial",
    "floor",
    "gcd",
    "lcm",
    "ln",
    "log",
    "log10",
    "mod",
    "pi",
    "power",
    "radians",
    "round",
    "scale",
    "sign",
    "sqrt",
    "trunc",
    "width_bucket",
    "random",
    "random_normal",
    "acos",
    "asin",
    "atan",
    "atan2",
    "cos",
    "sin",
    "tan",
    "cot",
    // text
    "ascii",
    "bit_length",
    "btrim",
    "char_length",
    "character_length",
    "chr",
    "concat",
    "concat_ws",
    "format",
    "initcap",
    "left",
    "length",
    "lower",
    "lpad",
    "ltrim",
    "md5",
    "octet_length",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "regexp_count",
    "regexp_instr",
    "regexp_like",
    "regexp_match",
    "regexp_matches",
    "regexp_replace",
    "regexp_split_to_array",
    "regexp_split_to_table",
    "regexp_substr",
    "repeat",
    "replace",
    "reverse",
    "right",
    "rpad",
    "rtrim",
    "split_part",
    "starts_with",
    "strpos",
    "substr",
    "to_ascii",
    "to_hex",
    "translate",
    "upper",
    "encode",
    "decode",
    "convert_from",
    "convert_to",
    "string_to_array",
    "string_to_table",
    "array_to_string",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "unistr",
    "left",
    "format_type",
    "to_tsvector",
    "to_tsquery",
    "plainto_tsquery",
    "phraseto_tsquery",
    "websearch_to_tsquery",
    "ts_rank",
    "ts_rank_cd",
    "ts_headline",
    "setweight",
    "num_nulls",
    "num_nonnulls",
    // date and time
    "age",
    "clock_timestamp",
    "date_bin",
    "date_part",
    "date_trunc",
    "isfinite",
    "justify_days",
    "justify_hours",
    "justify_interval",
    "make_date",
    "make_interval",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "now",
    "statement_timestamp",
    "timeofday",
    "transaction_timestamp",
    "to_char",
    "to_date",
    "to_number",
    "to_timestamp",
    "timezone",
    // json
    "to_json",
    "to_jsonb",
    "array_to_json",
    "row_to_json",
    "json_build_array",
    "jsonb_build_array",
    "json_build_object",
    "jsonb_build_object",
    "json_object",
    "jsonb_object",
    "json_array_length",
    "jsonb_array_length",
    "json_each",
    "jsonb_each",
    "json_each_text",
    "jsonb_each_text",
    "json_extract_path",
    "jsonb_extract_path",
    "json_extract_path_text",
    "jsonb_extract_path_text",
    "json_object_keys",
    "jsonb_object_keys",
    "json_populate_record",
    "jsonb_populate_record",
    "json_populate_recordset",
    "jsonb_populate_recordset",
    "json_to_record",
    "jsonb_to_record",
    "json_to_recordset",
    "jsonb_to_recordset",
    "json_array_elements",
    "jsonb_array_elements",
    "json_array_elements_text",
    "jsonb_array_elements_text",
    "json_typeof",
    "jsonb_typeof",
    "json_strip_nulls",
    "jsonb_strip_nulls",
    "jsonb_set",
    "jsonb_set_lax",
    "jsonb_insert",
    "jsonb_pretty",
    "jsonb_path_query",
    "jsonb_path_exists",
    "jsonb_path_match",
    "jsonb_path_query_array",
    "jsonb_path_query_first",
    // arrays and sets
    "array_append",
    "array_cat",
    "array_dims",
    "array_fill",
    "array_length",
    "array_lower",
    "array_ndims",
    "array_position",
    "array_positions",
    "array_prepend",
    "array_remove",
    "array_replace",
    "array_upper",
    "cardinality",
    "unnest",
    "generate_series",
    "generate_subscripts",
    "trim_array",
    // other
    "gen_random_uuid",
    "has_table_privilege",
    "has_column_privilege",
    "has_schema_privilege",
    "has_database_privilege",
    "has_function_privilege",
    "has_sequence_privilege",
    "pg_typeof",
    "pg_size_pretty",
    "pg_size_bytes",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "pg_input_is_valid",
    "pg_input_error_info",
];

/// Functions outside `pg_` that answer about this server or session, or
/// act on them (`pg_`-prefixed ones are server-local unless listed above).
const SERVER_LOCAL: &[&str] = &[
    "currval",
    "lastval",
    "version",
    "inet_server_addr",
    "inet_server_port",
    "inet_client_addr",
    "inet_client_port",
    "txid_current",
    "txid_current_if_assigned",
    "txid_current_snapshot",
    "txid_snapshot_xmin",
    "txid_snapshot_xmax",
    "txid_snapshot_xip",
    "txid_visible_in_snapshot",
    "txid_status",
    "current_setting",
    "mxid_age",
    "row_security_active",
    "obj_description",
    "col_description",
    "shobj_description",
    "to_regclass",
    "to_regtype",
    "to_regproc",
    "to_regprocedure",
    "to_regoper",
    "to_regoperator",
    "to_regnamespace",
    "to_regrole",
    "to_regcollation",
];

/// System columns: physical positions and transaction ids, per server.
const SYSTEM_COLUMNS: &[&str] = &["ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"];

/// Types whose values are OIDs, transaction ids or WAL positions.
const SERVER_TYPES: &[&str] = &[
    "oid",
    "regclass",
    "regtype",
    "regproc",
    "regprocedure",
    "regoper",
    "regoperator",
    "regnamespace",
    "regrole",
    "regconfig",
    "regdictionary",
    "regcollation",
    "xid",
    "xid8",
    "cid",
    "tid",
    "pg_lsn",
    "txid_snapshot",
    "pg_snapshot",
];

/// Schemas whose relations describe the server itself.
const SERVER_SCHEMAS: &[&str] = &["pg_catalog", "information_schema", "pg_toast"];

/// A function call, by its lower-cased bare name and schema (if written).
pub fn function(schema: Option<&str>, bare: &str) -> Reads {
    match schema {
        Some("pg_catalog") | None => {}
        // A function in a schema of the application's: it may do anything.
        Some(_) => {
            return Reads {
                scope: Scope::Data,
                calls: true,
            }
        }
    }
    if PORTABLE.contains(&bare) {
        Reads::DATA
    } else if SERVER_LOCAL.contains(&bare) || bare.starts_with("pg_") {
        Reads::SERVER
    } else {
        Reads {
            scope: Scope::Data,
            calls: true,
        }
    }
}

/// A relation, by its lower-cased name and schema (if written).
pub fn relation(schema: Option<&str>, name: &str) -> Reads {
    let server = match schema {
        Some(s) => SERVER_SCHEMAS.contains(&s),
        None => name.starts_with("pg_"),
    };
    if server {
        Reads::SERVER
    } else {
        Reads::DATA
    }
}

pub fn is_system_column(name: &str) -> bool {
    SYSTEM_COLUMNS.contains(&name)
}

pub fn is_server_type(name: &str) -> bool {
    SERVER_TYPES.contains(&name)
}

/// Words that may stand before `(` without calling a function: keywords,
/// type names with modifiers, and grammar forms written like calls.
const PAREN_WORDS: &[&str] = &[
    "in",
    "exists",
    "any",
    "all",
    "some",
    "values",
    "as",
    "over",
    "filter",
    "within",
    "cast",
    "from",
    "join",
    "on",
    "using",
    "and",
    "or",
    "not",
    "select",
    "where",
    "when",
    "then",
    "else",
    "by",
    "lateral",
    "row",
    "array",
    "extract",
    "position",
    "substring",
    "overlay",
    "trim",
    "coalesce",
    "nullif",
    "greatest",
    "least",
    "numeric",
    "decimal",
    "varchar",
    "char",
    "character",
    "varying",
    "timestamp",
    "time",
    "interval",
    "bit",
    "float",
    "grouping",
    "rollup",
    "cube",
    "sets",
    "union",
    "except",
    "intersect",
    "distinct",
    "limit",
    "offset",
    "is",
    "like",
    "ilike",
    "between",
    "case",
    "with",
    "recursive",
    "tablesample",
    "table",
    "only",
    "having",
    "set",
    "collate",
    "escape",
    "similar",
];

/// The lexical pass's view of one word before `(`: `None` when it is not a
/// call at all, otherwise what calling it reads.
pub fn lexical_call(word: &str) -> Option<Reads> {
    if PAREN_WORDS.contains(&word) {
        return None;
    }
    Some(function(None, word))
}

/// Whether a bare word in a read could be anything but table data (a
/// system catalog or column, a server type): the lexical pass then asks
/// the parser.
pub fn lexical_word_is_suspect(word: &str) -> bool {
    word.starts_with("pg_")
        || SERVER_SCHEMAS.contains(&word)
        || is_system_column(word)
        || is_server_type(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_are_portable_server_local_or_unknown_calls() {
        assert_eq!(function(None, "count"), Reads::DATA);
        assert_eq!(function(Some("pg_catalog"), "lower"), Reads::DATA);
        assert_eq!(function(None, "pg_backend_pid"), Reads::SERVER);
        assert_eq!(function(None, "pg_terminate_backend"), Reads::SERVER);
        assert_eq!(function(None, "currval"), Reads::SERVER);
        assert_eq!(function(None, "pg_typeof"), Reads::DATA);
        let call = Reads {
            scope: Scope::Data,
            calls: true,
        };
        assert_eq!(function(None, "my_func"), call);
        // Qualified with an application schema: the application's function,
        // whatever its name.
        assert_eq!(function(Some("app"), "count"), call);
        assert_eq!(function(Some("app"), "pg_backend_pid"), call);
    }

    #[test]
    fn relations_of_the_system_schemas_are_server_local() {
        assert_eq!(relation(None, "pg_stat_activity"), Reads::SERVER);
        assert_eq!(relation(Some("pg_catalog"), "pg_class"), Reads::SERVER);
        assert_eq!(
            relation(Some("information_schema"), "tables"),
            Reads::SERVER
        );
        assert_eq!(relation(None, "accounts"), Reads::DATA);
        assert_eq!(relation(Some("app"), "pg_things"), Reads::DATA);
    }

    #[test]
    fn lexical_calls_skip_keywords() {
        assert_eq!(lexical_call("in"), None);
        assert_eq!(lexical_call("count"), Some(Reads::DATA));
        assert_eq!(lexical_call("f").map(|r| r.calls), Some(true));
        assert!(lexical_word_is_suspect("ctid"));
        assert!(lexical_word_is_suspect("pg_locks"));
        assert!(!lexical_word_is_suspect("aid"));
    }
}
