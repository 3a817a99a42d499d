//! Keeping this replica's slots known to Redis (leases renewed, fallback
//! slots registered) and finding out when Redis lost them: an org's epoch
//! that changed, or a lease of this replica's that is gone, sends the
//! replica returning, as after an outage.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{OrgShared, REGISTER_EVERY, SharedRedis, State, lock};
use crate::governor::store::{SlotStore, StoreError};

impl SharedRedis {
    /// Redis answers but lost the shared state (restarted empty, flushed,
    /// failed over to a replica that missed the last writes): returning,
    /// as after an outage, so that the leases and fallback slots of every
    /// replica are written again before any takes slots from it.
    pub(super) fn lost_state(&self, why: &'static str) {
        let mut since = lock(&self.returned_at);
        if self.state() != State::Shared {
            return;
        }
        *lock(&self.lost_at) = Some(tokio::time::Instant::now());
        *since = Some(tokio::time::Instant::now());
        *lock(&self.reason) = why;
        self.state.store(State::Returning as u8, Ordering::Relaxed);
        self.losses.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            reason = why,
            "Redis lost the shared governor state: registering this replica's slots again before using it"
        );
    }

    /// Learns `org`'s epoch, writing one when Redis has none.
    pub(super) async fn adopt_epoch(&self, org: &OrgShared) -> Result<(), StoreError> {
        let mut call = self.scripts.epoch.key(format!("{}:epoch", org.key));
        call.arg(uuid::Uuid::new_v4().simple().to_string());
        let epoch: String = self.run(call).await?;
        *lock(&org.epoch) = epoch;
        Ok(())
    }

    /// Keeps this replica's slots known to Redis: the leases it holds
    /// (renewed, and written again if Redis lost them), and the slots it
    /// holds on its local fallback cap.
    pub(super) async fn renew_leases(self: Arc<Self>) {
        let every = (self.lease_time / 3).clamp(Duration::from_millis(100), REGISTER_EVERY);
        loop {
            tokio::time::sleep(every).await;
            if self.state() == State::Down {
                continue;
            }
            for org in self.all_orgs() {
                self.renew(&org).await;
                self.register_local(&org).await;
            }
        }
    }

    /// Renews `org`'s leases and reads what the other replicas hold; a
    /// lost epoch or lease of this replica's means Redis lost the shared
    /// state, and the leases are written again at once.
    async fn renew(&self, org: &OrgShared) {
        let held: Vec<String> = lock(&org.held).iter().cloned().collect();
        let mut call = self.scripts.renew.key(format!("{}:leases", org.key));
        call.key(format!("{}:epoch", org.key));
        let readd = self.state() == State::Returning;
        call.arg(self.lease_time.as_millis() as u64)
            .arg(u8::from(readd))
            .arg(&org.replica);
        for id in &held {
            call.arg(id);
        }
        let Ok((epoch, missing, others)) =
            self.run::<(String, Vec<String>, Vec<String>)>(call).await
        else {
            return;
        };
        see_others(org, &others, readd);
        let known = lock(&org.epoch).clone();
        if known.is_empty() {
            let _ = self.adopt_epoch(org).await;
        }
        // A lease released since the list was read is missing rightly.
        let lost_lease = !readd && missing.iter().any(|id| lock(&org.held).contains(id));
        let lost_epoch = !known.is_empty() && epoch != known;
        if lost_epoch || lost_lease {
            self.lost_state(if lost_epoch {
                "state lost (a restart, flush or failover)"
            } else {
                "leases lost (a failover that missed the last writes)"
            });
            let _ = self.adopt_epoch(org).await;
            if !readd && self.state() == State::Returning {
                Box::pin(self.renew(org)).await;
            }
        }
    }

    /// Writes one lease per slot held on the local cap
    /// (`{replica}:local:{n}`), and takes out the ones no longer held.
    pub(super) async fn register_local(&self, org: &OrgShared) {
        let now = org.local.taken();
        let before = org.registered.load(Ordering::Relaxed);
        if now == 0 && before == 0 {
            return;
        }
        let mut call = self.scripts.presence.key(format!("{}:leases", org.key));
        call.arg(self.lease_time.as_millis() as u64)
            .arg(&org.replica)
            .arg(now)
            .arg(before.max(now));
        if self.run::<i64>(call).await.is_ok() {
            org.registered.store(now, Ordering::Relaxed);
        }
    }
}

/// Takes in what the other replicas hold (`replica, count, …`). Shared,
/// that is the view; while returning, what Redis holds may not yet count
/// every replica's slots (it may have come back empty), so a replica's
/// count only grows until the state is shared again.
fn see_others(org: &OrgShared, flat: &[String], returning: bool) {
    let seen = flat
        .chunks_exact(2)
        .filter_map(|pair| Some((pair[0].clone(), pair[1].parse::<usize>().ok()?)));
    let mut others = lock(&org.others);
    if !returning {
        *others = seen.collect();
        return;
    }
    for (replica, held) in seen {
        let known = others.entry(replica).or_default();
        *known = (*known).max(held);
    }
}
