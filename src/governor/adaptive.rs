//! The adaptive concurrency limit of one org: additive increase after a run
//! of successes, multiplicative decrease after Dataverse's concurrency 429,
//! bounded by a floor and by a target that `x-ms-dop-hint` (Dataverse's
//! recommended degree of parallelism) raises above the configured start,
//! within the ceiling. Pure arithmetic, no clock but the one
//! passed in, so the rules are tested directly.

use std::time::Duration;

use tokio::time::Instant;

/// Which service-protection limit a 429 names (its body's error code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// `0x80072326`: too many concurrent requests. Lowers the limit.
    Concurrency,
    /// `0x80072322`: too many requests in the window. Closes the gate.
    RequestCount,
    /// `0x80072321`: too much execution time in the window. Closes the gate.
    ExecutionTime,
    /// A 429 without a known code: treated as a window limit (gate).
    Unknown,
}

impl Throttle {
    /// Every kind, in the order of the discriminants (the metrics' order).
    pub const ALL: [Self; 4] = [
        Self::Concurrency,
        Self::RequestCount,
        Self::ExecutionTime,
        Self::Unknown,
    ];

    /// The kind named by a Dataverse error body.
    pub fn from_body(body: &[u8]) -> Self {
        let code = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_ascii_lowercase));
        match code.as_deref() {
            Some("0x80072326") => Self::Concurrency,
            Some("0x80072322") => Self::RequestCount,
            Some("0x80072321") => Self::ExecutionTime,
            _ => Self::Unknown,
        }
    }

    /// The label used in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::Concurrency => "concurrency",
            Self::RequestCount => "request_count",
            Self::ExecutionTime => "execution_time",
            Self::Unknown => "unknown",
        }
    }
}

/// Factor of a decrease.
const DECREASE: f64 = 0.7;
/// After a decrease, further concurrency 429s (answers to requests sent
/// before it) do not lower the limit again for this long.
pub const DECREASE_HOLD: Duration = Duration::from_secs(2);

/// The limit and its bounds.
#[derive(Debug, Clone)]
pub struct AdaptiveLimit {
    limit: usize,
    floor: usize,
    /// The configured ceiling: no hint raises the limit above it.
    ceiling: usize,
    /// The configured starting value, the ceiling until a hint says more.
    start: usize,
    hint: Option<usize>,
    successes: usize,
    last_decrease: Option<Instant>,
}

impl AdaptiveLimit {
    /// Starts at `start`, never below `floor` nor above `ceiling`.
    pub fn new(start: usize, floor: usize, ceiling: usize) -> Self {
        let floor = floor.clamp(1, start.max(1));
        Self {
            limit: start.max(floor),
            floor,
            ceiling: ceiling.max(start),
            start,
            hint: None,
            successes: 0,
            last_decrease: None,
        }
    }

    /// The current limit.
    pub fn get(&self) -> usize {
        self.limit
    }

    /// What the limit may grow to: the starting value, or Dataverse's hint
    /// when that is higher (within the configured ceiling).
    ///
    /// A hint below the start does not lower it: the hint is advice for one
    /// client (Microsoft's samples show values such as 4), while a gateway
    /// serves many, and the limit that throttles is the 52 concurrent
    /// requests per web server, which concurrency 429s already enforce.
    pub fn target(&self) -> usize {
        self.hint
            .map_or(self.start, |h| h.min(self.ceiling).max(self.start))
    }

    /// Records `x-ms-dop-hint`.
    pub fn hint(&mut self, hint: usize) {
        self.hint = Some(hint);
        self.limit = self.limit.min(self.target());
    }

    /// One request answered without throttling; after as many successes as
    /// the limit, the limit grows by one towards the target.
    pub fn success(&mut self) -> bool {
        self.successes += 1;
        if self.successes >= self.limit && self.limit < self.target() {
            self.successes = 0;
            self.limit += 1;
            return true;
        }
        false
    }

    /// A concurrency 429: the limit shrinks (once per hold time).
    pub fn concurrency_throttled(&mut self, now: Instant) -> bool {
        if self.last_decrease.is_some_and(|t| now - t < DECREASE_HOLD) {
            return false;
        }
        self.last_decrease = Some(now);
        self.successes = 0;
        let lowered = ((self.limit as f64) * DECREASE).floor() as usize;
        self.limit = lowered.max(self.floor);
        true
    }

    /// Takes a limit decided elsewhere (the shared state), within bounds.
    pub fn set(&mut self, limit: usize) {
        self.limit = limit.clamp(self.floor, self.ceiling.max(self.floor));
    }

    /// New bounds from a reload: the limit stays where it was, within them,
    /// and grows towards the new start from there.
    pub fn rebound(&mut self, start: usize, floor: usize, ceiling: usize) {
        let fresh = Self::new(start, floor, ceiling);
        self.start = fresh.start;
        self.floor = fresh.floor;
        self.ceiling = fresh.ceiling;
        self.limit = self.limit.clamp(self.floor, self.target());
    }

    /// The floor.
    pub fn floor(&self) -> usize {
        self.floor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_bounds_keep_the_limit_within_them() {
        let mut l = AdaptiveLimit::new(50, 5, 50);
        l.rebound(20, 2, 20);
        assert_eq!(l.get(), 20, "lowered to the new start");
        l.rebound(40, 2, 40);
        assert_eq!(l.get(), 20, "kept, and grows from there");
        for _ in 0..20 {
            l.success();
        }
        assert_eq!(l.get(), 21);
        l.rebound(40, 30, 40);
        assert_eq!(l.get(), 30, "raised to the new floor");
    }

    #[test]
    fn throttle_kinds_come_from_the_error_code() {
        let body = |code: &str| format!(r#"{{"error":{{"code":"{code}","message":"x"}}}}"#);
        assert_eq!(
            Throttle::from_body(body("0x80072326").as_bytes()),
            Throttle::Concurrency
        );
        assert_eq!(
            Throttle::from_body(body("0x80072322").as_bytes()),
            Throttle::RequestCount
        );
        assert_eq!(
            Throttle::from_body(body("0x80072321").as_bytes()),
            Throttle::ExecutionTime
        );
        assert_eq!(Throttle::from_body(b"not json"), Throttle::Unknown);
    }

    #[tokio::test(start_paused = true)]
    async fn decrease_is_multiplicative_once_per_hold_and_increase_additive() {
        let mut l = AdaptiveLimit::new(50, 2, 200);
        assert!(l.concurrency_throttled(Instant::now()));
        assert_eq!(l.get(), 35);
        assert!(!l.concurrency_throttled(Instant::now()), "the same burst");
        tokio::time::advance(DECREASE_HOLD).await;
        assert!(l.concurrency_throttled(Instant::now()));
        assert_eq!(l.get(), 24);
        // 24 successes raise it by one, the next 25 by one more.
        let raised: usize = (0..49).filter(|_| l.success()).count();
        assert_eq!((raised, l.get()), (2, 26));
        // Never above the start without a hint.
        for _ in 0..10_000 {
            l.success();
        }
        assert_eq!(l.get(), 50);
    }

    #[test]
    fn the_hint_moves_the_target_within_the_bounds() {
        let mut l = AdaptiveLimit::new(50, 2, 120);
        l.hint(156);
        assert_eq!(l.target(), 120, "capped by the ceiling");
        for _ in 0..100_000 {
            l.success();
        }
        assert_eq!(l.get(), 120);
        l.hint(30);
        assert_eq!(
            l.get(),
            50,
            "a hint below the start falls back to the start"
        );
        for _ in 0..100_000 {
            l.success();
        }
        assert_eq!(l.get(), 50, "and does not lower it");
        let mut floor = AdaptiveLimit::new(3, 2, 10);
        floor.concurrency_throttled(Instant::now());
        assert_eq!(floor.get(), 2);
    }
}
