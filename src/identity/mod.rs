//! Caller tokens: Entra ID access tokens that callers present to prove who
//! they are (`Authorization: Bearer …` with the proxy's own API as audience).
//!
//! A token is accepted only when all of these hold (docs/security.md,
//! "Caller tokens"):
//!
//! - its header names RS256 and a key id: the algorithm is fixed by the
//!   keys Entra ID publishes, never taken from the token, so `none` and
//!   HS256 signed with the public key as secret are refused before any
//!   cryptography;
//! - its tenant (`tid`) is configured, and `iss` is the issuer that
//!   tenant's discovery document names for v1 (`sts.windows.net/{tid}/`) or
//!   v2 (`login.microsoftonline.com/{tid}/v2.0`) tokens;
//! - it is signed by a key of that tenant's JWKS ([`keys`]);
//! - `aud` is one of the configured audiences, and `exp` / `nbf` hold
//!   within the clock skew.
//!
//! jsonwebtoken does the signature and claim checks; this module chooses
//! the key and the rules. What a caller rule then asks of the
//! [`Principal`] (app ids, roles, scopes, groups) is decided where callers
//! are admitted.

mod claims;
mod keys;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use jsonwebtoken::{Algorithm, Validation};

use crate::config::CallerTokens;

pub use claims::Principal;
pub use keys::{Discovered, HttpKeySource, KeySource, Version};

/// Why a caller token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token is not valid (401 `invalid_token`); the reason is logged,
    /// never sent.
    #[error("the caller token is not valid: {0}")]
    Invalid(&'static str),
    /// No signing keys could be fetched for the token's tenant (503): a
    /// token is never admitted unverified.
    #[error("no signing keys for caller tokens could be fetched")]
    KeysUnavailable,
}

/// Verifies caller tokens against the configured tenants' published keys.
pub struct Verifier {
    config: CallerTokens,
    keys: keys::KeyStore,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("tenants", &self.config.tenants)
            .field("audiences", &self.config.audiences)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier fetching keys through `source`.
    pub fn new(config: CallerTokens, source: Arc<dyn KeySource>) -> Self {
        let keys = keys::KeyStore::new(&config, source);
        Self { config, keys }
    }

    /// Fetches every tenant's keys (at start-up, so the first caller does
    /// not wait); failures are logged and retried on demand.
    pub async fn prefetch(&self) {
        self.keys.prefetch().await;
    }

    /// The principal a valid token stands for.
    pub async fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid("not a JWT"))?;
        if header.alg != Algorithm::RS256 {
            return Err(TokenError::Invalid("the algorithm is not RS256"));
        }
        let kid = header.kid.ok_or(TokenError::Invalid("no key id (kid)"))?;
        let unverified = claims::Unverified::peek(token)?;
        let tenant = self
            .config
            .tenants
            .iter()
            .find(|t| t.eq_ignore_ascii_case(&unverified.tid))
            .ok_or(TokenError::Invalid("the tenant is not allowed"))?;
        let tenant_keys = self.keys.tenant(tenant)?;
        let version = match unverified.ver.as_deref() {
            Some("1.0") => Some(keys::Version::V1),
            Some("2.0") => Some(keys::Version::V2),
            Some(_) => return Err(TokenError::Invalid("an unknown token version")),
            None => None,
        };
        let (issuer, key) = tenant_keys.key_for(&unverified.iss, version, &kid).await?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = self.config.clock_skew.as_secs();
        validation.validate_nbf = true;
        validation.set_audience(&self.config.audiences);
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "aud", "iss"]);
        let data = jsonwebtoken::decode::<claims::TokenClaims>(token, &key, &validation)
            .map_err(|e| TokenError::Invalid(claims::reason(&e)))?;
        data.claims.into_principal()
    }
}
