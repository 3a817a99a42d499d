//! dataverse-proxy: an authenticating reverse proxy for Microsoft Dataverse.
//!
//! Callers send plain HTTP without credentials. The proxy holds an Entra ID
//! app registration's credentials, gets an OAuth2 client-credentials token
//! for the org, caches and refreshes it, injects `Authorization: Bearer …`,
//! forwards to the org's `/api/data/v9.x/` Web API and streams the answer
//! back. Callers never see a secret.
//!
//! # Layout
//!
//! - [`config`]: typed configuration, layering (flags > env > file >
//!   defaults) and validation that reports every problem at once.
//! - [`error`]: [`error::ProxyError`], its status table and its OData-shaped
//!   JSON body; the one place proxy errors become responses.
//! - [`app`]: shared state, the request handler (request id, span and
//!   access log around the forwarding) and the admin router.
//! - [`access`]: the per-request log line and request metrics.
//! - [`metrics`]: the Prometheus registry behind the admin `/metrics`.
//! - [`token`]: the client-credentials request, the moka token cache,
//!   single-flight fetches and the background refresher.
//! - [`proxy`]: the forwarding handler, header policy, path check and the
//!   pooled upstream client.
//! - [`rewrite`]: streaming org-URL ⇄ proxy-URL rewriting of links in
//!   headers and bodies (pure, no I/O).
//! - [`governor`]: the per-org service-protection governor: concurrency cap,
//!   bounded queue, and a gate closed for everyone after a 429.
//! - [`policy`]: caller identity (API keys, source CIDRs, quotas) and the
//!   per-org access policy, `$batch` parts included.
//! - [`server`]: the HTTP/1.1 server loop with the edge limits and drain.
//! - [`sim`]: a simulator of Entra ID and the Dataverse Web API, used by the
//!   `demo` and `sim` commands and by the tests.
//! - `telemetry` (feature `otel`): optional OpenTelemetry span export.
//! - [`cli`]: the command-line interface and its subcommands.
//!
//! The library never binds sockets itself: [`serve`] takes bound listeners
//! and a shutdown token, so tests run everything on ephemeral ports.

pub mod batch;
pub mod callers;
pub mod cli;
pub mod config;
pub mod error;
pub mod governor;
pub mod guard;
pub mod http;
pub mod policy;
pub mod rewrite;
pub mod server;
pub mod sim;
#[cfg(feature = "otel")]
pub mod telemetry;
pub mod token;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Installs rustls' ring crypto provider as the process default (idempotent).
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Runs the proxy and admin listeners until `shutdown` is cancelled.
///
/// The token refreshers start at once, so the first tokens are fetched at
/// startup rather than by the first request.
pub async fn serve(
    config: config::Config,
    proxy: TcpListener,
    admin: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with(
        config,
        proxy,
        admin,
        Control {
            shutdown,
            reload: Arc::default(),
        },
    )
    .await
}

/// How the binary steers a running proxy (signals, in `cli.rs`).
#[derive(Debug, Clone, Default)]
pub struct Control {
    /// Cancelled to shut down gracefully (SIGTERM, SIGINT).
    pub shutdown: CancellationToken,
    /// Notified to re-read credential files now (SIGHUP).
    pub reload: Arc<Notify>,
}

/// [`serve`] with a reload trigger.
///
/// Shutdown sequence: `/readyz` turns 503 at once; after `shutdown.delay`
/// the proxy listener closes (new connections are refused) and idle
/// keep-alive connections are closed; in-flight requests (long downloads
/// included) get `shutdown.grace` to finish, then the rest are aborted; the
/// admin listener closes last.
pub async fn serve_with(
    config: config::Config,
    proxy: TcpListener,
    admin: TcpListener,
    control: Control,
) -> std::io::Result<()> {
    let state = http::AppState::new(&config)?;
    warn_about_exposure(&config);
    let refreshers = state.spawn_refreshers(&control.shutdown);
    let reloader = tokio::spawn(reload_on(state.clone(), control.reload.clone()));

    let delay = config.shutdown.delay;
    let grace = config.shutdown.grace;
    let stop_accepting = {
        let (shutdown, state) = (control.shutdown.clone(), state.clone());
        async move {
            shutdown.cancelled().await;
            state.set_draining();
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                "shutting down: readiness is now false"
            );
            tokio::time::sleep(delay).await;
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "listener closed; draining in-flight requests"
            );
        }
    };
    let admin_stop = CancellationToken::new();
    let admin_server = tokio::spawn(
        axum::serve(admin, http::admin::router(state.clone()))
            .with_graceful_shutdown(admin_stop.clone().cancelled_owned())
            .into_future(),
    );
    server::run(
        proxy,
        http::proxy_service(state.clone()),
        &config.limits,
        stop_accepting,
        grace,
    )
    .await;
    let result: std::io::Result<()> = Ok(());
    admin_stop.cancel();
    let _ = admin_server.await;
    reloader.abort();
    for r in refreshers {
        r.abort();
    }
    result
}

/// Startup warnings an operator must see: an open proxy, readable secrets.
fn warn_about_exposure(config: &config::Config) {
    if !config.listen.ip().is_loopback() && config.access.is_open() {
        tracing::warn!(
            listen = %config.listen,
            "THE PROXY LISTENS BEYOND LOOPBACK WITH NO CALLER CONTROL: anyone who can reach it acts as the \
             Dataverse application user. Configure [[callers]] API keys or [access] allow_cidrs, or restrict \
             the network (docs/security.md)"
        );
    }
    for org in &config.orgs {
        match &org.credential.kind {
            config::CredentialKind::Secret(config::SecretSource::File(path)) => {
                config::warn_if_readable_by_others("client secret", path);
            }
            config::CredentialKind::Certificate { path, .. } => {
                config::warn_if_readable_by_others("certificate", path);
            }
            _ => {}
        }
    }
}

/// Fetches new tokens for every credential whenever `reload` is notified
/// (credential files are re-read at each fetch).
async fn reload_on(state: http::AppState, reload: Arc<Notify>) {
    loop {
        reload.notified().await;
        tracing::info!("reload: fetching new tokens with the current credential files");
        for provider in state.providers() {
            if let Err(e) = provider.refresh_now().await {
                tracing::warn!(credential = provider.credential_name(), error = %e, "reload: token fetch failed; the current token stays");
            }
        }
    }
}
