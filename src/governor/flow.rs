//! Who a request counts against in the fair share: its flow, with a
//! weight and an optional cap of its own.

use std::sync::Arc;

/// A flow's cost per request at weight 1 (tags are integers).
pub const COST: u64 = 1000;

/// Who a request counts against, for the fair share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// The caller rule's name, `rule/principal` for token callers, or
    /// `ip/ADDRESS` where no caller rule applies.
    pub key: Arc<str>,
    /// Share relative to other flows (1 by default).
    pub weight: u32,
    /// This flow's requests in flight at most, per replica.
    pub max_concurrency: Option<usize>,
}

impl Default for Flow {
    fn default() -> Self {
        Self {
            key: Arc::from("-"),
            weight: 1,
            max_concurrency: None,
        }
    }
}

impl Flow {
    /// The tag step of one request of this flow.
    pub fn cost(&self) -> u64 {
        COST / u64::from(self.weight.clamp(1, 1000))
    }
}
