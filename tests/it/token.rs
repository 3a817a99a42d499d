//! Token lifecycle end to end: single-flight, refresh ahead, fail closed.
//!
//! The timing itself (when a refresh happens, the backoff, serving until
//! expiry) is pinned exactly under tokio's paused clock in
//! `src/token/tests.rs`; the tests here are real-time smoke tests of the
//! whole path.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Harness, Setup};

#[tokio::test]
async fn a_hundred_concurrent_requests_on_a_cold_cache_cost_one_token_request() {
    let h = Harness::start().await;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (client, url) = (h.client.clone(), h.url("/WhoAmI"));
        tasks.push(tokio::spawn(async move {
            client.get(url).send().await.expect("request").status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), 200);
    }
    assert_eq!(h.sim.token_requests(), 1);
    assert_eq!(h.sim.seen().len(), 100);
    assert!(h.sim.seen().iter().all(|r| r.authorized));
    h.stop().await;
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_ahead_and_no_request_fails() {
    // 2 s tokens: refreshed at 1 s, served until 1.8 s.
    let h = Harness::with(Setup::default().lifetime(Duration::from_secs(2))).await;
    h.wait_ready().await;
    let started = Instant::now();
    let mut requests = 0;
    while started.elapsed() < Duration::from_millis(5500) {
        let resp = h.get("/WhoAmI").await;
        assert_eq!(resp.status(), 200, "after {:?}", started.elapsed());
        requests += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(requests > 50);
    // Without refreshing ahead, 2 s tokens would be fetched about every
    // 1.8 s (three times in 5.5 s) and a request would meet an expired one.
    let fetched = h.sim.token_requests();
    assert!(fetched >= 5, "token requests: {fetched}");
    assert!(
        h.sim.seen().iter().all(|r| r.authorized),
        "never an expired token"
    );
    h.stop().await;
}

#[tokio::test]
async fn entra_outage_after_expiry_fails_closed_with_503_then_recovers() {
    let h = Harness::with(Setup::default().lifetime(Duration::from_secs(1))).await;
    h.wait_ready().await;
    h.sim.set_entra_down(true);
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let resp = h.get("/WhoAmI").await;
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.headers()["x-dataverse-proxy-error"],
        "token_unavailable"
    );
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=5).contains(&retry_after), "{retry_after}");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "token_unavailable");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("AADSTS50033"), "{message}");
    assert!(!message.contains(&h.sim.config().client_secret));
    // Many callers during the outage do not each hit Entra ID.
    let before = h.sim.token_requests();
    for _ in 0..50 {
        assert_eq!(h.get("/WhoAmI").await.status(), 503);
    }
    assert!(
        h.sim.token_requests() - before <= 5,
        "backoff gates the fetches"
    );
    assert!(
        h.sim.seen().iter().all(|r| r.authorized),
        "nothing unauthenticated was forwarded"
    );

    h.sim.set_entra_down(false);
    let mut recovered = false;
    for _ in 0..50 {
        if h.get("/WhoAmI").await.status() == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "the proxy recovers once Entra ID is back");
    h.stop().await;
}

#[tokio::test]
async fn readiness_follows_the_token() {
    let h = Harness::with(Setup::default().prepare(|sim| sim.set_entra_down(true))).await;
    // Cold start with Entra down: not ready.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = h.admin_get("/readyz").await;
    assert_eq!(r.status(), 503);
    let r = h.admin_get("/livez").await;
    assert_eq!(r.status(), 200);
    h.sim.set_entra_down(false);
    h.wait_ready().await;
    h.stop().await;
}

#[tokio::test]
async fn the_next_failures_are_retried_until_a_token_arrives() {
    let h = Harness::with(Setup::default().prepare(|sim| sim.fail_next_token_requests(2))).await;
    h.wait_ready().await;
    assert_eq!(h.sim.token_requests(), 3);
    assert_eq!(h.get("/WhoAmI").await.status(), 200);
    h.stop().await;
}
