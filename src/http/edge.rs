//! Edge checks of the request head, before routing: header sizes, one
//! unambiguous framing, the Web API's methods (405 otherwise, whatever the
//! org's policy says), the origin-form target, the lengths and the query's
//! escapes. The path itself is checked by [`crate::guard`] once the org
//! prefix is known.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;

use axum::http::{Method, Request, Uri, header};
use axum::response::Response;
use futures_util::future::{Either, Ready, ready};

use super::REQUEST_ID;
use crate::config::LimitsConfig;
use crate::error::ProxyError;
use crate::server::ConflictingHost;

/// The edge checks as a layer in front of the router: a request that fails
/// them is answered at once with its error and goes no further.
///
/// A small layer of its own rather than `axum::middleware::from_fn`, which
/// boxes every request's future and clones the router behind it, for a
/// check that is a few comparisons.
#[derive(Clone)]
pub struct EdgeLayer {
    limits: Arc<ArcSwap<LimitsConfig>>,
}

impl EdgeLayer {
    /// Checks against `limits` as they are at each request (a reload may
    /// change them).
    pub fn new(limits: Arc<ArcSwap<LimitsConfig>>) -> Self {
        Self { limits }
    }
}

impl<S> tower::Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            limits: self.limits.clone(),
        }
    }
}

/// The service of [`EdgeLayer`].
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    limits: Arc<ArcSwap<LimitsConfig>>,
}

impl<S, B> tower::Service<Request<B>> for Edge<S>
where
    S: tower::Service<Request<B>, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match check_head(&req, &self.limits.load()) {
            Ok(()) => Either::Right(self.inner.call(req)),
            Err(e) => Either::Left(ready(Ok(e.to_response(req.headers().get(REQUEST_ID))))),
        }
    }
}

/// [`check_target`], then a declared body over `limits.max_body` (413
/// before a byte of it is read).
fn check_head<B>(req: &Request<B>, limits: &LimitsConfig) -> Result<(), ProxyError> {
    check_target(req.method(), req.uri(), req.headers(), limits)?;
    if req.extensions().get::<ConflictingHost>().is_some() {
        return Err(ProxyError::BadRequest(
            "the host header names another authority than :authority (RFC 9113 section 8.3.1)",
        ));
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limits.max_body) {
        return Err(ProxyError::BodyTooLarge(limits.max_body));
    }
    Ok(())
}

/// Checks what the request line may contain before routing: the method,
/// the request-target form and the lengths.
pub fn check_target(
    method: &Method,
    uri: &Uri,
    headers: &axum::http::HeaderMap,
    limits: &LimitsConfig,
) -> Result<(), ProxyError> {
    // hyper bounds its read buffer; this bounds what was parsed, exactly.
    let header_bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if header_bytes > limits.max_header_bytes || headers.len() > limits.max_headers {
        return Err(ProxyError::HeadersTooLarge);
    }
    // Request smuggling defences (RFC 9112 §6.1, §6.3): one framing only,
    // and a transfer coding the proxy can forward.
    let te: Vec<_> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    let cl = headers.get_all(header::CONTENT_LENGTH).iter().count();
    if !te.is_empty() {
        if cl > 0 {
            return Err(ProxyError::BadRequest(
                "both Content-Length and Transfer-Encoding are present",
            ));
        }
        let only_chunked = te.len() == 1
            && te[0]
                .to_str()
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        if !only_chunked {
            return Err(ProxyError::BadRequest(
                "only Transfer-Encoding: chunked is accepted on requests",
            ));
        }
    }
    if cl > 1 {
        return Err(ProxyError::BadRequest(
            "more than one Content-Length header",
        ));
    }
    if !crate::guard::is_web_api_method(method) {
        return Err(ProxyError::MethodNotAllowed);
    }
    if uri.scheme().is_some() || uri.authority().is_some() {
        return Err(ProxyError::BadRequest(
            "absolute-form and authority-form request targets are not accepted; send the path only",
        ));
    }
    if uri.path().len() > limits.max_path || uri.query().map_or(0, str::len) > limits.max_query {
        return Err(ProxyError::UriTooLong);
    }
    if let Some(query) = uri.query() {
        crate::guard::check_query(query)?;
    }
    Ok(())
}
