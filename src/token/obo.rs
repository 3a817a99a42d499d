//! Acting as the user with the user's own token: the OAuth 2.0 on-behalf-of
//! flow (docs/dataverse.md, "On-behalf-of"). The caller's Entra ID token
//! (for the proxy's API) is exchanged, with the org's credential, for a
//! token of the same user for Dataverse (`{org}/user_impersonation`), so
//! Dataverse applies that user's roles and budget.
//!
//! Tokens are kept per presented assertion (its hash, with the tenant, the
//! user and the org), as MSAL keys its on-behalf-of cache: Entra evaluates
//! Conditional Access at each exchange, so another token of the same user
//! (without MFA, say) is exchanged on its own and never served the first
//! one's result. Entries are bounded in number, each kept until shortly
//! before it expires and never beyond the presenting token's `exp`; callers
//! presenting one assertion that miss together cost one exchange (moka's
//! `entry().or_try_insert_with`). A refused exchange is remembered briefly
//! for that assertion, so a refused user costs Entra one call per
//! [`REFUSAL_TTL`], not one per request. Nothing of a token is logged.

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use sha2::Digest;
use tokio::time::Instant;

use super::AccessToken;
use super::client::{self, EntraErrorBody, TokenError, TokenResponse};
use crate::config::CredentialConfig;

/// Most presented assertions whose exchanged tokens are kept at once.
const MAX_ASSERTIONS: u64 = 10_000;

/// How long a refused exchange (or Dataverse's refusal of a freshly
/// exchanged token) is answered from memory for that assertion.
pub const REFUSAL_TTL: Duration = Duration::from_secs(30);

/// How long Entra being unreachable is answered from memory for an
/// assertion: as short as the `Retry-After` a lane's failing fetch gives.
pub const UNAVAILABLE_TTL: Duration = Duration::from_secs(5);

/// The grant type of the exchange (RFC 7523).
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// A caller's validated user token, and who it names.
pub struct UserAssertion<'a> {
    /// The caller's token as it came (the assertion); never forwarded.
    pub token: &'a str,
    pub tenant: &'a str,
    pub object_id: &'a str,
    /// The caller token's `exp` (Unix seconds).
    pub expires_at: u64,
}

/// Why no token could be had for the user. Each becomes its own error
/// code at the boundary; Entra's own description goes to the log only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OboError {
    /// AADSTS65001: nobody consented to the proxy's delegated permission.
    #[error("the tenant has not consented to the proxy acting for its users")]
    ConsentRequired,
    /// The caller's token cannot be exchanged (expired, revoked, wrong audience).
    #[error("the caller's token can no longer be exchanged")]
    InvalidGrant,
    /// Conditional Access or MFA wants more of the user's sign-in; `claims`
    /// is the challenge to pass back (RFC 6750 `insufficient_claims`).
    #[error("Conditional Access requires a new sign-in of the user")]
    ClaimsChallenge {
        claims: String,
        /// Where the client signs the user in again (the tenant's
        /// authorize endpoint).
        authorization_uri: String,
    },
    /// Dataverse refused the user's token right after it was exchanged
    /// (the user disabled in the org, or without access to it).
    #[error("Dataverse refused the user's freshly exchanged token")]
    RefusedByDataverse,
    /// Entra ID unreachable, or it failed: try again later.
    #[error("Entra ID could not exchange the token: {detail}")]
    Unavailable { detail: String },
}

/// An exchange that gave no token, and when asking again may help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reason: OboError,
    /// What is left of the refusal's time in memory.
    pub retry_after: Duration,
}

/// A refusal as remembered: the reason and when it is forgotten.
#[derive(Clone)]
struct Remembered {
    reason: OboError,
    until: Instant,
}

/// A token handed out, and whether this call exchanged it (a waiter on
/// another caller's exchange, or a cache hit, did not).
pub struct Exchanged {
    pub token: Arc<AccessToken>,
    pub fresh: bool,
}

impl OboError {
    /// A short, stable name of the failure (a span's `error.type`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ConsentRequired => "consent_required",
            Self::InvalidGrant => "invalid_grant",
            Self::ClaimsChallenge { .. } => "insufficient_claims",
            Self::RefusedByDataverse => "user_token_refused",
            Self::Unavailable { .. } => "token_exchange_unavailable",
        }
    }

    /// How long the refusal is answered without asking Entra again.
    fn remembered_for(&self) -> Duration {
        match self {
            Self::Unavailable { .. } => UNAVAILABLE_TTL,
            _ => REFUSAL_TTL,
        }
    }
}

/// The on-behalf-of exchanges of one proxy.
pub struct OnBehalfOf {
    http: reqwest::Client,
    tokens: moka::future::Cache<[u8; 32], Arc<AccessToken>>,
    refusals: moka::future::Cache<[u8; 32], Remembered>,
}

impl OnBehalfOf {
    pub fn new(http: reqwest::Client) -> Self {
        Self {
            http,
            tokens: moka::future::Cache::builder()
                .max_capacity(MAX_ASSERTIONS)
                .expire_after(super::ServeUntil)
                .build(),
            refusals: moka::future::Cache::builder()
                .max_capacity(MAX_ASSERTIONS)
                .time_to_live(REFUSAL_TTL)
                .build(),
        }
    }

    /// The user's token for `org` (scope `{org}/user_impersonation`),
    /// exchanged with `credential` for this very assertion, from the cache
    /// while it serves; a recent refusal of the assertion answers at once.
    pub async fn token(
        &self,
        credential: &Arc<CredentialConfig>,
        org: &str,
        user: &UserAssertion<'_>,
    ) -> Result<Exchanged, Refused> {
        let key = key(user, org);
        if let Some(refused) = self.remembered(&key).await {
            return Err(refused);
        }
        if let Some(t) = self.tokens.get(&key).await {
            if Instant::now() < t.serve_until {
                return Ok(Exchanged {
                    token: t,
                    fresh: false,
                });
            }
            self.tokens.invalidate(&key).await;
        }
        let span = tracing::info_span!(
            "token on-behalf-of",
            otel.name = "token on-behalf-of",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            http.request.method = "POST",
            dataverse.credential = %credential.name,
            error.type = tracing::field::Empty,
        );
        let fetch =
            tracing::Instrument::instrument(self.exchange(credential, org, user), span.clone());
        match self.tokens.entry(key).or_try_insert_with(fetch).await {
            Ok(entry) => Ok(Exchanged {
                fresh: entry.is_fresh(),
                token: entry.into_value(),
            }),
            Err(e) => {
                span.record("error.type", e.kind());
                span.record("otel.status_code", "ERROR");
                Err(self.remember(key, (*e).clone()).await)
            }
        }
    }

    /// Drops the user's token for `org`: Dataverse refused it (401), and
    /// it was not freshly exchanged, so it may have been revoked since.
    pub async fn invalidate(&self, org: &str, user: &UserAssertion<'_>) {
        self.tokens.invalidate(&key(user, org)).await;
    }

    /// Dataverse refused a token exchanged for this very request: the user
    /// cannot use the org, and asking Entra again would not change that
    /// before [`REFUSAL_TTL`].
    pub async fn refused_by_dataverse(&self, org: &str, user: &UserAssertion<'_>) {
        let key = key(user, org);
        self.tokens.invalidate(&key).await;
        self.remember(key, OboError::RefusedByDataverse).await;
    }

    async fn remembered(&self, key: &[u8; 32]) -> Option<Refused> {
        let r = self.refusals.get(key).await?;
        let left = r.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            self.refusals.invalidate(key).await;
            return None;
        }
        Some(Refused {
            reason: r.reason,
            retry_after: left,
        })
    }

    async fn remember(&self, key: [u8; 32], reason: OboError) -> Refused {
        let retry_after = reason.remembered_for();
        let until = Instant::now() + retry_after;
        self.refusals
            .insert(
                key,
                Remembered {
                    reason: reason.clone(),
                    until,
                },
            )
            .await;
        Refused {
            reason,
            retry_after,
        }
    }

    async fn exchange(
        &self,
        credential: &CredentialConfig,
        org: &str,
        user: &UserAssertion<'_>,
    ) -> Result<Arc<AccessToken>, OboError> {
        let (Some(url), Some(client_id)) = (&credential.token_url, &credential.client_id) else {
            return Err(unavailable("the org's credential has no token endpoint"));
        };
        let mut form: Vec<(&str, SecretString)> = vec![
            ("grant_type", JWT_BEARER_GRANT.into()),
            ("requested_token_use", "on_behalf_of".into()),
            ("assertion", user.token.into()),
            ("scope", format!("{org}/user_impersonation").into()),
        ];
        form.extend(
            client::client_auth(credential, client_id, url)
                .map_err(|e| unavailable(&e.to_string()))?,
        );
        let (status, body) = client::post_form(&self.http, url, &form)
            .await
            .map_err(|e| unavailable(&e.to_string()))?;
        let resp = classify(status, &body, url)?;
        let now = Instant::now();
        let mut token = AccessToken::new(resp, now).map_err(|e| unavailable(&e.to_string()))?;
        // Never beyond the caller token's own expiry.
        let left = user.expires_at.saturating_sub(unix_now());
        token.serve_until = token.serve_until.min(now + Duration::from_secs(left));
        Ok(Arc::new(token))
    }
}

/// The cache key: the presented assertion itself, the user (tenant, oid)
/// and the org, hashed, so only identical assertions share an entry.
fn key(user: &UserAssertion<'_>, org: &str) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    for part in [user.tenant, user.object_id, org, user.token] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

/// A token answer, or what its error means for the caller.
fn classify(status: u16, body: &[u8], token_url: &url::Url) -> Result<TokenResponse, OboError> {
    if (200..300).contains(&status) {
        return client::parse_response(status, body).map_err(|e| unavailable(&e.to_string()));
    }
    let Ok(e) = serde_json::from_slice::<EntraErrorBody>(body) else {
        return Err(unavailable(&format!(
            "HTTP {status} without an OAuth2 error"
        )));
    };
    let detail = || {
        TokenError::Entra {
            status,
            error: e.error.clone(),
            codes: e.error_codes.clone(),
            description: e
                .error_description
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        }
        .to_string()
    };
    tracing::warn!(error = %detail(), "the on-behalf-of exchange was refused");
    if e.error_codes.contains(&65001) {
        return Err(OboError::ConsentRequired);
    }
    match (e.error.as_str(), &e.claims) {
        ("interaction_required", Some(claims)) if !claims.is_empty() => {
            Err(OboError::ClaimsChallenge {
                claims: claims.clone(),
                authorization_uri: authorize_endpoint(token_url),
            })
        }
        ("invalid_grant" | "interaction_required", _) => Err(OboError::InvalidGrant),
        // The proxy's own credential refused, or Entra failing: not the
        // caller's doing; it may pass.
        _ => Err(unavailable(&detail())),
    }
}

/// The authorize endpoint beside a token endpoint (`…/oauth2/v2.0/token`
/// → `…/oauth2/v2.0/authorize`).
fn authorize_endpoint(token_url: &url::Url) -> String {
    let url = token_url.as_str();
    match url.strip_suffix("/token") {
        Some(base) => format!("{base}/authorize"),
        None => url.to_owned(),
    }
}

fn unavailable(detail: &str) -> OboError {
    OboError::Unavailable {
        detail: detail.to_owned(),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
