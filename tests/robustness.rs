//! Malformed, oversized, stalled and vanishing clients, with raw TCP sockets
//! speaking (or not quite speaking) the wire protocol to a real pgshift.
//! After each abuse the same proxy must still serve a normal psql session,
//! and a client that disappears must not leave its source backend, its
//! locks or its half-done work behind.
mod common;
use common::*;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

// ------------------------------------------------------------------ wire helpers

fn connect(p: &Proxy) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", p.port)).expect("connect to the proxy");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A StartupMessage (or any versioned first packet) with parameters.
fn startup_packet(major: u16, minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&major.to_be_bytes());
    body.extend_from_slice(&minor.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// A tagged message.
fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn query(sql: &str) -> Vec<u8> {
    let mut b = sql.as_bytes().to_vec();
    b.push(0);
    msg(b'Q', &b)
}

/// Reads one tagged message; None on a clean EOF (or a reset) before it.
fn read_msg(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    if let Err(e) = s.read_exact(&mut head) {
        return match e.kind() {
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset => None,
            _ => panic!("reading from the proxy: {e}"),
        };
    }
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    assert!(
        (4..1 << 24).contains(&len),
        "bad length {len} for message {:?}",
        head[0] as char
    );
    let mut body = vec![0u8; len as usize - 4];
    s.read_exact(&mut body).expect("message body");
    Some((head[0], body))
}

/// The fields of an ErrorResponse body by their one-byte codes.
fn fields(body: &[u8]) -> HashMap<u8, String> {
    let mut out = HashMap::new();
    let mut rest = body;
    while let Some((&f, r)) = rest.split_first() {
        if f == 0 {
            break;
        }
        let nul = r.iter().position(|&b| b == 0).expect("terminated field");
        out.insert(f, String::from_utf8_lossy(&r[..nul]).into_owned());
        rest = &r[nul + 1..];
    }
    out
}

/// Reads messages until ReadyForQuery; panics on an ErrorResponse or EOF.
fn read_until_ready(s: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut got = Vec::new();
    loop {
        let m =
            read_msg(s).unwrap_or_else(|| panic!("EOF before ReadyForQuery; got {:?}", tags(&got)));
        if m.0 == b'E' {
            panic!("unexpected error: {:?}", fields(&m.1));
        }
        let done = m.0 == b'Z';
        got.push(m);
        if done {
            return got;
        }
    }
}

fn tags(msgs: &[(u8, Vec<u8>)]) -> String {
    msgs.iter().map(|m| m.0 as char).collect()
}

/// A logged-in raw session (trust user postgres) ready for queries.
fn raw_session(p: &Proxy, db: &str, app: &str) -> TcpStream {
    let mut s = connect(p);
    s.write_all(&startup_packet(
        3,
        0,
        &[
            ("user", SUPERUSER),
            ("database", db),
            ("application_name", app),
        ],
    ))
    .unwrap();
    let got = read_until_ready(&mut s);
    assert_eq!(
        got[0].0,
        b'R',
        "expected AuthenticationOk first, got {}",
        tags(&got)
    );
    s
}

/// Expects an ErrorResponse with this SQLSTATE (other messages before it
/// are skipped), then the connection closed by the proxy. Returns the fields.
#[track_caller]
fn expect_error_and_close(s: &mut TcpStream, code: &str) -> HashMap<u8, String> {
    let f = loop {
        match read_msg(s) {
            Some((b'E', body)) => break fields(&body),
            Some(_) => continue,
            None => panic!("connection closed without an ErrorResponse (expected {code})"),
        }
    };
    assert_eq!(
        f.get(&b'C').map(String::as_str),
        Some(code),
        "error fields: {f:?}"
    );
    assert_eq!(
        f.get(&b'S').map(String::as_str),
        Some("FATAL"),
        "error fields: {f:?}"
    );
    expect_closed(s);
    f
}

/// The proxy closes the connection: EOF (or a reset) within the read timeout.
#[track_caller]
fn expect_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => assert!(
                Instant::now() < deadline,
                "still receiving data ({n} bytes) instead of a close"
            ),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
            Err(e) => panic!("expected the proxy to close the connection, got {e}"),
        }
    }
}

/// The proxy closes the connection without sending a byte, as Postgres does
/// for a startup packet whose length is invalid (it only logs it).
#[track_caller]
fn expect_closed_silently(s: &mut TcpStream) {
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("got {n} bytes instead of a silent close: {:?}", &buf[..n]),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected the proxy to close the connection, got {e}"),
    }
}

fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .map(|(_, rest)| !rest.starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// The proxy is alive, never panicked, and serves a fresh psql session.
#[track_caller]
fn assert_healthy(p: &Proxy) {
    assert!(process_alive(p.pid()), "pgshift died:\n{}", p.log());
    let out = psql(
        &p.url(SUPERUSER, "postgres"),
        &["-Atc", "select 'still here', inet_server_port()"],
        None,
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        p.log()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("still here|{}", p.clusters.source_port)
    );
    assert!(
        !p.log().contains("panicked"),
        "pgshift panicked:\n{}",
        p.log()
    );
    assert!(process_alive(p.pid()));
}

/// Source backends with this application_name.
fn source_backends(c: &Clusters, app: &str) -> i64 {
    c.sql(
        c.source_port,
        "postgres",
        &format!("select count(*) from pg_stat_activity where application_name = '{app}'"),
    )
    .parse()
    .unwrap()
}

#[track_caller]
fn wait_backend_gone(p: &Proxy, app: &str, secs: u64) {
    let c = p.clusters.clone();
    p.wait_for(
        secs,
        &format!("the source backend of {app} to go away"),
        |_| source_backends(&c, app) == 0,
    );
}

// ------------------------------------------------------------- malformed input

#[test]
fn http_request_instead_of_startup_is_closed_and_counted() {
    let p = Proxy::start();
    let mut s = connect(&p);
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    // Its first four bytes make an invalid length: Postgres logs
    // "invalid length of startup packet" and closes without a word.
    expect_closed_silently(&mut s);
    p.wait_for(60, "the protocol error to be counted", |p| {
        p.stat("/metrics/clients/protocol_errors") == 1
    });
    assert_healthy(&p);
}

#[test]
fn bad_startup_packets_are_closed_as_postgres_does() {
    let p = Proxy::start();
    // Over Postgres' 10000-byte bound: closed from the length alone, with
    // nothing sent (as Postgres does).
    let mut s = connect(&p);
    s.write_all(&20_000i32.to_be_bytes()).unwrap();
    s.write_all(&196608u32.to_be_bytes()).unwrap();
    let _ = s.write_all(b"user\0postgres\0\0");
    expect_closed_silently(&mut s);
    // A length too small to hold a protocol version.
    let mut s = connect(&p);
    s.write_all(&[0, 0, 0, 4]).unwrap();
    expect_closed_silently(&mut s);
    // A startup packet whose parameters are not terminated: FATAL 08P01
    // ("invalid startup packet layout").
    let mut s = connect(&p);
    let mut bad = startup_packet(3, 0, &[("user", SUPERUSER)]);
    bad.pop();
    bad[3] -= 1;
    s.write_all(&bad).unwrap();
    expect_error_and_close(&mut s, "08P01");
    assert_eq!(p.stat("/metrics/clients/protocol_errors"), 3);
    assert_healthy(&p);
}

#[test]
fn unknown_message_type_after_login_gets_08p01_and_frees_the_backend() {
    let p = Proxy::start();
    let mut s = raw_session(&p, "postgres", "robust_unknown_type");
    assert_eq!(source_backends(&p.clusters, "robust_unknown_type"), 1);
    s.write_all(&msg(b'z', b"")).unwrap();
    let f = expect_error_and_close(&mut s, "08P01");
    assert!(f[&b'M'].contains("invalid frontend message type"), "{f:?}");
    wait_backend_gone(&p, "robust_unknown_type", 10);
    assert_healthy(&p);
}

#[test]
fn message_length_below_four_gets_08p01() {
    let p = Proxy::start();
    let mut s = raw_session(&p, "postgres", "robust_short_len");
    s.write_all(b"Q\0\0\0\x02").unwrap();
    let f = expect_error_and_close(&mut s, "08P01");
    assert!(f[&b'M'].contains("invalid message length"), "{f:?}");
    // A negative length too.
    let mut s = raw_session(&p, "postgres", "robust_neg_len");
    s.write_all(b"d\xff\xff\xff\xf0").unwrap();
    expect_error_and_close(&mut s, "08P01");
    wait_backend_gone(&p, "robust_short_len", 10);
    wait_backend_gone(&p, "robust_neg_len", 10);
    assert_healthy(&p);
}

#[tokio::test(flavor = "multi_thread")]
async fn query_over_max_message_bytes_gets_08p01_but_streamed_messages_are_not_limited() {
    let p = tokio::task::block_in_place(|| {
        Proxy::start_with(|c| c["limits"]["max_message_bytes"] = toml_edit::value(4096))
    });
    // Under the limit: fine.
    let (client, conn) = p
        .pg_config(SUPERUSER, "postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    let sql = format!("select length('{}')", "x".repeat(3000));
    let rows = client.simple_query(&sql).await.unwrap();
    let value = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("3000"));
    // A 1 MB Bind parameter is streamed, not buffered: the limit does not apply.
    let big = "y".repeat(1 << 20);
    let row = client
        .query_one("select length($1::text)", &[&big])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1 << 20);
    drop(client);
    task.await.unwrap().unwrap();

    tokio::task::block_in_place(|| {
        // A Query header announcing 1 MB: refused from the header alone.
        let mut s = raw_session(&p, "postgres", "robust_big_query");
        let mut header = vec![b'Q'];
        header.extend_from_slice(&((1i32 << 20) + 4).to_be_bytes());
        s.write_all(&header).unwrap();
        let _ = s.write_all(&vec![b'x'; 8192]);
        let f = expect_error_and_close(&mut s, "08P01");
        assert!(f[&b'M'].contains("over the limit of 4096"), "{f:?}");
        wait_backend_gone(&p, "robust_big_query", 10);
        assert_healthy(&p);
    });
}

#[test]
fn malformed_parse_gets_08p01() {
    let p = Proxy::start();
    // Parse whose strings are not terminated: the length covers exactly the
    // bytes sent, but the body is not a valid Parse.
    let mut s = raw_session(&p, "postgres", "robust_bad_parse");
    s.write_all(&msg(b'P', b"stmt\0select 1")).unwrap();
    let f = expect_error_and_close(&mut s, "08P01");
    assert!(f[&b'M'].contains("invalid message format"), "{f:?}");
    // Parse whose parameter count promises more type OIDs than its length holds.
    let mut s = raw_session(&p, "postgres", "robust_bad_parse2");
    s.write_all(&msg(b'P', b"s\0select $1\0\0\x05\0\0\0\x17"))
        .unwrap();
    expect_error_and_close(&mut s, "08P01");
    // Query without its terminator.
    let mut s = raw_session(&p, "postgres", "robust_bad_query");
    s.write_all(&msg(b'Q', b"select 1")).unwrap();
    expect_error_and_close(&mut s, "08P01");
    // A well-formed extended-protocol exchange still works on a raw socket.
    let mut s = raw_session(&p, "postgres", "robust_good_parse");
    let mut batch = msg(b'P', b"s1\0select $1::int * 2\0\0\x01\0\0\0\x17");
    batch.extend(msg(b'B', b"\0s1\0\0\0\0\x01\0\0\0\x0221\0\0"));
    batch.extend(msg(b'E', b"\0\0\0\0\0"));
    batch.extend(msg(b'S', b""));
    s.write_all(&batch).unwrap();
    let got = read_until_ready(&mut s);
    assert_eq!(tags(&got), "12DCZ");
    assert_eq!(&got[2].1[6..], b"42");
    for app in ["robust_bad_parse", "robust_bad_parse2", "robust_bad_query"] {
        wait_backend_gone(&p, app, 10);
    }
    assert_eq!(p.stat("/metrics/clients/protocol_errors"), 3);
    assert_healthy(&p);
}

#[test]
fn stalled_startup_times_out_with_08p01() {
    let p = Proxy::start_with(|c| c["limits"]["startup_timeout_ms"] = toml_edit::value(500));
    // Silent from the start.
    let mut s = connect(&p);
    let f = expect_error_and_close(&mut s, "08P01");
    assert!(f[&b'M'].contains("timeout expired during startup"), "{f:?}");
    // Half a startup packet.
    let mut s = connect(&p);
    s.write_all(&startup_packet(3, 0, &[("user", SUPERUSER)])[..6])
        .unwrap();
    expect_error_and_close(&mut s, "08P01");
    // Stalled in the middle of SCRAM: the source asked, the client never answers.
    let mut s = connect(&p);
    s.write_all(&startup_packet(
        3,
        0,
        &[("user", "pgshift_scram"), ("database", "postgres")],
    ))
    .unwrap();
    let (tag, body) = read_msg(&mut s).expect("authentication request");
    assert_eq!(
        (tag, &body[..4]),
        (b'R', &10i32.to_be_bytes()[..]),
        "AuthenticationSASL"
    );
    let f = expect_error_and_close(&mut s, "08P01");
    assert!(f[&b'M'].contains("timeout expired during startup"), "{f:?}");
    // A normal login is well within the limit.
    assert_healthy(&p);
}

/// What the source itself answers to a 3.2 startup: the minor version it
/// offers in NegotiateProtocolVersion, or 2 when it accepts 3.2 as is.
fn source_minor_for_3_2(c: &Clusters) -> u16 {
    let mut s = TcpStream::connect((c.host.as_str(), c.source_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(&startup_packet(
        3,
        2,
        &[("user", SUPERUSER), ("database", "postgres")],
    ))
    .unwrap();
    let (tag, body) = read_msg(&mut s).expect("an answer from the source");
    if tag == b'v' {
        u16::from_be_bytes([body[2], body[3]])
    } else {
        2
    }
}

#[test]
fn newer_protocol_minor_is_negotiated_down_and_the_session_works() {
    let p = Proxy::start();
    let expected = source_minor_for_3_2(&p.clusters).min(2);
    let mut s = connect(&p);
    s.write_all(&startup_packet(
        3,
        99,
        &[("user", SUPERUSER), ("database", "postgres")],
    ))
    .unwrap();
    let got = read_until_ready(&mut s);
    assert_eq!(
        got[0].0,
        b'v',
        "NegotiateProtocolVersion first, got {}",
        tags(&got)
    );
    let v = &got[0].1;
    let (major, minor) = (
        u16::from_be_bytes([v[0], v[1]]),
        u16::from_be_bytes([v[2], v[3]]),
    );
    assert_eq!(
        (major, minor),
        (3, expected),
        "the version the session will really speak"
    );
    assert_eq!(
        i32::from_be_bytes([v[4], v[5], v[6], v[7]]),
        0,
        "no unrecognized options"
    );
    assert_eq!(got[1].0, b'R');
    assert_eq!(&got[1].1[..4], &0i32.to_be_bytes()[..], "AuthenticationOk");
    // BackendKeyData: a 4-byte secret in 3.0, 32 bytes in 3.2.
    let key = got.iter().find(|m| m.0 == b'K').expect("BackendKeyData");
    assert_eq!(key.1.len(), 4 + if expected >= 2 { 32 } else { 4 });
    s.write_all(&query("select 6 * 7 as answer")).unwrap();
    let got = read_until_ready(&mut s);
    assert_eq!(tags(&got), "TDCZ");
    assert_eq!(&got[1].1[6..], b"42");
    s.write_all(&msg(b'X', b"")).unwrap();
    expect_closed(&mut s);
    assert_healthy(&p);
}

#[test]
fn protocol_2_gets_0a000() {
    let p = Proxy::start();
    let mut s = connect(&p);
    s.write_all(&startup_packet(2, 0, &[("user", SUPERUSER)]))
        .unwrap();
    let f = expect_error_and_close(&mut s, "0A000");
    assert!(
        f[&b'M'].contains("unsupported frontend protocol 2.0"),
        "{f:?}"
    );
    // Startup without a user name: 28000 as Postgres.
    let mut s = connect(&p);
    s.write_all(&startup_packet(3, 0, &[("database", "postgres")]))
        .unwrap();
    expect_error_and_close(&mut s, "28000");
    assert_healthy(&p);
}

#[test]
fn ssl_and_gssenc_requests_are_declined_then_startup_proceeds() {
    let p = Proxy::start(); // no listen.tls_*
    let mut s = connect(&p);
    let mut gss = 8i32.to_be_bytes().to_vec();
    gss.extend_from_slice(&80877104u32.to_be_bytes());
    s.write_all(&gss).unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"N");
    let mut ssl = 8i32.to_be_bytes().to_vec();
    ssl.extend_from_slice(&80877103u32.to_be_bytes());
    s.write_all(&ssl).unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"N");
    s.write_all(&startup_packet(
        3,
        0,
        &[("user", SUPERUSER), ("database", "postgres")],
    ))
    .unwrap();
    read_until_ready(&mut s);
    s.write_all(&query("select 1")).unwrap();
    assert_eq!(tags(&read_until_ready(&mut s)), "TDCZ");
    // A second GSSENCRequest or SSLRequest gets what Postgres answers: the
    // request code read as an unsupported protocol version, 0A000.
    for req in [&gss, &ssl] {
        let mut s = connect(&p);
        s.write_all(req).unwrap();
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"N");
        s.write_all(req).unwrap();
        expect_error_and_close(&mut s, "0A000");
    }
    assert_healthy(&p);
}

// ------------------------------------------------------------ abrupt disconnects

#[test]
fn client_vanishing_during_a_long_query_frees_its_backend() {
    let p = Proxy::start();
    let c = p.clusters.clone();
    // (a1) A query that runs a while and whose client is gone when it ends.
    let mut s = raw_session(&p, "postgres", "robust_drop_sleep");
    s.write_all(&query("select pg_sleep(3)")).unwrap();
    p.wait_for(60, "the sleep to run", |_| {
        c.sql(c.source_port, "postgres", "select count(*) from pg_stat_activity where application_name = 'robust_drop_sleep' and state = 'active'") == "1"
    });
    drop(s);
    // (a2) A big result the client stops reading, then drops (with a reset).
    let mut s = raw_session(&p, "postgres", "robust_drop_big");
    s.write_all(&query(
        "select g, repeat('x', 200) from generate_series(1, 20000000) g",
    ))
    .unwrap();
    let mut first = [0u8; 4096];
    s.read_exact(&mut first).unwrap();
    assert_eq!(first[0], b'T', "RowDescription first");
    p.wait_for(60, "the big query to run", |_| {
        source_backends(&c, "robust_drop_big") == 1
    });
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);

    wait_backend_gone(&p, "robust_drop_big", 10);
    wait_backend_gone(&p, "robust_drop_sleep", 15);
    p.wait_for(60, "sessions to be closed", |p| {
        p.stat("/metrics/clients/sessions_active") == 0
    });
    assert_healthy(&p);
}

#[test]
fn client_vanishing_mid_copy_leaves_nothing_behind() {
    let c = Clusters::get();
    c.fresh_db("robust_copy");
    c.sql(
        c.source_port,
        "robust_copy",
        "create table t (id int, v text)",
    );
    let p = Proxy::start();
    let mut s = raw_session(&p, "robust_copy", "robust_drop_copy");
    s.write_all(&query("copy t from stdin")).unwrap();
    let (tag, _) = read_msg(&mut s).expect("CopyInResponse");
    assert_eq!(tag, b'G');
    let mut rows = Vec::new();
    for i in 0..1000 {
        rows.extend(msg(b'd', format!("{i}\trow {i}\n").as_bytes()));
    }
    s.write_all(&rows).unwrap();
    // Half a CopyData, then gone.
    s.write_all(&msg(b'd', b"1001\thalf a row that never ends\n")[..12])
        .unwrap();
    p.wait_for(60, "the copy to be running", |_| {
        c.sql(c.source_port, "postgres", "select count(*) from pg_stat_activity where application_name = 'robust_drop_copy' and query like 'copy%'") == "1"
    });
    drop(s);
    wait_backend_gone(&p, "robust_drop_copy", 10);
    assert_eq!(
        c.sql(c.source_port, "robust_copy", "select count(*) from t"),
        "0"
    );
    // The table is usable: a complete COPY through the proxy works.
    psql_ok(
        &p.url(SUPERUSER, "robust_copy"),
        &["-c", "copy t from stdin"],
        Some(b"1\tone\n2\ttwo\n\\.\n"),
    );
    assert_eq!(
        c.sql(c.source_port, "robust_copy", "select count(*) from t"),
        "2"
    );
    assert_healthy(&p);
}

#[test]
fn client_vanishing_inside_a_transaction_releases_its_locks() {
    let c = Clusters::get();
    c.fresh_db("robust_lock");
    c.sql(
        c.source_port,
        "robust_lock",
        "create table acct (id int primary key, v int); insert into acct values (1, 0)",
    );
    let p = Proxy::start();
    let mut s = raw_session(&p, "robust_lock", "robust_drop_tx");
    s.write_all(&query("begin; update acct set v = 42 where id = 1"))
        .unwrap();
    let got = read_until_ready(&mut s);
    assert_eq!(got.last().unwrap().1, b"T", "inside a transaction block");
    // The row lock is really held: a concurrent update gives up.
    let out = psql(
        &p.url(SUPERUSER, "robust_lock"),
        &[
            "-c",
            "set lock_timeout = '200ms'",
            "-c",
            "update acct set v = v + 1 where id = 1",
        ],
        None,
    );
    assert!(!out.status.success(), "the row was not locked");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lock timeout"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Abrupt: RST, no Terminate.
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    wait_backend_gone(&p, "robust_drop_tx", 10);
    let out = psql(
        &p.url(SUPERUSER, "robust_lock"),
        &[
            "-Atq",
            "-c",
            "set lock_timeout = '5s'",
            "-c",
            "update acct set v = v + 1 where id = 1 returning v",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 1, not 43: the uncommitted 42 was rolled back.
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    assert_eq!(
        c.sql(
            c.source_port,
            "robust_lock",
            "select v from acct where id = 1"
        ),
        "1"
    );
    assert_healthy(&p);
}

#[tokio::test(flavor = "multi_thread")]
async fn bogus_cancel_requests_are_ignored_and_real_ones_work() {
    let p = tokio::task::block_in_place(Proxy::start);
    // A CancelRequest with a key the proxy never issued: no answer, closed.
    tokio::task::block_in_place(|| {
        let mut s = connect(&p);
        let mut req = 16i32.to_be_bytes().to_vec();
        req.extend_from_slice(&80877102u32.to_be_bytes());
        req.extend_from_slice(&12345i32.to_be_bytes());
        req.extend_from_slice(b"nope");
        s.write_all(&req).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        assert!(
            buf.is_empty(),
            "a CancelRequest gets no answer, got {buf:?}"
        );
        p.wait_for(60, "the unknown key to be counted", |p| {
            p.stat("/metrics/cancel/unknown_key") == 1
        });
    });
    // The proxy's own key cancels the right query on the source.
    let (client, conn) = p
        .pg_config(SUPERUSER, "postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    let token = client.cancel_token();
    let clusters = p.clusters.clone();
    let canceller = tokio::spawn(async move {
        let port = clusters.source_port;
        tokio::task::spawn_blocking(move || clusters.wait_running(port, "pg_sleep(30)"))
            .await
            .unwrap();
        token.cancel_query(tokio_postgres::NoTls).await
    });
    let e = client
        .simple_query("select pg_sleep(30)")
        .await
        .expect_err("the sleep was cancelled");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{e}"
    );
    canceller.await.unwrap().unwrap();
    // The session survives its cancelled query.
    let row = query_one_after_cancel(&client, "select 1::int", &[]).await;
    assert_eq!(row.get::<_, i32>(0), 1);
    drop(client);
    task.await.unwrap().unwrap();
    tokio::task::block_in_place(|| {
        assert_eq!(p.stat("/metrics/cancel/forwarded"), 1);
        assert_healthy(&p);
    });
}

#[test]
fn startup_and_first_query_pipelined_in_one_write() {
    let p = Proxy::start();
    let mut s = connect(&p);
    let mut bytes = startup_packet(3, 0, &[("user", SUPERUSER), ("database", "postgres")]);
    bytes.extend(query("select 'pipelined'"));
    bytes.extend(query("select 2"));
    s.write_all(&bytes).unwrap();
    let login = read_until_ready(&mut s);
    assert_eq!(login[0].0, b'R');
    let first = read_until_ready(&mut s);
    assert_eq!(tags(&first), "TDCZ");
    assert_eq!(&first[1].1[6..], b"pipelined");
    let second = read_until_ready(&mut s);
    assert_eq!(tags(&second), "TDCZ");
    assert_eq!(&second[1].1[6..], b"2");
    s.write_all(&msg(b'X', b"")).unwrap();
    expect_closed(&mut s);
    assert_healthy(&p);
}

/// Messages a client pipelines behind its startup packet are read by the
/// authentication relay (session/startup.rs `connect_source`), which bounds
/// them by its own 1 MiB AUTH_MAX_MESSAGE instead of limits.max_message_bytes
/// and, past that, closes the connection with no ErrorResponse at all.
#[test]
fn oversized_query_pipelined_with_startup_gets_08p01() {
    let p = Proxy::start_with(|c| c["limits"]["max_message_bytes"] = toml_edit::value(4096));
    let mut s = connect(&p);
    let mut bytes = startup_packet(3, 0, &[("user", SUPERUSER), ("database", "postgres")]);
    bytes.push(b'Q');
    bytes.extend_from_slice(&((2i32 << 20) + 4).to_be_bytes());
    bytes.extend_from_slice(&[b'x'; 1000]);
    s.write_all(&bytes).unwrap();
    expect_error_and_close(&mut s, "08P01");
    assert_healthy(&p);
}

// ------------------------------------------------- the source ends a session

#[test]
fn after_the_sources_fatal_nothing_routed_reaches_the_client() {
    // Every read routed: the client's next read after the FATAL would go to
    // the target if anything still routed it.
    let p = Proxy::start_with(|cfg| {
        let mut t = toml_edit::Table::new();
        t["read_percent"] = toml_edit::value(100.0);
        t["hash_key"] = toml_edit::value("session");
        cfg["routing"] = toml_edit::Item::Table(t);
    });
    let db = "robust_fatal_routed";
    p.clusters.fresh_db(db);
    mark_sides(&p.clusters, db);
    for i in 0..5 {
        let app = format!("robust_fatal_{i}");
        let mut s = raw_session(&p, db, &app);
        s.write_all(&query(&format!("SELECT {SIDE}"))).unwrap();
        read_until_ready(&mut s);
        // Terminated from outside, as an operator or a failover would.
        p.clusters.sql(
            p.clusters.source_port,
            "postgres",
            &format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = '{app}'"
            ),
        );
        let fatal = loop {
            match read_msg(&mut s) {
                Some((b'E', body)) => break fields(&body),
                Some(_) => continue,
                None => panic!("closed without the source's FATAL"),
            }
        };
        assert_eq!(
            fatal.get(&b'C').map(String::as_str),
            Some("57P01"),
            "{fatal:?}"
        );
        assert_eq!(
            fatal.get(&b'S').map(String::as_str),
            Some("FATAL"),
            "{fatal:?}"
        );
        // Postgres answers nothing after a FATAL: the read right after it
        // gets the close, not a row from the target.
        let _ = s.write_all(&query(&format!("SELECT {SIDE}")));
        expect_closed_silently(&mut s);
    }
    assert_healthy(&p);
}
