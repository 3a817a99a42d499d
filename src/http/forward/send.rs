//! Step 3: a governor slot, a token, and the request, with the replays
//! after a 401 (one fresh token) and a 429 (after the gate's wait).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, Response, StatusCode, Version, header};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::plan::Planned;
use crate::config::GovernorConfig;
use crate::error::ProxyError;
use crate::governor::Permit;
use crate::http::access_log::RequestInfo;
use crate::http::body::caller_body_fault;
use crate::http::state::{AppState, OrgState};

/// Dataverse's answer, and the slot it holds until its body ends.
pub struct Sent<B = Incoming> {
    pub response: Response<B>,
    pub permit: Permit,
}

/// What to do after an attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Answer the caller with this response.
    Answer,
    /// The token was refused: fetch a fresh one and send again.
    Refresh,
    /// Throttled: the gate is closed for this long; send again after it.
    Wait(Duration),
}

/// The attempts so far of one request.
#[derive(Debug, Default)]
pub struct Attempts {
    /// Replays after a 429.
    pub throttled: u32,
    /// A fresh token was already fetched once.
    pub refreshed: bool,
}

/// Decides what follows an answer with `status`: a 401 is retried once with
/// a new token, a 429 after its wait within the retry budget and deadline,
/// and only when the body can be sent again. Never loops.
pub fn next_step(
    status: StatusCode,
    headers: &HeaderMap,
    attempts: &Attempts,
    replayable: bool,
    elapsed: Duration,
    limits: &GovernorConfig,
) -> Next {
    match status {
        StatusCode::UNAUTHORIZED if !attempts.refreshed && replayable => Next::Refresh,
        StatusCode::TOO_MANY_REQUESTS => {
            let wait = throttle_wait(headers, attempts.throttled);
            let within =
                attempts.throttled < limits.max_retries && elapsed + wait <= limits.retry_deadline;
            if replayable && within {
                Next::Wait(wait)
            } else {
                Next::Answer
            }
        }
        _ => Next::Answer,
    }
}

/// Dataverse's `Retry-After`, else 1, 2, 4 … 64 s by attempt.
pub fn throttle_wait(headers: &HeaderMap, attempt: u32) -> Duration {
    crate::governor::retry_after(headers).unwrap_or(Duration::from_secs(1 << attempt.min(6)))
}

/// Sends the planned request until [`next_step`] says answer.
pub async fn send(
    state: &AppState,
    org: &Arc<OrgState>,
    mut planned: Planned,
    arrived: Instant,
    info: &mut RequestInfo,
) -> Result<Sent, ProxyError> {
    let governor = &org.governor;
    let mut permit = governor.acquire().await?;
    let mut attempts = Attempts::default();
    loop {
        let token = org.token.get().await?;
        let mut req = Request::new(planned.body.take());
        *req.method_mut() = planned.method.clone();
        *req.uri_mut() = planned.uri.clone();
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = planned.headers.clone();
        req.headers_mut()
            .insert(header::AUTHORIZATION, token.header());
        let sent_at = Instant::now();
        let response = request(state, req).await?;
        let waited = sent_at.elapsed();
        info.upstream = Some(waited);
        org.metrics[0].upstream(waited);
        let next = next_step(
            response.status(),
            response.headers(),
            &attempts,
            planned.body.replayable(),
            arrived.elapsed(),
            governor.config(),
        );
        match response.status() {
            StatusCode::UNAUTHORIZED if !attempts.refreshed => {
                // Revoked or rotated: drop this token (not a newer one),
                // whether or not the request can be replayed.
                attempts.refreshed = true;
                org.token.invalidate(&token).await;
            }
            StatusCode::TOO_MANY_REQUESTS => {
                // Dataverse throttled the shared application user: everyone waits.
                governor.throttled(throttle_wait(response.headers(), attempts.throttled));
            }
            _ => {}
        }
        match next {
            Next::Answer => return Ok(Sent { response, permit }),
            Next::Refresh => {}
            Next::Wait(_) => {
                attempts.throttled += 1;
                governor.retried();
                drop(response);
                drop(permit);
                // The gate holds the wait; the queue takes us back in turn.
                permit = governor.acquire().await?;
            }
        }
    }
}

/// One request with a response-header timeout.
async fn request(state: &AppState, req: Request<Body>) -> Result<Response<Incoming>, ProxyError> {
    let timeout = state.upstream.response_timeout;
    tokio::time::timeout(timeout, state.client.request(req))
        .await
        .map_err(|_| ProxyError::UpstreamTimeout(timeout))?
        // A caller's body that stalls, grows too large or breaks its
        // framing surfaces here too: that is the caller's fault, not
        // Dataverse's (the upstream request was aborted with it).
        .map_err(|e| caller_body_fault(&e).unwrap_or(ProxyError::UpstreamUnavailable(e)))
}
