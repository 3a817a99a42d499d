//! Who spent the org's Power Platform requests today, for `/status` and
//! the status page: per lane, caller and user, against the callers'
//! `daily_requests` and the org's `daily_entitlement`, projected to the
//! day's end, with the Dataverse time of the last 5 minutes.

use serde::Serialize;

use crate::app::OrgState;
use crate::usage::{ByWho, Snapshot, Who};

/// Dataverse's execution-time limit per user: 1,200 s in 5 minutes
/// (docs/dataverse.md, "Service protection limits").
const EXECUTION_LIMIT_S: f64 = 1_200.0;

#[derive(Debug, Default, Serialize)]
pub struct OrgUsage {
    /// Requests Dataverse executed today (UTC) for the org.
    pub executed: u64,
    pub refused: u64,
    pub rolling_24h: u64,
    pub entitlement: Option<u64>,
    /// Today's pace carried to midnight.
    pub projected: u64,
    pub rows: Vec<UsageRow>,
}

#[derive(Debug, Serialize)]
pub struct UsageRow {
    pub lane: String,
    pub caller: String,
    pub user: String,
    pub executed: u64,
    pub refused: u64,
    pub rolling_24h: u64,
    pub projected: u64,
    /// The caller's `daily_requests`, if it has one.
    pub budget: Option<u64>,
    /// Dataverse's time for these requests over the last 5 minutes, and
    /// the limit it counts against.
    pub dataverse_s_5m: f64,
    pub dataverse_limit_s: f64,
}

/// `org`'s share of `snap`; `budget` gives a caller's `daily_requests`.
pub fn of(org: &OrgState, snap: &Snapshot, budget: impl Fn(&str) -> Option<u64>) -> OrgUsage {
    let elapsed = snap.unix.rem_euclid(86_400).max(300) as u64;
    let project = |n: u64| n.saturating_mul(86_400) / elapsed;
    let mine = |w: &Who| &*w.org == org.name.as_str();
    let mut who: Vec<&Who> = snap
        .today
        .keys()
        .chain(snap.rolling.keys())
        .chain(snap.five_minutes.keys())
        .filter(|w| mine(w))
        .collect();
    who.sort();
    who.dedup();
    let get = |map: &ByWho, w: &Who| map.get(w).copied().unwrap_or_default();
    let rows: Vec<UsageRow> = who
        .into_iter()
        .map(|w| {
            let today = get(&snap.today, w);
            UsageRow {
                lane: w.lane.to_string(),
                caller: w.caller.to_string(),
                user: w.user.to_string(),
                executed: today.executed,
                refused: today.refused,
                rolling_24h: get(&snap.rolling, w).executed,
                projected: project(today.executed),
                budget: budget(&w.caller),
                dataverse_s_5m: get(&snap.five_minutes, w).dataverse_ms as f64 / 1_000.0,
                dataverse_limit_s: EXECUTION_LIMIT_S,
            }
        })
        .collect();
    let executed = rows.iter().map(|r| r.executed).sum();
    OrgUsage {
        executed,
        refused: rows.iter().map(|r| r.refused).sum(),
        rolling_24h: rows.iter().map(|r| r.rolling_24h).sum(),
        entitlement: org.daily_entitlement,
        projected: project(executed),
        rows,
    }
}
