//! What the governor tells its callers and its metrics: why a request got
//! no slot, and the counters.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

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
    /// 429 answers seen from Dataverse, by kind, in [`super::Throttle::ALL`]'s order.
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
    /// Slots released because they were held longer than `max_hold`.
    pub held_too_long: AtomicU64,
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

/// Decrements the queue length however the wait ends.
pub(super) struct Queued<'a>(pub(super) &'a GovernorStats);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
    }
}
