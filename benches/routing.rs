//! Routing decisions: the stable hash/threshold test for each hash key kind
//! (`router::policy`), and the per-request `Decider` as the frontend
//! inspector drives it on the client -> source hot path. Throughput is in
//! decisions, so a regression shows as fewer per second.
//!
//! The `Decider` needs no sockets: a `RouteLink`, a `Router` and
//! `RouteMetrics` are plain shared state. The benches call it in the order
//! `FrontendInspector` does (`session/state.rs`: `route_message`, then
//! `inspect_source` / `header_source` for what goes to the source), with
//! `source_idle` as the inspector would compute it; a routed request lands
//! in the link's queue and is taken off again in the same iteration, as
//! the responder would (that pop is a few nanoseconds of the time shown).
//! `FrontendInspector::wants_body` also asks `collects` once per message
//! before `route_message` does; that repeated call is left out.

use std::hint::black_box;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgshift::classify::Rules;
use pgshift::config::{HashKey, RoutingConfig};
use pgshift::protocol::message::{BIND, EXECUTE, SYNC};
use pgshift::router::batch::BatchStep;
use pgshift::router::decide::{Decider, QueryRoute};
use pgshift::router::link::{RouteLink, SessionKeys};
use pgshift::router::policy;
use pgshift::router::{RouteMetrics, Router, RoutingSettings};
use pgshift::tracker::PreparedStatements;

const BATCH: usize = 1000;

const SELECT: &[u8] = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;";
const UPDATE: &[u8] = b"UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;";
const SIMPLE_SELECT: &[u8] = b"SELECT abalance FROM pgbench_accounts WHERE aid = 77123;";
const SIMPLE_UPDATE: &[u8] =
    b"UPDATE pgbench_accounts SET abalance = abalance + -4215 WHERE aid = 77123;";

/// A Query message body: the text and its NUL.
fn query_body(sql: &[u8]) -> Vec<u8> {
    let mut b = sql.to_vec();
    b.push(0);
    b
}

/// pgbench `-M prepared`: Bind of a named statement with one text
/// parameter, Execute of the unnamed portal, Sync.
fn bind_body(statement: &[u8], param: &[u8]) -> Vec<u8> {
    let mut b = vec![0]; // unnamed portal
    b.extend_from_slice(statement);
    b.push(0);
    b.extend_from_slice(&0i16.to_be_bytes()); // parameter formats: all text
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&(param.len() as i32).to_be_bytes());
    b.extend_from_slice(param);
    b.extend_from_slice(&0i16.to_be_bytes()); // result formats: all text
    b
}
const EXECUTE_BODY: &[u8] = b"\0\0\0\0\0";

fn routing_config(read_percent: f64, hash_key: HashKey) -> RoutingConfig {
    RoutingConfig {
        read_percent,
        hash_key,
        ..RoutingConfig::default()
    }
}

/// A session id whose bucket is in (or out of) the cohort at this share.
fn session_id(read_percent: f64, in_cohort: bool) -> u64 {
    (1..)
        .find(|id: &u64| policy::to_target(id.to_string().as_bytes(), read_percent) == in_cohort)
        .unwrap_or(1)
}

/// One session's routing world: what `session::run` builds around a
/// `Decider` (no mirror, no shadow reads).
struct World {
    link: RouteLink,
    router: Router,
    metrics: RouteMetrics,
    keys: SessionKeys,
}

impl World {
    fn new(read_percent: f64, in_cohort: bool) -> Self {
        let link = RouteLink::default();
        link.ready.store(true, Relaxed); // the target connection is up
        Self {
            link,
            router: Router::new(&routing_config(read_percent, HashKey::Session), true),
            metrics: RouteMetrics::new(),
            keys: SessionKeys::new(
                session_id(read_percent, in_cohort),
                "app",
                "pgbench",
                "10.0.3.17",
            ),
        }
    }

    fn decider(&self) -> Decider<'_> {
        Decider::new(
            &self.link,
            &self.router,
            &self.metrics,
            None,
            self.keys,
            Arc::new(Rules::default()),
        )
    }

    /// The responder takes a routed request off the queue (and answers it:
    /// it counts a read the decider marked as counted, as the responder does
    /// once the target has served it).
    fn take_routed(&self) -> usize {
        let r = self.link.queue.lock().unwrap().pop_front();
        self.link.target_in_flight.store(0, Relaxed);
        r.map_or(0, |r| {
            if r.counted {
                self.metrics.read(true);
            }
            r.frames.len()
        })
    }
}

/// A simple Query: `route_message` asks `route_query`; what is not routed
/// goes through `inspect_source`, which shows it to `source_statement`.
fn simple(d: &mut Decider<'_>, w: &World, body: &[u8], sql: &[u8]) -> usize {
    if d.route_query(body, sql, true) == QueryRoute::Target {
        return w.take_routed();
    }
    d.source_statement(sql);
    0
}

/// Bind / Execute / Sync of a prepared statement, with the source idle at
/// the Bind. Held messages go to the Decider's batch; once one is released
/// (or none is held) the rest are streamed to the source and followed by
/// `observe_source` (`header_source`), with the source no longer idle
/// (mid-batch) after the first.
fn extended(
    d: &mut Decider<'_>,
    w: &World,
    st: &PreparedStatements,
    name: &[u8],
    bind: &[u8],
) -> usize {
    let mut idle = true;
    let mut out = 0;
    for (tag, body) in [(BIND, bind), (EXECUTE, EXECUTE_BODY), (SYNC, &b""[..])] {
        if d.holding() || d.collects(tag, body.len(), idle) {
            match d.batch_message(tag, body, st) {
                BatchStep::Held => {
                    idle = false; // held counts as mid-batch too
                    continue;
                }
                BatchStep::Routed => return w.take_routed(),
                BatchStep::Release(frames) => out += frames.len(),
            }
        }
        // The statement is looked up only if the batch is followed.
        d.observe_source(tag, idle, |r| {
            (tag == BIND)
                .then(|| st.get(name))
                .flatten()
                .is_some_and(|t| r.statement_is_read(name, t))
        });
        idle = false;
    }
    out
}

fn policy_benches(c: &mut Criterion) {
    // Per-session keys (the session id, user, application_name, client
    // address) are hashed once at session start; a sqlcommenter key is
    // read from each request's text. Distinct keys per iteration.
    let sessions: Vec<String> = (0..BATCH).map(|i| (184_467 + i).to_string()).collect();
    let users: Vec<String> = (0..BATCH).map(|i| format!("tenant_{i:04}_app")).collect();
    let apps: Vec<String> = (0..BATCH)
        .map(|i| format!("orders-api-worker-{}", i % 64))
        .collect();
    let addrs: Vec<String> = (0..BATCH)
        .map(|i| format!("10.{}.{}.{}", i / 65536 % 256, i / 256 % 256, i % 256))
        .collect();
    let commented: Vec<String> = (0..BATCH)
        .map(|i| {
            format!(
                "SELECT id, status, total FROM orders WHERE customer_id = {i} ORDER BY id DESC LIMIT 20 \
                 /*action='list',controller='orders',route_key='tenant-{i}',framework='rails'*/"
            )
        })
        .collect();
    let settings = RoutingSettings::from_config(&routing_config(10.0, HashKey::Session));

    let mut g = c.benchmark_group("routing_policy");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (kind, keys) in [
        (HashKey::Session, &sessions),
        (HashKey::User, &users),
        (HashKey::ApplicationName, &apps),
        (HashKey::ClientAddr, &addrs),
    ] {
        g.bench_function(format!("hash_threshold_{kind:?}"), |b| {
            b.iter(|| {
                let s = black_box(&settings);
                black_box(keys)
                    .iter()
                    .filter(|k| policy::bucket(k.as_bytes()) < s.threshold)
                    .count()
            })
        });
    }
    // `Decider::in_cohort` for `hash_key = "comment"`: find the trailing
    // comment, URL-decode the value, hash it (the session's bucket when
    // there is none).
    g.bench_function("hash_threshold_Comment", |b| {
        b.iter(|| {
            let s = black_box(&settings);
            black_box(&commented)
                .iter()
                .filter(|q| {
                    policy::comment_value(q, &s.comment_key)
                        .map_or(0, |v| policy::bucket(v.as_bytes()))
                        < s.threshold
                })
                .count()
        })
    });
    // Session start: all four session-level buckets at once.
    g.bench_function("session_keys_new", |b| {
        b.iter(|| {
            (0..BATCH as u64).fold(0u64, |acc, i| {
                let k = SessionKeys::new(
                    black_box(184_467 + i),
                    black_box(&users[i as usize]),
                    black_box(&apps[i as usize]),
                    black_box(&addrs[i as usize]),
                );
                acc ^ k.session ^ k.user ^ k.application_name ^ k.client_addr
            })
        })
    });
    g.finish();
}

fn decider_benches(c: &mut Criterion) {
    let simple_select = query_body(SIMPLE_SELECT);
    let simple_update = query_body(SIMPLE_UPDATE);
    let bind_select = bind_body(b"P0_1", b"77123");
    let bind_update = bind_body(b"P0_2", b"-4215");
    let mut st = PreparedStatements::new(1000, 1 << 20);
    st.on_parse_typed(b"P0_1", SELECT, &[0, 1, 0, 0, 0, 23]);
    st.on_parse_typed(b"P0_2", UPDATE, &[0, 2, 0, 0, 0, 23, 0, 0, 0, 23]);

    // Everything routed; 10% routed with this session outside the cohort.
    let all = World::new(100.0, true);
    let out = World::new(10.0, false);
    // Each request's route is checked once, so the names stay true.
    {
        let mut d = all.decider();
        assert!(simple(&mut d, &all, &simple_select, SIMPLE_SELECT) > 0);
        assert_eq!(simple(&mut d, &all, &simple_update, SIMPLE_UPDATE), 0);
        assert!(extended(&mut d, &all, &st, b"P0_1", &bind_select) > 0);
        assert_eq!(extended(&mut d, &all, &st, b"P0_2", &bind_update), 0);
        assert!(all.link.queue.lock().unwrap().is_empty());
        let mut d = out.decider();
        assert_eq!(simple(&mut d, &out, &simple_select, SIMPLE_SELECT), 0);
        assert_eq!(extended(&mut d, &out, &st, b"P0_1", &bind_select), 0);
        assert!(out.link.queue.lock().unwrap().is_empty());
        assert_eq!(all.metrics.snapshot()["target"]["reads"], 2);
        assert_eq!(out.metrics.snapshot()["source"]["reads"], 2);
    }

    let mut g = c.benchmark_group("routing_decider");
    g.throughput(Throughput::Elements(1));
    // One Decider per session, kept across requests (its classifier and
    // prepared-statement kinds are per session).
    let mut d = all.decider();
    g.bench_function("simple_read_to_target", |b| {
        b.iter(|| {
            simple(
                &mut d,
                &all,
                black_box(&simple_select),
                black_box(SIMPLE_SELECT),
            )
        })
    });
    g.bench_function("simple_write", |b| {
        b.iter(|| {
            simple(
                &mut d,
                &all,
                black_box(&simple_update),
                black_box(SIMPLE_UPDATE),
            )
        })
    });
    g.bench_function("extended_read_to_target", |b| {
        b.iter(|| {
            extended(
                &mut d,
                &all,
                &st,
                black_box(b"P0_1"),
                black_box(&bind_select),
            )
        })
    });
    g.bench_function("extended_write", |b| {
        b.iter(|| {
            extended(
                &mut d,
                &all,
                &st,
                black_box(b"P0_2"),
                black_box(&bind_update),
            )
        })
    });
    let mut d = out.decider();
    g.bench_function("simple_read_to_source_10pct", |b| {
        b.iter(|| {
            simple(
                &mut d,
                &out,
                black_box(&simple_select),
                black_box(SIMPLE_SELECT),
            )
        })
    });
    g.bench_function("extended_read_to_source_10pct", |b| {
        b.iter(|| {
            extended(
                &mut d,
                &out,
                &st,
                black_box(b"P0_1"),
                black_box(&bind_select),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, policy_benches, decider_benches);
criterion_main!(benches);
