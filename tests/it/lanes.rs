//! Lanes end to end: several application users per org, each with its own
//! token and budget, against the simulator's limits per user and web
//! server (52 concurrent each); a window 429 on one lane, a lane whose
//! credential fails, pinned callers, and three replicas sharing the lanes
//! through a real redis-server.

use std::collections::HashMap;
use std::time::Duration;

use dataverse_proxy::callers::hash_key;
use dataverse_sim::{AppUser, ServiceLimits, Sim, SimConfig, SimHandle};

use crate::harness::{Harness, client};
use crate::redis::RedisServer;
use crate::shared::Replica;

/// `lanes = [...]` for `[org]` (the first is `default`, the simulator's own
/// app) and a `[credentials.NAME]` per other lane.
fn lanes_toml(
    sim: &SimHandle,
    others: &[(&str, &AppUser)],
    secret_of: fn(&AppUser) -> String,
) -> String {
    let mut names = vec!["\"default\"".to_owned()];
    names.extend(others.iter().map(|(n, _)| format!("\"{n}\"")));
    let mut toml = format!("lanes = [{}]\n\n", names.join(", "));
    for (name, user) in others {
        toml.push_str(&format!(
            "[credentials.{name}]\ntenant_id = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\ntoken_url = \"{}\"\n\n",
            sim.config().tenant_id,
            user.client_id,
            secret_of(user),
            sim.token_url(),
        ));
    }
    toml
}

fn own_secret(user: &AppUser) -> String {
    user.secret.clone()
}

async fn sim_with_latency(latency: Duration) -> Sim {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    sim.handle.set_latency(latency);
    sim
}

/// The simulator's own app's user (the `default` lane).
fn default_oid(sim: &SimHandle) -> String {
    sim.application_user_oid(&sim.config().client_id)
}

/// `n` concurrent GETs of `path`, each with `headers`; their statuses.
async fn burst(url: &str, n: usize, headers: &[(&str, &str)]) -> Vec<u16> {
    let c = client();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let mut req = c.get(url);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            tokio::spawn(async move { req.send().await.map_or(0, |r| r.status().as_u16()) })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

fn metric(m: &str, name: &str) -> f64 {
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test]
async fn three_lanes_carry_three_times_the_concurrency_of_one() {
    let sim = sim_with_latency(Duration::from_millis(600)).await;
    let (b2, b3) = (
        sim.handle.add_application_user(),
        sim.handle.add_application_user(),
    );
    let lanes = lanes_toml(&sim.handle, &[("bulk-2", &b2), ("bulk-3", &b3)], own_secret);
    let overrides = [("governor.max_concurrency", "52".to_owned())];
    let h = Harness::with_file(sim, "", &lanes, &overrides).await;
    h.wait_ready().await;
    let statuses = burst(&h.url("/WhoAmI"), 156, &[]).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let by_user = h.sim.max_concurrency_by_user();
    for oid in [default_oid(&h.sim), b2.oid.clone(), b3.oid.clone()] {
        let most = by_user.get(&oid).copied().unwrap_or(0);
        assert!(most <= 52, "one user had {most} in flight");
        assert!(most > 26, "each lane carried its share: {by_user:?}");
    }
    let total = h.sim.max_total_concurrency_seen();
    assert!(
        total > 2 * 52,
        "more than two users' worth at once: {total}"
    );
    assert_eq!(h.sim.throttled(), 0, "no lane went over its user's limit");
    h.stop().await;
}

#[tokio::test]
async fn a_window_429_on_one_lane_moves_traffic_without_a_caller_429() {
    let sim = sim_with_latency(Duration::from_millis(20)).await;
    let (b2, b3) = (
        sim.handle.add_application_user(),
        sim.handle.add_application_user(),
    );
    // bulk-2's user may send 3 requests per 5 minutes: then a window 429.
    sim.handle.set_user_limits(
        &b2.oid,
        ServiceLimits {
            requests: 3,
            ..ServiceLimits::default()
        },
    );
    let lanes = lanes_toml(&sim.handle, &[("bulk-2", &b2), ("bulk-3", &b3)], own_secret);
    let h = Harness::with_file(sim, "", &lanes, &[]).await;
    h.wait_ready().await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.extend(burst(&h.url("/WhoAmI"), 10, &[]).await);
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(h.sim.throttled() >= 1, "bulk-2's window was used up");
    let m = h.metrics().await;
    let gate = metric(
        &m,
        "dataverse_proxy_governor_gate_closed_seconds{org=\"default\",lane=\"bulk-2\"}",
    );
    assert!(
        gate > 200.0,
        "bulk-2's gate is closed for its Retry-After: {gate}"
    );
    let open = metric(
        &m,
        "dataverse_proxy_governor_gate_closed_seconds{org=\"default\",lane=\"default\"}",
    );
    assert_eq!(open, 0.0, "the other lanes stay open");
    h.stop().await;
}

#[tokio::test]
async fn a_lane_whose_credential_fails_is_skipped_and_named() {
    let sim = sim_with_latency(Duration::ZERO).await;
    let (b2, b3) = (
        sim.handle.add_application_user(),
        sim.handle.add_application_user(),
    );
    let lanes = lanes_toml(&sim.handle, &[("bulk-2", &b2), ("bulk-3", &b3)], |_| {
        "the-secret-id-not-its-value".to_owned()
    });
    // Both other lanes fail (wrong secret): only `default` serves.
    let h = Harness::with_file(sim, "", &lanes, &[]).await;
    h.wait_ready().await;
    let statuses = burst(&h.url("/WhoAmI"), 30, &[]).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let seen = h.sim.seen();
    assert!(
        seen.iter()
            .filter_map(|s| s.claims.as_ref())
            .all(|c| c.appid == h.sim.config().client_id),
        "only the working lane reached Dataverse"
    );
    // Each lane is named down once its first fetch has failed.
    let mut body = String::new();
    // Each lane's first fetch fails within a backoff or two; a busy machine
    // may take longer, so the wait is generous (it ends as soon as both show).
    for _ in 0..750 {
        let ready = h.admin_get("/readyz").await;
        assert_eq!(ready.status(), 200, "one lane works: ready");
        body = ready.text().await.expect("body");
        if body.matches("lane down").count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(body.contains("lane down: default/bulk-2"), "{body}");
    assert!(body.contains("lane down: default/bulk-3"), "{body}");
    assert!(!body.contains("the-secret-id"), "{body}");
    let m = h.metrics().await;
    let up = |lane: &str| {
        metric(
            &m,
            &format!("dataverse_proxy_lane_in_rotation{{org=\"default\",lane=\"{lane}\"}}"),
        )
    };
    assert_eq!(
        (up("default"), up("bulk-2"), up("bulk-3")),
        (1.0, 0.0, 0.0),
        "{m}"
    );
    let status: serde_json::Value = h.admin_get("/status").await.json().await.expect("json");
    let lanes = status["orgs"][0]["lanes"].as_array().expect("lanes");
    assert_eq!(lanes.len(), 3);
    assert_eq!(lanes[1]["name"], "bulk-2");
    assert_eq!(lanes[1]["in_rotation"], false);
    assert_eq!(lanes[0]["token"]["valid"], true);
    // The status page shows each lane, the failing ones named so.
    let url = format!("{}/", h.admin);
    let dom = tokio::task::spawn_blocking(move || crate::status::rendered_dom(&url))
        .await
        .expect("chromium thread");
    assert!(dom.contains("<h3>Lanes</h3>"), "{dom}");
    assert!(dom.contains("<td>bulk-3</td><td>failing</td>"), "{dom}");
    assert!(dom.contains("<td>default</td><td>valid</td>"), "{dom}");
    h.stop().await;
}

fn hex(bytes: [u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn pinned_callers_stay_on_their_lanes() {
    let sim = sim_with_latency(Duration::from_millis(30)).await;
    let (b2, b3) = (
        sim.handle.add_application_user(),
        sim.handle.add_application_user(),
    );
    let mut toml = lanes_toml(&sim.handle, &[("bulk-2", &b2), ("bulk-3", &b3)], own_secret);
    toml.push_str(&format!(
        "[[callers]]\nname = \"bulk\"\napi_key_sha256 = \"{}\"\nlanes = [\"bulk-2\"]\n\n\
         [[callers]]\nname = \"app\"\napi_key_sha256 = \"{}\"\nlanes = [\"default\", \"bulk-3\"]\n",
        hex(hash_key("bulk-key")),
        hex(hash_key("app-key")),
    ));
    let h = Harness::with_file(sim, "", &toml, &[]).await;
    h.wait_ready().await;
    let (accounts, whoami) = (h.url("/accounts?$top=1"), h.url("/WhoAmI"));
    let (bulk, app) = tokio::join!(
        burst(&accounts, 40, &[("x-api-key", "bulk-key")]),
        burst(&whoami, 40, &[("x-api-key", "app-key")]),
    );
    assert!(
        bulk.iter().chain(&app).all(|s| *s == 200),
        "{bulk:?} {app:?}"
    );
    let mut apps: HashMap<bool, Vec<String>> = HashMap::new();
    for s in h.sim.seen() {
        let Some(c) = s.claims else { continue };
        apps.entry(s.target.contains("accounts"))
            .or_default()
            .push(c.appid);
    }
    assert!(
        apps[&true].iter().all(|a| *a == b2.client_id),
        "bulk only on bulk-2"
    );
    assert!(
        apps[&false].iter().all(|a| *a != b2.client_id),
        "app never on bulk-2"
    );
    assert!(apps[&false].len() >= 40);
    h.stop().await;
}

#[tokio::test]
async fn three_replicas_share_the_lanes() {
    let redis = RedisServer::start().await;
    let sim = sim_with_latency(Duration::from_millis(400)).await;
    let (b2, b3) = (
        sim.handle.add_application_user(),
        sim.handle.add_application_user(),
    );
    let mut toml = String::from("[org]\n");
    toml.push_str(&format!("url = \"{}\"\n", sim.handle.org_url()));
    toml.push_str(&lanes_toml(
        &sim.handle,
        &[("bulk-2", &b2), ("bulk-3", &b3)],
        own_secret,
    ));
    let overrides = vec![
        ("governor.redis_url", redis.url()),
        ("governor.lease_time", "2s".to_owned()),
        ("governor.expected_replicas", "3".to_owned()),
        ("governor.max_concurrency", "52".to_owned()),
    ];
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Replica::start_with(&sim.handle, &overrides, Some(toml.clone())).await);
    }
    let bursts = replicas.iter().map(|r| burst_owned(r.url("/WhoAmI"), 80));
    let statuses: Vec<u16> = futures_util::future::join_all(bursts)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let by_user = sim.handle.max_concurrency_by_user();
    assert_eq!(by_user.len(), 3, "all three users served: {by_user:?}");
    assert!(by_user.values().all(|m| *m <= 52), "{by_user:?}");
    assert_eq!(sim.handle.throttled(), 0, "never over a user's limit");
    let total = sim.handle.max_total_concurrency_seen();
    assert!(
        total > 2 * 52,
        "more than two users' worth at once: {total}"
    );
    for r in replicas {
        r.stop().await;
    }
}

async fn burst_owned(url: String, n: usize) -> Vec<u16> {
    burst(&url, n, &[]).await
}

/// Lanes are built at start. A reload that adds a lane and pins a caller
/// to it is refused (saying a restart is needed), so the caller is never
/// moved onto the org's first application user.
#[tokio::test]
async fn a_reload_cannot_pin_a_caller_to_a_lane_that_is_not_running() {
    let sim = sim_with_latency(Duration::ZERO).await;
    let b2 = sim.handle.add_application_user();
    let caller = |pin: &str| {
        format!(
            "[[callers]]\nname = \"bulk\"\napi_key_sha256 = \"{}\"\n{pin}\n",
            hex(hash_key("bulk-key"))
        )
    };
    let h = Harness::with_file(sim, "admin_reload = true", &caller(""), &[]).await;
    h.wait_ready().await;
    let path = h.config_file.clone().expect("file");
    let text = std::fs::read_to_string(&path).expect("config");
    let lanes = lanes_toml(&h.sim, &[("bulk-2", &b2)], own_secret);
    let (lanes_line, credentials) = lanes.split_once("\n\n").expect("two parts");
    let pinned = text
        .replace("[org]\n", &format!("[org]\n{lanes_line}\n"))
        .replace(&caller(""), &caller("lanes = [\"bulk-2\"]"))
        + "\n"
        + credentials;
    std::fs::write(&path, pinned).expect("write");
    let resp = h
        .client
        .post(format!("{}/reload", h.admin))
        .header("x-dataverse-proxy-reload", "1")
        .send()
        .await
        .expect("reload");
    assert_eq!(resp.status(), 422);
    let body = resp.text().await.expect("body");
    assert!(body.contains("lanes") && body.contains("restart"), "{body}");
    // The running rules stay: the caller unpinned on the one lane.
    let ok = h.get_with("/WhoAmI", &[("x-api-key", "bulk-key")]).await;
    assert_eq!(ok.status(), 200);
    let seen = h.sim.seen().pop().expect("seen");
    assert_eq!(
        seen.claims.expect("claims").appid,
        h.sim.config().client_id,
        "the one lane that runs"
    );
    h.stop().await;
}
