//! The admin listener: `/livez` (the process is up), `/readyz` (a valid
//! token is held for every org and shutdown has not begun) and `/metrics`.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::state::AppState;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let body = state.metrics.render(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

/// Readiness is the tokens' and the drain's; the governor's shared state
/// is reported in the body but never makes the proxy unready (it runs on
/// its local fallback cap while Redis does not answer).
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let governor = match state.redis.as_ref().map(|r| r.is_shared()) {
        None => "",
        Some(true) => "governor: shared (Redis)\n",
        Some(false) => "governor: local fallback cap (Redis does not answer)\n",
    };
    if state.ready().await {
        (StatusCode::OK, format!("ready\n{governor}"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: no valid token for every org yet\n{governor}"),
        )
    }
}
