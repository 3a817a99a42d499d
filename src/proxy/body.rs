//! Request bodies (buffered for replay, or streamed) and the response body
//! stack (idle timeout, link rewriting, governor permit).

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, header};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

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
                    .map_err(|e| {
                        if super::caused_by_idle_body(&e) {
                            ProxyError::RequestTimeout
                        } else {
                            ProxyError::BadRequest("the request body could not be read")
                        }
                    })?
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

/// Holds the governor permit until the response body ends (Dataverse counts
/// a request as in flight until its answer is sent).
pub struct Guarded<B> {
    inner: B,
    permit: Option<Permit>,
}

impl<B> Guarded<B> {
    /// Wraps `inner`, keeping `permit` until it ends or is dropped.
    pub fn new(inner: B, permit: Permit) -> Self {
        Self {
            inner,
            permit: Some(permit),
        }
    }
}

impl<B> http_body::Body for Guarded<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = polled {
            this.permit = None;
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
