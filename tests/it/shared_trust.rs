//! What Redis says is not trusted blindly: a tampered limit or gate is held
//! to the configured bounds; two deployments calling different orgs by the
//! same config name share nothing; `rediss://` works against a TLS-only
//! `redis-server` with a test CA; callers that stop reading release their
//! leases for every replica.

use std::time::Duration;

use dataverse_sim::{ServiceLimits, Sim, SimConfig};

use crate::listener::{Ca, temp_dir, write};
use crate::redis::{RedisServer, Tls};
use crate::shared::Replica;

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// The org key a replica in front of `sim` uses: its host and port.
fn org_key(sim: &Sim) -> String {
    let url = url::Url::parse(sim.handle.org_url()).expect("url");
    format!(
        "dataverse-proxy:{{{}:{}}}",
        url.host_str().expect("host"),
        url.port().expect("port")
    )
}

fn governed(redis: &RedisServer, max: &str) -> Vec<(&'static str, String)> {
    vec![
        ("governor.redis_url", redis.url()),
        ("governor.lease_time", "2s".to_owned()),
        ("governor.max_concurrency", max.to_owned()),
        ("governor.ceiling", max.to_owned()),
        ("governor.min_concurrency", "1".to_owned()),
        ("governor.max_retry_after", "2s".to_owned()),
        ("governor.queue_timeout", "10s".to_owned()),
    ]
}

/// 24 concurrent GETs through `replica`: their statuses.
async fn burst(replica: &Replica) -> Vec<u16> {
    let client = crate::harness::client();
    let url = replica.url("/WhoAmI");
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let (c, u) = (client.clone(), url.clone());
            tokio::spawn(async move { c.get(u).send().await.map_or(0, |r| r.status().as_u16()) })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

#[tokio::test]
async fn a_tampered_limit_or_gate_is_held_to_the_configured_bounds() {
    let redis = RedisServer::start().await;
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    sim.handle.set_service_limits(ServiceLimits::default());
    let replica = Replica::start(&sim.handle, &governed(&redis, "4")).await;
    let key = org_key(&sim);
    let mut conn = redis_conn(&redis.url()).await;
    sim.handle.set_latency(Duration::from_millis(50));

    // A limit far above the ceiling removes no cap.
    let _: () = redis::cmd("SET")
        .arg(format!("{key}:limit"))
        .arg(100_000)
        .query_async(&mut conn)
        .await
        .expect("set");
    assert!(burst(&replica).await.iter().all(|s| *s == 200));
    let seen = sim.handle.max_concurrency_seen();
    assert!(
        seen <= 4,
        "Dataverse saw {seen} at once with a tampered limit"
    );

    // A negative limit blocks nobody forever: the floor holds.
    let _: () = redis::cmd("SET")
        .arg(format!("{key}:limit"))
        .arg(-1)
        .query_async(&mut conn)
        .await
        .expect("set");
    assert!(burst(&replica).await.iter().all(|s| *s == 200));

    // A gate closed for centuries stays closed at most max_retry_after.
    let _: () = redis::cmd("SET")
        .arg(format!("{key}:gate"))
        .arg("1")
        .arg("PX")
        .arg(3_000_000_000_000u64)
        .query_async(&mut conn)
        .await
        .expect("set");
    let _: i64 = redis::cmd("PUBLISH")
        .arg(format!("{key}:events"))
        .arg("gate:99999999999")
        .query_async(&mut conn)
        .await
        .expect("publish");
    let started = std::time::Instant::now();
    let status = crate::harness::client()
        .get(replica.url("/WhoAmI"))
        .send()
        .await
        .expect("request")
        .status();
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the gate was believed"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("{key}:gate"))
        .query_async(&mut conn)
        .await
        .expect("pttl");
    assert!(
        ttl <= 2_000,
        "the gate key was shortened to max_retry_after ({ttl} ms)"
    );

    // The keys that hold state expire.
    for k in ["tags", "vtime"] {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(format!("{key}:{k}"))
            .query_async(&mut conn)
            .await
            .expect("pttl");
        assert!(ttl > 0, "{k} has no expiry ({ttl})");
    }
    replica.stop().await;
}

#[tokio::test]
async fn two_deployments_with_one_config_name_for_different_orgs_share_nothing() {
    let redis = RedisServer::start().await;
    let (a, b) = (
        Sim::start(SimConfig::default()).await.expect("sim a"),
        Sim::start(SimConfig::default()).await.expect("sim b"),
    );
    // Both name their org "default", as every single-org deployment does.
    let ra = Replica::start(&a.handle, &governed(&redis, "4")).await;
    let rb = Replica::start(&b.handle, &governed(&redis, "4")).await;
    let mut conn = redis_conn(&redis.url()).await;
    // A gate closed on a's org…
    let _: () = redis::cmd("SET")
        .arg(format!("{}:gate", org_key(&a)))
        .arg("1")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .expect("set");
    let started = std::time::Instant::now();
    let status = crate::harness::client()
        .get(rb.url("/WhoAmI"))
        .send()
        .await
        .expect("b")
        .status();
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "b waited on a's gate"
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("dataverse-proxy:*")
        .query_async(&mut conn)
        .await
        .expect("keys");
    assert!(
        keys.iter().all(|k| !k.contains(":default:")),
        "keyed by config name: {keys:?}"
    );
    ra.stop().await;
    rb.stop().await;
}

#[tokio::test]
async fn the_shared_governor_works_over_rediss_with_a_private_ca() {
    let ca = Ca::new("redis test CA");
    let (cert, key) = ca.leaf("localhost", &["localhost"], &[]);
    let dir = temp_dir();
    let tls = Tls {
        cert: write(&dir, "redis.crt", &cert).into(),
        key: write(&dir, "redis.key", &key).into(),
    };
    let ca_file = write(&dir, "ca.pem", &ca.pem());
    let redis = RedisServer::start_tls(tls).await;
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let mut overrides = governed(&redis, "4");
    overrides.push(("governor.redis_ca_file", ca_file));
    // Replica::start waits until the governor reports the shared state.
    let replica = Replica::start(&sim.handle, &overrides).await;
    assert!(burst(&replica).await.iter().all(|s| *s == 200));
    let m = replica.metrics().await;
    assert_eq!(
        metric(
            &m,
            "dataverse_proxy_governor_shared_state{org=\"default\",lane=\"default\"}"
        ),
        1.0,
        "{m}"
    );
    replica.stop().await;
}

#[tokio::test]
async fn a_rediss_server_whose_certificate_is_not_trusted_is_never_used() {
    let (ca, other) = (Ca::new("redis test CA"), Ca::new("someone else"));
    let (cert, key) = ca.leaf("localhost", &["localhost"], &[]);
    let dir = temp_dir();
    let tls = Tls {
        cert: write(&dir, "redis.crt", &cert).into(),
        key: write(&dir, "redis.key", &key).into(),
    };
    let redis = RedisServer::start_tls(tls).await;
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let mut overrides = governed(&redis, "4");
    overrides.push((
        "governor.redis_ca_file",
        write(&dir, "other.pem", &other.pem()),
    ));
    let mut all = crate::harness::sim_overrides(&sim.handle);
    all.extend(overrides);
    let config = dataverse_proxy::config::Config::load(&dataverse_proxy::config::Sources {
        overrides: all,
        ..Default::default()
    })
    .expect("config");
    let (_proxy, admin, shutdown, server) = crate::harness::spawn_proxy(config).await;
    crate::harness::wait_ready(&crate::harness::client(), &admin).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = crate::harness::client()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .expect("m")
        .text()
        .await
        .expect("t");
    assert_eq!(
        metric(
            &m,
            "dataverse_proxy_governor_shared_state{org=\"default\",lane=\"default\"}"
        ),
        0.0,
        "{m}"
    );
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
}

#[tokio::test]
async fn callers_that_stop_reading_on_one_replica_do_not_block_another() {
    use tokio::io::AsyncWriteExt;
    let redis = RedisServer::start().await;
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let id = sim.handle.ids("accounts")[0];
    assert!(sim.handle.put_file(
        "accounts",
        id,
        "dvp_document",
        "big.bin",
        bytes::Bytes::from(vec![1u8; 64 << 20])
    ));
    let mut overrides = governed(&redis, "4");
    overrides.push(("limits.body_idle_timeout", "1s".to_owned()));
    let (a, b) = (
        Replica::start(&sim.handle, &overrides).await,
        Replica::start(&sim.handle, &overrides).await,
    );
    // Every shared slot is held by a caller of a that reads nothing.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let addr = a.proxy.trim_start_matches("http://").to_owned();
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "GET /api/data/v9.2/accounts({id})/dvp_document/$value HTTP/1.1\r\nHost: a\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.expect("write");
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A caller of b gets a slot once a has cut them off and released the leases.
    let status = crate::harness::client()
        .get(b.url("/WhoAmI"))
        .send()
        .await
        .expect("b")
        .status();
    assert_eq!(status, 200);
    let m = a.metrics().await;
    assert!(
        metric(
            &m,
            "dataverse_proxy_connections_closed_total{reason=\"stalled_reader\"}"
        ) >= 1.0,
        "{m}"
    );
    drop(stalled);
    a.stop().await;
    b.stop().await;
}

/// The fair-share tags hold only flows used in the last ten minutes: 500
/// flows last seen eleven minutes ago are trimmed as requests come, a few
/// per request, and the live flow keeps its tag.
#[tokio::test]
async fn fair_share_tags_of_flows_unused_for_ten_minutes_are_trimmed() {
    let redis = RedisServer::start().await;
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let key = org_key(&sim);
    let replica = Replica::start(&sim.handle, &governed(&redis, "4")).await;
    let mut conn = redis_conn(&redis.url()).await;
    assert_eq!(
        crate::harness::client()
            .get(replica.url("/WhoAmI"))
            .send()
            .await
            .expect("request")
            .status(),
        200
    );
    let (secs, _): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut conn)
        .await
        .expect("time");
    let long_ago = (secs - 11 * 60) * 1000;
    for i in 0..500 {
        let flow = format!("ip/10.9.{}.{}", i / 250, i % 250);
        let _: () = redis::pipe()
            .cmd("HSET")
            .arg(format!("{key}:tags"))
            .arg(&flow)
            .arg(1)
            .cmd("ZADD")
            .arg(format!("{key}:tags-used"))
            .arg(long_ago)
            .arg(&flow)
            .query_async(&mut conn)
            .await
            .expect("seed");
    }
    let hlen = async |conn: &mut redis::aio::MultiplexedConnection| -> usize {
        redis::cmd("HLEN")
            .arg(format!("{key}:tags"))
            .query_async(conn)
            .await
            .expect("hlen")
    };
    assert!(hlen(&mut conn).await > 500);
    let client = crate::harness::client();
    for _ in 0..40 {
        let status = client
            .get(replica.url("/WhoAmI"))
            .send()
            .await
            .expect("request")
            .status();
        assert_eq!(status, 200);
    }
    assert_eq!(hlen(&mut conn).await, 1, "only the live flow's tag is left");
    let live: Option<String> = redis::cmd("HGET")
        .arg(format!("{key}:tags"))
        .arg("ip/127.0.0.1")
        .query_async(&mut conn)
        .await
        .expect("hget");
    assert!(live.is_some(), "the live flow keeps its tag");
    replica.stop().await;
}
