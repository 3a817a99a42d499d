//! Step 2: the upstream request: URI, headers and body.

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, Uri, header};
use bytes::Bytes;

use super::admit::Admitted;
use crate::app::AppState;
use crate::config::Policy;
use crate::error::ProxyError;
use crate::http::body::{RequestBody, caller_body_fault};
use crate::http::headers;
use crate::policy::BatchContext;
use crate::usage::count;

/// What goes to Dataverse (the bearer is added per attempt).
pub struct Planned {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: RequestBody,
    /// The Power Platform requests it is (`usage::count`).
    pub requests: u32,
}

/// Builds the upstream request from the caller's.
pub async fn plan(
    state: &AppState,
    admitted: &Admitted,
    parts: Parts,
    body: Body,
) -> Result<Planned, ProxyError> {
    let org = &admitted.org;
    // Path and query bytes are kept exactly as received; only the origin
    // (and the org prefix) change.
    let uri = upstream_uri(&org.origin_uri, &parts.uri, admitted.prefix_len)?;
    let mut headers = parts.headers;
    headers::to_upstream(&mut headers, org.host_header.clone());
    for (name, value) in admitted.restored.iter().cloned() {
        headers.insert(name, value);
    }
    upstream_accept_encoding(&mut headers, state.upstream.compression, parts.uri.path());
    let rest = &parts.uri.path()[admitted.prefix_len..];
    let api_path = rest[service_root(rest).len()..].trim_start_matches('/');
    let mut requests = count::of_path(api_path);
    let body = match &admitted.batch_origins {
        Some(origins) => {
            let tables = match admitted.policy().lists_tables() {
                true => Some(super::tables::of(org, state.upstream.response_timeout).await?),
                false => None,
            };
            let ctx = BatchContext {
                service_root: service_root(&parts.uri.path()[admitted.prefix_len..]),
                origins,
                caller_read_only: admitted.caller_read_only,
                caller_privileged: admitted.caller_privileged.as_deref(),
                tables: tables.as_deref(),
            };
            let bytes = read_batch(body, &headers, admitted.policy(), &ctx).await?;
            requests = count::batch_operations(&bytes).max(1);
            whole(&mut headers, bytes)
        }
        None if writes_body(admitted, &parts.method, &headers) => {
            let bytes = read_checked_body(state, admitted, body, rest).await?;
            if count::is_bulk(api_path) {
                requests = count::bulk_targets(&bytes).unwrap_or(1).max(1);
            }
            whole(&mut headers, bytes)
        }
        None if parts.method == Method::POST && count::is_bulk(api_path) => {
            let bytes = read_whole(body, admitted.policy().batch_buffer).await?;
            requests = count::bulk_targets(&bytes).unwrap_or(1).max(1);
            whole(&mut headers, bytes)
        }
        None => body,
    };
    let to_org = admitted.links.to_org.as_ref();
    let body =
        RequestBody::prepare(&mut headers, body, to_org, state.upstream.replay_buffer).await?;
    Ok(Planned {
        method: parts.method,
        uri,
        headers,
        body,
        requests,
    })
}

/// What Dataverse is told it may compress with. With `compression` on:
/// every coding the proxy decodes, since the answer step fits the body to
/// the caller (`compression`); a `Range` request keeps the caller's own, as
/// a range of coded bytes cannot be decoded and passes through as it is.
/// Off: identity, except for file downloads (never rewritten), which keep
/// the caller's.
fn upstream_accept_encoding(headers: &mut HeaderMap, compression: bool, path: &str) {
    if headers.contains_key(header::RANGE) {
        return;
    }
    if compression {
        headers.insert(header::ACCEPT_ENCODING, crate::compression::UPSTREAM_ACCEPT);
    } else if !is_file_download(path) {
        headers.remove(header::ACCEPT_ENCODING);
    }
}

/// True for file and image downloads (`…/$value`), whose binary bodies are
/// never rewritten and may come compressed.
pub fn is_file_download(path: &str) -> bool {
    path.ends_with("/$value")
}

/// Whether the request's JSON body must be read for the table policy: a
/// write while the policy lists tables.
fn writes_body(admitted: &Admitted, method: &Method, headers: &HeaderMap) -> bool {
    matches!(*method, Method::POST | Method::PATCH | Method::PUT)
        && admitted.policy().lists_tables()
        && headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.to_ascii_lowercase().contains("json"))
}

/// Reads a write's JSON body whole (up to the policy's `batch_buffer`) and
/// checks every table it reaches: `@odata.bind` and `@odata.id` targets,
/// deep inserts, typed records. A body that is not JSON cannot be checked.
async fn read_checked_body(
    state: &AppState,
    admitted: &Admitted,
    body: Body,
    api_path: &str,
) -> Result<Bytes, ProxyError> {
    let policy = admitted.policy();
    let bytes = read_whole(body, policy.batch_buffer).await?;
    let map = super::tables::of(&admitted.org, state.upstream.response_timeout).await?;
    let rest = api_path[service_root(api_path).len()..].trim_start_matches('/');
    let rest = percent_encoding::percent_decode_str(rest).decode_utf8_lossy();
    let table = crate::policy::reach::table_written(&map, &rest);
    let reached = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(json) => crate::policy::reach::of_body(&map, table.as_deref(), &json),
        Err(_) => Err(crate::policy::reach::Unreadable(
            "the body is not JSON".to_owned(),
        )),
    };
    policy.check_reached(reached)?;
    Ok(bytes)
}

/// Reads a body whole, up to `limit` (the policy's `batch_buffer`): a
/// `$batch`, a write whose tables are checked, a bulk message whose
/// `Targets` are counted.
async fn read_whole(body: Body, limit: usize) -> Result<Bytes, ProxyError> {
    Ok(
        http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit))
            .await
            .map_err(|e| caller_body_fault(&*e).unwrap_or(ProxyError::BodyTooLarge(limit)))?
            .to_bytes(),
    )
}

/// A body read whole, sent with its exact length.
fn whole(headers: &mut HeaderMap, bytes: Bytes) -> Body {
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    headers.remove(header::TRANSFER_ENCODING);
    Body::from(bytes)
}

/// Reads a `$batch` body whole (up to the policy's `batch_buffer`) and
/// checks it: its operations against the policy, its part headers cut. A
/// batch is read strictly, so it is no way around the policy.
async fn read_batch(
    body: Body,
    headers: &HeaderMap,
    policy: &Policy,
    ctx: &BatchContext<'_>,
) -> Result<Bytes, ProxyError> {
    let bytes = read_whole(body, policy.batch_buffer).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    Ok(match policy.check_batch(content_type, &bytes, ctx)? {
        Some(cut) => Bytes::from(cut),
        None => bytes,
    })
}

/// `/api/data/v9.2` of `/api/data/v9.2/$batch`.
pub fn service_root(api_path: &str) -> &str {
    let version_end = api_path
        .get("/api/data/".len()..)
        .and_then(|rest| rest.find('/'))
        .map_or(api_path.len(), |i| i + "/api/data/".len());
    &api_path[..version_end]
}

/// The org's scheme and authority with the caller's path and query, whose
/// bytes are kept exactly as received (only the org prefix is cut).
pub fn upstream_uri(
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
