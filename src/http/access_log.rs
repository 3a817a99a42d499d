//! One structured log line and the request metrics per request, written
//! when the answer's body has been sent (or the connection broke), so the
//! bytes and the full duration are known.
//!
//! Fields (see `docs/logging.md`): `request.id`, `caller`, `org`, `method`,
//! `path` (without the query unless `log.query = true`: queries can carry
//! personal data), `status`, `bytes_in`, `bytes_out`, `duration_ms`,
//! `upstream_ms`, `dataverse_request_id`, `proxy_error`, `error`, `outcome`
//! (`complete` or `aborted`).
//!
//! The line is built by hand and written off the request's path
//! (`crate::logging`).
//!
//! A tower layer of its own rather than tower-http's trace callbacks: those
//! are cloned from the layer for every request and carry no state of the
//! request, and the line needs the org, the caller, Dataverse's request id
//! and the byte counts at the end of the stream. The trace layer still
//! makes the request's span; this line is written inside it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{HeaderValue, Request, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::Instant;

use super::REQUEST_ID;
use crate::app::{AppState, OrgState};
use crate::error::{ErrorDetail, PROXY_ERROR_HEADER};
use crate::logging::RequestLine;
use crate::stats::board::Ended;
use crate::stats::metrics::Finished;

/// What the forwarding handler tells the access log about a request, as a
/// response extension.
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    /// The org it was routed to.
    pub org: Option<Arc<OrgState>>,
    /// Time until Dataverse's response headers (summed over attempts).
    pub upstream: Option<Duration>,
    /// Dataverse's own request id (`x-ms-service-request-id` or `REQ_ID`).
    pub dataverse_request_id: Option<HeaderValue>,
    /// The caller's name, when callers are identified.
    pub caller: Option<Arc<str>>,
    /// Who a caller token names: the user's object id, or the app's client id.
    pub principal: Option<Arc<str>>,
    /// The caller's place in `[[callers]]` plus one (0: none), which picks
    /// the org's metric handles.
    pub caller_slot: usize,
    /// The rules the request was admitted under (its caller's metric
    /// handles are theirs).
    pub rules: Option<Arc<crate::app::rules::Rules>>,
    /// How the metadata cache served it (`hit`, `revalidated`, `miss`,
    /// `changed`), for the requests it serves.
    pub cache: Option<&'static str>,
    /// The lane it was sent on (`user` for a user's own token).
    pub lane: Option<Arc<str>>,
    /// The Power Platform requests it is, as Dataverse counts them
    /// (`usage::count`).
    pub requests: u32,
}

/// Writes the access log line and the request metrics of every request.
#[derive(Clone)]
pub struct AccessLogLayer {
    state: AppState,
}

impl AccessLogLayer {
    /// A layer recording into `state`'s metrics.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

impl<S> tower::Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog {
            inner,
            state: self.state.clone(),
        }
    }
}

/// The service of [`AccessLogLayer`].
#[derive(Clone)]
pub struct AccessLog<S> {
    inner: S,
    state: AppState,
}

impl<S, B, RB> tower::Service<Request<B>> for AccessLog<S>
where
    S: tower::Service<Request<Counted<B>>, Response = Response<RB>>,
    S::Future: Send + 'static,
    RB: http_body::Body,
{
    type Response = Response<Logged<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let start = Instant::now();
        let bytes_in = Arc::new(AtomicU64::new(0));
        let request = Arrived {
            request_id: req.headers().get(REQUEST_ID).cloned(),
            method: req.method().clone(),
            uri: req.uri().clone(),
        };
        let counted = req.map(|body| Counted {
            inner: body,
            count: bytes_in.clone(),
        });
        self.state.metrics.in_flight().inc();
        let state = self.state.clone();
        let answer = self.inner.call(counted);
        Box::pin(async move {
            let mut resp = answer.await?;
            let entry = Entry {
                info: resp
                    .extensions_mut()
                    .remove::<RequestInfo>()
                    .unwrap_or_default(),
                error: resp.extensions_mut().remove::<ErrorDetail>().map(|e| e.0),
                proxy_error: resp.headers().get(PROXY_ERROR_HEADER).cloned(),
                status: resp.status(),
                state,
                start,
                request,
                bytes_in,
            };
            Ok(resp.map(|body| Logged {
                inner: body,
                entry: Some(entry),
                bytes_out: 0,
            }))
        })
    }
}

/// The caller's body, its bytes counted.
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> http_body::Body for Counted<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
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

/// The answer's body: counts what is sent, writes the line when it ends,
/// fails or is dropped.
pub struct Logged<B: http_body::Body> {
    inner: B,
    entry: Option<Entry>,
    bytes_out: u64,
}

impl<B: http_body::Body> Logged<B> {
    fn finish(&mut self, complete: bool) {
        if let Some(entry) = self.entry.take() {
            entry.write(self.bytes_out, complete);
        }
    }
}

impl<B> http_body::Body for Logged<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.bytes_out += d.len() as u64;
                }
            }
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
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

impl<B: http_body::Body> Drop for Logged<B> {
    fn drop(&mut self) {
        // An empty body may never be polled (hyper drops it once the head
        // is sent); anything else dropped before its end means the
        // connection broke.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

/// The request line as it arrived.
struct Arrived {
    request_id: Option<HeaderValue>,
    method: http::Method,
    uri: http::Uri,
}

/// Everything the log line needs but the byte count.
struct Entry {
    state: AppState,
    start: Instant,
    request: Arrived,
    status: http::StatusCode,
    info: RequestInfo,
    proxy_error: Option<HeaderValue>,
    error: Option<String>,
    bytes_in: Arc<AtomicU64>,
}

impl Entry {
    fn write(self, bytes_out: u64, complete: bool) {
        let duration = self.start.elapsed();
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        let org = self.info.org.as_ref().map_or("-", |o| o.name.as_str());
        let caller = self.info.caller.as_deref().unwrap_or("-");
        let source = if self.proxy_error.is_some() {
            "proxy"
        } else {
            "dataverse"
        };
        self.state.metrics.in_flight().dec();
        let handles = match &self.info.org {
            Some(org) => self
                .info
                .rules
                .as_ref()
                .and_then(|r| r.orgs[org.index].metrics.get(self.info.caller_slot))
                .unwrap_or(&org.metrics),
            None => &self.state.unrouted,
        };
        handles.finished(&Finished {
            method: self.request.method.clone(),
            status: self.status,
            source,
            duration,
            bytes_in,
            bytes_out,
        });
        let ended = Ended {
            org: self.info.org.as_deref().map(|o| o.name.as_str()),
            caller: self.info.caller.as_ref(),
            status: self.status,
            proxy_error: self.proxy_error.as_ref(),
            request_id: self.request.request_id.as_ref(),
            took: duration,
        };
        if let Some(org) = &self.info.org {
            org.board.record(&ended);
            super::spend::spend(&self.state, org, &self.info, self.status);
        }
        self.state.recent_errors.record(&ended);
        if !crate::logging::requests_logged() {
            return;
        }
        let path = if self.state.log_query {
            self.request
                .uri
                .path_and_query()
                .map_or(self.request.uri.path(), |pq| pq.as_str())
        } else {
            self.request.uri.path()
        };
        crate::logging::request(&RequestLine {
            request_id: text(self.request.request_id.as_ref()),
            caller,
            principal: self.info.principal.as_deref().unwrap_or("-"),
            org,
            method: self.request.method.as_str(),
            path,
            status: self.status.as_u16(),
            bytes_in,
            bytes_out,
            duration_ms: duration.as_millis() as u64,
            upstream_ms: self.info.upstream.map_or(0, |d| d.as_millis() as u64),
            dataverse_request_id: text(self.info.dataverse_request_id.as_ref()),
            cache: self.info.cache.unwrap_or("-"),
            proxy_error: text(self.proxy_error.as_ref()),
            error: self.error.as_deref().unwrap_or(""),
            outcome: if complete { "complete" } else { "aborted" },
        });
    }
}

/// A header's value as text, empty when absent or not visible ASCII.
fn text(v: Option<&HeaderValue>) -> &str {
    v.and_then(|v| v.to_str().ok()).unwrap_or("")
}
