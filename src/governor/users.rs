//! A governor per user, for requests that go with the user's own token
//! (`impersonate = "delegated"`): Dataverse counts those against the user,
//! not the application user, so each user has a budget (52 concurrent per
//! web server, a Retry-After gate) of its own, shared through Redis like
//! the org's, and one user's 429 never pauses the others.

use std::sync::Arc;
use std::time::Duration;

use super::{Governor, SharedRedis};
use crate::config::GovernorConfig;

/// Most users governed at once per org (the least recently used go).
const MAX_USERS: u64 = 10_000;

/// The users' governors of one org.
pub struct UserGovernors {
    config: arc_swap::ArcSwap<GovernorConfig>,
    redis: Option<Arc<SharedRedis>>,
    /// The org's key (its host); a user's is `{org}/user/{tenant}/{oid}`.
    org_key: String,
    governors: moka::sync::Cache<String, Governor>,
}

impl UserGovernors {
    pub fn new(config: GovernorConfig, redis: Option<Arc<SharedRedis>>, org_key: &str) -> Self {
        let governors = moka::sync::Cache::builder()
            .max_capacity(MAX_USERS)
            .time_to_idle(Duration::from_secs(15 * 60))
            .eviction_listener(|_, g: Governor, _| g.forget_shared())
            .build();
        Self {
            config: arc_swap::ArcSwap::from_pointee(config),
            redis,
            org_key: org_key.to_owned(),
            governors,
        }
    }

    /// The governor of the user `object_id` of `tenant`.
    pub fn of(&self, tenant: &str, object_id: &str) -> Governor {
        let key = format!("{}/user/{tenant}/{object_id}", self.org_key);
        self.governors.get_with(key.clone(), || {
            let config = (**self.config.load()).clone();
            match &self.redis {
                Some(r) => Governor::shared(config, r, &key),
                None => Governor::new(config),
            }
        })
    }

    /// A reload's governor settings, for every user from now on.
    pub fn reconfigure(&self, config: GovernorConfig) {
        for (_, g) in self.governors.iter() {
            g.reconfigure(config.clone());
        }
        self.config.store(Arc::new(config));
    }

    /// Users governed now.
    pub fn count(&self) -> u64 {
        self.governors.run_pending_tasks();
        self.governors.entry_count()
    }
}
