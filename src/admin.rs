//! The admin HTTP API: `GET /status` (JSON), `GET /metrics` (Prometheus
//! text), `GET /health`, `GET /audit`, `GET /config`, and the live routing
//! controls `PUT /routing`, `POST /failback`, `POST /resume` (each audited
//! with a new epoch). With `admin.token_file` every request needs
//! `Authorization: Bearer <token>`; without one the config only allows a
//! loopback address.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use tracing::info;

use crate::proxy::Proxy;

/// Reads a bearer token file: its first line, trimmed, must not be empty.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        bail!("{} holds no token", path.display());
    }
    Ok(token)
}

#[derive(Clone)]
struct AdminState {
    proxy: Arc<Proxy>,
    token: Option<Arc<str>>,
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
    let state = AdminState {
        proxy,
        token: token.map(Arc::from),
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
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .with_state(state);
    axum::serve(listener, app).await.context("admin API failed")
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
    Json(st.proxy.audit.since(since)).into_response()
}

/// `GET /mismatches[?fingerprint=]`: shadow-read mismatches grouped by
/// fingerprint, learned noise, and the counters.
async fn mismatches(
    State(st): State<AdminState>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    match &st.proxy.shadow {
        Some(sh) => Json(sh.report.to_json(q.get("fingerprint").map(String::as_str))).into_response(),
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

async fn status(State(st): State<AdminState>) -> Json<serde_json::Value> {
    Json(st.proxy.status())
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
    let mut new = crate::router::Settings::from_config(&cfg);
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
