//! The proxy's accept loop: HTTP/1.1 and HTTP/2 (h2c with prior knowledge,
//! h2 by ALPN over TLS), optional TLS ([`tls`]), connection and header
//! limits, and the graceful drain. It drives a tower service (the axum
//! router and its layers, `src/http/`), giving each request its peer's
//! address as axum's `ConnectInfo` and, over mTLS, the client
//! certificate's names.
//!
//! `axum::serve` hides hyper's connection settings, and a proxy at the edge
//! needs them: the header buffer size and header count (431 when exceeded),
//! a header-read timeout (slowloris: a client that trickles its headers is
//! disconnected; the same bound applies to a TLS handshake), HTTP/2's
//! header-list size and streams per connection, and a cap on open
//! connections (over it, new connections are closed at once). Shutdown
//! stops accepting, lets open requests finish for the grace period, then
//! drops the rest.

pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::callers::PeerCertificate;
use crate::config::LimitsConfig;

pub use tls::ListenerTlsState;

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

/// Serves `service` on `listener` (over TLS when `tls` is given) until
/// `stop` resolves, then drains open connections for at most `grace`.
pub async fn run<S: Service>(
    listener: TcpListener,
    tls: Option<Arc<ListenerTlsState>>,
    service: S,
    limits: &LimitsConfig,
    stop: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let builder = Arc::new(builder(limits));
    let handshake_timeout = limits.header_read_timeout;
    let mut tasks = tokio::task::JoinSet::new();
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
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(
                max = limits.max_connections,
                "connection limit reached; closing a new connection"
            );
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            builder: builder.clone(),
            watcher: graceful.watcher(),
            service: service.clone(),
            peer,
        };
        let tls = tls.as_ref().map(|t| t.acceptor());
        tasks.spawn(async move {
            match tls {
                None => connection.serve(tcp, None).await,
                Some(acceptor) => connection.serve_tls(acceptor, tcp, handshake_timeout).await,
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(connections = tasks.len(), "grace period over: aborting the requests still in flight");
            tasks.abort_all();
        }
    }
}

/// HTTP/1.1 and HTTP/2 (chosen by the connection preface) with the limits.
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
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// One accepted connection and what serving it needs.
struct Connection<S> {
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
    service: S,
    peer: SocketAddr,
}

impl<S: Service> Connection<S> {
    /// The TLS handshake (bounded like a request head), then the requests.
    async fn serve_tls(
        self,
        acceptor: tokio_rustls::TlsAcceptor,
        tcp: TcpStream,
        timeout: Duration,
    ) {
        match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => {
                let certificate = tls::peer_certificate(stream.get_ref().1);
                self.serve(stream, certificate).await;
            }
            Ok(Err(e)) => tracing::debug!(error = %e, peer = %self.peer, "TLS handshake failed"),
            Err(_) => tracing::debug!(peer = %self.peer, "TLS handshake timed out"),
        }
    }

    async fn serve<I>(self, io: I, certificate: Option<PeerCertificate>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Self {
            builder,
            watcher,
            service,
            peer,
        } = self;
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let mut req = as_origin_form(req);
            req.extensions_mut().insert(ConnectInfo(peer));
            if let Some(c) = &certificate {
                req.extensions_mut().insert(c.clone());
            }
            service.clone().oneshot(req)
        });
        let conn = builder.serve_connection(TokioIo::new(io), service);
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }
}

/// An HTTP/2 request as an HTTP/1.1 one looks: `Host` from `:authority`
/// and an origin-form target, so the edge checks, routing and the public
/// URL treat both versions alike. HTTP/1.1 requests are left as they are
/// (their absolute-form targets are refused at the edge).
fn as_origin_form(mut req: Request<Incoming>) -> Request<Incoming> {
    if req.version() != http::Version::HTTP_2 {
        return req;
    }
    if let Some(authority) = req.uri().authority().cloned()
        && !req.headers().contains_key(http::header::HOST)
        && let Ok(host) = http::HeaderValue::from_str(authority.as_str())
    {
        req.headers_mut().insert(http::header::HOST, host);
    }
    let origin_form = req.uri().path_and_query().cloned().map(http::Uri::from);
    if let Some(uri) = origin_form {
        *req.uri_mut() = uri;
    }
    req
}
