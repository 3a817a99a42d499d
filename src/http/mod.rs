//! The proxy listener's service, read top to bottom as the path of a
//! request. The admin listener is `crate::admin`.
//!
//! ```text
//! request id (x-request-id: the caller's, or a new UUID v4; on the answer too)
//! └─ sensitive headers (Authorization, Proxy-Authorization, Cookie, X-API-Key)
//!    └─ trace (one span per request: id, method, path; never the query)
//!       └─ access log (one line, the request metrics and the Power Platform
//!          requests spent, `spend.rs`, when the body ends)
//!          └─ catch panic (a bug costs one request a 500, not the connection)
//!             └─ body idle timeouts (caller stalls: 408; Dataverse stalls: abort)
//!                └─ CORS, when configured (preflights answered here)
//!                   └─ edge checks (request head, method set, lengths)
//!                      └─ router: /api/data/…, /{org}/api/data/…, else 404
//!                         └─ forward: admit → plan → send → answer
//!                            (a GET too long for Dataverse's request line: as a one-part
//!                            $batch, `forward/long_get.rs`; metadata: `forward/cached.rs`)
//! ```
//!
//! The accept loop that drives the service (connection cap, header-read
//! timeout, drain, TLS and HTTP/2) is `src/server/`.

pub mod access_log;
pub mod body;
pub mod cors;
pub mod edge;
pub mod forward;
pub mod headers;
pub mod idle;
pub mod request_id;
mod spend;

use std::convert::Infallible;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::HeaderName;
use axum::response::Response;
use axum::routing::any;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};

pub use crate::app::AppState;

use idle::IdleTimeout;

use crate::error::ProxyError;

/// Request-id header, accepted from callers and generated otherwise.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The proxy listener's service: the layers above, in order, around the
/// router. Generic over nothing: the accept loop hands it hyper's requests.
pub fn proxy_service(
    state: AppState,
) -> impl tower::Service<
    http::Request<hyper::body::Incoming>,
    Response = Response<
        impl http_body::Body<Data = bytes::Bytes, Error = impl Into<axum::BoxError>> + Send + 'static,
    >,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
+ Send
+ 'static {
    let sensitive = [
        http::header::AUTHORIZATION,
        http::header::PROXY_AUTHORIZATION,
        http::header::COOKIE,
        HeaderName::from_static("x-api-key"),
    ];
    let (body_idle, answer_idle) = (
        state.limits.load().body_idle_timeout,
        state.upstream.idle_timeout,
    );
    let trace_from = state.trace_context_from.clone();
    ServiceBuilder::new()
        .layer(request_id::RequestIdLayer)
        .layer(SetSensitiveRequestHeadersLayer::new(sensitive))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(move |req: &http::Request<_>| request_span(req, &trace_from))
                .on_response(record_response)
                // Dataverse's own 5xx pass through: the access log has them.
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .layer(access_log::AccessLogLayer::new(state.clone()))
        .layer(CatchPanicLayer::custom(panic_answer))
        .map_request(move |req: http::Request<_>| req.map(|b| IdleTimeout::new(b, body_idle)))
        .map_response(move |resp: Response| resp.map(|b| IdleTimeout::new(b, answer_idle)))
        .option_layer(state.cors.as_ref().map(cors::layer))
        .layer(edge::EdgeLayer::new(state.limits.clone()))
        .service(router(state))
}

/// The routes: the Web API with and without an org prefix, and the rest.
fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/data/{*rest}", any(forward::handle))
        .route("/{org}/api/data/{*rest}", any(forward::handle))
        .fallback(outside_the_api)
        .with_state(state)
}

/// Anything that is no Web API route.
async fn outside_the_api(State(state): State<AppState>, req: Request) -> Response {
    state
        .outside_the_api()
        .to_response(req.headers().get(REQUEST_ID))
}

/// One SERVER span per request, by OpenTelemetry's HTTP conventions: named
/// `{method} {route}` (`_OTHER` for a method the conventions do not know),
/// the trace context of a peer in `trace_from` its parent: anyone else
/// could pick the trace id and the sampling decision. Never the query: it
/// can carry personal data.
fn request_span<B>(
    req: &http::Request<B>,
    trace_from: &crate::telemetry::TraceContextFrom,
) -> tracing::Span {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (method, path) = (known_method(req.method()), req.uri().path());
    let route = crate::telemetry::route_of(path);
    let span = tracing::info_span!(
        "request",
        otel.name = %match route {
            Some(route) => format!("{method} {route}"),
            None => method.to_string(),
        },
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        http.route = route,
        url.path = %path,
        network.protocol.version = protocol_version(req.version()),
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        request.id = %id,
    );
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    if peer.is_some_and(|ip| trace_from.admits(ip)) {
        crate::telemetry::adopt_caller_context(&span, req.headers());
    }
    span
}

/// The method as the HTTP conventions name it: one of the registered
/// methods, else `_OTHER` (a caller's made-up method never names a span).
fn known_method(method: &http::Method) -> &str {
    match method.as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE"
        | "PATCH") => m,
        _ => "_OTHER",
    }
}

/// `1.1`, `2`…, as the conventions write `network.protocol.version`.
fn protocol_version(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "0.9",
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

/// The answer's status on the request span; a 5xx is an error (its type
/// the proxy's error code when the proxy made it). A 4xx is the caller's
/// error, not the server's, so the span's status stays unset.
fn record_response<B>(resp: &http::Response<B>, _: std::time::Duration, span: &tracing::Span) {
    let status = resp.status();
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        let code = resp
            .headers()
            .get("x-dataverse-proxy-error")
            .and_then(|v| v.to_str().ok());
        match code {
            Some(code) => span.record("error.type", code),
            None => span.record("error.type", status.as_str()),
        };
        span.record("otel.status_code", "ERROR");
    }
}

/// The OData 500 of a request whose handling panicked.
fn panic_answer(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("panic while handling a request");
    ProxyError::Internal.to_response(None)
}
