//! Request bodies (buffered for replay, or streamed) and the response body
//! ([`ProxyBody`]: idle timeout, link rewriting, governor permit, access log).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::BoxError;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, header};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::upstream::IdleTimeout;
use crate::access::Entry;
use crate::error::ProxyError;
use crate::governor::Permit;
use crate::rewrite::{RewriteBody, Rewriter};

/// True for content types whose bodies carry links: OData JSON and `$batch`
/// multipart.
pub fn is_rewritable(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let ct = ct.trim_start();
    starts_with_ignore_case(ct, "application/json")
        || starts_with_ignore_case(ct, "multipart/mixed")
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// The caller's body, prepared for sending (possibly more than once).
pub enum RequestBody {
    /// No body.
    Empty,
    /// Small enough to buffer: replayable, links rewritten, exact length.
    Buffered(Bytes),
    /// Streamed through; can be sent once.
    Stream(Option<Body>),
}

impl RequestBody {
    /// Buffers bodies with a `Content-Length` up to `limit`, streams the
    /// rest; rewrites proxy links to org links in JSON and `$batch` bodies.
    pub async fn prepare(
        headers: &mut HeaderMap,
        body: Body,
        to_org: Option<&Rewriter>,
        limit: usize,
    ) -> Result<Self, ProxyError> {
        let length = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if length == Some(0) || http_body::Body::is_end_stream(&body) {
            return Ok(Self::Empty);
        }
        let rewriter = to_org.filter(|_| is_rewritable(headers));
        match length {
            Some(n) if n <= limit => {
                let bytes = body
                    .collect()
                    .await
                    .map_err(|e| caller_body_fault(&e).unwrap_or(ProxyError::BadRequestBody))?
                    .to_bytes();
                let bytes = match rewriter.and_then(|r| r.rewrite_all(&bytes)) {
                    Some(rewritten) => Bytes::from(rewritten),
                    None => bytes,
                };
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                Ok(Self::Buffered(bytes))
            }
            _ => match rewriter {
                Some(r) => {
                    // The length changes: send it chunked.
                    headers.remove(header::CONTENT_LENGTH);
                    Ok(Self::Stream(Some(Body::new(RewriteBody::new(
                        body,
                        Some(r.clone()),
                    )))))
                }
                None => Ok(Self::Stream(Some(body))),
            },
        }
    }

    /// The body for one attempt.
    pub fn take(&mut self) -> Body {
        match self {
            Self::Empty => Body::empty(),
            Self::Buffered(b) => Body::from(b.clone()),
            Self::Stream(s) => s.take().unwrap_or_else(Body::empty),
        }
    }

    /// Whether the body can be sent again.
    pub fn replayable(&self) -> bool {
        !matches!(self, Self::Stream(_))
    }
}

/// The one body type of every answer the proxy sends: Dataverse's stream
/// (idle timeout, link rewriting, the governor permit held until it ends)
/// or a proxy-made answer; it counts the bytes sent and hands them to the
/// access log when it ends, fails or is dropped.
///
/// One concrete type instead of a stack of boxed wrappers: each frame costs
/// one call per stage, not a virtual call and a box per stage.
pub struct ProxyBody {
    inner: Inner,
    /// Dataverse counts a request as in flight until its answer is sent.
    permit: Option<Permit>,
    log: Option<Entry>,
    bytes_out: u64,
}

enum Inner {
    Upstream(RewriteBody<IdleTimeout<Incoming>>),
    /// A whole body in memory (a small answer rewritten at once).
    Full(Option<Bytes>),
    Local(Body),
}

impl ProxyBody {
    /// Dataverse's answer, rewritten when `rewriter` is set.
    pub fn upstream(
        body: Incoming,
        idle: Duration,
        rewriter: Option<Rewriter>,
        permit: Permit,
    ) -> Self {
        Self {
            inner: Inner::Upstream(RewriteBody::new(IdleTimeout::new(body, idle), rewriter)),
            permit: Some(permit),
            log: None,
            bytes_out: 0,
        }
    }

    /// Dataverse's answer read whole (and rewritten); `permit` is held until
    /// it is sent.
    pub fn full(bytes: Bytes, permit: Permit) -> Self {
        Self {
            inner: Inner::Full(Some(bytes).filter(|b| !b.is_empty())),
            permit: Some(permit),
            log: None,
            bytes_out: 0,
        }
    }

    /// An answer made by the proxy (errors).
    pub fn local(body: Body) -> Self {
        Self {
            inner: Inner::Local(body),
            permit: None,
            log: None,
            bytes_out: 0,
        }
    }

    /// Writes `entry` to the access log when the body ends.
    pub(crate) fn log_to(&mut self, entry: Entry) {
        self.log = Some(entry);
    }

    fn finish(&mut self, complete: bool) {
        self.permit = None;
        if let Some(e) = self.log.take() {
            e.finish(self.bytes_out, complete);
        }
    }
}

impl http_body::Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Inner::Upstream(b) => Pin::new(b).poll_frame(cx),
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Local(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes_out += d.len() as u64;
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Full(b) => b.is_none(),
            Inner::Local(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(b) => b.size_hint(),
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Local(b) => b.size_hint(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if self.log.is_some() || self.permit.is_some() {
            // An empty body may never be polled; anything else dropped
            // early means the connection broke.
            let complete = http_body::Body::is_end_stream(self);
            self.finish(complete);
        }
    }
}

/// The caller broke its body's framing (a chunk line hyper cannot read, a
/// body shorter than its `Content-Length`, a reset). Marks the error so the
/// answer is a 400 `bad_request_body`, not a Dataverse failure; the upstream
/// request, whose body fails with it, is aborted rather than ended.
#[derive(Debug, thiserror::Error)]
#[error("the caller's request body is malformed or broken off: {0}")]
pub struct CallerBodyBroken(#[source] hyper::Error);

/// The caller-side fault behind an error of the request body, if any:
/// a stall (408), the size limit (413) or broken framing (400).
pub fn caller_body_fault(e: &(dyn std::error::Error + 'static)) -> Option<ProxyError> {
    let mut source = Some(e);
    while let Some(err) = source {
        if err.is::<super::upstream::BodyIdleTimeout>() {
            return Some(ProxyError::RequestTimeout);
        }
        if let Some(limit) = err.downcast_ref::<BodyLimit>() {
            return Some(ProxyError::BodyTooLarge(limit.0));
        }
        if err.is::<CallerBodyBroken>() {
            return Some(ProxyError::BadRequestBody);
        }
        source = err.source();
    }
    None
}

/// The caller's body went over `limits.max_body` (this many bytes).
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than {0} bytes")]
pub struct BodyLimit(pub usize);

/// The caller's body as it arrives: cut off at the size limit (413), failed
/// when it stalls (408) or when its framing breaks (400), its bytes counted
/// for the access log.
pub struct Inbound {
    inner: IdleTimeout<http_body_util::Limited<Incoming>>,
    limit: usize,
    counted: Arc<AtomicU64>,
}

impl Inbound {
    /// Wraps `body`; `counted` receives the number of bytes read.
    pub fn new(body: Incoming, limit: usize, idle: Duration, counted: Arc<AtomicU64>) -> Self {
        Self {
            inner: IdleTimeout::new(http_body_util::Limited::new(body, limit), idle),
            limit,
            counted,
        }
    }
}

impl Inbound {
    /// Names what went wrong: the limit, or the caller's framing (hyper's
    /// own error); a stall is already a [`super::upstream::BodyIdleTimeout`].
    fn classify(&self, e: BoxError) -> BoxError {
        if e.is::<http_body_util::LengthLimitError>() {
            return Box::new(BodyLimit(self.limit));
        }
        match e.downcast::<hyper::Error>() {
            Ok(hyper) => Box::new(CallerBodyBroken(*hyper)),
            Err(other) => other,
        }
    }
}

impl http_body::Body for Inbound {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.counted.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(this.classify(e)))),
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
