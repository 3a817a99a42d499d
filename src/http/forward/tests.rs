//! Each step of the forwarding handler on its own, without sockets: the
//! state is built from a config (nothing is fetched), bodies are in memory.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::admit::{Admitted, admit};
use super::answer::{SMALL_ANSWER, answer};
use super::plan::{plan, service_root, upstream_uri};
use super::send::{Attempts, Next, Sent, next_step};
use crate::config::{Config, GovernorConfig, Sources};
use crate::error::ProxyError;
use crate::http::access_log::RequestInfo;
use crate::http::body::RequestBody;
use crate::http::state::AppState;

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
    admit(
        state,
        PEER,
        &parts(method, target, headers),
        &mut RequestInfo::default(),
    )
    .await
}

// --- admit ---

#[tokio::test]
async fn admit_routes_guards_and_applies_the_policy() {
    let s = state(&[("org.policy.deny", "systemusers")]);
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
        ("/api/data/v9.2/SystemUsers", "policy_denied"),
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
    for gone in ["authorization", "cookie", "accept-encoding"] {
        assert!(p.headers.get(gone).is_none(), "{gone}");
    }
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

#[tokio::test]
async fn plan_lets_file_downloads_come_compressed() {
    let s = state(&[]);
    let target = "/api/data/v9.2/accounts(1)/dvp_document/$value";
    let headers = [("accept-encoding", "gzip")];
    let a = admitted(&s, Method::GET, target, &headers)
        .await
        .expect("admitted");
    let p = plan(&s, &a, parts(Method::GET, target, &headers), Body::empty())
        .await
        .expect("planned");
    assert_eq!(p.headers[header::ACCEPT_ENCODING], "gzip");
    assert!(matches!(p.body, RequestBody::Empty));
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
    let a = admitted(state, method, "/api/data/v9.2/accounts", &[])
        .await
        .expect("admitted");
    let permit = a.org.governor.acquire().await.expect("a slot");
    answer(
        state,
        &a,
        Sent {
            response: upstream,
            permit,
        },
        &mut RequestInfo::default(),
    )
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

    let gz = answered(
        &s,
        Method::GET,
        upstream(link.clone(), &[json, ("content-encoding", "gzip")]),
    )
    .await;
    assert_eq!(
        gz.into_body().collect().await.expect("body").to_bytes(),
        link.as_bytes()
    );
    let head = answered(&s, Method::HEAD, upstream(link.clone(), &[json])).await;
    assert_eq!(
        head.into_body().collect().await.expect("body").to_bytes(),
        link.as_bytes()
    );
}
