//! The forwarding handler: everything between the caller and Dataverse, as
//! four steps, in order:
//!
//! 1. [`admit()`](admit::admit): which org (`/{org}/api/…`, `Host`, or the
//!    default org), the path guard, who is calling, and the org's policy;
//! 2. [`plan()`](plan::plan): the upstream URI and headers (header policy,
//!    `Accept-Encoding` dropped but for file downloads, so bodies whose links
//!    are rewritten arrive uncompressed) and the body: a `$batch` read and
//!    checked, a small body buffered (replayable, links rewritten to the org,
//!    exact `Content-Length`), anything else streamed;
//! 3. [`send()`](send::send): a governor slot, a token (503 without one:
//!    nothing is ever forwarded unauthenticated), the request with a
//!    response-header timeout; a 401 drops that token and replays once, a
//!    429 closes the org's gate for everyone and replays after the wait,
//!    when the body allows;
//! 4. [`answer()`](answer::answer): Dataverse's headers filtered, org links
//!    in link headers and in JSON and `$batch` bodies rewritten to the
//!    proxy's public URL, the governor slot held until the body ends.

mod admit;
mod answer;
mod plan;
mod send;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::Response;
use tokio::time::Instant;

use super::REQUEST_ID;
use super::access_log::RequestInfo;
use super::body::{Inbound, ProxyBody};
use super::state::AppState;
use crate::error::ProxyError;

/// The handler of both Web API routes: forwards the request and answers
/// with Dataverse's answer or the proxy's error (naming the request id).
pub async fn handle(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let request_id = req.headers().get(REQUEST_ID).cloned();
    let mut info = RequestInfo::default();
    let mut resp = match forward(&state, peer, req, &mut info).await {
        Ok(resp) => resp.map(Body::new),
        Err(e) => e.to_response(request_id.as_ref()),
    };
    resp.extensions_mut().insert(info);
    resp
}

/// The four steps; `info` learns what the access log needs on the way.
async fn forward(
    state: &AppState,
    peer: SocketAddr,
    req: Request,
    info: &mut RequestInfo,
) -> Result<Response<ProxyBody>, ProxyError> {
    let arrived = Instant::now();
    let (parts, body) = req.into_parts();
    let body = Body::new(Inbound::new(body, state.limits.max_body));
    let admitted = admit::admit(state, peer.ip(), &parts, info).await?;
    let planned = plan::plan(state, &admitted, parts, body).await?;
    let sent = send::send(state, &admitted.org, planned, arrived, info).await?;
    answer::answer(state, &admitted, sent, info).await
}
