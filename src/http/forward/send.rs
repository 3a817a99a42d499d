//! Step 3: a governor slot, a token, and the request, with the replays
//! after a 401 (one fresh token), a 429 (after its wait; its body says
//! which limit, and the governor adapts), and a transient failure
//! (idempotent requests only, within the org's retry budget).

use std::future::Future;
use std::time::Duration;

use crate::upstream::{Pool, PooledBody};
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, Response, StatusCode, Version, header};
use http_body_util::Full;
use tokio::time::Instant;

use super::admit::Admitted;
use super::head::AnswerHead;
use super::plan::Planned;
use super::route::Route;
use crate::app::AppState;
use crate::config::GovernorConfig;
use crate::error::ProxyError;
use crate::governor::{Permit, Throttle};
use crate::http::access_log::RequestInfo;
use crate::http::body::{UpstreamBody, caller_body_fault};

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

/// Sends the planned request until [`next_step`] says answer, replaying
/// transient failures where that is safe ([`transient_wait`]). The request
/// takes one of the org's lanes ([`crate::lanes`]); a lane whose credential
/// fails, or whose gate a 429 closed, hands the request to another lane.
pub async fn send(
    state: &AppState,
    admitted: &Admitted,
    mut planned: Planned,
    arrived: Instant,
    info: &mut RequestInfo,
) -> Result<Sent<UpstreamBody>, ProxyError> {
    let org = &admitted.org;
    let queued = Instant::now();
    let (mut route, mut permit) = Route::start(admitted).await?;
    let mut waited = queued.elapsed();
    route.governor().sent();
    let mut attempts = Attempts::default();
    let idempotent = is_idempotent(&planned.method, &planned.headers);
    loop {
        let token = route.token(state, &mut permit).await?;
        let governor = route.governor().clone();
        let req = upstream_request(&mut planned, token.header());
        let sent_at = Instant::now();
        let span = attempt_span(org, &req, route.lane_name(), (&attempts, waited));
        let (returned, outcome) = attempt(state, (org, req), permit, span).await;
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
        let next = decide(&route, &response, &attempts, &planned, arrived);
        let unauthorized = response.status() == StatusCode::UNAUTHORIZED;
        if unauthorized && (!attempts.refreshed || route.exchanged_now()) {
            // Revoked or rotated: drop this token (not a newer one),
            // whether or not the request can be replayed; a user's token
            // exchanged just now is the user's refusal, remembered.
            attempts.refreshed = true;
            route.invalidate(state, &token).await;
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
                if !route.another_open() {
                    tokio::time::sleep(wait).await;
                }
                permit = route.reacquire().await?;
                waited = queued.elapsed();
            }
        }
    }
}

/// What follows an answer that is a 401 or a 429: a 429 on one lane goes
/// to another open lane at once; otherwise [`next_step`] decides.
fn decide<B>(
    route: &Route<'_>,
    response: &Response<B>,
    attempts: &Attempts,
    planned: &Planned,
    arrived: Instant,
) -> Next {
    let governor = route.governor();
    if replay_elsewhere(response, attempts, planned, governor) && route.another_open() {
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
    (org, mut req): (&crate::app::OrgState, Request<Body>),
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

/// One CLIENT span per attempt towards Dataverse, by OpenTelemetry's HTTP
/// conventions (named by its method; no `url.full`, as the query must not
/// appear), with the lane it went on, how long it waited for its slot and,
/// on a replay, `http.request.resend_count`.
fn attempt_span(
    org: &crate::app::OrgState,
    req: &Request<Body>,
    lane: &str,
    (attempts, waited): (&Attempts, Duration),
) -> tracing::Span {
    let resends = attempts.throttled + attempts.transient + u32::from(attempts.refreshed);
    let authority = org.origin_uri.authority.as_ref();
    tracing::info_span!(
        "upstream",
        otel.name = %req.method(),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        http.request.method = %req.method(),
        server.address = authority.map(http::uri::Authority::host),
        server.port = authority.and_then(http::uri::Authority::port_u16).map(i64::from),
        url.path = req.uri().path(),
        http.request.resend_count = (resends > 0).then_some(i64::from(resends)),
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        dataverse.lane = lane,
        dataverse.governor.wait_ms = waited.as_secs_f64() * 1000.0,
    )
}

/// The attempt's outcome on its span: the status, and for a failure or a
/// 4xx/5xx its type (for a CLIENT span both are errors).
fn record_attempt(span: &tracing::Span, outcome: &Result<Response<PooledBody>, ProxyError>) {
    match outcome {
        Ok(resp) => {
            span.record(
                "http.response.status_code",
                i64::from(resp.status().as_u16()),
            );
            if resp.status().is_client_error() || resp.status().is_server_error() {
                span.record("error.type", resp.status().as_str());
                span.record("otel.status_code", "ERROR");
            }
        }
        Err(e) => {
            span.record("error.type", e.code());
            span.record("otel.status_code", "ERROR");
        }
    }
}

/// Records how long Dataverse took to send its response headers.
fn upstream_time(info: &mut RequestInfo, org: &crate::app::OrgState, sent_at: Instant) {
    let waited = sent_at.elapsed();
    info.upstream = Some(info.upstream.unwrap_or_default() + waited);
    org.metrics.upstream(waited);
}

/// Whether a 429 could be replayed on another lane: the body allows it
/// and the replays are not used up (the wait does not count: another
/// lane's gate is open now).
fn replay_elsewhere<B>(
    response: &Response<B>,
    attempts: &Attempts,
    planned: &Planned,
    governor: &crate::governor::Governor,
) -> bool {
    response.status() == StatusCode::TOO_MANY_REQUESTS
        && planned.body.replayable()
        && attempts.throttled < governor.config().max_retries
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

/// Reads a 429's (small) body to learn which limit it names, tells the
/// governor, and keeps the bytes for the caller.
async fn read_throttle(
    governor: &crate::governor::Governor,
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
enum Failure<'a> {
    Error(&'a ProxyError),
    Status(StatusCode),
}

/// Whether an error means the request never reached Dataverse.
fn is_unreached(e: &ProxyError) -> bool {
    matches!(e, ProxyError::UpstreamUnavailable(inner) if inner.is_connect())
}

/// What decides a transient replay.
struct TransientCheck {
    /// Idempotent with a replayable body.
    idempotent: bool,
    attempt: u32,
    elapsed: Duration,
}

impl TransientCheck {
    /// The jittered wait before replaying `failure`, or `None`: not
    /// transient, not idempotent, past the attempts or the deadline, or the
    /// org's retry budget is used up.
    fn wait(&self, governor: &crate::governor::Governor, failure: Failure<'_>) -> Option<Duration> {
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

/// One attempt's exchange with Dataverse, with a response-header timeout.
type Exchange =
    std::pin::Pin<Box<dyn Future<Output = Result<Response<PooledBody>, ProxyError>> + Send>>;

/// An attempt in flight and the slot it holds. If the caller leaves before
/// Dataverse answers (the handler is dropped), the attempt goes on in a
/// task of its own ([`outlive`]): the slot is freed when Dataverse's answer
/// ends, not a fixed grace later.
struct InFlight {
    exchange: Option<Exchange>,
    permit: Option<Permit>,
    drain: crate::http::body::DrainBounds,
}

impl InFlight {
    fn start(
        state: &AppState,
        pool: &Pool,
        req: Request<Body>,
        permit: Permit,
        span: tracing::Span,
    ) -> Self {
        let timeout = state.upstream.response_timeout;
        let pool = pool.clone();
        let exchange = async move {
            tokio::time::timeout(timeout, pool.send(req))
                .await
                .map_err(|_| ProxyError::UpstreamTimeout(timeout))?
                // A caller's body that stalls, grows too large or breaks its
                // framing surfaces here too: that is the caller's fault, not
                // Dataverse's (the upstream request was aborted with it).
                .map_err(|e| caller_body_fault(&e).unwrap_or(ProxyError::UpstreamUnavailable(e)))
        };
        let exchange: Exchange = Box::pin(tracing::Instrument::instrument(exchange, span));
        Self {
            exchange: Some(exchange),
            permit: Some(permit),
            drain: crate::http::body::DrainBounds::of(state),
        }
    }

    /// Waits for Dataverse's answer; the permit comes back with it.
    async fn finish(mut self) -> (Permit, Result<Response<PooledBody>, ProxyError>) {
        let outcome = match self.exchange.as_mut() {
            Some(exchange) => exchange.await,
            None => Err(ProxyError::Internal),
        };
        self.exchange = None;
        let mut permit = self
            .permit
            .take()
            .expect("the permit stays until the exchange ends");
        if outcome.is_ok() {
            permit.answered();
        }
        (permit, outcome)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let (Some(exchange), Some(permit)) = (self.exchange.take(), self.permit.take())
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(outlive(exchange, permit, self.drain));
        }
    }
}

/// The rest of an exchange whose caller left: Dataverse's answer is read
/// and discarded (within the drain bounds), then the slot is free. Where
/// Dataverse may still be working (no answer within the timeout, a reset
/// after sending), the permit keeps the slot for the disconnect grace.
async fn outlive(exchange: Exchange, mut permit: Permit, drain: crate::http::body::DrainBounds) {
    match exchange.await {
        Ok(response) => {
            permit.answered();
            drain.run(response.into_body()).await;
            permit.finish();
        }
        Err(e) if is_unreached(&e) => permit.finish(),
        Err(_) => drop(permit),
    }
}
