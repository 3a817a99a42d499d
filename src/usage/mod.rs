//! Who spent the Dataverse budget: the Power Platform requests each call
//! is ([`count`]), by org, lane, caller and user, over the UTC day, the
//! rolling 24 hours and the Dataverse time of the last 5 minutes, shared
//! by every replica through the governor's Redis.
//!
//! A request only adds to this replica's pending counts (a lock and a few
//! map updates, no Redis call); once a second they are written to Redis in
//! one pipeline and the totals read back ([`Ledger::refresh`]). While Redis
//! is away the pending counts wait, and are written when it answers; the
//! view meanwhile is the last totals read plus them. A Redis that lost its
//! data (its epoch changed) gets every replica's counts written again, so
//! none is lost. Without Redis the counts are this replica's own.

pub mod count;
mod shared;
mod tally;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use tally::{Bucket, Counts, Tally, Who};

use crate::governor::SharedRedis;
use rustc_hash::FxHashMap as HashMap;

/// One call, as the ledger keeps it.
#[derive(Debug, Clone)]
pub struct Spent {
    pub who: Who,
    /// The Power Platform requests it is (0: not counted).
    pub requests: u32,
    /// Whether Dataverse executed it (else refused it: a 429, 401 or error).
    pub executed: bool,
    /// Dataverse's time for it.
    pub dataverse: Duration,
}

/// The counts every replica sees.
pub struct Ledger {
    retention_days: i64,
    redis: Option<Arc<SharedRedis>>,
    /// Counts since the last refresh, by minute only (a request updates one
    /// map; the refresh adds their hours and days).
    pending: Mutex<Tally>,
    /// Counts this replica wrote to Redis, within the retention: written
    /// again when Redis lost them.
    written: Mutex<Tally>,
    /// The ledger's epoch in Redis as last seen ('' before the first).
    epoch: Mutex<String>,
    /// Every replica's counts as last read from Redis (without Redis, this
    /// replica's own), days within the retention.
    totals: Mutex<Tally>,
    /// Today's executed requests by caller and by org, `totals` plus
    /// `pending`: what a budget check reads on each request.
    today: Mutex<Today>,
    /// Thresholds already reported today (`caller:NAME`, `org:NAME`).
    warned: Mutex<(i64, HashSet<String>)>,
}

#[derive(Default)]
struct Today {
    day: i64,
    callers: HashMap<Arc<str>, u64>,
    orgs: HashMap<Arc<str>, u64>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("shared", &self.redis.is_some())
            .finish_non_exhaustive()
    }
}

/// Seconds since the Unix epoch now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Seconds until the next UTC midnight, when daily counts renew.
pub fn until_renewal(unix: i64) -> u64 {
    (86_400 - unix.rem_euclid(86_400)) as u64
}

impl Ledger {
    /// A ledger keeping `retention_days` days, shared through `redis`.
    pub fn new(retention_days: u32, redis: Option<Arc<SharedRedis>>) -> Self {
        Self {
            retention_days: i64::from(retention_days.max(1)),
            redis,
            pending: Mutex::new(Tally::default()),
            written: Mutex::new(Tally::default()),
            epoch: Mutex::new(String::new()),
            totals: Mutex::new(Tally::default()),
            today: Mutex::new(Today::default()),
            warned: Mutex::new((0, HashSet::new())),
        }
    }

    /// Counts one call.
    pub fn record(&self, spent: &Spent) {
        self.record_at(now_unix(), spent);
    }

    fn record_at(&self, unix: i64, spent: &Spent) {
        if spent.requests == 0 {
            return;
        }
        let n = u64::from(spent.requests);
        let counts = Counts {
            executed: if spent.executed { n } else { 0 },
            refused: if spent.executed { 0 } else { n },
            dataverse_ms: spent.dataverse.as_millis() as u64,
        };
        lock(&self.pending).add_minute(unix, &spent.who, counts);
        let mut today = lock(&self.today);
        today.roll(unix.div_euclid(86_400));
        *today.callers.entry(spent.who.caller.clone()).or_default() += counts.executed;
        *today.orgs.entry(spent.who.org.clone()).or_default() += counts.executed;
    }

    /// Requests Dataverse executed today (UTC) for `caller`, over every
    /// org and lane.
    pub fn caller_today(&self, caller: &str) -> u64 {
        let mut today = lock(&self.today);
        today.roll(now_unix().div_euclid(86_400));
        today.callers.get(caller).copied().unwrap_or(0)
    }

    /// Requests Dataverse executed today (UTC) for `org`.
    pub fn org_today(&self, org: &str) -> u64 {
        let mut today = lock(&self.today);
        today.roll(now_unix().div_euclid(86_400));
        today.orgs.get(org).copied().unwrap_or(0)
    }

    /// Whether `name`'s (a caller's or an org's, by `scope`) use of
    /// `budget` crossed `ratio` today for the first time (a warning is due
    /// once a day).
    pub fn crossed(&self, scope: &str, name: &str, used: u64, budget: u64, ratio: f64) -> bool {
        if budget == 0 || (used as f64) < ratio * budget as f64 {
            return false;
        }
        let day = now_unix().div_euclid(86_400);
        let mut warned = lock(&self.warned);
        if warned.0 != day {
            *warned = (day, HashSet::new());
        }
        warned.1.insert(format!("{scope}:{name}"))
    }

    /// What the counts say now: today, the rolling 24 hours and the last
    /// 5 minutes, by who.
    pub fn snapshot(&self) -> Snapshot {
        let unix = now_unix();
        let mut all = lock(&self.totals).clone();
        all.merge(&lock(&self.pending).expanded());
        let [Bucket::Day(d), Bucket::Hour(h), Bucket::Minute(m)] = Bucket::all_at(unix) else {
            unreachable!("all_at gives a day, an hour and a minute");
        };
        Snapshot {
            unix,
            today: all.of(Bucket::Day(d)),
            rolling: all.sum(h - 23, h, Bucket::Hour),
            five_minutes: all.sum(m - 4, m, Bucket::Minute),
        }
    }

    /// Every retained day's counts, by who (for `/usage`).
    pub async fn days(&self) -> Tally {
        let unix = now_unix();
        let today = unix.div_euclid(86_400);
        let days: Vec<Bucket> = (today - self.retention_days + 1..=today)
            .map(Bucket::Day)
            .collect();
        let mut all = match &self.redis {
            Some(redis) => match shared::read(redis, &days).await {
                Ok(t) => t,
                Err(_) => lock(&self.totals).clone(),
            },
            None => lock(&self.totals).clone(),
        };
        all.merge(&lock(&self.pending).expanded());
        all.buckets.retain(|b, _| matches!(b, Bucket::Day(_)));
        all
    }

    /// Writes the pending counts to Redis and reads the totals back; kept
    /// for a later try when Redis does not answer.
    pub async fn refresh(&self) {
        let unix = now_unix();
        let Some(redis) = &self.redis else {
            let pending = std::mem::take(&mut *lock(&self.pending)).expanded();
            let mut totals = lock(&self.totals);
            totals.merge(&pending);
            totals.prune(unix, self.retention_days);
            return;
        };
        let fresh = uuid::Uuid::new_v4().simple().to_string();
        let Ok(epoch) = shared::epoch(redis, &fresh, self.retention_days).await else {
            return;
        };
        let known = std::mem::replace(&mut *lock(&self.epoch), epoch.clone());
        let lost = !known.is_empty() && known != epoch;
        let minutes = std::mem::take(&mut *lock(&self.pending));
        let pending = minutes.expanded();
        let mut to_write = pending.clone();
        if lost {
            tracing::warn!("Redis lost the usage counts: this replica writes all of its own again");
            to_write.merge(&lock(&self.written));
        }
        if !to_write.is_empty()
            && shared::flush(redis, &to_write, self.retention_days)
                .await
                .is_err()
        {
            lock(&self.pending).merge(&minutes);
            // The loss is seen again at the next try.
            *lock(&self.epoch) = known;
            return;
        }
        {
            let mut written = lock(&self.written);
            written.merge(&pending);
            written.prune(unix, self.retention_days);
        }
        let Ok(totals) = shared::read(redis, &recent(unix)).await else {
            // Written but not read back: counted in the totals until the
            // next read replaces them.
            lock(&self.totals).merge(&pending);
            return;
        };
        *lock(&self.totals) = totals;
        self.recount(unix);
    }

    /// Today's totals by caller and org again, from the totals read and
    /// what is still pending.
    fn recount(&self, unix: i64) {
        let day = Bucket::Day(unix.div_euclid(86_400));
        let mut today = Today {
            day: unix.div_euclid(86_400),
            ..Today::default()
        };
        let mut add = |row: HashMap<Who, Counts>| {
            for (who, c) in row {
                *today.callers.entry(who.caller.clone()).or_default() += c.executed;
                *today.orgs.entry(who.org.clone()).or_default() += c.executed;
            }
        };
        add(lock(&self.totals).of(day));
        add(lock(&self.pending).expanded().of(day));
        *lock(&self.today) = today;
    }

    /// Refreshes once a second, for as long as the ledger lives.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let ledger = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(ledger) = ledger.upgrade() else {
                    return;
                };
                ledger.refresh().await;
            }
        })
    }
}

impl Today {
    /// A new day starts from nothing.
    fn roll(&mut self, day: i64) {
        if self.day != day {
            *self = Today {
                day,
                ..Today::default()
            };
        }
    }
}

/// The buckets read back every second: today, the last 24 hours, the last
/// 5 minutes.
fn recent(unix: i64) -> Vec<Bucket> {
    let [Bucket::Day(d), Bucket::Hour(h), Bucket::Minute(m)] = Bucket::all_at(unix) else {
        return Vec::new();
    };
    std::iter::once(Bucket::Day(d))
        .chain((h - 23..=h).map(Bucket::Hour))
        .chain((m - 4..=m).map(Bucket::Minute))
        .collect()
}

/// Counts by who spent them.
pub type ByWho = HashMap<Who, Counts>;

/// What the counts say at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub unix: i64,
    pub today: ByWho,
    pub rolling: ByWho,
    pub five_minutes: ByWho,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spent(caller: &str, requests: u32, executed: bool) -> Spent {
        Spent {
            who: Who {
                org: "org".into(),
                lane: "default".into(),
                caller: caller.into(),
                user: "-".into(),
            },
            requests,
            executed,
            dataverse: Duration::from_millis(250),
        }
    }

    #[test]
    fn executed_and_refused_are_kept_apart_and_metadata_counts_nothing() {
        let ledger = Ledger::new(30, None);
        ledger.record(&spent("a", 10, true));
        ledger.record(&spent("a", 1, false));
        ledger.record(&spent("a", 0, true));
        ledger.record(&spent("b", 100, true));
        assert_eq!(ledger.caller_today("a"), 10);
        assert_eq!(ledger.org_today("org"), 110);
        let snap = ledger.snapshot();
        let a = snap
            .today
            .iter()
            .find(|(w, _)| &*w.caller == "a")
            .expect("a")
            .1;
        assert_eq!((a.executed, a.refused, a.dataverse_ms), (10, 1, 500));
        assert_eq!(
            snap.five_minutes
                .values()
                .map(|c| c.dataverse_ms)
                .sum::<u64>(),
            750
        );
    }

    #[test]
    fn a_threshold_is_reported_once_a_day() {
        let ledger = Ledger::new(30, None);
        assert!(!ledger.crossed("caller", "a", 79, 100, 0.8));
        assert!(ledger.crossed("caller", "a", 80, 100, 0.8));
        assert!(!ledger.crossed("caller", "a", 90, 100, 0.8));
        assert!(ledger.crossed("org", "a", 90, 100, 0.8));
    }

    #[test]
    fn renewal_is_the_next_utc_midnight() {
        assert_eq!(until_renewal(86_400 * 5), 86_400);
        assert_eq!(until_renewal(86_400 * 5 + 86_399), 1);
    }
}
