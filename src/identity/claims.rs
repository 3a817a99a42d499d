//! The claims of v1 and v2 Entra ID access tokens, and the [`Principal`]
//! they name.

use base64::Engine;
use jsonwebtoken::errors::{Error, ErrorKind};
use serde::Deserialize;

use super::TokenError;

/// Who a valid caller token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Tenant id (`tid`).
    pub tenant: String,
    /// The calling app's client id (`appid` in v1, `azp` in v2).
    pub app_id: String,
    /// Object id (`oid`) of the user, or of the app's service principal.
    pub object_id: String,
    /// A signed-in user (a delegated token), not an app acting alone.
    pub is_user: bool,
    /// App roles (`roles`).
    pub roles: Vec<String>,
    /// Delegated scopes (`scp`, space-separated in the token).
    pub scopes: Vec<String>,
    /// Group object ids (`groups`).
    pub groups: Vec<String>,
    /// When the token expires (`exp`, Unix seconds): nothing obtained with
    /// it (an on-behalf-of token) is kept longer.
    pub expires_at: u64,
}

impl Principal {
    /// Who this is among the callers of one rule: the user's object id for
    /// a user's token, the app's client id for an app's (its flow, quota
    /// bucket and cap are its own).
    pub fn flow_id(&self) -> &str {
        if self.is_user {
            &self.object_id
        } else {
            &self.app_id
        }
    }
}

/// The two claims read before the signature is checked, to choose the
/// tenant's keys. Nothing else is trusted from them.
#[derive(Deserialize)]
pub(super) struct Unverified {
    pub(super) tid: String,
    pub(super) iss: String,
    /// `1.0` or `2.0`: which of the tenant's issuers `iss` must be.
    pub(super) ver: Option<String>,
}

impl Unverified {
    pub(super) fn peek(token: &str) -> Result<Self, TokenError> {
        let payload = token
            .split('.')
            .nth(1)
            .ok_or(TokenError::Invalid("not a JWT"))?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Invalid("not a JWT"))?;
        serde_json::from_slice(&bytes).map_err(|_| TokenError::Invalid("no tid or iss claim"))
    }
}

/// The claims the proxy uses, of either token version.
#[derive(Deserialize)]
pub(super) struct TokenClaims {
    tid: String,
    oid: Option<String>,
    /// v1: the calling app.
    appid: Option<String>,
    /// v2: the calling app.
    azp: Option<String>,
    scp: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    /// The optional `idtyp` claim: `app` or `user`.
    idtyp: Option<String>,
    /// Checked by the validation already; kept for what the token yields.
    #[serde(default)]
    exp: u64,
}

impl TokenClaims {
    /// The principal; a token without `oid` or an app id is refused.
    ///
    /// A token is a user's when it carries delegated scopes (`scp`), unless
    /// `idtyp` says `app`: app-only tokens never carry `scp`.
    pub(super) fn into_principal(self) -> Result<Principal, TokenError> {
        let app_id = self
            .azp
            .or(self.appid)
            .ok_or(TokenError::Invalid("no appid or azp claim"))?;
        let object_id = self.oid.ok_or(TokenError::Invalid("no oid claim"))?;
        let is_user = match self.idtyp.as_deref() {
            Some("app") => false,
            Some("user") => true,
            _ => self.scp.is_some(),
        };
        Ok(Principal {
            tenant: self.tid.to_ascii_lowercase(),
            app_id: app_id.to_ascii_lowercase(),
            object_id: object_id.to_ascii_lowercase(),
            is_user,
            roles: self.roles,
            scopes: self
                .scp
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            groups: self.groups.iter().map(|g| g.to_ascii_lowercase()).collect(),
            expires_at: self.exp,
        })
    }
}

/// A short reason for the log (never sent to the caller).
pub(super) fn reason(e: &Error) -> &'static str {
    match e.kind() {
        ErrorKind::ExpiredSignature => "expired",
        ErrorKind::ImmatureSignature => "not yet valid (nbf)",
        ErrorKind::InvalidAudience => "the audience is not the proxy's",
        ErrorKind::InvalidIssuer => "the issuer is not the tenant's",
        ErrorKind::InvalidSignature => "the signature does not verify",
        ErrorKind::InvalidAlgorithm => "the algorithm is not RS256",
        ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
        _ => "malformed",
    }
}
