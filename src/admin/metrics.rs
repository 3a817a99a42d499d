//! `/metrics`: the registry rendered after copying in what is read at
//! scrape time (governors, pools, caches, tokens, connections, the log
//! writer).

use std::sync::atomic::Ordering;

use crate::app::AppState;
use crate::stats::metrics::{Metrics, OrgLabel, TokenLabels, TokenOrg, sync_counter};

/// Renders the registry, after copying the scrape-time figures in.
pub async fn render(m: &Metrics, state: &AppState) -> String {
    sync_counter(&m.log_lines_dropped, crate::logging::dropped_lines());
    m.connections.render(&state.connections);
    for org in state.orgs.iter() {
        let l = OrgLabel {
            org: org.name.clone(),
        };
        m.governor.render(&org.name, &org.lanes);
        m.pools.render(&org.pool, &l);
        if let Some(cache) = &org.metadata {
            m.cache.render(cache, &l);
        }
        let load = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as i64;
        m.org
            .dop_hint
            .get_or_create(&l)
            .set(load(&org.lanes.first().governor.stats().dop_hint));
        if org.ratelimit.seen.load(Ordering::Relaxed) == 1 {
            m.org
                .ratelimit_burst
                .get_or_create(&l)
                .set(org.ratelimit.burst_remaining.load(Ordering::Relaxed) as i64);
            m.org
                .ratelimit_time
                .get_or_create(&l)
                .set(org.ratelimit.time_remaining_ms.load(Ordering::Relaxed) as f64 / 1000.0);
        }
        for lane in org.lanes.iter() {
            let left = lane
                .token
                .expires_in()
                .await
                .map_or(0.0, |d| d.as_secs_f64());
            let label = TokenOrg {
                org: org.name.clone(),
                credential: lane.token.credential_name().to_owned(),
            };
            m.org.token_expiry.get_or_create(&label).set(left);
        }
    }
    for provider in state.providers() {
        for (result, reason, count) in provider.stats().snapshot() {
            let c = m.org.token_fetches.get_or_create(&TokenLabels {
                credential: provider.credential_name().to_owned(),
                result,
                reason,
            });
            sync_counter(&c, count);
        }
    }
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &m.registry);
    out
}
