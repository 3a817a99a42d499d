//! No caller holds a governor slot it does not use: callers that stop
//! reading (HTTP/1.1 and HTTP/2), callers that leave before or after
//! Dataverse answered, and slots held past `governor.max_hold`. Each test
//! shows what the other callers get meanwhile.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::harness::{Harness, Setup};

const BIG: usize = 64 * 1024 * 1024;

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A proxy with `max` slots and the overrides, and a file of `size` bytes:
/// its Web API path.
async fn proxy_with_file(
    max: &str,
    size: usize,
    extra: &[(&'static str, &str)],
) -> (Harness, String) {
    let mut setup = Setup::default()
        .set("governor.max_concurrency", max)
        .set("governor.ceiling", max)
        .set("governor.queue_timeout", "10s")
        .set("governor.disconnect_grace", "30s");
    for (k, v) in extra {
        setup = setup.set(k, v);
    }
    let h = Harness::with(setup).await;
    h.wait_ready().await;
    let id = h.sim.ids("accounts")[0];
    assert!(h.sim.put_file(
        "accounts",
        id,
        "dvp_document",
        "big.bin",
        Bytes::from(vec![7u8; size])
    ));
    (
        h,
        format!("/api/data/v9.2/accounts({id})/dvp_document/$value"),
    )
}

fn addr(h: &Harness) -> String {
    h.proxy.trim_start_matches("http://").to_owned()
}

#[tokio::test]
async fn callers_that_stop_reading_lose_their_slots_and_others_get_through() {
    let (h, path) = proxy_with_file("8", BIG, &[("limits.body_idle_timeout", "1s")]).await;
    // Four HTTP/1.1 callers that never read (their TCP window closes)…
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr(&h)).await.expect("connect");
        let head = format!("GET {path} HTTP/1.1\r\nHost: proxy.test\r\n\r\n");
        s.write_all(head.as_bytes()).await.expect("write");
        held.push(s);
    }
    // …and four HTTP/2 callers that never send WINDOW_UPDATE.
    let mut streams = Vec::new();
    for _ in 0..4 {
        let tcp = TcpStream::connect(addr(&h)).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
            TokioExecutor::new(),
            TokioIo::new(tcp),
        )
        .await
        .expect("h2");
        tokio::spawn(conn);
        let req = http::Request::get(format!("http://proxy.test{path}"))
            .body(Empty::new())
            .expect("request");
        // The answer's head arrives; its body is never read.
        streams.push(sender.send_request(req).await.expect("answer head"));
    }
    // Every slot is held by a caller that reads nothing; another caller
    // waits for one and gets it when the stalled ones are cut off.
    let resp = h.get("/WhoAmI").await;
    assert_eq!(
        resp.status(),
        200,
        "{:?}",
        resp.headers().get("x-dataverse-proxy-error")
    );
    // All eight are cut off and their slots freed.
    let mut m = String::new();
    for _ in 0..100 {
        m = h.metrics().await;
        let in_flight = metric(
            &m,
            "dataverse_proxy_governor_in_flight{org=\"default\",lane=\"default\"}",
        );
        if in_flight == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(
            &m,
            "dataverse_proxy_connections_closed_total{reason=\"stalled_reader\"}"
        ),
        8.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "dataverse_proxy_governor_in_flight{org=\"default\",lane=\"default\"}"
        ),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "dataverse_proxy_governor_rejected_total{org=\"default\",lane=\"default\"}"
        ),
        0.0
    );
    drop((held, streams));
    h.stop().await;
}

#[tokio::test]
async fn a_caller_that_leaves_after_dataverse_answered_frees_its_slot_at_once() {
    let (h, path) = proxy_with_file("1", 4 << 20, &[("governor.queue_timeout", "3s")]).await;
    let url = format!("{}{path}", h.proxy);
    for _ in 0..3 {
        // The answer's head arrives, then the caller goes away.
        let resp = h.client.get(&url).send().await.expect("answer");
        assert_eq!(resp.status(), 200);
        drop(resp);
        // With the 30 s grace still applied, this would be a 429 after 3 s.
        let next = h.get("/WhoAmI").await;
        assert_eq!(
            next.status(),
            200,
            "the slot was not freed when Dataverse had answered"
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn a_caller_that_leaves_before_dataverse_answered_holds_the_slot_until_it_answers() {
    let (h, _) = proxy_with_file("1", 16, &[("governor.queue_timeout", "5s")]).await;
    h.sim.set_latency(Duration::from_millis(800));
    let url = h.url("/WhoAmI");
    let leaving = h
        .client
        .get(&url)
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(leaving.is_err(), "the first caller gave up");
    h.sim.set_latency(Duration::ZERO);
    // The next caller waits for Dataverse's answer to the first request
    // (its slot is still counted while Dataverse works), not for the grace.
    let next = h.get("/WhoAmI").await;
    assert_eq!(next.status(), 200);
    assert_eq!(h.sim.max_concurrency_seen(), 1, "never two at Dataverse");
    h.stop().await;
}

#[tokio::test]
async fn no_slot_is_held_past_max_hold() {
    let (h, _) = proxy_with_file(
        "1",
        16,
        &[
            ("governor.max_hold", "1s"),
            ("governor.queue_timeout", "10s"),
        ],
    )
    .await;
    h.sim.set_latency(Duration::from_secs(4));
    let slow = {
        let (client, url) = (h.client.clone(), h.url("/WhoAmI"));
        tokio::spawn(async move { client.get(url).send().await.map(|r| r.status()) })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.sim.set_latency(Duration::ZERO);
    // Released after max_hold, so this one does not wait the 4 s.
    let next = h.get("/WhoAmI").await;
    assert_eq!(next.status(), 200);
    assert!(!slow.is_finished(), "the slow request is still running");
    let m = h.metrics().await;
    assert_eq!(
        metric(
            &m,
            "dataverse_proxy_governor_held_too_long_total{org=\"default\",lane=\"default\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(slow.await.expect("task").expect("slow answer"), 200);
    h.stop().await;
}
