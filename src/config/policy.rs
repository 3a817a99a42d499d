//! The per-org access policy and the callers, as configured: plain data.
//! What they decide is in the `policy` and `callers` modules (the domain layer).

use std::sync::Arc;

use http::Method;

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
    /// Privileged headers this caller may send (lower-case), where the org
    /// policy allows them too.
    pub privileged: Vec<String>,
}

/// Caller identification settings ([[callers]] and [access]).
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Known callers.
    pub callers: Vec<Caller>,
    /// Every client must come from these; empty: anywhere.
    pub allow_cidrs: Vec<ipnet::IpNet>,
    /// Every request needs a known API key (true when any caller has a key).
    pub require_key: bool,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}
