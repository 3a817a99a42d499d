//! Access tokens: fetch, cache, refresh ahead, and serve through Entra outages.
//!
//! One [`TokenProvider`] per credential. Its token lives in a moka cache keyed
//! by [`TokenKey`] (authority + tenant, client, scope) whose per-entry expiry
//! is the moment the token stops being served (see [`expiry`]). Requests call
//! [`TokenProvider::get`]:
//!
//! - a cached token is returned at once (the hot path: one cache lookup);
//! - on a miss, moka's `try_get_with` makes the fetch single-flight, so a cold
//!   start under load costs one token request;
//! - after a failed fetch, requests fail fast with `Retry-After` until the next
//!   retry is due, so an Entra outage is not hammered once per request.
//!
//! A background task ([`TokenProvider::spawn_refresher`]) fetches at startup,
//! refreshes ahead of expiry and, when a refresh fails, keeps the current
//! token (it is still in the cache) and retries with jittered exponential
//! backoff until it succeeds or the token really expires.

mod access;
pub mod certificate;
pub mod client;
pub mod expiry;
mod health;
pub mod obo;

pub use access::AccessToken;
pub use health::{FetchReason, TokenHealth, TokenStats};
pub use obo::{Exchanged, OboError, OnBehalfOf, Refused, UserAssertion};

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moka::Expiry;
use moka::future::Cache;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{CredentialConfig, CredentialKind, ManagedIdentity, TokenConfig};
pub use client::{Target, TokenError, entra_client};

/// Identifies a token: the same app in two tenants, or for two orgs, gets two.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    /// Token endpoint URL (authority host + tenant), or the managed identity endpoint.
    pub endpoint: String,
    /// Tenant, when known.
    pub tenant: String,
    /// Application (client) id (`system` for a system-assigned identity).
    pub client_id: String,
    /// Requested scope (`{org}/.default`).
    pub scope: String,
}

impl TokenKey {
    /// The cache key of `credential`'s token for `target`.
    pub fn new(credential: &CredentialConfig, target: &Target) -> Self {
        let endpoint = match (&credential.kind, &credential.token_url) {
            (CredentialKind::ManagedIdentity(ManagedIdentity::Imds { endpoint }), _)
            | (CredentialKind::ManagedIdentity(ManagedIdentity::AppService { endpoint, .. }), _)
            | (_, Some(endpoint)) => endpoint.to_string(),
            (_, None) => String::new(),
        };
        Self {
            endpoint,
            tenant: credential.tenant_id.clone().unwrap_or_default(),
            client_id: credential
                .client_id
                .clone()
                .unwrap_or_else(|| "system".to_owned()),
            scope: target.scope.clone(),
        }
    }
}

/// The token cache shared by every provider of the process.
pub type TokenCache = Cache<TokenKey, Arc<AccessToken>>;

/// A new, empty token cache whose entries leave when they stop being served.
pub fn new_cache() -> TokenCache {
    Cache::builder()
        .max_capacity(1024)
        .expire_after(ServeUntil)
        .build()
}

/// Per-entry expiry: an entry leaves the cache when it stops being served.
struct ServeUntil;

impl<K> Expiry<K, Arc<AccessToken>> for ServeUntil {
    fn expire_after_create(
        &self,
        _key: &K,
        value: &Arc<AccessToken>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.serve_until.saturating_duration_since(Instant::now()))
    }

    fn expire_after_update(
        &self,
        _key: &K,
        value: &Arc<AccessToken>,
        _now: std::time::Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.serve_until.saturating_duration_since(Instant::now()))
    }
}

/// No valid token is at hand (Entra ID unreachable or refusing).
#[derive(Debug, Clone, thiserror::Error)]
#[error("no valid token: {reason}")]
pub struct TokenUnavailable {
    /// Why, in words safe to show a caller (an AADSTS code at most).
    pub reason: String,
    /// The whole error, secret-free, for the log only (URLs, file names).
    pub detail: String,
    /// When the next fetch attempt is due.
    pub retry_after: Duration,
}

/// The last failed fetch, which gates further attempts.
struct Failure {
    /// What a caller may be told ([`TokenError::caller_summary`]).
    reason: String,
    /// The whole error, secret-free, for the log.
    detail: String,
    /// Failed attempts in a row.
    attempts: u32,
    /// No new attempt before this.
    retry_at: Instant,
}

/// Fetches, caches and refreshes the token of one credential. Cheap to clone.
#[derive(Clone)]
pub struct TokenProvider {
    inner: Arc<Inner>,
}

struct Inner {
    key: TokenKey,
    credential: Arc<CredentialConfig>,
    settings: TokenConfig,
    source: Arc<dyn TokenSource>,
    cache: Cache<TokenKey, Arc<AccessToken>>,
    /// Guarded by a std mutex: held only for short, non-async sections.
    failure: Mutex<Option<Failure>>,
    /// Fetch counts for the metrics.
    stats: TokenStats,
    /// A token was fetched at least once.
    fetched_once: std::sync::atomic::AtomicBool,
    /// The cache's current token as a plain pointer, so that a request reads
    /// it under a read lock instead of querying moka, whose `get` costs more
    /// than the rest of the token's part of a request. The cache stays the one store: this view is set only from what the cache
    /// holds or is given ([`Self::remember`]) and cleared with it.
    view: std::sync::RwLock<Option<Arc<AccessToken>>>,
    /// The last token was dropped after a 401.
    invalidated: std::sync::atomic::AtomicBool,
    /// When the last fetch succeeded (milliseconds since the Unix epoch, 0:
    /// never), for the status page.
    last_success_ms: std::sync::atomic::AtomicU64,
}

/// Where tokens come from: Entra ID over HTTP in the proxy ([`Entra`]); a
/// test can script the answers and run the clock itself. This is the seam
/// that lets refresh-ahead, backoff and fail-closed be tested under tokio's
/// paused clock.
pub trait TokenSource: Send + Sync + 'static {
    /// One token request.
    fn request(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<client::TokenResponse, TokenError>> + Send + '_>>;
}

/// The client-credentials request to Entra ID.
struct Entra {
    http: reqwest::Client,
    credential: Arc<CredentialConfig>,
    target: Target,
}

impl TokenSource for Entra {
    fn request(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<client::TokenResponse, TokenError>> + Send + '_>> {
        Box::pin(client::request_token(
            &self.http,
            &self.credential,
            &self.target,
        ))
    }
}

impl fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenProvider")
            .field("key", &self.inner.key)
            .finish_non_exhaustive()
    }
}

impl TokenProvider {
    /// Creates a provider; nothing is fetched until [`Self::get`] or the
    /// refresher runs. `tls` is the setup shared with the Dataverse client
    /// (`crate::upstream::tls`).
    pub fn new(
        credential: Arc<CredentialConfig>,
        target: Target,
        settings: TokenConfig,
        cache: TokenCache,
        tls: rustls::ClientConfig,
    ) -> Result<Self, reqwest::Error> {
        let http = client::entra_client(&settings, tls)?;
        let key = TokenKey::new(&credential, &target);
        let source = Arc::new(Entra {
            http,
            credential: credential.clone(),
            target,
        });
        Ok(Self::with_source(key, credential, settings, cache, source))
    }

    /// A provider whose tokens come from `source`.
    pub fn with_source(
        key: TokenKey,
        credential: Arc<CredentialConfig>,
        settings: TokenConfig,
        cache: TokenCache,
        source: Arc<dyn TokenSource>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                key,
                credential,
                settings,
                source,
                cache,
                failure: Mutex::new(None),
                stats: TokenStats::default(),
                fetched_once: std::sync::atomic::AtomicBool::new(false),
                view: std::sync::RwLock::new(None),
                invalidated: std::sync::atomic::AtomicBool::new(false),
                last_success_ms: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// How this provider is doing (see [`TokenHealth`]).
    pub async fn health(&self) -> TokenHealth {
        let (failures_in_a_row, last_error) = match &*self.lock_failure() {
            Some(f) => (f.attempts, Some(f.reason.clone())),
            None => (0, None),
        };
        let last = self
            .inner
            .last_success_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        TokenHealth {
            credential: self.inner.credential.name.clone(),
            kind: self.inner.credential.kind.label(),
            expires_in: self.expires_in().await,
            last_refresh_ms: (last > 0).then_some(last),
            failures_in_a_row,
            last_error,
        }
    }

    /// The credential (the on-behalf-of exchange authenticates with it).
    pub fn credential(&self) -> &Arc<CredentialConfig> {
        &self.inner.credential
    }

    /// The credential's name (for logs and metrics).
    pub fn credential_name(&self) -> &str {
        &self.inner.credential.name
    }

    /// Fetch counters.
    pub fn stats(&self) -> &TokenStats {
        &self.inner.stats
    }

    /// How long the cached token is still served, if there is one.
    pub async fn expires_in(&self) -> Option<Duration> {
        let token = self.inner.cache.get(&self.inner.key).await?;
        Some(token.serve_until.saturating_duration_since(Instant::now()))
    }

    /// Fetches a new token now and caches it (SIGHUP: credential files are
    /// re-read, so a rotated secret or certificate is used at once). The
    /// current token stays if the fetch fails.
    pub async fn refresh_now(&self) -> Result<(), TokenError> {
        let fresh = self.fetch(FetchReason::Manual).await?;
        self.inner
            .cache
            .insert(self.inner.key.clone(), fresh.clone())
            .await;
        self.remember(Some(fresh));
        Ok(())
    }

    /// Why a fetch on an empty cache happens.
    fn miss_reason(&self) -> FetchReason {
        use std::sync::atomic::Ordering;
        if self.inner.invalidated.swap(false, Ordering::Relaxed) {
            FetchReason::Invalidated
        } else if self.inner.fetched_once.load(Ordering::Relaxed) {
            FetchReason::Expired
        } else {
            FetchReason::Startup
        }
    }

    /// A token to inject, or `TokenUnavailable` (503) when none can be had now.
    pub async fn get(&self) -> Result<Arc<AccessToken>, TokenUnavailable> {
        let viewed = self.viewed();
        if let Some(token) = viewed.filter(|t| Instant::now() < t.serve_until) {
            return Ok(token);
        }
        // Boxed: the cache and fetch futures are large, and inline they
        // would make every request's future as large, copied at each move.
        Box::pin(self.get_from_cache()).await
    }

    /// [`Self::get`] past the remembered token: the cache, else a fetch.
    async fn get_from_cache(&self) -> Result<Arc<AccessToken>, TokenUnavailable> {
        let inner = &self.inner;
        match inner.cache.get(&inner.key).await {
            Some(token) if Instant::now() < token.serve_until => {
                self.remember(Some(token.clone()));
                return Ok(token);
            }
            // Past serving (the cache's own timer may lag tokio's clock).
            Some(_) => inner.cache.invalidate(&inner.key).await,
            None => {}
        }
        if let Some(err) = self.failing_fast() {
            return Err(err);
        }
        let token = inner
            .cache
            .try_get_with(inner.key.clone(), self.fetch(self.miss_reason()))
            .await
            .map_err(|e| TokenUnavailable {
                reason: e.caller_summary(),
                detail: e.to_string(),
                retry_after: self.retry_after(),
            })?;
        self.remember(Some(token.clone()));
        Ok(token)
    }

    fn viewed(&self) -> Option<Arc<AccessToken>> {
        self.inner
            .view
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Sets the view of the cache's token (see `Inner::view`).
    fn remember(&self, token: Option<Arc<AccessToken>>) {
        *self
            .inner
            .view
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = token;
    }

    /// Fetches a token now, bypassing the cache (for `check` and `token`).
    pub async fn fetch_uncached(&self) -> Result<Arc<AccessToken>, TokenError> {
        self.fetch(FetchReason::Manual).await
    }

    /// Drops `stale` from the cache (Dataverse refused it with 401), unless a
    /// newer token has replaced it already; the next [`Self::get`] fetches.
    pub async fn invalidate(&self, stale: &Arc<AccessToken>) {
        use moka::ops::compute::Op;
        let stale = stale.clone();
        let _ = self
            .inner
            .cache
            .entry(self.inner.key.clone())
            .and_compute_with(|entry| {
                let op = match entry {
                    Some(e) if Arc::ptr_eq(e.value(), &stale) => Op::Remove,
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
        if self.viewed().is_some_and(|t| Arc::ptr_eq(&t, &stale)) {
            self.remember(None);
        }
        self.inner
            .invalidated
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!("Dataverse refused the token (401); fetching a new one");
    }

    /// Whether [`Self::get`] can be expected to give a token now: one is
    /// held, or the last fetch did not fail. `false` means the credential
    /// fails (a lane is then out of rotation until the refresher, which
    /// keeps trying, gets a token).
    pub fn usable_now(&self) -> bool {
        self.viewed()
            .is_some_and(|t| Instant::now() < t.serve_until)
            || self.lock_failure().is_none()
    }

    /// What the last failure tells a caller, if the last fetch failed.
    pub fn failing_reason(&self) -> Option<String> {
        self.lock_failure().as_ref().map(|f| f.reason.clone())
    }

    /// True when a token is cached and servable (admin `/readyz`).
    pub async fn is_ready(&self) -> bool {
        self.inner.cache.get(&self.inner.key).await.is_some()
    }

    /// While a recent failure's backoff runs, fail without calling Entra ID.
    fn failing_fast(&self) -> Option<TokenUnavailable> {
        let guard = self.lock_failure();
        let f = guard.as_ref()?;
        let now = Instant::now();
        (f.retry_at > now).then(|| TokenUnavailable {
            reason: f.reason.clone(),
            detail: f.detail.clone(),
            retry_after: f.retry_at - now,
        })
    }

    fn retry_after(&self) -> Duration {
        let guard = self.lock_failure();
        guard.as_ref().map_or(self.inner.settings.min_backoff, |f| {
            f.retry_at.saturating_duration_since(Instant::now())
        })
    }

    fn lock_failure(&self) -> std::sync::MutexGuard<'_, Option<Failure>> {
        // A poisoned lock only means a panic elsewhere; the data stays usable.
        self.inner
            .failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One token request; records success or failure for the backoff gate.
    async fn fetch(&self, reason: FetchReason) -> Result<Arc<AccessToken>, TokenError> {
        let inner = &self.inner;
        let started = Instant::now();
        // A span of its own (a child of the request that waits for it, if
        // any): the credential's name, never its secret or the token.
        let span = tracing::info_span!(
            "token fetch",
            otel.name = "token fetch",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            http.request.method = "POST",
            dataverse.credential = %inner.credential.name,
            dataverse.fetch_reason = ?reason,
            error.type = tracing::field::Empty,
        );
        let result = tracing::Instrument::instrument(inner.source.request(), span.clone())
            .await
            .and_then(|resp| AccessToken::new(resp, started));
        if result.is_err() {
            span.record("error.type", "token_unavailable");
            span.record("otel.status_code", "ERROR");
        }
        inner.stats.record(reason, result.is_ok());
        let mut failure = self.lock_failure();
        match result {
            Ok(token) => {
                inner
                    .fetched_once
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                inner
                    .last_success_ms
                    .store(now_ms, std::sync::atomic::Ordering::Relaxed);
                if let Some(f) = failure.take() {
                    tracing::info!(
                        failed_attempts = f.attempts,
                        "token fetch recovered after failures"
                    );
                }
                tracing::debug!(
                    lifetime_s = token.lifetime.as_secs(),
                    "fetched access token"
                );
                Ok(Arc::new(token))
            }
            Err(e) => {
                let attempts = failure.as_ref().map_or(0, |f| f.attempts) + 1;
                let s = &inner.settings;
                let delay =
                    expiry::backoff(attempts, s.min_backoff, s.max_backoff, fastrand::f64());
                // Permanent errors (bad secret, unknown app) need an operator:
                // log them loudly once, then quietly while retrying slowly.
                let advice = e.advice().unwrap_or("");
                if attempts == 1 || !e.is_permanent() {
                    tracing::warn!(
                        error = %e,
                        advice,
                        attempt = attempts,
                        retry_in_ms = delay.as_millis() as u64,
                        "token fetch failed"
                    );
                } else {
                    tracing::debug!(error = %e, attempt = attempts, "token fetch failed again");
                }
                *failure = Some(Failure {
                    reason: e.caller_summary(),
                    detail: e.to_string(),
                    attempts,
                    retry_at: Instant::now() + delay,
                });
                Err(e)
            }
        }
    }

    /// Starts the background task that fetches at startup and refreshes
    /// ahead of expiry until `shutdown` is cancelled.
    pub fn spawn_refresher(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let due = this.next_due().await;
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep_until(due) => {}
                }
                this.refresh_once().await;
            }
        })
    }

    /// When the refresher should act next.
    async fn next_due(&self) -> Instant {
        let retry_at = self.lock_failure().as_ref().map(|f| f.retry_at);
        match self.inner.cache.get(&self.inner.key).await {
            // Refresh ahead; after a failed refresh, wait out the backoff.
            Some(token) => retry_at.map_or(token.refresh_at, |r| r.max(token.refresh_at)),
            None => retry_at.unwrap_or_else(Instant::now),
        }
    }

    async fn refresh_once(&self) {
        let inner = &self.inner;
        match inner.cache.get(&inner.key).await {
            Some(token) if Instant::now() < token.refresh_at => {}
            Some(_) => {
                // The current token stays cached (and served) if this fails.
                if let Ok(fresh) = self.fetch(FetchReason::Refresh).await {
                    inner.cache.insert(inner.key.clone(), fresh.clone()).await;
                    self.remember(Some(fresh));
                }
            }
            None => {
                // Shares the fetch with any request waiting on a cold cache.
                let _ = inner
                    .cache
                    .try_get_with(inner.key.clone(), self.fetch(self.miss_reason()))
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests;
