//! Configuration reload without a restart: `POST /reload` (as SIGHUP does)
//! swaps callers, policies, limits and governor settings for new requests;
//! an invalid file keeps the running rules.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::harness::Harness;
use dataverse_sim::{Sim, SimConfig};

/// A proxy whose config file holds `policy` (TOML lines of `[org.policy]`)
/// and `extra`, with `admin_reload = true`.
async fn proxy(policy: &str, extra: &str) -> Harness {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let h = Harness::with_file(
        sim,
        "admin_reload = true",
        &format!("[org.policy]\n{policy}\n{extra}"),
        &[],
    )
    .await;
    h.wait_ready().await;
    h
}

/// Rewrites the config file with another policy and extra tables, keeping
/// the first lines (top-level keys and `[org]`).
fn rewrite(h: &Harness, policy: &str, extra: &str) {
    let path = h.config_file.as_ref().expect("a config file");
    let text = std::fs::read_to_string(path).expect("config");
    let head = text.split("[org.policy]").next().expect("head");
    std::fs::write(path, format!("{head}[org.policy]\n{policy}\n{extra}")).expect("write");
}

/// `POST /reload`: its status and JSON answer.
pub async fn reload(h: &Harness) -> (u16, serde_json::Value) {
    let resp = h
        .client
        .post(format!("{}/reload", h.admin))
        .header("x-dataverse-proxy-reload", "1")
        .send()
        .await
        .expect("reload");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json"))
}

#[tokio::test]
async fn an_invalid_file_keeps_the_running_rules() {
    let h = proxy("deny = [\"leads\"]", "").await;
    assert_eq!(h.get("/leads").await.status(), 403);

    // Allows leads, but with a governor setting out of range.
    rewrite(&h, "deny = []", "[governor]\nmax_concurrency = 99\n");
    let (status, body) = reload(&h).await;
    assert_eq!(status, 422);
    assert_eq!(body["reloaded"], false);
    let problems = body["problems"].to_string();
    assert!(problems.contains("governor.max_concurrency"), "{problems}");
    assert_eq!(
        h.get("/leads").await.status(),
        403,
        "a denied table stays denied"
    );
    let status: serde_json::Value = h.admin_get("/status").await.json().await.expect("json");
    let shown = status["config"]["last_error"]["problems"].to_string();
    assert!(shown.contains("governor.max_concurrency"), "{shown}");
    assert_eq!(status["config"]["reloads"], 0);

    // Fixed: the new policy applies, the refusal is history.
    rewrite(&h, "deny = []", "[governor]\nmax_concurrency = 20\n");
    let (status, body) = reload(&h).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["restart_needed"], serde_json::json!([]));
    assert_eq!(h.get("/leads").await.status(), 200);
    let status: serde_json::Value = h.admin_get("/status").await.json().await.expect("json");
    assert_eq!(status["config"]["reloads"], 1);
    assert!(status["config"]["last_error"].is_null());
    assert_eq!(
        status["orgs"][0]["governor"]["limit"], 20,
        "the governor took its new bound"
    );
    h.stop().await;
}

async fn with_key(h: &Harness, key: &str) -> reqwest::StatusCode {
    h.get_with("/WhoAmI", &[("x-api-key", key)]).await.status()
}

#[tokio::test]
async fn callers_change_and_restart_only_settings_are_named() {
    let hash = |key: &str| -> String {
        use sha2::Digest;
        sha2::Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let caller = |name: &str, key: &str| {
        format!(
            "[[callers]]\nname = \"{name}\"\napi_key_sha256 = \"{}\"\n",
            hash(key)
        )
    };
    let h = proxy("", &caller("first", "first-key")).await;
    assert_eq!(with_key(&h, "first-key").await, 200);
    assert_eq!(with_key(&h, "second-key").await, 401);

    rewrite(
        &h,
        "",
        &format!(
            "{}[upstream]\nconnect_timeout = \"3s\"\n",
            caller("second", "second-key")
        ),
    );
    let (status, body) = reload(&h).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["restart_needed"], serde_json::json!(["upstream"]));
    assert_eq!(
        with_key(&h, "second-key").await,
        200,
        "the new caller is in"
    );
    assert_eq!(with_key(&h, "first-key").await, 401, "the old one is out");
    let m = h.metrics().await;
    assert!(m.contains("caller=\"second\""), "its metrics follow: {m}");
    h.stop().await;
}

#[tokio::test]
async fn a_reload_under_load_fails_no_request() {
    let h = Arc::new(proxy("deny = [\"leads\"]", "").await);
    h.sim.set_latency(std::time::Duration::from_millis(5));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (h, stop, ok, failed) = (h.clone(), stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let good = match h.get("/accounts?$top=2").await {
                        r if r.status() == 200 => r.bytes().await.is_ok(),
                        _ => false,
                    };
                    let counter = if good { &ok } else { &failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for round in 0..10 {
        let (policy, max) = if round % 2 == 0 {
            ("deny = []", 30)
        } else {
            ("deny = [\"leads\"]", 50)
        };
        rewrite(
            &h,
            policy,
            &format!("[governor]\nmax_concurrency = {max}\n"),
        );
        let (status, body) = reload(&h).await;
        assert_eq!(status, 200, "{body}");
        // Let the load run on under these rules before the next reload.
        let before = ok.load(Ordering::Relaxed);
        for _ in 0..2000 {
            if ok.load(Ordering::Relaxed) >= before + 20 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let leads = h.get("/leads").await.status();
        assert_eq!(
            leads,
            if round % 2 == 0 { 200 } else { 403 },
            "round {round}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok >= 200, "load ran: {ok} requests");
    assert_eq!(
        failed, 0,
        "no request failed across 10 reloads ({ok} succeeded)"
    );
    let h = Arc::try_unwrap(h).ok().expect("the only handle");
    h.stop().await;
}

fn hash(key: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn a_browser_page_cannot_trigger_a_reload() {
    let h = proxy("", "").await;
    let url = format!("{}/reload", h.admin);
    // A form post or fetch without the custom header.
    let plain = h.client.post(&url).send().await.expect("post");
    assert_eq!(plain.status(), 403);
    // A DNS-rebound name in Host, even with the header.
    let rebound = h
        .client
        .post(&url)
        .header("x-dataverse-proxy-reload", "1")
        .header("host", "attacker.example.com")
        .send()
        .await
        .expect("post");
    assert_eq!(rebound.status(), 403);
    let status: serde_json::Value = h.admin_get("/status").await.json().await.expect("json");
    assert_eq!(status["config"]["reloads"], 0, "nothing was reloaded");
    assert_eq!(
        reload(&h).await.0,
        200,
        "with the header and a local Host it works"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_reload_that_would_open_a_closed_proxy_is_refused() {
    let callers = format!(
        "[[callers]]\nname = \"app\"\napi_key_sha256 = \"{}\"\n",
        hash("app-key")
    );
    let h = proxy("", &callers).await;
    assert_eq!(with_key(&h, "app-key").await, 200);
    assert_eq!(h.get("/WhoAmI").await.status(), 401);
    // Every caller removed: the proxy would act as the application user for anyone.
    rewrite(&h, "", "");
    let (status, body) = reload(&h).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["problems"].to_string().contains("access"), "{body}");
    assert_eq!(h.get("/WhoAmI").await.status(), 401, "still closed");
    h.stop().await;
}

#[tokio::test]
async fn a_reload_whose_file_is_gone_is_refused() {
    let callers = format!(
        "[[callers]]\nname = \"app\"\napi_key_sha256 = \"{}\"\n",
        hash("app-key")
    );
    let h = proxy("", &callers).await;
    let path = h.config_file.clone().expect("file");
    std::fs::remove_file(&path).expect("rm");
    let (status, body) = reload(&h).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["problems"].to_string().contains("gone"), "{body}");
    assert_eq!(with_key(&h, "app-key").await, 200, "the running rules stay");
    h.stop().await;
}

#[tokio::test]
async fn a_reload_that_changes_the_trusted_token_issuers_is_refused() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let tenant = sim.handle.tenant_id().to_owned();
    let entra = sim.handle.entra_url().to_owned();
    let audience = sim.handle.config().api_client_id.clone();
    let tokens = |tenants: &str| {
        format!(
            "[caller_tokens]\naudiences = [\"{audience}\"]\ntenants = [{tenants}]\nauthority_host = \"{entra}\"\n\n[[callers]]\nname = \"users\"\ntoken = {{ tenants = [\"{tenant}\"], roles = [\"Reader\"] }}\n"
        )
    };
    let h = Harness::with_file(
        sim,
        "admin_reload = true",
        &format!(
            "[org.policy]\n\n{}",
            tokens(&format!(
                "\"{tenant}\", \"00000000-0000-0000-0000-000000000001\""
            ))
        ),
        &[],
    )
    .await;
    h.wait_ready().await;
    rewrite(&h, "", &tokens(&format!("\"{tenant}\"")));
    let (status, body) = reload(&h).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["problems"].to_string().contains("caller_tokens"),
        "{body}"
    );
    h.stop().await;
}
