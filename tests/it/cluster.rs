//! The shared governor on a clustered Redis (three masters, as Azure
//! Managed Redis's OSS cluster policy presents itself): detected from one
//! node's URL, every script's keys in one hash slot, no CROSSSLOT, the state
//! stays shared under load and the cap holds across three replicas.

use std::time::Duration;

use dataverse_sim::{ServiceLimits, Sim, SimConfig};

use crate::listener::{Ca, temp_dir, write};
use crate::redis::{ClusterSecurity, RedisCluster, Tls};
use crate::shared::Replica;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_cap_through_a_redis_cluster() {
    let cluster = RedisCluster::start().await;
    shares_one_cap(&cluster, &[]).await;
}

/// The same over TLS (the cluster bus too) with an ACL user in the URL,
/// as Azure Managed Redis's access keys are used; the password appears
/// nowhere the proxy shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_tls_with_a_user_and_password() {
    let ca = Ca::new("redis cluster CA");
    let (cert, key) = ca.leaf("redis-node", &["localhost", "127.0.0.1"], &[]);
    let dir = temp_dir();
    let ca_file = write(&dir, "ca.pem", &ca.pem());
    let security = ClusterSecurity {
        tls: Tls {
            cert: write(&dir, "node.crt", &cert).into(),
            key: write(&dir, "node.key", &key).into(),
        },
        ca_file: ca_file.clone().into(),
        user: ("proxy".to_owned(), "s3cret-cluster-pass".to_owned()),
    };
    let cluster = RedisCluster::start_secure(security).await;
    shares_one_cap(&cluster, &[("governor.redis_ca_file", ca_file)]).await;
}

/// Three replicas on `cluster`, most callers on one: the shared cap of 12
/// holds and is used whole (each replica's fallback share is 4).
async fn shares_one_cap(cluster: &RedisCluster, extra: &[(&'static str, String)]) {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    sim.handle.set_service_limits(ServiceLimits::default());
    sim.handle.set_latency(Duration::from_millis(50));
    let mut overrides = vec![
        ("governor.redis_url", cluster.url()),
        ("governor.lease_time", "2s".to_owned()),
        ("governor.expected_replicas", "3".to_owned()),
        ("governor.max_concurrency", "12".to_owned()),
        ("governor.ceiling", "12".to_owned()),
    ];
    overrides.extend(extra.iter().cloned());
    let replicas = [
        Replica::start(&sim.handle, &overrides).await,
        Replica::start(&sim.handle, &overrides).await,
        Replica::start(&sim.handle, &overrides).await,
    ];
    let urls: Vec<String> = replicas.iter().map(|r| r.url("/WhoAmI")).collect();
    // Most callers on one replica: its fallback share alone (4) could not
    // take what the shared cap (12) gives it.
    let (statuses, _) =
        crate::shared::load(&urls, 36, 15, |i| usize::from(i % 6 == 5) * (i % 3)).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let max = sim.handle.max_concurrency_seen();
    assert!(max <= 12, "Dataverse saw {max} in flight (cap 12)");
    assert!(
        max >= 9,
        "the shared cap was in use, not the fallback 4 per replica: {max}"
    );
    // The usage ledger's keys share a slot too: every replica sees the
    // 540 requests of all three.
    let executed = async |r: &Replica| -> u64 {
        r.status().await["orgs"][0]["usage"]["executed"]
            .as_u64()
            .unwrap_or(0)
    };
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen.clear();
        for r in &replicas {
            seen.push(executed(r).await);
        }
        if seen.iter().all(|n| *n == 540) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, [540, 540, 540], "each replica counts all three's");
    for r in &replicas {
        let m = r.metrics().await;
        assert!(
            m.contains("governor_state{org=\"default\",lane=\"default\",state=\"shared\"} 1"),
            "{m}"
        );
        let status = r.status().await.to_string();
        assert!(
            !status.contains("s3cret") && !m.contains("s3cret"),
            "the password is never shown"
        );
    }
    for r in replicas {
        r.stop().await;
    }
    sim.shutdown();
}
