//! Pure refresh and expiry arithmetic, kept apart from I/O so it is easy to test.
//!
//! Policy (docs/dataverse.md, "Tokens", following MSAL):
//! - `refresh_in` from Entra ID wins when present;
//! - else lifetimes of two hours or more refresh at half-life (MSAL's managed
//!   identity rule);
//! - else refresh five minutes before expiry, but never before half-life,
//!   so short lifetimes (tests, the simulator) are still refreshed ahead
//!   instead of in a tight loop.
//!
//! A token is *served* until shortly before it really expires: the margin
//! covers the time a request needs to reach Dataverse.

use std::time::Duration;

const TWO_HOURS: Duration = Duration::from_secs(2 * 3600);
const FIVE_MINUTES: Duration = Duration::from_secs(5 * 60);
const MAX_SERVE_MARGIN: Duration = Duration::from_secs(10);

/// When to refresh a token, counted from the moment it was issued.
pub fn refresh_after(lifetime: Duration, refresh_in: Option<Duration>) -> Duration {
    let half = lifetime / 2;
    let after = match refresh_in {
        Some(r) if r < lifetime => r,
        Some(_) | None if lifetime >= TWO_HOURS => half,
        Some(_) | None => lifetime.saturating_sub(FIVE_MINUTES).max(half),
    };
    after.min(serve_for(lifetime))
}

/// How long a token is handed out, counted from issue: its lifetime less a
/// margin of a tenth of the lifetime, at most ten seconds.
pub fn serve_for(lifetime: Duration) -> Duration {
    lifetime.saturating_sub((lifetime / 10).min(MAX_SERVE_MARGIN))
}

/// Delay before retry number `attempt` (1-based) after failed fetches:
/// exponential from `min` up to `max`, with `jitter` in `[0, 1)` taking off
/// up to half of it, so many proxies do not retry in step.
pub fn backoff(attempt: u32, min: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let base = min.saturating_mul(1u32 << exp).min(max);
    base.mul_f64(1.0 - 0.5 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn one_hour_token_refreshes_five_minutes_early() {
        assert_eq!(refresh_after(s(3599), None), s(3299));
    }

    #[test]
    fn long_token_refreshes_at_half_life() {
        assert_eq!(refresh_after(s(24 * 3600), None), s(12 * 3600));
        assert_eq!(refresh_after(s(7200), None), s(3600));
    }

    #[test]
    fn refresh_in_wins() {
        assert_eq!(refresh_after(s(86_400), Some(s(3600))), s(3600));
        // Nonsense refresh_in (beyond the lifetime) is ignored.
        assert_eq!(refresh_after(s(3600), Some(s(9000))), s(3300));
    }

    #[test]
    fn short_tokens_refresh_at_half_life_not_in_a_loop() {
        assert_eq!(refresh_after(s(4), None), s(2));
        assert_eq!(refresh_after(s(360), None), s(180));
        assert_eq!(refresh_after(Duration::ZERO, None), Duration::ZERO);
    }

    #[test]
    fn tokens_are_served_until_just_before_expiry() {
        assert_eq!(serve_for(s(3600)), s(3590));
        assert_eq!(serve_for(s(4)), Duration::from_millis(3600));
        assert!(refresh_after(s(4), None) < serve_for(s(4)));
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let (min, max) = (s(1), s(60));
        assert_eq!(backoff(1, min, max, 0.0), s(1));
        assert_eq!(backoff(2, min, max, 0.0), s(2));
        assert_eq!(backoff(4, min, max, 0.0), s(8));
        assert_eq!(backoff(40, min, max, 0.0), s(60));
        assert_eq!(backoff(4, min, max, 0.999_999).as_millis(), 4000);
    }
}
