//! Each tenant's signing keys: found through its OpenID discovery
//! documents, cached, refreshed in the background when old, refetched once
//! for an unknown key id (Entra ID rotates keys without notice) but at most
//! once per `key_refetch_interval`, so tokens with made-up key ids cannot
//! make the proxy hammer Entra ID. When a refresh fails the cached keys
//! stay in use; with no keys at all, nothing is admitted.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::DecodingKey;
use serde::Deserialize;
use tokio::time::Instant;
use url::Url;

use super::TokenError;
use crate::config::CallerTokens;

/// Least time between two fetch attempts while keys are missing or old.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// A token format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// `ver` 1.0: `iss` = `https://sts.windows.net/{tid}/` in the public cloud.
    V1,
    /// `ver` 2.0: `iss` = `https://login.microsoftonline.com/{tid}/v2.0`.
    V2,
}

/// A tenant's issuers (v1 and v2) and signing keys by key id.
pub struct Discovered {
    /// The `issuer` of the v1 and v2 discovery documents.
    pub issuers: Vec<(Version, String)>,
    /// RSA keys by `kid`.
    pub keys: Vec<(String, DecodingKey)>,
}

/// Where keys come from: Entra ID over HTTP in the proxy
/// ([`HttpKeySource`]); a test can count fetches and run the clock itself.
pub trait KeySource: Send + Sync + 'static {
    /// Fetches one tenant's discovery documents and keys.
    fn fetch<'a>(
        &'a self,
        tenant: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Discovered, String>> + Send + 'a>>;
}

/// Discovery over HTTP: `{authority}/{tenant}/v2.0/.well-known/openid-configuration`
/// (v2 issuer and `jwks_uri`) and `{authority}/{tenant}/.well-known/openid-configuration`
/// (v1 issuer).
pub struct HttpKeySource {
    http: reqwest::Client,
    authority: Url,
}

impl HttpKeySource {
    /// Fetches from `authority` with `http` (the proxy's Entra ID client).
    pub fn new(http: reqwest::Client, authority: Url) -> Self {
        Self { http, authority }
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let resp = self
            .http
            .get(url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{url}: status {}", resp.status()));
        }
        resp.json().await.map_err(|e| format!("{url}: {e}"))
    }

    async fn discover(&self, tenant: &str) -> Result<Discovered, String> {
        #[derive(Deserialize)]
        struct Document {
            issuer: String,
            jwks_uri: String,
        }
        #[derive(Deserialize)]
        struct Jwks {
            keys: Vec<Jwk>,
        }
        #[derive(Deserialize)]
        struct Jwk {
            kty: String,
            kid: Option<String>,
            #[serde(rename = "use")]
            usage: Option<String>,
            n: Option<String>,
            e: Option<String>,
        }
        let base = self.authority.as_str().trim_end_matches('/');
        let v2: Document = self
            .get(&format!(
                "{base}/{tenant}/v2.0/.well-known/openid-configuration"
            ))
            .await?;
        let v1: Document = self
            .get(&format!("{base}/{tenant}/.well-known/openid-configuration"))
            .await?;
        let jwks: Jwks = self.get(&v2.jwks_uri).await?;
        let keys = jwks
            .keys
            .into_iter()
            .filter(|k| k.kty == "RSA" && k.usage.as_deref().is_none_or(|u| u == "sig"))
            .filter_map(|k| {
                let key =
                    DecodingKey::from_rsa_components(k.n.as_deref()?, k.e.as_deref()?).ok()?;
                Some((k.kid?, key))
            })
            .collect();
        Ok(Discovered {
            issuers: vec![(Version::V2, v2.issuer), (Version::V1, v1.issuer)],
            keys,
        })
    }
}

impl KeySource for HttpKeySource {
    fn fetch<'a>(
        &'a self,
        tenant: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Discovered, String>> + Send + 'a>> {
        Box::pin(self.discover(tenant))
    }
}

/// The keys of every configured tenant.
pub(super) struct KeyStore {
    tenants: HashMap<String, Arc<TenantKeys>>,
}

impl KeyStore {
    pub(super) fn new(config: &CallerTokens, source: Arc<dyn KeySource>) -> Self {
        let tenants = config
            .tenants
            .iter()
            .map(|t| {
                let keys = TenantKeys {
                    tenant: t.clone(),
                    source: source.clone(),
                    refetch_interval: config.key_refetch_interval,
                    refresh_after: config.key_refresh,
                    current: RwLock::new(None),
                    attempts: tokio::sync::Mutex::new(Attempts::default()),
                };
                (t.clone(), Arc::new(keys))
            })
            .collect();
        Self { tenants }
    }

    pub(super) async fn prefetch(&self) {
        for keys in self.tenants.values() {
            keys.fetch(Why::Missing).await;
        }
    }

    pub(super) fn tenant(&self, tenant: &str) -> Result<&Arc<TenantKeys>, TokenError> {
        self.tenants
            .get(tenant)
            .ok_or(TokenError::Invalid("the tenant is not allowed"))
    }
}

/// One fetched set.
struct KeySet {
    issuers: Vec<(Version, String)>,
    keys: HashMap<String, DecodingKey>,
    fetched_at: Instant,
}

#[derive(Default)]
struct Attempts {
    last: Option<Instant>,
    last_for_unknown_kid: Option<Instant>,
}

/// Why a fetch is wanted; each has its own rate rule.
enum Why<'a> {
    Missing,
    Stale,
    UnknownKid(&'a str),
}

pub(super) struct TenantKeys {
    tenant: String,
    source: Arc<dyn KeySource>,
    refetch_interval: Duration,
    refresh_after: Duration,
    current: RwLock<Option<Arc<KeySet>>>,
    /// Held while fetching: one fetch per tenant at a time.
    attempts: tokio::sync::Mutex<Attempts>,
}

impl TenantKeys {
    fn current(&self) -> Option<Arc<KeySet>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The issuer `iss` (checked against the discovery document of the
    /// token's `version`, or of either when the token names none) and the
    /// key named `kid`.
    pub(super) async fn key_for(
        self: &Arc<Self>,
        iss: &str,
        version: Option<Version>,
        kid: &str,
    ) -> Result<(String, DecodingKey), TokenError> {
        let set = match self.current() {
            Some(set) => set,
            None => self
                .fetch(Why::Missing)
                .await
                .ok_or(TokenError::KeysUnavailable)?,
        };
        if set.fetched_at.elapsed() >= self.refresh_after {
            let me = self.clone();
            tokio::spawn(async move { me.fetch(Why::Stale).await });
        }
        let issuer = set
            .issuers
            .iter()
            .find(|(v, i)| i == iss && version.is_none_or(|want| want == *v))
            .ok_or(TokenError::Invalid("the issuer is not the tenant's"))?
            .1
            .clone();
        if let Some(key) = set.keys.get(kid) {
            return Ok((issuer, key.clone()));
        }
        let refetched = self.fetch(Why::UnknownKid(kid)).await;
        refetched
            .and_then(|s| s.keys.get(kid).cloned())
            .map(|key| (issuer, key))
            .ok_or(TokenError::Invalid("signed with an unknown key"))
    }

    /// Fetches the keys if `why` allows it now; the set in use afterwards.
    async fn fetch(&self, why: Why<'_>) -> Option<Arc<KeySet>> {
        let mut attempts = self.attempts.lock().await;
        let now = Instant::now();
        let recently = |at: Option<Instant>, within: Duration| at.is_some_and(|t| now - t < within);
        let current = self.current();
        let skip = match why {
            Why::Missing => current.is_some() || recently(attempts.last, RETRY_AFTER_FAILURE),
            Why::Stale => {
                current
                    .as_ref()
                    .is_some_and(|s| now - s.fetched_at < self.refresh_after)
                    || recently(attempts.last, RETRY_AFTER_FAILURE)
            }
            Why::UnknownKid(kid) => {
                current.as_ref().is_some_and(|s| s.keys.contains_key(kid))
                    || recently(attempts.last_for_unknown_kid, self.refetch_interval)
            }
        };
        if skip {
            return current;
        }
        if matches!(why, Why::UnknownKid(_)) {
            attempts.last_for_unknown_kid = Some(now);
        }
        attempts.last = Some(now);
        match self.source.fetch(&self.tenant).await {
            Ok(found) => {
                let set = Arc::new(KeySet {
                    issuers: found.issuers,
                    keys: found.keys.into_iter().collect(),
                    fetched_at: Instant::now(),
                });
                tracing::info!(tenant = %self.tenant, keys = set.keys.len(), "caller token keys fetched");
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(set.clone());
                Some(set)
            }
            Err(error) => {
                tracing::warn!(tenant = %self.tenant, %error, cached = current.is_some(), "caller token keys could not be fetched");
                current
            }
        }
    }
}
