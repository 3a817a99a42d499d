//! One org's view of the shared state: the [`SlotStore`] the governor
//! takes its slots from while Redis answers.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::Notify;

use super::{OrgShared, SharedRedis, lock};
use crate::governor::store::{Ask, Lease, SlotStore, StoreError, StoreFuture, TryAcquire, Waiter};

/// One org's view of the shared state.
pub struct RedisStore {
    pub(super) redis: Arc<SharedRedis>,
    pub(super) org: Arc<OrgShared>,
    /// This store's own id among the stores of its channel.
    pub(super) id: u64,
}

impl RedisStore {
    /// Its governor is dropped: no more messages for it.
    pub fn forget(&self) {
        self.redis.forget(&self.org.channel, self.id);
    }

    /// Whether the shared state is in use.
    pub fn is_shared(&self) -> bool {
        self.redis.is_shared()
    }

    /// While returning, registers this replica's fallback slots in Redis
    /// at once (a slot just taken must be counted before a replica that
    /// is back on the shared state next takes one).
    pub async fn register_if_returning(&self) {
        if self.redis.state() == super::State::Returning {
            self.redis.register_local(&self.org).await;
        }
    }

    /// Whether the shared state was lost too recently for the fallback cap.
    pub fn settling(&self) -> bool {
        self.redis.settling()
    }

    /// The fallback slots to leave for other replicas' slots beyond their
    /// `share` (see [`SharedRedis::reserve`]).
    pub fn reserve(&self, share: usize, max_hold: Duration) -> usize {
        self.redis.reserve(&self.org, share, max_hold)
    }

    /// Where the shared state stands, and why it left `shared` last.
    pub fn state(&self) -> (super::State, &'static str) {
        (self.redis.state(), self.redis.reason())
    }

    /// Closes every replica's gate for `wait`.
    pub async fn close_gate(&self, wait: Duration) -> Result<(), StoreError> {
        let mut call = self
            .redis
            .scripts
            .gate
            .key(format!("{}:gate", self.org.key));
        call.arg(wait.as_millis().max(1) as u64)
            .arg(&self.org.channel);
        self.redis.run::<i64>(call).await.map(|_| ())
    }

    /// Lowers the shared limit (once per `hold`); the new limit.
    pub async fn lower_limit(
        &self,
        current: usize,
        floor: usize,
        hold: Duration,
    ) -> Result<usize, StoreError> {
        let mut call = self
            .redis
            .scripts
            .lower
            .key(format!("{}:limit", self.org.key));
        call.key(format!("{}:limit-hold", self.org.key));
        call.arg(current)
            .arg(floor)
            .arg(hold.as_millis() as u64)
            .arg(self.org.bounds.ceiling);
        self.redis.run::<usize>(call).await
    }

    /// Moves the shared limit one step towards `target`; the new limit.
    pub async fn raise_limit(&self, current: usize, target: usize) -> Result<usize, StoreError> {
        let mut call = self
            .redis
            .scripts
            .raise
            .key(format!("{}:limit", self.org.key));
        let b = self.org.bounds;
        call.arg(current).arg(target).arg(b.min).arg(b.ceiling);
        self.redis.run::<usize>(call).await
    }
}

impl SlotStore for RedisStore {
    fn try_acquire(&self, ask: Ask<'_>) -> StoreFuture<'_, TryAcquire> {
        let ticket = ask.waiter.map_or(String::new(), |w| {
            lock(&self.org.heads).insert(w.seq, w.wake.clone());
            self.org.ticket(w)
        });
        let seq = ask.waiter.map(|w| w.seq);
        let (flow, cost) = (ask.flow.key.clone(), ask.flow.cost());
        Box::pin(async move {
            if lock(&self.org.epoch).is_empty() {
                self.redis.adopt_epoch(&self.org).await?;
            }
            // The replica first: what each replica holds is read from the ids.
            let id = format!("{}:{}", self.org.replica, uuid::Uuid::new_v4().simple());
            let key = &self.org.key;
            let mut call = self.redis.scripts.acquire.key(format!("{key}:leases"));
            for k in [
                "limit",
                "gate",
                "queue",
                "queue-seen",
                "tags",
                "vtime",
                "tags-used",
                "epoch",
            ] {
                call.key(format!("{key}:{k}"));
            }
            let b = self.org.bounds;
            call.arg(self.redis.lease_time.as_millis() as u64)
                .arg(&id)
                .arg(ask.limit)
                .arg(&ticket)
                .arg(&*flow)
                .arg(cost)
                .arg(b.min)
                .arg(b.ceiling)
                .arg(b.max_gate.as_millis().max(1) as u64)
                .arg(ask.extra)
                .arg(&*lock(&self.org.epoch));
            let (code, value): (i64, u64) = self.redis.run(call).await?;
            if code == 3 {
                self.redis
                    .lost_state("state lost (a restart, flush or failover)");
                self.redis.adopt_epoch(&self.org).await?;
                return Err(StoreError("Redis lost the shared state".to_owned()));
            }
            Ok(match code {
                1 => {
                    if let Some(seq) = seq {
                        lock(&self.org.heads).remove(&seq);
                    }
                    lock(&self.org.held).insert(id.clone());
                    let limit = (value as usize).clamp(b.min, b.ceiling);
                    self.org.limit.store(limit, Ordering::Relaxed);
                    TryAcquire::Got {
                        lease: Lease::Shared(id),
                        limit,
                    }
                }
                2 => TryAcquire::Gated(Duration::from_millis(value).min(b.max_gate)),
                _ => TryAcquire::Full,
            })
        })
    }

    fn release(&self, lease: Lease) {
        let Lease::Shared(id) = lease else {
            return;
        };
        lock(&self.org.held).remove(&id);
        let (redis, org) = (self.redis.clone(), self.org.clone());
        let limit = self.org.limit.load(Ordering::Relaxed);
        let release = async move {
            let mut call = redis.scripts.release.key(format!("{}:leases", org.key));
            call.key(format!("{}:queue", org.key));
            call.arg(&id).arg(&org.channel).arg(limit);
            // A lease Redis never hears back about expires by itself.
            let _ = redis.run::<i64>(call).await;
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(release);
        }
    }

    fn released(&self) -> &Notify {
        &self.org.released
    }

    fn leave(&self, waiter: &Waiter) {
        lock(&self.org.heads).remove(&waiter.seq);
        let (redis, org) = (self.redis.clone(), self.org.clone());
        let ticket = org.ticket(waiter);
        let leave = async move {
            let mut call = redis.scripts.leave.key(format!("{}:queue", org.key));
            call.key(format!("{}:queue-seen", org.key));
            call.arg(&ticket);
            // A ticket Redis never hears back about is dropped after a second.
            let _ = redis.run::<i64>(call).await;
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(leave);
        }
    }

    fn taken(&self) -> usize {
        lock(&self.org.held).len()
    }
}
