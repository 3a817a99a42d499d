//! Prometheus metrics (OpenMetrics text on the admin listener's `/metrics`).
//!
//! Labels are low-cardinality on purpose: org name, normalised method,
//! status class, who made the answer (`proxy` or `dataverse`) and the caller
//! name (API-key callers; `-` otherwise). Paths and queries are never labels.
//!
//! Request metrics are recorded as requests finish (by the access log).
//! Governor, token and rate-limit figures live in atomics next to what they
//! describe and are copied into the registry at scrape time. Each [`Metrics`] is its own registry (no global
//! recorder), so several proxies in one process (tests) do not mix.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a finished request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Org name, `-` when the request never reached one.
    pub org: String,
    /// `GET`, `POST`, `PATCH`, `PUT`, `DELETE`, `HEAD`, `OPTIONS` or `OTHER`.
    pub method: &'static str,
    /// `2xx` … `5xx`.
    pub status: &'static str,
    /// `proxy` when the proxy made the answer, `dataverse` otherwise.
    pub source: &'static str,
    /// Caller name, `-` when callers are not identified.
    pub caller: String,
}

pub(crate) mod cache;
pub(crate) mod connections;
pub(crate) mod governor;
pub(crate) mod pool;
mod usage;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OrgLabel {
    pub(crate) org: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OrgMethod {
    org: String,
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TokenLabels {
    pub(crate) credential: String,
    pub(crate) result: &'static str,
    pub(crate) reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TokenOrg {
    pub(crate) org: String,
    pub(crate) credential: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Last `x-ms-ratelimit-*` values Dataverse sent for an org.
#[derive(Debug, Default)]
pub struct RateLimitSeen {
    /// `x-ms-ratelimit-burst-remaining-xrm-requests`.
    pub burst_remaining: AtomicU64,
    /// `x-ms-ratelimit-time-remaining-xrm-requests`, in milliseconds.
    pub time_remaining_ms: AtomicU64,
    /// Whether any value was seen.
    pub seen: AtomicU64,
}

impl RateLimitSeen {
    /// Records the headers of a Dataverse answer, if present.
    pub fn record(&self, burst_remaining: Option<u64>, time_remaining_ms: Option<u64>) {
        if let Some(n) = burst_remaining {
            self.burst_remaining.store(n, Ordering::Relaxed);
            self.seen.store(1, Ordering::Relaxed);
        }
        if let Some(ms) = time_remaining_ms {
            self.time_remaining_ms.store(ms, Ordering::Relaxed);
            self.seen.store(1, Ordering::Relaxed);
        }
    }
}

/// `"1,199.83"` → 1199.83, without allocating for the common form.
pub fn parse_seconds(v: &str) -> Option<f64> {
    let v = v.trim();
    if v.contains(',') {
        v.replace(',', "").parse().ok()
    } else {
        v.parse().ok()
    }
}

/// The proxy's metrics registry.
pub struct Metrics {
    pub(crate) registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<OrgMethod, Histogram>,
    upstream_duration: Family<OrgLabel, Histogram>,
    gateway_duration: Family<OrgLabel, Histogram>,
    bytes_in: Family<OrgLabel, Counter>,
    bytes_out: Family<OrgLabel, Counter>,
    in_flight: Gauge,
    /// Copied in at scrape time from the log writer.
    pub(crate) log_lines_dropped: Counter,
    /// Copied in at scrape time from the governors.
    pub(crate) governor: governor::GovernorFamilies,
    /// Copied in at scrape time from the orgs and their tokens.
    pub(crate) org: OrgFamilies,
    /// Copied in at scrape time from the metadata caches.
    pub(crate) cache: cache::CacheFamilies,
    /// Copied in at scrape time from the accept loop.
    pub(crate) connections: connections::ConnectionFamilies,
    /// Copied in at scrape time from the orgs' pools.
    pub(crate) pools: pool::PoolFamilies,
    /// Power Platform requests and daily budget warnings.
    usage: usage::UsageFamilies,
}

/// What Dataverse and Entra ID told us last, by org.
pub(crate) struct OrgFamilies {
    pub(crate) dop_hint: Family<OrgLabel, Gauge>,
    pub(crate) ratelimit_burst: Family<OrgLabel, Gauge>,
    pub(crate) ratelimit_time: Family<OrgLabel, Gauge<f64, AtomicU64>>,
    pub(crate) token_fetches: Family<TokenLabels, Counter>,
    pub(crate) token_expiry: Family<TokenOrg, Gauge<f64, AtomicU64>>,
}

impl OrgFamilies {
    fn register(r: &mut Registry) -> Self {
        let dop_hint = registered(
            r,
            "dataverse_dop_hint",
            "Last x-ms-dop-hint (recommended parallelism) from Dataverse",
            Family::<OrgLabel, Gauge>::default(),
        );
        let ratelimit_burst = registered(
            r,
            "dataverse_ratelimit_burst_remaining",
            "Last x-ms-ratelimit-burst-remaining-xrm-requests",
            Family::<OrgLabel, Gauge>::default(),
        );
        let ratelimit_time = registered(
            r,
            "dataverse_ratelimit_time_remaining_seconds",
            "Last x-ms-ratelimit-time-remaining-xrm-requests",
            Family::<OrgLabel, Gauge<f64, AtomicU64>>::default(),
        );
        let token_fetches = registered(
            r,
            "token_fetches",
            "Token requests to Entra ID, by credential, result and reason",
            Family::<TokenLabels, Counter>::default(),
        );
        let token_expiry = registered(
            r,
            "token_expiry_seconds",
            "Seconds until the org's cached token stops being served (0: none)",
            Family::<TokenOrg, Gauge<f64, AtomicU64>>::default(),
        );
        Self {
            dop_hint,
            ratelimit_burst,
            ratelimit_time,
            token_fetches,
            token_expiry,
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn histogram() -> Histogram {
    // 1 ms … ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// `GET` etc., or `OTHER` (keeps label values bounded).
pub fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PATCH => "PATCH",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// `2xx` … `5xx`.
pub fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

const METHODS: usize = 8;
const CLASSES: usize = 5;
const SOURCES: usize = 2;

/// The request metrics of one org and caller. Each label set is looked up
/// in its family once, on first use, so a finished request costs a few
/// atomic increments instead of hashing and allocating its labels.
pub struct RequestHandles {
    metrics: Arc<Metrics>,
    org: String,
    caller: String,
    /// By method, status class and source.
    requests: [OnceLock<Counter>; METHODS * CLASSES * SOURCES],
    /// By method.
    duration: [OnceLock<Histogram>; METHODS],
    bytes_in: OnceLock<Counter>,
    bytes_out: OnceLock<Counter>,
    upstream: OnceLock<Histogram>,
    gateway: OnceLock<Histogram>,
}

impl std::fmt::Debug for RequestHandles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestHandles")
            .field("org", &self.org)
            .field("caller", &self.caller)
            .finish_non_exhaustive()
    }
}

impl RequestHandles {
    /// Records a finished request.
    pub fn finished(&self, request: &Finished) {
        let m = &self.metrics;
        let method = method_index(&request.method);
        let class = (request.status.as_u16() / 100).clamp(1, 5) as usize - 1;
        let source = usize::from(request.source == "proxy");
        self.requests[(method * CLASSES + class) * SOURCES + source]
            .get_or_init(|| {
                m.requests
                    .get_or_create(&RequestLabels {
                        org: self.org.clone(),
                        method: method_label(&request.method),
                        status: status_class(request.status),
                        source: request.source,
                        caller: self.caller.clone(),
                    })
                    .clone()
            })
            .inc();
        self.duration[method]
            .get_or_init(|| {
                m.duration
                    .get_or_create(&OrgMethod {
                        org: self.org.clone(),
                        method: method_label(&request.method),
                    })
                    .clone()
            })
            .observe(request.duration.as_secs_f64());
        let org = || OrgLabel {
            org: self.org.clone(),
        };
        if request.bytes_in > 0 {
            self.bytes_in
                .get_or_init(|| m.bytes_in.get_or_create(&org()).clone())
                .inc_by(request.bytes_in);
        }
        self.bytes_out
            .get_or_init(|| m.bytes_out.get_or_create(&org()).clone())
            .inc_by(request.bytes_out);
    }

    /// Records the time Dataverse took to send response headers.
    pub fn upstream(&self, duration: Duration) {
        let family = &self.metrics.upstream_duration;
        self.per_org(&self.upstream, family)
            .observe(duration.as_secs_f64());
    }

    /// Records the proxy's own time for a request: to the answer's head,
    /// less the time Dataverse took for its response headers.
    pub fn gateway(&self, duration: Duration) {
        let family = &self.metrics.gateway_duration;
        self.per_org(&self.gateway, family)
            .observe(duration.as_secs_f64());
    }

    fn per_org<'a>(
        &self,
        handle: &'a OnceLock<Histogram>,
        family: &Family<OrgLabel, Histogram>,
    ) -> &'a Histogram {
        handle.get_or_init(|| {
            family
                .get_or_create(&OrgLabel {
                    org: self.org.clone(),
                })
                .clone()
        })
    }
}

/// What the metrics need of a finished request.
#[derive(Debug)]
pub struct Finished {
    pub method: http::Method,
    pub status: http::StatusCode,
    /// `proxy` or `dataverse`.
    pub source: &'static str,
    pub duration: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

fn method_index(m: &http::Method) -> usize {
    match *m {
        http::Method::GET => 0,
        http::Method::POST => 1,
        http::Method::PATCH => 2,
        http::Method::PUT => 3,
        http::Method::DELETE => 4,
        http::Method::HEAD => 5,
        http::Method::OPTIONS => 6,
        _ => 7,
    }
}

/// Registers `metric` under `name` and hands it back (the registry keeps a clone).
fn registered<M>(r: &mut Registry, name: &str, help: &str, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    r.register(name, help, metric.clone());
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("dataverse_proxy");
        let requests = registered(
            &mut r,
            "requests",
            "Requests answered, by org, method, status class, source and caller",
            Family::<RequestLabels, Counter>::default(),
        );
        let duration = registered(
            &mut r,
            "request_duration_seconds",
            "Time from request to the end of the answer's body",
            Family::<OrgMethod, Histogram>::new_with_constructor(histogram),
        );
        let upstream_duration = registered(
            &mut r,
            "upstream_duration_seconds",
            "Time from sending to Dataverse until its response headers",
            Family::<OrgLabel, Histogram>::new_with_constructor(histogram),
        );
        let gateway_duration = registered(
            &mut r,
            "gateway_duration_seconds",
            "The proxy's own time for a request: until the answer's head is ready for the caller, less Dataverse's time to its response headers (governor waits, replay backoff and reading a small rewritten answer's body included)",
            Family::<OrgLabel, Histogram>::new_with_constructor(histogram),
        );
        let bytes_in = registered(
            &mut r,
            "request_bytes",
            "Request body bytes received from callers",
            Family::<OrgLabel, Counter>::default(),
        );
        let bytes_out = registered(
            &mut r,
            "response_bytes",
            "Response body bytes sent to callers",
            Family::<OrgLabel, Counter>::default(),
        );
        let in_flight = registered(
            &mut r,
            "in_flight_requests",
            "Requests being served now",
            Gauge::default(),
        );
        let log_lines_dropped = registered(
            &mut r,
            "log_lines_dropped",
            "Log lines dropped because the log output could not keep up (docs/logging.md)",
            Counter::default(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        r.register("build_info", "Build information", build);
        Self {
            governor: governor::GovernorFamilies::register(&mut r),
            org: OrgFamilies::register(&mut r),
            cache: cache::CacheFamilies::register(&mut r),
            connections: connections::ConnectionFamilies::register(&mut r),
            pools: pool::PoolFamilies::register(&mut r),
            usage: usage::UsageFamilies::register(&mut r),
            registry: r,
            requests,
            duration,
            upstream_duration,
            gateway_duration,
            bytes_in,
            bytes_out,
            in_flight,
            log_lines_dropped,
        }
    }

    /// The gauge of requests being served.
    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    /// The handles of the request metrics of one org and caller (`-` for
    /// either when unknown), to keep and use for every request of theirs.
    pub fn handles(self: &Arc<Self>, org: &str, caller: &str) -> RequestHandles {
        RequestHandles {
            metrics: self.clone(),
            org: org.to_owned(),
            caller: caller.to_owned(),
            requests: std::array::from_fn(|_| OnceLock::new()),
            duration: std::array::from_fn(|_| OnceLock::new()),
            bytes_in: OnceLock::new(),
            bytes_out: OnceLock::new(),
            upstream: OnceLock::new(),
            gateway: OnceLock::new(),
        }
    }
}

/// Raises a counter to `value` (counters mirrored from atomics only grow).
pub(crate) fn sync_counter(c: &Counter, value: u64) {
    let current = c.get();
    if value > current {
        c.inc_by(value - current);
    }
}

/// Shared handle.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratelimit_headers_parse() {
        // The head reader (http/forward/head.rs) parses the values.
        let r = RateLimitSeen::default();
        assert_eq!(parse_seconds("1,199.83"), Some(1199.83));
        r.record(Some(5999), Some(1_199_830));
        assert_eq!(r.burst_remaining.load(Ordering::Relaxed), 5999);
        assert_eq!(r.time_remaining_ms.load(Ordering::Relaxed), 1_199_830);
    }

    #[test]
    fn labels_stay_bounded() {
        assert_eq!(
            method_label(&http::Method::from_bytes(b"PROPFIND").expect("m")),
            "OTHER"
        );
        assert_eq!(status_class(http::StatusCode::IM_A_TEAPOT), "4xx");
    }
}
