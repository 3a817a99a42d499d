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
    /// Only app-only tokens (client credentials), never a user's.
    pub app_only: bool,
}

/// What a caller rule asks of a client certificate (mTLS).
#[derive(Debug, Clone, Default)]
pub struct CertificateRequirement {
    /// Subject common names; any of them, looked at only when the
    /// certificate has no subject alternative name (RFC 6125 §6.4.4) or
    /// `common_name_with_sans` says so.
    pub common_names: Vec<String>,
    /// Subject alternative names, each of its own type; any of them.
    pub sans: Vec<SubjectName>,
    /// Match `common_names` even on a certificate that has SANs.
    pub common_name_with_sans: bool,
}

/// A typed subject alternative name: `dns:…`, `uri:…` or `email:…` in the
/// config. Typed so that a DNS name never matches a URI or an e-mail
/// address that happens to be spelt alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectName {
    /// A DNS name; compared without regard to ASCII case.
    Dns(String),
    /// A URI such as a SPIFFE id; compared exactly.
    Uri(String),
    /// An e-mail address (RFC 822 name); compared without regard to ASCII case.
    Email(String),
}

impl SubjectName {
    /// Parses `dns:…`, `uri:…` or `email:…`.
    pub fn parse(typed: &str) -> Option<Self> {
        let (kind, name) = typed.trim().split_once(':')?;
        let name = name.trim().to_owned();
        if name.is_empty() {
            return None;
        }
        match kind.to_ascii_lowercase().as_str() {
            "dns" => Some(Self::Dns(name)),
            "uri" => Some(Self::Uri(name)),
            "email" => Some(Self::Email(name)),
            _ => None,
        }
    }

    /// Whether `self` (the config's) names `other` (the certificate's).
    pub fn names(&self, other: &SubjectName) -> bool {
        match (self, other) {
            (Self::Dns(a), Self::Dns(b)) | (Self::Email(a), Self::Email(b)) => {
                a.eq_ignore_ascii_case(b)
            }
            (Self::Uri(a), Self::Uri(b)) => a == b,
            _ => false,
        }
    }
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

/// A caller's `token = { … }` table. A rule that names none of the lists
/// would admit every app and user of the accepted tenants; it is refused
/// unless `any_app = true` says that is meant.
pub(super) fn token_requirement(
    p: &mut Problems<'_>,
    key: &str,
    raw: RawTokenRequirement,
) -> TokenRequirement {
    let (any_app, app_only) = (raw.any_app == Some(true), raw.app_only == Some(true));
    let mut ids = |name: &str, list: Option<Vec<String>>| {
        guids(p, &format!("{key}.{name}"), list.unwrap_or_default())
    };
    let req = TokenRequirement {
        app_ids: ids("app_ids", raw.app_ids),
        object_ids: ids("object_ids", raw.object_ids),
        tenants: ids("tenants", raw.tenants),
        groups: ids("groups", raw.groups),
        roles: raw.roles.unwrap_or_default(),
        scopes: raw.scopes.unwrap_or_default(),
        app_only,
    };
    let narrowed = [
        &req.app_ids,
        &req.object_ids,
        &req.roles,
        &req.scopes,
        &req.groups,
    ]
    .iter()
    .any(|l| !l.is_empty());
    if !narrowed && !any_app {
        p.push(
            key,
            "admits a token of any app or user of the accepted tenants",
            "narrow it with app_ids, object_ids, roles, scopes or groups, or say any_app = true if that is meant",
        );
    }
    req
}

/// A caller's `client_certificate = { … }` table.
pub(super) fn certificate_requirement(
    p: &mut Problems<'_>,
    key: &str,
    raw: RawCertificateRequirement,
) -> CertificateRequirement {
    let mut sans = Vec::new();
    for typed in raw.sans.unwrap_or_default() {
        match SubjectName::parse(&typed) {
            Some(name) => sans.push(name),
            None => p.push(
                &format!("{key}.sans"),
                &format!("{typed:?} is not a typed subject alternative name"),
                "write each as dns:NAME, uri:URI or email:ADDRESS, e.g. \"uri:spiffe://cluster.local/ns/orders/sa/api\"",
            ),
        }
    }
    let req = CertificateRequirement {
        common_names: raw.common_names.unwrap_or_default(),
        sans,
        common_name_with_sans: raw.common_name_with_sans.unwrap_or(false),
    };
    if req.common_names.is_empty() && req.sans.is_empty() {
        p.push(
            key,
            "names no common_names or sans",
            "list the certificate subjects this caller presents, e.g. sans = [\"dns:orders.internal.example.com\"]",
        );
    }
    req
}

/// How a caller rule acts for its users: `impersonate = "none"` (the
/// application user), `"caller"` (the application user on behalf of the
/// token's user: `CallerObjectId`) or `"delegated"` (the user's own token,
/// by the on-behalf-of exchange).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActingMode {
    None,
    Caller,
    Delegated,
}

/// `impersonate` and `impersonate_apps` of a caller: what `act_as_caller`
/// holds (for `"caller"`), and whether the rule is `"delegated"`.
pub(super) fn act_as_caller(
    p: &mut Problems<'_>,
    key: &str,
    impersonate: Option<&str>,
    apps: Option<BTreeMap<String, String>>,
    has_token: bool,
) -> (Option<ActAsCaller>, bool) {
    let mode = match impersonate.map(str::trim) {
        None | Some("none") => ActingMode::None,
        Some("caller") => ActingMode::Caller,
        Some("delegated") => ActingMode::Delegated,
        Some(other) => {
            p.push(
                &format!("{key}.impersonate"),
                &format!("{other:?} is not \"caller\", \"delegated\" or \"none\""),
                "use impersonate = \"caller\" (CallerObjectId) or \"delegated\" (the user's own token) to act as the calling user",
            );
            ActingMode::None
        }
    };
    if mode != ActingMode::None && !has_token {
        p.push(
            &format!("{key}.impersonate"),
            "needs a token requirement: only a validated Entra ID token names the user",
            "add token = { … } to this caller",
        );
    }
    if mode != ActingMode::Caller && apps.is_some() {
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
    let caller = (mode == ActingMode::Caller).then_some(ActAsCaller { apps });
    (caller, mode == ActingMode::Delegated)
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
