//! Who may call the proxy, and what reaches Dataverse for them.
//!
//! Everyone who reaches the proxy acts with the application user's rights,
//! so the proxy decides:
//!
//! - **callers** (optional): API keys stored as SHA-256 hashes, each with a
//!   name used in logs and metrics, an optional source CIDR list, optional
//!   org list, read-only flag and request-rate quota; a global source
//!   allow-list; `X-Forwarded-For` believed only from trusted proxies;
//! - **policy** per org: allowed methods, a read-only switch, allowed and
//!   denied entity sets / functions / actions, `$metadata` on or off,
//!   impersonation headers dropped, allowed, or allowed for listed ids;
//!   privileged headers (`MSCRM.Bypass*`, `MSCRM.SuppressCallback*`)
//!   dropped unless listed (and, where callers are configured, listed for
//!   the caller too). `$batch` bodies are buffered (under a cap) and read
//!   strictly ([`crate::batch`]): every operation is checked against the same
//!   policy and loses the headers the top level would lose, so a batch is
//!   no bypass.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use sha2::Digest;
use tokio::time::Instant;

use crate::batch::{self, BatchError, Operation, Target};
use crate::error::ProxyError;
use crate::proxy::headers::{self, names};

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
    /// Privileged headers (lower-case names of [`names::PRIVILEGED`]) that
    /// may reach Dataverse; empty: none.
    pub privileged: Vec<String>,
    /// `$batch` bodies are buffered up to this to be checked.
    pub batch_buffer: usize,
}

/// What the `$batch` check needs to know besides the body.
#[derive(Debug, Clone, Copy)]
pub struct BatchContext<'a> {
    /// The service root the batch was sent to, e.g. `/api/data/v9.2`.
    pub service_root: &'a str,
    /// Bases an absolute operation URL may start with (the org's origins
    /// and the proxy's public base), lower-case, no trailing slash.
    pub origins: &'a [String],
    /// The caller is read-only.
    pub caller_read_only: bool,
    /// The caller's own privileged-header grants; `None` when no callers
    /// are configured (the org policy alone decides).
    pub caller_privileged: Option<&'a [String]>,
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

/// The resource a Web API path addresses: the first segment after
/// `/api/data/vX.Y/`, decoded, without its key or parentheses, lower-case.
pub fn resource(api_path: &str) -> Option<std::borrow::Cow<'_, str>> {
    let rest = api_path.strip_prefix("/api/data/")?;
    let (_, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let first = rest.split(['/', '?']).next().unwrap_or("");
    let plain = first.split('(').next().unwrap_or("");
    if !plain.bytes().any(|b| b == b'%' || b.is_ascii_uppercase()) {
        // The usual case: nothing to decode or fold, no allocation.
        return Some(plain.into());
    }
    let decoded = percent_encoding::percent_decode_str(first).decode_utf8_lossy();
    let name = decoded.split('(').next().unwrap_or("");
    Some(name.to_ascii_lowercase().into())
}

impl Policy {
    /// True when the policy restricts anything a `$batch` could bypass.
    pub fn restricts(&self, caller_read_only: bool) -> bool {
        caller_read_only
            || self.read_only
            || !self.methods.is_empty()
            || !self.allow.is_empty()
            || !self.deny.is_empty()
            || !self.metadata
    }

    /// Checks one operation (the request itself, or one `$batch` part).
    pub fn check(
        &self,
        method: &Method,
        resource: &str,
        caller_read_only: bool,
    ) -> Result<(), ProxyError> {
        if resource == "$batch" && *method == Method::POST {
            // Judged by its operations (check_batch), not by its own POST.
            return Ok(());
        }
        self.check_method_only(method, caller_read_only)?;
        if resource == "$metadata" && !self.metadata {
            return Err(ProxyError::PolicyDenied(
                "$metadata is switched off by the policy".to_owned(),
            ));
        }
        if resource == "$batch" || resource == "$metadata" {
            return Ok(());
        }
        if self.deny.iter().any(|d| d == resource) {
            return Err(ProxyError::PolicyDenied(format!(
                "'{resource}' is denied by the policy"
            )));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|a| a == resource) {
            return Err(ProxyError::PolicyDenied(format!(
                "'{resource}' is not in the policy's allow list"
            )));
        }
        Ok(())
    }

    /// Checks every operation of a buffered `$batch` body and drops the
    /// guarded headers of its parts; the body to send when lines were cut.
    ///
    /// A body the strict reader refuses is a 400 when the policy restricts
    /// anything. Otherwise it is forwarded untouched, unless it names a
    /// guarded header anywhere: that header could not be cut exactly.
    pub fn check_batch(
        &self,
        content_type: Option<&str>,
        body: &[u8],
        ctx: &BatchContext<'_>,
    ) -> Result<Option<Vec<u8>>, ProxyError> {
        let operations = match batch::parse(content_type.unwrap_or(""), body) {
            Ok(ops) => ops,
            Err(e) if self.restricts(ctx.caller_read_only) || names_guarded_header(body) => {
                return Err(ProxyError::BadBatch(e.to_string()));
            }
            Err(_) => return Ok(None),
        };
        let mut cut = Vec::new();
        for op in &operations {
            self.check_operation(op, ctx).map_err(|e| match e {
                ProxyError::PolicyDenied(why) => {
                    ProxyError::PolicyDenied(format!("in $batch: {why}"))
                }
                other => other,
            })?;
            cut.extend(self.lines_to_cut(op, ctx.caller_privileged));
        }
        cut.sort_by_key(|r| r.start);
        Ok((!cut.is_empty()).then(|| batch::without_lines(body, &cut)))
    }

    /// The path guard and the policy, for one `$batch` operation.
    fn check_operation(
        &self,
        op: &Operation<'_>,
        ctx: &BatchContext<'_>,
    ) -> Result<(), ProxyError> {
        let bad = |e: BatchError| ProxyError::BadBatch(e.to_string());
        let method = Method::from_bytes(op.method.as_bytes())
            .map_err(|_| bad(BatchError("an operation's method cannot be read")))?;
        let path = match op.resolve(ctx.service_root, ctx.origins).map_err(bad)? {
            // `$1`-style references name an entity created earlier in the
            // same change set (already checked): only method rules apply.
            Target::Reference => return self.check_method_only(&method, ctx.caller_read_only),
            Target::Path(p) => p,
        };
        let (path, query) = path.split_once('?').unwrap_or((&path, ""));
        if !crate::proxy::path::percent_encodings_are_valid(query.as_bytes()) {
            return Err(bad(BatchError(
                "an operation's query has a % without two hex digits",
            )));
        }
        crate::proxy::path::check(path).map_err(|_| {
            bad(BatchError(
                "an operation addresses a path outside /api/data/v9.0|1|2, or an ambiguous one",
            ))
        })?;
        let resource = resource(path).unwrap_or_default();
        if resource == "$batch" {
            return Err(bad(BatchError("a batch may not contain another batch")));
        }
        self.check(&method, &resource, ctx.caller_read_only)
    }

    /// The header lines of `op` that may not reach Dataverse; when any of
    /// the embedded request's lines go, the part's `Content-Length` goes too.
    fn lines_to_cut(
        &self,
        op: &Operation<'_>,
        caller_privileged: Option<&[String]>,
    ) -> Vec<std::ops::Range<usize>> {
        let refused = |h: &&batch::HeaderLine<'_>| {
            let name = h.name.to_ascii_lowercase();
            headers::is_guarded(&name) && !self.lets_through(&name, h.value, caller_privileged)
        };
        let mut cut: Vec<_> = op
            .part_headers
            .iter()
            .chain(&op.headers)
            .filter(refused)
            .map(|h| h.line.clone())
            .collect();
        if op.headers.iter().any(|h| refused(&h)) {
            cut.extend(
                op.part_headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map(|h| h.line.clone()),
            );
        }
        cut
    }

    fn check_method_only(&self, method: &Method, caller_read_only: bool) -> Result<(), ProxyError> {
        let read = matches!(*method, Method::GET | Method::HEAD);
        if (self.read_only || caller_read_only) && !read {
            return Err(ProxyError::PolicyDenied(format!(
                "{method} is not allowed: the policy is read-only"
            )));
        }
        if !self.methods.is_empty() && !self.methods.contains(method) {
            return Err(ProxyError::PolicyDenied(format!(
                "{method} is not among the allowed methods"
            )));
        }
        Ok(())
    }

    /// Whether a guarded header (lower-case `name`) may reach Dataverse:
    /// impersonation by the impersonation rule; privileged headers when the
    /// policy lists them and, where callers are configured, the caller too;
    /// credentials and cookies never.
    pub fn lets_through(
        &self,
        name: &str,
        value: &[u8],
        caller_privileged: Option<&[String]>,
    ) -> bool {
        match name {
            "callerobjectid" | "mscrmcallerid" => match &self.impersonation {
                Impersonation::Drop => false,
                Impersonation::Allow => true,
                Impersonation::Only(ids) => std::str::from_utf8(value)
                    .is_ok_and(|v| ids.iter().any(|id| id.eq_ignore_ascii_case(v.trim()))),
            },
            _ if names::PRIVILEGED.iter().any(|p| p.as_str() == name) => {
                let granted = |list: &[String]| list.iter().any(|p| p == name);
                granted(&self.privileged) && caller_privileged.is_none_or(granted)
            }
            _ => false,
        }
    }

    /// The impersonation and privileged headers of the caller's request
    /// that the policy lets through, to put back after the header policy
    /// dropped them.
    pub fn restored_headers(
        &self,
        headers: &HeaderMap,
        caller_privileged: Option<&[String]>,
    ) -> Vec<(HeaderName, HeaderValue)> {
        let candidates = [names::CALLER_OBJECT_ID, names::MSCRM_CALLER_ID]
            .into_iter()
            .chain(names::PRIVILEGED);
        candidates
            .filter_map(|name| {
                let value = headers.get(&name)?;
                self.lets_through(name.as_str(), value.as_bytes(), caller_privileged)
                    .then(|| (name, value.clone()))
            })
            .collect()
    }
}

/// True when a body names a guarded header anywhere, in any letter case.
fn names_guarded_header(body: &[u8]) -> bool {
    static NAMES: std::sync::OnceLock<aho_corasick::AhoCorasick> = std::sync::OnceLock::new();
    let finder = NAMES.get_or_init(|| {
        aho_corasick::AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build([
                "authorization",
                "x-api-key",
                "cookie",
                "callerobjectid",
                "mscrmcallerid",
                "mscrm.bypass",
                "mscrm.suppresscallback",
            ])
            .expect("fixed patterns build")
    });
    finder.is_match(body)
}

// === Callers ===

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

/// Caller identification settings.
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

/// The SHA-256 of an API key, as stored in the config.
pub fn hash_key(key: &str) -> [u8; 32] {
    sha2::Sha256::digest(key.as_bytes()).into()
}

/// Token buckets for caller quotas.
#[derive(Debug, Default)]
pub struct Quotas {
    buckets: Mutex<HashMap<Arc<str>, (f64, Instant)>>,
}

impl Quotas {
    /// Takes one request from `caller`'s bucket; the wait until the next when empty.
    fn take(&self, caller: &Arc<str>, rate: f64) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens, last) = buckets.entry(caller.clone()).or_insert((rate, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * rate;
        *tokens = (*tokens + refill).min(rate.max(1.0));
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / rate))
        }
    }
}

impl Access {
    /// Whether anything identifies or restricts callers.
    pub fn is_open(&self) -> bool {
        self.callers.is_empty() && self.allow_cidrs.is_empty()
    }

    /// The client's address: the peer, or for a trusted proxy the last
    /// `X-Forwarded-For` hop that is not itself a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusted_proxies.iter().any(|n| n.contains(&peer)) {
            return peer;
        }
        let hops: Vec<IpAddr> = headers
            .get_all(names::X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|h| h.trim().parse().ok())
            .collect();
        hops.into_iter()
            .rev()
            .find(|ip| !self.trusted_proxies.iter().any(|n| n.contains(ip)))
            .unwrap_or(peer)
    }

    /// Identifies the caller and applies the source, key, org and quota rules.
    pub fn admit(
        &self,
        peer: IpAddr,
        headers: &HeaderMap,
        org: &str,
        quotas: &Quotas,
    ) -> Result<Option<&Caller>, ProxyError> {
        let ip = self.client_ip(peer, headers);
        if !self.allow_cidrs.is_empty() && !self.allow_cidrs.iter().any(|n| n.contains(&ip)) {
            return Err(ProxyError::Forbidden(format!(
                "{ip} is not an allowed source address"
            )));
        }
        let key = headers
            .get(names::X_API_KEY)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|k| !k.is_empty());
        let caller = match key {
            Some(k) => {
                let hash = hash_key(k);
                let c = self
                    .callers
                    .iter()
                    .find(|c| c.key_sha256 == Some(hash))
                    .ok_or(ProxyError::Unauthorized("the API key is not known"))?;
                Some(c)
            }
            None if self.require_key => {
                return Err(ProxyError::Unauthorized(
                    "an API key is required (X-API-Key header)",
                ));
            }
            // Without keys, a caller can be known by its address alone.
            None => self
                .callers
                .iter()
                .find(|c| c.key_sha256.is_none() && c.cidrs.iter().any(|n| n.contains(&ip))),
        };
        if let Some(c) = caller {
            if !c.cidrs.is_empty() && !c.cidrs.iter().any(|n| n.contains(&ip)) {
                return Err(ProxyError::Forbidden(format!(
                    "caller {} may not connect from {ip}",
                    c.name
                )));
            }
            if !c.orgs.is_empty() && !c.orgs.iter().any(|o| o == org) {
                return Err(ProxyError::Forbidden(format!(
                    "caller {} may not use org {org}",
                    c.name
                )));
            }
            if let Some(rate) = c.requests_per_second {
                quotas
                    .take(&c.name, rate)
                    .map_err(|retry_after| ProxyError::CallerQuota { retry_after })?;
            }
        }
        Ok(caller)
    }
}

/// Warns when a credential file can be read by other users.
pub fn warn_if_readable_by_others(what: &str, path: &std::path::Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the {what} file is readable by other users; restrict it (chmod 600 or 400)"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = (what, path);
}

#[cfg(test)]
mod batch_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_the_first_segment() {
        assert_eq!(
            resource("/api/data/v9.2/accounts(1)/name").as_deref(),
            Some("accounts")
        );
        assert_eq!(
            resource("/api/data/v9.2/WhoAmI()").as_deref(),
            Some("whoami")
        );
        assert_eq!(resource("/api/data/v9.2/$batch").as_deref(), Some("$batch"));
        assert_eq!(resource("/api/data/v9.2").as_deref(), Some(""));
        // Encoded or upper-case names are decoded and folded (the slow path).
        assert_eq!(
            resource("/api/data/v9.2/ac%63ounts%28x)").as_deref(),
            Some("accounts")
        );
        assert_eq!(
            resource("/api/data/v9.2/Contacts?$top=1").as_deref(),
            Some("contacts")
        );
    }

    #[test]
    fn read_only_allows_reads_only() {
        let p = Policy {
            read_only: true,
            ..Policy::default()
        };
        assert!(p.check(&Method::GET, "accounts", false).is_ok());
        assert!(p.check(&Method::POST, "accounts", false).is_err());
        assert!(
            Policy::default()
                .check(&Method::DELETE, "accounts", true)
                .is_err(),
            "caller read-only"
        );
    }

    #[test]
    fn quotas_refill() {
        let q = Quotas::default();
        let name: Arc<str> = "c".into();
        assert!(q.take(&name, 2.0).is_ok());
        assert!(q.take(&name, 2.0).is_ok());
        assert!(q.take(&name, 2.0).is_err());
    }
}
