//! Counts by who spent them and when: per UTC day (kept for the retention),
//! per hour (the rolling 24 hours) and per minute (Dataverse time over the
//! last 5 minutes). Buckets are numbered from the Unix epoch.

use std::sync::Arc;

// Fx: a request hashes its `Who` on the way out; SipHash's guard against
// chosen keys is not needed for names from the configuration.
use rustc_hash::FxHashMap as HashMap;

/// Who spent a request: the org, the lane (application user, or `user`
/// for a user's own token), the proxy's caller (`-` when callers are not
/// identified) and the user (a delegated user's object id, else `-`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Who {
    pub org: Arc<str>,
    pub lane: Arc<str>,
    pub caller: Arc<str>,
    pub user: Arc<str>,
}

/// Requests Dataverse executed and refused, and the time it took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub executed: u64,
    pub refused: u64,
    /// Dataverse's time (upstream durations), in milliseconds.
    pub dataverse_ms: u64,
}

impl Counts {
    pub fn add(&mut self, other: Counts) {
        self.executed += other.executed;
        self.refused += other.refused;
        self.dataverse_ms += other.dataverse_ms;
    }

    pub fn is_empty(&self) -> bool {
        *self == Counts::default()
    }
}

/// Which bucket of which length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bucket {
    Day(i64),
    Hour(i64),
    Minute(i64),
}

impl Bucket {
    /// The three buckets `unix` (seconds) falls in.
    pub fn all_at(unix: i64) -> [Bucket; 3] {
        [
            Bucket::Day(unix.div_euclid(86_400)),
            Bucket::Hour(unix.div_euclid(3_600)),
            Bucket::Minute(unix.div_euclid(60)),
        ]
    }
}

/// Counts by bucket and by who.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub buckets: HashMap<Bucket, HashMap<Who, Counts>>,
}

impl Tally {
    /// Adds `counts` to every bucket `unix` falls in.
    pub fn add(&mut self, unix: i64, who: &Who, counts: Counts) {
        for bucket in Bucket::all_at(unix) {
            self.add_to(bucket, who, counts);
        }
    }

    pub fn add_to(&mut self, bucket: Bucket, who: &Who, counts: Counts) {
        let row = self.buckets.entry(bucket).or_default();
        match row.get_mut(who) {
            Some(c) => c.add(counts),
            None => {
                row.insert(who.clone(), counts);
            }
        }
    }

    /// Adds `counts` to the minute `unix` falls in only (what a request
    /// does: [`Tally::expanded`] adds the hours and days once a second).
    pub fn add_minute(&mut self, unix: i64, who: &Who, counts: Counts) {
        self.add_to(Bucket::Minute(unix.div_euclid(60)), who, counts);
    }

    /// This tally's minutes, also counted in their hours and days.
    pub fn expanded(&self) -> Tally {
        let mut out = self.clone();
        for (bucket, row) in &self.buckets {
            if let Bucket::Minute(m) = *bucket {
                for (who, counts) in row {
                    out.add_to(Bucket::Hour(m.div_euclid(60)), who, *counts);
                    out.add_to(Bucket::Day(m.div_euclid(1_440)), who, *counts);
                }
            }
        }
        out
    }

    /// Every count of `other` added to this one.
    pub fn merge(&mut self, other: &Tally) {
        for (bucket, row) in &other.buckets {
            for (who, counts) in row {
                self.add_to(*bucket, who, *counts);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Drops days older than `days`, hours older than a day and minutes
    /// older than five.
    pub fn prune(&mut self, unix: i64, days: i64) {
        let [Bucket::Day(d), Bucket::Hour(h), Bucket::Minute(m)] = Bucket::all_at(unix) else {
            return;
        };
        self.buckets.retain(|bucket, _| match *bucket {
            Bucket::Day(x) => x > d - days,
            Bucket::Hour(x) => x > h - 25,
            Bucket::Minute(x) => x > m - 6,
        });
    }

    /// The counts of one bucket.
    pub fn of(&self, bucket: Bucket) -> HashMap<Who, Counts> {
        self.buckets.get(&bucket).cloned().unwrap_or_default()
    }

    /// The sum of the buckets `from..=to`, by who.
    pub fn sum<F: Fn(i64) -> Bucket>(&self, from: i64, to: i64, bucket: F) -> HashMap<Who, Counts> {
        let mut out: HashMap<Who, Counts> = HashMap::default();
        for i in from..=to {
            for (who, counts) in self.buckets.get(&bucket(i)).into_iter().flatten() {
                out.entry(who.clone()).or_default().add(*counts);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(caller: &str) -> Who {
        Who {
            org: "org".into(),
            lane: "default".into(),
            caller: caller.into(),
            user: "-".into(),
        }
    }

    #[test]
    fn counts_land_in_their_day_hour_and_minute_and_old_ones_go() {
        let mut t = Tally::default();
        let one = Counts {
            executed: 1,
            refused: 0,
            dataverse_ms: 10,
        };
        let day = 20_000 * 86_400;
        t.add(day + 10, &who("a"), one);
        t.add(day + 3_700, &who("a"), one);
        t.add(day - 10, &who("b"), one);
        assert_eq!(t.of(Bucket::Day(20_000))[&who("a")].executed, 2);
        assert_eq!(t.of(Bucket::Day(19_999))[&who("b")].executed, 1);
        let hour = (day + 3_700) / 3_600;
        let rolling = t.sum(hour - 23, hour, Bucket::Hour);
        assert_eq!(rolling[&who("a")].executed + rolling[&who("b")].executed, 3);
        t.prune(day + 86_400, 2);
        assert!(t.of(Bucket::Day(19_999)).is_empty(), "past the retention");
        assert_eq!(t.of(Bucket::Day(20_000))[&who("a")].executed, 2);
        assert!(t.of(Bucket::Hour(hour - 25)).is_empty());
        t.prune(day + 86_400 * 2, 2);
        assert!(
            t.of(Bucket::Hour(hour)).is_empty(),
            "hours older than a day go"
        );
    }
}
