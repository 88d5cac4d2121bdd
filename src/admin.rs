//! The admin HTTP API: `GET /status` (JSON), `GET /metrics` (Prometheus
//! text), `GET /health`, `GET /audit`, `GET /config`, and the live routing
//! controls `PUT /routing`, `POST /failback`, `POST /resume` (each audited
//! with a new epoch). With `admin.token_file` every request needs
//! `Authorization: Bearer <token>`; without one the config only allows a
//! loopback address.
//!
//! Every request must name an allowed Host (the listen address,
//! `localhost`, `127.0.0.1`, `[::1]` or one of `admin.allowed_hosts`), so
//! a web page cannot reach a loopback API through DNS rebinding (421
//! otherwise). PUT and POST need `Content-Type: application/json`, which a
//! browser cannot send cross-origin without a preflight the API never
//! answers (415 otherwise). Unless `admin.show_data` is set (which needs a
//! token), statement texts and data in responses are redacted (`redact`).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use tracing::{debug, info};

use crate::config::hosts::split_host;
use crate::proxy::Proxy;

/// Hosts always allowed, with any port.
const LOOPBACK_HOSTS: &[&str] = &["localhost", "127.0.0.1", "[::1]"];

/// Whether a request's Host (or absolute URI authority) names this API:
/// the listen address as it is, a loopback name with any port, or an
/// allowed host (any port unless the entry has one). Case-insensitive.
pub fn host_allowed(host: &str, listen: SocketAddr, allowed: &[String]) -> bool {
    let host = host.trim().to_ascii_lowercase();
    if host == listen.to_string() {
        return true;
    }
    let Some((name, _)) = split_host(&host) else {
        return false;
    };
    LOOPBACK_HOSTS.contains(&name)
        || allowed
            .iter()
            .map(|a| a.to_ascii_lowercase())
            .any(|a| match split_host(&a) {
                Some((_, Some(_))) => a == host,
                Some((a_name, None)) => a_name == name,
                None => false,
            })
}

#[derive(Clone)]
struct AdminState {
    proxy: Arc<Proxy>,
    token: Option<Arc<str>>,
    /// The address the API is bound to (a Host naming it is allowed).
    listen: SocketAddr,
    allowed_hosts: Arc<[String]>,
    /// `admin.show_data`: responses are not redacted.
    show_data: bool,
}

/// Binds the admin address; done before the proxy starts serving so a taken
/// port fails start-up instead of being discovered later.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind admin API to {addr}"))
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    token: Option<String>,
    proxy: Arc<Proxy>,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    if token.is_none() {
        info!(%addr, "admin API listening without a token (loopback only)");
    } else {
        info!(%addr, "admin API listening; requests need the bearer token");
    }
    let admin = &proxy.config.admin;
    let (allowed_hosts, show_data) = (Arc::from(admin.allowed_hosts.clone()), admin.show_data);
    if !show_data {
        info!("admin API redacts statement texts and data (admin.show_data is off)");
    }
    let state = AdminState {
        token: token.map(Arc::from),
        listen: addr,
        allowed_hosts,
        show_data,
        proxy,
    };
    let app = Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { "ok\n" }))
        .route("/audit", get(audit))
        .route("/config", get(config))
        .route("/routing", put(put_routing).get(get_routing))
        .route("/failback", post(failback))
        .route("/resume", post(resume))
        .route("/mismatches", get(mismatches))
        .fallback(not_found)
        // Outermost last: the Host check, then the token, then the body's
        // content type.
        .layer(axum::middleware::from_fn(require_json))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            check_host,
        ))
        .with_state(state);
    axum::serve(listener, app).await.context("admin API failed")
}

/// A JSON error answer.
fn refuse(code: StatusCode, error: &str) -> Response {
    (code, Json(serde_json::json!({ "error": error }))).into_response()
}

async fn not_found() -> Response {
    refuse(StatusCode::NOT_FOUND, "no such endpoint")
}

/// Refuses a request whose Host (or absolute URI authority) does not name
/// this API: a page served from another name that resolves to a loopback
/// address (DNS rebinding) must not reach it.
async fn check_host(State(st): State<AdminState>, req: Request, next: Next) -> Response {
    let Some(host) = req.headers().get(header::HOST) else {
        return refuse(StatusCode::BAD_REQUEST, "a Host header is required");
    };
    let host = host.to_str().unwrap_or("");
    let names = [Some(host), req.uri().authority().map(|a| a.as_str())];
    if let Some(bad) = names
        .into_iter()
        .flatten()
        .find(|h| !host_allowed(h, st.listen, &st.allowed_hosts))
    {
        debug!(
            host = bad,
            "admin API: request for a host that is not allowed refused"
        );
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            &format!(
                "host {bad:?} is not allowed: use the admin address, localhost, 127.0.0.1 or [::1], or list the name in admin.allowed_hosts"
            ),
        );
    }
    next.run(req).await
}

/// Requests that change something must say their body is JSON: a browser
/// cannot send that cross-origin without a CORS preflight, which the API
/// never answers, so a web page cannot post to it.
async fn require_json(req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return next.run(req).await;
    }
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "requests that change something need Content-Type: application/json (an empty body is allowed)",
        );
    }
    next.run(req).await
}

/// A response as it may be shown: as it is with `admin.show_data`, else
/// redacted (off the main thread: normalising many statements takes a
/// while, and the main thread runs the accept loop).
async fn shown(st: &AdminState, mut v: serde_json::Value) -> Response {
    if st.show_data {
        return Json(v).into_response();
    }
    match tokio::task::spawn_blocking(move || {
        crate::redact::redact(&mut v);
        v
    })
    .await
    {
        Ok(v) => Json(v).into_response(),
        Err(e) => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot redact the response: {e}"),
        ),
    }
}

async fn authorize(State(st): State<AdminState>, req: Request, next: Next) -> Response {
    if let Some(token) = &st.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let ok = given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0;
        if !ok {
            return (
                StatusCode::UNAUTHORIZED,
                Json(serde_json::json!({"error": "missing or wrong bearer token"})),
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// `GET /audit?since=<Unix microseconds>`: recent audit entries, oldest
/// first (the file holds all of them).
async fn audit(
    State(st): State<AdminState>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    let since = match q.get("since").map(|s| s.parse::<u64>()) {
        None => 0,
        Some(Ok(t)) => t,
        Some(Err(_)) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({"error": "since must be Unix microseconds"})),
            )
                .into_response()
        }
    };
    let entries = serde_json::Value::Array(st.proxy.audit.since(since));
    shown(&st, entries).await
}

/// `GET /mismatches[?fingerprint=]`: shadow-read mismatches grouped by
/// fingerprint, learned noise, and the counters.
async fn mismatches(
    State(st): State<AdminState>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    match &st.proxy.shadow {
        Some(sh) => {
            let v = sh.report.to_json(q.get("fingerprint").map(String::as_str));
            shown(&st, v).await
        }
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "shadow reads need a target (target.session_links = true)"})),
        )
            .into_response(),
    }
}

async fn config(State(st): State<AdminState>) -> Json<serde_json::Value> {
    Json(st.proxy.effective_config())
}

async fn status(State(st): State<AdminState>) -> Response {
    let v = st.proxy.status();
    shown(&st, v).await
}

async fn metrics(State(st): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.proxy.metrics.render(),
    )
}

/// The routing keys `PUT /routing` may change; absent ones stay.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutingPatch {
    read_percent: Option<f64>,
    hash_key: Option<crate::config::HashKey>,
    comment_key: Option<String>,
    target_timeout_ms: Option<u64>,
}

/// An optional reason for failback and resume.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Reason {
    reason: Option<String>,
}

fn bad_request(key: Option<&str>, reason: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({"error": reason, "key": key})),
    )
        .into_response()
}

fn applied(st: &AdminState, r: Result<u64, crate::proxy::ChangeError>) -> Response {
    match r {
        Ok(epoch) => Json(serde_json::json!({
            "epoch": epoch,
            "routing": st.proxy.router.status(),
        }))
        .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({"error": e.reason, "key": e.key})),
        )
            .into_response(),
    }
}

/// Parses a JSON body (an empty body counts as `{}`), or says what is wrong.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Box<Response>> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| Box::new(bad_request(None, &format!("invalid JSON body: {e}"))))
}

async fn get_routing(State(st): State<AdminState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "epoch": st.proxy.epoch.load(std::sync::atomic::Ordering::Relaxed),
        "routing": st.proxy.router.status(),
    }))
}

/// `PUT /routing {"read_percent": 5}`: validated like the config file.
async fn put_routing(State(st): State<AdminState>, body: axum::body::Bytes) -> Response {
    let patch: RoutingPatch = match json_body(&body) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let proxy = &st.proxy;
    let _serial = proxy.change_lock.lock().unwrap_or_else(|p| p.into_inner());
    let live = proxy.router.current();
    let mut cfg = crate::config::RoutingConfig {
        read_percent: live.read_percent,
        hash_key: live.hash_key,
        comment_key: live.comment_key.clone(),
        target_timeout_ms: live.target_timeout.as_millis() as u64,
    };
    if let Some(p) = patch.read_percent {
        cfg.read_percent = p;
    }
    if let Some(k) = patch.hash_key {
        cfg.hash_key = k;
    }
    if let Some(k) = patch.comment_key {
        cfg.comment_key = k;
    }
    if let Some(t) = patch.target_timeout_ms {
        cfg.target_timeout_ms = t;
    }
    if let Err((key, reason)) = cfg.validate() {
        return bad_request(Some(&key), &reason);
    }
    let mut new = crate::router::RoutingSettings::from_config(&cfg);
    new.failed_back = live.failed_back.clone();
    new.limit = live.limit.clone();
    if new == *live {
        return applied(
            &st,
            Ok(proxy.epoch.load(std::sync::atomic::Ordering::Relaxed)),
        );
    }
    let r = proxy.set_routing("routing_change", "api", new, serde_json::json!({}));
    applied(&st, r)
}

/// `POST /failback`: every read to the source now, until a resume.
async fn failback(State(st): State<AdminState>, body: axum::body::Bytes) -> Response {
    fail_back_or_resume(&st, &body, true)
}

/// `POST /resume`: routing as configured again.
async fn resume(State(st): State<AdminState>, body: axum::body::Bytes) -> Response {
    fail_back_or_resume(&st, &body, false)
}

/// Failback (`back`) or resume, audited with the reason and the routing
/// counters of the moment.
fn fail_back_or_resume(st: &AdminState, body: &[u8], back: bool) -> Response {
    let reason: Reason = match json_body(body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let reason = reason
        .reason
        .unwrap_or_else(|| "requested through the admin API".into());
    let proxy = &st.proxy;
    let _serial = proxy.change_lock.lock().unwrap_or_else(|p| p.into_inner());
    let mut new = (*proxy.router.current()).clone();
    new.failed_back = back.then(|| reason.clone());
    if !back {
        // A resume lifts the health monitor's cap too.
        new.limit = None;
    }
    let r = proxy.set_routing(
        if back { "failback" } else { "resume" },
        "api",
        new,
        serde_json::json!({"reason": reason, "metrics": proxy.routing_evidence()}),
    );
    if let (false, Ok(_), Some(h)) = (back, &r, &proxy.health) {
        h.state.lock().unwrap_or_else(|p| p.into_inner()).resumed();
    }
    applied(st, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_naming_this_api_are_allowed_and_others_are_not() {
        let listen: SocketAddr = "127.0.0.1:9930".parse().unwrap();
        let none: Vec<String> = Vec::new();
        for ok in [
            "127.0.0.1:9930",
            "localhost",
            "localhost:9930",
            "LOCALHOST:1234",
            "127.0.0.1",
            "[::1]",
            "[::1]:9930",
        ] {
            assert!(host_allowed(ok, listen, &none), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9930",
            "localhost.evil.example",
            "127.0.0.1.nip.io:9930",
            "localhost:notaport",
            "",
            "[::1",
            "10.0.0.5:9930",
        ] {
            assert!(!host_allowed(bad, listen, &none), "{bad}");
        }
        let allowed = vec!["PgShift.Internal".to_string(), "10.0.0.5:9930".into()];
        assert!(host_allowed("pgshift.internal", listen, &allowed));
        assert!(host_allowed("pgshift.internal:9930", listen, &allowed));
        assert!(host_allowed("10.0.0.5:9930", listen, &allowed));
        assert!(!host_allowed("10.0.0.5:80", listen, &allowed));
        assert!(!host_allowed("10.0.0.5", listen, &allowed));
        // A listen address that is not loopback is allowed as written.
        let public: SocketAddr = "[fd00::7]:9930".parse().unwrap();
        assert!(host_allowed("[fd00::7]:9930", public, &none));
        assert!(!host_allowed("[fd00::7]:9931", public, &none));
    }
}
