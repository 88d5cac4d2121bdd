//! The classifier corpus: every case the mirror and the router must get
//! right, checked through the public entry point and, wherever the lexical
//! pass answers, checked against the parser too.

use super::*;

fn rules() -> Rules {
    Rules::new(&["audit_log".to_string(), "app.bump".to_string()])
}

/// Classifies through both paths; the lexical answer, when given, must equal
/// the parser's.
fn class(sql: &str) -> Vec<Class> {
    let r = rules();
    let parsed = parser::classify(sql, &r);
    if let Ok(stmts) = lexer::split(sql) {
        let lex: Option<Vec<Class>> = stmts.iter().map(|s| lexical(s, &r)).collect();
        if let Some(lex) = lex {
            assert_eq!(
                lex, parsed,
                "lexical pass disagrees with the parser on {sql:?}"
            );
        }
    }
    let mut c = Classifier::new(Arc::new(r));
    let via = c.classify(sql).to_vec();
    assert_eq!(
        via, parsed,
        "classifier disagrees with the parser on {sql:?}"
    );
    via
}

fn one(sql: &str) -> Class {
    let v = class(sql);
    assert_eq!(v.len(), 1, "{sql:?} gave {v:?}");
    v.into_iter().next().unwrap()
}

use Class::*;

const READ: Class = Class::READ;
const CALLS: Class = Class::Read(Reads {
    scope: Scope::Data,
    calls: true,
});
const SERVER: Class = Class::Read(Reads::SERVER);
const SESSION: Class = Class::Read(Reads::SESSION);

#[test]
fn plain_reads() {
    for sql in [
        "SELECT 1",
        "select abalance from pgbench_accounts where aid = 42",
        "SELECT * FROM t WHERE a IN (SELECT b FROM u) ORDER BY 1 LIMIT 5",
        "VALUES (1), (2)",
        "TABLE t",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "SELECT count(*), lower(name) FROM t GROUP BY 2",
        "SELECT pg_sleep(0)",
        "COPY t TO STDOUT",
        "COPY (SELECT * FROM t) TO STDOUT",
        "SELECT updated_at, \"update\" FROM t", // words that only look like keywords
        "SELECT 'nextval(1)', $$ insert into t $$ FROM t",
        "SELECT a.x FROM t a JOIN u ON u.id = a.id WHERE a.v IN (1, 2)",
        "SELECT \"users\".\"id\" FROM \"users\" WHERE \"users\".\"email\" = $1",
        "SELECT coalesce(max(v), 0)::numeric(10,2) FROM t",
    ] {
        assert_eq!(one(sql), READ, "{sql}");
    }
}

#[test]
fn reads_of_server_or_session_state_are_not_portable() {
    for sql in [
        "SHOW search_path",
        "EXPLAIN SELECT * FROM t",
        "EXPLAIN (ANALYZE false) DELETE FROM t",
        "EXPLAIN DELETE FROM t",
        "EXPLAIN ANALYZE SELECT 1",
        "SELECT * FROM pg_stat_activity",
        "SELECT pid FROM pg_catalog.pg_locks",
        "SELECT pg_backend_pid()",
        "SELECT pg_cancel_backend(123)",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'x'",
        "SELECT inet_server_port()",
        "SELECT currval('s')",
        "SELECT version()",
        "SELECT current_setting('port')",
        "SELECT ctid, * FROM t",
        "SELECT t.xmin FROM t",
        "SELECT 't'::regclass::oid",
        "SELECT table_name FROM information_schema.tables",
        "SELECT typname FROM pg_type WHERE oid = $1",
        "COPY pg_class TO STDOUT",
        // Files and programs on the server's own host.
        "COPY t TO '/tmp/t.csv'",
        "COPY (SELECT 1) TO PROGRAM 'cat > /dev/null'",
    ] {
        assert_eq!(one(sql), SERVER, "{sql}");
    }
    for sql in [
        "FETCH 10 FROM c",
        "MOVE NEXT IN c",
        "CLOSE c",
        "DECLARE c CURSOR FOR SELECT * FROM t",
    ] {
        assert_eq!(one(sql), SESSION, "{sql}");
    }
}

#[test]
fn reads_that_call_unknown_functions_may_write() {
    for sql in [
        "SELECT f()",
        "SELECT my_schema.lower(v) FROM t",
        "SELECT * FROM t WHERE v = \"f\"(1)",
        "SELECT * FROM generate_report($1)",
        "WITH x AS (SELECT touch(id) FROM t) SELECT count(*) FROM x",
    ] {
        assert_eq!(one(sql), CALLS, "{sql}");
    }
    // Server-local and unknown together: never routed, and still probed.
    assert_eq!(
        one("SELECT f(), pg_backend_pid()"),
        Class::Read(Reads {
            scope: Scope::Server,
            calls: true
        })
    );
}

#[test]
fn writes_of_every_shape() {
    for sql in [
        "INSERT INTO t VALUES (1)",
        "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET v = excluded.v",
        "INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING",
        "UPDATE t SET v = 1",
        "DELETE FROM t",
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET v = s.v",
        "TRUNCATE t",
        "CREATE TABLE x (a int)",
        "ALTER TABLE x ADD b int",
        "DROP TABLE x",
        "CREATE INDEX CONCURRENTLY i ON t (a)",
        "GRANT SELECT ON t TO public",
        "REVOKE SELECT ON t FROM public",
        "VACUUM t",
        "ANALYZE t",
        "VACUUM (ANALYZE) t",
        "NOTIFY chan, 'payload'",
        "CALL proc(1)",
        "DO $$ BEGIN INSERT INTO t VALUES (1); END $$",
        "DO $body$ BEGIN PERFORM 1; END $body$ LANGUAGE plpgsql",
        "COPY t FROM STDIN",
        "COPY t (a, b) FROM STDIN WITH (FORMAT csv)",
        "COPY (INSERT INTO t VALUES (1) RETURNING *) TO STDOUT",
        "WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x",
        "WITH x AS (UPDATE t SET v = 2 RETURNING *) SELECT * FROM x",
        "WITH x AS (DELETE FROM t RETURNING *) SELECT count(*) FROM x",
        "SELECT * INTO newtable FROM t",
        "EXPLAIN ANALYZE UPDATE t SET v = 1",
        "EXPLAIN (ANALYZE, BUFFERS) INSERT INTO t VALUES (1)",
        "EXPLAIN (ANALYZE true) DELETE FROM t",
        "SELECT nextval('s')",
        "SELECT pg_catalog.setval('s', 10)",
        "SELECT \"nextval\"('s')",
        "SELECT set_config('search_path', 'x', false)",
        "SELECT pg_notify('c', 'x')",
        "SELECT lo_create(0)",
        "SELECT audit_log('x')",   // configured write function
        "SELECT app.bump(1)",      // configured, schema-qualified
        "SELECT x.audit_log('y')", // a bare configured name matches any schema
        "SELECT * FROM t WHERE a = (SELECT nextval('s'))",
        "COMMIT PREPARED 'gid'",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END",
        "REFRESH MATERIALIZED VIEW m",
        "CHECKPOINT",
        "SECURITY LABEL ON TABLE t IS 'x'",
    ] {
        assert_eq!(one(sql), Write, "{sql}");
    }
}

#[test]
fn configured_names_only_match_where_they_should() {
    // app.bump is configured qualified: another schema's bump is a read.
    assert_eq!(one("SELECT other.bump(1)"), CALLS);
    assert_eq!(one("SELECT bump_count FROM t"), READ);
}

#[test]
fn locks_are_neither_reads_nor_writes() {
    for sql in [
        "SELECT * FROM t FOR UPDATE",
        "SELECT * FROM t FOR SHARE",
        "SELECT * FROM t FOR NO KEY UPDATE",
        "SELECT * FROM t FOR KEY SHARE",
        "SELECT * FROM t WHERE id IN (SELECT id FROM u FOR UPDATE SKIP LOCKED)",
        "SELECT pg_advisory_lock(1)",
        "SELECT pg_try_advisory_xact_lock(1, 2)",
        "LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
        "DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE",
    ] {
        assert_eq!(one(sql), Lock, "{sql}");
    }
    // A write anywhere wins over a lock.
    assert_eq!(
        one("SELECT pg_advisory_lock(1), nextval('s')"),
        Write,
        "write beats lock"
    );
}

#[test]
fn transaction_control() {
    assert_eq!(one("BEGIN"), Begin { read_only: false });
    assert_eq!(
        one("begin transaction isolation level serializable"),
        Begin { read_only: false }
    );
    assert_eq!(one("BEGIN READ ONLY"), Begin { read_only: true });
    assert_eq!(
        one("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"),
        Begin { read_only: true }
    );
    assert_eq!(
        one("START TRANSACTION READ WRITE"),
        Begin { read_only: false }
    );
    for sql in [
        "COMMIT",
        "END",
        "ROLLBACK",
        "ABORT",
        "SAVEPOINT a",
        "RELEASE SAVEPOINT a",
        "ROLLBACK TO SAVEPOINT a",
        "PREPARE TRANSACTION 'gid'",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SET CONSTRAINTS ALL DEFERRED",
        "COMMIT AND CHAIN",
    ] {
        assert_eq!(one(sql), TxnControl, "{sql}");
    }
}

#[test]
fn session_state() {
    assert_eq!(
        one("SET search_path = app, public"),
        Session(SessionOp::Set)
    );
    assert_eq!(
        one("SET SESSION statement_timeout TO 0"),
        Session(SessionOp::Set)
    );
    assert_eq!(
        one("set local work_mem = '64MB'"),
        Session(SessionOp::SetLocal)
    );
    assert_eq!(one("RESET search_path"), Session(SessionOp::Set));
    assert_eq!(one("RESET ALL"), Session(SessionOp::ResetAll));
    assert_eq!(one("SET ROLE app"), Session(SessionOp::Set));
    assert_eq!(
        one("DISCARD ALL"),
        Session(SessionOp::Discard {
            all: true,
            temp: true
        })
    );
    assert_eq!(
        one("DISCARD TEMP"),
        Session(SessionOp::Discard {
            all: false,
            temp: true
        })
    );
    assert_eq!(
        one("DISCARD PLANS"),
        Session(SessionOp::Discard {
            all: false,
            temp: false
        })
    );
    assert_eq!(
        one("PREPARE ins (int) AS INSERT INTO t VALUES ($1)"),
        Session(SessionOp::Prepare {
            name: "ins".into(),
            body: Box::new(Write)
        })
    );
    assert_eq!(
        one("PREPARE sel AS SELECT * FROM t WHERE id = $1"),
        Session(SessionOp::Prepare {
            name: "sel".into(),
            body: Box::new(READ)
        })
    );
    assert_eq!(one("EXECUTE ins(1)"), Execute { name: "ins".into() });
    assert_eq!(
        one("DEALLOCATE ins"),
        Session(SessionOp::Deallocate {
            name: Some("ins".into())
        })
    );
    assert_eq!(
        one("DEALLOCATE ALL"),
        Session(SessionOp::Deallocate { name: None })
    );
    assert_eq!(one("LISTEN chan"), Session(SessionOp::SourceOnly));
    assert_eq!(one("UNLISTEN *"), Session(SessionOp::SourceOnly));
}

#[test]
fn multi_statement_strings_are_split_and_each_part_classified() {
    assert_eq!(
        class("BEGIN; UPDATE t SET v = 1; SELECT 1; COMMIT;"),
        vec![Begin { read_only: false }, Write, READ, TxnControl]
    );
    // A `;` inside a string, a comment or a dollar quote does not split.
    assert_eq!(
        class("SELECT ';' /* ; */ -- ;\n; DO $$ BEGIN UPDATE t SET v = 1; END $$"),
        vec![READ, Write]
    );
    assert!(class("").is_empty());
    assert!(class(" ; -- nothing").is_empty());
}

#[test]
fn comments_and_quoting_never_fool_it() {
    assert_eq!(one("/* SELECT */ DELETE FROM t"), Write);
    assert_eq!(one("-- DELETE\nSELECT 1"), READ);
    assert_eq!(one("SELECT '; DELETE FROM t'"), READ);
    assert_eq!(one("SELECT $x$ ; DELETE FROM t; $x$"), READ);
    assert_eq!(one("SELECT /* nextval('s') */ 1"), READ);
    assert_eq!(
        one("/* a /* nested */ comment */ INSERT INTO t VALUES (1)"),
        Write
    );
    assert_eq!(one("  \n\tselect 1 for update"), Lock);
}

#[test]
fn what_cannot_be_classified_is_a_write() {
    assert_eq!(class("SELEC 1"), vec![Write]);
    assert_eq!(class("SELECT 'unterminated"), vec![Write]);
    assert_eq!(class("FOO BAR"), vec![Write]);
}

#[test]
fn the_lexical_pass_answers_the_common_shapes_and_the_cache_the_rest() {
    let mut c = Classifier::new(Arc::new(rules()));
    c.classify("SELECT abalance FROM pgbench_accounts WHERE aid = 1");
    c.classify("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1");
    c.classify("BEGIN");
    assert_eq!(c.stats.lexical, 3);
    assert_eq!(c.stats.parsed, 0);
    c.classify("SELECT * FROM t FOR UPDATE");
    c.classify("SELECT * FROM t FOR UPDATE");
    assert_eq!((c.stats.parsed, c.stats.cached), (1, 1));
}

#[test]
fn server_local_reads_are_told_from_data_reads_for_the_outcome_check() {
    assert!(crate::classify::is_server_local_read(
        "SELECT t.oid, t.typname FROM pg_catalog.pg_type t WHERE t.oid = ANY($1::oid[])"
    ));
    assert!(crate::classify::is_server_local_read(
        "SELECT count(*) FROM pg_stat_activity"
    ));
    assert!(!crate::classify::is_server_local_read(
        "SELECT count(*) FROM orders"
    ));
    assert!(!crate::classify::is_server_local_read(
        "UPDATE orders SET v = 1"
    ));
    assert!(!crate::classify::is_server_local_read(
        "SELECT 1; SELECT oid FROM pg_class"
    ));
}

#[test]
fn session_statements_are_found_by_their_first_words() {
    // Whatever the classifier calls a session operation, the word pre-check
    // finds: the capture skips classifying only what it rules out.
    let session = [
        "SET search_path = app",
        "  set local statement_timeout = 5",
        "/* app:web */ SET application_name = 'x'",
        "-- note\nRESET ALL",
        "/* outer /* nested */ still */ discard all",
        "select 1; SET TIME ZONE 'UTC'",
        "select ';'; deallocate all",
        "PREPARE q AS select 1",
        "LISTEN ch",
        "unlisten *",
        "LOAD 'auto_explain'",
        "CALL app.bump(1)",
        "DO $$ begin perform 1; end $$",
    ];
    for sql in session {
        let classes = class(sql);
        assert!(
            classes
                .iter()
                .any(|c| matches!(c, Session(_)) || *c == Write),
            "{sql:?} is not a session operation nor a CALL/DO: {classes:?}"
        );
        assert!(
            starts_with_word(sql.as_bytes(), SESSION_OP_WORDS),
            "{sql:?}"
        );
    }
    for sql in [
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 7",
        "select 'set x = 1'",
        "select reset_val from pg_settings",
        "/* set */ select 1",
        "-- set\nselect 1",
        "/* unterminated set",
        "",
    ] {
        assert!(
            !starts_with_word(sql.as_bytes(), SESSION_OP_WORDS),
            "{sql:?}"
        );
    }
    // A ';' in a literal starts a statement the server does not see: the
    // pre-check says yes too often, never too rarely.
    assert!(starts_with_word(b"select 'a; set b'", SESSION_OP_WORDS));
    assert_eq!(
        statement_first_words(b" select 1 ;insert into t values (1);;  ").collect::<Vec<_>>(),
        [&b"select"[..], b"insert"]
    );
}

#[test]
fn first_words_skip_blanks_and_comments_only() {
    assert_eq!(first_word(b"  /* c */ -- d\n Call p()"), Some(&b"Call"[..]));
    assert_eq!(first_word(b"(select 1); call p()"), None);
    assert_eq!(first_word(b"   "), None);
    assert_eq!(first_word(b"-- only a comment"), None);
}

/// The word scan before `mentions_word` jumped with memchr: one pass,
/// comparing where words start.
fn mentions_word_reference(sql: &[u8], words: &[&[u8]]) -> bool {
    let is_word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut prev_word = false;
    for (i, &c) in sql.iter().enumerate() {
        let starts = !prev_word && c.is_ascii_alphabetic();
        prev_word = is_word(c);
        if starts
            && words.iter().any(|w| {
                w.first() == Some(&c.to_ascii_lowercase())
                    && sql
                        .get(i..i + w.len())
                        .is_some_and(|s| s.eq_ignore_ascii_case(w))
                    && sql.get(i + w.len()).is_none_or(|&n| !is_word(n))
            })
        {
            return true;
        }
    }
    false
}

#[test]
fn mentions_word_finds_whole_words_in_any_case_as_the_plain_scan_did() {
    let texts: &[&[u8]] = &[
        b"CREATE TEMP TABLE t (a int)",
        b"create temporary table t as select 1",
        b"select * into Temp x from y",
        b"select tempo, attempt, temp_x, xtemp from temps",
        b"select 1 -- temp",
        b"TEMP",
        b"temp;",
        b"_temp temp_ 9temp",
        b"\xc3\xa9temp \xc3\xa9",
        b"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 5",
        b"set search_path = x; reset all",
        b"",
        b"t",
        b"te",
        b"Tmp tEmPoRaRy",
    ];
    let lists: &[&[&[u8]]] = &[
        &[b"temp", b"temporary"],
        &[b"temp"],
        &[b"set", b"reset"],
        &[b"set", b"reset", b"discard", b"deallocate"],
        &[b"into", b"temp", b"abalance"],
        &[],
    ];
    for &t in texts {
        for &w in lists {
            assert_eq!(
                mentions_word(t, w),
                mentions_word_reference(t, w),
                "{:?} in {:?}",
                w.iter()
                    .map(|w| String::from_utf8_lossy(w))
                    .collect::<Vec<_>>(),
                String::from_utf8_lossy(t)
            );
        }
    }
    assert!(mentions_word(b"create TEMP table t", &[b"temp"]));
    assert!(!mentions_word(b"select attempt", &[b"temp"]));
}
