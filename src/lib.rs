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
//! - [`app`]: shared state and the routers with all their layers, in order.
//! - [`token`]: the client-credentials request, the moka token cache,
//!   single-flight fetches and the background refresher.
//! - [`proxy`]: the forwarding handler, header policy, path check and the
//!   pooled upstream client.
//! - [`rewrite`]: streaming org-URL ⇄ proxy-URL rewriting of links in
//!   headers and bodies (pure, no I/O).
//! - [`governor`]: the per-org service-protection governor: concurrency cap,
//!   bounded queue, and a gate closed for everyone after a 429.
//! - [`sim`]: a simulator of Entra ID and the Dataverse Web API, used by the
//!   `demo` and `sim` commands and by the tests.
//! - [`cli`]: the command-line interface and its subcommands.
//!
//! The library never binds sockets itself: [`serve`] takes bound listeners
//! and a shutdown token, so tests run everything on ephemeral ports.

pub mod app;
pub mod cli;
pub mod config;
pub mod error;
pub mod governor;
pub mod proxy;
pub mod rewrite;
pub mod sim;
pub mod token;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Installs rustls' ring crypto provider as the process default (idempotent).
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Runs the proxy and admin listeners until `shutdown` is cancelled.
///
/// The token refresher starts at once, so the first token is fetched at
/// startup rather than by the first request.
pub async fn serve(
    config: config::Config,
    proxy: TcpListener,
    admin: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = app::AppState::new(&config)?;
    let refreshers = state.spawn_refreshers(&shutdown);

    let proxy = proxy.tap_io(|tcp| {
        // Small OData responses should not wait for Nagle.
        let _ = tcp.set_nodelay(true);
    });
    let proxy_server = axum::serve(
        proxy,
        app::router(state.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let admin_server = axum::serve(admin, app::admin_router(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());

    let result = tokio::try_join!(proxy_server.into_future(), admin_server.into_future());
    for r in refreshers {
        r.abort();
    }
    result.map(|_| ())
}
