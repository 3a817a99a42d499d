//! The HTTP/1.1 client towards Dataverse: a pool per org ([`pool`]) and
//! the connector it dials with.
//!
//! Dataverse is called over HTTP/1.1 with keep-alive pooling (no primary
//! source states HTTP/2 support; every Microsoft sample uses 1.1). TLS is the one setup of `crate::upstream::tls` (platform roots, extra CA). Plain `http` is only
//! ever used for loopback orgs (the simulator): config validation enforces it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::BoxError;
use axum::http::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower::ServiceExt;

use crate::config::{EgressProxy, UpstreamConfig};

pub mod pool;
pub mod tls;

pub use pool::{Pool, PooledBody, UpstreamError};

/// Connects directly, or through the configured egress proxy with a CONNECT
/// tunnel (hosts matching `no_proxy` are reached directly).
#[derive(Clone)]
pub struct Egress {
    direct: HttpConnector,
    proxy: Option<Arc<Matcher>>,
}

impl Egress {
    /// A connector for `egress` (direct when `None`).
    pub fn new(direct: HttpConnector, egress: Option<&EgressProxy>) -> Self {
        let proxy = egress.map(|e| {
            Arc::new(
                Matcher::builder()
                    .http(e.url.clone())
                    .https(e.url.clone())
                    .no(e.no_proxy.clone())
                    .build(),
            )
        });
        Self { direct, proxy }
    }
}

type ConnectFuture = Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, BoxError>> + Send>>;

impl tower::Service<Uri> for Egress {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> ConnectFuture {
        let intercept = self.proxy.as_ref().and_then(|m| m.intercept(&dst));
        match intercept {
            None => {
                let fut = self.direct.call(dst);
                Box::pin(async move { fut.await.map_err(Into::into) })
            }
            Some(proxy) => {
                let mut tunnel = Tunnel::new(proxy.uri().clone(), self.direct.clone());
                if let Some(auth) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                Box::pin(async move { tunnel.oneshot(dst).await.map_err(Into::into) })
            }
        }
    }
}

/// The connector every org's pool dials with: TCP (connect timeout,
/// no delay, keep-alive probes), the egress proxy where configured, TLS
/// for `https` origins.
pub fn connector(cfg: &UpstreamConfig, tls: rustls::ClientConfig) -> HttpsConnector<Egress> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(cfg.connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(Egress::new(http, cfg.egress.as_ref()))
}

/// The pool towards one org's origin.
pub fn pool(cfg: &UpstreamConfig, connector: &HttpsConnector<Egress>, origin: Uri) -> Pool {
    Pool::new(
        connector.clone(),
        origin,
        cfg.pool_max_idle,
        cfg.pool_idle_timeout,
    )
}
