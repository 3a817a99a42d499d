//! Edge checks of the request head, before routing: header sizes, one
//! unambiguous framing, the Web API's methods (405 otherwise, whatever the
//! org's policy says), the origin-form target, the lengths and the query's
//! escapes. The path itself is checked by [`crate::guard`] once the org
//! prefix is known.

use axum::http::{Method, Uri};

use crate::config::LimitsConfig;
use crate::error::ProxyError;

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
    let te: Vec<_> = headers
        .get_all(axum::http::header::TRANSFER_ENCODING)
        .iter()
        .collect();
    let cl = headers
        .get_all(axum::http::header::CONTENT_LENGTH)
        .iter()
        .count();
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

/// True for file and image downloads (`…/$value`), whose binary bodies are
/// never rewritten and may come compressed.
pub fn is_file_download(path: &str) -> bool {
    path.ends_with("/$value")
}
