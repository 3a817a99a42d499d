//! What the benchmark drivers share: closed-loop callers and their tally
//! (`fair_bench`, `governor_bench`, `lanes_bench`). Each includes this
//! with `mod common;`.

// Each driver is its own crate and uses a part of this.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What a group of callers got inside the measured window.
#[derive(Default)]
pub struct Tally {
    pub ok: AtomicU64,
    pub throttled: AtomicU64,
    pub other: AtomicU64,
    latencies: std::sync::Mutex<Vec<Duration>>,
}

impl Tally {
    /// Forgets the warm-up: what counts starts now.
    pub fn reset(&self) {
        self.ok.store(0, Ordering::Relaxed);
        self.latencies.lock().expect("lock").clear();
    }

    /// The latencies of the answers counted, sorted.
    pub fn sorted(&self) -> Vec<Duration> {
        let mut l = self.latencies.lock().expect("lock").clone();
        l.sort();
        l
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    pub fn other(&self) -> u64 {
        self.other.load(Ordering::Relaxed)
    }
}

/// What a caller does after a 429.
#[derive(Clone, Copy)]
pub enum OnThrottle {
    /// Waits this long (a client that backs off a little).
    Pause(Duration),
    /// Waits for the answer's `Retry-After` (a well-behaved direct client).
    RetryAfter,
}

/// One closed-loop caller: sends `request()` until `stop`, each answer
/// counted in `tally` unless it came after the window closed (answers
/// past the window would inflate the slower rows most). `BENCH_DEBUG`
/// prints what the 429s and other failures were.
pub async fn caller(
    request: impl Fn() -> reqwest::RequestBuilder,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    on_throttle: OnThrottle,
) {
    let debug = std::env::var("BENCH_DEBUG").is_ok();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let answer = request().send().await;
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match answer {
            Ok(r) if r.status() == 200 => {
                let _ = r.bytes().await;
                tally.ok.fetch_add(1, Ordering::Relaxed);
                tally
                    .latencies
                    .lock()
                    .expect("lock")
                    .push(started.elapsed());
            }
            Ok(r) if r.status() == 429 => {
                if debug {
                    let h = r.headers();
                    eprintln!(
                        "429 {:?} {:?}",
                        h.get("x-dataverse-proxy-error"),
                        h.get("retry-after")
                    );
                }
                tally.throttled.fetch_add(1, Ordering::Relaxed);
                let wait = match on_throttle {
                    OnThrottle::Pause(d) => d,
                    OnThrottle::RetryAfter => Duration::from_secs(retry_after(&r)),
                };
                let until = Instant::now() + wait;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(wait.min(Duration::from_millis(50))).await;
                }
            }
            other => {
                if debug {
                    eprintln!("other {:?}", other.map(|r| r.status()));
                }
                tally.other.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn retry_after(r: &reqwest::Response) -> u64 {
    r.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// The `q` quantile of sorted latencies, in milliseconds.
pub fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1)))
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// The value after `name` on the command line, else `default`.
pub fn arg(name: &str, default: u64) -> u64 {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A replica of the proxy started in this process on free loopback ports.
pub struct Replica {
    /// `http://127.0.0.1:PORT` of its proxy listener.
    pub base: String,
    /// `http://127.0.0.1:PORT` of its admin listener.
    pub admin: String,
    /// Stops it.
    pub stop: tokio_util::sync::CancellationToken,
}

/// Binds both listeners and serves `config` on them (not yet ready: each
/// driver waits for what it needs).
pub async fn serve(config: dataverse_proxy::config::Config) -> Replica {
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let replica = Replica {
        base: format!("http://{}", proxy.local_addr().expect("addr")),
        admin: format!("http://{}", admin.local_addr().expect("addr")),
        stop: tokio_util::sync::CancellationToken::new(),
    };
    tokio::spawn(dataverse_proxy::serve(
        config,
        proxy,
        admin,
        replica.stop.clone(),
    ));
    replica
}
