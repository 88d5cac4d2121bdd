//! Hot-path micro-benchmarks: walking message headers and pumping a
//! realistic message mix through the forwarder with its inspectors.
//! Throughput is reported in bytes, so a regression shows as lower GiB/s.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgshift::protocol::frame::decode_header;
use pgshift::pump::core::{ClientCore, ClientSide, ServerSide};
use pgshift::pump::forward::Inspector;
use pgshift::pump::{pump, MAX_STREAMED_MESSAGE};
use pgshift::session::policies::{ClientPolicies, ServerPolicies};
use pgshift::tracker::{PreparedStatements, Shared};

/// Pumps `input` through `insp` into memory; the bytes forwarded.
async fn pump_all(input: &[u8], insp: &mut impl Inspector) -> usize {
    let mut out = Vec::with_capacity(input.len());
    let mut buf = BytesMut::new();
    pump(&mut &input[..], &mut out, &mut buf, insp)
        .await
        .unwrap();
    out.len()
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// What a pgbench -M extended client sends per select-only transaction.
fn client_stream(n: usize) -> Vec<u8> {
    let mut one = msg(
        b'P',
        b"\0SELECT abalance FROM pgbench_accounts WHERE aid = $1;\0\0\0",
    );
    one.extend(msg(b'B', b"\0\0\0\0\0\x01\0\0\0\x0512345\0\0"));
    one.extend(msg(b'D', b"P\0"));
    one.extend(msg(b'E', b"\0\0\0\0\0"));
    one.extend(msg(b'S', b""));
    one.repeat(n)
}

/// What the server answers: ParseComplete, BindComplete, RowDescription,
/// DataRow, CommandComplete, ReadyForQuery.
fn server_stream(n: usize) -> Vec<u8> {
    let mut one = msg(b'1', b"");
    one.extend(msg(b'2', b""));
    one.extend(msg(
        b'T',
        b"\0\x01abalance\0\0\0\x40\x06\0\x03\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
    ));
    one.extend(msg(b'D', b"\0\x01\0\0\0\x01\x30"));
    one.extend(msg(b'C', b"SELECT 1\0"));
    one.extend(msg(b'Z', b"I"));
    one.repeat(n)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let client = client_stream(1000);
    let server = server_stream(1000);

    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Bytes(server.len() as u64));
    g.bench_function("walk_headers_server_stream", |b| {
        b.iter(|| {
            let mut pos = 0;
            let mut count = 0;
            while let Ok(Some(h)) = decode_header(&server[pos..], MAX_STREAMED_MESSAGE) {
                pos += h.frame_len();
                count += 1;
            }
            black_box(count)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("pump");
    g.throughput(Throughput::Bytes(client.len() as u64));
    // The session core alone, then with the policy hooks a session gets
    // when no policy is configured: the two should cost the same.
    g.bench_function("client_to_source_extended", |b| {
        b.iter(|| {
            rt.block_on(async {
                let shared = Shared::default();
                let mut st = PreparedStatements::new(1000, 1 << 20);
                let mut insp = ClientSide::new(ClientCore::new(&shared, &mut st, 1 << 20), ());
                black_box(pump_all(&client, &mut insp).await)
            })
        })
    });
    g.bench_function("client_to_source_extended_policies_off", |b| {
        b.iter(|| {
            rt.block_on(async {
                let shared = Shared::default();
                let mut st = PreparedStatements::new(1000, 1 << 20);
                let mut insp = ClientSide::new(
                    ClientCore::new(&shared, &mut st, 1 << 20),
                    ClientPolicies::default(),
                );
                black_box(pump_all(&client, &mut insp).await)
            })
        })
    });
    g.throughput(Throughput::Bytes(server.len() as u64));
    g.bench_function("source_to_client_extended", |b| {
        b.iter(|| {
            rt.block_on(async {
                let shared = Shared::default();
                let mut insp = ServerSide::new(&shared, ());
                black_box(pump_all(&server, &mut insp).await)
            })
        })
    });
    g.bench_function("source_to_client_extended_policies_off", |b| {
        b.iter(|| {
            rt.block_on(async {
                let shared = Shared::default();
                let mut insp = ServerSide::new(&shared, ServerPolicies::default());
                black_box(pump_all(&server, &mut insp).await)
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
