//! The operator's view on the admin listener: `GET /status` (JSON, the
//! schema in docs/operations.md) and `GET /` (one self-contained HTML page
//! that renders the same data and refreshes itself).
//!
//! Everything here is read from the running proxy at request time: token
//! health, the governors, the metadata caches, and what the access log
//! counted into the [`crate::stats::board`] and its [`crate::stats::activity`] rings. Nothing secret is
//! ever part of it: no token, no key, no secret, no configuration value
//! beyond names, kinds and URLs.

mod lanes;
mod usage;

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use serde::Serialize;

use crate::app::reload::ConfigStatus;
use crate::app::{AppState, OrgState};
use crate::stats::activity::Sample;

/// The page, with `/*INITIAL*/null` where the first snapshot goes (so it
/// renders at once, without waiting for its first fetch).
const PAGE: &str = include_str!("page.html");

/// What `/status` answers.
#[derive(Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    /// Unix milliseconds.
    pub now: u64,
    pub started: u64,
    pub ready: bool,
    pub draining: bool,
    pub config: ConfigStatus,
    pub orgs: Vec<OrgStatus>,
    pub recent_errors: Vec<crate::stats::board::RecentError>,
}

#[derive(Debug, Serialize)]
pub struct OrgStatus {
    pub name: String,
    pub url: String,
    pub token: TokenStatus,
    /// The org's lanes together: limits, slots and 429s summed; the gate
    /// closed only while every lane's is.
    pub governor: GovernorStatus,
    /// Each lane (one without `lanes` in the config).
    pub lanes: Vec<lanes::LaneStatus>,
    pub callers: Vec<CallerStatus>,
    pub errors: Vec<ErrorCount>,
    pub metadata_cache: Option<CacheStatus>,
    /// Power Platform requests spent today, by lane, caller and user.
    pub usage: usage::OrgUsage,
    /// Seconds per point of `series`.
    pub interval_s: u64,
    /// The last 15 minutes, oldest first; the last point is under way.
    pub series: Vec<Sample>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenStatus {
    pub credential: String,
    pub kind: &'static str,
    pub valid: bool,
    pub expires_in_s: Option<u64>,
    pub last_refresh: Option<u64>,
    pub failures_in_a_row: u32,
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct GovernorStatus {
    pub limit: usize,
    pub in_flight: usize,
    pub queued: usize,
    /// Seconds until the Retry-After gate reopens (0: open).
    pub gate_closed_for_s: f64,
    /// 429 answers from Dataverse in the last 5 minutes.
    pub throttled_5m: u64,
    pub throttled_total: u64,
    /// `local` (this process), `shared` (Redis), `fallback` (Redis away:
    /// this replica's share of the limit) or `returning` (Redis answers
    /// again; still the share while every replica registers its slots).
    pub state: &'static str,
    /// Why Redis is not (yet) in use, while `fallback` or `returning`.
    pub reason: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct CallerStatus {
    pub name: String,
    pub requests: u64,
    pub refused: u64,
}

#[derive(Debug, Serialize)]
pub struct ErrorCount {
    pub code: String,
    pub count: u64,
}

#[derive(Debug, Serialize)]
pub struct CacheStatus {
    pub hits: u64,
    pub misses: u64,
    pub revalidated: u64,
    pub changed: u64,
    pub bytes: u64,
}

/// `GET /status`.
pub async fn status(State(state): State<AppState>) -> impl IntoResponse {
    let body = serde_json::to_string(&snapshot(&state).await).unwrap_or_default();
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
}

/// `GET /`: the page with the first snapshot inside.
pub async fn page(State(state): State<AppState>) -> impl IntoResponse {
    let first = serde_json::to_string(&snapshot(&state).await).unwrap_or_else(|_| "null".into());
    let html = PAGE.replacen("/*INITIAL*/null", &script_safe(&first), 1);
    ([(header::CACHE_CONTROL, "no-store")], Html(html))
}

/// JSON made safe inside a `<script>`: `<`, `>` and `&` as `\u` escapes
/// (no `</script>`, `<!--` or `]]>` can end or change the script), and
/// U+2028/U+2029 escaped (line terminators in older JavaScript). The JSON
/// means the same: these characters only occur inside strings.
pub fn script_safe(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// The whole status, now.
pub async fn snapshot(state: &AppState) -> Status {
    let mut orgs = Vec::new();
    let spent = state.usage.snapshot();
    let rules = state.rules.load();
    let budget = |caller: &str| {
        rules
            .access
            .callers
            .iter()
            .find(|c| &*c.name == caller)
            .and_then(|c| c.daily_requests)
    };
    for org in state.orgs.iter() {
        let mut status = org_status(org).await;
        status.usage = usage::of(org, &spent, budget);
        orgs.push(status);
    }
    Status {
        version: env!("CARGO_PKG_VERSION"),
        now: crate::stats::activity::unix_ms(),
        started: state.started,
        ready: state.ready().await,
        draining: state.draining.load(Ordering::SeqCst),
        config: state.config_status(),
        orgs,
        recent_errors: state.recent_errors.list(),
    }
}

async fn org_status(org: &OrgState) -> OrgStatus {
    let lanes = lanes::lanes(org).await;
    let throttled_total = lanes.iter().map(|l| l.governor.throttled_total).sum();
    let series = org.board.activity.series(throttled_total);
    let five_minutes = (300 / crate::stats::activity::INTERVAL.as_secs()) as usize + 1;
    let throttled_5m = series
        .iter()
        .rev()
        .take(five_minutes)
        .map(|s| s.throttled)
        .sum();
    OrgStatus {
        name: org.name.clone(),
        url: org.origin.clone(),
        token: lanes[0].token.clone(),
        governor: lanes::together(&lanes, throttled_5m),
        lanes,
        callers: org
            .board
            .callers()
            .into_iter()
            .map(|(name, c)| CallerStatus {
                name: name.to_string(),
                requests: c.requests,
                refused: c.refused,
            })
            .collect(),
        errors: org
            .board
            .errors()
            .into_iter()
            .map(|(code, count)| ErrorCount { code, count })
            .collect(),
        metadata_cache: org.metadata.as_ref().map(|c| {
            let s = c.stats();
            let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            CacheStatus {
                hits: n(&s.hits),
                misses: n(&s.misses),
                revalidated: n(&s.revalidated),
                changed: n(&s.changed),
                bytes: c.weighted_size(),
            }
        }),
        usage: usage::OrgUsage::default(),
        interval_s: crate::stats::activity::INTERVAL.as_secs(),
        series,
    }
}

/// Closes every org's current interval each [`crate::stats::activity::INTERVAL`] until
/// `shutdown`.
pub fn spawn_ticker(
    state: AppState,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::stats::activity::INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    for org in state.orgs.iter() {
                        org.board.activity.roll(lanes::throttled_total(org));
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn inlined_json_cannot_end_the_script_and_means_the_same() {
        let hostile = serde_json::json!({"id": "<!--<script></script>&\u{2028}\u{2029}]]>"});
        let text = serde_json::to_string(&hostile).expect("json");
        let safe = super::script_safe(&text);
        for bad in ["<", ">", "&", "\u{2028}", "\u{2029}"] {
            assert!(!safe.contains(bad), "{bad:?} left in {safe}");
        }
        let back: serde_json::Value = serde_json::from_str(&safe).expect("still JSON");
        assert_eq!(back, hostile);
    }
}
