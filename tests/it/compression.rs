//! Compression on the Dataverse hop: the proxy asks for gzip, rewrites
//! links inside compressed answers, fits the coding to each caller, and
//! never hides a broken stream.

use std::io::Read;

use crate::harness::{Harness, Setup};

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

fn inflate(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("valid zlib");
    out
}

/// A page of 1,000 accounts as a caller sending `accept_encoding` gets it:
/// headers and raw bytes.
async fn page(h: &Harness, accept_encoding: Option<&str>) -> (reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = h
        .client
        .get(h.url("/accounts?$select=name,accountnumber"))
        .header("Prefer", "odata.maxpagesize=1000");
    if let Some(ae) = accept_encoding {
        req = req.header("accept-encoding", ae);
    }
    let resp = req.send().await.expect("page");
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    (headers, resp.bytes().await.expect("body").to_vec())
}

#[tokio::test]
async fn gzip_deflate_and_identity_callers_get_the_same_rewritten_page() {
    let h = Harness::start().await;
    h.sim.seed_rows("accounts", 2_500);
    let (plain_headers, plain) = page(&h, None).await;
    let (gzip_headers, gzip) = page(&h, Some("gzip")).await;
    let (deflate_headers, deflate) = page(&h, Some("gzip;q=0, deflate")).await;

    let seen = h.sim.seen();
    let asked = &seen.last().expect("seen").headers["accept-encoding"];
    assert_eq!(
        asked, "gzip, br, deflate",
        "the proxy always asks for compression"
    );

    assert!(
        plain_headers.get("content-encoding").is_none(),
        "no Accept-Encoding: identity"
    );
    assert_eq!(gzip_headers["content-encoding"], "gzip");
    assert_eq!(
        deflate_headers["content-encoding"], "deflate",
        "q=0 refuses gzip"
    );
    for headers in [&gzip_headers, &deflate_headers, &plain_headers] {
        let vary = headers["vary"]
            .to_str()
            .expect("ascii")
            .to_ascii_lowercase();
        assert!(vary.contains("accept-encoding"), "{vary}");
    }
    assert!(
        gzip.len() * 4 < plain.len(),
        "{} vs {} bytes",
        gzip.len(),
        plain.len()
    );
    assert_eq!(gunzip(&gzip), plain);
    assert_eq!(inflate(&deflate), plain);

    let text = String::from_utf8(plain).expect("utf-8");
    assert!(!text.contains(h.sim.org_url()), "every org link rewritten");
    let next = format!("\"@odata.nextLink\":\"{}/api/data/v9.2/accounts?", h.proxy);
    assert!(text.contains(&next), "the next link names the proxy");
    let rows = serde_json::from_str::<serde_json::Value>(&text).expect("json")["value"]
        .as_array()
        .expect("rows")
        .len();
    assert_eq!(rows, 1000);
    h.stop().await;
}

#[tokio::test]
async fn compressed_bytes_pass_through_untouched_when_nothing_is_rewritten() {
    // The cache off: $metadata straight from Dataverse, XML without links.
    let h = Harness::with(Setup::default().set("metadata_cache.enabled", "false")).await;
    let direct = h
        .client
        .get(format!("{}/api/data/v9.2/$metadata", h.sim.org_url()))
        .bearer_auth(h.sim_token().await)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("direct");
    let direct_etag = direct.headers()["etag"].clone();
    let direct = direct.bytes().await.expect("body");
    let resp = h
        .get_with("/$metadata", &[("accept-encoding", "gzip")])
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    assert_eq!(
        resp.headers()["etag"],
        direct_etag,
        "bytes unchanged: the tag stays strong"
    );
    let through = resp.bytes().await.expect("body");
    assert_eq!(
        through, direct,
        "Dataverse's compressed bytes, as they came"
    );
    let csdl = gunzip(&through).len();
    assert!(csdl > 4 << 20, "several MB of CSDL: {csdl}");
    h.stop().await;
}

#[tokio::test]
async fn a_broken_compressed_stream_aborts_the_caller() {
    let h = Harness::start().await;
    h.sim.seed_rows("accounts", 2_500);
    h.sim.break_compressed_answers(true);
    for accept in [None, Some("gzip")] {
        let mut req = h
            .client
            .get(h.url("/accounts"))
            .header("Prefer", "odata.maxpagesize=2000");
        if let Some(ae) = accept {
            req = req.header("accept-encoding", ae);
        }
        let resp = req.send().await.expect("headers arrive");
        assert_eq!(resp.status(), 200);
        assert!(
            resp.bytes().await.is_err(),
            "{accept:?}: the caller's connection is aborted, not ended as if complete"
        );
    }
    h.sim.break_compressed_answers(false);
    let (_, whole) = page(&h, None).await;
    assert!(serde_json::from_slice::<serde_json::Value>(&whole).is_ok());
    h.stop().await;
}

#[tokio::test]
async fn switched_off_the_proxy_asks_for_identity() {
    let h = Harness::with(Setup::default().set("upstream.compression", "false")).await;
    let (headers, body) = page(&h, Some("gzip")).await;
    assert!(headers.get("content-encoding").is_none());
    assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok());
    let seen = h.sim.seen();
    assert!(
        seen.last()
            .expect("seen")
            .headers
            .get("accept-encoding")
            .is_none()
    );
    h.stop().await;
}
