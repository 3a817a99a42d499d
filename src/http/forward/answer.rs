//! Step 4: Dataverse's answer for the caller: headers filtered, links
//! rewritten, the body's coding fitted to the caller's `Accept-Encoding`,
//! the governor slot held until the body ends.

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use bytes::Bytes;
use http_body_util::BodyExt;

use super::admit::Admitted;
use super::call::Call;
use super::send::Sent;
use crate::app::AppState;
use crate::compression::stream::{decode, encode};
use crate::compression::{
    AcceptEncoding, BodyCoding, Coding, Transcode, vary_on_accept_encoding, weaken_etag,
};
use crate::error::ProxyError;
use crate::http::body::{DrainBounds, Drainable, ProxyBody};
use crate::http::headers;
use crate::rewrite::{RewriteBody, Rewriter};

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
    call: &mut Call<'_>,
    admitted: &Admitted,
    sent: Sent<B>,
) -> Result<Response<ProxyBody<B>>, ProxyError>
where
    B: Drainable,
{
    let (state, accept, info) = (call.state, call.accept, &mut *call.info);
    let Sent {
        response,
        permit,
        head,
    } = sent;
    let org = &admitted.org;
    let (mut parts, body) = response.into_parts();
    org.ratelimit
        .record(head.burst_remaining, head.time_remaining_ms);
    info.dataverse_request_id = head.request_id.clone();
    if head.for_upstream_only {
        headers::to_caller(&mut parts.headers);
    }
    let rewriter = admitted.links.to_caller.as_ref();
    if let Some(r) = rewriter.filter(|_| head.link_headers) {
        rewrite_link_headers(&mut parts.headers, r);
    }
    let rewriter = rewriter
        .filter(|_| has_body(&admitted.method, parts.status) && head.rewritable)
        .cloned();
    let coding = head.coding;
    if matches!(coding, BodyCoding::Coded(_)) {
        // What the caller gets depends on its Accept-Encoding.
        vary_on_accept_encoding(&mut parts.headers);
    }
    let transcode = transcode_of(
        (parts.status, coding),
        &admitted.method,
        rewriter.is_some(),
        accept,
    );
    let body = match (transcode, rewriter) {
        (Transcode::Recode { from, to }, rewriter) => {
            let level = state.upstream.recompression_level;
            recode(
                &mut parts.headers,
                body,
                (from, to),
                rewriter,
                level,
                permit,
            )
        }
        (Transcode::Untouched, Some(rewriter)) if coding == BodyCoding::Identity => {
            let length = head.content_length;
            rewrite_identity(state, (&mut parts.headers, length), body, rewriter, permit).await?
        }
        (Transcode::Untouched, _) => ProxyBody::upstream(body, None, permit),
    };
    Ok(Response::from_parts(
        parts,
        body.drain_within(DrainBounds::of(state)),
    ))
}

/// What the answer step does with the coding of an answer with these
/// headers: a body-less answer and a range of coded bytes (206) are never
/// opened.
pub fn transcode_for(
    (status, headers): (StatusCode, &HeaderMap),
    method: &Method,
    rewrite: bool,
    accept: &AcceptEncoding,
) -> Transcode {
    transcode_of((status, BodyCoding::of(headers)), method, rewrite, accept)
}

/// [`transcode_for`] with the coding already read.
fn transcode_of(
    (status, coding): (StatusCode, BodyCoding),
    method: &Method,
    rewrite: bool,
    accept: &AcceptEncoding,
) -> Transcode {
    if !has_body(method, status) || status == StatusCode::PARTIAL_CONTENT {
        return Transcode::Untouched;
    }
    Transcode::decide(coding, rewrite, accept)
}

/// An identity answer with links: a small one is read whole and rewritten
/// at once (sent with its exact length, no chunked framing); a large one,
/// or one of unknown length, is rewritten chunk by chunk.
async fn rewrite_identity<B>(
    state: &AppState,
    (headers, length): (&mut HeaderMap, Option<usize>),
    body: B,
    rewriter: Rewriter,
    permit: Option<crate::governor::Permit>,
) -> Result<ProxyBody<B>, ProxyError>
where
    B: Drainable,
{
    if length.is_none_or(|n| n > SMALL_ANSWER) {
        headers.remove(header::CONTENT_LENGTH);
        return Ok(ProxyBody::upstream(body, Some(rewriter), permit));
    }
    let idle = state.upstream.idle_timeout;
    let bytes = tokio::time::timeout(idle, body.collect())
        .await
        .map_err(|_| ProxyError::UpstreamTimeout(idle))?
        .map_err(|e| ProxyError::UpstreamBody(e.into()))?
        .to_bytes();
    let bytes = rewriter.rewrite_all(&bytes).map_or(bytes, Bytes::from);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Ok(ProxyBody::full(bytes, permit))
}

/// A coded answer decoded, rewritten when `rewriter` is set, and encoded
/// again as `to` (or sent as identity), streaming all the way. The bytes
/// change, so the length goes (chunked) and a strong `ETag` turns weak.
fn recode<B>(
    headers: &mut HeaderMap,
    body: B,
    (from, to): (Coding, Option<Coding>),
    rewriter: Option<Rewriter>,
    level: u32,
    permit: Option<crate::governor::Permit>,
) -> ProxyBody<B>
where
    B: Drainable,
{
    headers.remove(header::CONTENT_LENGTH);
    weaken_etag(headers);
    let decoded = RewriteBody::new(decode(body, from), rewriter);
    let coded = match to {
        Some(to) => {
            headers.insert(
                header::CONTENT_ENCODING,
                HeaderValue::from_static(to.token()),
            );
            encode(decoded, to, level)
        }
        None => {
            headers.remove(header::CONTENT_ENCODING);
            decoded.boxed_unsync()
        }
    };
    ProxyBody::coded(coded, permit)
}

pub fn has_body(method: &Method, status: StatusCode) -> bool {
    method != Method::HEAD && !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
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
