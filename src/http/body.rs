//! Bodies: the caller's ([`Inbound`]: limited, its faults named), prepared
//! for sending ([`RequestBody`]: buffered for replay, or streamed), and the
//! answer ([`ProxyBody`]: Dataverse's stream with link rewriting and the
//! governor slot held until it ends, decoded and encoded again, or a whole
//! body).
//!
//! Idle timeouts are not here: a layer wraps every request and response
//! body ([`super::idle`], `http/mod.rs`).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::upstream::PooledBody;
use axum::BoxError;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, header};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

use crate::compression::stream::CodedBody;
use crate::error::ProxyError;
use crate::governor::Permit;
use crate::rewrite::{RewriteBody, Rewriter};

/// True for content types whose bodies carry links: OData JSON and `$batch`
/// multipart.
pub fn is_rewritable(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(is_rewritable_type)
}

/// Whether a `Content-Type` value is one whose bodies can hold links.
pub fn is_rewritable_type(value: &axum::http::HeaderValue) -> bool {
    let Ok(ct) = value.to_str() else {
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

/// How much of an answer whose caller left is read and discarded before
/// its slot is freed: Dataverse counts the request until its answer has
/// been sent, and a connection read to its end goes back to the pool.
/// Past the bounds the upstream connection is dropped (which ends the
/// request on Dataverse's side too) and the slot freed.
#[derive(Debug, Clone, Copy)]
pub struct DrainBounds {
    /// Bytes read at most.
    pub bytes: usize,
    /// Time spent at most.
    pub time: Duration,
}

/// Bytes of an abandoned answer read at most (a page of records; a file
/// download is cut off instead).
const DRAIN_BYTES: usize = 1 << 20;

impl DrainBounds {
    /// The bounds in force: [`DRAIN_BYTES`], and the disconnect grace.
    pub fn of(state: &crate::app::AppState) -> Self {
        Self {
            bytes: DRAIN_BYTES,
            time: state.orgs.first().map_or(Duration::from_secs(5), |o| {
                o.lanes.first().governor.config().disconnect_grace
            }),
        }
    }

    /// Reads `body` to its end or to the bounds, discarding it.
    pub async fn run<B>(self, body: B)
    where
        B: http_body::Body<Data = Bytes> + Unpin,
    {
        let mut body = body;
        let mut read = 0usize;
        let reading = async {
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, Bytes::len);
                if read > self.bytes {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(self.time, reading).await;
    }
}

/// The body of Dataverse's answer: its stream, or the bytes of a 429 that
/// was read to learn which limit it names.
pub type UpstreamBody = http_body_util::Either<PooledBody, http_body_util::Full<Bytes>>;

/// The body of every answer that comes from Dataverse (or from the
/// metadata cache): its stream, links rewritten when a rewriter is set, or
/// its bytes read whole, or the output of a codec; the governor slot (none
/// for a cached answer) is held until the body ends, because Dataverse
/// counts a request as in flight until its answer is sent.
///
/// Generic over the upstream body so the answer step can be tested with
/// bodies made in memory; in the proxy it is the pool's [`PooledBody`].
pub struct ProxyBody<B: Drainable = UpstreamBody> {
    inner: Inner<B>,
    permit: Option<Permit>,
    /// Set for answers with a slot: how to finish them if the caller goes.
    drain: Option<DrainBounds>,
}

/// An upstream body that a task of its own can finish reading.
pub trait Drainable:
    http_body::Body<Data = Bytes, Error: Into<BoxError>> + Unpin + Send + 'static
{
}

impl<B> Drainable for B where
    B: http_body::Body<Data = Bytes, Error: Into<BoxError>> + Unpin + Send + 'static
{
}

impl<B: Drainable> Drop for ProxyBody<B> {
    fn drop(&mut self) {
        // The caller left before Dataverse's answer ended: finish reading
        // it in a task of its own; the slot is free when it ends.
        let (Some(permit), Some(bounds)) = (self.permit.take(), self.drain) else {
            return;
        };
        let rest = Self {
            inner: std::mem::replace(&mut self.inner, Inner::Full(None)),
            permit: None,
            drain: None,
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let mut permit = permit;
                permit.answered();
                bounds.run(rest).await;
                permit.finish();
            });
        }
    }
}

enum Inner<B> {
    Stream(RewriteBody<B>),
    /// Decoded (and rewritten, and encoded again): the codecs' output.
    Coded(CodedBody),
    /// A whole body in memory (a small answer rewritten at once).
    Full(Option<Bytes>),
}

impl<B: Drainable> ProxyBody<B> {
    /// Dataverse's answer, rewritten when `rewriter` is set.
    pub fn upstream(body: B, rewriter: Option<Rewriter>, permit: Option<Permit>) -> Self {
        Self {
            inner: Inner::Stream(RewriteBody::new(body, rewriter)),
            permit,
            drain: None,
        }
    }

    /// Dataverse's answer after a codec (see `compression`).
    pub fn coded(body: CodedBody, permit: Option<Permit>) -> Self {
        Self {
            inner: Inner::Coded(body),
            permit,
            drain: None,
        }
    }

    /// Finishes reading the answer within `bounds` if the caller leaves.
    pub fn drain_within(mut self, bounds: DrainBounds) -> Self {
        self.drain = Some(bounds);
        self
    }

    /// Dataverse's answer read whole (and rewritten): it has ended, so the
    /// slot is free at once.
    pub fn full(bytes: Bytes, permit: Option<Permit>) -> Self {
        if let Some(permit) = permit {
            permit.finish();
        }
        Self {
            inner: Inner::Full(Some(bytes).filter(|b| !b.is_empty())),
            permit: None,
            drain: None,
        }
    }
}

impl<B: Drainable> http_body::Body for ProxyBody<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Inner::Stream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::Coded(b) => Pin::new(b).poll_frame(cx),
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        };
        if matches!(polled, Poll::Ready(None | Some(Err(_))))
            && let Some(permit) = this.permit.take()
        {
            // Dataverse's answer has ended (or broke off): the slot is free
            // now. Dropped before that, the permit keeps the slot for the
            // disconnect grace, since Dataverse may still be working.
            permit.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Stream(b) => b.is_end_stream(),
            Inner::Coded(b) => b.is_end_stream(),
            Inner::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Stream(b) => b.size_hint(),
            Inner::Coded(b) => b.size_hint(),
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// The caller broke its body's framing (a chunk line hyper cannot read, a
/// body shorter than its `Content-Length`, a reset). Marks the error so the
/// answer is a 400 `bad_request_body`, not a Dataverse failure; the upstream
/// request, whose body fails with it, is aborted rather than ended.
#[derive(Debug, thiserror::Error)]
#[error("the caller's request body is malformed or broken off: {0}")]
pub struct CallerBodyBroken(#[source] BoxError);

/// The caller stopped sending its body for longer than
/// `limits.body_idle_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the caller's request body stalled")]
pub struct CallerBodyStalled;

/// The caller's body went over `limits.max_body` (this many bytes).
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than {0} bytes")]
pub struct BodyLimit(pub usize);

/// The caller-side fault behind an error of the request body, if any:
/// a stall (408), the size limit (413) or broken framing (400).
pub fn caller_body_fault(e: &(dyn std::error::Error + 'static)) -> Option<ProxyError> {
    let mut source = Some(e);
    while let Some(err) = source {
        if err.is::<CallerBodyStalled>() {
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

/// The caller's body as the handler reads it: cut off at the size limit,
/// and every error named for what the caller did ([`caller_body_fault`]).
/// Naming happens here, where only the caller's side can fail: further out,
/// the upstream client's errors look alike.
pub struct Inbound {
    inner: http_body_util::Limited<Body>,
    limit: usize,
}

impl Inbound {
    /// Wraps `body`, limited to `limit` bytes.
    pub fn new(body: Body, limit: usize) -> Self {
        Self {
            inner: http_body_util::Limited::new(body, limit),
            limit,
        }
    }

    fn classify(&self, e: BoxError) -> BoxError {
        if e.is::<http_body_util::LengthLimitError>() {
            return Box::new(BodyLimit(self.limit));
        }
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&*e);
        while let Some(err) = source {
            if err.is::<super::idle::BodyIdleTimeout>() {
                return Box::new(CallerBodyStalled);
            }
            source = err.source();
        }
        Box::new(CallerBodyBroken(e))
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
        match Pin::new(&mut this.inner).poll_frame(cx) {
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
