//! The Power Platform requests spent, by org, lane, caller and kind, and
//! the daily budgets that passed their warning threshold.

use std::sync::{Arc, Mutex};

use rustc_hash::FxHashMap as HashMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::registered;
use crate::usage::Who;

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
    /// The executed and refused counters of each org, lane and caller, so
    /// that a request finds them without building its labels.
    handles: Mutex<HashMap<[Arc<str>; 3], [Counter; 2]>>,
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
            handles: Mutex::default(),
        }
    }
}

impl super::Metrics {
    /// Counts `n` Power Platform requests of `who`.
    pub fn power_platform(&self, who: &Who, executed: bool, n: u64) {
        let key = [who.org.clone(), who.lane.clone(), who.caller.clone()];
        let mut handles = self
            .usage
            .handles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let [done, refused] = handles.entry(key).or_insert_with(|| {
            ["executed", "refused"].map(|kind| {
                self.usage
                    .spent
                    .get_or_create(&SpentLabels {
                        org: who.org.to_string(),
                        lane: who.lane.to_string(),
                        caller: who.caller.to_string(),
                        kind,
                    })
                    .clone()
            })
        });
        match executed {
            true => done.inc_by(n),
            false => refused.inc_by(n),
        };
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
