//! The proxy's HTTP/1.1 accept loop: connection and header limits, and the
//! graceful drain. It drives a tower service (the axum router and its
//! layers, `src/http/`), giving each request its peer's address as axum's
//! `ConnectInfo`.
//!
//! `axum::serve` hides hyper's connection settings, and a proxy at the edge
//! needs them: the header buffer size and header count (431 when exceeded),
//! a header-read timeout (slowloris: a client that trickles its headers is
//! disconnected), and a cap on open connections (over it, new connections
//! are closed at once). Shutdown stops accepting, lets open requests finish
//! for the grace period, then drops the rest.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::config::LimitsConfig;

/// Serves `service` on `listener` until `stop` resolves, then drains open
/// connections for at most `grace`.
pub async fn run<S, B>(
    listener: TcpListener,
    service: S,
    limits: &LimitsConfig,
    stop: impl Future<Output = ()>,
    grace: Duration,
) where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers)
        .header_read_timeout(limits.header_read_timeout);
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
        let service = service.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            service.clone().oneshot(req)
        });
        let conn = builder.serve_connection(TokioIo::new(tcp), service);
        let conn = graceful.watch(conn);
        tasks.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
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
