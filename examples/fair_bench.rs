//! A fair share of one Dataverse budget (`bash bench/fair.sh`; results in
//! docs/benchmarks.md): one greedy caller with 200 closed-loop connections
//! and ten small callers with 2 each, against a stand-in that allows 52
//! concurrent requests and answers in 40 ± 10 ms, through one proxy or
//! three sharing Redis. Side by side in one run: callers told apart by
//! their API keys (each its own flow, served by fair share) and the same
//! load as one flow (no caller rules: the arrival order every caller got
//! before the fair queue).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dataverse_proxy::config::{Config, Sources};
use dataverse_sim::{ServiceLimits, Sim, SimConfig, SimHandle};
use sha2::Digest;
use tokio_util::sync::CancellationToken;

mod common;
use common::{OnThrottle, Tally, arg, percentile_ms};

const GREEDY: usize = 200;
const SMALL: usize = 10;
const SMALL_EACH: usize = 2;

fn key_of(caller: &str) -> String {
    format!("key-{caller}")
}

/// `[[callers]]` for the greedy caller and the small ones.
fn caller_rules() -> String {
    let mut toml = String::new();
    let names =
        std::iter::once("greedy".to_owned()).chain((0..SMALL).map(|i| format!("small-{i}")));
    for name in names {
        let hash: String = sha2::Sha256::digest(key_of(&name).as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        toml.push_str(&format!(
            "[[callers]]\nname = \"{name}\"\napi_key_sha256 = \"{hash}\"\n\n"
        ));
    }
    toml
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
    sim.handle
        .set_latency_spread(Duration::from_millis(40), Duration::from_millis(10));
    sim
}

/// A proxy in front of `sim`; its base URL and stop switch.
async fn replica(
    sim: &SimHandle,
    redis: Option<(&str, &str)>,
    rules: Option<String>,
) -> (String, CancellationToken) {
    let mut overrides = sim.proxy_overrides();
    overrides.extend([
        (
            "governor.max_concurrency",
            std::env::var("BENCH_MAX").unwrap_or("52".into()),
        ),
        (
            "governor.ceiling",
            std::env::var("BENCH_MAX").unwrap_or("52".into()),
        ),
        ("governor.max_queue", "1000".to_owned()),
        ("governor.queue_timeout", "30s".to_owned()),
        ("log.format", "json".to_owned()),
    ]);
    if let Some((url, prefix)) = redis {
        overrides.push(("governor.redis_url", url.to_owned()));
        overrides.push(("governor.redis_prefix", prefix.to_owned()));
        overrides.push(("governor.expected_replicas", "3".to_owned()));
        if let Ok(t) = std::env::var("BENCH_LEASE") {
            overrides.push(("governor.lease_time", t));
        }
        if let Ok(t) = std::env::var("BENCH_REDIS_TIMEOUT") {
            overrides.push(("governor.redis_timeout", t));
        }
    }
    let config = Config::load(&Sources {
        overrides,
        inline_toml: rules,
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
        let ready = client.get(format!("{admin_url}/readyz")).send().await;
        let shared = client.get(format!("{admin_url}/metrics")).send().await;
        let shared = match shared {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if ready.is_ok_and(|r| r.status() == 200)
            && (redis.is_none()
                || shared.contains("governor_shared_state{org=\"default\",lane=\"default\"} 1"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (base, stop)
}

/// The load for `secs`: connection j of every caller on replica j mod n.
async fn run(bases: &[String], secs: u64, keys: bool) -> Vec<(String, Arc<Tally>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(GREEDY + SMALL * SMALL_EACH)
        .build()
        .expect("client");
    let mut callers = vec![("greedy".to_owned(), GREEDY)];
    callers.extend((0..SMALL).map(|i| (format!("small-{i}"), SMALL_EACH)));
    let mut out = Vec::new();
    let mut tasks = Vec::new();
    let mut n = 0usize;
    for (name, connections) in callers {
        let tally = Arc::new(Tally::default());
        for _ in 0..connections {
            let url = format!("{}/api/data/v9.2/WhoAmI", bases[n % bases.len()]);
            n += 1;
            let (client, key) = (client.clone(), key_of(&name));
            let request = move || {
                let req = client.get(&url);
                if keys {
                    req.header("x-api-key", &key)
                } else {
                    req
                }
            };
            let pause = OnThrottle::Pause(Duration::from_millis(100));
            tasks.push(tokio::spawn(common::caller(
                request,
                tally.clone(),
                stop.clone(),
                pause,
            )));
        }
        out.push((name, tally));
    }
    // The first second warms the pools and the limits up; it is not counted.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (_, t) in &out {
        t.reset();
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    out
}

fn report(name: &str, callers: &[(String, Arc<Tally>)], secs: u64, sim: &SimHandle) {
    let sum = |f: fn(&Tally) -> u64| callers.iter().map(|(_, c)| f(c)).sum::<u64>();
    let (total, throttled, other) = (sum(Tally::ok), sum(Tally::throttled), sum(Tally::other));
    let greedy = callers[0].1.sorted();
    let mut small: Vec<Duration> = Vec::new();
    let mut worst_small_p99 = 0.0f64;
    let mut small_rate = 0.0;
    for (_, c) in &callers[1..] {
        let l = c.sorted();
        worst_small_p99 = worst_small_p99.max(percentile_ms(&l, 0.99));
        small_rate += c.ok() as f64 / secs as f64;
        small.extend(l);
    }
    small.sort();
    let goodput = total as f64 / secs as f64;
    println!(
        "| {name} | {goodput:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {throttled} | {other} | {} |",
        goodput / (52.0 / 0.040),
        small_rate,
        percentile_ms(&greedy, 0.50),
        percentile_ms(&greedy, 0.99),
        percentile_ms(&small, 0.50),
        percentile_ms(&small, 0.99),
        worst_small_p99,
        percentile_ms(&small, 1.0),
        sim.max_concurrency_seen(),
    );
}

#[tokio::main]
async fn main() {
    dataverse_proxy::install_crypto_provider();
    if std::env::var("BENCH_DEBUG").is_ok() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let secs = arg("--secs", 10);
    let redis = std::env::var("BENCH_REDIS_URL").ok();
    println!(
        "Stand-in: 52 concurrent, 40 ± 10 ms (limit {:.0} requests/s). Load: {GREEDY} closed-loop connections of one greedy caller, {SMALL} callers with {SMALL_EACH} each; {secs} s per row after 1 s of warm-up.\n",
        52.0 / 0.040
    );
    println!(
        "| scenario | goodput/s | of limit | small callers' goodput/s | greedy p50 ms | greedy p99 ms | small p50 ms | small p99 ms | worst small caller p99 ms | small max ms | caller 429s | other errors | max in flight at the stand-in |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let only = std::env::var("BENCH_ONLY").ok();
    let mut rows: Vec<(&str, usize, bool)> = vec![
        ("1 replica, one flow (arrival order)", 1, false),
        ("1 replica, fair share", 1, true),
    ];
    if redis.is_some() {
        rows.push(("3 replicas + Redis, one flow (arrival order)", 3, false));
        rows.push(("3 replicas + Redis, fair share", 3, true));
    }
    for (name, replicas, fair) in rows {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let sim = stand_in().await;
        let mut bases = Vec::new();
        let mut stops = Vec::new();
        // Fresh keys per row, shared by its replicas.
        let prefix = uuid::Uuid::new_v4().to_string();
        for _ in 0..replicas {
            let rules = fair.then(caller_rules);
            let shared = redis
                .as_deref()
                .filter(|_| replicas > 1)
                .map(|u| (u, prefix.as_str()));
            let (base, stop) = replica(&sim.handle, shared, rules).await;
            bases.push(base);
            stops.push(stop);
        }
        let callers = run(&bases, secs, fair).await;
        report(name, &callers, secs, &sim.handle);
        for s in stops {
            s.cancel();
        }
        sim.shutdown();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
