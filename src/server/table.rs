//! The open connections: the cap (`limits.max_connections`), the cap per
//! source address (`limits.max_connections_per_ip`), and, when the cap is
//! reached, the oldest idle keep-alive connection closed to make room.
//!
//! A semaphore cannot say which connection to close; this table can, and a
//! new connection is refused only when every place is taken by a
//! connection with a request in progress (or still sending its first).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::watch::Activity;

/// How long a new connection waits for an evicted one to close.
const EVICTION_WAIT: Duration = Duration::from_millis(250);

/// Why a new connection got no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `limits.max_connections` taken by busy connections.
    Full,
    /// `limits.max_connections_per_ip` taken by this address.
    PerIp,
}

#[derive(Debug, Default)]
struct Entries {
    next: u64,
    open: HashMap<u64, (IpAddr, Arc<Activity>)>,
    by_ip: HashMap<IpAddr, usize>,
}

/// The table of open connections.
#[derive(Debug)]
pub struct Table {
    max: usize,
    per_ip: Option<usize>,
    entries: Mutex<Entries>,
    freed: Notify,
}

/// A connection's place in the table, given back on drop.
#[derive(Debug)]
pub struct Place {
    id: u64,
    ip: IpAddr,
    table: Arc<Table>,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut e = self.table.lock();
        e.open.remove(&self.id);
        if let Some(n) = e.by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                e.by_ip.remove(&self.ip);
            }
        }
        drop(e);
        self.table.freed.notify_waiters();
    }
}

impl Table {
    /// A table for at most `max` connections, `per_ip` from one address.
    pub fn new(max: usize, per_ip: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_ip,
            entries: Mutex::new(Entries::default()),
            freed: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        self.lock().open.len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A place for a connection from `ip`, closing the oldest idle
    /// keep-alive connection when the table is full.
    pub async fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        activity: &Arc<Activity>,
    ) -> Result<Place, Refused> {
        match self.try_admit(ip, activity) {
            Err(Refused::Full) if self.evict_oldest_idle() => {}
            other => return other,
        }
        let deadline = tokio::time::Instant::now() + EVICTION_WAIT;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match self.try_admit(ip, activity) {
                Err(Refused::Full) => {}
                other => return other,
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(Refused::Full);
            }
        }
    }

    fn try_admit(self: &Arc<Self>, ip: IpAddr, activity: &Arc<Activity>) -> Result<Place, Refused> {
        let mut e = self.lock();
        let from_ip = e.by_ip.get(&ip).copied().unwrap_or(0);
        if self.per_ip.is_some_and(|max| from_ip >= max) {
            return Err(Refused::PerIp);
        }
        if e.open.len() >= self.max {
            return Err(Refused::Full);
        }
        let id = e.next;
        e.next += 1;
        e.open.insert(id, (ip, activity.clone()));
        *e.by_ip.entry(ip).or_default() += 1;
        Ok(Place {
            id,
            ip,
            table: self.clone(),
        })
    }

    /// Asks the connection idle the longest to close; false if none is idle.
    fn evict_oldest_idle(&self) -> bool {
        let e = self.lock();
        let oldest = e
            .open
            .values()
            .filter_map(|(_, a)| a.idle_keep_alive().map(|since| (since, a)))
            .min_by_key(|(since, _)| *since);
        match oldest {
            Some((_, a)) => {
                a.evict();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[tokio::test(start_paused = true)]
    async fn a_full_table_of_busy_connections_refuses() {
        let table = Table::new(2, None);
        let busy: Vec<_> = (0..2).map(|_| Activity::new()).collect();
        let _places: Vec<_> =
            futures_util::future::join_all(busy.iter().map(|a| table.admit(A, a)))
                .await
                .into_iter()
                .map(|p| p.expect("place"))
                .collect();
        let new = Activity::new();
        assert_eq!(table.admit(B, &new).await.err(), Some(Refused::Full));
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_idle_keep_alive_connection_makes_room() {
        let table = Table::new(2, None);
        let (old, newer) = (Activity::new(), Activity::new());
        let old_place = table.admit(A, &old).await.expect("place");
        drop(old.request(false));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _newer_place = table.admit(A, &newer).await.expect("place");
        drop(newer.request(false));
        let new = Activity::new();
        let table2 = table.clone();
        let admitting = tokio::spawn(async move { table2.admit(B, &new).await.map(|_| ()) });
        // The old connection's task sees the eviction and closes.
        assert_eq!(
            super::super::watch::watch(
                &old,
                super::super::watch::Timeouts {
                    header_read: Duration::from_secs(2),
                    idle: Duration::from_secs(75),
                    write_stall: Duration::from_secs(10),
                }
            )
            .await,
            super::super::watch::Closed::Evicted
        );
        drop(old_place);
        assert_eq!(admitting.await.expect("task"), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn one_address_gets_at_most_its_share() {
        let table = Table::new(10, Some(1));
        let (a1, a2, b1) = (Activity::new(), Activity::new(), Activity::new());
        let _p = table.admit(A, &a1).await.expect("place");
        assert_eq!(table.admit(A, &a2).await.err(), Some(Refused::PerIp));
        assert!(table.admit(B, &b1).await.is_ok());
    }
}
