//! One structured log line and the metrics per request, written when the
//! answer's body has been sent (or the connection broke), so bytes and the
//! full duration are known.
//!
//! Fields (see `docs/logging.md`): `request.id`, `caller`, `org`, `method`,
//! `path` (without the query unless `log.query = true`: queries can carry
//! personal data), `status`, `bytes_in`, `bytes_out`, `duration_ms`,
//! `upstream_ms`, `dataverse_request_id`, `proxy_error`, `error`, `outcome`
//! (`complete` or `aborted`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::app::{AppState, REQUEST_ID};
use crate::error::PROXY_ERROR_HEADER;
use crate::metrics::{RequestLabels, method_label, status_class};

/// What the forwarding handler tells the access log about a request.
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    /// The org it was routed to.
    pub org: Option<Arc<str>>,
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

/// Everything the log line needs but the byte count.
struct Entry {
    state: AppState,
    start: Instant,
    request_id: String,
    method: http::Method,
    path: String,
    status: http::StatusCode,
    info: RequestInfo,
    proxy_error: Option<String>,
    error: Option<String>,
    bytes_in: Arc<AtomicU64>,
}

impl Entry {
    fn finish(self, bytes_out: u64, complete: bool) {
        let duration = self.start.elapsed();
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        let org = self.info.org.as_deref().unwrap_or("-");
        let caller = self.info.caller.as_deref().unwrap_or("-");
        let m = &self.state.metrics;
        m.in_flight().dec();
        m.finished(
            &RequestLabels {
                org: org.to_owned(),
                method: method_label(&self.method),
                status: status_class(self.status),
                source: if self.proxy_error.is_some() {
                    "proxy"
                } else {
                    "dataverse"
                },
                caller: caller.to_owned(),
            },
            duration,
            bytes_in,
            bytes_out,
        );
        let upstream_ms = self.info.upstream.map(|d| d.as_millis() as u64);
        let dv_id = self
            .info
            .dataverse_request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let outcome = if complete { "complete" } else { "aborted" };
        let (request_id, method, path) = (&self.request_id, &self.method, &self.path);
        let proxy_error = self.proxy_error.as_deref().unwrap_or("");
        let error = self.error.as_deref().unwrap_or("");
        let status = self.status.as_u16();
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

/// The middleware: counts request bytes, then wraps the answer's body.
pub async fn log_and_measure(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = if state.log_query {
        req.uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned())
    } else {
        req.uri().path().to_owned()
    };
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let bytes_in = Arc::new(AtomicU64::new(0));
    let counter = bytes_in.clone();
    let req = req.map(|body| {
        Body::new(body.map_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                counter.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            frame
        }))
    });
    state.metrics.in_flight().inc();
    let resp = next.run(req).await;
    let (mut parts, body) = resp.into_parts();
    let entry = Entry {
        state,
        start,
        request_id,
        method,
        path,
        status: parts.status,
        info: parts.extensions.remove::<RequestInfo>().unwrap_or_default(),
        proxy_error: parts
            .headers
            .get(PROXY_ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        error: parts.extensions.remove::<ErrorMessage>().map(|e| e.0),
        bytes_in,
    };
    Response::from_parts(
        parts,
        Body::new(Logged {
            inner: body,
            entry: Some(entry),
            bytes_out: 0,
        }),
    )
}

/// A body that writes the log line when it ends or is dropped.
struct Logged {
    inner: Body,
    entry: Option<Entry>,
    bytes_out: u64,
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes_out += d.len() as u64;
                }
            }
            Poll::Ready(None) => {
                if let Some(e) = this.entry.take() {
                    e.finish(this.bytes_out, true);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(e) = this.entry.take() {
                    e.finish(this.bytes_out, false);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(e) = self.entry.take() {
            // An empty body may never be polled; anything else dropped
            // early means the connection broke.
            let complete = http_body::Body::is_end_stream(&self.inner);
            e.finish(self.bytes_out, complete);
        }
    }
}
