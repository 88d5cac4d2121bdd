//! Smallest end-to-end check: psql through a real pgshift reaches the source.
mod common;
use common::*;

#[test]
fn psql_through_proxy_reaches_the_source() {
    let p = Proxy::start();
    // The harness's readiness probe was a connection too: count from here.
    let before = p.stat("/metrics/clients/connections_total");
    let out = psql(
        &p.url(SUPERUSER, "postgres"),
        &["-Atc", "select inet_server_port()"],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        p.clusters.source_port.to_string()
    );
    assert_eq!(p.stat("/metrics/clients/connections_total"), before + 1);
}
