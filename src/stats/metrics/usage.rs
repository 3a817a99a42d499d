//! The Power Platform requests spent, by org, lane, caller and kind, and
//! the daily budgets that passed their warning threshold.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::registered;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpentLabels {
    org: String,
    lane: String,
    caller: String,
    /// `executed` or `refused` (by Dataverse: a 429, 401 or error).
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ThresholdLabels {
    /// `caller` (its `daily_requests`) or `org` (its `daily_entitlement`).
    scope: &'static str,
    name: String,
}

pub(crate) struct UsageFamilies {
    spent: Family<SpentLabels, Counter>,
    thresholds: Family<ThresholdLabels, Counter>,
}

impl UsageFamilies {
    pub(crate) fn register(r: &mut Registry) -> Self {
        Self {
            spent: registered(
                r,
                "power_platform_requests",
                "Power Platform requests as Dataverse counts them against the daily entitlement (each $batch operation and bulk target counts; metadata and cached answers do not), by org, lane, caller and kind (executed, refused)",
                Family::default(),
            ),
            thresholds: registered(
                r,
                "daily_budget_warnings",
                "Times a daily budget passed usage.warn_at today: a caller's daily_requests (scope caller) or an org's daily_entitlement (scope org)",
                Family::default(),
            ),
        }
    }
}

impl super::Metrics {
    /// Counts `n` Power Platform requests.
    pub fn power_platform(&self, org: &str, lane: &str, caller: &str, executed: bool, n: u64) {
        self.usage
            .spent
            .get_or_create(&SpentLabels {
                org: org.to_owned(),
                lane: lane.to_owned(),
                caller: caller.to_owned(),
                kind: if executed { "executed" } else { "refused" },
            })
            .inc_by(n);
    }

    /// A daily budget passed its warning threshold.
    pub fn budget_warning(&self, scope: &'static str, name: &str) {
        self.usage
            .thresholds
            .get_or_create(&ThresholdLabels {
                scope,
                name: name.to_owned(),
            })
            .inc();
    }
}
