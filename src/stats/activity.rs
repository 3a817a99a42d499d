//! What one org's traffic looked like over the last 15 minutes: a fixed
//! ring of 5-second samples (requests per second, p50 and p99 latency,
//! 429s from Dataverse), in memory, for the status page's charts.
//!
//! Requests are counted into the current interval as they end; a ticker
//! closes it every [`INTERVAL`] ([`Activity::roll`]). Latency percentiles
//! come from a histogram of 1.25 × buckets (0.5 ms to about 2 minutes), so
//! a percentile is the upper edge of its bucket: within 25 %, plenty for a
//! chart, and a fixed 60 counters per interval whatever the traffic.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::time::Instant;

/// Length of one sample.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept: 15 minutes.
pub const SAMPLES: usize = 180;

const BUCKETS: usize = 60;
const FIRST_BUCKET_MS: f64 = 0.5;
const BUCKET_GROWTH: f64 = 1.25;

/// One point of the charts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// When the interval began, in Unix milliseconds.
    pub t: u64,
    /// Requests per second that ended in it.
    pub rps: f64,
    /// Latency percentiles of those requests, in milliseconds (0: none).
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// 429 answers Dataverse sent in it.
    pub throttled: u64,
}

struct Interval {
    began: Instant,
    began_unix_ms: u64,
    requests: u64,
    latencies: [u32; BUCKETS],
    /// The org's count of Dataverse 429s when the interval began.
    throttled_before: u64,
}

impl Interval {
    fn new(throttled_total: u64) -> Self {
        Self {
            began: Instant::now(),
            began_unix_ms: unix_ms(),
            requests: 0,
            latencies: [0; BUCKETS],
            throttled_before: throttled_total,
        }
    }

    /// This interval as a point, `throttled_total` being the org's count now.
    fn sample(&self, throttled_total: u64) -> Sample {
        let secs = self.began.elapsed().as_secs_f64().max(1.0);
        Sample {
            t: self.began_unix_ms,
            rps: self.requests as f64 / secs,
            p50_ms: percentile(&self.latencies, self.requests, 0.50),
            p99_ms: percentile(&self.latencies, self.requests, 0.99),
            throttled: throttled_total.saturating_sub(self.throttled_before),
        }
    }
}

/// The ring of one org.
pub struct Activity {
    current: Mutex<Interval>,
    ring: Mutex<VecDeque<Sample>>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            current: Mutex::new(Interval::new(0)),
            ring: Mutex::new(VecDeque::with_capacity(SAMPLES)),
        }
    }
}

impl Activity {
    /// One request ended after `took`.
    pub fn record(&self, took: Duration) {
        let mut current = lock(&self.current);
        current.requests += 1;
        current.latencies[bucket(took)] += 1;
    }

    /// Closes the current interval into the ring (the oldest sample goes
    /// when it is full) and opens the next; `throttled_total` is the org's
    /// count of Dataverse 429s so far.
    pub fn roll(&self, throttled_total: u64) {
        let closed = {
            let mut current = lock(&self.current);
            let sample = current.sample(throttled_total);
            *current = Interval::new(throttled_total);
            sample
        };
        let mut ring = lock(&self.ring);
        if ring.len() == SAMPLES {
            ring.pop_front();
        }
        ring.push_back(closed);
    }

    /// The ring, oldest first, with the interval under way as its last point.
    pub fn series(&self, throttled_total: u64) -> Vec<Sample> {
        let current = lock(&self.current).sample(throttled_total);
        let mut points: Vec<Sample> = lock(&self.ring).iter().copied().collect();
        points.push(current);
        points
    }
}

fn bucket(took: Duration) -> usize {
    let ms = took.as_secs_f64() * 1000.0;
    if ms <= FIRST_BUCKET_MS {
        return 0;
    }
    let i = (ms / FIRST_BUCKET_MS).ln() / BUCKET_GROWTH.ln();
    (i.ceil() as usize).min(BUCKETS - 1)
}

fn upper_edge_ms(bucket: usize) -> f64 {
    FIRST_BUCKET_MS * BUCKET_GROWTH.powi(bucket as i32)
}

fn percentile(counts: &[u32; BUCKETS], total: u64, q: f64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0u64;
    for (i, n) in counts.iter().enumerate() {
        seen += u64::from(*n);
        if seen >= rank {
            return (upper_edge_ms(i) * 100.0).round() / 100.0;
        }
    }
    upper_edge_ms(BUCKETS - 1)
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn samples_hold_rates_percentiles_and_429s() {
        let a = Activity::default();
        for _ in 0..98 {
            a.record(Duration::from_millis(10));
        }
        a.record(Duration::from_millis(900));
        a.record(Duration::from_secs(3));
        tokio::time::advance(INTERVAL).await;
        let live = a.series(4);
        assert_eq!(live.len(), 1, "the interval under way is a point too");
        a.roll(4);
        let points = a.series(4);
        assert_eq!(points.len(), 2);
        let s = points[0];
        assert!(
            (s.rps - 20.0).abs() < 1e-9,
            "100 requests in 5 s: {}",
            s.rps
        );
        assert!((10.0..12.5).contains(&s.p50_ms), "p50 {}", s.p50_ms);
        assert!((900.0..1125.0).contains(&s.p99_ms), "p99 {}", s.p99_ms);
        assert_eq!(s.throttled, 4);
        assert_eq!(points[1].throttled, 0, "counted once");
        assert_eq!(points[1].p50_ms, 0.0, "nothing yet");
    }

    #[tokio::test(start_paused = true)]
    async fn the_ring_keeps_fifteen_minutes() {
        let a = Activity::default();
        for i in 0..(SAMPLES as u64 + 20) {
            a.record(Duration::from_millis(1));
            tokio::time::advance(INTERVAL).await;
            a.roll(i);
        }
        assert_eq!(a.series(0).len(), SAMPLES + 1);
    }

    #[test]
    fn buckets_cover_half_a_millisecond_to_minutes() {
        assert_eq!(bucket(Duration::ZERO), 0);
        assert_eq!(bucket(Duration::from_secs(3600)), BUCKETS - 1);
        for ms in [1u64, 7, 40, 250, 1_000, 20_000] {
            let edge = upper_edge_ms(bucket(Duration::from_millis(ms)));
            assert!(
                edge >= ms as f64 && edge < ms as f64 * 1.26,
                "{ms} ms → {edge}"
            );
        }
    }
}
