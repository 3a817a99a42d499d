//! Who is calling: callers identified by API key or source address, the
//! global source allow-list, `X-Forwarded-For` believed only from trusted
//! proxies, and per-caller request-rate quotas.
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

use crate::config::{Access, Caller};

/// A caller's API key.
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// De-facto forwarding header.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Why a caller is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    /// No API key, or an unknown one (401).
    #[error("{0}")]
    Unauthorized(&'static str),
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

    /// Identifies the caller and applies the source, key, org and quota rules.
    pub fn admit(
        &self,
        peer: IpAddr,
        headers: &HeaderMap,
        org: &str,
        quotas: &Quotas,
    ) -> Result<Option<&Caller>, AdmissionError> {
        let ip = self.client_ip(peer, headers);
        if !self.allow_cidrs.is_empty() && !self.allow_cidrs.iter().any(|n| n.contains(&ip)) {
            return Err(AdmissionError::Forbidden(format!(
                "{ip} is not an allowed source address"
            )));
        }
        let key = headers
            .get(X_API_KEY)
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
                    .ok_or(AdmissionError::Unauthorized("the API key is not known"))?;
                Some(c)
            }
            None if self.require_key => {
                return Err(AdmissionError::Unauthorized(
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
                quotas
                    .take(&c.name, rate)
                    .map_err(|retry_after| AdmissionError::Quota { retry_after })?;
            }
        }
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_refill() {
        let q = Quotas::default();
        let name: Arc<str> = "c".into();
        assert!(q.take(&name, 2.0).is_ok());
        assert!(q.take(&name, 2.0).is_ok());
        assert!(q.take(&name, 2.0).is_err());
    }
}
