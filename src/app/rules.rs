//! The rules a reload may change: who may call (`[[callers]]`, `[access]`)
//! and each org's policy, with the callers' metric handles that follow the
//! caller list. A request takes one snapshot when it is admitted and keeps
//! it to its end, so a reload never changes the rules of a request in
//! flight (docs/operations.md, "Reload").

use std::sync::Arc;

use crate::config::{Access, Config, Impersonation, Policy};
use crate::stats::metrics::{Metrics, RequestHandles};

/// One generation of the rules.
pub struct Rules {
    pub access: Access,
    /// By org, in the order of `AppState::orgs`.
    pub orgs: Vec<OrgRules>,
}

/// One org's share of the rules.
pub struct OrgRules {
    pub policy: Policy,
    /// The same for callers the proxy acts as (`act_as_caller`): no
    /// impersonation header of the caller's passes, whatever the policy.
    pub policy_acting_as_caller: Policy,
    /// Request metrics: `[0]` for requests without a known caller, `[i + 1]`
    /// for `[[callers]]` entry `i`.
    pub metrics: Vec<RequestHandles>,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules")
            .field("callers", &self.access.callers.len())
            .field("orgs", &self.orgs.len())
            .finish_non_exhaustive()
    }
}

impl Rules {
    pub fn new(config: &Config, metrics: &Arc<Metrics>) -> Self {
        let orgs = config
            .orgs
            .iter()
            .map(|org| OrgRules {
                policy: org.policy.clone(),
                policy_acting_as_caller: Policy {
                    impersonation: Impersonation::Drop,
                    ..org.policy.clone()
                },
                metrics: std::iter::once("-")
                    .chain(config.access.callers.iter().map(|c| &*c.name))
                    .map(|caller| metrics.handles(&org.name, caller))
                    .collect(),
            })
            .collect();
        Self {
            access: config.access.clone(),
            orgs,
        }
    }
}
