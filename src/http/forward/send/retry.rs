//! When a request is sent again: after a 401 (once, with a fresh token),
//! a 429 (after its wait, within the retry budget and deadline; its body
//! says which limit) and a transient failure (idempotent requests only,
//! within the org's retry budget). Never a POST: the proxy cannot prove
//! Dataverse did not run it.

use std::time::Duration;

use axum::http::{HeaderMap, Method, Response, StatusCode, header};
use http_body_util::Full;

use super::super::plan::Planned;
use crate::config::GovernorConfig;
use crate::error::ProxyError;
use crate::governor::{Governor, Throttle};
use crate::http::body::UpstreamBody;
use crate::upstream::PooledBody;

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
    /// Replays after a transient failure.
    pub transient: u32,
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

/// Longest 429 body read to find its error code.
const THROTTLE_BODY: usize = 16 * 1024;

/// Whether a 429 could be replayed on another lane: the body allows it
/// and the replays are not used up (the wait does not count: another
/// lane's gate is open now).
pub(super) fn replay_elsewhere<B>(
    response: &Response<B>,
    attempts: &Attempts,
    planned: &Planned,
    governor: &Governor,
) -> bool {
    response.status() == StatusCode::TOO_MANY_REQUESTS
        && planned.body.replayable()
        && attempts.throttled < governor.config().max_retries
}

/// Reads a 429's (small) body to learn which limit it names, tells the
/// governor, and keeps the bytes for the caller.
pub(super) async fn read_throttle(
    governor: &Governor,
    response: Response<PooledBody>,
    attempt: u32,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let wait = throttle_wait(response.headers(), attempt);
    let (parts, body) = response.into_parts();
    let bytes = tokio::time::timeout(
        Duration::from_secs(10),
        http_body_util::BodyExt::collect(http_body_util::Limited::new(body, THROTTLE_BODY)),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .map(http_body_util::Collected::to_bytes)
    .unwrap_or_default();
    let coding = crate::compression::BodyCoding::of(&parts.headers);
    governor.throttled(
        Throttle::from_body(&readable(coding, bytes.clone()).await),
        wait,
    );
    Ok(Response::from_parts(
        parts,
        http_body_util::Either::Right(Full::new(bytes)),
    ))
}

/// A 429's body as text to read its code from: decoded when Dataverse
/// compressed it (the caller still gets the bytes as they came), up to
/// [`THROTTLE_BODY`]. What does not decode reads as an unknown limit.
async fn readable(coding: crate::compression::BodyCoding, bytes: bytes::Bytes) -> bytes::Bytes {
    let crate::compression::BodyCoding::Coded(coding) = coding else {
        return bytes;
    };
    let mut decoded = crate::compression::stream::decode(Full::new(bytes), coding);
    let mut text = bytes::BytesMut::new();
    while let Some(Ok(frame)) = http_body_util::BodyExt::frame(&mut decoded).await {
        text.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..]));
        if text.len() >= THROTTLE_BODY {
            break;
        }
    }
    text.freeze()
}

/// Whether a method may be sent twice with the same effect: GET and HEAD,
/// and PUT, PATCH and DELETE made conditional by `If-Match` naming entity
/// tags (a second attempt after the first took effect fails with 412, the
/// record's tag having changed, instead of acting twice). `If-Match: *`
/// only asks that the record exist, which it still does after an update:
/// such a write is not replayed. POST never is: the proxy cannot prove it
/// idempotent.
pub fn is_idempotent(method: &Method, headers: &HeaderMap) -> bool {
    match *method {
        Method::GET | Method::HEAD => true,
        Method::PUT | Method::PATCH | Method::DELETE => names_entity_tags(headers),
        _ => false,
    }
}

/// `If-Match` is present and every value is a specific entity tag.
fn names_entity_tags(headers: &HeaderMap) -> bool {
    let mut tags = headers
        .get_all(header::IF_MATCH)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("*").split(','))
        .map(str::trim)
        .peekable();
    tags.peek().is_some()
        && tags.all(|t| {
            let quoted = t.strip_prefix("W/").unwrap_or(t);
            quoted.len() >= 2 && quoted.starts_with('"') && quoted.ends_with('"')
        })
}

/// A failure that may be transient.
pub(super) enum Failure<'a> {
    Error(&'a ProxyError),
    Status(StatusCode),
}

/// Whether an error means the request never reached Dataverse.
pub(super) fn is_unreached(e: &ProxyError) -> bool {
    matches!(e, ProxyError::UpstreamUnavailable(inner) if inner.is_connect())
}

/// What decides a transient replay.
pub(super) struct TransientCheck {
    /// Idempotent with a replayable body.
    pub idempotent: bool,
    pub attempt: u32,
    pub elapsed: Duration,
}

impl TransientCheck {
    /// The jittered wait before replaying `failure`, or `None`: not
    /// transient, not idempotent, past the attempts or the deadline, or the
    /// org's retry budget is used up.
    pub(super) fn wait(&self, governor: &Governor, failure: Failure<'_>) -> Option<Duration> {
        let stale =
            matches!(&failure, Failure::Error(ProxyError::UpstreamUnavailable(e)) if e.is_stale());
        let transient = match failure {
            // Unreachable, or reset before any answer; a caller's own body
            // fault and a response timeout (Dataverse may still be working)
            // are not.
            Failure::Error(e) => matches!(e, ProxyError::UpstreamUnavailable(_)),
            Failure::Status(s) => matches!(
                s,
                StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            ),
        };
        let limits = governor.config();
        if !transient || !self.idempotent || self.attempt >= limits.transient_retries {
            return None;
        }
        // A pooled connection the server had closed idle: a new one is
        // made at once (the request never reached a working connection).
        let wait = if stale && self.attempt == 0 {
            Duration::ZERO
        } else {
            transient_wait(self.attempt)
        };
        (self.elapsed + wait <= limits.retry_deadline && governor.try_transient_retry())
            .then_some(wait)
    }
}

/// 100 ms, 200 ms, 400 ms … by attempt, with full jitter (half to all of it).
pub fn transient_wait(attempt: u32) -> Duration {
    let base = 100u64 << attempt.min(6);
    Duration::from_millis(base / 2 + fastrand::u64(0..=base / 2))
}
