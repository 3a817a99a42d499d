//! The service-protection governor of one org.
//!
//! Every caller of the proxy shares one application user, and Dataverse
//! limits a user per web server to 52 concurrent requests, 6000 requests and
//! 1,200 s of execution time per 5 minutes (docs/dataverse.md, "Service
//! protection limits"). The governor keeps the whole proxy (every replica)
//! under those limits instead of letting each caller find them out:
//!
//! - a **concurrency limit** held from sending a request until Dataverse's
//!   answer has ended (a caller that goes away before Dataverse answers
//!   leaves its slot taken for a short grace, since Dataverse may still be
//!   executing its request), and never longer than `max_hold` ([`permit`]);
//!   the limit **adapts** ([`adaptive`]): a concurrency 429 lowers it, runs
//!   of successes raise it again towards `x-ms-dop-hint`;
//! - a **bounded queue** for callers over the limit, with a queue timeout;
//!   a full queue or a timeout answers 429 with `Retry-After`; waiting
//!   callers are served by their **fair share** ([`fair`]: weighted
//!   start-time fair queuing, per-caller caps), across replicas too;
//! - a **gate**: a request-count or execution-time 429 with `Retry-After: N`
//!   closes the gate for N seconds for *every* caller of the org, since they
//!   all share the throttled user; waiting callers resume when it reopens;
//! - a **retry budget** ([`budget`]) for replays of transient failures.
//!
//! The slots and the gate live in a store ([`store`]): without shared
//! state, with the fair queue itself, which hands each slot given back to
//! the next waiter ([`fair`]); with it, in Redis, shared by every replica
//! ([`redis`]), with a local store and a fallback cap whenever Redis does
//! not answer.
//!
//! The retry decisions (replay a throttled or failed request) are made by
//! the forwarding handler, which knows whether the body can be replayed.

pub mod adaptive;
pub mod budget;
pub mod fair;
pub mod flow;
pub mod permit;
pub mod redis;
pub mod stats;
pub mod store;
pub mod users;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

pub use adaptive::{AdaptiveLimit, Throttle};
pub use budget::RetryBudget;
pub use flow::Flow;
pub use permit::Permit;
pub use redis::{RedisStore, SharedRedis};
pub use stats::{GovernorError, GovernorStats};
pub use store::{Ask, Gate, Lease, LocalStore, SlotStore, TryAcquire};
pub use users::UserGovernors;

use fair::FairQueue;
use permit::Holds;

use crate::config::GovernorConfig;

/// The governor of one org. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Governor {
    inner: Arc<Inner>,
}

struct Inner {
    /// Swapped whole by a reload ([`Governor::reconfigure`]).
    config: arc_swap::ArcSwap<GovernorConfig>,
    /// With shared state, the fallback while Redis does not answer.
    local: Arc<LocalStore>,
    shared: Option<Arc<RedisStore>>,
    limit: Mutex<AdaptiveLimit>,
    gate: Arc<Gate>,
    budget: RetryBudget,
    stats: Arc<GovernorStats>,
    /// Without shared state, the slots themselves: each one given back goes
    /// to the best-placed waiter. With it, only the heads of this replica's
    /// queue try for slots; the rest wait their turn by fair share: a few
    /// heads (each attempt is a round trip; one could not take freed slots
    /// as fast as they free up), so a long queue costs Redis a few attempts
    /// per release, not one per waiter.
    queue: Arc<FairQueue>,
    /// Slots handed out, for `max_hold`.
    holds: Holds,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Governor")
            .field("in_flight", &self.stats.in_flight)
            .field("shared", &self.shared.is_some())
            .finish_non_exhaustive()
    }
}

/// A head that leaves without a slot takes its ticket out of line.
struct Leaving<'a> {
    governor: &'a Governor,
    waiter: &'a store::Waiter,
    granted: bool,
}

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        if !self.granted
            && let Some(shared) = &self.governor.inner.shared
        {
            shared.leave(self.waiter);
        }
    }
}

/// Callers of one replica trying for shared slots at once.
const HEADS: usize = 8;

/// Longest pause between two attempts at a shared slot when no wake-up
/// came (a lost message, an expired lease). Releases wake the heads whose
/// tickets come first, so this is only the safety net; only heads poll, so
/// the cost does not grow with the queue.
const SHARED_POLL: Duration = Duration::from_millis(100);

impl Governor {
    /// A governor of this process only.
    pub fn new(config: GovernorConfig) -> Self {
        Self::build(config, |_, _| None)
    }

    /// A governor whose slots, gate and limit are shared through `redis`
    /// under the keys of `org_key` (the org's host: two deployments of the
    /// same config name for different orgs never share a gate).
    pub fn shared(config: GovernorConfig, redis: &Arc<SharedRedis>, org_key: &str) -> Self {
        let bounds = redis::Bounds {
            min: config.min_concurrency,
            ceiling: config.ceiling,
            max_gate: config.max_retry_after,
        };
        Self::build(config, |gate, local| {
            Some(Arc::new(redis.store(org_key, gate, local, bounds)))
        })
    }

    fn build(
        config: GovernorConfig,
        shared: impl FnOnce(Arc<Gate>, Arc<LocalStore>) -> Option<Arc<RedisStore>>,
    ) -> Self {
        let gate = Arc::new(Gate::default());
        let local = Arc::new(LocalStore::default());
        let shared = shared(gate.clone(), local.clone());
        // One of several replicas governing alone cannot know what the
        // others spend: Dataverse's hint may then only lower its limit.
        let ceiling = if shared.is_some() || config.expected_replicas <= 1 {
            config.ceiling
        } else {
            config.max_concurrency
        };
        let limit = AdaptiveLimit::new(config.max_concurrency, config.min_concurrency, ceiling);
        let stats = Arc::new(GovernorStats::default());
        let queue = match shared {
            Some(_) => FairQueue::new(HEADS),
            None => FairQueue::with_slots(limit.get(), gate.clone()),
        };
        let governor = Self {
            inner: Arc::new(Inner {
                shared,
                local,
                limit: Mutex::new(limit),
                gate,
                budget: RetryBudget::new(config.retry_budget, config.min_retries),
                stats,
                queue: Arc::new(queue),
                holds: Holds::default(),
                config: arc_swap::ArcSwap::from_pointee(config),
            }),
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(permit::release_overdue(Arc::downgrade(&governor.inner)));
        }
        governor
    }

    /// Stops its shared store's messages (the governor is being dropped).
    pub fn forget_shared(&self) {
        if let Some(shared) = &self.inner.shared {
            shared.forget();
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
        self.limit_changed();
    }

    /// The limit moved or the gate reopened: slots kept with the queue
    /// (no shared state) go to waiters under the limit now in force.
    fn limit_changed(&self) {
        if self.inner.shared.is_none() {
            self.inner.queue.set_limit(self.limit());
        }
    }

    /// `Some(true)` while the shared state is in use, `Some(false)` while
    /// on the local fallback cap, `None` without shared state.
    pub fn shared_state(&self) -> Option<bool> {
        self.inner.shared.as_ref().map(|s| s.is_shared())
    }

    /// Where the shared state stands (shared, returning, local) and why it
    /// left `shared` last; `None` without shared state.
    pub fn shared_standing(&self) -> Option<(redis::State, &'static str)> {
        self.inner.shared.as_ref().map(|s| s.state())
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

    /// The store to take slots from now, the limit to take them under, and
    /// the slots this replica holds from the other store (counted as taken,
    /// so moving between shared and local never lets more than the limit
    /// in flight).
    fn store(&self) -> (Arc<dyn SlotStore>, usize, usize) {
        let inner = &self.inner;
        match &inner.shared {
            Some(shared) if shared.is_shared() => {
                (shared.clone(), self.adaptive().get(), inner.local.taken())
            }
            // Redis does not answer: this replica's share of the limit,
            // once the slots taken from Redis before had time to end.
            Some(shared) => {
                let config = inner.config.load();
                let share = match shared.settling() {
                    true => 0,
                    false => config.fallback_concurrency.saturating_sub(
                        shared.reserve(config.fallback_concurrency, config.max_hold),
                    ),
                };
                (inner.local.clone(), share, shared.taken())
            }
            None => (inner.queue.clone(), self.adaptive().get(), 0),
        }
    }

    /// One attempt at a slot.
    async fn try_once(
        &self,
        flow: &Flow,
        waiter: Option<&store::Waiter>,
        cap: &mut Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Option<Permit> {
        let (store, limit, extra) = self.store();
        let ask = Ask {
            limit,
            flow,
            waiter,
            extra,
        };
        let answer = match store.try_acquire(ask).await {
            Ok(a) => a,
            // Just marked down: the next attempt uses the local store.
            Err(_) => return None,
        };
        match answer {
            TryAcquire::Got { lease, limit } => {
                if let Some(shared) = &self.inner.shared {
                    if shared.is_shared() {
                        self.adaptive().set(limit);
                    } else {
                        shared.register_if_returning().await;
                    }
                }
                Some(self.permit(lease, store, cap.take()))
            }
            TryAcquire::Gated(wait) => {
                self.inner.gate.close(wait);
                None
            }
            TryAcquire::Full => None,
        }
    }

    fn permit(
        &self,
        lease: Lease,
        store: Arc<dyn SlotStore>,
        cap: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Permit {
        let inner = &self.inner;
        Permit::new(
            (lease, store),
            inner.stats.clone(),
            &inner.holds,
            inner.config.load().disconnect_grace,
            cap,
        )
    }

    /// A slot at once, or `None`: the gate is closed, callers are queued
    /// here already, or no slot is free. `flow`'s own cap is the caller's
    /// business (the org's lanes keep it across lanes).
    pub async fn try_now(&self, flow: &Flow) -> Option<Permit> {
        if self.gate_closed_until().is_some() || self.inner.stats.queued.load(Ordering::Relaxed) > 0
        {
            return None;
        }
        self.try_once(flow, None, &mut None).await
    }

    /// Slots free by this replica's count (the limit less what it holds
    /// and what waits here); negative when callers queue.
    pub fn room(&self) -> i64 {
        let stats = &self.inner.stats;
        let used = stats.in_flight.load(Ordering::Relaxed) + stats.queued.load(Ordering::Relaxed);
        self.limit() as i64 - used as i64
    }

    /// [`Self::acquire_for`] a caller nobody named (one flow for all).
    pub async fn acquire(&self) -> Result<Permit, GovernorError> {
        self.acquire_for(&Flow::default()).await
    }

    /// Waits for the gate and a slot for `flow`'s request; 429 when the
    /// queue is full or the wait exceeds the queue timeout.
    pub async fn acquire_for(&self, flow: &Flow) -> Result<Permit, GovernorError> {
        let inner = &self.inner;
        let stats = &inner.stats;
        let mut cap = match flow.max_concurrency {
            None => None,
            Some(_) => {
                let timeout = inner.config.load().queue_timeout;
                match tokio::time::timeout(timeout, inner.queue.cap(flow)).await {
                    Ok(cap) => cap,
                    Err(_) => return Err(self.timed_out()),
                }
            }
        };
        // Straight to a slot only when nobody is queued ahead.
        if self.gate_closed_until().is_none()
            && stats.queued.load(Ordering::Relaxed) == 0
            && let Some(p) = self.try_once(flow, None, &mut cap).await
        {
            return Ok(p);
        }
        let queued = stats.queued.fetch_add(1, Ordering::Relaxed);
        let _queued = stats::Queued(stats);
        if queued >= inner.config.load().max_queue {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(GovernorError::QueueFull {
                retry_after: self.suggested_retry(),
            });
        }
        stats.waits.fetch_add(1, Ordering::Relaxed);
        let timeout = inner.config.load().queue_timeout;
        let permit = if inner.shared.is_some() {
            tokio::time::timeout(timeout, self.wait_for_slot(flow, cap)).await
        } else {
            tokio::time::timeout(timeout, self.wait_for_grant(flow, cap)).await
        };
        permit.map_err(|_| self.timed_out())
    }

    /// Waits until the queue hands this request a slot given back (no
    /// shared state: the queue keeps the slots, and the gate and limit
    /// are checked where they are handed on).
    async fn wait_for_grant(
        &self,
        flow: &Flow,
        cap: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Permit {
        let place = self.inner.queue.enter(flow);
        place.turn().await;
        place.claim();
        self.permit(Lease::Local, self.inner.queue.clone(), cap)
    }

    fn timed_out(&self) -> GovernorError {
        self.inner.stats.rejected.fetch_add(1, Ordering::Relaxed);
        GovernorError::QueueTimeout {
            waited: self.inner.config.load().queue_timeout,
            retry_after: self.suggested_retry(),
        }
    }

    /// Waits for this request's turn at the head of the queue (by fair
    /// share), then retries until a slot is free and the gate open, woken
    /// by releases. With shared state each head has a ticket, ordered in
    /// Redis by its flow's tag, so the fair order holds across replicas.
    async fn wait_for_slot(
        &self,
        flow: &Flow,
        mut cap: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Permit {
        let place = self.inner.queue.enter(flow);
        place.turn().await;
        let waiter = store::Waiter {
            seq: place.seq(),
            wake: Arc::new(tokio::sync::Notify::new()),
            since: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        let mut leaving = Leaving {
            governor: self,
            waiter: &waiter,
            granted: false,
        };
        loop {
            if let Some(until) = self.gate_closed_until() {
                tokio::time::sleep_until(until).await;
                continue;
            }
            let (store, _, _) = self.store();
            let released = store.released().notified();
            let woken = waiter.wake.notified();
            tokio::pin!(released, woken);
            released.as_mut().enable();
            woken.as_mut().enable();
            if let Some(p) = self.try_once(flow, Some(&waiter), &mut cap).await {
                leaving.granted = true;
                return p;
            }
            let poll = if self.shared_state() == Some(true) {
                SHARED_POLL
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                () = released => {}
                () = woken => {}
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
        if inner.shared.is_none() {
            // Slots given back while the gate is closed stay free: the
            // waiters get them when it reopens.
            let governor = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                governor.limit_changed();
            });
        }
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
        self.limit_changed();
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
        self.limit_changed();
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
        let lowered = {
            let mut limit = self.adaptive();
            let before = limit.get();
            limit.hint(hint);
            limit.get() < before
        };
        if lowered {
            self.limit_changed();
        }
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
