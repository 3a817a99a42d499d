//! The accept loop's figures, copied in at scrape time: connections open,
//! connections the watchdog closed (by reason), new connections refused.

use std::sync::atomic::Ordering;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{registered, sync_counter};
use crate::server::ConnectionStats;
use crate::server::watch::Closed;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct Reason {
    reason: &'static str,
}

pub(crate) struct ConnectionFamilies {
    open: Gauge,
    closed: Family<Reason, Counter>,
    refused: Family<Reason, Counter>,
}

impl ConnectionFamilies {
    pub(super) fn register(r: &mut Registry) -> Self {
        Self {
            open: registered(
                r,
                "connections_open",
                "Client connections open on the proxy listener",
                Gauge::default(),
            ),
            closed: registered(
                r,
                "connections_closed",
                "Client connections the proxy closed: no_request (no request head within header_read_timeout of accept), slow_head, idle (idle_timeout), stalled_reader (an answer not taken for body_idle_timeout), evicted (closed to make room)",
                Family::default(),
            ),
            refused: registered(
                r,
                "connections_refused",
                "New client connections closed at once: full (max_connections held by busy connections), per_ip (max_connections_per_ip)",
                Family::default(),
            ),
        }
    }

    pub(crate) fn render(&self, s: &ConnectionStats) {
        self.open.set(s.open.load(Ordering::Relaxed) as i64);
        for closed in Closed::ALL {
            let c = self.closed.get_or_create(&Reason {
                reason: closed.label(),
            });
            sync_counter(&c, s.closed[closed as usize].load(Ordering::Relaxed));
        }
        for (reason, value) in [("full", &s.refused_full), ("per_ip", &s.refused_per_ip)] {
            let c = self.refused.get_or_create(&Reason { reason });
            sync_counter(&c, value.load(Ordering::Relaxed));
        }
    }
}
