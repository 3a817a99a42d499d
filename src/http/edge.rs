//! Edge checks of the request head, before routing: header sizes, one
//! unambiguous framing, the Web API's methods (405 otherwise, whatever the
//! org's policy says), the origin-form target, the lengths and the query's
//! escapes. The path itself is checked by [`crate::guard`] once the org
//! prefix is known.

use axum::extract::{Request, State};
use axum::http::{Method, Uri, header};
use axum::middleware::Next;
use axum::response::Response;

use super::REQUEST_ID;
use super::state::AppState;
use crate::config::LimitsConfig;
use crate::error::ProxyError;

/// The edge checks as middleware, before any handler: a request that fails
/// them is answered here with its error.
pub async fn check(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match check_head(&req, &state.limits) {
        Ok(()) => next.run(req).await,
        Err(e) => e.to_response(req.headers().get(REQUEST_ID)),
    }
}

/// [`check_target`], then a declared body over `limits.max_body` (413
/// before a byte of it is read).
fn check_head(req: &Request, limits: &LimitsConfig) -> Result<(), ProxyError> {
    check_target(req.method(), req.uri(), req.headers(), limits)?;
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
