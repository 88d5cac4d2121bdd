//! Smallest end-to-end check: psql through a real pgshift reaches the source.
mod common;
use common::*;

#[test]
fn psql_through_proxy_reaches_the_source() {
    let p = Proxy::start();
    let before = p.stat("/metrics/clients/connections_total");
    let port = psql_ok(
        &p.url(SUPERUSER, "postgres"),
        &["-Atc", "select inet_server_port()"],
        None,
    );
    assert_eq!(port.trim(), p.clusters.source_port.to_string());
    p.wait_for(60, "the connection to be counted", |p| {
        p.stat("/metrics/clients/connections_total") == before + 1
    });
}
