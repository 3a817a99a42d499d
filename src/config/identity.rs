//! `[caller_tokens]` and what a `[[callers]]` rule asks of a caller's Entra
//! ID token or client certificate, and whether it acts as the calling user.

use std::collections::BTreeMap;

use super::*;

/// `[caller_tokens]`: Entra ID access tokens as caller credentials.
#[derive(Debug, Clone)]
pub struct CallerTokens {
    /// Accepted `aud` values: the proxy's Application ID URI and client id.
    pub audiences: Vec<String>,
    /// Tenant ids whose tokens are accepted.
    pub tenants: Vec<String>,
    /// The Entra ID authority host; discovery is `{host}/{tenant}/v2.0/.well-known/openid-configuration`.
    pub authority: Url,
    /// Allowed clock difference for `exp` and `nbf`.
    pub clock_skew: Duration,
    /// Least time between two key refetches caused by an unknown `kid`.
    pub key_refetch_interval: Duration,
    /// Age after which the keys are refreshed in the background.
    pub key_refresh: Duration,
}

/// What a caller rule asks of an Entra ID token. Every non-empty list must
/// have at least one of its values in the token.
#[derive(Debug, Clone, Default)]
pub struct TokenRequirement {
    /// Client ids of the calling app (`appid` / `azp`).
    pub app_ids: Vec<String>,
    /// Object ids (`oid`) of users or service principals.
    pub object_ids: Vec<String>,
    /// Tenants (`tid`), a subset of `[caller_tokens] tenants`.
    pub tenants: Vec<String>,
    /// App roles (`roles`).
    pub roles: Vec<String>,
    /// Delegated scopes (`scp`).
    pub scopes: Vec<String>,
    /// Group object ids (`groups`).
    pub groups: Vec<String>,
}

/// What a caller rule asks of a client certificate (mTLS).
#[derive(Debug, Clone, Default)]
pub struct CertificateRequirement {
    /// Subject common names; any of them.
    pub common_names: Vec<String>,
    /// Subject alternative names (DNS names, URIs such as SPIFFE ids,
    /// e-mail addresses); any of them.
    pub sans: Vec<String>,
}

/// Acting as the calling user (`impersonate = "caller"`).
#[derive(Debug, Clone, Default)]
pub struct ActAsCaller {
    /// App-only tokens act as these users: client id → user object id.
    /// Other app tokens never match the rule.
    pub apps: BTreeMap<String, String>,
}

/// `[caller_tokens]`, if given.
pub(super) fn caller_tokens(
    p: &mut Problems<'_>,
    raw: Option<RawCallerTokens>,
) -> Option<CallerTokens> {
    let raw = raw?;
    let audiences = raw.audiences.unwrap_or_default();
    if audiences.is_empty() {
        p.push(
            "caller_tokens.audiences",
            "is empty",
            "list the proxy's Application ID URI and client id, e.g. [\"api://dataverse-proxy\", \"<client id>\"]",
        );
    }
    let tenants = guids(p, "caller_tokens.tenants", raw.tenants.unwrap_or_default());
    if tenants.is_empty() {
        p.push(
            "caller_tokens.tenants",
            "is empty",
            "list the tenant (directory) ids whose tokens are accepted",
        );
    }
    let host = raw
        .authority_host
        .unwrap_or_else(|| "https://login.microsoftonline.com".to_owned());
    let authority = p.url("caller_tokens.authority_host", &host)?;
    Some(CallerTokens {
        audiences,
        tenants,
        authority,
        clock_skew: p.duration(
            "caller_tokens.clock_skew",
            raw.clock_skew.as_deref(),
            Duration::from_secs(60),
        ),
        key_refetch_interval: p.nonzero_duration(
            "caller_tokens.key_refetch_interval",
            raw.key_refetch_interval.as_deref(),
            Duration::from_secs(300),
        ),
        key_refresh: p.duration(
            "caller_tokens.key_refresh",
            raw.key_refresh.as_deref(),
            Duration::from_secs(24 * 3600),
        ),
    })
}

/// A caller's `token = { … }` table.
pub(super) fn token_requirement(
    p: &mut Problems<'_>,
    key: &str,
    raw: RawTokenRequirement,
) -> TokenRequirement {
    TokenRequirement {
        app_ids: guids(
            p,
            &format!("{key}.app_ids"),
            raw.app_ids.unwrap_or_default(),
        ),
        object_ids: guids(
            p,
            &format!("{key}.object_ids"),
            raw.object_ids.unwrap_or_default(),
        ),
        tenants: guids(
            p,
            &format!("{key}.tenants"),
            raw.tenants.unwrap_or_default(),
        ),
        roles: raw.roles.unwrap_or_default(),
        scopes: raw.scopes.unwrap_or_default(),
        groups: guids(p, &format!("{key}.groups"), raw.groups.unwrap_or_default()),
    }
}

/// A caller's `client_certificate = { … }` table.
pub(super) fn certificate_requirement(
    p: &mut Problems<'_>,
    key: &str,
    raw: RawCertificateRequirement,
) -> CertificateRequirement {
    let req = CertificateRequirement {
        common_names: raw.common_names.unwrap_or_default(),
        sans: raw.sans.unwrap_or_default(),
    };
    if req.common_names.is_empty() && req.sans.is_empty() {
        p.push(
            key,
            "names no common_names or sans",
            "list the certificate subjects this caller presents, e.g. sans = [\"orders.internal.example.com\"]",
        );
    }
    req
}

/// `impersonate` and `impersonate_apps` of a caller.
pub(super) fn act_as_caller(
    p: &mut Problems<'_>,
    key: &str,
    impersonate: Option<&str>,
    apps: Option<BTreeMap<String, String>>,
    has_token: bool,
) -> Option<ActAsCaller> {
    let wanted = match impersonate.map(str::trim) {
        None | Some("none") => false,
        Some("caller") => true,
        Some(other) => {
            p.push(
                &format!("{key}.impersonate"),
                &format!("{other:?} is not \"caller\" or \"none\""),
                "use impersonate = \"caller\" to act as the calling user",
            );
            false
        }
    };
    if wanted && !has_token {
        p.push(
            &format!("{key}.impersonate"),
            "needs a token requirement: only a validated Entra ID token names the user",
            "add token = { … } to this caller",
        );
    }
    if !wanted && apps.is_some() {
        p.push(
            &format!("{key}.impersonate_apps"),
            "is set without impersonate = \"caller\"",
            "set impersonate = \"caller\" or remove impersonate_apps",
        );
    }
    let apps = apps.unwrap_or_default();
    for (app, user) in &apps {
        for (what, id) in [("client id", app), ("user object id", user)] {
            if Uuid::parse_str(id).is_err() {
                p.push(
                    &format!("{key}.impersonate_apps"),
                    &format!("{id:?} is not a {what} (a GUID)"),
                    "map app client ids to user object ids: { \"<client id>\" = \"<object id>\" }",
                );
            }
        }
    }
    wanted.then_some(ActAsCaller { apps })
}

/// A list of GUIDs, lower-cased.
fn guids(p: &mut Problems<'_>, key: &str, list: Vec<String>) -> Vec<String> {
    let mut out = Vec::new();
    for v in list {
        match Uuid::parse_str(v.trim()) {
            Ok(id) => out.push(id.to_string()),
            Err(_) => p.push(
                key,
                &format!("{v:?} is not a GUID"),
                "use ids such as \"7f3c8a2e-1b4d-4c6a-9e21-5d8f0a3b6c11\"",
            ),
        }
    }
    out
}
