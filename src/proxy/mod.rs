//! The forwarding handler: everything between the caller and Dataverse.
//!
//! Steps, in order: path check (only the Web API is reachable), token (503
//! without one: nothing is ever forwarded unauthenticated), header policy,
//! send with a response-header timeout, then stream the answer back with an
//! idle-body timeout. Bodies are never buffered: the caller's body is handed
//! to hyper as a stream and Dataverse's body is returned as a stream.

pub mod headers;
pub mod path;
pub mod upstream;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Uri, Version, header};
use axum::response::Response;

use crate::app::AppState;
use crate::error::ProxyError;
use upstream::IdleTimeout;

/// Forwards one request to the org and streams the answer back.
pub async fn forward(State(state): State<AppState>, req: Request) -> Result<Response, ProxyError> {
    let (mut parts, body) = req.into_parts();
    path::check(parts.uri.path())?;
    let target = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |pq| pq.as_str());

    let token = state.token.get().await?;

    // Path and query bytes are kept exactly as received; only the origin changes.
    let uri: Uri = format!("{}{}", state.org_origin, target)
        .parse()
        .map_err(|_| ProxyError::BadRequest("the request target is not a valid URI"))?;
    headers::to_upstream(&mut parts.headers);
    parts.headers.insert(header::AUTHORIZATION, token.header());
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    let upstream_req = Request::from_parts(parts, body);

    let timeout = state.upstream.response_timeout;
    let resp = tokio::time::timeout(timeout, state.client.request(upstream_req))
        .await
        .map_err(|_| ProxyError::UpstreamTimeout(timeout))?
        .map_err(ProxyError::UpstreamUnavailable)?;

    let (mut parts, body) = resp.into_parts();
    headers::to_caller(&mut parts.headers);
    let body = Body::new(IdleTimeout::new(body, state.upstream.idle_timeout));
    Ok(Response::from_parts(parts, body))
}
