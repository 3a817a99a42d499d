//! The pooled HTTP/1.1 client towards Dataverse, and the idle-body timeout.
//!
//! Dataverse is called over HTTP/1.1 with keep-alive pooling (the dossier
//! found no primary source for HTTP/2 support; every Microsoft sample uses
//! 1.1). TLS is rustls with the platform's trust store. Plain `http` is only
//! ever used for loopback orgs (the simulator): config validation enforces it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::BoxError;
use axum::body::Body;
use axum::http::Uri;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use crate::config::{EgressProxy, UpstreamConfig};

/// The upstream client type.
pub type UpstreamClient = Client<HttpsConnector<Egress>, Body>;

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

/// The system trust store plus the PEM certificates in `ca_file`.
pub fn tls_config(ca_file: Option<&std::path::Path>) -> std::io::Result<rustls::ClientConfig> {
    crate::install_crypto_provider();
    let extra = match ca_file {
        None => Vec::new(),
        Some(path) => {
            let pem = std::fs::read(path)?;
            pem::parse_many(&pem)
                .map_err(std::io::Error::other)?
                .into_iter()
                .filter(|b| b.tag() == "CERTIFICATE")
                .map(|b| rustls::pki_types::CertificateDer::from(b.into_contents()))
                .collect()
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone())
            .map_err(std::io::Error::other)?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// Builds the pooled upstream client.
pub fn build_client(cfg: &UpstreamConfig) -> std::io::Result<UpstreamClient> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(cfg.connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(cfg.ca_file.as_deref())?)
        .https_or_http()
        .enable_http1()
        .wrap_connector(Egress::new(http, cfg.egress.as_ref()));
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(cfg.pool_idle_timeout)
        .pool_max_idle_per_host(cfg.pool_max_idle)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https))
}

/// The body stalled for longer than the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("upstream body stalled for more than {0:?}")]
pub struct BodyIdleTimeout(Duration);

/// Wraps a body and fails it when no frame arrives within `timeout`.
///
/// A failed body makes hyper abort the caller's connection, so a stalled or
/// broken upstream never looks like a complete response.
///
/// The timer is armed only when the body has nothing ready (the clock runs
/// from the first poll that found it idle), so a body whose frames are
/// ready when polled, like most small answers, never touches the timer.
pub struct IdleTimeout<B> {
    inner: B,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The timer runs for the current wait (no frame since it was armed).
    armed: bool,
}

impl<B> IdleTimeout<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            sleep: None,
            armed: false,
        }
    }
}

impl<B> http_body::Body for IdleTimeout<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.armed = false;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if !this.armed {
                    sleep.as_mut().reset(Instant::now() + timeout);
                    this.armed = true;
                }
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyIdleTimeout(timeout).into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
