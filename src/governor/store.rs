//! Where the governor's slots live: in this process ([`LocalStore`]) or
//! shared by every replica through Redis (`redis.rs`). The governor waits,
//! queues and adapts the same way over either; a store only answers "take
//! a slot under this limit", "give it back", and wakes waiters when a slot
//! may have come free.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

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

/// The head of this replica's queue. A shared store keeps one ticket per
/// replica in line, dated by its head's arrival, and serves the ticket
/// whose head has waited longest, across all replicas.
#[derive(Debug, Clone, Copy)]
pub struct Waiter {
    /// Time since the head arrived.
    pub waited: Duration,
    /// Callers wait behind the head (the ticket stays in line after a grant).
    pub more: bool,
}

/// Slots under a limit; see the module comment.
pub trait SlotStore: Send + Sync + 'static {
    /// Takes a slot if fewer than `limit` are taken (a shared store uses
    /// the shared limit, `limit` only when none is stored yet). `waiter` is
    /// `None` for a caller that has not queued: it gets a slot only when no
    /// caller waits anywhere.
    fn try_acquire(&self, limit: usize, waiter: Option<Waiter>) -> StoreFuture<'_, TryAcquire>;
    /// Gives a slot back (a shared store does so in the background).
    fn release(&self, lease: Lease);
    /// Notified when a slot may have come free.
    fn released(&self) -> &Notify;
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
    fn try_acquire(&self, limit: usize, _waiter: Option<Waiter>) -> StoreFuture<'_, TryAcquire> {
        let mut taken = self.lock();
        let answer = if *taken < limit {
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
