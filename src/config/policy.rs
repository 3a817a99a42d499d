//! The per-org access policy and the callers, as configured: plain data.
//! What they decide is in the `policy` and `callers` modules (the domain layer).

use std::sync::Arc;

use http::Method;

use super::Problems;
use super::raw::RawPolicy;

/// The methods of the Dataverse Web API (docs/dataverse.md, "The Web API"):
/// the only ones the proxy forwards; a policy can only narrow this set.
pub const WEB_API_METHODS: [Method; 6] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PATCH,
    Method::PUT,
    Method::DELETE,
];

/// Headers that switch off Dataverse's own logic with the application
/// user's privileges, lower-case (docs/dataverse.md, "Impersonation and
/// privileged headers").
pub const PRIVILEGED_HEADERS: [&str; 3] = [
    "mscrm.bypasscustompluginexecution",
    "mscrm.bypassbusinesslogicexecution",
    "mscrm.suppresscallbackregistrationexpanderjob",
];

/// What to do with `CallerObjectId` / `MSCRMCallerID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Impersonation {
    /// Never forwarded (default).
    Drop,
    /// Forwarded as sent.
    Allow,
    /// Forwarded only with one of these values (Entra object ids or systemuser ids).
    Only(Vec<String>),
}

/// The access policy of an org.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Only GET and HEAD (and `$batch` of GETs).
    pub read_only: bool,
    /// Allowed methods; empty: every method the proxy forwards.
    pub methods: Vec<Method>,
    /// Allowed resources (first segment: entity set, function, action),
    /// lower-case; empty: all.
    pub allow: Vec<String>,
    /// Denied resources, lower-case.
    pub deny: Vec<String>,
    /// Whether `$metadata` may be read.
    pub metadata: bool,
    /// Impersonation headers.
    pub impersonation: Impersonation,
    /// Privileged headers (lower-case names of [`PRIVILEGED_HEADERS`]) that
    /// may reach Dataverse; empty: none.
    pub privileged: Vec<String>,
    /// `$batch` bodies are buffered up to this to be checked.
    pub batch_buffer: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            read_only: false,
            methods: Vec::new(),
            allow: Vec::new(),
            deny: Vec::new(),
            metadata: true,
            impersonation: Impersonation::Drop,
            privileged: Vec::new(),
            batch_buffer: 16 << 20,
        }
    }
}

/// One known caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Name used in logs and metrics.
    pub name: Arc<str>,
    /// SHA-256 of its API key.
    pub key_sha256: Option<[u8; 32]>,
    /// Where it may connect from; empty: anywhere the global list allows.
    pub cidrs: Vec<ipnet::IpNet>,
    /// Orgs it may use; empty: all.
    pub orgs: Vec<String>,
    /// Only reads.
    pub read_only: bool,
    /// Requests per second at most (burst of the same size); `None`: no quota.
    pub requests_per_second: Option<f64>,
    /// Power Platform requests per UTC day at most; `None`: no budget.
    pub daily_requests: Option<u64>,
    /// Its share of a contended org relative to other callers (1..=100).
    pub weight: u32,
    /// Its requests in flight at most, per replica and org (token callers:
    /// per principal).
    pub max_concurrency: Option<usize>,
    /// The lanes (credential names) its requests may take; empty: any.
    pub lanes: Vec<String>,
    /// Privileged headers this caller may send (lower-case), where the org
    /// policy allows them too.
    pub privileged: Vec<String>,
    /// Recognised by an Entra ID token that meets this.
    pub token: Option<super::TokenRequirement>,
    /// Recognised by a client certificate that meets this.
    pub certificate: Option<super::CertificateRequirement>,
    /// Acts as the calling user (`CallerObjectId`).
    pub act_as_caller: Option<super::ActAsCaller>,
    /// `impersonate = "delegated"`: the user's own token (on-behalf-of);
    /// app-only tokens are refused.
    pub delegated: bool,
}

/// Caller identification settings ([[callers]] and [access]).
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Known callers.
    pub callers: Vec<Caller>,
    /// Every client must come from these; empty: anywhere.
    pub allow_cidrs: Vec<ipnet::IpNet>,
    /// Every request needs a credential (API key, token or certificate) of
    /// a known caller (true when any caller is recognised by one).
    pub require_credential: bool,
    /// Entra ID tokens as caller credentials.
    pub caller_tokens: Option<super::CallerTokens>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl Access {
    /// Who is admitted and with what, one line per caller rule and one for
    /// everyone else: what `check` prints and the start-up log says.
    pub fn summary(&self) -> Vec<String> {
        let mut lines: Vec<String> = self.callers.iter().map(describe_caller).collect();
        let sources = if self.allow_cidrs.is_empty() {
            String::new()
        } else {
            format!(" (only from {})", join(&self.allow_cidrs))
        };
        lines.push(if self.callers.is_empty() {
            format!("every caller{sources}: admitted with the application user's full rights (no [[callers]] rule)")
        } else if self.require_credential {
            "any other caller: refused (a credential of a rule above is required)".to_owned()
        } else {
            "any other caller: refused (no rule above names its address)".to_owned()
        });
        lines
    }
}

fn describe_caller(c: &Caller) -> String {
    let mut by = Vec::new();
    if c.key_sha256.is_some() {
        by.push("an API key".to_owned());
    }
    if c.token.is_some() {
        by.push("an Entra ID token".to_owned());
    }
    if c.certificate.is_some() {
        by.push("a client certificate".to_owned());
    }
    if by.is_empty() {
        by.push(format!("its address in {}", join(&c.cidrs)));
    } else if !c.cidrs.is_empty() {
        by.push(format!("from {}", join(&c.cidrs)));
    }
    let mut rights = vec![
        if c.read_only {
            "read-only"
        } else {
            "read and write"
        }
        .to_owned(),
    ];
    if !c.orgs.is_empty() {
        rights.push(format!("orgs {}", c.orgs.join(", ")));
    }
    if !c.lanes.is_empty() {
        rights.push(format!("lanes {}", c.lanes.join(", ")));
    }
    if c.delegated {
        rights.push("as the user, with the user's own token".to_owned());
    } else if c.act_as_caller.is_some() {
        rights.push("as the calling user".to_owned());
    }
    if let Some(rps) = c.requests_per_second {
        rights.push(format!("{rps} requests/s"));
    }
    if let Some(n) = c.max_concurrency {
        rights.push(format!("{n} at once"));
    }
    if !c.privileged.is_empty() {
        rights.push(format!("privileged headers {}", c.privileged.join(", ")));
    }
    format!(
        "caller {:?}: by {}; {}",
        c.name,
        by.join(" "),
        rights.join(", ")
    )
}

fn join(nets: &[ipnet::IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Validates an org's access policy.
pub(super) fn validate_policy(p: &mut Problems<'_>, key: &str, r: RawPolicy) -> Policy {
    let mut methods = Vec::new();
    for m in r.methods.unwrap_or_default() {
        match http::Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes()) {
            Ok(method) if WEB_API_METHODS.contains(&method) => methods.push(method),
            _ => p.push(
                &format!("{key}.methods"),
                &format!("{m:?} is not a Web API method"),
                "list some of GET, HEAD, POST, PATCH, PUT, DELETE (the policy can only narrow these)",
            ),
        }
    }
    let lower = |v: Option<Vec<String>>| -> Vec<String> {
        v.unwrap_or_default()
            .into_iter()
            .map(|s| s.trim().to_ascii_lowercase())
            .collect()
    };
    let impersonation = match r.impersonation {
        None => Impersonation::Drop,
        Some(list) => match list.as_slice() {
            [one] if one.eq_ignore_ascii_case("drop") => Impersonation::Drop,
            [one] if one.eq_ignore_ascii_case("allow") => Impersonation::Allow,
            ids => Impersonation::Only(ids.iter().map(|s| s.trim().to_owned()).collect()),
        },
    };
    Policy {
        read_only: r.read_only.unwrap_or(false),
        methods,
        allow: lower(r.allow),
        deny: lower(r.deny),
        metadata: r.metadata.unwrap_or(true),
        impersonation,
        privileged: privileged_headers(
            p,
            &format!("{key}.privileged_headers"),
            r.privileged_headers,
        ),
        batch_buffer: p.size(
            &format!("{key}.batch_buffer"),
            r.batch_buffer.as_deref(),
            16 << 20,
        ),
    }
}

/// Validates a list of privileged header names; lower-case.
pub(super) fn privileged_headers(
    p: &mut Problems<'_>,
    key: &str,
    list: Option<Vec<String>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for name in list.unwrap_or_default() {
        let lower = name.trim().to_ascii_lowercase();
        if PRIVILEGED_HEADERS.contains(&lower.as_str()) {
            out.push(lower);
        } else {
            p.push(
                key,
                &format!("{name:?} is not a privileged Dataverse header"),
                "list some of MSCRM.BypassCustomPluginExecution, MSCRM.BypassBusinessLogicExecution, \
                 MSCRM.SuppressCallbackRegistrationExpanderJob",
            );
        }
    }
    out
}
