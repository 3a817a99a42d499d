//! The forwarding handler: everything between the caller and Dataverse.
//!
//! Steps, in order:
//! 1. routing to an org (`/{org}/api/…`, `Host`, or the default org) and
//!    the path check: only the Web API is reachable (404/400 otherwise);
//! 2. header policy towards Dataverse; `Accept-Encoding` is dropped for
//!    everything but file downloads, so bodies whose links are rewritten
//!    always arrive uncompressed (see `docs/configuration.md`);
//! 3. the request body is buffered when small (replayable, links rewritten
//!    to the org, exact `Content-Length`) or streamed;
//! 4. a governor slot for the org (429 when the queue is full or too slow);
//! 5. a token (503 without one: nothing is ever forwarded unauthenticated);
//!    a 401 from Dataverse drops that token, fetches once and replays once
//!    when the body allows;
//! 6. send, with a response-header timeout; a 429 from Dataverse closes the
//!    org's gate for everyone and is replayed after the wait when the body
//!    allows, within the retry budget and deadline;
//! 7. the answer streams back: headers filtered, org links in
//!    `OData-EntityId` / `Location` / `Content-Location` and in JSON and
//!    `$batch` bodies rewritten to the proxy's public URL, an idle-body
//!    timeout, and the governor slot held until the body ends.

pub mod body;
pub mod headers;
pub mod path;
pub mod public;
pub mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Uri, Version, header};
use axum::response::Response;
use bytes::Bytes;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::access::RequestInfo;
use crate::app::AppState;
use crate::error::ProxyError;
use crate::rewrite::Rewriter;
use body::{ProxyBody, RequestBody};

/// Response headers that carry absolute org URLs.
static LINK_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("odata-entityid"),
    header::LOCATION,
    header::CONTENT_LOCATION,
];

/// Answers with links up to this size are read whole and rewritten at once;
/// larger ones stream.
const SMALL_ANSWER: usize = 64 * 1024;

/// Forwards one request to the org and streams the answer back; tells the
/// access log what happened, whatever the outcome.
pub async fn forward(
    state: &AppState,
    peer: SocketAddr,
    req: Request,
    info: &mut RequestInfo,
) -> Result<Response<ProxyBody>, ProxyError> {
    forward_inner(state, peer.ip(), req, info).await
}

async fn forward_inner(
    state: &AppState,
    peer: IpAddr,
    req: Request,
    info: &mut RequestInfo,
) -> Result<Response<ProxyBody>, ProxyError> {
    let arrived = Instant::now();
    let (parts, body) = req.into_parts();
    path::check_target(&parts.method, &parts.uri, &parts.headers, &state.limits)?;
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        && len > state.limits.max_body
    {
        return Err(ProxyError::BodyTooLarge(state.limits.max_body));
    }
    // The body arrives limited to `limits.max_body` and failing with 408
    // when the caller stalls ([`body::Inbound`]).
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok());
    let routed = state.route(parts.uri.path(), host)?;
    let org = routed.org.clone();
    info.org = Some(org.clone());
    info.org_index = Some(routed.index);
    let prefix_len = routed.prefix_len;
    let api_path = &parts.uri.path()[prefix_len..];
    crate::guard::check(api_path)?;
    // Who is calling, and may they do this?
    let caller = state
        .access
        .admit(peer, &parts.headers, &org.name, &state.quotas)?;
    info.caller = caller.map(|c| c.name.clone());
    let caller_read_only = caller.is_some_and(|c| c.read_only);
    // Where callers are configured, privileged headers need the caller's grant too.
    let caller_privileged = (!state.access.callers.is_empty())
        .then(|| caller.map_or(&[][..], |c| c.privileged.as_slice()));
    let resource = crate::policy::resource(api_path).unwrap_or_default();
    org.policy
        .check(&parts.method, &resource, caller_read_only)?;
    let restored = org
        .policy
        .restored_headers(&parts.headers, caller_privileged);

    let mut public = state.public.derive(&parts.headers, peer);
    if prefix_len > 0 {
        // Links keep the form the caller used: /{org}/api/data/…
        public = public.with_segment(&org.name);
    }
    let links = org.links(public);
    let is_batch = resource == "$batch" && parts.method == Method::POST;
    let batch_origins = is_batch.then(|| {
        let mut origins: Vec<String> = org.aliases.iter().map(|a| a.to_ascii_lowercase()).collect();
        origins.push(public.to_string().to_ascii_lowercase());
        origins
    });

    // Path and query bytes are kept exactly as received; only the origin
    // (and the org prefix) change.
    let uri = upstream_uri(&org.origin_uri, &parts.uri, prefix_len)?;
    let mut headers = parts.headers;
    // The org's `Host`, set here once rather than formatted by the client.
    headers::to_upstream(&mut headers, org.host_header.clone());
    for (name, value) in restored {
        headers.insert(name, value);
    }
    if !path::is_file_download(parts.uri.path()) {
        headers.remove(header::ACCEPT_ENCODING);
    }
    // A batch is read strictly and checked operation by operation, and its
    // parts lose the headers the request itself would lose: no way around
    // the policy.
    let body = match batch_origins {
        Some(origins) => {
            let ctx = crate::policy::BatchContext {
                service_root: service_root(api_path),
                origins: &origins,
                caller_read_only,
                caller_privileged,
            };
            let bytes = read_batch(body, &headers, &org.policy, &ctx).await?;
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            headers.remove(header::TRANSFER_ENCODING);
            axum::body::Body::from(bytes)
        }
        None => body,
    };
    let mut body = RequestBody::prepare(
        &mut headers,
        body,
        links.to_org.as_ref(),
        state.upstream.replay_buffer,
    )
    .await?;
    let method = parts.method;

    let governor = &org.governor;
    let mut permit = governor.acquire().await?;
    let mut attempt = 0u32;
    let mut refreshed = false;
    let resp = loop {
        let token = org.token.get().await?;
        let mut req = Request::new(body.take());
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri.clone();
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers.clone();
        req.headers_mut()
            .insert(header::AUTHORIZATION, token.header());
        let sent = Instant::now();
        let resp = send(state, req).await?;
        let waited = sent.elapsed();
        info.upstream = Some(waited);
        state
            .metrics
            .upstream_fast(info.org_index.unwrap_or(0), &org.name, waited);
        match resp.status() {
            StatusCode::UNAUTHORIZED if !refreshed => {
                // Revoked or rotated: drop this token (not a newer one),
                // fetch once, and replay once if the body allows. Never loops.
                refreshed = true;
                org.token.invalidate(&token).await;
                if !body.replayable() {
                    break resp;
                }
                drop(resp);
                continue;
            }
            StatusCode::TOO_MANY_REQUESTS => {}
            _ => break resp,
        }
        // Dataverse throttled the shared application user: everyone waits.
        let wait = crate::governor::retry_after(resp.headers())
            .unwrap_or(Duration::from_secs(1 << attempt.min(6)));
        governor.throttled(wait);
        let limits = governor.config();
        if !body.replayable()
            || attempt >= limits.max_retries
            || arrived.elapsed() + wait > limits.retry_deadline
        {
            break resp;
        }
        attempt += 1;
        governor.retried();
        drop(resp);
        drop(permit);
        permit = governor.acquire().await?;
    };

    let (mut parts, body) = resp.into_parts();
    org.ratelimit.record(&parts.headers);
    info.dataverse_request_id = parts
        .headers
        .get(headers::names::X_MS_SERVICE_REQUEST_ID)
        .or_else(|| parts.headers.get(headers::names::REQ_ID))
        .cloned();
    headers::to_caller(&mut parts.headers);
    if let Some(hint) = parts
        .headers
        .get(headers::names::X_MS_DOP_HINT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        governor.dop_hint(hint);
    }
    let rewriter = links.to_caller.as_ref();
    if let Some(r) = rewriter {
        rewrite_link_headers(&mut parts.headers, r);
    }
    let has_body = method != Method::HEAD
        && !matches!(
            parts.status,
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
        );
    let rewrite_body = rewriter
        .filter(|_| has_body && body::is_rewritable(&parts.headers) && is_identity(&parts.headers))
        .cloned();
    let Some(rewriter) = rewrite_body else {
        let body = ProxyBody::upstream(body, state.upstream.idle_timeout, None, permit);
        return Ok(Response::from_parts(parts, body));
    };
    let length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if length.is_some_and(|n| n <= SMALL_ANSWER) {
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
    let body = ProxyBody::upstream(body, state.upstream.idle_timeout, Some(rewriter), permit);
    Ok(Response::from_parts(parts, body))
}

async fn send(state: &AppState, req: Request) -> Result<Response<Incoming>, ProxyError> {
    let timeout = state.upstream.response_timeout;
    tokio::time::timeout(timeout, state.client.request(req))
        .await
        .map_err(|_| ProxyError::UpstreamTimeout(timeout))?
        // A caller's body that stalls, grows too large or breaks its
        // framing surfaces here too: that is the caller's fault, not
        // Dataverse's (the upstream request was aborted with it).
        .map_err(|e| body::caller_body_fault(&e).unwrap_or(ProxyError::UpstreamUnavailable(e)))
}

/// Reads a `$batch` body whole (up to the policy's `batch_buffer`) and
/// checks it; the bytes to send (with the guarded part headers cut).
async fn read_batch(
    body: axum::body::Body,
    headers: &axum::http::HeaderMap,
    policy: &crate::config::Policy,
    ctx: &crate::policy::BatchContext<'_>,
) -> Result<Bytes, ProxyError> {
    let limit = policy.batch_buffer;
    let bytes = http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit))
        .await
        .map_err(|e| body::caller_body_fault(&*e).unwrap_or(ProxyError::BodyTooLarge(limit)))?
        .to_bytes();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    Ok(match policy.check_batch(content_type, &bytes, ctx)? {
        Some(cut) => Bytes::from(cut),
        None => bytes,
    })
}

/// `/api/data/v9.2` of `/api/data/v9.2/$batch`.
fn service_root(api_path: &str) -> &str {
    let version_end = api_path
        .get("/api/data/".len()..)
        .and_then(|rest| rest.find('/'))
        .map_or(api_path.len(), |i| i + "/api/data/".len());
    &api_path[..version_end]
}

/// The org's scheme and authority with the caller's path and query, whose
/// bytes are kept exactly as received (only the org prefix is cut).
fn upstream_uri(
    origin: &http::uri::Parts,
    target: &Uri,
    prefix_len: usize,
) -> Result<Uri, ProxyError> {
    let invalid = || ProxyError::BadRequest("the request target is not a valid URI");
    let pq = target.path_and_query().ok_or_else(invalid)?;
    let pq = if prefix_len == 0 {
        pq.clone()
    } else {
        http::uri::PathAndQuery::try_from(&pq.as_str()[prefix_len..]).map_err(|_| invalid())?
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = origin.scheme.clone();
    parts.authority = origin.authority.clone();
    parts.path_and_query = Some(pq);
    Uri::from_parts(parts).map_err(|_| invalid())
}

/// True when the body is not compressed (rewriting compressed bytes would
/// corrupt them, so such bodies pass through as they are).
fn is_identity(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim().eq_ignore_ascii_case("identity"))
}

fn rewrite_link_headers(headers: &mut axum::http::HeaderMap, rewriter: &Rewriter) {
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
