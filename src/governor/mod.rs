//! The service-protection governor of one org.
//!
//! Every caller of the proxy shares one application user, and Dataverse
//! limits a user per web server to 52 concurrent requests, 6000 requests and
//! 1,200 s of execution time per 5 minutes (docs/dataverse.md, "Service
//! protection limits"). The governor keeps the whole proxy (every replica)
//! under those limits instead of letting each caller find them out:
//!
//! - a **concurrency limit** held from sending a request until Dataverse's
//!   answer has ended (a caller that goes away leaves its slot taken for a
//!   short grace, since Dataverse may still be executing its request);
//!   the limit **adapts** ([`adaptive`]): a concurrency 429 lowers it, runs
//!   of successes raise it again towards `x-ms-dop-hint`;
//! - a **bounded queue** for callers over the limit, with a queue timeout;
//!   a full queue or a timeout answers 429 with `Retry-After`;
//! - a **gate**: a request-count or execution-time 429 with `Retry-After: N`
//!   closes the gate for N seconds for *every* caller of the org, since they
//!   all share the throttled user; waiting callers resume when it reopens;
//! - a **retry budget** ([`budget`]) for replays of transient failures.
//!
//! The slots and the gate live in a store ([`store`]): this process's, or
//! one shared by every replica through Redis ([`redis`]), with the local
//! store and a fallback cap whenever Redis does not answer.
//!
//! The retry decisions (replay a throttled or failed request) are made by
//! the forwarding handler, which knows whether the body can be replayed.

pub mod adaptive;
pub mod budget;
pub mod redis;
pub mod store;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

pub use adaptive::{AdaptiveLimit, Throttle};
pub use budget::RetryBudget;
pub use redis::{RedisStore, SharedRedis};
pub use store::{Gate, Lease, LocalStore, SlotStore, TryAcquire};

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
    /// Requests of this replica holding a slot now.
    pub in_flight: AtomicUsize,
    /// Callers waiting for a slot or for the gate now.
    pub queued: AtomicUsize,
    /// Callers that had to wait at all.
    pub waits: AtomicU64,
    /// 429 answers seen from Dataverse, by kind, in [`Throttle::ALL`]'s order.
    pub throttled: [AtomicU64; 4],
    /// Throttled requests replayed after the wait.
    pub retries: AtomicU64,
    /// Transient failures (unreachable, 502/503/504) replayed.
    pub transient_retries: AtomicU64,
    /// Transient failures not replayed because the retry budget was used up.
    pub budget_exhausted: AtomicU64,
    /// Callers turned away (queue full or queue timeout).
    pub rejected: AtomicU64,
    /// Last `x-ms-dop-hint` seen (Dataverse's recommended parallelism), 0 if none.
    pub dop_hint: AtomicUsize,
}

impl GovernorStats {
    /// All 429s seen.
    pub fn throttled_total(&self) -> u64 {
        self.throttled
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// The governor of one org. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Governor {
    inner: Arc<Inner>,
}

struct Inner {
    /// Swapped whole by a reload ([`Governor::reconfigure`]).
    config: arc_swap::ArcSwap<GovernorConfig>,
    local: Arc<LocalStore>,
    shared: Option<Arc<RedisStore>>,
    limit: Mutex<AdaptiveLimit>,
    gate: Arc<Gate>,
    budget: RetryBudget,
    stats: Arc<GovernorStats>,
    /// Held by the callers at the head of this replica's queue: only they
    /// try for slots, the rest wait their turn here (FIFO), so a long queue
    /// costs the shared store a few attempts per release, not one per
    /// waiter. A few rather than one: each attempt is a round trip, and one
    /// head at a time could not take freed slots as fast as they free up.
    heads: tokio::sync::Semaphore,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Governor")
            .field("in_flight", &self.stats.in_flight)
            .field("shared", &self.shared.is_some())
            .finish_non_exhaustive()
    }
}

/// A slot towards the org; given back on drop: at once, unless a request
/// was sent on it ([`Permit::arm`]) and its answer has not ended
/// ([`Permit::finish`]): then after the disconnect grace.
pub struct Permit {
    lease: Option<Lease>,
    store: Arc<dyn SlotStore>,
    stats: Arc<GovernorStats>,
    /// The grace in force: zero until armed, and again once finished.
    grace: Duration,
    disconnect_grace: Duration,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl Permit {
    /// A request is on its way to Dataverse: from now until its answer
    /// ends, dropping the permit keeps the slot for the disconnect grace.
    pub fn arm(&mut self) {
        self.grace = self.disconnect_grace;
    }

    /// Dataverse's answer has ended: the slot is free at once.
    pub fn finish(mut self) {
        self.grace = Duration::ZERO;
    }

    /// Marks the request ended without dropping the permit yet.
    pub fn set_finished(&mut self) {
        self.grace = Duration::ZERO;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let (store, stats) = (self.store.clone(), self.stats.clone());
        let release = move || {
            stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            store.release(lease);
        };
        match tokio::runtime::Handle::try_current() {
            // Dataverse may still be executing the request: keep counting it.
            Ok(handle) if !self.grace.is_zero() => {
                let grace = self.grace;
                handle.spawn(async move {
                    tokio::time::sleep(grace).await;
                    release();
                });
            }
            _ => release(),
        }
    }
}

/// Decrements the queue length however the wait ends.
struct Queued<'a>(&'a GovernorStats);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Callers of one replica trying for slots at once (the rest queue behind).
const HEADS: usize = 8;

/// Longest pause between two attempts at a shared slot when no release was
/// announced (a lost message, an expired lease). Only the head of this
/// replica's queue polls, so the cost does not grow with the queue.
const SHARED_POLL: Duration = Duration::from_millis(20);

impl Governor {
    /// A governor of this process only.
    pub fn new(config: GovernorConfig) -> Self {
        Self::build(config, |_| None)
    }

    /// A governor whose slots, gate and limit are shared through `redis`
    /// under `org`'s keys.
    pub fn shared(config: GovernorConfig, redis: &Arc<SharedRedis>, org: &str) -> Self {
        Self::build(config, |gate| Some(Arc::new(redis.store(org, gate))))
    }

    fn build(
        config: GovernorConfig,
        shared: impl FnOnce(Arc<Gate>) -> Option<Arc<RedisStore>>,
    ) -> Self {
        let gate = Arc::new(Gate::default());
        let shared = shared(gate.clone());
        // One of several replicas governing alone cannot know what the
        // others spend: Dataverse's hint may then only lower its limit.
        let ceiling = if shared.is_some() || config.expected_replicas <= 1 {
            config.ceiling
        } else {
            config.max_concurrency
        };
        let limit = AdaptiveLimit::new(config.max_concurrency, config.min_concurrency, ceiling);
        let stats = Arc::new(GovernorStats::default());
        Self {
            inner: Arc::new(Inner {
                shared,
                local: Arc::new(LocalStore::default()),
                limit: Mutex::new(limit),
                gate,
                budget: RetryBudget::new(config.retry_budget, config.min_retries),
                stats,
                heads: tokio::sync::Semaphore::new(HEADS),
                config: arc_swap::ArcSwap::from_pointee(config),
            }),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &GovernorStats {
        &self.inner.stats
    }

    /// The concurrency limit in force now (the shared one, with Redis).
    pub fn limit(&self) -> usize {
        self.adaptive().get()
    }

    /// The configuration in force.
    pub fn config(&self) -> arc_swap::Guard<Arc<GovernorConfig>> {
        self.inner.config.load()
    }

    /// Takes new settings from a reload: the queue, the replays and the
    /// limit's bounds apply from the next request on (the limit itself is
    /// kept within the new bounds). The shared state, the replica count and
    /// the retry budget stay as started (they need a restart).
    pub fn reconfigure(&self, mut config: GovernorConfig) {
        let old = self.config();
        config.redis = old.redis.clone();
        config.expected_replicas = old.expected_replicas;
        config.retry_budget = old.retry_budget;
        config.min_retries = old.min_retries;
        let ceiling = if self.inner.shared.is_some() || config.expected_replicas <= 1 {
            config.ceiling
        } else {
            config.max_concurrency
        };
        self.adaptive()
            .rebound(config.max_concurrency, config.min_concurrency, ceiling);
        self.inner.config.store(Arc::new(config));
    }

    /// `Some(true)` while the shared state is in use, `Some(false)` while
    /// on the local fallback cap, `None` without shared state.
    pub fn shared_state(&self) -> Option<bool> {
        self.inner.shared.as_ref().map(|s| s.is_shared())
    }

    /// When the gate reopens, if it is closed now.
    pub fn gate_closed_until(&self) -> Option<Instant> {
        self.inner.gate.closed_until()
    }

    fn adaptive(&self) -> std::sync::MutexGuard<'_, AdaptiveLimit> {
        self.inner
            .limit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The store to take slots from now, and the limit to take them under.
    fn store(&self) -> (Arc<dyn SlotStore>, usize) {
        let inner = &self.inner;
        match &inner.shared {
            Some(shared) if shared.is_shared() => (shared.clone(), self.adaptive().get()),
            // Redis does not answer: this replica's share of the limit.
            Some(_) => (
                inner.local.clone(),
                inner.config.load().fallback_concurrency,
            ),
            None => (inner.local.clone(), self.adaptive().get()),
        }
    }

    /// One attempt at a slot.
    async fn try_once(&self, waiter: Option<store::Waiter>) -> Option<Permit> {
        let (store, limit) = self.store();
        let answer = match store.try_acquire(limit, waiter).await {
            Ok(a) => a,
            // Just marked down: the next attempt uses the local store.
            Err(_) => return None,
        };
        match answer {
            TryAcquire::Got { lease, limit } => {
                if self.inner.shared.as_ref().is_some_and(|s| s.is_shared()) {
                    self.adaptive().set(limit);
                }
                Some(self.permit(lease, store))
            }
            TryAcquire::Gated(wait) => {
                self.inner.gate.close(wait);
                None
            }
            TryAcquire::Full => None,
        }
    }

    fn permit(&self, lease: Lease, store: Arc<dyn SlotStore>) -> Permit {
        let stats = self.inner.stats.clone();
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Permit {
            lease: Some(lease),
            store,
            stats,
            grace: Duration::ZERO,
            disconnect_grace: self.inner.config.load().disconnect_grace,
        }
    }

    /// Waits for the gate and a slot; 429 when the queue is full or the wait
    /// exceeds the queue timeout.
    pub async fn acquire(&self) -> Result<Permit, GovernorError> {
        let inner = &self.inner;
        let stats = &inner.stats;
        // Straight to a slot only when nobody is queued ahead.
        if self.gate_closed_until().is_none()
            && stats.queued.load(Ordering::Relaxed) == 0
            && let Some(p) = self.try_once(None).await
        {
            return Ok(p);
        }
        let queued = stats.queued.fetch_add(1, Ordering::Relaxed);
        let _queued = Queued(stats);
        if queued >= inner.config.load().max_queue {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(GovernorError::QueueFull {
                retry_after: self.suggested_retry(),
            });
        }
        stats.waits.fetch_add(1, Ordering::Relaxed);
        let arrived = Instant::now();
        match tokio::time::timeout(
            inner.config.load().queue_timeout,
            self.wait_for_slot(arrived),
        )
        .await
        {
            Ok(p) => Ok(p),
            Err(_) => {
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                Err(GovernorError::QueueTimeout {
                    waited: inner.config.load().queue_timeout,
                    retry_after: self.suggested_retry(),
                })
            }
        }
    }

    /// Waits for the head of the queue, then retries until a slot is free
    /// and the gate open, woken by releases. With shared state this
    /// replica's ticket, dated by its longest-waiting head, puts it in line with
    /// the other replicas: the longest-waiting head of all gets the next slot.
    async fn wait_for_slot(&self, arrived: Instant) -> Permit {
        let _head = self.inner.heads.acquire().await;
        loop {
            if let Some(until) = self.gate_closed_until() {
                tokio::time::sleep_until(until).await;
                continue;
            }
            let (store, _) = self.store();
            let released = store.released().notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let waiter = store::Waiter {
                waited: arrived.elapsed(),
                more: self.inner.stats.queued.load(Ordering::Relaxed) > 1,
            };
            if let Some(p) = self.try_once(Some(waiter)).await {
                return p;
            }
            let poll = if self.shared_state() == Some(true) {
                SHARED_POLL
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                () = released => {}
                () = tokio::time::sleep(poll) => {}
            }
        }
    }

    /// What to tell a turned-away caller: the gate's remaining time, or a second.
    fn suggested_retry(&self) -> Duration {
        self.gate_closed_until()
            .map_or(Duration::from_secs(1), |until| until - Instant::now())
    }

    /// Dataverse answered 429 of `kind` with `retry_after`: a concurrency
    /// 429 lowers the limit; the others close the gate for everyone.
    pub fn throttled(&self, kind: Throttle, retry_after: Duration) {
        let inner = &self.inner;
        inner.stats.throttled[kind as usize].fetch_add(1, Ordering::Relaxed);
        if kind == Throttle::Concurrency {
            self.lower_limit();
            return;
        }
        let wait = retry_after.min(inner.config.load().max_retry_after);
        inner.gate.close(wait);
        if let Some(shared) = inner.shared.clone().filter(|s| s.is_shared()) {
            tokio::spawn(async move {
                let _ = shared.close_gate(wait).await;
            });
        }
        tracing::warn!(
            retry_after_ms = retry_after.as_millis() as u64,
            kind = kind.label(),
            "Dataverse throttled the application user; pausing all callers of this org"
        );
    }

    fn lower_limit(&self) {
        let (lowered, now) = {
            let mut l = self.adaptive();
            (l.concurrency_throttled(Instant::now()), l.get())
        };
        if !lowered {
            return;
        }
        tracing::warn!(
            limit = now,
            "Dataverse refused a request for concurrency; lowering the limit"
        );
        if let Some(shared) = self.inner.shared.clone().filter(|s| s.is_shared()) {
            let (governor, floor) = (self.clone(), self.adaptive().floor());
            tokio::spawn(async move {
                if let Ok(l) = shared
                    .lower_limit(now, floor, adaptive::DECREASE_HOLD)
                    .await
                {
                    governor.adopt(l);
                }
            });
        }
    }

    /// An answer that was not throttled: after a run of them the limit grows.
    pub fn succeeded(&self) {
        let (raised, now, target) = {
            let mut l = self.adaptive();
            (l.success(), l.get(), l.target())
        };
        if !raised {
            return;
        }
        if let Some(shared) = self.inner.shared.clone().filter(|s| s.is_shared()) {
            let governor = self.clone();
            tokio::spawn(async move {
                if let Ok(l) = shared.raise_limit(now - 1, target).await {
                    governor.adopt(l);
                }
            });
        }
    }

    /// Takes the shared limit.
    fn adopt(&self, limit: usize) {
        self.adaptive().set(limit);
    }

    /// Counts a replayed request.
    pub fn retried(&self) {
        self.inner.stats.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a first attempt for the retry budget.
    pub fn sent(&self) {
        self.inner.budget.request();
    }

    /// Takes a transient-failure retry from the budget.
    pub fn try_transient_retry(&self) -> bool {
        let stats = &self.inner.stats;
        if self.inner.budget.try_retry() {
            stats.transient_retries.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            stats.budget_exhausted.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Records Dataverse's recommended degree of parallelism.
    pub fn dop_hint(&self, hint: usize) {
        self.inner.stats.dop_hint.store(hint, Ordering::Relaxed);
        self.adaptive().hint(hint);
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
mod tests;
