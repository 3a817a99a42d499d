//! An attempt in flight and the slot it holds, and what happens to both
//! when the caller leaves before Dataverse answers.

use std::future::Future;

use axum::body::Body;
use axum::http::{Request, Response};

use super::retry::is_unreached;
use crate::app::AppState;
use crate::error::ProxyError;
use crate::governor::Permit;
use crate::http::body::caller_body_fault;
use crate::upstream::{Pool, PooledBody};

/// One attempt's exchange with Dataverse, with a response-header timeout.
type Exchange =
    std::pin::Pin<Box<dyn Future<Output = Result<Response<PooledBody>, ProxyError>> + Send>>;

/// An attempt in flight and the slot it holds. If the caller leaves before
/// Dataverse answers (the handler is dropped), the attempt goes on in a
/// task of its own ([`outlive`]): the slot is freed when Dataverse's answer
/// ends, not a fixed grace later.
pub(super) struct InFlight {
    exchange: Option<Exchange>,
    permit: Option<Permit>,
    drain: crate::http::body::DrainBounds,
}

impl InFlight {
    pub(super) fn start(
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
    pub(super) async fn finish(mut self) -> (Permit, Result<Response<PooledBody>, ProxyError>) {
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
pub(super) async fn outlive(
    exchange: Exchange,
    mut permit: Permit,
    drain: crate::http::body::DrainBounds,
) {
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
