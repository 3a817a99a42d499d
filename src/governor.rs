//! The service-protection governor of one org.
//!
//! Every caller of the proxy shares one application user, and Dataverse
//! limits a user per web server to 52 concurrent requests, 6000 requests and
//! 1,200 s of execution time per 5 minutes (docs/dataverse.md, "Service protection limits"). The governor keeps
//! the whole proxy under those limits instead of letting each caller find
//! them out:
//!
//! - a **concurrency cap** (default 50) held from sending a request until its
//!   response body is finished;
//! - a **bounded FIFO queue** for callers over the cap, with a queue timeout;
//!   a full queue or a timeout answers 429 with `Retry-After`;
//! - a **gate**: after Dataverse answers 429 with `Retry-After: N`, the gate
//!   is closed for N seconds for *every* caller of the org, since they all
//!   share the throttled user; waiting callers resume when it reopens.
//!
//! The retry decision (replay a throttled request after the wait) is made by
//! the forwarding handler, which knows whether the body can be replayed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::GovernorConfig;

/// Why a request got no slot towards the org.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GovernorError {
    /// Too many callers are already waiting.
    #[error("the governor's queue is full")]
    QueueFull {
        /// Suggested wait.
        retry_after: Duration,
    },
    /// The request waited longer than `governor.queue_timeout`.
    #[error("waited {waited:?} for a slot")]
    QueueTimeout {
        /// How long it waited.
        waited: Duration,
        /// Suggested wait.
        retry_after: Duration,
    },
}

/// Counters for the metrics endpoint.
#[derive(Debug, Default)]
pub struct GovernorStats {
    /// Requests holding a permit now.
    pub in_flight: AtomicUsize,
    /// Callers waiting for a permit or for the gate now.
    pub queued: AtomicUsize,
    /// Callers that had to wait at all.
    pub waits: AtomicU64,
    /// 429 answers seen from Dataverse.
    pub throttled: AtomicU64,
    /// Throttled requests replayed after the wait.
    pub retries: AtomicU64,
    /// Callers turned away (queue full or queue timeout).
    pub rejected: AtomicU64,
    /// Last `x-ms-dop-hint` seen (Dataverse's recommended parallelism), 0 if none.
    pub dop_hint: AtomicUsize,
}

/// The governor of one org. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Governor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: GovernorConfig,
    permits: Arc<Semaphore>,
    /// Closed until this instant, after a 429 (std mutex: never held across `.await`).
    gate: Mutex<Option<Instant>>,
    stats: Arc<GovernorStats>,
}

/// A slot of the concurrency cap; released on drop.
#[derive(Debug)]
pub struct Permit {
    _permit: OwnedSemaphorePermit,
    stats: Arc<GovernorStats>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Decrements the queue length however the wait ends.
struct Queued<'a>(&'a GovernorStats);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Governor {
    /// A governor with the given limits.
    pub fn new(config: GovernorConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                permits: Arc::new(Semaphore::new(config.max_concurrency)),
                config,
                gate: Mutex::new(None),
                stats: Arc::new(GovernorStats::default()),
            }),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &GovernorStats {
        &self.inner.stats
    }

    /// The configuration.
    pub fn config(&self) -> &GovernorConfig {
        &self.inner.config
    }

    /// When the gate reopens, if it is closed now.
    fn gate_closed_until(&self) -> Option<Instant> {
        let gate = self
            .inner
            .gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        gate.filter(|until| *until > Instant::now())
    }

    /// Waits for the gate and a slot; 429 when the queue is full or the wait
    /// exceeds the queue timeout.
    pub async fn acquire(&self) -> Result<Permit, GovernorError> {
        let inner = &self.inner;
        let stats = &inner.stats;
        if self.gate_closed_until().is_none()
            && let Ok(p) = inner.permits.clone().try_acquire_owned()
        {
            return Ok(self.permit(p));
        }
        // Admission to the queue.
        let queued = stats.queued.fetch_add(1, Ordering::Relaxed);
        let _queued = Queued(stats);
        if queued >= inner.config.max_queue {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(GovernorError::QueueFull {
                retry_after: self.suggested_retry(),
            });
        }
        stats.waits.fetch_add(1, Ordering::Relaxed);
        let wait = async {
            loop {
                if let Some(until) = self.gate_closed_until() {
                    tokio::time::sleep_until(until).await;
                }
                let permit = inner.permits.clone().acquire_owned().await;
                let Ok(permit) = permit else {
                    // The semaphore is never closed; treat it as a full queue.
                    return None;
                };
                // The gate may have closed while this caller waited for a slot.
                if self.gate_closed_until().is_none() {
                    return Some(permit);
                }
            }
        };
        match tokio::time::timeout(inner.config.queue_timeout, wait).await {
            Ok(Some(p)) => Ok(self.permit(p)),
            Ok(None) | Err(_) => {
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                Err(GovernorError::QueueTimeout {
                    waited: inner.config.queue_timeout,
                    retry_after: self.suggested_retry(),
                })
            }
        }
    }

    fn permit(&self, p: OwnedSemaphorePermit) -> Permit {
        let stats = self.inner.stats.clone();
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Permit { _permit: p, stats }
    }

    /// What to tell a turned-away caller: the gate's remaining time, or a second.
    fn suggested_retry(&self) -> Duration {
        self.gate_closed_until()
            .map_or(Duration::from_secs(1), |until| until - Instant::now())
    }

    /// Dataverse answered 429: close the gate for everyone for `retry_after`
    /// (capped by `max_retry_after`).
    pub fn throttled(&self, retry_after: Duration) {
        let inner = &self.inner;
        inner.stats.throttled.fetch_add(1, Ordering::Relaxed);
        let until = Instant::now() + retry_after.min(inner.config.max_retry_after);
        let mut gate = inner
            .gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if gate.is_none_or(|g| g < until) {
            *gate = Some(until);
        }
        tracing::warn!(
            retry_after_ms = retry_after.as_millis() as u64,
            "Dataverse throttled the application user; pausing all callers of this org"
        );
    }

    /// Counts a replayed request.
    pub fn retried(&self) {
        self.inner.stats.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Records Dataverse's recommended degree of parallelism.
    pub fn dop_hint(&self, hint: usize) {
        self.inner.stats.dop_hint.store(hint, Ordering::Relaxed);
    }
}

/// Parses `Retry-After` as seconds (Dataverse sends integers; fractions are
/// accepted). `None` when absent or not a number (HTTP-dates are not used by
/// Dataverse).
pub fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    let secs: f64 = v.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max: usize, queue: usize, timeout_ms: u64) -> GovernorConfig {
        GovernorConfig {
            max_concurrency: max,
            max_queue: queue,
            queue_timeout: Duration::from_millis(timeout_ms),
            max_retries: 3,
            retry_deadline: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(300),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_queues_and_a_full_queue_is_a_429() {
        let g = Governor::new(config(2, 1, 10_000));
        let a = g.acquire().await.expect("a");
        let _b = g.acquire().await.expect("b");
        assert_eq!(g.stats().in_flight.load(Ordering::Relaxed), 2);
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.acquire().await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(g.stats().queued.load(Ordering::Relaxed), 1);
        let full = g.acquire().await.expect_err("queue full");
        assert!(matches!(full, GovernorError::QueueFull { .. }));
        drop(a);
        waiter.await.expect("join").expect("waiter got a slot");
        assert_eq!(g.stats().rejected.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_timeout_is_a_429_after_exactly_the_timeout() {
        let g = Governor::new(config(1, 10, 5_000));
        let a = g.acquire().await.expect("a");
        let start = Instant::now();
        let err = g.acquire().await.expect_err("timeout");
        let GovernorError::QueueTimeout { waited, .. } = err else {
            panic!("{err:?}");
        };
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert!(waited >= Duration::from_secs(5));
        // A slot freed before the timeout is taken instead.
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.acquire().await.map(|_| Instant::now()) });
        tokio::time::sleep(Duration::from_secs(4)).await;
        let freed = Instant::now();
        drop(a);
        let got = waiter.await.expect("join").expect("a slot");
        assert_eq!(got, freed, "no wait beyond the release");
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_closes_the_gate_for_everyone() {
        let g = Governor::new(config(10, 10, 60_000));
        g.throttled(Duration::from_secs(2));
        let start = Instant::now();
        let (a, b) = tokio::join!(g.acquire(), g.acquire());
        assert!(a.is_ok() && b.is_ok());
        assert!(start.elapsed() >= Duration::from_secs(2));
        assert_eq!(g.stats().waits.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn retry_after_parses_seconds() {
        let mut h = http::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("17"),
        );
        assert_eq!(retry_after(&h), Some(Duration::from_secs(17)));
        h.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("0.5"),
        );
        assert_eq!(retry_after(&h), Some(Duration::from_millis(500)));
        h.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
    }
}
