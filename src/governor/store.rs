//! Where the governor's slots live: in this process ([`LocalStore`]) or
//! shared by every replica through Redis (`redis.rs`). The governor waits,
//! queues and adapts the same way over either; a store only answers "take
//! a slot under this limit", "give it back", and wakes waiters when a slot
//! may have come free.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::flow::Flow;

/// A slot taken from a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// A slot of this process.
    Local,
    /// A lease in the shared store, by id; it expires unless renewed.
    Shared(String),
}

/// The answer to one attempt at a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TryAcquire {
    /// A slot; `limit` is the limit it was taken under.
    Got {
        /// The lease.
        lease: Lease,
        /// The limit in force (the shared one, for a shared store).
        limit: usize,
    },
    /// All slots are taken.
    Full,
    /// Another replica closed the gate; it reopens after this.
    Gated(Duration),
}

/// The shared store did not answer in time or failed; the governor falls
/// back to its local cap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the shared governor state is unavailable: {0}")]
pub struct StoreError(pub String);

/// A boxed future of a store operation.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A head of this replica's queue (see `fair.rs`). A shared store keeps
/// a ticket per head, ordered by its flow's fair-share tag across replicas,
/// and wakes the heads whose tickets come first when slots free up.
#[derive(Debug, Clone)]
pub struct Waiter {
    /// Unique among this replica's waiters.
    pub seq: u64,
    /// Notified when this head should try again.
    pub wake: Arc<Notify>,
    /// When it became a head (Unix milliseconds): orders equal tags.
    pub since: u64,
}

/// One attempt at a slot.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The limit to take it under (a shared store uses the shared limit,
    /// this one only when none is stored yet).
    pub limit: usize,
    /// Who it is for (the fair share).
    pub flow: &'a Flow,
    /// `None` for a caller that has not queued: it gets a slot only when
    /// no caller waits anywhere.
    pub waiter: Option<&'a Waiter>,
    /// Slots this replica holds outside this store (taken from the other
    /// store while moving between shared and local), counted as taken.
    pub extra: usize,
}

/// Slots under a limit; see the module comment.
pub trait SlotStore: Send + Sync + 'static {
    /// Takes a slot if fewer than the limit are taken and no better-placed
    /// waiter is ahead.
    fn try_acquire(&self, ask: Ask<'_>) -> StoreFuture<'_, TryAcquire>;
    /// Gives a slot back (a shared store does so in the background).
    fn release(&self, lease: Lease);
    /// Notified when a slot may have come free.
    fn released(&self) -> &Notify;
    /// A head leaves without a slot (timed out, or its caller left).
    fn leave(&self, _waiter: &Waiter) {}
    /// Slots this replica holds from this store now.
    fn taken(&self) -> usize;
}

/// The slots of this process.
#[derive(Debug, Default)]
pub struct LocalStore {
    taken: Mutex<usize>,
    released: Notify,
}

impl LocalStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.taken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl SlotStore for LocalStore {
    fn try_acquire(&self, ask: Ask<'_>) -> StoreFuture<'_, TryAcquire> {
        let limit = ask.limit;
        let mut taken = self.lock();
        let answer = if *taken + ask.extra < limit {
            *taken += 1;
            TryAcquire::Got {
                lease: Lease::Local,
                limit,
            }
        } else {
            TryAcquire::Full
        };
        drop(taken);
        Box::pin(std::future::ready(Ok(answer)))
    }

    fn release(&self, _lease: Lease) {
        let mut taken = self.lock();
        *taken = taken.saturating_sub(1);
        drop(taken);
        self.released.notify_one();
    }

    fn released(&self) -> &Notify {
        &self.released
    }

    fn taken(&self) -> usize {
        *self.lock()
    }
}

/// The Retry-After gate of one org: closed until an instant, for every
/// caller of this replica (and, through the shared store, of every replica).
#[derive(Debug, Default)]
pub struct Gate {
    until: Mutex<Option<tokio::time::Instant>>,
}

impl Gate {
    /// When the gate reopens, if it is closed now.
    pub fn closed_until(&self) -> Option<tokio::time::Instant> {
        let until = self
            .until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        until.filter(|u| *u > tokio::time::Instant::now())
    }

    /// Closes the gate for `wait` from now (a longer closing wins).
    pub fn close(&self, wait: Duration) {
        let new = tokio::time::Instant::now() + wait;
        let mut until = self
            .until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if until.is_none_or(|u| u < new) {
            *until = Some(new);
        }
    }
}
