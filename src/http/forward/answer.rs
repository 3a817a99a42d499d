//! Step 4: Dataverse's answer for the caller: headers filtered, links
//! rewritten, the governor slot held until the body ends.

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use bytes::Bytes;

use super::admit::Admitted;
use super::send::Sent;
use crate::error::ProxyError;
use crate::http::access_log::RequestInfo;
use crate::http::body::{ProxyBody, is_rewritable};
use crate::http::headers::{self, names};
use crate::http::state::AppState;
use crate::rewrite::Rewriter;

/// Response headers that carry absolute org URLs.
static LINK_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("odata-entityid"),
    header::LOCATION,
    header::CONTENT_LOCATION,
];

/// Answers with links up to this size are read whole and rewritten at once
/// (sent with an exact length); larger ones stream.
pub const SMALL_ANSWER: usize = 64 * 1024;

/// Turns Dataverse's answer into the caller's.
pub async fn answer<B>(
    state: &AppState,
    admitted: &Admitted,
    sent: Sent<B>,
    info: &mut RequestInfo,
) -> Result<Response<ProxyBody<B>>, ProxyError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    let Sent { response, permit } = sent;
    let org = &admitted.org;
    let (mut parts, body) = response.into_parts();
    org.ratelimit.record(&parts.headers);
    info.dataverse_request_id = parts
        .headers
        .get(names::X_MS_SERVICE_REQUEST_ID)
        .or_else(|| parts.headers.get(names::REQ_ID))
        .cloned();
    headers::to_caller(&mut parts.headers);
    if let Some(hint) = dop_hint(&parts.headers) {
        org.governor.dop_hint(hint);
    }
    let rewriter = admitted.links.to_caller.as_ref();
    if let Some(r) = rewriter {
        rewrite_link_headers(&mut parts.headers, r);
    }
    let rewrite_body = rewriter
        .filter(|_| has_body(&admitted.method, parts.status) && is_rewritable(&parts.headers))
        .filter(|_| is_identity(&parts.headers))
        .cloned();
    let Some(rewriter) = rewrite_body else {
        return Ok(Response::from_parts(
            parts,
            ProxyBody::upstream(body, None, permit),
        ));
    };
    if content_length(&parts.headers).is_some_and(|n| n <= SMALL_ANSWER) {
        // Small: read whole, rewrite at once, send with its exact length
        // (no chunked framing, no per-chunk bookkeeping).
        let idle = state.upstream.idle_timeout;
        let bytes = tokio::time::timeout(idle, http_body_util::BodyExt::collect(body))
            .await
            .map_err(|_| ProxyError::UpstreamTimeout(idle))?
            .map_err(|e| ProxyError::UpstreamBody(e.into()))?
            .to_bytes();
        let bytes = rewriter.rewrite_all(&bytes).map_or(bytes, Bytes::from);
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        return Ok(Response::from_parts(parts, ProxyBody::full(bytes, permit)));
    }
    // Large or of unknown length: streamed, rewritten chunk by chunk.
    parts.headers.remove(header::CONTENT_LENGTH);
    Ok(Response::from_parts(
        parts,
        ProxyBody::upstream(body, Some(rewriter), permit),
    ))
}

fn has_body(method: &Method, status: StatusCode) -> bool {
    method != Method::HEAD && !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
}

fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn dop_hint(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(names::X_MS_DOP_HINT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// True when the body is not compressed (rewriting compressed bytes would
/// corrupt them, so such bodies pass through as they are).
fn is_identity(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim().eq_ignore_ascii_case("identity"))
}

fn rewrite_link_headers(headers: &mut HeaderMap, rewriter: &Rewriter) {
    for name in &LINK_HEADERS {
        let Some(value) = headers.get(name) else {
            continue;
        };
        if let Some(new) = rewriter.rewrite_all(value.as_bytes())
            && let Ok(v) = HeaderValue::from_bytes(&new)
        {
            headers.insert(name, v);
        }
    }
}
