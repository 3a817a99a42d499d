//! Each org's connection pool towards Dataverse, copied in at scrape time:
//! connections opened (a count that climbs with every request means the
//! server closes them: no keep-alive) and idle connections held.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{OrgLabel, registered, sync_counter};
use crate::upstream::Pool;

pub(crate) struct PoolFamilies {
    opened: Family<OrgLabel, Counter>,
    idle: Family<OrgLabel, Gauge>,
}

impl PoolFamilies {
    pub(super) fn register(r: &mut Registry) -> Self {
        Self {
            opened: registered(
                r,
                "upstream_connections_opened",
                "Connections the org's pool opened to Dataverse",
                Family::default(),
            ),
            idle: registered(
                r,
                "upstream_connections_idle",
                "Idle connections the org's pool holds for the next requests",
                Family::default(),
            ),
        }
    }

    pub(crate) fn render(&self, pool: &Pool, org: &OrgLabel) {
        sync_counter(&self.opened.get_or_create(org), pool.opened());
        self.idle.get_or_create(org).set(pool.idle() as i64);
    }
}
