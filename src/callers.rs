//! Who is calling: callers identified by an Entra ID token
//! ([`crate::identity`]), an API key, a client certificate or the source
//! address; the global source allow-list, `X-Forwarded-For` believed only
//! from trusted proxies, per-caller request-rate quotas, and whom a caller
//! acts as (`impersonate = "caller"`).
//!
//! The callers themselves are configuration ([`crate::config::Access`]); this
//! module admits or refuses a request for them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, HeaderName};
use sha2::Digest;
use tokio::time::Instant;

use crate::config::{Access, Caller, CertificateRequirement, SubjectName, TokenRequirement};
use crate::governor::SharedRedis;
use crate::identity::{Principal, TokenError, Verifier};

/// A caller's API key.
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// De-facto forwarding header.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Why a caller is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    /// No credential, or an unknown API key (401).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A caller token that is not valid, or no keys to check it (401 / 503).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A valid token that no caller rule admits (403 `insufficient_scope`).
    #[error("no caller rule admits this token (app, roles, scopes or groups)")]
    InsufficientToken,
    /// Not from here, or not this org (403).
    #[error("{0}")]
    Forbidden(String),
    /// The caller's quota is used up (429).
    #[error("this caller's request-rate quota is used up")]
    Quota {
        /// When a request is allowed again.
        retry_after: Duration,
    },
}

/// What a request shows of its caller.
#[derive(Debug, Clone, Copy)]
pub struct CallerRequest<'a> {
    /// The connection's peer.
    pub peer: IpAddr,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The verified client certificate (mTLS), if any.
    pub certificate: Option<&'a PeerCertificate>,
}

/// The names of a verified client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCertificate {
    /// Subject common names.
    pub common_names: Vec<String>,
    /// Subject alternative names: DNS names, URIs, e-mail addresses.
    pub sans: Vec<SubjectName>,
}

impl PeerCertificate {
    /// Whether it carries one of the names `req` lists. A common name
    /// counts only on a certificate without SANs, unless the rule says
    /// otherwise: where SANs exist, they are the identity (RFC 6125).
    pub fn meets(&self, req: &CertificateRequirement) -> bool {
        let by_cn = (self.sans.is_empty() || req.common_name_with_sans)
            && req
                .common_names
                .iter()
                .any(|n| self.common_names.contains(n));
        by_cn
            || req
                .sans
                .iter()
                .any(|n| self.sans.iter().any(|s| n.names(s)))
    }
}

/// Who was admitted.
#[derive(Debug, Default)]
pub struct Admission<'a> {
    /// The caller rule; `None` where no callers are configured.
    pub caller: Option<&'a Caller>,
    /// The principal of a caller token.
    pub principal: Option<Principal>,
    /// The user object id to act as (`impersonate = "caller"`).
    pub act_as: Option<String>,
    /// The user whose own token the request goes with
    /// (`impersonate = "delegated"`).
    pub delegated: Option<Delegated>,
}

/// A user's validated token, kept to be exchanged on-behalf-of.
pub struct Delegated {
    /// The caller's token as it came; only ever sent to Entra ID.
    pub token: secrecy::SecretString,
    pub tenant: String,
    pub object_id: String,
    /// The token's `exp` (Unix seconds).
    pub expires_at: u64,
}

impl std::fmt::Debug for Delegated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delegated")
            .field("token", &"[REDACTED]")
            .field("tenant", &self.tenant)
            .field("object_id", &self.object_id)
            .finish()
    }
}

impl<'a> Admission<'a> {
    fn of(caller: Option<&'a Caller>) -> Self {
        Self {
            caller,
            ..Self::default()
        }
    }
}

/// The SHA-256 of an API key, as stored in the config.
pub fn hash_key(key: &str) -> [u8; 32] {
    sha2::Sha256::digest(key.as_bytes()).into()
}

/// Quota buckets kept before full ones are dropped.
const MAX_BUCKETS: usize = 10_000;

/// Token buckets for caller quotas: in Redis when the governor's state is
/// shared (one quota for all replicas), else (and while Redis does not
/// answer) in this process.
#[derive(Debug, Default)]
pub struct Quotas {
    buckets: Mutex<HashMap<Arc<str>, (f64, Instant)>>,
    shared: Option<Arc<SharedRedis>>,
}

impl Quotas {
    /// Quotas shared through `redis`.
    pub fn shared(redis: Arc<SharedRedis>) -> Self {
        Self {
            shared: Some(redis),
            ..Self::default()
        }
    }

    /// Takes one request from `caller`'s bucket; the wait until the next when empty.
    async fn take(&self, caller: &str, rate: f64) -> Result<(), Duration> {
        if let Some(redis) = self.shared.as_ref().filter(|r| r.is_shared())
            && let Ok(answer) = redis.take_quota(caller, rate).await
        {
            return answer;
        }
        self.take_local(caller, rate)
    }

    fn take_local(&self, caller: &str, rate: f64) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(caller) {
            // A bucket refilled to its burst is as good as none: only the
            // callers spending now are kept (one per principal of a rule).
            buckets.retain(|_, (tokens, last)| {
                *tokens + now.saturating_duration_since(*last).as_secs_f64() * rate < rate.max(1.0)
            });
        }
        let (tokens, last) = buckets
            .entry(Arc::from(caller))
            .or_insert((rate.max(1.0), now));
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
            .get_all(X_FORWARDED_FOR)
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

    /// Identifies the caller and applies the source, credential, org and
    /// quota rules. A credential is looked at in this order: an Entra ID
    /// token (where `[caller_tokens]` is configured), an API key, a client
    /// certificate; without one, the source address may name the caller.
    pub async fn admit<'a>(
        &'a self,
        request: &CallerRequest<'_>,
        verifier: Option<&Verifier>,
        org: &str,
        quotas: &Quotas,
    ) -> Result<Admission<'a>, AdmissionError> {
        let ip = self.client_ip(request.peer, request.headers);
        if !self.allow_cidrs.is_empty() && !self.allow_cidrs.iter().any(|n| n.contains(&ip)) {
            return Err(AdmissionError::Forbidden(format!(
                "{ip} is not an allowed source address"
            )));
        }
        let admission = match (verifier, bearer(request.headers)) {
            (Some(verifier), Some(token)) => self.by_token(verifier, token).await?,
            _ => Admission::of(self.by_key_or_certificate(request, ip)?),
        };
        if let Some(c) = admission.caller {
            let principal = admission.principal.as_ref().map(Principal::flow_id);
            self.check_caller(c, ip, org, quotas, principal).await?;
        }
        Ok(admission)
    }

    /// The caller an API key, a client certificate or the address names.
    fn by_key_or_certificate(
        &self,
        request: &CallerRequest<'_>,
        ip: IpAddr,
    ) -> Result<Option<&Caller>, AdmissionError> {
        let key = request
            .headers
            .get(X_API_KEY)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|k| !k.is_empty());
        if let Some(k) = key {
            let hash = hash_key(k);
            return self
                .callers
                .iter()
                .find(|c| c.key_sha256 == Some(hash))
                .map(Some)
                .ok_or(AdmissionError::Unauthorized("the API key is not known"));
        }
        if let Some(cert) = request.certificate
            && let Some(c) = self
                .callers
                .iter()
                .find(|c| c.certificate.as_ref().is_some_and(|req| cert.meets(req)))
        {
            return Ok(Some(c));
        }
        if self.require_credential {
            return Err(AdmissionError::Unauthorized(
                "a credential is required (an Entra ID token, an X-API-Key or a client certificate)",
            ));
        }
        // Without credentials, a caller can be known by its address alone.
        let by_address = self.callers.iter().find(|c| {
            c.key_sha256.is_none()
                && c.token.is_none()
                && c.certificate.is_none()
                && c.cidrs.iter().any(|n| n.contains(&ip))
        });
        // Once any caller rule exists, no rule is not "every right": an
        // address no rule names would otherwise get more than a named,
        // read-only subnet. A catch-all rule admits the rest on purpose.
        if by_address.is_none() && !self.callers.is_empty() {
            return Err(AdmissionError::Forbidden(format!(
                "no caller rule admits {ip} (add a [[callers]] rule with its address, or a catch-all cidrs = [\"0.0.0.0/0\", \"::/0\"])"
            )));
        }
        Ok(by_address)
    }

    /// The first token rule the principal meets.
    async fn by_token(
        &self,
        verifier: &Verifier,
        token: &str,
    ) -> Result<Admission<'_>, AdmissionError> {
        let principal = verifier.verify(token).await?;
        let (caller, act_as) = self
            .callers
            .iter()
            .find_map(|c| {
                let req = c.token.as_ref()?;
                if !meets(req, &principal) {
                    return None;
                }
                match &c.act_as_caller {
                    // The user's own token: a user's alone.
                    None if c.delegated => principal.is_user.then_some((c, None)),
                    None => Some((c, None)),
                    Some(_) if principal.is_user => Some((c, Some(principal.object_id.clone()))),
                    // An app-only token acts as a user only where mapped.
                    Some(a) => a.apps.get(&principal.app_id).map(|u| (c, Some(u.clone()))),
                }
            })
            .ok_or(AdmissionError::InsufficientToken)?;
        let delegated = caller.delegated.then(|| Delegated {
            token: token.into(),
            tenant: principal.tenant.clone(),
            object_id: principal.object_id.clone(),
            expires_at: principal.expires_at,
        });
        Ok(Admission {
            caller: Some(caller),
            principal: Some(principal),
            act_as,
            delegated,
        })
    }

    /// Where it may connect from, which orgs, its quota.
    /// The caller's source, org and quota rules. A token rule's quota, like
    /// its `max_concurrency`, is each principal's (user or app) own: one
    /// bucket per `{rule}/{principal}`, so one user of a broad rule never
    /// spends another's.
    async fn check_caller(
        &self,
        c: &Caller,
        ip: IpAddr,
        org: &str,
        quotas: &Quotas,
        principal: Option<&str>,
    ) -> Result<(), AdmissionError> {
        if !c.cidrs.is_empty() && !c.cidrs.iter().any(|n| n.contains(&ip)) {
            return Err(AdmissionError::Forbidden(format!(
                "caller {} may not connect from {ip}",
                c.name
            )));
        }
        if !c.orgs.is_empty() && !c.orgs.iter().any(|o| o == org) {
            return Err(AdmissionError::Forbidden(format!(
                "caller {} may not use org {org}",
                c.name
            )));
        }
        if let Some(rate) = c.requests_per_second {
            let bucket = match principal {
                Some(p) => std::borrow::Cow::Owned(format!("{}/{p}", c.name)),
                None => std::borrow::Cow::Borrowed(&*c.name),
            };
            let bucket: &str = &bucket;
            quotas
                .take(bucket, rate)
                .await
                .map_err(|retry_after| AdmissionError::Quota { retry_after })?;
        }
        Ok(())
    }
}

/// A bearer token in `Authorization`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Whether `p` meets every list of `req` (each: at least one value in common).
fn meets(req: &TokenRequirement, p: &Principal) -> bool {
    let any = |wanted: &[String], have: &[String]| {
        wanted.is_empty() || wanted.iter().any(|w| have.contains(w))
    };
    !(req.app_only && p.is_user)
        && any(&req.app_ids, std::slice::from_ref(&p.app_id))
        && any(&req.object_ids, std::slice::from_ref(&p.object_id))
        && any(&req.tenants, std::slice::from_ref(&p.tenant))
        && any(&req.roles, &p.roles)
        && any(&req.scopes, &p.scopes)
        && any(&req.groups, &p.groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_refill() {
        let q = Quotas::default();
        let name: Arc<str> = "c".into();
        assert!(q.take_local(&name, 2.0).is_ok());
        assert!(q.take_local(&name, 2.0).is_ok());
        assert!(q.take_local(&name, 2.0).is_err());
    }
}
