use std::io::Write;

use axum::http::{HeaderMap, HeaderValue, header};
use bytes::Bytes;
use http_body_util::BodyExt;

use super::stream::{decode, encode};
use super::*;
use crate::rewrite::{RewriteBody, Rewriter};

fn accept(value: &str) -> AcceptEncoding {
    let mut h = HeaderMap::new();
    h.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_str(value).expect("ok"),
    );
    AcceptEncoding::from_headers(&h)
}

#[test]
fn q_values_decide_what_a_caller_takes() {
    let none = AcceptEncoding::from_headers(&HeaderMap::new());
    assert!(!none.accepts(Coding::Gzip), "no header: identity only");
    assert_eq!(none.choose(Coding::Gzip), None);

    let a = accept("gzip, deflate;q=0.5");
    assert!(a.accepts(Coding::Gzip) && a.accepts(Coding::Deflate));
    assert!(!a.accepts(Coding::Brotli));

    assert!(!accept("gzip;q=0").accepts(Coding::Gzip));
    assert!(!accept("gzip; q=0.000").accepts(Coding::Gzip));
    assert!(
        !accept("gzip;q=banana").accepts(Coding::Gzip),
        "malformed q"
    );
    assert!(accept("x-gzip").accepts(Coding::Gzip));
    assert!(accept("GZIP;Q=0.1").accepts(Coding::Gzip));

    // `*` covers what is not named, and a named q=0 wins over it.
    let star = accept("*;q=0.3, br;q=0");
    assert!(star.accepts(Coding::Gzip) && star.accepts(Coding::Deflate));
    assert!(!star.accepts(Coding::Brotli));
    assert!(!accept("identity").accepts(Coding::Gzip));
}

#[test]
fn the_highest_q_value_wins_and_ties_keep_dataverses_coding() {
    assert_eq!(
        accept("gzip;q=0.5, br;q=0.9").choose(Coding::Gzip),
        Some(Coding::Brotli)
    );
    assert_eq!(
        accept("gzip, br").choose(Coding::Brotli),
        Some(Coding::Brotli)
    );
    assert_eq!(
        accept("gzip, br").choose(Coding::Deflate),
        Some(Coding::Gzip)
    );
    assert_eq!(
        accept("deflate").choose(Coding::Gzip),
        Some(Coding::Deflate)
    );
    assert_eq!(accept("identity, gzip;q=0").choose(Coding::Gzip), None);
}

#[test]
fn transcoding_only_where_needed() {
    let gzip = BodyCoding::Coded(Coding::Gzip);
    let untouched = Transcode::Untouched;
    assert_eq!(Transcode::decide(gzip, false, &accept("gzip")), untouched);
    assert_eq!(
        Transcode::decide(gzip, true, &accept("gzip")),
        Transcode::Recode {
            from: Coding::Gzip,
            to: Some(Coding::Gzip)
        }
    );
    assert_eq!(
        Transcode::decide(gzip, false, &accept("br")),
        Transcode::Recode {
            from: Coding::Gzip,
            to: Some(Coding::Brotli)
        }
    );
    assert_eq!(
        Transcode::decide(gzip, false, &AcceptEncoding::default()),
        Transcode::Recode {
            from: Coding::Gzip,
            to: None
        }
    );
    let identity = BodyCoding::Identity;
    assert_eq!(
        Transcode::decide(identity, true, &accept("gzip")),
        untouched
    );
    let unknown = BodyCoding::Unknown;
    assert_eq!(Transcode::decide(unknown, true, &accept("")), untouched);
}

#[test]
fn content_encoding_is_read_strictly() {
    let of = |values: &[&str]| {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                header::CONTENT_ENCODING,
                HeaderValue::from_str(v).expect("ok"),
            );
        }
        BodyCoding::of(&h)
    };
    assert_eq!(of(&[]), BodyCoding::Identity);
    assert_eq!(of(&["identity"]), BodyCoding::Identity);
    assert_eq!(of(&["GZip"]), BodyCoding::Coded(Coding::Gzip));
    assert_eq!(of(&["br"]), BodyCoding::Coded(Coding::Brotli));
    assert_eq!(of(&["zstd"]), BodyCoding::Unknown);
    assert_eq!(of(&["gzip, br"]), BodyCoding::Unknown, "stacked codings");
    assert_eq!(of(&["gzip", "gzip"]), BodyCoding::Unknown);
}

#[test]
fn vary_and_etag_follow_changed_bytes() {
    let mut h = HeaderMap::new();
    h.insert(header::ETAG, HeaderValue::from_static("\"abc\""));
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    weaken_etag(&mut h);
    vary_on_accept_encoding(&mut h);
    vary_on_accept_encoding(&mut h);
    assert_eq!(h[header::ETAG], "W/\"abc\"");
    let vary: Vec<_> = h.get_all(header::VARY).iter().collect();
    assert_eq!(vary, ["Origin", "accept-encoding"]);
    weaken_etag(&mut h);
    assert_eq!(h[header::ETAG], "W/\"abc\"", "already weak");
}

const ORG: &str = "https://contoso.crm.dynamics.com";
const PROXY: &str = "http://proxy.internal:8080";

/// A page of OData JSON dense with org links.
fn page(rows: usize) -> Vec<u8> {
    let mut out =
        format!("{{\"@odata.context\":\"{ORG}/api/data/v9.2/$metadata#accounts\",\"value\":[");
    for i in 0..rows {
        out.push_str(&format!(
            "{{\"@odata.etag\":\"W/\\\"{i}\\\"\",\"@odata.id\":\"{ORG}/api/data/v9.2/accounts({i:08})\",\"name\":\"Account {i}\"}},"
        ));
    }
    out.push_str(&format!(
        "{{}}],\"@odata.nextLink\":\"{ORG}/api/data/v9.2/accounts?$skiptoken=%253Ccookie%253E\"}}"
    ));
    out.into_bytes()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).expect("ok");
    e.finish().expect("ok")
}

fn zlib(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).expect("ok");
    e.finish().expect("ok")
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(bytes), &mut out)
        .expect("ok");
    out
}

/// `bytes` as a body of random-sized chunks (1 byte to 3 KiB), an error
/// after them when `broken`.
fn chunked(
    bytes: &[u8],
    rng: &mut fastrand::Rng,
    broken: bool,
) -> impl http_body::Body<Data = Bytes, Error = std::io::Error> + Send + 'static {
    let mut frames = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = rng.usize(1..=3072).min(rest.len());
        frames.push(Ok(http_body::Frame::data(Bytes::copy_from_slice(
            &rest[..n],
        ))));
        rest = &rest[n..];
    }
    if broken {
        frames.push(Err(std::io::Error::other("Dataverse broke off")));
    }
    http_body_util::StreamBody::new(futures_util::stream::iter(frames))
}

fn rewriter() -> Rewriter {
    Rewriter::api_prefix(&[ORG], PROXY).expect("ok")
}

async fn collect<B>(body: B) -> Result<Vec<u8>, axum::BoxError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<axum::BoxError>,
{
    Ok(body
        .collect()
        .await
        .map_err(Into::into)?
        .to_bytes()
        .to_vec())
}

#[tokio::test]
async fn decoded_and_rewritten_across_random_chunk_splits() {
    let plain = page(400);
    let expected = rewriter().rewrite_all(&plain).expect("ok");
    let compressed = gzip(&plain);
    for seed in 0..24 {
        let mut rng = fastrand::Rng::with_seed(seed);
        // To identity.
        let body = RewriteBody::new(
            decode(chunked(&compressed, &mut rng, false), Coding::Gzip),
            Some(rewriter()),
        );
        assert_eq!(collect(body).await.expect("ok"), expected, "seed {seed}");
        // And encoded again.
        let body = RewriteBody::new(
            decode(chunked(&compressed, &mut rng, false), Coding::Gzip),
            Some(rewriter()),
        );
        let again = collect(encode(body, Coding::Gzip, 4)).await.expect("ok");
        assert_eq!(gunzip(&again), expected, "seed {seed}");
    }
}

#[tokio::test]
async fn every_coding_round_trips() {
    let plain = page(50);
    let mut rng = fastrand::Rng::with_seed(7);
    for coding in Coding::ALL {
        let encoded = collect(encode(chunked(&plain, &mut rng, false), coding, 5))
            .await
            .expect("ok");
        assert!(encoded.len() * 3 < plain.len(), "{coding:?} compresses");
        let decoded = collect(decode(chunked(&encoded, &mut rng, false), coding))
            .await
            .expect("ok");
        assert_eq!(decoded, plain, "{coding:?}");
    }
    let zlib = zlib(&plain);
    let decoded = collect(decode(chunked(&zlib, &mut rng, false), Coding::Deflate))
        .await
        .expect("ok");
    assert_eq!(decoded, plain, "HTTP deflate is zlib");
}

#[tokio::test]
async fn a_broken_compressed_stream_is_an_error_not_an_end() {
    let plain = page(200);
    let compressed = gzip(&plain);
    let mut rng = fastrand::Rng::with_seed(3);
    // Cut short, but ended cleanly by the body underneath.
    let cut = &compressed[..compressed.len() / 2];
    let body = decode(chunked(cut, &mut rng, false), Coding::Gzip);
    assert!(collect(body).await.is_err(), "a truncated gzip stream");
    // Corrupted in the middle.
    let mut corrupt = compressed.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid..mid + 64].fill(0xff);
    let body = decode(chunked(&corrupt, &mut rng, false), Coding::Gzip);
    assert!(collect(body).await.is_err(), "a corrupt gzip stream");
    // The body underneath fails: the error comes through, source kept.
    let body = decode(chunked(&compressed, &mut rng, true), Coding::Gzip);
    let err = collect(body).await.expect_err("an error");
    assert!(
        format!("{err:?}").contains("Dataverse broke off"),
        "{err:?}"
    );
}
