//! The forwarding handler: everything between the caller and Dataverse, as
//! four steps, in order:
//!
//! 1. [`admit()`](admit::admit): which org (`/{org}/api/…`, `Host`, or the
//!    default org), the path guard, who is calling, and the org's policy;
//! 2. [`plan()`](plan::plan): the upstream URI and headers (header policy,
//!    `Accept-Encoding: gzip, br, deflate` towards Dataverse) and the body: a
//!    `$batch` read and checked, a small body buffered (replayable, links
//!    rewritten to the org, exact `Content-Length`), anything else streamed;
//! 3. [`send()`](send::send): a governor slot, a token (503 without one:
//!    nothing is ever forwarded unauthenticated), the request with a
//!    response-header timeout; a 401 drops that token and replays once, a
//!    429 closes the org's gate for everyone and replays after the wait,
//!    when the body allows. Metadata GETs go through
//!    [`cached::serve()`](cached::serve) instead: the org's metadata cache,
//!    revalidated with Dataverse when stale;
//! 4. [`answer()`](answer::answer): Dataverse's headers filtered, org links
//!    in link headers and in JSON and `$batch` bodies rewritten to the
//!    proxy's public URL (decoded first when compressed, encoded again
//!    as the caller accepts), the governor slot held until the body ends.
//!
//! The steps share one [`Call`]. A GET too long for Dataverse's request
//! line goes inside a one-part `$batch` ([`long_get::as_batch`]); as whom
//! a request is sent (a lane, or a delegated user) is [`sent_as`].

mod admit;
mod answer;
mod cached;
mod call;
mod head;
mod long_get;
mod plan;
mod send;
mod sent_as;
mod tables;

pub use call::Call;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::Response;
use tokio::time::Instant;

use super::REQUEST_ID;
use super::access_log::RequestInfo;
use super::body::Inbound;
use crate::app::AppState;
use crate::compression::AcceptEncoding;
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
    let arrived = Instant::now();
    let mut resp = match steps(&state, peer, req, arrived, &mut info).await {
        Ok(resp) => resp,
        Err(e) => e.to_response(request_id.as_ref()),
    };
    if let Some(org) = &info.org {
        let upstream = info.upstream.unwrap_or_default();
        org.metrics
            .gateway(arrived.elapsed().saturating_sub(upstream));
    }
    resp.extensions_mut().insert(info);
    resp
}

/// The four steps.
async fn steps(
    state: &AppState,
    peer: SocketAddr,
    req: Request,
    arrived: Instant,
    info: &mut RequestInfo,
) -> Result<Response, ProxyError> {
    let (parts, body) = req.into_parts();
    let accept = AcceptEncoding::from_headers(&parts.headers);
    let body = Body::new(Inbound::new(body, state.limits.load().max_body));
    let call = &mut Call {
        state,
        arrived,
        accept: &accept,
        info,
    };
    let admitted = admit::admit(call, peer.ip(), &parts).await?;
    let planned = plan::plan(state, &admitted, parts, body).await?;
    call.info.requests = planned.requests;
    if let Some(len) = long_get::too_long_for_a_request_line(&admitted, &planned) {
        return Box::pin(long_get::as_batch(call, &admitted, planned, len)).await;
    }
    if let Some(cache) = cached::lookup_key(&admitted, &planned) {
        // Boxed: the metadata path's future is large (6.6 KB), and inline it
        // would make every request's future (moved into axum's box, copied
        // at each move) as large.
        return Box::pin(cached_answer(call, &admitted, cache, planned)).await;
    }
    let sent = send::send(call, &admitted, planned).await?;
    let resp = answer::answer(call, &admitted, sent).await?;
    Ok(resp.map(Body::new))
}

/// The metadata cache's path: a cached answer, or Dataverse's kept on the way.
async fn cached_answer(
    call: &mut Call<'_>,
    admitted: &admit::Admitted,
    cache: cached::CacheKey,
    planned: plan::Planned,
) -> Result<Response, ProxyError> {
    let sent = cached::serve(call, admitted, cache, planned).await?;
    Ok(match sent {
        cached::Cached::Answer(sent) => answer::answer(call, admitted, *sent).await?.map(Body::new),
        cached::Cached::Made(made) => made.map(Body::new),
    })
}
