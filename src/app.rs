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

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
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
use crate::governor::Governor;
use crate::proxy::public::PublicUrl;
use crate::proxy::{self, upstream::UpstreamClient};
use crate::rewrite::Rewriter;
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
    /// Every origin under which the org writes its links: the configured
    /// one and its `.api.` sibling (`contoso.crm…` ⇄ `contoso.api.crm…`).
    pub org_aliases: Arc<[String]>,
    /// Timeouts towards the org.
    pub upstream: UpstreamConfig,
    /// The org's service-protection governor.
    pub governor: Governor,
    /// How the proxy's public URL is found.
    pub public: Arc<PublicUrl>,
    /// Rewriters by public URL (usually one entry).
    links: Arc<Mutex<HashMap<String, Arc<Links>>>>,
}

/// The two link rewriters for one public URL.
#[derive(Debug)]
pub struct Links {
    /// Org links → proxy links, in answers.
    pub to_caller: Option<Rewriter>,
    /// Proxy links → org links, in request bodies.
    pub to_org: Option<Rewriter>,
}

/// Most distinct public URLs whose rewriters are kept.
const LINK_CACHE: usize = 64;

impl AppState {
    /// Builds the state from a validated config (binds nothing, fetches nothing).
    pub fn new(config: &Config) -> std::io::Result<Self> {
        let token = TokenProvider::new(config.credential.clone(), config.token.clone())
            .map_err(std::io::Error::other)?;
        let origin = config.org.origin();
        Ok(Self {
            token,
            client: proxy::upstream::build_client(&config.upstream)?,
            org_aliases: org_aliases(&origin).into(),
            org_origin: origin.into(),
            upstream: config.upstream.clone(),
            governor: Governor::new(config.governor.clone()),
            public: Arc::new(PublicUrl {
                fixed: config
                    .public_url
                    .as_ref()
                    .map(|u| u.as_str().trim_end_matches('/').to_owned()),
                trusted: config.trusted_proxies.clone(),
                fallback_host: config.listen.to_string(),
            }),
            links: Arc::default(),
        })
    }

    /// The link rewriters for this request's public URL.
    pub fn links(&self, headers: &axum::http::HeaderMap, peer: IpAddr) -> Arc<Links> {
        let public = self.public.derive(headers, peer);
        let mut cache = self
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(links) = cache.get(&public) {
            return links.clone();
        }
        if cache.len() >= LINK_CACHE {
            cache.clear();
        }
        let aliases: Vec<&str> = self.org_aliases.iter().map(String::as_str).collect();
        let links = Arc::new(Links {
            to_caller: Rewriter::api_prefix(&aliases, &public),
            to_org: Rewriter::api_prefix(&[&public], &self.org_origin),
        });
        cache.insert(public, links.clone());
        links
    }
}

/// The org origin and, for Dynamics hosts, its `.api.` sibling: the Web API
/// is served under both, and links may name either.
fn org_aliases(origin: &str) -> Vec<String> {
    let mut out = vec![origin.to_owned()];
    if let Some((scheme, host)) = origin.split_once("://") {
        let (name, rest) = host.split_once('.').unwrap_or((host, ""));
        if let Some(without_api) = rest.strip_prefix("api.") {
            out.push(format!("{scheme}://{name}.{without_api}"));
        } else if rest.starts_with("crm") && rest.contains(".dynamics.") {
            out.push(format!("{scheme}://{name}.api.{rest}"));
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::org_aliases;

    #[test]
    fn api_siblings_are_aliases() {
        assert_eq!(
            org_aliases("https://contoso.crm4.dynamics.com"),
            [
                "https://contoso.crm4.dynamics.com",
                "https://contoso.api.crm4.dynamics.com"
            ]
        );
        assert_eq!(
            org_aliases("https://contoso.api.crm.dynamics.com"),
            [
                "https://contoso.api.crm.dynamics.com",
                "https://contoso.crm.dynamics.com"
            ]
        );
        assert_eq!(org_aliases("http://127.0.0.1:9"), ["http://127.0.0.1:9"]);
    }
}
