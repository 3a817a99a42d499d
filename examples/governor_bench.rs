//! Goodput of one Dataverse budget spent five ways, side by side in one run
//! (`bash bench/governor.sh`; results in docs/benchmarks.md): direct
//! clients that honour Retry-After, one proxy, three proxies each capped at
//! 50, three with the cap split by hand, three sharing Redis.
//!
//! Everything runs on loopback: the simulator enforces Dataverse's 52
//! concurrent requests per user with a fixed service time (its per-window
//! request and execution-time limits raised out of the way); 300 callers send
//! requests back to back for a fixed time, spread 90/5/5 over the replicas.
//! Each scenario gets a fresh simulator (and Redis keys), so no scenario
//! inherits another's counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dataverse_proxy::config::{Config, Sources};
use dataverse_sim::{ServiceLimits, Sim, SimConfig, SimHandle};
use tokio_util::sync::CancellationToken;

mod common;
use common::{OnThrottle, Tally, arg, percentile_ms};

const CALLERS: usize = 300;

/// A name, a number of replicas (0: direct clients), their overrides.
type Scenario = (&'static str, usize, Vec<(&'static str, String)>);
const SERVICE_TIME: Duration = Duration::from_millis(40);

async fn sim() -> Sim {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    // The concurrency limit is what is measured here: the 6,000 requests
    // and 1,200 s per 5 minutes would stop every scenario within seconds.
    sim.handle.set_service_limits(ServiceLimits {
        requests: 100_000_000,
        execution: Duration::from_secs(100_000_000),
        ..ServiceLimits::default()
    });
    sim.handle.set_latency(SERVICE_TIME);
    sim
}

/// A proxy in front of `sim`; its URL and stop switch.
async fn replica(sim: &SimHandle, extra: &[(&'static str, String)]) -> (String, CancellationToken) {
    let mut overrides = sim.proxy_overrides();
    overrides.extend(extra.iter().cloned());
    let config = Config::load(&Sources {
        overrides,
        ..Sources::default()
    })
    .expect("config");
    let replica = common::serve(config).await;
    let (url, stop) = (
        format!("{}/api/data/v9.2/WhoAmI", replica.base),
        replica.stop,
    );
    let client = reqwest::Client::new();
    for _ in 0..500 {
        if client
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (url, stop)
}

/// A Dataverse token for the direct clients.
async fn token(sim: &SimHandle) -> String {
    let cfg = sim.config();
    let body: serde_json::Value = reqwest::Client::new()
        .post(sim.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &cfg.client_id),
            ("client_secret", &cfg.client_secret),
            ("scope", &format!("{}/.default", sim.org_url())),
        ])
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("json");
    body["access_token"].as_str().expect("token").to_owned()
}

/// `CALLERS` callers for `secs`, caller i on `urls[90/5/5 split]`; after a
/// 429 each waits for its Retry-After (a direct client carries `bearer`).
async fn run(urls: &[String], bearer: Option<&str>, secs: u64) -> Tally {
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CALLERS)
        .build()
        .expect("client");
    let tasks: Vec<_> = (0..CALLERS)
        .map(|i| {
            let url = match (i % 20, urls.len()) {
                (_, 1) | (2.., _) => urls[0].clone(),
                (0, _) => urls[1].clone(),
                _ => urls[2].clone(),
            };
            let client = client.clone();
            let bearer = bearer.map(|b| format!("Bearer {b}"));
            let request = move || match &bearer {
                Some(b) => client.get(&url).header("authorization", b),
                None => client.get(&url),
            };
            let wait = OnThrottle::RetryAfter;
            tokio::spawn(common::caller(request, tally.clone(), stop.clone(), wait))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    Arc::try_unwrap(tally).ok().expect("all callers ended")
}

fn report(name: &str, o: &Tally, secs: u64, sim: &SimHandle) {
    let l = o.sorted();
    println!(
        "| {name} | {:.0} | {} | {} | {} | {} | {:.0} ms | {:.0} ms |",
        o.ok() as f64 / secs as f64,
        o.throttled(),
        o.other(),
        sim.throttled(),
        sim.max_concurrency_seen(),
        percentile_ms(&l, 0.5),
        percentile_ms(&l, 0.99),
    );
}

#[tokio::main]
async fn main() {
    dataverse_proxy::install_crypto_provider();
    let secs = arg("--secs", 10);
    let redis = std::env::var("BENCH_REDIS_URL")
        .expect("BENCH_REDIS_URL (bench/governor.sh starts a redis-server)");
    println!(
        "| scenario | goodput (req/s) | 429s seen by callers | other failures | 429s sent by Dataverse | max in flight at Dataverse | p50 | p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut scenarios: Vec<Scenario> = vec![
        ("direct clients, honouring Retry-After", 0, vec![]),
        ("one proxy (cap 50)", 1, vec![]),
        (
            "three proxies, cap 50 each",
            3,
            vec![("governor.expected_replicas", "3".to_owned())],
        ),
        (
            "three proxies, split by hand (17 each)",
            3,
            vec![
                ("governor.max_concurrency", "17".to_owned()),
                ("governor.expected_replicas", "3".to_owned()),
            ],
        ),
        (
            "three proxies sharing Redis (cap 50)",
            3,
            vec![
                ("governor.redis_url", redis.clone()),
                ("governor.expected_replicas", "3".to_owned()),
            ],
        ),
    ];
    // A three-master Redis Cluster, when bench/governor.sh could start one.
    if let Ok(cluster) = std::env::var("BENCH_REDIS_CLUSTER_URL") {
        scenarios.push((
            "three proxies sharing a Redis Cluster of three masters (cap 50)",
            3,
            vec![
                ("governor.redis_url", cluster),
                ("governor.expected_replicas", "3".to_owned()),
            ],
        ));
    }
    for (run_no, (name, replicas, extra)) in scenarios.into_iter().enumerate() {
        let sim = sim().await;
        let mut extra = extra;
        extra.push((
            "governor.redis_prefix",
            format!("bench-{run_no}-{}", std::process::id()),
        ));
        let outcome = if replicas == 0 {
            let url = format!("{}/api/data/v9.2/WhoAmI", sim.handle.org_url());
            let bearer = token(&sim.handle).await;
            run(&[url], Some(&bearer), secs).await
        } else {
            let mut urls = Vec::new();
            let mut stops = Vec::new();
            for _ in 0..replicas {
                let (url, stop) = replica(&sim.handle, &extra).await;
                urls.push(url);
                stops.push(stop);
            }
            // Readiness probes count as requests: start from clean counters.
            let o = run(&urls, None, secs).await;
            for s in stops {
                s.cancel();
            }
            o
        };
        report(name, &outcome, secs, &sim.handle);
        sim.shutdown();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
