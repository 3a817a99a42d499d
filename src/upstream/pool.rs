//! A connection pool of our own per org, over hyper's HTTP/1.1 connection.
//!
//! Why not hyper-util's pooled client: it costs every request work an org
//! with one origin does not need (docs/benchmarks.md has the count): the
//! `(scheme, authority)` key hashed with SipHash on checkout and on
//! return, a task spawned per request to give the connection back once the
//! answer's body ends, and the connector's info put into every response's
//! extensions. An org has one origin, so its pool is a stack of idle
//! connections with no key; the answer's body ([`PooledBody`]) gives its
//! connection back itself when its last byte is read.
//!
//! Kept from hyper-util: a request that a reused connection closed before
//! it was written is sent again on a new connection (it never reached
//! Dataverse); idle connections are closed after `pool_idle_timeout`, at
//! most `pool_max_idle` are kept; the most recently used is taken first,
//! so the idle ones at the bottom age out when traffic falls.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::BoxError;
use axum::body::Body;
use axum::http::{Request, Response, Uri};
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use tokio::time::Instant;
use tower::ServiceExt;

use super::Egress;

/// Why an exchange with Dataverse failed before its answer's head.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made (DNS, TCP, TLS or the egress proxy).
    #[error("connecting to Dataverse failed")]
    Connect(#[source] BoxError),
    /// The connection failed while sending or before the answer's head.
    #[error("the exchange with Dataverse failed")]
    Exchange(#[source] hyper::Error),
    /// A reused connection closed before any byte of an answer: the
    /// server had closed it idle while the request was being written.
    /// Whether the request took effect is unknown, so only an idempotent
    /// one is sent again (by the send loop, at once).
    #[error("Dataverse closed an idle connection as the request went out")]
    Stale(#[source] hyper::Error),
}

impl UpstreamError {
    /// Whether nothing was sent: no connection was made.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_))
    }

    /// Whether a reused connection was found closed ([`Self::Stale`]).
    pub fn is_stale(&self) -> bool {
        matches!(self, Self::Stale(_))
    }
}

/// One org's pool: idle connections to its origin, most recent last.
#[derive(Clone)]
pub struct Pool(Arc<Inner>);

struct Inner {
    connector: HttpsConnector<Egress>,
    /// Scheme and authority: what the connector dials.
    origin: Uri,
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
    reaper: AtomicBool,
    opened: AtomicU64,
}

struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

impl Pool {
    /// A pool towards `origin` (scheme and authority) with the limits of
    /// `[upstream]`.
    pub fn new(
        connector: HttpsConnector<Egress>,
        origin: Uri,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Self {
        Self(Arc::new(Inner {
            connector,
            origin,
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
            reaper: AtomicBool::new(false),
            opened: AtomicU64::new(0),
        }))
    }

    /// Sends `req` (its URI absolute or origin-form; it must carry `Host`)
    /// on an idle connection or a new one. A reused connection that turns
    /// out closed before the request was written gets the request again on
    /// a new connection; one found closed after it was written is
    /// [`UpstreamError::Stale`].
    pub async fn send(
        &self,
        mut req: Request<Body>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        origin_form(req.uri_mut());
        let (mut sender, reused) = match self.checkout().await {
            Some(sender) => (sender, true),
            None => (self.connect().await?, false),
        };
        match sender.try_send_request(req).await {
            Ok(response) => Ok(self.wrap(response, sender)),
            Err(mut e) => match e.take_message() {
                Some(req) if reused => {
                    let mut sender = self.connect().await?;
                    let response = sender
                        .send_request(req)
                        .await
                        .map_err(UpstreamError::Exchange)?;
                    Ok(self.wrap(response, sender))
                }
                _ if reused && e.error().is_incomplete_message() => {
                    Err(UpstreamError::Stale(e.into_error()))
                }
                _ => Err(UpstreamError::Exchange(e.into_error())),
            },
        }
    }

    /// Connections opened so far (`upstream_connections_opened_total`).
    pub fn opened(&self) -> u64 {
        self.0.opened.load(Ordering::Relaxed)
    }

    /// Idle connections held now (`upstream_connections_idle`).
    pub fn idle(&self) -> usize {
        self.0.lock().len()
    }

    /// The most recently used idle connection that is still open.
    async fn checkout(&self) -> Option<SendRequest<Body>> {
        loop {
            let idle = {
                let mut idle = self.0.lock();
                let top = idle.pop()?;
                if top.since.elapsed() >= self.0.idle_timeout {
                    // The most recent is too old: so are all below it.
                    idle.clear();
                    return None;
                }
                top
            };
            let mut sender = idle.sender;
            // Ready at once, or as soon as its connection task has seen
            // the previous answer end; an error: the server closed it.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<Body>, UpstreamError> {
        let io = self
            .0
            .connector
            .clone()
            .oneshot(self.0.origin.clone())
            .await
            .map_err(UpstreamError::Connect)?;
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        self.0.opened.fetch_add(1, Ordering::Relaxed);
        Ok(sender)
    }

    fn wrap(
        &self,
        response: Response<Incoming>,
        sender: SendRequest<Body>,
    ) -> Response<PooledBody> {
        response.map(|inner| {
            let mut body = PooledBody {
                inner,
                back: Some((self.clone(), sender)),
            };
            if body.inner.is_end_stream() {
                body.give_back();
            }
            body
        })
    }

    /// Keeps a connection whose answer has ended for the next request.
    fn put_back(&self, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        {
            let mut idle = self.0.lock();
            if idle.len() >= self.0.max_idle {
                return;
            }
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
        self.start_reaper();
    }

    /// Closes idle connections past their time even when no request
    /// comes to find them: one task per pool, ending with the pool.
    fn start_reaper(&self) {
        if self.0.reaper.swap(true, Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.0.reaper.store(false, Ordering::Relaxed);
            return;
        };
        let pool = Arc::downgrade(&self.0);
        let every = self.0.idle_timeout.max(Duration::from_millis(100));
        runtime.spawn(reap(pool, every));
    }
}

async fn reap(pool: Weak<Inner>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else { return };
        let timeout = pool.idle_timeout;
        pool.lock()
            .retain(|i| i.since.elapsed() < timeout && !i.sender.is_closed());
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Absolute URIs become `/path?query`: hyper's connection writes the URI
/// as it is, and the pool knows the origin.
fn origin_form(uri: &mut Uri) {
    if uri.scheme().is_some() || uri.authority().is_some() {
        let pq = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *uri = Uri::from(pq);
    }
}

/// Dataverse's answer body; its connection goes back to the pool when the
/// last byte is read (dropped earlier, the connection closes with it).
pub struct PooledBody {
    inner: Incoming,
    back: Option<(Pool, SendRequest<Body>)>,
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some((pool, sender)) = self.back.take() {
            pool.put_back(sender);
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").finish_non_exhaustive()
    }
}
