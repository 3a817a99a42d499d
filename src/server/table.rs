//! The open connections: the cap (`limits.max_connections`), the cap per
//! source address (`limits.max_connections_per_ip`), and, when a cap is
//! reached, a connection closed to make room: first the oldest one that
//! has sent no request for longer than a short grace, then, only when no
//! connection without a request holds a place, the oldest idle keep-alive
//! one. So sockets that send nothing cannot push out a real client's
//! kept-alive connection, however fast they reconnect.
//!
//! A semaphore cannot say which connection to close; this table can, and a
//! new connection is refused only when every place is taken by a
//! connection with a request in progress, or by one still within its grace
//! for a first request.

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
    /// How long a new connection has for its first request before it may
    /// be closed to make room.
    grace: Duration,
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
    /// A table for at most `max` connections, `per_ip` from one address;
    /// a connection without a request past `grace` makes room first.
    pub fn new(max: usize, per_ip: Option<usize>, grace: Duration) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_ip,
            grace,
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

    /// A place for a connection from `ip`; when the table (or the
    /// address's share) is full, a connection is closed to make room (see
    /// the module's text), and the new one waits a moment for it to go.
    pub async fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        activity: &Arc<Activity>,
    ) -> Result<Place, Refused> {
        let refused = match self.try_admit(ip, activity) {
            Err(Refused::Full) if self.make_room(None) => Refused::Full,
            Err(Refused::PerIp) if self.make_room(Some(ip)) => Refused::PerIp,
            other => return other,
        };
        let deadline = tokio::time::Instant::now() + EVICTION_WAIT;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match self.try_admit(ip, activity) {
                Err(r) if r == refused => {}
                other => return other,
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(refused);
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

    /// Asks one connection (of `ip`, when given) to close: the oldest that
    /// sent no request within the grace; else, unless a connection without
    /// a request (still within its grace) holds a place, the keep-alive one
    /// idle the longest. False if none may be closed.
    fn make_room(&self, ip: Option<IpAddr>) -> bool {
        let e = self.lock();
        let candidates = || {
            e.open
                .values()
                .filter(|(from, _)| ip.is_none_or(|ip| ip == *from))
                .map(|(_, a)| a)
        };
        let silent = candidates()
            .filter_map(|a| a.no_request_yet().map(|born| (born, a)))
            .min_by_key(|(born, _)| *born);
        let victim = match silent {
            Some((born, a)) if born.elapsed() >= self.grace => Some(a),
            Some(_) => None,
            None => candidates()
                .filter_map(|a| a.idle_keep_alive().map(|since| (since, a)))
                .min_by_key(|(since, _)| *since)
                .map(|(_, a)| a),
        };
        victim.inspect(|a| a.evict()).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
    const GRACE: Duration = Duration::from_millis(250);

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_makes_room_before_a_kept_alive_one() {
        let table = Table::new(2, None, GRACE);
        let (client, silent) = (Activity::new(), Activity::new());
        let _client_place = table.admit(A, &client).await.expect("place");
        drop(client.request(false));
        let _silent_place = table.admit(B, &silent).await.expect("place");
        // Within its grace, the silent one is not closed, nor is the client.
        let newcomer = Activity::new();
        assert_eq!(table.admit(B, &newcomer).await.err(), Some(Refused::Full));
        assert!(!silent.evicted() && !client.evicted());
        // Past it, the silent one goes first; the kept-alive client stays.
        tokio::time::sleep(GRACE).await;
        let table2 = table.clone();
        let admitting = tokio::spawn(async move { table2.admit(B, &newcomer).await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert!(silent.evicted(), "the silent one asked to close");
        assert!(!client.evicted(), "the client is never touched");
        drop(_silent_place);
        assert_eq!(admitting.await.expect("task"), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_at_its_share_closes_its_own_silent_connection() {
        let table = Table::new(10, Some(1), GRACE);
        let silent = Activity::new();
        let place = table.admit(A, &silent).await.expect("place");
        tokio::time::sleep(GRACE).await;
        let table2 = table.clone();
        let next = Activity::new();
        let admitting = tokio::spawn(async move { table2.admit(A, &next).await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert!(silent.evicted());
        drop(place);
        assert_eq!(admitting.await.expect("task"), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_of_busy_connections_refuses() {
        let table = Table::new(2, None, GRACE);
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
        let table = Table::new(2, None, GRACE);
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
        let table = Table::new(10, Some(1), GRACE);
        let (a1, a2, b1) = (Activity::new(), Activity::new(), Activity::new());
        let _p = table.admit(A, &a1).await.expect("place");
        assert_eq!(table.admit(A, &a2).await.err(), Some(Refused::PerIp));
        assert!(table.admit(B, &b1).await.is_ok());
    }
}
