//! One structured log line and the metrics per request, written when the
//! answer's body has been sent (or the connection broke), so bytes and the
//! full duration are known.
//!
//! Fields (see `docs/logging.md`): `request.id`, `caller`, `org`, `method`,
//! `path` (without the query unless `log.query = true`: queries can carry
//! personal data), `status`, `bytes_in`, `bytes_out`, `duration_ms`,
//! `upstream_ms`, `dataverse_request_id`, `proxy_error`, `error`, `outcome`
//! (`complete` or `aborted`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::http::HeaderValue;
use tokio::time::Instant;

use crate::app::AppState;
use crate::metrics::{RequestLabels, method_label, status_class};

/// What the forwarding handler tells the access log about a request.
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    /// The org it was routed to.
    pub org: Option<Arc<crate::app::OrgState>>,
    /// The org's index (for per-org metric handles).
    pub org_index: Option<usize>,
    /// Time until Dataverse's response headers.
    pub upstream: Option<Duration>,
    /// Dataverse's own request id (`x-ms-service-request-id` or `REQ_ID`).
    pub dataverse_request_id: Option<HeaderValue>,
    /// The caller's name, when callers are identified.
    pub caller: Option<Arc<str>>,
}

/// The message of a proxy-made error, for the one log line of the request.
#[derive(Debug, Clone)]
pub struct ErrorMessage(pub String);

/// Everything the log line needs but the byte count; written by the
/// answer's body ([`crate::proxy::body::ProxyBody`]) when it ends.
pub(crate) struct Entry {
    pub(crate) state: AppState,
    pub(crate) start: Instant,
    pub(crate) request_id: HeaderValue,
    pub(crate) method: http::Method,
    pub(crate) uri: http::Uri,
    pub(crate) status: http::StatusCode,
    pub(crate) info: RequestInfo,
    pub(crate) proxy_error: Option<HeaderValue>,
    pub(crate) error: Option<String>,
    /// Request body bytes read; `None` when the request had no body.
    pub(crate) bytes_in: Option<Arc<AtomicU64>>,
}

impl Entry {
    pub(crate) fn finish(self, bytes_out: u64, complete: bool) {
        let duration = self.start.elapsed();
        let bytes_in = self
            .bytes_in
            .as_ref()
            .map_or(0, |b| b.load(Ordering::Relaxed));
        let org = self.info.org.as_ref().map_or("-", |o| o.name.as_str());
        let caller = self.info.caller.as_deref();
        let m = &self.state.metrics;
        m.in_flight().dec();
        let source = if self.proxy_error.is_some() {
            "proxy"
        } else {
            "dataverse"
        };
        match (self.info.org_index, caller) {
            (Some(index), None) => m.finished_fast(
                index,
                org,
                &self.method,
                self.status,
                source,
                duration,
                bytes_in,
                bytes_out,
            ),
            _ => m.finished(
                &RequestLabels {
                    org: org.to_owned(),
                    method: method_label(&self.method),
                    status: status_class(self.status),
                    source,
                    caller: caller.unwrap_or("-").to_owned(),
                },
                duration,
                bytes_in,
                bytes_out,
            ),
        }
        if !tracing::enabled!(tracing::Level::INFO) {
            return;
        }
        let caller = caller.unwrap_or("-");
        let upstream_ms = self.info.upstream.map(|d| d.as_millis() as u64);
        let dv_id = self
            .info
            .dataverse_request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let outcome = if complete { "complete" } else { "aborted" };
        let request_id = self.request_id.to_str().unwrap_or("");
        let method = &self.method;
        let path = if self.state.log_query {
            self.uri
                .path_and_query()
                .map_or(self.uri.path(), |pq| pq.as_str())
        } else {
            self.uri.path()
        };
        let proxy_error = self
            .proxy_error
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let error = self.error.as_deref().unwrap_or("");
        let status = self.status.as_u16();
        // Target: this module, `dataverse_proxy::access`.
        tracing::info!(
            request.id = %request_id,
            caller = caller,
            org = org,
            method = %method,
            path = %path,
            status = status,
            bytes_in = bytes_in,
            bytes_out = bytes_out,
            duration_ms = duration.as_millis() as u64,
            upstream_ms = upstream_ms.unwrap_or(0),
            dataverse_request_id = dv_id,
            proxy_error = proxy_error,
            error = error,
            outcome = outcome,
            "request"
        );
    }
}
