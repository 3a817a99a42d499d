//! The request id: the caller's `x-request-id`, or a new UUID v4, on the
//! request (so the handler, the log line and Dataverse see it) and on the
//! answer.
//!
//! A small layer of its own rather than tower-http's `SetRequestId` +
//! `PropagateRequestId` pair: the pair looks the header up three times and
//! puts a `RequestId` into the request's extensions that nothing here reads.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::http::{HeaderValue, Request, Response};

use super::REQUEST_ID;

/// Sets and returns the request id.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> tower::Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> RequestIdService<S> {
        RequestIdService { inner }
    }
}

/// The service of [`RequestIdLayer`].
#[derive(Debug, Clone)]
pub struct RequestIdService<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<Request<B>> for RequestIdService<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Future: Unpin,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = WithRequestId<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let id = match req.headers().get(REQUEST_ID).filter(|id| acceptable(id)) {
            Some(id) => id.clone(),
            None => {
                let id = new_request_id();
                req.headers_mut().insert(REQUEST_ID, id.clone());
                id
            }
        };
        WithRequestId {
            inner: self.inner.call(req),
            id: Some(id),
        }
    }
}

/// Longest caller-sent request id kept.
pub const MAX_REQUEST_ID: usize = 128;

/// Whether a caller's request id is kept as it is: 1 to 128 visible ASCII
/// characters (no spaces or controls, which logs and the status page would
/// carry). Anything else is replaced by a new id.
pub fn acceptable(id: &HeaderValue) -> bool {
    let b = id.as_bytes();
    !b.is_empty() && b.len() <= MAX_REQUEST_ID && b.iter().all(|c| c.is_ascii_graphic())
}

/// The inner answer, with the request id set on it.
pub struct WithRequestId<F> {
    inner: F,
    id: Option<HeaderValue>,
}

impl<F, RB, E> Future for WithRequestId<F>
where
    F: Future<Output = Result<Response<RB>, E>> + Unpin,
{
    type Output = Result<Response<RB>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let mut resp = std::task::ready!(Pin::new(&mut this.inner).poll(cx))?;
        if let Some(id) = this.id.take() {
            resp.headers_mut().insert(REQUEST_ID, id);
        }
        Poll::Ready(Ok(resp))
    }
}

/// A random (v4) UUID for a request that came without an id. Request ids
/// need to be unique, not secret: a fast thread-local generator is enough
/// (the `uuid` crate's v4 asks the OS for randomness on every call).
fn new_request_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf))
        .expect("a hyphenated UUID is a valid header value")
}
