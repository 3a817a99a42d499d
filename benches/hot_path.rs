//! Microbenchmarks of the per-request work the proxy adds, so regressions
//! show: link rewriting, the header policy and the path guard.
//!
//! `cargo bench --bench hot_path`

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::{Bytes, BytesMut};
use dataverse_proxy::guard;
use dataverse_proxy::http::headers;
use dataverse_proxy::rewrite::Rewriter;

fn main() {
    divan::main();
}

const ORG: &str = "https://contoso.crm.dynamics.com";
const PROXY: &str = "http://127.0.0.1:8080";

/// A ~1 MB OData page; `links` decides whether rows carry org URLs.
fn page(links: bool) -> Bytes {
    let mut s =
        format!("{{\"@odata.context\":\"{ORG}/api/data/v9.2/$metadata#accounts\",\"value\":[");
    let mut i = 0;
    while s.len() < 1_000_000 {
        let id = format!("00000000-0000-0000-0000-{i:012}");
        if links {
            s.push_str(&format!(
                "{{\"@odata.id\":\"{ORG}/api/data/v9.2/accounts({id})\",\"name\":\"Account {i}\"}},"
            ));
        } else {
            s.push_str(&format!("{{\"@odata.idx\":\"urn:accounts:{id}:xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\",\"name\":\"Account {i}\"}},"));
        }
        i += 1;
    }
    s.push_str("{}]}");
    Bytes::from(s)
}

fn stream(r: &Rewriter, body: &Bytes) -> usize {
    let mut carry = BytesMut::new();
    let mut n = 0;
    for start in (0..body.len()).step_by(16 * 1024) {
        let end = (start + 16 * 1024).min(body.len());
        let mut out = std::collections::VecDeque::new();
        r.feed(&mut carry, body.slice(start..end), &mut out);
        n += out.iter().map(Bytes::len).sum::<usize>();
    }
    n + carry.len()
}

#[divan::bench(args = [true, false])]
fn rewrite_1mb_page(bencher: divan::Bencher<'_, '_>, links: bool) {
    let r = Rewriter::api_prefix(&[ORG], PROXY).expect("rewriter");
    let body = page(links);
    bencher
        .counter(divan::counter::BytesCount::new(body.len()))
        .bench(|| stream(&r, divan::black_box(&body)));
}

/// An org on a Dynamics host: its links may name it or its `.api.` alias.
#[divan::bench(args = [true, false])]
fn rewrite_1mb_page_with_alias(bencher: divan::Bencher<'_, '_>, links: bool) {
    let r = Rewriter::api_prefix(&[ORG, "https://contoso.api.crm.dynamics.com"], PROXY)
        .expect("rewriter");
    let body = page(links);
    bencher
        .counter(divan::counter::BytesCount::new(body.len()))
        .bench(|| stream(&r, divan::black_box(&body)));
}

#[divan::bench]
fn header_policy(bencher: divan::Bencher<'_, '_>) {
    let mut base = HeaderMap::new();
    for (k, v) in [
        ("host", "proxy.internal:8080"),
        ("accept", "application/json"),
        ("odata-maxversion", "4.0"),
        ("odata-version", "4.0"),
        ("prefer", "odata.maxpagesize=500"),
        ("if-none-match", "null"),
        ("authorization", "Bearer caller"),
        ("x-request-id", "3f1c2a7e-1b2c-4d5e-8f90-123456789abc"),
        ("user-agent", "DataverseSvcClient/1.0"),
    ] {
        base.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    bencher.bench(|| {
        let mut h = base.clone();
        headers::to_upstream(
            divan::black_box(&mut h),
            HeaderValue::from_static("contoso.crm.dynamics.com"),
        );
        h
    });
}

#[divan::bench]
fn path_guard(bencher: divan::Bencher<'_, '_>) {
    bencher.bench(|| {
        guard::check(divan::black_box(
            "/api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001)/contact_customer_accounts",
        ))
    });
}
