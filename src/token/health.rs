//! What a token provider tells about itself: fetch counts by reason and
//! result (the metrics) and its health (the status page). Nothing of a
//! token or a credential's value.

use std::time::Duration;

/// How a token provider is doing, for the status page: nothing of the
/// token or the credential's value.
#[derive(Debug, Clone)]
pub struct TokenHealth {
    /// The credential's name and kind.
    pub credential: String,
    pub kind: &'static str,
    /// Until the current token stops being served (`None`: none held).
    pub expires_in: Option<Duration>,
    /// When the last fetch succeeded (Unix milliseconds).
    pub last_refresh_ms: Option<u64>,
    /// Failed fetches since the last success.
    pub failures_in_a_row: u32,
    /// What the last failure tells a caller (no secret, no detail).
    pub last_error: Option<String>,
}

/// Why a token was fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchReason {
    /// The first token.
    Startup,
    /// Ahead of expiry, in the background.
    Refresh,
    /// The last one stopped being served before a new one arrived.
    Expired,
    /// Dataverse refused the last one (401).
    Invalidated,
    /// An operator asked (SIGHUP), or a command (`check`, `token`).
    Manual,
}

const REASONS: [(FetchReason, &str); 5] = [
    (FetchReason::Startup, "startup"),
    (FetchReason::Refresh, "refresh"),
    (FetchReason::Expired, "expired"),
    (FetchReason::Invalidated, "invalidated"),
    (FetchReason::Manual, "manual"),
];

/// Token fetches by reason and result.
#[derive(Debug, Default)]
pub struct TokenStats {
    ok: [std::sync::atomic::AtomicU64; 5],
    error: [std::sync::atomic::AtomicU64; 5],
}

impl TokenStats {
    pub(super) fn record(&self, reason: FetchReason, ok: bool) {
        let i = REASONS.iter().position(|(r, _)| *r == reason).unwrap_or(0);
        let slot = if ok { &self.ok[i] } else { &self.error[i] };
        slot.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// `(result, reason, count)` for every combination seen.
    pub fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut out = Vec::new();
        for (i, (_, name)) in REASONS.iter().enumerate() {
            for (result, slot) in [("ok", &self.ok[i]), ("error", &self.error[i])] {
                let n = slot.load(std::sync::atomic::Ordering::Relaxed);
                if n > 0 {
                    out.push((result, *name, n));
                }
            }
        }
        out
    }
}
