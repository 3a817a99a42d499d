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
//! Layers of code point one way: data ← domain ← application ← HTTP ←
//! wiring. No module imports one of a layer above it.
//!
//! - **Data**: [`config`]: the configuration as plain data (raw types,
//!   sources, problems, one validator per section), layered flags > env >
//!   file > defaults, every problem reported at once.
//! - **Domain** (no HTTP): [`token`] (client-credentials requests, the moka
//!   cache, refresh ahead), [`governor`] (service protection: the adaptive
//!   concurrency limit, queue, 429 gate and retry budget, per process or shared
//!   through Redis), [`lanes`] (an org's application users, each a token
//!   and a governor, and which lane a request takes), [`guard`] (which
//!   paths may reach Dataverse),
//!   [`policy`] (the per-org access policy), [`callers`] (who is calling:
//!   Entra ID tokens, API keys, client certificates, source addresses, quotas),
//!   [`identity`] (Entra ID caller tokens: discovery, keys, claims), [`batch`] (the strict `$batch` reader),
//!   [`rewrite`] (streaming org-URL ⇄ proxy-URL rewriting), [`compression`]
//!   (content codings: what the caller accepts, streaming codecs) and
//!   [`metadata_cache`] (`$metadata` and `EntityDefinitions` answers per org),
//!   [`usage`] (the Power Platform requests spent, by org, lane, caller and
//!   user, shared through the governor's Redis).
//!   Each has its own error type. [`stats`]: what requests leave behind for
//!   the metrics and the status page (data only); [`logging`]: the request
//!   line and every other event, written off the request's path;
//!   [`telemetry`]: OpenTelemetry spans, exported over OTLP when configured.
//! - **Application**: [`app`]: the composition root: [`app::AppState`]
//!   built from the configuration (TLS, Redis, pools, token providers,
//!   governors, the caller-token verifier, on-behalf-of), and the rules a
//!   reload swaps (`app/rules.rs`, `app/reload.rs`).
//! - **HTTP**: [`http`]: the proxy listener's service, its tower layers in
//!   order in `http/mod.rs` (request id, sensitive headers, trace, access
//!   log, catch-panic, body idle timeouts, the axum router, edge checks), the
//!   forwarding handler in four steps (`http/forward/`: admit, plan, send
//!   (or `cached` for metadata, `long_get` for GETs too long for a request
//!   line), answer), bodies and header policy; [`admin`]: the admin
//!   listener apart from the data path (probes, `/metrics`, `/status`, the
//!   status page, `/reload`); [`error`]: [`error::ProxyError`], where domain
//!   errors become statuses and OData bodies; [`server`]: the accept loop
//!   (HTTP/1.1 and HTTP/2, TLS and client certificates, connection cap,
//!   header-read timeout, drain); [`upstream`]: where requests leave, a
//!   connection pool per org over hyper's HTTP/1.1 connection and the one
//!   outbound TLS setup (`upstream/tls.rs`), the egress proxy.
//! - **Wiring**: [`serve`] below and [`cli`] (the subcommands, signals).
//!
//! The simulator of Entra ID and the Dataverse Web API that `demo`, `sim`
//! and the tests use is a crate of its own (`crates/dataverse-sim`).
//!
//! A request enters at [`server::run`], crosses the layers listed in
//! [`http`], and leaves through `http/forward/send.rs` and the org's pool
//! (`upstream/pool.rs`) to Dataverse; the
//! answer comes back through `http/forward/answer.rs`.
//!
//! The library never binds sockets itself: [`serve`] takes bound listeners
//! and a shutdown token, so tests run everything on ephemeral ports.

pub mod admin;
pub mod app;
pub mod batch;
pub mod callers;
pub mod cli;
pub mod compression;
pub mod config;
pub mod error;
pub mod governor;
pub mod guard;
pub mod http;
pub mod identity;
pub mod lanes;
pub mod logging;
pub mod metadata_cache;
pub mod policy;
pub mod rewrite;
pub mod server;
pub mod stats;
pub mod telemetry;
pub mod token;
pub mod upstream;
pub mod usage;

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
            ..Control::default()
        },
    )
    .await
}

/// How the binary steers a running proxy (signals, in `cli.rs`).
#[derive(Debug, Clone, Default)]
pub struct Control {
    /// Cancelled to shut down gracefully (SIGTERM, SIGINT).
    pub shutdown: CancellationToken,
    /// Cancelled to end the drain at once (a second SIGTERM or SIGINT).
    pub abort: CancellationToken,
    /// Notified to reload now (SIGHUP): the configuration from `sources`,
    /// credential files, the listener's certificate.
    pub reload: Arc<Notify>,
    /// Where the configuration was read from, to read it again on a reload
    /// (`None`: tokens and certificates are still reloaded, the rest not).
    pub sources: Option<config::Sources>,
}

/// [`serve`] with a reload trigger.
///
/// Shutdown sequence: `/readyz` turns 503 at once, and for `shutdown.delay`
/// the proxy keeps accepting and serving while it closes keep-alive
/// connections politely (`Connection: close` on HTTP/1.1 answers, GOAWAY
/// on HTTP/2), so an ingress sees the probe fail before the listener goes;
/// then the listener closes, in-flight requests (long downloads included)
/// get `shutdown.grace` to finish, and the rest are aborted; the admin
/// listener closes last. A second signal (`Control::abort`) ends it at once.
pub async fn serve_with(
    config: config::Config,
    proxy: TcpListener,
    admin: TcpListener,
    control: Control,
) -> std::io::Result<()> {
    let state = http::AppState::new(&config)?;
    state.set_sources(control.sources.clone());
    let tls = match config.tls.clone() {
        Some(settings) => Some(Arc::new(
            server::ListenerTlsState::load(settings).map_err(std::io::Error::other)?,
        )),
        None => None,
    };
    warn_about_exposure(&config);
    let refreshers = state.spawn_refreshers(&control.shutdown);
    let reloader = tokio::spawn(reload_on(
        state.clone(),
        tls.clone(),
        control.reload.clone(),
    ));
    let tls_watcher = tls.clone().map(|t| tokio::spawn(t.watch_files()));
    let redis_tasks = state.redis.as_ref().map(|r| r.spawn()).unwrap_or_default();
    let usage_task = state.usage.spawn();
    let status_ticker = admin::status::spawn_ticker(state.clone(), control.shutdown.clone());
    // Caller-token keys before the first caller needs them.
    let key_prefetch = state
        .verifier
        .clone()
        .map(|v| tokio::spawn(async move { v.prefetch().await }));

    let grace = config.shutdown.grace;
    let begun = CancellationToken::new();
    let drain = server::Drain {
        begun: begun.clone(),
        stop_accepting: stop_accepting(&control, &state, (config.shutdown.delay, grace), begun),
        grace,
        abort: control.abort.clone(),
    };
    let admin_stop = CancellationToken::new();
    let admin_server = tokio::spawn(
        axum::serve(admin, admin::router(state.clone()))
            .with_graceful_shutdown(admin_stop.clone().cancelled_owned())
            .into_future(),
    );
    server::run(
        proxy,
        tls,
        http::proxy_service(state.clone()),
        &config.limits,
        state.connections.clone(),
        drain,
    )
    .await;
    let result: std::io::Result<()> = Ok(());
    // The last second's counts reach Redis before the process goes.
    usage_task.abort();
    state.usage.refresh().await;
    admin_stop.cancel();
    let _ = admin_server.await;
    reloader.abort();
    for task in key_prefetch
        .into_iter()
        .chain(tls_watcher)
        .chain(redis_tasks)
        .chain([status_ticker])
    {
        task.abort();
    }
    for r in refreshers {
        r.abort();
    }
    result
}

/// Resolves when the listener should stop accepting: after shutdown began
/// (readiness false and `begun` cancelled at once) and its `delay` passed,
/// or at once on an abort.
async fn stop_accepting(
    control: &Control,
    state: &http::AppState,
    (delay, grace): (std::time::Duration, std::time::Duration),
    begun: CancellationToken,
) {
    control.shutdown.cancelled().await;
    state.set_draining();
    begun.cancel();
    tracing::info!(
        delay_ms = delay.as_millis() as u64,
        "shutting down: readiness is now false; keep-alive connections are closed after their answers"
    );
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        () = control.abort.cancelled() => {}
    }
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        "listener closed; draining in-flight requests"
    );
}

/// Startup warnings an operator must see: an open proxy, readable secrets;
/// and who is admitted with what.
fn warn_about_exposure(config: &config::Config) {
    for line in config.access.summary() {
        tracing::info!(admitted = %line, "callers");
    }
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
/// (credential files are re-read at each fetch), and re-reads the
/// listener's TLS certificate.
async fn reload_on(
    state: http::AppState,
    tls: Option<Arc<server::ListenerTlsState>>,
    reload: Arc<Notify>,
) {
    loop {
        reload.notified().await;
        // An invalid file is logged problem by problem and changes nothing.
        let _ = app::reload::reload(&state);
        if let Some(tls) = &tls {
            let tls = tls.clone();
            let _ = tokio::task::spawn_blocking(move || tls.reload()).await;
        }
        tracing::info!("reload: fetching new tokens with the current credential files");
        for provider in state.providers() {
            if let Err(e) = provider.refresh_now().await {
                tracing::warn!(credential = provider.credential_name(), error = %e, "reload: token fetch failed; the current token stays");
            }
        }
    }
}
