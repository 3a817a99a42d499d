//! The HTTP layer: the proxy listener's service, read top to bottom as the
//! path of a request, and the admin listener.
//!
//! ```text
//! request id (x-request-id: the caller's, or a new UUID v4; on the answer too)
//! └─ sensitive headers (Authorization, Proxy-Authorization, Cookie, X-API-Key)
//!    └─ trace (one span per request: id, method, path; never the query)
//!       └─ access log (one line and the request metrics when the body ends)
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
pub mod admin;
pub mod body;
pub mod cors;
pub mod edge;
pub mod forward;
pub mod headers;
pub mod idle;
pub mod metrics;
pub mod public;
pub mod reload;
pub mod request_id;
pub mod rules;
pub mod state;
pub mod status;
pub mod upstream;

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

pub use state::AppState;

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
    ServiceBuilder::new()
        .layer(request_id::RequestIdLayer)
        .layer(SetSensitiveRequestHeadersLayer::new(sensitive))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
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

/// One span per request (never the query: it can carry personal data).
fn request_span<B>(req: &http::Request<B>) -> tracing::Span {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info_span!(
        "request",
        request.id = %id,
        method = %req.method(),
        path = %req.uri().path(),
    )
}

/// The OData 500 of a request whose handling panicked.
fn panic_answer(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("panic while handling a request");
    ProxyError::Internal.to_response(None)
}
