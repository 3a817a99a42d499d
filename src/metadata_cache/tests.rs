use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use http_body_util::BodyExt;

use super::*;
use crate::config::MetadataCacheConfig;

fn config() -> MetadataCacheConfig {
    MetadataCacheConfig {
        enabled: true,
        max_bytes: 64 * 1024,
        max_entry: 16 * 1024,
        fresh_for: Duration::from_secs(60),
    }
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(n, v)| {
            (
                http::HeaderName::from_static(n),
                HeaderValue::from_static(v),
            )
        })
        .collect()
}

fn key(target: &str, h: &HeaderMap) -> Key {
    MetadataCache::key(&Method::GET, "$metadata", target, h).expect("ok")
}

fn answer() -> HeaderMap {
    headers(&[
        ("content-type", "application/xml"),
        ("etag", "\"v1\""),
        ("x-ms-ratelimit-burst-remaining-xrm-requests", "5999"),
        ("x-ms-service-request-id", "abc"),
    ])
}

/// Fills the cache with `body` through a [`Fill`] body read to its end.
async fn fill(cache: &Arc<MetadataCache>, key: &Key, body: &'static [u8]) -> Vec<u8> {
    let filled = cache.fill(
        *key,
        &answer(),
        http_body_util::Full::new(Bytes::from_static(body)),
        None,
    );
    filled.collect().await.expect("ok").to_bytes().to_vec()
}

#[test]
fn only_metadata_gets_are_kept() {
    let h = HeaderMap::new();
    let key = |m: &Method, r: &str| MetadataCache::key(m, r, "/api/data/v9.2/x", &h);
    assert!(key(&Method::GET, "$metadata").is_some());
    assert!(key(&Method::GET, "entitydefinitions").is_some());
    assert!(key(&Method::GET, "globaloptionsetdefinitions").is_some());
    assert!(key(&Method::GET, "accounts").is_none());
    assert!(key(&Method::GET, "relationshipdefinitions").is_none());
    assert!(key(&Method::HEAD, "$metadata").is_none());
    assert!(key(&Method::PUT, "entitydefinitions").is_none());
}

#[test]
fn selecting_headers_make_different_keys() {
    let t = "/api/data/v9.2/EntityDefinitions";
    let base = key(t, &HeaderMap::new());
    assert_eq!(
        base,
        key(
            t,
            &headers(&[("user-agent", "x"), ("accept-encoding", "gzip")])
        )
    );
    for (name, value) in [
        ("accept", "application/json"),
        ("prefer", "odata.include-annotations=\"*\""),
        ("accept-language", "de-DE"),
        ("callerobjectid", "0b1c5f6e-0000-0000-0000-000000000001"),
        ("mscrmcallerid", "0b1c5f6e-0000-0000-0000-000000000002"),
    ] {
        assert_ne!(base, key(t, &headers(&[(name, value)])), "{name}");
    }
    assert_ne!(
        base,
        key(
            "/api/data/v9.2/EntityDefinitions?$select=LogicalName",
            &HeaderMap::new()
        )
    );
}

#[tokio::test(start_paused = true)]
async fn fresh_then_stale_then_fresh_again_after_a_304() {
    let cache = Arc::new(MetadataCache::new(&config()));
    let k = key("/api/data/v9.2/$metadata", &HeaderMap::new());
    assert!(matches!(cache.lookup(&k, false), Lookup::Miss));
    assert_eq!(fill(&cache, &k, b"<edmx/>").await, b"<edmx/>");

    let Lookup::Fresh(entry) = cache.lookup(&k, false) else {
        panic!("fresh")
    };
    assert_eq!(entry.body, "<edmx/>");
    assert_eq!(entry.etag().expect("ok"), "\"v1\"");
    assert!(
        entry.headers.get("x-ms-service-request-id").is_none(),
        "per-request headers are not kept"
    );
    assert!(
        entry
            .headers
            .get("x-ms-ratelimit-burst-remaining-xrm-requests")
            .is_none()
    );
    assert!(
        matches!(cache.lookup(&k, true), Lookup::Stale(_)),
        "a check was asked for"
    );

    tokio::time::advance(Duration::from_secs(61)).await;
    let Lookup::Stale(entry) = cache.lookup(&k, false) else {
        panic!("stale")
    };
    cache.revalidated(&k, &entry);
    assert!(matches!(cache.lookup(&k, false), Lookup::Fresh(_)));
}

#[tokio::test]
async fn only_whole_bodies_within_max_entry_are_kept() {
    let cache = Arc::new(MetadataCache::new(&config()));
    let big = key("/big", &HeaderMap::new());
    static BIG: [u8; 20 * 1024] = [b'x'; 20 * 1024];
    assert_eq!(
        fill(&cache, &big, &BIG).await.len(),
        BIG.len(),
        "passed through"
    );
    assert!(matches!(cache.lookup(&big, false), Lookup::Miss));

    let broken = key("/broken", &HeaderMap::new());
    let frames: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = vec![
        Ok(http_body::Frame::data(Bytes::from_static(b"<edmx"))),
        Err(std::io::Error::other("Dataverse broke off")),
    ];
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    assert!(
        cache
            .fill(broken, &answer(), body, None)
            .collect()
            .await
            .is_err()
    );
    assert!(matches!(cache.lookup(&broken, false), Lookup::Miss));
}

#[tokio::test]
async fn bounded_by_bytes() {
    let cache = Arc::new(MetadataCache::new(&config()));
    static PAGE: [u8; 15 * 1024] = [b'x'; 15 * 1024];
    for i in 0..10 {
        fill(&cache, &key(&format!("/{i}"), &HeaderMap::new()), &PAGE).await;
    }
    let held = cache.weighted_size();
    assert!(held <= 64 * 1024, "{held} bytes held");
    assert!(held >= 15 * 1024, "{held} bytes held");
}

#[test]
fn if_none_match_compares_weakly() {
    let etag = HeaderValue::from_static("\"v1\"");
    let inm = |v: &'static str| headers(&[("if-none-match", v)]);
    assert!(none_match(&inm("\"v1\""), &etag));
    assert!(none_match(&inm("W/\"v1\""), &etag));
    assert!(none_match(&inm("\"v0\", W/\"v1\""), &etag));
    assert!(none_match(&inm("*"), &etag));
    assert!(!none_match(&inm("\"v2\""), &etag));
    assert!(
        !none_match(&inm("null"), &etag),
        "Dataverse's `null` is no tag"
    );
    assert!(!none_match(&HeaderMap::new(), &etag));
    let weak = HeaderValue::from_static("W/\"v1\"");
    assert!(none_match(&inm("\"v1\""), &weak));
}

#[tokio::test(start_paused = true)]
async fn callers_that_miss_together_wait_for_the_first_fetch() {
    let cache = Arc::new(MetadataCache::new(&config()));
    let k = key("/api/data/v9.2/$metadata", &HeaderMap::new());
    let Turn::Lead(lock) = cache.turn(&k).await else {
        panic!("the first caller fetches")
    };
    let waiter = tokio::spawn({
        let (cache, k) = (cache.clone(), k);
        async move { matches!(cache.turn(&k).await, Turn::Ready(e) if e.body == "<edmx/>") }
    });
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished(), "waits for the fetch under way");
    let filled = cache.fill(
        k,
        &answer(),
        http_body_util::Full::new(Bytes::from_static(b"<edmx/>")),
        Some(lock),
    );
    filled.collect().await.expect("body");
    assert!(
        waiter.await.expect("joined"),
        "served from the filled entry"
    );

    // A fetch that gives up (its caller left) lets the next one lead.
    let other = key("/api/data/v9.2/EntityDefinitions", &HeaderMap::new());
    let Turn::Lead(lock) = cache.turn(&other).await else {
        panic!("leads")
    };
    drop(lock);
    assert!(matches!(cache.turn(&other).await, Turn::Lead(_)));

    // A fetch that takes too long: the others go alone after FILL_WAIT.
    let slow = key(
        "/api/data/v9.2/GlobalOptionSetDefinitions",
        &HeaderMap::new(),
    );
    let Turn::Lead(_held) = cache.turn(&slow).await else {
        panic!("leads")
    };
    let started = tokio::time::Instant::now();
    assert!(matches!(cache.turn(&slow).await, Turn::Alone));
    assert_eq!(started.elapsed(), FILL_WAIT);
}

/// A caller's huge selecting header costs the cache its hash, not its
/// bytes; and tiny answers are bounded in number as well as in bytes.
#[tokio::test]
async fn keys_are_hashed_and_entries_bounded_in_number() {
    let config = MetadataCacheConfig {
        max_bytes: MAX_ENTRIES * 1024,
        ..config()
    };
    let floor = (config.max_bytes / MAX_ENTRIES) as u64;
    let cache = Arc::new(MetadataCache::new(&config));
    let huge = HeaderValue::from_str(&"x".repeat(60 * 1024)).expect("value");
    let mut h = HeaderMap::new();
    h.insert("prefer", huge);
    fill(&cache, &key("/api/data/v9.2/$metadata", &h), b"<edmx/>").await;
    let held = cache.weighted_size();
    assert_eq!(held, floor, "one small entry weighs the floor, not 60 KB");
    for i in 0..MAX_ENTRIES + 500 {
        let mut h = HeaderMap::new();
        h.insert("prefer", HeaderValue::from(i));
        fill(&cache, &key("/api/data/v9.2/$metadata", &h), b"<edmx/>").await;
    }
    let held = cache.weighted_size();
    assert!(held <= config.max_bytes as u64, "{held}");
    assert!(
        held / floor <= MAX_ENTRIES as u64,
        "{} entries",
        held / floor
    );
}
