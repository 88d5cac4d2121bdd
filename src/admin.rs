//! The admin HTTP API: `GET /status` (JSON), `GET /metrics` (Prometheus
//! text), `GET /health`, `GET /audit`, `GET /config`. With `admin.token_file` every request needs
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
use axum::routing::get;
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
