//! The metadata cache's figures by org, copied in at scrape time: how
//! requests fared (hit, miss, revalidated, changed), the variants made and
//! the bytes held.

use std::sync::atomic::Ordering;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{OrgLabel, registered, sync_counter};
use crate::metadata_cache::MetadataCache;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OrgResult {
    org: String,
    result: &'static str,
}

pub(crate) struct CacheFamilies {
    requests: Family<OrgResult, Counter>,
    variants: Family<OrgLabel, Counter>,
    bytes: Family<OrgLabel, Gauge>,
}

impl CacheFamilies {
    pub(super) fn register(r: &mut Registry) -> Self {
        Self {
            requests: registered(
                r,
                "metadata_cache_requests",
                "Metadata requests by how the cache served them: hit (no call to Dataverse), revalidated (Dataverse answered 304), changed (stale, and Dataverse sent a new answer), miss",
                Family::default(),
            ),
            variants: registered(
                r,
                "metadata_cache_variants_made",
                "Callers' forms of cached answers made (decoded, links rewritten, encoded for one coding) and kept",
                Family::default(),
            ),
            bytes: registered(
                r,
                "metadata_cache_bytes",
                "Bytes the metadata cache holds (answers as Dataverse sent them)",
                Family::default(),
            ),
        }
    }

    pub(crate) fn render(&self, cache: &MetadataCache, l: &OrgLabel) {
        let s = cache.stats();
        for (result, value) in [
            ("hit", &s.hits),
            ("miss", &s.misses),
            ("revalidated", &s.revalidated),
            ("changed", &s.changed),
        ] {
            let label = OrgResult {
                org: l.org.clone(),
                result,
            };
            sync_counter(
                &self.requests.get_or_create(&label),
                value.load(Ordering::Relaxed),
            );
        }
        sync_counter(
            &self.variants.get_or_create(l),
            s.variants_made.load(Ordering::Relaxed),
        );
        let held = i64::try_from(cache.weighted_size()).unwrap_or(i64::MAX);
        self.bytes.get_or_create(l).set(held);
    }
}
