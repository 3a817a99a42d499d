//! A retry budget per org, as Envoy's: retries of transient failures may add
//! at most a share of the requests of the last window (with a small floor,
//! so a quiet org can still retry), so an outage is not multiplied by the
//! proxy into a retry storm.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The window the shares are counted over.
const WINDOW: Duration = Duration::from_secs(10);

/// Requests and retries in the current and the previous window.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_retries: u64,
    counts: Mutex<Counts>,
}

#[derive(Debug)]
struct Counts {
    started: Instant,
    requests: u64,
    retries: u64,
    previous_requests: u64,
}

impl RetryBudget {
    /// At most `ratio` × requests (and at least `min_retries`) per window.
    pub fn new(ratio: f64, min_retries: u64) -> Self {
        Self {
            ratio,
            min_retries,
            counts: Mutex::new(Counts {
                started: Instant::now(),
                requests: 0,
                retries: 0,
                previous_requests: 0,
            }),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        let mut c = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if c.started.elapsed() >= WINDOW {
            c.previous_requests = c.requests;
            c.requests = 0;
            c.retries = 0;
            c.started = Instant::now();
        }
        c
    }

    /// Counts one request sent (first attempts only).
    pub fn request(&self) {
        self.counts().requests += 1;
    }

    /// Takes one retry from the budget; `false` when it is used up.
    pub fn try_retry(&self) -> bool {
        let mut c = self.counts();
        let base = c.requests.max(c.previous_requests) as f64;
        let allowed = ((base * self.ratio) as u64).max(self.min_retries);
        if c.retries < allowed {
            c.retries += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_share_of_requests_with_a_floor() {
        let b = RetryBudget::new(0.2, 3);
        assert_eq!((0..10).filter(|_| b.try_retry()).count(), 3, "the floor");
        for _ in 0..100 {
            b.request();
        }
        assert_eq!(
            (0..100).filter(|_| b.try_retry()).count(),
            17,
            "20 % of 100, 3 used"
        );
        tokio::time::advance(WINDOW).await;
        assert_eq!(
            (0..100).filter(|_| b.try_retry()).count(),
            20,
            "the last window's share"
        );
    }
}
