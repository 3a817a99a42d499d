//! The governor under tokio's paused clock: the cap and its queue, the
//! queue timeout, the gate, the disconnect grace, the adaptive limit.
use super::*;

fn config(max: usize, queue: usize, timeout_ms: u64) -> GovernorConfig {
    GovernorConfig {
        max_concurrency: max,
        min_concurrency: 1,
        max_queue: queue,
        queue_timeout: Duration::from_millis(timeout_ms),
        ..GovernorConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn the_cap_queues_and_a_full_queue_is_a_429() {
    let g = Governor::new(config(2, 1, 10_000));
    let a = g.acquire().await.expect("a");
    let _b = g.acquire().await.expect("b");
    assert_eq!(g.stats().in_flight.load(Ordering::Relaxed), 2);
    let g2 = g.clone();
    let waiter = tokio::spawn(async move { g2.acquire().await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(g.stats().queued.load(Ordering::Relaxed), 1);
    let full = g.acquire().await.expect_err("queue full");
    assert!(matches!(full, GovernorError::QueueFull { .. }));
    a.finish();
    waiter.await.expect("join").expect("waiter got a slot");
    assert_eq!(g.stats().rejected.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn a_queue_timeout_is_a_429_after_exactly_the_timeout() {
    let g = Governor::new(config(1, 10, 5_000));
    let a = g.acquire().await.expect("a");
    let start = Instant::now();
    let err = g.acquire().await.expect_err("timeout");
    let GovernorError::QueueTimeout { waited, .. } = err else {
        panic!("{err:?}");
    };
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert!(waited >= Duration::from_secs(5));
    // A slot freed before the timeout is taken instead.
    let g2 = g.clone();
    let waiter = tokio::spawn(async move { g2.acquire().await.map(|_| Instant::now()) });
    tokio::time::sleep(Duration::from_secs(4)).await;
    let freed = Instant::now();
    a.finish();
    let got = waiter.await.expect("join").expect("a slot");
    assert_eq!(got, freed, "no wait beyond the release");
}

#[tokio::test(start_paused = true)]
async fn a_429_closes_the_gate_for_everyone() {
    let g = Governor::new(config(10, 10, 60_000));
    g.throttled(Throttle::RequestCount, Duration::from_secs(2));
    let start = Instant::now();
    let (a, b) = tokio::join!(g.acquire(), g.acquire());
    assert!(a.is_ok() && b.is_ok());
    assert!(start.elapsed() >= Duration::from_secs(2));
    assert_eq!(g.stats().waits.load(Ordering::Relaxed), 2);
}

#[tokio::test(start_paused = true)]
async fn a_slot_whose_caller_left_stays_taken_for_the_grace() {
    let g = Governor::new(config(1, 10, 60_000));
    let mut a = g.acquire().await.expect("a");
    a.arm();
    drop(a);
    let start = Instant::now();
    let b = g.acquire().await.expect("b");
    assert_eq!(
        start.elapsed(),
        g.config().disconnect_grace,
        "Dataverse may still be working"
    );
    b.finish();
    let start = Instant::now();
    let c = g.acquire().await.expect("c");
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "a finished request frees its slot at once"
    );
    drop(c);
    let _d = g.acquire().await.expect("d");
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "nothing was sent on c: no grace"
    );
}

#[tokio::test(start_paused = true)]
async fn a_concurrency_429_lowers_the_limit_and_leaves_the_gate_open() {
    let g = Governor::new(config(50, 10, 60_000));
    g.throttled(Throttle::Concurrency, Duration::from_secs(1));
    assert_eq!(g.limit(), 35);
    assert!(g.gate_closed_until().is_none());
    let held: Vec<Permit> = futures_util::future::join_all((0..35).map(|_| g.acquire()))
        .await
        .into_iter()
        .map(|p| p.expect("within the limit"))
        .collect();
    let over = tokio::time::timeout(Duration::from_secs(1), g.acquire()).await;
    assert!(over.is_err(), "the 36th waits");
    for p in held {
        p.finish();
    }
    for _ in 0..35 {
        g.succeeded();
    }
    assert_eq!(g.limit(), 36, "a run of successes raises it");
}

#[test]
fn retry_after_parses_seconds() {
    let mut h = http::HeaderMap::new();
    assert_eq!(retry_after(&h), None);
    h.insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("17"),
    );
    assert_eq!(retry_after(&h), Some(Duration::from_secs(17)));
    h.insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("0.5"),
    );
    assert_eq!(retry_after(&h), Some(Duration::from_millis(500)));
    h.insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
    );
    assert_eq!(retry_after(&h), None);
}
