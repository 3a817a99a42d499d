//! Each step of the forwarding handler on its own, without sockets: the
//! state is built from a config (nothing is fetched), bodies are in memory.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::Call;
use super::admit::{Admitted, admit};
use super::answer::{SMALL_ANSWER, answer};
use super::plan::{plan, service_root, upstream_uri};
use super::send::{Attempts, Next, Sent, next_step};
use crate::app::AppState;
use crate::compression::AcceptEncoding;
use crate::config::{Config, GovernorConfig, Sources};
use crate::error::ProxyError;
use crate::http::access_log::RequestInfo;
use crate::http::body::RequestBody;

const ORG: &str = "http://127.0.0.1:9";
const PEER: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn state(extra: &[(&'static str, &str)]) -> AppState {
    let mut overrides = vec![
        ("org.url", ORG.to_owned()),
        ("credential.tenant_id", "tenant".to_owned()),
        ("credential.client_id", "client".to_owned()),
        ("credential.client_secret", "secret".to_owned()),
        ("credential.token_url", format!("{ORG}/token")),
        ("public_url", "http://proxy.test".to_owned()),
    ];
    overrides.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let config = Config::load(&Sources {
        overrides,
        ..Sources::default()
    })
    .expect("valid test config");
    crate::install_crypto_provider();
    AppState::new(&config).expect("state")
}

fn parts(method: Method, target: &str, headers: &[(&str, &str)]) -> axum::http::request::Parts {
    let mut req = Request::builder().method(method).uri(target);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(()).expect("request").into_parts().0
}

async fn admitted(
    state: &AppState,
    method: Method,
    target: &str,
    headers: &[(&str, &str)],
) -> Result<Admitted, ProxyError> {
    let accept = AcceptEncoding::from_headers(&HeaderMap::new());
    let call = &mut Call {
        state,
        arrived: tokio::time::Instant::now(),
        accept: &accept,
        info: &mut RequestInfo::default(),
    };
    admit(call, PEER, &parts(method, target, headers)).await
}

// --- admit ---

#[tokio::test]
async fn admit_routes_guards_and_applies_the_policy() {
    let s = state(&[("org.policy.metadata", "false")]);
    let ok = admitted(&s, Method::GET, "/api/data/v9.2/accounts", &[])
        .await
        .expect("admitted");
    assert_eq!((ok.org.name.as_str(), ok.prefix_len), ("default", 0));
    let prefixed = admitted(&s, Method::GET, "/default/api/data/v9.2/accounts", &[])
        .await
        .expect("admitted");
    assert_eq!(prefixed.prefix_len, "/default".len());
    for (target, code) in [
        ("/other/api/data/v9.2/accounts", "not_found"),
        ("/api/data/v8.0/accounts", "not_found"),
        ("/api/data/v9.2/%u002e%u002e/x", "bad_path"),
        ("/api/data/v9.2/$metadata", "policy_denied"),
    ] {
        let err = admitted(&s, Method::GET, target, &[]).await.err();
        assert_eq!(err.map(|e| e.code()), Some(code), "{target}");
    }
    // A table list needs the org's tables: without them (Entra and
    // Dataverse unreachable here), refused, never checked by a guess.
    let s = state(&[("org.policy.deny", "systemusers")]);
    for (target, code) in [
        ("/api/data/v9.2/SystemUsers", "policy_denied"),
        ("/api/data/v9.2/accounts", "policy_tables_unavailable"),
    ] {
        let err = admitted(&s, Method::GET, target, &[]).await.err();
        assert_eq!(err.map(|e| e.code()), Some(code), "{target}");
    }
}

#[tokio::test]
async fn admit_restores_only_what_the_policy_lets_through() {
    let s = state(&[(
        "org.policy.privileged_headers",
        "MSCRM.BypassCustomPluginExecution",
    )]);
    let a = admitted(
        &s,
        Method::POST,
        "/api/data/v9.2/accounts",
        &[
            ("MSCRM.BypassCustomPluginExecution", "true"),
            ("MSCRM.BypassBusinessLogicExecution", "CustomSync"),
            ("CallerObjectId", "00000000-0000-0000-0000-000000000001"),
        ],
    )
    .await
    .expect("admitted");
    let names: Vec<&str> = a.restored.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["mscrm.bypasscustompluginexecution"]);
    assert!(a.batch_origins.is_none());
    let batch = admitted(&s, Method::POST, "/api/data/v9.2/$batch", &[])
        .await
        .expect("admitted");
    assert_eq!(
        batch.batch_origins.as_deref(),
        Some(&[ORG.to_owned(), "http://proxy.test".to_owned()][..])
    );
}

// --- plan ---

#[tokio::test]
async fn plan_keeps_the_target_bytes_and_sets_the_orgs_headers() {
    let s = state(&[]);
    let target = "/default/api/data/v9.2/accounts?$filter=name%20eq%20'a%27b'";
    let headers = [
        ("host", "proxy.test"),
        ("authorization", "Bearer caller"),
        ("cookie", "ARRAffinity=x"),
        ("accept-encoding", "gzip"),
        ("content-type", "application/json"),
        ("content-length", "84"),
    ];
    let a = admitted(&s, Method::POST, target, &headers)
        .await
        .expect("admitted");
    let body = Body::from(
        r#"{"parentaccountid@odata.bind":"http://proxy.test/default/api/data/v9.2/accounts(1)"}"#,
    );
    let p = plan(&s, &a, parts(Method::POST, target, &headers), body)
        .await
        .expect("planned");
    assert_eq!(
        p.uri,
        "http://127.0.0.1:9/api/data/v9.2/accounts?$filter=name%20eq%20'a%27b'"
    );
    assert_eq!(p.headers[header::HOST], "127.0.0.1:9");
    for gone in ["authorization", "cookie"] {
        assert!(p.headers.get(gone).is_none(), "{gone}");
    }
    assert_eq!(
        p.headers[header::ACCEPT_ENCODING],
        "gzip, br, deflate",
        "the proxy asks for every coding it can open"
    );
    let RequestBody::Buffered(bytes) = &p.body else {
        panic!("a small body is buffered");
    };
    assert_eq!(
        &bytes[..],
        br#"{"parentaccountid@odata.bind":"http://127.0.0.1:9/api/data/v9.2/accounts(1)"}"#
    );
    assert_eq!(
        p.headers[header::CONTENT_LENGTH],
        bytes.len().to_string().as_str()
    );
}

/// The `Accept-Encoding` Dataverse gets for a GET of `target`.
async fn planned_accept_encoding(
    s: &AppState,
    target: &str,
    headers: &[(&'static str, &str)],
) -> Option<HeaderValue> {
    let a = admitted(s, Method::GET, target, headers)
        .await
        .expect("admitted");
    let p = plan(s, &a, parts(Method::GET, target, headers), Body::empty())
        .await
        .expect("planned");
    assert!(matches!(p.body, RequestBody::Empty));
    p.headers.get(header::ACCEPT_ENCODING).cloned()
}

#[tokio::test]
async fn plan_asks_for_compression_unless_switched_off_or_a_range() {
    let file = "/api/data/v9.2/accounts(1)/dvp_document/$value";
    let rows = "/api/data/v9.2/accounts";
    let gzip = [("accept-encoding", "gzip")];
    let on = state(&[]);
    let ours = Some(crate::compression::UPSTREAM_ACCEPT);
    assert_eq!(planned_accept_encoding(&on, rows, &[]).await, ours);
    assert_eq!(planned_accept_encoding(&on, file, &gzip).await, ours);
    let range = [("accept-encoding", "identity"), ("range", "bytes=0-99")];
    assert_eq!(
        planned_accept_encoding(&on, file, &range)
            .await
            .expect("kept"),
        "identity",
        "a range of coded bytes could not be decoded: the caller's own"
    );
    let off = state(&[("upstream.compression", "false")]);
    assert_eq!(planned_accept_encoding(&off, rows, &gzip).await, None);
    assert_eq!(
        planned_accept_encoding(&off, file, &gzip)
            .await
            .expect("kept"),
        "gzip",
        "file downloads are never rewritten"
    );
}

#[test]
fn uri_and_service_root_helpers() {
    let origin = "https://contoso.crm.dynamics.com"
        .parse::<http::Uri>()
        .expect("uri")
        .into_parts();
    let uri = upstream_uri(
        &origin,
        &"/main/api/data/v9.2/x?a=%2F".parse().expect("uri"),
        5,
    )
    .expect("uri");
    assert_eq!(
        uri,
        "https://contoso.crm.dynamics.com/api/data/v9.2/x?a=%2F"
    );
    assert_eq!(service_root("/api/data/v9.1/$batch"), "/api/data/v9.1");
    assert_eq!(service_root("/api/data/v9.2"), "/api/data/v9.2");
}

// --- send: what follows an answer ---

#[test]
fn the_next_step_replays_401_once_and_429_within_budget() {
    let limits = GovernorConfig {
        max_retries: 2,
        ..GovernorConfig::default()
    };
    let none = HeaderMap::new();
    let mut retry_after = HeaderMap::new();
    retry_after.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
    let fresh = Attempts::default();
    let refreshed = Attempts {
        refreshed: true,
        ..Attempts::default()
    };
    let twice = Attempts {
        throttled: 2,
        ..Attempts::default()
    };
    let zero = Duration::ZERO;
    let step = |status, headers: &HeaderMap, attempts: &Attempts, replayable, elapsed| {
        next_step(status, headers, attempts, replayable, elapsed, &limits)
    };
    assert_eq!(
        step(StatusCode::OK, &none, &fresh, true, zero),
        Next::Answer
    );
    assert_eq!(
        step(StatusCode::UNAUTHORIZED, &none, &fresh, true, zero),
        Next::Refresh
    );
    assert_eq!(
        step(StatusCode::UNAUTHORIZED, &none, &refreshed, true, zero),
        Next::Answer
    );
    assert_eq!(
        step(StatusCode::UNAUTHORIZED, &none, &fresh, false, zero),
        Next::Answer
    );
    let throttled = StatusCode::TOO_MANY_REQUESTS;
    assert_eq!(
        step(throttled, &retry_after, &fresh, true, zero),
        Next::Wait(Duration::from_secs(7))
    );
    assert_eq!(
        step(throttled, &none, &fresh, true, zero),
        Next::Wait(Duration::from_secs(1))
    );
    assert_eq!(
        step(throttled, &retry_after, &twice, true, zero),
        Next::Answer,
        "budget used"
    );
    assert_eq!(
        step(throttled, &retry_after, &fresh, false, zero),
        Next::Answer,
        "not replayable"
    );
    assert_eq!(
        step(
            throttled,
            &retry_after,
            &fresh,
            true,
            Duration::from_secs(55)
        ),
        Next::Answer,
        "past the deadline"
    );
}

// --- answer ---

async fn answered(
    state: &AppState,
    method: Method,
    upstream: Response<Full<Bytes>>,
) -> Response<crate::http::body::ProxyBody<Full<Bytes>>> {
    answered_for(state, method, upstream, "").await
}

/// The answer for a caller that sent `Accept-Encoding: {accept}`.
async fn answered_for(
    state: &AppState,
    method: Method,
    upstream: Response<Full<Bytes>>,
    accept: &str,
) -> Response<crate::http::body::ProxyBody<Full<Bytes>>> {
    let a = admitted(state, method, "/api/data/v9.2/accounts", &[])
        .await
        .expect("admitted");
    let permit = a
        .org
        .lanes
        .first()
        .governor
        .acquire()
        .await
        .expect("a slot");
    let mut caller = HeaderMap::new();
    if !accept.is_empty() {
        caller.insert(header::ACCEPT_ENCODING, accept.parse().expect("value"));
    }
    let accept = AcceptEncoding::from_headers(&caller);
    let call = &mut Call {
        state,
        arrived: tokio::time::Instant::now(),
        accept: &accept,
        info: &mut RequestInfo::default(),
    };
    answer(call, &a, Sent::new(upstream, Some(permit)))
        .await
        .expect("answered")
}

fn upstream(body: String, headers: &[(&str, &str)]) -> Response<Full<Bytes>> {
    let mut resp = Response::builder().status(200);
    for (k, v) in headers {
        resp = resp.header(*k, *v);
    }
    resp.body(Full::new(Bytes::from(body))).expect("response")
}

#[tokio::test]
async fn answers_lose_cookies_and_get_the_proxys_links() {
    let s = state(&[]);
    let body =
        format!(r#"{{"@odata.context":"{ORG}/api/data/v9.2/$metadata#accounts","value":[]}}"#);
    let len = body.len().to_string();
    let resp = answered(
        &s,
        Method::GET,
        upstream(
            body,
            &[
                ("content-type", "application/json; odata.metadata=minimal"),
                ("content-length", &len),
                ("set-cookie", "ARRAffinity=1"),
                ("location", &format!("{ORG}/api/data/v9.2/accounts(1)")),
            ],
        ),
    )
    .await;
    assert!(resp.headers().get("set-cookie").is_none());
    assert_eq!(
        resp.headers()["location"],
        "http://proxy.test/api/data/v9.2/accounts(1)"
    );
    let expected =
        r#"{"@odata.context":"http://proxy.test/api/data/v9.2/$metadata#accounts","value":[]}"#;
    assert_eq!(
        resp.headers()[header::CONTENT_LENGTH],
        expected.len().to_string().as_str()
    );
    let got = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(got, expected.as_bytes());
}

#[tokio::test]
async fn large_answers_stream_and_compressed_or_head_ones_pass_untouched() {
    let s = state(&[]);
    let link = format!("{ORG}/api/data/v9.2/accounts(1)");
    let big = format!(
        r#"{{"@odata.id":"{link}","pad":"{}"}}"#,
        "x".repeat(SMALL_ANSWER)
    );
    let len = big.len().to_string();
    let json = ("content-type", "application/json");
    let resp = answered(
        &s,
        Method::GET,
        upstream(big, &[json, ("content-length", &len)]),
    )
    .await;
    assert!(
        resp.headers().get(header::CONTENT_LENGTH).is_none(),
        "streamed"
    );
    let got = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(got.starts_with(br#"{"@odata.id":"http://proxy.test/api/data/v9.2/accounts(1)""#));

    let unknown = answered(
        &s,
        Method::GET,
        upstream(link.clone(), &[json, ("content-encoding", "zstd")]),
    )
    .await;
    assert_eq!(
        unknown
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes(),
        link.as_bytes(),
        "a coding the proxy cannot open passes as it came"
    );
    let head = answered(&s, Method::HEAD, upstream(link.clone(), &[json])).await;
    assert_eq!(
        head.into_body().collect().await.expect("body").to_bytes(),
        link.as_bytes()
    );
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).expect("gzip");
    e.finish().expect("gzip")
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes), &mut out).expect("gzip");
    out
}

/// A gzip answer of Dataverse with an org link, as Full bytes.
fn gzip_answer(plain: &str, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(gzip(plain.as_bytes()))));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    h.insert(header::ETAG, HeaderValue::from_static("\"v7\""));
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(gzip(plain.as_bytes()).len()),
    );
    resp
}

#[tokio::test]
async fn compressed_answers_are_rewritten_and_fitted_to_the_caller() {
    let s = state(&[]);
    let plain = format!(r#"{{"@odata.id":"{ORG}/api/data/v9.2/accounts(1)"}}"#);
    let rewritten = r#"{"@odata.id":"http://proxy.test/api/data/v9.2/accounts(1)"}"#;
    let json = "application/json; odata.metadata=minimal";

    let gz = answered_for(
        &s,
        Method::GET,
        gzip_answer(&plain, json),
        "gzip;q=1, br;q=0.5",
    )
    .await;
    let h = gz.headers().clone();
    assert_eq!(h[header::CONTENT_ENCODING], "gzip");
    assert_eq!(h[header::ETAG], "W/\"v7\"", "bytes changed: weak");
    assert_eq!(h[header::VARY], "accept-encoding");
    assert!(h.get(header::CONTENT_LENGTH).is_none());
    let body = gz.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(gunzip(&body), rewritten.as_bytes());

    let plain_caller = answered_for(&s, Method::GET, gzip_answer(&plain, json), "").await;
    assert!(
        plain_caller
            .headers()
            .get(header::CONTENT_ENCODING)
            .is_none()
    );
    let body = plain_caller.into_body().collect().await.expect("body");
    assert_eq!(
        body.to_bytes(),
        rewritten.as_bytes(),
        "identity for a caller without gzip"
    );

    // Nothing to rewrite and the caller takes gzip: Dataverse's bytes.
    let xml = answered_for(
        &s,
        Method::GET,
        gzip_answer(&plain, "application/xml"),
        "gzip",
    )
    .await;
    assert_eq!(
        xml.headers()[header::ETAG],
        "\"v7\"",
        "untouched: still strong"
    );
    let body = xml.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, gzip(plain.as_bytes()));
}
