//! Dataverse's service-protection limits, per application user and web
//! server (docs/dataverse.md, "Service protection limits"): concurrent requests, requests per sliding window and
//! execution time per window. Exceeding one answers 429 with `Retry-After`
//! (seconds) and the hex error code of the facet; every admitted answer
//! carries the `x-ms-ratelimit-*` headers.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use tokio::time::Instant;

use super::lock;

/// The limits the simulator enforces.
#[derive(Debug, Clone)]
pub struct ServiceLimits {
    /// Concurrent requests (Dataverse: 52).
    pub concurrency: usize,
    /// Requests per window (Dataverse: 6000).
    pub requests: usize,
    /// Combined execution time per window (Dataverse: 1,200 s).
    pub execution: Duration,
    /// The sliding window (Dataverse: 300 s).
    pub window: Duration,
    /// Web servers behind the org, each counting the limits above on its
    /// own. A request goes to the server its `ARRAffinity` cookie names,
    /// else to the next in turn (the proxy never sends the cookie).
    pub web_servers: usize,
    /// The `x-ms-dop-hint` every answer carries.
    pub dop_hint: usize,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        Self {
            concurrency: 52,
            requests: 6000,
            execution: Duration::from_secs(1200),
            window: Duration::from_secs(300),
            web_servers: 1,
            dop_hint: 50,
        }
    }
}

/// Tracks one user's usage.
#[derive(Default)]
pub(super) struct Limiter {
    limits: Mutex<ServiceLimits>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Admission times within the window.
    requests: Mutex<VecDeque<Instant>>,
    /// Completion times and execution durations within the window.
    executions: Mutex<VecDeque<(Instant, Duration)>>,
    throttled: AtomicU64,
}

/// The org's web servers, each counting every user's limits on its own
/// (Dataverse: "Each authenticated user has an independent limit", per web
/// server). A user is the token's `oid`: an application user for app-only
/// tokens, the signed-in user for delegated ones.
pub(super) struct WebServers {
    state: Mutex<Servers>,
    next: AtomicUsize,
    dop_hint: AtomicUsize,
    /// Requests in flight over every server and user, and the most seen.
    total: AtomicUsize,
    max_total: AtomicUsize,
}

/// The servers' limiters by user, and the limits they start with.
struct Servers {
    limits: ServiceLimits,
    /// Limits of particular users, where a test set them.
    by_user: HashMap<String, ServiceLimits>,
    /// One map per web server: user → limiter.
    servers: Vec<HashMap<String, Arc<Limiter>>>,
}

impl Default for WebServers {
    fn default() -> Self {
        let servers = WebServers {
            state: Mutex::new(Servers {
                limits: ServiceLimits::default(),
                by_user: HashMap::new(),
                servers: Vec::new(),
            }),
            next: AtomicUsize::new(0),
            dop_hint: AtomicUsize::new(0),
            total: AtomicUsize::new(0),
            max_total: AtomicUsize::new(0),
        };
        servers.set(ServiceLimits::default());
        servers
    }
}

impl WebServers {
    /// Applies `limits` to every user of `limits.web_servers` fresh servers.
    pub(super) fn set(&self, limits: ServiceLimits) {
        self.dop_hint.store(limits.dop_hint, Ordering::SeqCst);
        let mut state = lock(&self.state);
        state.servers = (0..limits.web_servers.max(1))
            .map(|_| HashMap::new())
            .collect();
        state.limits = limits;
    }

    /// Gives `user` its own limits from now on (on every server).
    pub(super) fn set_for_user(&self, user: &str, limits: ServiceLimits) {
        let mut state = lock(&self.state);
        for server in &mut state.servers {
            server.remove(user);
        }
        state.by_user.insert(user.to_owned(), limits);
    }

    /// The server for a request: by affinity cookie, else the next in turn;
    /// with its index (the `ARRAffinity` value) and `user`'s limiter there.
    pub(super) fn pick(&self, headers: &HeaderMap, user: &str) -> (usize, Arc<Limiter>) {
        let mut state = lock(&self.state);
        let count = state.servers.len();
        let by_cookie = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| c.trim().strip_prefix("ARRAffinity=")?.parse::<usize>().ok())
            .filter(|i| *i < count);
        let i = by_cookie.unwrap_or_else(|| self.next.fetch_add(1, Ordering::SeqCst) % count);
        let limits = state.by_user.get(user).unwrap_or(&state.limits).clone();
        let limiter = state.servers[i]
            .entry(user.to_owned())
            .or_insert_with(|| {
                let l = Limiter::default();
                l.set(limits);
                Arc::new(l)
            })
            .clone();
        (i, limiter)
    }

    /// Counts a request in flight over all users until the guard drops.
    pub(super) fn count(&self) -> TotalInFlight<'_> {
        let now = self.total.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_total.fetch_max(now, Ordering::SeqCst);
        TotalInFlight(self)
    }

    /// The most in flight any one user had on any one server.
    pub(super) fn max_in_flight(&self) -> usize {
        self.users_max().into_values().max().unwrap_or(0)
    }

    /// The most in flight each user had on any one server.
    pub(super) fn users_max(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for server in &lock(&self.state).servers {
            for (user, l) in server {
                let most = out.entry(user.clone()).or_insert(0);
                *most = (*most).max(l.max_in_flight());
            }
        }
        out
    }

    /// Requests in flight now over all servers and users.
    pub(super) fn total_in_flight(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    /// The most requests in flight at once over all servers and users.
    pub(super) fn max_total_in_flight(&self) -> usize {
        self.max_total.load(Ordering::SeqCst)
    }

    /// 429s answered by all servers.
    pub(super) fn throttled(&self) -> u64 {
        lock(&self.state)
            .servers
            .iter()
            .flat_map(|s| s.values())
            .map(|l| l.throttled())
            .sum()
    }

    /// The recommended parallelism advertised.
    pub(super) fn dop_hint(&self) -> usize {
        self.dop_hint.load(Ordering::SeqCst)
    }
}

/// One request counted in [`WebServers::count`].
pub(super) struct TotalInFlight<'a>(&'a WebServers);

impl Drop for TotalInFlight<'_> {
    fn drop(&mut self) {
        self.0.total.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An admitted request; records its execution time when dropped.
pub(super) struct InFlight<'a> {
    limiter: &'a Limiter,
    started: Instant,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.limiter.in_flight.fetch_sub(1, Ordering::SeqCst);
        lock(&self.limiter.executions).push_back((Instant::now(), self.started.elapsed()));
    }
}

impl Limiter {
    pub(super) fn set(&self, limits: ServiceLimits) {
        *lock(&self.limits) = limits;
    }

    pub(super) fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    pub(super) fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::SeqCst)
    }

    /// Admits a request or answers 429 like Dataverse.
    #[expect(
        clippy::result_large_err,
        reason = "simulator code, not on the hot path"
    )]
    pub(super) fn admit(&self) -> Result<InFlight<'_>, Response> {
        let limits = lock(&self.limits).clone();
        let now = Instant::now();
        let horizon = now.checked_sub(limits.window);

        let in_flight = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        if in_flight > limits.concurrency {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(self.reject(
                "0x80072326",
                &format!(
                    "Number of concurrent requests exceeded the limit of {}.",
                    limits.concurrency
                ),
                Duration::from_secs(1),
            ));
        }

        let mut requests = lock(&self.requests);
        while requests
            .front()
            .is_some_and(|t| horizon.is_some_and(|h| *t < h))
        {
            requests.pop_front();
        }
        if requests.len() >= limits.requests {
            let wait = requests.front().map_or(limits.window, |oldest| {
                limits.window.saturating_sub(now - *oldest)
            });
            drop(requests);
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(self.reject(
                "0x80072322",
                &format!(
                    "Number of requests exceeded the limit of {} over time window of {} seconds.",
                    limits.requests,
                    limits.window.as_secs()
                ),
                wait,
            ));
        }

        let mut executions = lock(&self.executions);
        while executions
            .front()
            .is_some_and(|(t, _)| horizon.is_some_and(|h| *t < h))
        {
            executions.pop_front();
        }
        let used: Duration = executions.iter().map(|(_, d)| *d).sum();
        if used >= limits.execution {
            let wait = executions.front().map_or(limits.window, |(oldest, _)| {
                limits.window.saturating_sub(now - *oldest)
            });
            drop(executions);
            drop(requests);
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(self.reject(
                "0x80072321",
                &format!(
                    "Combined execution time of incoming requests exceeded limit of {} milliseconds over time window of {} seconds. Decrease number of concurrent requests or reduce the duration of requests and try again later.",
                    limits.execution.as_millis(),
                    limits.window.as_secs()
                ),
                wait,
            ));
        }
        drop(executions);
        requests.push_back(now);
        drop(requests);
        self.max_in_flight.fetch_max(in_flight, Ordering::SeqCst);
        Ok(InFlight {
            limiter: self,
            started: now,
        })
    }

    fn reject(&self, code: &str, message: &str, wait: Duration) -> Response {
        self.throttled.fetch_add(1, Ordering::SeqCst);
        let mut resp = super::dataverse::dv_error(StatusCode::TOO_MANY_REQUESTS, code, message);
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        resp
    }

    /// The `x-ms-ratelimit-*` headers (remaining requests, remaining seconds).
    pub(super) fn headers(&self, h: &mut HeaderMap) {
        let limits = lock(&self.limits).clone();
        let requests = lock(&self.requests).len();
        let used: Duration = lock(&self.executions).iter().map(|(_, d)| *d).sum();
        let remaining = limits.requests.saturating_sub(requests);
        h.insert(
            "x-ms-ratelimit-burst-remaining-xrm-requests",
            HeaderValue::from(remaining),
        );
        let secs = limits.execution.saturating_sub(used).as_secs_f64();
        if let Ok(v) = HeaderValue::from_str(&thousands(secs)) {
            h.insert("x-ms-ratelimit-time-remaining-xrm-requests", v);
        }
    }
}

/// `1199.83` → `"1,199.83"`, the form seen on the wire.
fn thousands(v: f64) -> String {
    let s = format!("{v:.2}");
    let (int, frac) = s.split_once('.').unwrap_or((&s, "00"));
    let mut out = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{out}.{frac}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(1199.834), "1,199.83");
        assert_eq!(thousands(12.0), "12.00");
        assert_eq!(thousands(1_200_000.0), "1,200,000.00");
    }

    #[tokio::test]
    async fn concurrency_and_request_limits() {
        let l = Limiter::default();
        l.set(ServiceLimits {
            concurrency: 2,
            requests: 3,
            ..ServiceLimits::default()
        });
        let a = l.admit().expect("a");
        let b = l.admit().expect("b");
        let c = l.admit().err().expect("third concurrent is refused");
        assert_eq!(c.status(), 429);
        drop((a, b));
        let _d = l.admit().expect("d");
        let e = l.admit().err().expect("fourth in window is refused");
        assert!(
            e.headers()[header::RETRY_AFTER]
                .to_str()
                .expect("ra")
                .parse::<u64>()
                .expect("n")
                > 200
        );
        assert_eq!(l.max_in_flight(), 2);
        assert_eq!(l.throttled(), 2);
    }
}
