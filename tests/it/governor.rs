//! The service-protection governor against a simulator that enforces
//! Dataverse's limits.

use std::time::{Duration, Instant};

use dataverse_sim::{DataverseFault, ServiceLimits};

use crate::harness::{Harness, Setup};

#[tokio::test]
async fn two_hundred_concurrent_callers_never_see_a_429_and_never_exceed_the_cap() {
    let h = Harness::with(Setup::default().set("governor.max_concurrency", "50")).await;
    h.wait_ready().await;
    h.sim.set_service_limits(ServiceLimits {
        concurrency: 52,
        ..ServiceLimits::default()
    });
    h.sim.set_latency(Duration::from_millis(40));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (client, url) = (
            h.client.clone(),
            h.url(if i % 2 == 0 {
                "/WhoAmI"
            } else {
                "/leads?$top=3"
            }),
        );
        tasks.push(tokio::spawn(async move {
            client
                .get(url)
                .send()
                .await
                .expect("request")
                .status()
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.expect("task"));
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(h.sim.throttled(), 0, "the simulator never had to throttle");
    let max = h.sim.max_concurrency_seen();
    assert!(max <= 50, "Dataverse saw {max} concurrent requests");
    assert!(max >= 10, "requests did run in parallel ({max})");
    h.stop().await;
}

#[tokio::test]
async fn without_the_governor_cap_the_simulator_does_throttle() {
    // The control experiment: same load, the proxy's cap set above the limit
    // the simulator enforces (52 → 20 here), replays off.
    let h = Harness::with(
        Setup::default()
            .set("governor.max_concurrency", "50")
            .set("governor.max_retries", "0"),
    )
    .await;
    h.wait_ready().await;
    h.sim.set_service_limits(ServiceLimits {
        concurrency: 20,
        ..ServiceLimits::default()
    });
    h.sim.set_latency(Duration::from_millis(40));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (client, url) = (h.client.clone(), h.url("/WhoAmI"));
        tasks.push(tokio::spawn(async move {
            client
                .get(url)
                .send()
                .await
                .expect("request")
                .status()
                .as_u16()
        }));
    }
    let mut throttled = 0;
    for t in tasks {
        if t.await.expect("task") == 429 {
            throttled += 1;
        }
    }
    assert!(throttled > 0, "the simulator's concurrency limit works");
    h.stop().await;
}

#[tokio::test]
async fn a_429_with_retry_after_pauses_every_caller_of_the_org() {
    let h = Harness::start().await;
    h.wait_ready().await;
    h.sim.inject_dataverse_fault(DataverseFault {
        status: 429,
        retry_after: Some(2),
        count: 1,
    });
    let started = Instant::now();
    // The first caller gets the 429 (and is replayed after the pause).
    let first = {
        let (c, u) = (h.client.clone(), h.url("/WhoAmI"));
        tokio::spawn(async move { c.get(u).send().await.expect("first").status().as_u16() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Callers arriving during the pause wait for it too.
    let mut others = Vec::new();
    for _ in 0..5 {
        let (c, u) = (h.client.clone(), h.url("/leads?$top=1"));
        others.push(tokio::spawn(async move {
            let status = c.get(u).send().await.expect("other").status().as_u16();
            (status, Instant::now())
        }));
    }
    assert_eq!(first.await.expect("first"), 200, "replayed after the pause");
    for o in others {
        let (status, at) = o.await.expect("other");
        assert_eq!(status, 200);
        let waited = at - started;
        assert!(
            waited >= Duration::from_millis(1900),
            "answered after {waited:?}, inside the pause"
        );
        assert!(waited < Duration::from_secs(6), "answered after {waited:?}");
    }
    h.stop().await;
}

#[tokio::test]
async fn a_non_replayable_request_gets_the_429_and_its_retry_after() {
    let h = Harness::with(Setup::default().set("upstream.replay_buffer", "16")).await;
    h.wait_ready().await;
    h.sim.inject_dataverse_fault(DataverseFault {
        status: 429,
        retry_after: Some(1),
        count: 1,
    });
    // Larger than the replay buffer: streamed, so it cannot be sent again.
    let resp = h
        .send(
            reqwest::Method::POST,
            "/accounts",
            &[],
            Some(&serde_json::json!({"name": "Too big to replay, more than sixteen bytes"})),
        )
        .await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert!(
        resp.headers().get("x-dataverse-proxy-error").is_none(),
        "Dataverse's own 429"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_full_queue_is_a_proxy_429() {
    let h = Harness::with(
        Setup::default()
            .set("governor.max_concurrency", "1")
            .set("governor.max_queue", "1"),
    )
    .await;
    h.wait_ready().await;
    h.sim.set_latency(Duration::from_millis(600));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (c, u) = (h.client.clone(), h.url("/WhoAmI"));
        tasks.push(tokio::spawn(async move {
            let r = c.get(u).send().await.expect("request");
            (
                r.status().as_u16(),
                r.headers()
                    .get("x-dataverse-proxy-error")
                    .map(|v| v.to_str().unwrap_or("").to_owned()),
                r.headers().get("retry-after").is_some(),
            )
        }));
    }
    let mut rejected = 0;
    for t in tasks {
        let (status, code, retry_after) = t.await.expect("task");
        if status == 429 {
            rejected += 1;
            assert_eq!(code.as_deref(), Some("governor_queue_full"));
            assert!(retry_after);
        } else {
            assert_eq!(status, 200);
        }
    }
    assert_eq!(rejected, 2, "one in flight, one queued, two turned away");
    h.stop().await;
}

#[tokio::test]
async fn transient_failures_are_replayed_only_for_idempotent_requests() {
    let h = Harness::start().await;
    h.wait_ready().await;
    let fault = |count| DataverseFault {
        status: 503,
        retry_after: None,
        count,
    };
    h.sim.inject_dataverse_fault(fault(1));
    assert_eq!(h.get("/WhoAmI").await.status(), 200, "a GET is replayed");
    h.sim.inject_dataverse_fault(fault(1));
    let body = serde_json::json!({"name": "once"});
    let resp = h
        .send(reqwest::Method::POST, "/accounts", &[], Some(&body))
        .await;
    assert_eq!(resp.status(), 503, "a POST never is");
    let id = h.sim.ids("accounts")[0].to_string();
    let path = format!("/accounts({id})");
    h.sim.inject_dataverse_fault(fault(1));
    let resp = h
        .send(reqwest::Method::PATCH, &path, &[], Some(&body))
        .await;
    assert_eq!(resp.status(), 503, "a PATCH without If-Match is not");
    // `If-Match: *` holds again after the first attempt updated the row.
    h.sim.inject_dataverse_fault(fault(1));
    let resp = h
        .send(
            reqwest::Method::PATCH,
            &path,
            &[("if-match", "*")],
            Some(&body),
        )
        .await;
    assert_eq!(resp.status(), 503, "If-Match: * is not replayed");
    let row: serde_json::Value = h.get(&path).await.json().await.expect("row");
    let tag = row["@odata.etag"].as_str().expect("etag").to_owned();
    h.sim.inject_dataverse_fault(fault(1));
    let resp = h
        .send(
            reqwest::Method::PATCH,
            &path,
            &[("if-match", &tag)],
            Some(&body),
        )
        .await;
    assert_eq!(
        resp.status(),
        204,
        "a PATCH conditional on the row's tag is"
    );
    let m = h.metrics().await;
    assert!(
        m.contains(
            "dataverse_proxy_governor_transient_retries_total{org=\"default\",lane=\"default\"} 2"
        ),
        "{m}"
    );
    h.stop().await;
}

#[tokio::test]
async fn the_retry_budget_stops_a_retry_storm() {
    let h = Harness::with(
        Setup::default()
            .set("governor.min_retries", "3")
            .set("governor.retry_budget", "0"),
    )
    .await;
    h.wait_ready().await;
    h.sim.inject_dataverse_fault(DataverseFault {
        status: 502,
        retry_after: None,
        count: 1000,
    });
    for _ in 0..10 {
        assert_eq!(h.get("/WhoAmI").await.status(), 502);
    }
    let m = h.metrics().await;
    assert!(
        m.contains(
            "dataverse_proxy_governor_transient_retries_total{org=\"default\",lane=\"default\"} 3"
        ),
        "{m}"
    );
    assert!(
        m.contains("dataverse_proxy_governor_retry_budget_exhausted_total{org=\"default\",lane=\"default\"} 9"),
        "{m}"
    );
    h.stop().await;
}
