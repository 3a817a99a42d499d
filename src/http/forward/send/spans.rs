//! The CLIENT span of each attempt towards Dataverse (OpenTelemetry's HTTP
//! conventions) and the time Dataverse took to answer.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response};
use tokio::time::Instant;

use super::retry::Attempts;
use crate::app::OrgState;
use crate::error::ProxyError;
use crate::http::access_log::RequestInfo;
use crate::upstream::PooledBody;

/// One CLIENT span per attempt towards Dataverse, by OpenTelemetry's HTTP
/// conventions (named by its method; no `url.full`, as the query must not
/// appear), with the lane it went on, how long it waited for its slot and,
/// on a replay, `http.request.resend_count`.
pub(super) fn attempt_span(
    org: &OrgState,
    req: &Request<Body>,
    lane: &str,
    attempts: &Attempts,
    waited: Duration,
) -> tracing::Span {
    let resends = attempts.throttled + attempts.transient + u32::from(attempts.refreshed);
    let authority = org.origin_uri.authority.as_ref();
    tracing::info_span!(
        "upstream",
        otel.name = %req.method(),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        http.request.method = %req.method(),
        server.address = authority.map(http::uri::Authority::host),
        server.port = authority.and_then(http::uri::Authority::port_u16).map(i64::from),
        url.path = req.uri().path(),
        http.request.resend_count = (resends > 0).then_some(i64::from(resends)),
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        dataverse.lane = lane,
        dataverse.governor.wait_ms = waited.as_secs_f64() * 1000.0,
    )
}

/// The attempt's outcome on its span: the status, and for a failure or a
/// 4xx/5xx its type (for a CLIENT span both are errors).
pub(super) fn record_attempt(
    span: &tracing::Span,
    outcome: &Result<Response<PooledBody>, ProxyError>,
) {
    match outcome {
        Ok(resp) => {
            span.record(
                "http.response.status_code",
                i64::from(resp.status().as_u16()),
            );
            if resp.status().is_client_error() || resp.status().is_server_error() {
                span.record("error.type", resp.status().as_str());
                span.record("otel.status_code", "ERROR");
            }
        }
        Err(e) => {
            span.record("error.type", e.code());
            span.record("otel.status_code", "ERROR");
        }
    }
}

/// Records how long Dataverse took to send its response headers.
pub(super) fn upstream_time(info: &mut RequestInfo, org: &OrgState, sent_at: Instant) {
    let waited = sent_at.elapsed();
    info.upstream = Some(info.upstream.unwrap_or_default() + waited);
    org.metrics.upstream(waited);
}
