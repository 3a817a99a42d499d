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
//!   impersonation headers dropped, allowed, or allowed for listed ids.
//!   `$batch` bodies are buffered (under a cap) and every operation in them
//!   is checked against the same policy, so a batch is no bypass.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Method};
use sha2::Digest;
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::multipart;
use crate::proxy::headers::names;

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

    /// Checks every operation of a buffered `$batch` body.
    pub fn check_batch(
        &self,
        content_type: Option<&str>,
        body: &[u8],
        caller_read_only: bool,
    ) -> Result<(), ProxyError> {
        let malformed =
            || ProxyError::BadRequest("the $batch body is not valid multipart/mixed content");
        let boundary = content_type
            .and_then(multipart::boundary)
            .ok_or_else(malformed)?;
        let parts = multipart::split(body, &boundary).ok_or_else(malformed)?;
        for part in &parts {
            let inner = part.header("content-type").and_then(multipart::boundary);
            let operations = match inner {
                Some(b) => multipart::split(part.content, &b).ok_or_else(malformed)?,
                None => vec![multipart::Part {
                    headers: part.headers.clone(),
                    content: part.content,
                }],
            };
            for op in &operations {
                let (method, url) = multipart::request_line(op).ok_or_else(malformed)?;
                let method = Method::from_bytes(method.as_bytes()).map_err(|_| malformed())?;
                // `$1`-style references name an entity created earlier in the
                // same change set (already checked): only method rules apply.
                match batch_resource(&url) {
                    Some(r) => self.check(&method, &r, caller_read_only),
                    None => self.check_method_only(&method, caller_read_only),
                }
                .map_err(|e| match e {
                    ProxyError::PolicyDenied(why) => {
                        ProxyError::PolicyDenied(format!("in $batch: {why}"))
                    }
                    other => other,
                })?;
            }
        }
        Ok(())
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

    /// Applies the impersonation rule to the caller's headers, before the
    /// header policy drops them; returns the ones to put back.
    pub fn impersonation_headers(&self, headers: &HeaderMap) -> Vec<(&'static str, HeaderValue)> {
        let mut keep = Vec::new();
        for (name, key) in [
            ("callerobjectid", names::CALLER_OBJECT_ID),
            ("mscrmcallerid", names::MSCRM_CALLER_ID),
        ] {
            let Some(v) = headers.get(key) else { continue };
            let allowed = match &self.impersonation {
                Impersonation::Drop => false,
                Impersonation::Allow => true,
                Impersonation::Only(ids) => v
                    .to_str()
                    .is_ok_and(|v| ids.iter().any(|id| id.eq_ignore_ascii_case(v.trim()))),
            };
            if allowed {
                keep.push((name, v.clone()));
            }
        }
        keep
    }
}

/// The resource a `$batch` operation URL addresses; `None` for `$n` references.
fn batch_resource(url: &str) -> Option<String> {
    if url.starts_with('$') && url[1..].chars().next().is_some_and(|c| c.is_ascii_digit()) {
        return None;
    }
    let path = match url.find("/api/data/") {
        Some(i) => &url[i..],
        None => {
            // Relative to the service root: "accounts(…)".
            return Some(
                resource(&format!("/api/data/v9.2/{url}"))
                    .unwrap_or_default()
                    .into_owned(),
            );
        }
    };
    Some(resource(path).unwrap_or_default().into_owned())
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
        assert_eq!(
            batch_resource("https://x/api/data/v9.2/systemusers?$top=1").as_deref(),
            Some("systemusers")
        );
        assert_eq!(batch_resource("contacts(1)").as_deref(), Some("contacts"));
        assert_eq!(batch_resource("$1"), None);
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
