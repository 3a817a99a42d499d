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

fn flow(key: &str) -> Flow {
    Flow {
        key: std::sync::Arc::from(key),
        ..Flow::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_small_caller_is_served_ahead_of_a_greedy_callers_queue() {
    let g = Governor::new(config(2, 100, 60_000));
    let held = [g.acquire().await.expect("a"), g.acquire().await.expect("b")];
    // The greedy caller queues 20 requests, then the small caller one.
    let greedy = flow("greedy");
    let mut waiting = Vec::new();
    for _ in 0..20 {
        let (g, f) = (g.clone(), greedy.clone());
        waiting.push(tokio::spawn(async move {
            g.acquire_for(&f).await.map(|p| ("greedy", p))
        }));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (g2, small) = (g.clone(), flow("small"));
    let small = tokio::spawn(async move { g2.acquire_for(&small).await.map(|p| ("small", p)) });
    tokio::time::sleep(Duration::from_millis(1)).await;
    // Slots free one at a time: the small caller gets the second at the latest.
    let [a, b] = held;
    a.finish();
    tokio::time::sleep(Duration::from_millis(1)).await;
    b.finish();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(
        small.is_finished(),
        "the small caller still waits behind the greedy one"
    );
    let (who, _) = small.await.expect("join").expect("slot");
    assert_eq!(who, "small");
    for w in waiting {
        w.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn a_callers_own_cap_holds_back_only_that_caller() {
    let g = Governor::new(config(10, 100, 5_000));
    let capped = Flow {
        max_concurrency: Some(2),
        ..flow("capped")
    };
    let _a = g.acquire_for(&capped).await.expect("a");
    let _b = g.acquire_for(&capped).await.expect("b");
    let start = Instant::now();
    let third = g.acquire_for(&capped).await.expect_err("over its cap");
    assert!(matches!(third, GovernorError::QueueTimeout { .. }));
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    let other = g.acquire_for(&flow("other")).await;
    assert!(other.is_ok(), "others still get slots");
}

#[tokio::test(start_paused = true)]
async fn no_slot_is_held_past_max_hold() {
    let g = Governor::new(GovernorConfig {
        max_hold: Duration::from_secs(130),
        ..config(1, 10, 600_000)
    });
    let mut stuck = g.acquire().await.expect("a");
    stuck.arm();
    let start = Instant::now();
    let next = g.acquire().await.expect("b");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(130) && waited <= Duration::from_secs(131),
        "{waited:?}"
    );
    assert_eq!(g.stats().held_too_long.load(Ordering::Relaxed), 1);
    // The old permit's drop gives nothing back twice.
    drop(stuck);
    drop(next);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(g.stats().in_flight.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn an_answered_request_frees_its_slot_at_once_when_dropped() {
    let g = Governor::new(config(1, 10, 60_000));
    let mut a = g.acquire().await.expect("a");
    a.arm();
    a.answered();
    drop(a);
    let start = Instant::now();
    let _b = g.acquire().await.expect("b");
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "no grace once Dataverse answered"
    );
}

#[tokio::test(start_paused = true)]
async fn slots_given_back_while_the_gate_is_closed_wait_for_it_to_reopen() {
    let g = Governor::new(config(2, 10, 60_000));
    let (a, b) = (g.acquire().await.expect("a"), g.acquire().await.expect("b"));
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let g = g.clone();
            tokio::spawn(async move { g.acquire().await.map(|p| (Instant::now(), p)) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let closed = Instant::now();
    g.throttled(Throttle::RequestCount, Duration::from_secs(3));
    a.finish();
    b.finish();
    assert_eq!(g.stats().in_flight.load(Ordering::Relaxed), 0, "given back");
    for w in waiters {
        let (at, _permit) = w.await.expect("join").expect("a slot");
        assert_eq!(at.duration_since(closed), Duration::from_secs(3));
    }
}

#[tokio::test(start_paused = true)]
async fn a_raised_limit_lets_waiters_in_at_once() {
    let g = Governor::new(GovernorConfig {
        max_concurrency: 1,
        ceiling: 4,
        ..config(1, 10, 60_000)
    });
    let a = g.acquire().await.expect("a");
    let g2 = g.clone();
    let waiter = tokio::spawn(async move { g2.acquire().await.map(|_| Instant::now()) });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let raised = Instant::now();
    g.dop_hint(4);
    g.succeeded(); // one success at limit 1 raises it to 2
    assert_eq!(g.limit(), 2);
    assert_eq!(waiter.await.expect("join").expect("a slot"), raised);
    drop(a);
}
