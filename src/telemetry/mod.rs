//! OpenTelemetry traces by the HTTP semantic conventions (docs/logging.md,
//! "Traces").
//!
//! Every request is a SERVER span `{method} {route}` (`http/mod.rs`), every
//! attempt towards Dataverse a CLIENT span (`http/forward/send.rs`), the
//! token fetch and the on-behalf-of exchange spans of their own. A caller's
//! W3C `traceparent` / `tracestate` is the request span's parent
//! ([`adopt_caller_context`]); Dataverse gets the attempt's
//! ([`inject_context`]). Spans are plain `tracing` spans with the
//! conventions' attribute names as fields; [`export`] turns them into
//! OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Without it no span is
//! exported, and the proxy passes a caller's `traceparent` on untouched.
//!
//! Never in a span: the query string, headers, bodies, tokens.

pub mod export;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use export::{layer, shutdown};

/// Makes the caller's W3C trace context (if any) the parent of `span`.
pub fn adopt_caller_context(span: &tracing::Span, headers: &HeaderMap) {
    if span.is_disabled() || !headers.contains_key("traceparent") {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&Extract(headers));
    let _ = span.set_parent(cx);
}

/// Writes `span`'s W3C trace context into `headers` (replacing the
/// caller's, whose trace it continues).
pub fn inject_context(span: &tracing::Span, headers: &mut HeaderMap) {
    if span.is_disabled() {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut Inject(headers));
}

struct Extract<'a>(&'a HeaderMap);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct Inject<'a>(&'a mut HeaderMap);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The route template the router will match for `path`, for `http.route`
/// and the span name (low cardinality, as the conventions ask).
pub fn route_of(path: &str) -> Option<&'static str> {
    if path.starts_with("/api/data/") {
        return Some("/api/data/{*rest}");
    }
    let rest = path.strip_prefix('/')?;
    let (_, after) = rest.split_once('/')?;
    after
        .starts_with("api/data/")
        .then_some("/{org}/api/data/{*rest}")
}

/// Whose W3C trace context becomes a request span's parent.
#[derive(Debug, Clone)]
pub enum TraceContextFrom {
    /// Any caller's (`log.trust_caller_trace_context = true`).
    Anyone,
    /// Only these peers' (`trusted_proxies`).
    Peers(std::sync::Arc<[ipnet::IpNet]>),
}

impl TraceContextFrom {
    pub fn admits(&self, ip: std::net::IpAddr) -> bool {
        match self {
            Self::Anyone => true,
            Self::Peers(nets) => nets.iter().any(|n| n.contains(&ip)),
        }
    }
}
