//! Lanes, measured (`bash bench/lanes.sh`; results in docs/benchmarks.md):
//! a stand-in Dataverse that allows 52 concurrent requests per application
//! user and answers in 40 ± 10 ms, 400 closed-loop callers spread over
//! three replicas sharing Redis; one lane (one application user) against
//! three lanes (three), side by side in one run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dataverse_proxy::config::{Config, Sources};
use dataverse_sim::{AppUser, ServiceLimits, Sim, SimConfig, SimHandle};
use tokio_util::sync::CancellationToken;

mod common;
use common::{OnThrottle, Tally, arg, percentile_ms};

const CALLERS: usize = 400;
const REPLICAS: usize = 3;

/// The stand-in's service time: 40 ± 10 ms, or `BENCH_LATENCY_MS` ± a quarter.
fn latency() -> (Duration, Duration) {
    let ms: u64 = std::env::var("BENCH_LATENCY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    (Duration::from_millis(ms), Duration::from_millis(ms / 4))
}

async fn stand_in() -> Sim {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    // Only concurrency is measured: the per-window limits are out of the way.
    sim.handle.set_service_limits(ServiceLimits {
        concurrency: 52,
        requests: 100_000_000,
        execution: Duration::from_secs(100_000_000),
        ..ServiceLimits::default()
    });
    let (base, spread) = latency();
    sim.handle.set_latency_spread(base, spread);
    sim
}

/// `[org] lanes` and the extra lanes' credentials.
fn lanes_toml(sim: &SimHandle, users: &[AppUser]) -> String {
    let mut names = vec!["\"default\"".to_owned()];
    names.extend((0..users.len()).map(|i| format!("\"lane-{}\"", i + 2)));
    let mut toml = format!("[org]\nlanes = [{}]\n\n", names.join(", "));
    for (i, u) in users.iter().enumerate() {
        toml.push_str(&format!(
            "[credentials.lane-{}]\ntenant_id = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\ntoken_url = \"{}\"\n\n",
            i + 2,
            sim.config().tenant_id,
            u.client_id,
            u.secret,
            sim.token_url(),
        ));
    }
    toml
}

/// A replica in front of `sim`, sharing `redis` under `prefix`.
async fn replica(
    sim: &SimHandle,
    redis: &str,
    prefix: &str,
    toml: String,
) -> (String, CancellationToken) {
    let mut overrides = sim.proxy_overrides();
    overrides.extend([
        ("governor.max_concurrency", "52".to_owned()),
        ("governor.ceiling", "52".to_owned()),
        ("governor.max_queue", "1000".to_owned()),
        ("governor.queue_timeout", "30s".to_owned()),
        ("governor.redis_url", redis.to_owned()),
        ("governor.redis_prefix", prefix.to_owned()),
        ("governor.expected_replicas", "3".to_owned()),
        ("log.format", "json".to_owned()),
    ]);
    let config = Config::load(&Sources {
        overrides,
        inline_toml: Some(toml),
        ..Sources::default()
    })
    .expect("config");
    let common::Replica {
        base,
        admin: admin_url,
        stop,
    } = common::serve(config).await;
    let client = reqwest::Client::new();
    for _ in 0..1000 {
        let metrics = match client.get(format!("{admin_url}/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if metrics.contains("governor_shared_state{org=\"default\",lane=\"default\"} 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (base, stop)
}

/// `CALLERS` closed-loop callers for `secs` (after a second's warm-up),
/// caller i on replica i mod n.
async fn run(bases: &[String], secs: u64) -> Arc<Tally> {
    let stop = Arc::new(AtomicBool::new(false));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CALLERS)
        .build()
        .expect("client");
    let tally = Arc::new(Tally::default());
    let tasks: Vec<_> = (0..CALLERS)
        .map(|i| {
            let url = format!("{}/api/data/v9.2/WhoAmI", bases[i % bases.len()]);
            let client = client.clone();
            let pause = OnThrottle::Pause(Duration::from_millis(100));
            tokio::spawn(common::caller(
                move || client.get(&url),
                tally.clone(),
                stop.clone(),
                pause,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    tally.reset();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    tally
}

#[tokio::main]
async fn main() {
    dataverse_proxy::install_crypto_provider();
    let secs = arg("--secs", 10);
    let replicas: usize = std::env::var("BENCH_REPLICAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(REPLICAS);
    let redis = std::env::var("BENCH_REDIS_URL")
        .expect("BENCH_REDIS_URL (bench/lanes.sh starts a redis-server)");
    let (base, spread) = latency();
    println!(
        "Stand-in: 52 concurrent per application user, {} ± {} ms. Load: {CALLERS} closed-loop callers over {replicas} replicas sharing Redis; {secs} s per row after 1 s of warm-up.\n",
        base.as_millis(),
        spread.as_millis()
    );
    println!(
        "| lanes | goodput/s | × one lane | p50 ms | p99 ms | caller 429s | other errors | 429s from the stand-in | max in flight per user at the stand-in | max in flight in all | mean in flight at the stand-in |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut one_lane = None;
    let rows: Vec<usize> = match std::env::var("BENCH_LANES") {
        Ok(v) => v.split(',').filter_map(|n| n.trim().parse().ok()).collect(),
        Err(_) => vec![1, 3],
    };
    for lanes in rows {
        let sim = stand_in().await;
        let users: Vec<AppUser> = (1..lanes)
            .map(|_| sim.handle.add_application_user())
            .collect();
        let toml = if lanes == 1 {
            String::new()
        } else {
            lanes_toml(&sim.handle, &users)
        };
        let prefix = uuid::Uuid::new_v4().to_string();
        let mut bases = Vec::new();
        let mut stops = Vec::new();
        for _ in 0..replicas {
            let (base, stop) = replica(&sim.handle, &redis, &prefix, toml.clone()).await;
            bases.push(base);
            stops.push(stop);
        }
        // The stand-in's occupancy, sampled every 5 ms while the load runs.
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = tokio::spawn({
            let (sim, sampling) = (sim.handle.clone(), sampling.clone());
            async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let (mut sum, mut n) = (0u64, 0u64);
                while sampling.load(Ordering::Relaxed) {
                    sum += sim.in_flight_now() as u64;
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                sum as f64 / n.max(1) as f64
            }
        });
        let tally = run(&bases, secs).await;
        sampling.store(false, Ordering::Relaxed);
        let mean_in_flight = sampler.await.unwrap_or(0.0);
        let goodput = tally.ok() as f64 / secs as f64;
        let base = *one_lane.get_or_insert(goodput);
        let l = tally.sorted();
        let per_user = sim.handle.max_concurrency_by_user();
        println!(
            "| {lanes} | {goodput:.0} | {:.2} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {mean_in_flight:.0} |",
            goodput / base,
            percentile_ms(&l, 0.50),
            percentile_ms(&l, 0.99),
            tally.throttled(),
            tally.other(),
            sim.handle.throttled(),
            per_user.values().max().copied().unwrap_or(0),
            sim.handle.max_total_concurrency_seen(),
        );
        for s in stops {
            s.cancel();
        }
        sim.shutdown();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
