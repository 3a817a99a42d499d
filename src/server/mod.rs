//! The proxy's accept loop: HTTP/1.1 and HTTP/2 (h2c with prior knowledge,
//! h2 by ALPN over TLS), optional TLS ([`tls`]), connection limits, and the
//! graceful drain. It drives a tower service (the axum router and its
//! layers, `src/http/`), giving each request its peer's address as axum's
//! `ConnectInfo` and, over mTLS, the client certificate's names.
//!
//! `axum::serve` hides hyper's connection settings, and a proxy at the edge
//! needs them: the header buffer size and header count (431 when exceeded),
//! HTTP/2's header-list size, streams per connection and keep-alive pings.
//! No connection holds a place it does not use: the table ([`table`]) caps
//! open connections (per source address too) and closes the oldest idle
//! keep-alive connection to make room; each connection's watchdog
//! ([`watch`]) closes it when its first request head (protocol sniff and
//! TLS handshake included) does not arrive within `header_read_timeout`
//! from accept, when it idles for `idle_timeout`, and when its caller stops
//! taking an answer for `body_idle_timeout`.
//!
//! Shutdown ([`Drain`]) has two steps. When it begins, the listener keeps
//! accepting and serving (an ingress has not yet seen the readiness probe
//! fail), but every HTTP/1.1 answer says `Connection: close` and HTTP/2
//! connections get GOAWAY, so keep-alive clients reconnect elsewhere after
//! the answer they are waiting for; an idle connection is never cut while a
//! request may be on its way. When the listener closes, the connections
//! still open close after their answer in progress (idle ones at once);
//! open requests get the grace period, then the rest are dropped. An abort
//! (a second signal) drops them at once.

pub mod table;
pub mod tls;
pub mod watch;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::ConnectInfo;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::callers::PeerCertificate;
use crate::config::LimitsConfig;

pub use tls::ListenerTlsState;

use table::{Refused, Table};
use watch::{Activity, Timeouts, WatchedBody, WatchedIo};

/// What the accept loop drives: a cloneable tower service of hyper's
/// requests that never fails (errors are answers).
pub trait Service:
    tower::Service<
        Request<Incoming>,
        Response = Response<Self::Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
    /// The answers' body.
    type Body: AnswerBody;
}

impl<S, B: AnswerBody> Service for S
where
    S: tower::Service<
            Request<Incoming>,
            Response = Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static,
{
    type Body = B;
}

/// The body of an answer the accept loop can send.
pub trait AnswerBody:
    http_body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + 'static
{
}

impl<B> AnswerBody for B where
    B: http_body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static
{
}

/// Counters of the accept loop, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Connections open now.
    pub open: AtomicUsize,
    /// Connections closed by the watchdog, in [`Closed::ALL`]'s order.
    pub closed: [AtomicU64; 5],
    /// New connections refused: the table full of busy connections.
    pub refused_full: AtomicU64,
    /// New connections refused: `max_connections_per_ip` reached.
    pub refused_per_ip: AtomicU64,
}

/// How the accept loop shuts down (see the module's text).
pub struct Drain<F> {
    /// Cancelled when the drain begins: HTTP/1.1 answers say
    /// `Connection: close`, HTTP/2 connections get GOAWAY.
    pub begun: CancellationToken,
    /// Resolves when the listener closes (`shutdown.delay` after it began).
    pub stop_accepting: F,
    /// How long open requests have once the listener closed.
    pub grace: Duration,
    /// Cancelled to end the drain at once (a second SIGTERM or SIGINT).
    pub abort: CancellationToken,
}

/// Serves `service` on `listener` (over TLS when `tls` is given) until the
/// drain closes the listener, then lets open requests finish for at most
/// its grace.
pub async fn run<S: Service>(
    listener: TcpListener,
    tls: Option<Arc<ListenerTlsState>>,
    service: S,
    limits: &LimitsConfig,
    stats: Arc<ConnectionStats>,
    drain: Drain<impl Future<Output = ()>>,
) {
    let closing = CancellationToken::new();
    // A first request has half the header-read time, at most a second,
    // before its connection may be closed to make room.
    let first_request = (limits.header_read_timeout / 2).min(Duration::from_secs(1));
    let table = Table::new(
        limits.max_connections,
        Some(limits.max_connections_per_ip),
        first_request,
    );
    let builder = Arc::new(builder(limits));
    let timeouts = Timeouts {
        header_read: limits.header_read_timeout,
        idle: limits.idle_timeout,
        write_stall: limits.body_idle_timeout,
    };
    let mut tasks = tokio::task::JoinSet::new();
    let stop = drain.stop_accepting;
    tokio::pin!(stop);
    loop {
        // Reap finished connection tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
        let (tcp, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let activity = Activity::new();
        let place = match table.admit(peer.ip(), &activity).await {
            Ok(place) => place,
            Err(refused) => {
                refuse(refused, limits, &stats, peer);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            builder: builder.clone(),
            drain_begun: drain.begun.clone(),
            closing: closing.clone(),
            service: service.clone(),
            peer,
            activity: activity.clone(),
        };
        let tls = tls.as_ref().map(|t| t.acceptor());
        stats.open.fetch_add(1, Ordering::Relaxed);
        let open = OpenConnection {
            stats: stats.clone(),
            activity: activity.clone(),
            _place: place,
        };
        let serving = tasks.spawn(async move {
            let _open = open;
            connection.serving(tls, tcp).await;
        });
        tokio::spawn(watchdog(activity, timeouts, serving, stats.clone(), peer));
    }
    drop(listener);
    closing.cancel();
    let finished = async { while tasks.join_next().await.is_some() {} };
    tokio::select! {
        () = finished => return,
        () = tokio::time::sleep(drain.grace) => {
            tracing::warn!(connections = tasks.len(), "grace period over: aborting the requests still in flight");
        }
        () = drain.abort.cancelled() => {
            tracing::warn!(connections = tasks.len(), "second signal: aborting the requests still in flight");
        }
    }
    tasks.abort_all();
}

/// A connection's place in the table and in the open count, given up when
/// its task ends (or is aborted).
struct OpenConnection {
    stats: Arc<ConnectionStats>,
    activity: Arc<Activity>,
    _place: table::Place,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
        self.activity.end();
    }
}

/// The connection's watchdog ([`watch`]): aborts its task when it must
/// close, and stops when the task ends. A task of its own, so that the
/// connection's many wakes per request do not poll its timer.
async fn watchdog(
    activity: Arc<Activity>,
    timeouts: Timeouts,
    serving: tokio::task::AbortHandle,
    stats: Arc<ConnectionStats>,
    peer: SocketAddr,
) {
    tokio::select! {
        biased;
        () = activity.ended() => {}
        closed = watch::watch(&activity, timeouts) => {
            tracing::debug!(%peer, reason = closed.label(), "closing the connection");
            stats.closed[closed as usize].fetch_add(1, Ordering::Relaxed);
            serving.abort();
        }
    }
}

/// A new connection without a place: closed at once, counted and logged.
fn refuse(refused: Refused, limits: &LimitsConfig, stats: &ConnectionStats, peer: SocketAddr) {
    match refused {
        Refused::Full => {
            stats.refused_full.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                max = limits.max_connections,
                "connection limit reached and no idle connection to close; closing a new connection"
            );
        }
        Refused::PerIp => {
            stats.refused_per_ip.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "connections per address reached; closing a new connection");
        }
    }
}

/// HTTP/1.1 and HTTP/2 (chosen by the connection preface) with the limits.
/// hyper's own HTTP/1 header-read timer is off: it starts whenever a
/// connection is idle, so it would close keep-alive connections after the
/// header-read timeout; the watchdog ([`watch`]) times heads instead.
fn builder(limits: &LimitsConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        // Room above the limit, so the edge check answers with its code
        // (431 `headers_too_large`); hyper's own 431 is the backstop.
        .max_buf_size(limits.max_header_bytes.saturating_mul(2).max(8192))
        .max_headers(limits.max_headers)
        .header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Dead peers (a laptop that went to sleep) are found by pings.
        .keep_alive_interval(H2_PING)
        .keep_alive_timeout(H2_PING);
    builder
}

/// How often an HTTP/2 connection with no traffic is pinged, and how long
/// the answer may take.
const H2_PING: Duration = Duration::from_secs(20);

/// One accepted connection and what serving it needs.
struct Connection<S> {
    builder: Arc<auto::Builder<TokioExecutor>>,
    /// The drain began: answers close HTTP/1.1 connections, HTTP/2 ones get GOAWAY.
    drain_begun: CancellationToken,
    /// The listener closed: the connection closes after its answer in progress.
    closing: CancellationToken,
    service: S,
    peer: SocketAddr,
    activity: Arc<Activity>,
}

impl<S: Service> Connection<S> {
    /// The connection served, over TLS when `tls` is given. Boxed: its
    /// state (hyper's HTTP/1 and HTTP/2 machines, TLS) is tens of KB, and
    /// the task would otherwise copy it whole on every move into the
    /// runtime.
    fn serving(
        self,
        tls: Option<tokio_rustls::TlsAcceptor>,
        tcp: TcpStream,
    ) -> Pin<Box<impl Future<Output = ()> + Send>> {
        Box::pin(async move {
            match tls {
                None => self.serve(tcp, None).await,
                Some(acceptor) => self.serve_tls(acceptor, tcp).await,
            }
        })
    }

    /// The TLS handshake (the watchdog bounds it with the first request
    /// head), then the requests.
    async fn serve_tls(self, acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream) {
        let io = WatchedIo::new(tcp, self.activity.clone());
        match acceptor.accept(io).await {
            Ok(stream) => {
                let certificate = tls::peer_certificate(stream.get_ref().1);
                self.serve_io(stream, certificate).await;
            }
            Err(e) => tracing::debug!(error = %e, peer = %self.peer, "TLS handshake failed"),
        }
    }

    async fn serve(self, tcp: TcpStream, certificate: Option<PeerCertificate>) {
        let io = WatchedIo::new(tcp, self.activity.clone());
        self.serve_io(io, certificate).await;
    }

    async fn serve_io<I>(self, io: I, certificate: Option<PeerCertificate>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Self {
            builder,
            drain_begun,
            closing,
            service,
            peer,
            activity,
        } = self;
        let draining = drain_begun.clone();
        let speaks = activity.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let open = activity.request(req.version() == http::Version::HTTP_2);
            let h1 = req.version() < http::Version::HTTP_2;
            let mut req = as_origin_form(req);
            req.extensions_mut().insert(ConnectInfo(peer));
            if let Some(c) = &certificate {
                req.extensions_mut().insert(c.clone());
            }
            let answer = service.clone().oneshot(req);
            let draining = draining.clone();
            async move {
                let mut resp = answer.await?;
                if h1 && draining.is_cancelled() {
                    // The client's next request goes to another replica.
                    resp.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(resp.map(|body| WatchedBody::new(body, open)))
            }
        });
        let conn = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let (mut told, mut closed) = (false, false);
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                // HTTP/2: GOAWAY as soon as the drain begins; HTTP/1.1 says
                // `Connection: close` on its next answer instead.
                () = drain_begun.cancelled(), if !told => {
                    told = true;
                    if speaks.is_h2() {
                        conn.as_mut().graceful_shutdown();
                    }
                }
                () = closing.cancelled(), if !closed => {
                    closed = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Marks an HTTP/2 request whose `host` names another authority than its
/// `:authority`: malformed (RFC 9113 §8.3.1), refused at the edge.
#[derive(Debug, Clone, Copy)]
pub struct ConflictingHost;

/// An HTTP/2 request as an HTTP/1.1 one looks: `Host` from `:authority`
/// and an origin-form target, so the edge checks, routing and the public
/// URL treat both versions alike. HTTP/1.1 requests are left as they are
/// (their absolute-form targets are refused at the edge).
fn as_origin_form(mut req: Request<Incoming>) -> Request<Incoming> {
    if req.version() != http::Version::HTTP_2 {
        return req;
    }
    if let Some(authority) = req.uri().authority().cloned() {
        match req.headers().get(http::header::HOST) {
            Some(host)
                if !host
                    .as_bytes()
                    .eq_ignore_ascii_case(authority.as_str().as_bytes()) =>
            {
                req.extensions_mut().insert(ConflictingHost);
            }
            Some(_) => {}
            None => {
                if let Ok(host) = http::HeaderValue::from_str(authority.as_str()) {
                    req.headers_mut().insert(http::header::HOST, host);
                }
            }
        }
    }
    let origin_form = req.uri().path_and_query().cloned().map(http::Uri::from);
    if let Some(uri) = origin_form {
        *req.uri_mut() = uri;
    }
    req
}
