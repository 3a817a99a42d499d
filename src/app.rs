//! Shared state and the routers, with every layer in one place.
//!
//! Proxy router, outermost layer first:
//! 1. `x-request-id`: accepted from the caller or generated (UUID v4), sent
//!    to Dataverse and returned to the caller;
//! 2. sensitive headers: `Authorization`, `Proxy-Authorization` and `Cookie`
//!    are marked so no trace or debug output ever prints them;
//! 3. trace: one span per request with id, method and path (never the
//!    query: it can carry personal data), one log line per response;
//! 4. the forwarding handler, which takes every path (the path check
//!    answers 404 outside `/api/data/v9.x/`).
//!
//! The admin router (`/livez`, `/readyz`) is served on its own listener.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;
use tracing::Span;

use crate::config::{Config, UpstreamConfig};
use crate::proxy::{self, upstream::UpstreamClient};
use crate::token::TokenProvider;

/// Request-id header, accepted from callers and generated otherwise.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// State shared by every request. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The org's token.
    pub token: TokenProvider,
    /// Pooled client towards the org.
    pub client: UpstreamClient,
    /// Org origin without a trailing slash, e.g. `https://contoso.crm.dynamics.com`.
    pub org_origin: Arc<str>,
    /// Timeouts towards the org.
    pub upstream: UpstreamConfig,
}

impl AppState {
    /// Builds the state from a validated config (binds nothing, fetches nothing).
    pub fn new(config: &Config) -> std::io::Result<Self> {
        let token = TokenProvider::new(config.credential.clone(), config.token.clone())
            .map_err(std::io::Error::other)?;
        Ok(Self {
            token,
            client: proxy::upstream::build_client(&config.upstream)?,
            org_origin: config.org.origin().into(),
            upstream: config.upstream.clone(),
        })
    }
}

/// The proxy router with all its layers.
pub fn router(state: AppState) -> Router {
    let trace = TraceLayer::new_for_http()
        .make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get(&REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            tracing::info_span!(
                "request",
                request.id = %id,
                method = %req.method(),
                path = %req.uri().path(),
            )
        })
        .on_request(())
        .on_response(|resp: &Response, latency: Duration, _span: &Span| {
            let proxy_error = resp
                .headers()
                .get(crate::error::PROXY_ERROR_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            tracing::info!(
                status = resp.status().as_u16(),
                duration_ms = latency.as_millis() as u64,
                proxy_error,
                "response"
            );
        })
        .on_failure(
            |failure: tower_http::classify::ServerErrorsFailureClass, latency: Duration, _span: &Span| {
                tracing::warn!(%failure, duration_ms = latency.as_millis() as u64, "request failed");
            },
        );

    Router::new()
        .fallback(proxy::forward)
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                .layer(SetSensitiveRequestHeadersLayer::new([
                    header::AUTHORIZATION,
                    header::PROXY_AUTHORIZATION,
                    header::COOKIE,
                ]))
                .layer(trace),
        )
}

/// The admin router: `/livez` (the process is up) and `/readyz` (a valid
/// token is held for the org).
pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.token.is_ready().await {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no valid token yet\n")
    }
}
