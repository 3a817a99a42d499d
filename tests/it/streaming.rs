//! Bodies stream both ways, byte for byte, and broken upstreams abort.

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::harness::Harness;

/// Deterministic, incompressible-looking test data.
fn data(len: usize) -> Bytes {
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    Bytes::from(v)
}

const SIZE: usize = 64 * 1024 * 1024;

#[tokio::test]
async fn a_64_mib_download_arrives_byte_identical() {
    let h = Harness::start().await;
    let id = h.sim.ids("accounts")[0];
    let file = data(SIZE);
    assert!(
        h.sim
            .put_file("accounts", id, "dvp_document", "big.bin", file.clone())
    );
    let resp = h.get(&format!("/accounts({id})/dvp_document/$value")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-ms-file-size"], SIZE.to_string().as_str());
    assert_eq!(resp.headers()["content-length"], SIZE.to_string().as_str());
    let mut hasher = Sha256::new();
    let mut received = 0usize;
    let mut resp = resp;
    while let Some(chunk) = resp.chunk().await.expect("chunk") {
        received += chunk.len();
        hasher.update(&chunk);
    }
    assert_eq!(received, SIZE);
    assert_eq!(hasher.finalize()[..], Sha256::digest(&file)[..]);
    h.stop().await;
}

#[tokio::test]
async fn a_64_mib_upload_arrives_byte_identical() {
    let h = Harness::start().await;
    let id = h.sim.ids("leads")[0];
    let file = data(SIZE);
    // Sent as a stream of 1 MiB chunks (chunked transfer encoding).
    let chunks: Vec<Result<Bytes, std::io::Error>> = file
        .chunks(1 << 20)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let resp = h
        .client
        .patch(h.url(&format!("/leads({id})/dvp_document")))
        .header("content-type", "application/octet-stream")
        .header("x-ms-file-name", "upload.bin")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 204);
    let stored = h.sim.file("leads", id, "dvp_document").expect("stored");
    assert_eq!(stored.len(), SIZE);
    assert_eq!(Sha256::digest(&stored)[..], Sha256::digest(&file)[..]);
    h.stop().await;
}

#[tokio::test]
async fn an_upstream_that_dies_mid_body_aborts_the_client_connection() {
    let h = Harness::start().await;
    let id = h.sim.ids("accounts")[1];
    let file = data(4 * 1024 * 1024);
    assert!(
        h.sim
            .put_file("accounts", id, "dvp_document", "x.bin", file)
    );
    h.sim.abort_downloads_after(Some(1024 * 1024 + 17));
    let mut resp = h.get(&format!("/accounts({id})/dvp_document/$value")).await;
    assert_eq!(resp.status(), 200, "headers were already sent");
    let mut received = 0usize;
    let outcome = loop {
        match resp.chunk().await {
            Ok(Some(c)) => received += c.len(),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    assert!(
        outcome.is_err(),
        "a truncated body must not end cleanly (got {received} bytes)"
    );
    assert!(received <= 1024 * 1024 + 17);
    h.stop().await;
}
