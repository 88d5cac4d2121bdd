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
    // Sessions went to the primary, which status says is the source.
    let st = p.status();
    assert_eq!(st["source"]["role"], "primary", "{st:#}");
    assert_eq!(st["target"]["role"], "secondary", "{st:#}");
    assert_eq!(
        st["source"]["addr"],
        format!("127.0.0.1:{}", p.clusters.source_port)
    );
}
