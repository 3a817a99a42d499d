//! Step 3: a governor slot, a token, and the request, sent until an
//! answer is for the caller: the loop here; when to send again in
//! [`retry`]; each attempt's span in [`spans`]; an attempt whose caller
//! left in [`in_flight`].

mod in_flight;
mod retry;
mod spans;

pub use retry::{Attempts, Next, is_idempotent, next_step};

use in_flight::InFlight;
use retry::{Failure, TransientCheck, is_unreached, read_throttle, replay_elsewhere};
use spans::{attempt_span, record_attempt, upstream_time};

use std::time::Duration;

use crate::upstream::PooledBody;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode, Version, header};
use tokio::time::Instant;

use super::Call;
use super::admit::Admitted;
use super::head::AnswerHead;
use super::plan::Planned;
use super::sent_as::SentAs;
use crate::app::AppState;
use crate::error::ProxyError;
use crate::governor::Permit;
use crate::http::body::UpstreamBody;

/// Dataverse's answer, and the slot it holds until its body ends (none
/// for an answer from the metadata cache).
pub struct Sent<B = PooledBody> {
    pub response: Response<B>,
    pub permit: Option<Permit>,
    /// The answer's head, read once.
    pub head: AnswerHead,
}

impl<B> Sent<B> {
    /// An answer and its slot; its head is read here.
    pub fn new(response: Response<B>, permit: Option<Permit>) -> Self {
        let head = AnswerHead::read(response.headers());
        Self {
            response,
            permit,
            head,
        }
    }
}

/// Sends the planned request until [`next_step`] says answer, replaying
/// transient failures where that is safe ([`transient_wait`]). The request
/// takes one of the org's lanes ([`crate::lanes`]); a lane whose credential
/// fails, or whose gate a 429 closed, hands the request to another lane.
pub async fn send(
    call: &mut Call<'_>,
    admitted: &Admitted,
    mut planned: Planned,
) -> Result<Sent<UpstreamBody>, ProxyError> {
    let (state, arrived, info) = (call.state, call.arrived, &mut *call.info);
    let org = &admitted.org;
    let queued = Instant::now();
    let (mut sent_as, mut permit) = SentAs::start(admitted).await?;
    let mut waited = queued.elapsed();
    sent_as.governor().sent();
    let mut attempts = Attempts::default();
    let idempotent = is_idempotent(&planned.method, &planned.headers);
    loop {
        let token = sent_as.token(state, &mut permit).await?;
        let governor = sent_as.governor().clone();
        let req = upstream_request(&mut planned, token.header());
        let sent_at = Instant::now();
        let span = attempt_span(org, &req, sent_as.lane_name(), &attempts, waited);
        info.lane = Some(sent_as.lane_label());
        let (returned, outcome) = attempt(state, org, req, permit, span).await;
        permit = returned;
        let transient = TransientCheck {
            idempotent: idempotent && planned.body.replayable(),
            attempt: attempts.transient,
            elapsed: arrived.elapsed(),
        };
        if outcome.is_ok() {
            upstream_time(info, org, sent_at);
        }
        let Some(response) = settle(outcome, &transient, &governor, &mut permit).await? else {
            attempts.transient += 1;
            continue;
        };
        let head = AnswerHead::read(response.headers());
        if let Some(hint) = head.dop_hint {
            governor.dop_hint(hint);
        }
        let response = match response.status() {
            StatusCode::TOO_MANY_REQUESTS => {
                read_throttle(&governor, response, attempts.throttled).await?
            }
            StatusCode::UNAUTHORIZED => response.map(http_body_util::Either::Left),
            _ => {
                governor.succeeded();
                return Ok(Sent {
                    response: response.map(http_body_util::Either::Left),
                    permit: Some(permit),
                    head,
                });
            }
        };
        let next = decide(&sent_as, &response, &attempts, &planned, arrived);
        let unauthorized = response.status() == StatusCode::UNAUTHORIZED;
        if unauthorized && (!attempts.refreshed || sent_as.exchanged_now()) {
            // Revoked or rotated: drop this token (not a newer one),
            // whether or not the request can be replayed; a user's token
            // exchanged just now is the user's refusal, remembered.
            attempts.refreshed = true;
            sent_as.invalidate(state, &token).await;
        }
        match next {
            Next::Answer => {
                return Ok(Sent {
                    response,
                    permit: Some(permit),
                    head,
                });
            }
            Next::Refresh => {}
            Next::Wait(wait) => {
                attempts.throttled += 1;
                governor.retried();
                drop(response);
                // Dataverse answered: the slot is free now, not after a grace.
                permit.finish();
                // Another lane with an open gate takes the replay at once;
                // else the wait, then the gate and the queue in turn.
                let queued = Instant::now();
                if !sent_as.another_open() {
                    tokio::time::sleep(wait).await;
                }
                permit = sent_as.reacquire().await?;
                waited = queued.elapsed();
            }
        }
    }
}

/// What follows an answer that is a 401 or a 429: a 429 on one lane goes
/// to another open lane at once; otherwise [`next_step`] decides.
fn decide<B>(
    sent_as: &SentAs<'_>,
    response: &Response<B>,
    attempts: &Attempts,
    planned: &Planned,
    arrived: Instant,
) -> Next {
    let governor = sent_as.governor();
    if replay_elsewhere(response, attempts, planned, governor) && sent_as.another_open() {
        // Throttled on this lane only: another lane takes it at once.
        return Next::Wait(Duration::ZERO);
    }
    next_step(
        response.status(),
        response.headers(),
        attempts,
        planned.body.replayable(),
        arrived.elapsed(),
        &governor.config(),
    )
}

/// One attempt: the request goes out on the org's pool with the span's
/// trace context; the permit comes back with the outcome.
async fn attempt(
    state: &AppState,
    org: &crate::app::OrgState,
    mut req: Request<Body>,
    mut permit: Permit,
    span: tracing::Span,
) -> (Permit, Result<Response<PooledBody>, ProxyError>) {
    crate::telemetry::inject_context(&span, req.headers_mut());
    permit.arm();
    let exchange = InFlight::start(state, &org.pool, req, permit, span.clone());
    let (permit, outcome) = exchange.finish().await;
    record_attempt(&span, &outcome);
    (permit, outcome)
}

/// The attempt's answer, or `None` once the wait before a transient replay
/// is over, or the error for the caller.
async fn settle(
    outcome: Result<Response<PooledBody>, ProxyError>,
    transient: &TransientCheck,
    governor: &crate::governor::Governor,
    permit: &mut Permit,
) -> Result<Option<Response<PooledBody>>, ProxyError> {
    let failure = match &outcome {
        Ok(r) => Failure::Status(r.status()),
        Err(e) => Failure::Error(e),
    };
    if let Some(wait) = transient.wait(governor, failure) {
        drop(outcome);
        tokio::time::sleep(wait).await;
        return Ok(None);
    }
    match outcome {
        Ok(r) => Ok(Some(r)),
        Err(e) => {
            if is_unreached(&e) {
                // Nothing reached Dataverse: the slot is free at once.
                permit.set_finished();
            }
            Err(e)
        }
    }
}

/// One attempt's request: the planned one with the token.
fn upstream_request(
    planned: &mut Planned,
    authorization: axum::http::HeaderValue,
) -> Request<Body> {
    let mut req = Request::new(planned.body.take());
    *req.method_mut() = planned.method.clone();
    *req.uri_mut() = planned.uri.clone();
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = planned.headers.clone();
    req.headers_mut()
        .insert(header::AUTHORIZATION, authorization);
    req
}
