//! The governors' figures by org and lane, copied in at scrape time: each
//! lane's limit, what it holds and queues, its gate, whether its state is
//! shared, whether it is in rotation, and what Dataverse's 429s and the
//! replays did.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{registered, sync_counter};
use crate::governor::{Governor, Throttle};
use crate::lanes::Lanes;

/// An org's lane (the lane's credential name).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OrgLane {
    org: String,
    lane: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OrgKind {
    org: String,
    lane: String,
    kind: &'static str,
}

/// An org's lane and one state of its shared governor.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OrgLaneState {
    org: String,
    lane: String,
    state: &'static str,
}

pub(crate) struct GovernorFamilies {
    in_flight: Family<OrgLane, Gauge>,
    queued: Family<OrgLane, Gauge>,
    limit: Family<OrgLane, Gauge>,
    gate: Family<OrgLane, Gauge<f64, AtomicU64>>,
    shared: Family<OrgLane, Gauge>,
    state: Family<OrgLaneState, Gauge>,
    waits: Family<OrgLane, Counter>,
    throttled: Family<OrgLane, Counter>,
    throttled_kind: Family<OrgKind, Counter>,
    retries: Family<OrgLane, Counter>,
    transient: Family<OrgLane, Counter>,
    exhausted: Family<OrgLane, Counter>,
    rejected: Family<OrgLane, Counter>,
    held_too_long: Family<OrgLane, Counter>,
    in_rotation: Family<OrgLane, Gauge>,
}

impl GovernorFamilies {
    pub(super) fn register(r: &mut Registry) -> Self {
        let mut gauge =
            |name: &str, help: &str| registered(r, name, help, Family::<OrgLane, Gauge>::default());
        let in_flight = gauge(
            "governor_in_flight",
            "Requests of this replica holding a governor slot towards the org",
        );
        let queued = gauge(
            "governor_queued",
            "Callers waiting for a slot or for the 429 gate",
        );
        let limit = gauge(
            "governor_limit",
            "The adaptive concurrency limit in force (shared by all replicas with Redis)",
        );
        let in_rotation = gauge(
            "lane_in_rotation",
            "1 while the lane's credential gets tokens, 0 while it is out of rotation",
        );
        let shared = gauge(
            "governor_shared_state",
            "1 while the governor's state is shared through Redis, 0 while on the local fallback cap",
        );
        let gate = registered(
            r,
            "governor_gate_closed_seconds",
            "Seconds until the Retry-After gate reopens (0: open)",
            Family::<OrgLane, Gauge<f64, AtomicU64>>::default(),
        );
        let mut counter = |name: &str, help: &str| {
            registered(r, name, help, Family::<OrgLane, Counter>::default())
        };
        let waits = counter(
            "governor_waits",
            "Callers that had to wait for a slot or the gate",
        );
        let throttled = counter("governor_throttled", "429 answers received from Dataverse");
        let retries = counter(
            "governor_retries",
            "Throttled requests replayed after the pause",
        );
        let transient = counter(
            "governor_transient_retries",
            "Idempotent requests replayed after a transient failure (unreachable, 502, 503, 504)",
        );
        let exhausted = counter(
            "governor_retry_budget_exhausted",
            "Transient failures not replayed because the org's retry budget was used up",
        );
        let rejected = counter(
            "governor_rejected",
            "Callers turned away with a proxy 429 (queue full or timeout)",
        );
        let held_too_long = counter(
            "governor_held_too_long",
            "Slots released because they were held longer than governor.max_hold",
        );
        let state = registered(
            r,
            "governor_state",
            "1 for the shared governor's state now (shared, returning, local), 0 for the others; /status says why when not shared",
            Family::<OrgLaneState, Gauge>::default(),
        );
        let throttled_kind = registered(
            r,
            "governor_throttled_by_kind",
            "429 answers from Dataverse by the limit they name",
            Family::<OrgKind, Counter>::default(),
        );
        Self {
            in_flight,
            queued,
            limit,
            gate,
            shared,
            state,
            waits,
            throttled,
            throttled_kind,
            retries,
            transient,
            exhausted,
            rejected,
            held_too_long,
            in_rotation,
        }
    }

    /// Copies in the figures of an org's lanes.
    pub(crate) fn render(&self, org: &str, lanes: &Lanes) {
        for (i, lane) in lanes.iter().enumerate() {
            let l = OrgLane {
                org: org.to_owned(),
                lane: lane.name.to_string(),
            };
            let up = lanes.in_rotation(i);
            self.in_rotation.get_or_create(&l).set(i64::from(up));
            self.render_lane(&lane.governor, &l);
        }
    }

    fn render_lane(&self, governor: &Governor, l: &OrgLane) {
        let g = governor.stats();
        let load = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as i64;
        self.in_flight.get_or_create(l).set(load(&g.in_flight));
        self.queued.get_or_create(l).set(load(&g.queued));
        self.limit.get_or_create(l).set(governor.limit() as i64);
        let closed = governor
            .gate_closed_until()
            .map_or(0.0, |u| (u - tokio::time::Instant::now()).as_secs_f64());
        self.gate.get_or_create(l).set(closed);
        if let Some((state, _)) = governor.shared_standing() {
            let shared = state == crate::governor::redis::State::Shared;
            self.shared.get_or_create(l).set(i64::from(shared));
            use crate::governor::redis::State;
            for s in [State::Shared, State::Returning, State::Down] {
                let label = OrgLaneState {
                    org: l.org.clone(),
                    lane: l.lane.clone(),
                    state: s.name(),
                };
                self.state.get_or_create(&label).set(i64::from(s == state));
            }
        }
        let counters = [
            (&self.waits, &g.waits),
            (&self.retries, &g.retries),
            (&self.transient, &g.transient_retries),
            (&self.exhausted, &g.budget_exhausted),
            (&self.rejected, &g.rejected),
            (&self.held_too_long, &g.held_too_long),
        ];
        for (family, value) in counters {
            sync_counter(&family.get_or_create(l), value.load(Ordering::Relaxed));
        }
        sync_counter(&self.throttled.get_or_create(l), g.throttled_total());
        for (kind, value) in Throttle::ALL.iter().zip(&g.throttled) {
            let label = OrgKind {
                org: l.org.clone(),
                lane: l.lane.clone(),
                kind: kind.label(),
            };
            sync_counter(
                &self.throttled_kind.get_or_create(&label),
                value.load(Ordering::Relaxed),
            );
        }
    }
}
