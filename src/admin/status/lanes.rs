//! Each lane of an org as the status page shows it: its token, its
//! governor, whether it is in rotation; and the org's lanes together.

use crate::governor::redis::State;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::{GovernorStatus, TokenStatus};
use crate::app::OrgState;
use crate::governor::Governor;

/// One lane: an application user's token and budget.
#[derive(Debug, Serialize)]
pub struct LaneStatus {
    /// The credential's name.
    pub name: String,
    /// `false` while its credential fails (requests go to the other lanes).
    pub in_rotation: bool,
    pub token: TokenStatus,
    /// This lane's governor (`throttled_5m` is the org's: kept per org).
    pub governor: GovernorStatus,
}

/// Every lane of `org`, in the configured order.
pub async fn lanes(org: &OrgState) -> Vec<LaneStatus> {
    let mut out = Vec::new();
    for (i, lane) in org.lanes.iter().enumerate() {
        let health = lane.token.health().await;
        out.push(LaneStatus {
            name: lane.name.to_string(),
            in_rotation: org.lanes.in_rotation(i),
            token: TokenStatus {
                credential: health.credential,
                kind: health.kind,
                valid: health.expires_in.is_some(),
                expires_in_s: health.expires_in.map(|d| d.as_secs()),
                last_refresh: health.last_refresh_ms,
                failures_in_a_row: health.failures_in_a_row,
                last_error: health.last_error,
            },
            governor: governor(&lane.governor),
        });
    }
    out
}

/// The lanes together: limits, slots and 429s summed; the gate closed only
/// while every lane's is (for the shortest of their waits).
pub fn together(lanes: &[LaneStatus], throttled_5m: u64) -> GovernorStatus {
    let sum = |f: fn(&GovernorStatus) -> usize| lanes.iter().map(|l| f(&l.governor)).sum();
    GovernorStatus {
        limit: sum(|g| g.limit),
        in_flight: sum(|g| g.in_flight),
        queued: sum(|g| g.queued),
        gate_closed_for_s: lanes
            .iter()
            .map(|l| l.governor.gate_closed_for_s)
            .fold(f64::INFINITY, f64::min)
            .min(f64::MAX),
        throttled_5m,
        throttled_total: lanes.iter().map(|l| l.governor.throttled_total).sum(),
        state: lanes.first().map_or("local", |l| l.governor.state),
        reason: lanes.first().and_then(|l| l.governor.reason),
    }
}

/// 429s seen over all of `org`'s lanes.
pub fn throttled_total(org: &OrgState) -> u64 {
    org.lanes
        .iter()
        .map(|l| l.governor.stats().throttled_total())
        .sum()
}

fn governor(g: &Governor) -> GovernorStatus {
    let stats = g.stats();
    GovernorStatus {
        limit: g.limit(),
        in_flight: stats.in_flight.load(Ordering::Relaxed),
        queued: stats.queued.load(Ordering::Relaxed),
        gate_closed_for_s: g
            .gate_closed_until()
            .map_or(0.0, |u| (u - tokio::time::Instant::now()).as_secs_f64()),
        throttled_5m: 0,
        throttled_total: stats.throttled_total(),
        state: match g.shared_standing() {
            None => "local",
            Some((State::Shared, _)) => "shared",
            Some((State::Returning, _)) => "returning",
            Some((State::Down, _)) => "fallback",
        },
        reason: match g.shared_standing() {
            Some((State::Down | State::Returning, why)) => Some(why),
            _ => None,
        },
    }
}
