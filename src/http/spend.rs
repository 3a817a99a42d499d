//! What a request spent of the daily Power Platform request entitlement,
//! counted when its answer ends (from what the access log learned), and
//! the warning when a caller's budget or the org's entitlement passes
//! `usage.warn_at`.

use std::sync::Arc;

use super::access_log::RequestInfo;
use crate::app::{AppState, OrgState};
use crate::usage::{Spent, Who};

/// `-`: no lane, caller or user, without an allocation per request.
static DASH: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("-"));

/// Counts what a request that reached Dataverse spent (none for metadata
/// or a cached answer: docs/dataverse.md, "Power Platform requests").
pub fn spend(state: &AppState, org: &OrgState, info: &RequestInfo, status: http::StatusCode) {
    if info.upstream.is_none() || info.requests == 0 {
        return;
    }
    let dash = || DASH.clone();
    let lane = info.lane.clone().unwrap_or_else(dash);
    let user = match &*lane {
        // A user's own token: the user's own allocation.
        "user" => info.principal.clone().unwrap_or_else(dash),
        _ => dash(),
    };
    let spent = Spent {
        who: Who {
            org: org.label.clone(),
            lane,
            caller: info.caller.clone().unwrap_or_else(dash),
            user,
        },
        requests: info.requests,
        executed: status.as_u16() < 400,
        dataverse: info.upstream.unwrap_or_default(),
    };
    state
        .metrics
        .power_platform(&spent.who, spent.executed, u64::from(spent.requests));
    state.usage.record(&spent);
    let budget = info
        .rules
        .as_ref()
        .and_then(|r| r.access.callers.get(info.caller_slot.checked_sub(1)?))
        .and_then(|c| c.daily_requests);
    if let Some(budget) = budget {
        let used = state.usage.caller_today(&spent.who.caller);
        if past_threshold(state, "caller", &spent.who.caller, used, budget) {
            tracing::warn!(caller = %spent.who.caller, used, budget, "a caller passed usage.warn_at of its daily Power Platform request budget (daily_requests)");
        }
    }
    if let Some(entitlement) = org.daily_entitlement {
        let used = state.usage.org_today(&org.name);
        if past_threshold(state, "org", &org.name, used, entitlement) {
            tracing::warn!(org = %org.name, used, entitlement, "the org passed usage.warn_at of the tenant's daily Power Platform request entitlement (daily_entitlement)");
        }
    }
}

/// Whether `used` of `budget` passed the warning threshold for the first
/// time today; counted in the metric when it did.
fn past_threshold(
    state: &AppState,
    scope: &'static str,
    name: &str,
    used: u64,
    budget: u64,
) -> bool {
    let crossed = state
        .usage
        .crossed(scope, name, used, budget, state.usage_warn_at);
    if crossed {
        state.metrics.budget_warning(scope, name);
    }
    crossed
}
