//! A slot towards the org and how it is given back.
//!
//! A slot is given back when the permit is dropped: at once, unless a
//! request was sent on it ([`Permit::arm`]) and Dataverse has not answered
//! yet ([`Permit::answered`]): then after the disconnect grace, since
//! Dataverse may still be executing the request. However the caller
//! behaves, no slot is held longer than `governor.max_hold`: [`Holds`]
//! releases it then (Dataverse itself gives up on a request after about two
//! minutes).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::GovernorStats;
use super::store::{Lease, SlotStore};

/// A taken slot, shared by its permit and the [`Holds`] list.
pub(super) struct Held {
    lease: Mutex<Option<Lease>>,
    store: Arc<dyn SlotStore>,
    stats: Arc<GovernorStats>,
    since: Instant,
}

impl Held {
    /// Gives the slot back if it is still taken; true if it was.
    fn release(&self) -> bool {
        let lease = self
            .lease
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(lease) = lease else {
            return false;
        };
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.store.release(lease);
        true
    }
}

/// The slots this governor has handed out, to release those held past
/// `max_hold`.
#[derive(Default)]
pub(super) struct Holds {
    list: Mutex<Vec<Weak<Held>>>,
}

impl Holds {
    fn push(&self, held: &Arc<Held>) {
        let mut list = self
            .list
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if list.len() >= 1024 && list.len().is_power_of_two() {
            list.retain(|w| w.strong_count() > 0);
        }
        list.push(Arc::downgrade(held));
    }

    /// Releases every slot taken more than `max_hold` ago; how many.
    pub(super) fn release_older_than(&self, max_hold: Duration) -> usize {
        let now = Instant::now();
        let overdue: Vec<Arc<Held>> = {
            let mut list = self
                .list
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            list.retain(|w| w.strong_count() > 0);
            list.iter()
                .filter_map(Weak::upgrade)
                .filter(|h| now.duration_since(h.since) >= max_hold)
                .collect()
        };
        overdue.iter().filter(|h| h.release()).count()
    }
}

/// A slot towards the org; see the module comment.
pub struct Permit {
    held: Arc<Held>,
    /// The grace in force: zero until armed, and again once answered.
    grace: Duration,
    disconnect_grace: Duration,
    /// The caller's own cap (`max_concurrency`), held as long as the slot.
    _cap: Option<OwnedSemaphorePermit>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl Permit {
    pub(super) fn new(
        (lease, store): (Lease, Arc<dyn SlotStore>),
        stats: Arc<GovernorStats>,
        holds: &Holds,
        disconnect_grace: Duration,
        cap: Option<OwnedSemaphorePermit>,
    ) -> Self {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let held = Arc::new(Held {
            lease: Mutex::new(Some(lease)),
            store,
            stats,
            since: Instant::now(),
        });
        holds.push(&held);
        Self {
            held,
            grace: Duration::ZERO,
            disconnect_grace,
            _cap: cap,
        }
    }

    /// Gives up the caller's cap it holds, for the next slot of the same
    /// request (a lane failover): waiting for another place under the cap
    /// while holding one would wait on itself.
    pub fn take_cap(&mut self) -> Option<OwnedSemaphorePermit> {
        self._cap.take()
    }

    /// Holds `cap` (a caller's cap taken outside this governor, by the
    /// org's lanes) as long as the slot.
    pub fn with_cap(mut self, cap: Option<OwnedSemaphorePermit>) -> Self {
        if cap.is_some() {
            self._cap = cap;
        }
        self
    }

    /// A request is on its way to Dataverse: until it answers, dropping
    /// the permit keeps the slot for the disconnect grace.
    pub fn arm(&mut self) {
        self.grace = self.disconnect_grace;
    }

    /// Dataverse has answered (its headers arrived): from now on the slot
    /// is given back at once when the permit goes.
    pub fn answered(&mut self) {
        self.grace = Duration::ZERO;
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
        let held = self.held.clone();
        match tokio::runtime::Handle::try_current() {
            // Dataverse may still be executing the request: keep counting it.
            Ok(handle) if !self.grace.is_zero() => {
                let grace = self.grace;
                handle.spawn(async move {
                    tokio::time::sleep(grace).await;
                    held.release();
                });
            }
            _ => {
                held.release();
            }
        }
    }
}

/// Releases the slots held past `max_hold`, while the governor lives.
pub(super) async fn release_overdue(inner: Weak<super::Inner>) {
    loop {
        let period = match inner.upgrade() {
            Some(i) => (i.config.load().max_hold / 8)
                .clamp(Duration::from_millis(100), Duration::from_secs(5)),
            None => return,
        };
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let max_hold = inner.config.load().max_hold;
        let released = inner.holds.release_older_than(max_hold);
        if released > 0 {
            inner
                .stats
                .held_too_long
                .fetch_add(released as u64, Ordering::Relaxed);
            tracing::warn!(
                released,
                max_hold_ms = max_hold.as_millis() as u64,
                "governor slots held longer than governor.max_hold released"
            );
        }
    }
}
