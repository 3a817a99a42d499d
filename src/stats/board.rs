//! What the status page tells about requests, counted as they end (by the
//! access log): per org its [`Activity`] ring, its callers' requests and
//! refusals, its proxy errors by code; and the last few proxy errors of all.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use serde::Serialize;

use super::activity::{Activity, unix_ms};

/// Proxy errors kept in the "recent" list.
const RECENT: usize = 20;

/// One org's counts.
#[derive(Default)]
pub struct OrgBoard {
    pub activity: Activity,
    callers: Mutex<BTreeMap<Arc<str>, CallerCounts>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

/// One caller's requests, and those the proxy refused (401, 403, 429 of its
/// own: no credential, not allowed, over quota or queue).
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct CallerCounts {
    pub requests: u64,
    pub refused: u64,
}

/// A proxy error as the status page lists it.
#[derive(Debug, Clone, Serialize)]
pub struct RecentError {
    /// Unix milliseconds.
    pub at: u64,
    pub org: String,
    pub code: String,
    pub status: u16,
    pub request_id: String,
}

/// How one request ended, as the board counts it.
pub struct Ended<'a> {
    pub org: Option<&'a str>,
    pub caller: Option<&'a Arc<str>>,
    pub status: StatusCode,
    /// The `x-dataverse-proxy-error` code, when the proxy made the answer.
    pub proxy_error: Option<&'a HeaderValue>,
    pub request_id: Option<&'a HeaderValue>,
    pub took: Duration,
}

impl OrgBoard {
    /// Counts a request of this org.
    pub fn record(&self, ended: &Ended<'_>) {
        self.activity.record(ended.took);
        let refused =
            ended.proxy_error.is_some() && matches!(ended.status.as_u16(), 401 | 403 | 429);
        if let Some(name) = ended.caller {
            let mut callers = lock(&self.callers);
            let counts = callers.entry(name.clone()).or_default();
            counts.requests += 1;
            counts.refused += u64::from(refused);
        }
        if let Some(code) = ended.proxy_error.and_then(|v| v.to_str().ok()) {
            *lock(&self.errors).entry(code.to_owned()).or_default() += 1;
        }
    }

    pub fn callers(&self) -> Vec<(Arc<str>, CallerCounts)> {
        lock(&self.callers)
            .iter()
            .map(|(n, c)| (n.clone(), *c))
            .collect()
    }

    pub fn errors(&self) -> Vec<(String, u64)> {
        lock(&self.errors)
            .iter()
            .map(|(c, n)| (c.clone(), *n))
            .collect()
    }
}

/// The last proxy errors of every org.
#[derive(Default)]
pub struct Recent(Mutex<VecDeque<RecentError>>);

impl Recent {
    pub fn record(&self, ended: &Ended<'_>) {
        let Some(code) = ended.proxy_error.and_then(|v| v.to_str().ok()) else {
            return;
        };
        let text =
            |v: Option<&HeaderValue>| v.and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let mut recent = lock(&self.0);
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(RecentError {
            at: unix_ms(),
            org: ended.org.unwrap_or("-").to_owned(),
            code: code.to_owned(),
            status: ended.status.as_u16(),
            request_id: text(ended.request_id),
        });
    }

    /// Newest first.
    pub fn list(&self) -> Vec<RecentError> {
        lock(&self.0).iter().rev().cloned().collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
