//! OpenTelemetry traces from the real binary to a real OTLP/HTTP receiver
//! (protobuf decoded with opentelemetry-proto): the SERVER span by the HTTP
//! conventions, a CLIENT span per attempt (a replay after a 429 counted),
//! the token fetch, parents from the caller's `traceparent`, the context
//! passed to Dataverse, and nothing secret or from the query in any
//! attribute. Real time, bounded: the exporter's batch delay is 100 ms.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use dataverse_sim::{DataverseFault, Sim, SimConfig, SimHandle};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use crate::binary::free_port;
use crate::harness::client;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// An OTLP/HTTP receiver: every span of every export it is sent.
async fn receiver() -> (String, Arc<Mutex<Vec<Span>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let kept = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let kept = kept.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut kept = kept.lock().expect("spans");
                for rs in req.resource_spans {
                    for ss in rs.scope_spans {
                        kept.extend(ss.spans);
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), spans)
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Any> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn text<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    match attr(span, key) {
        Some(Any::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn int(span: &Span, key: &str) -> Option<i64> {
    match attr(span, key) {
        Some(Any::IntValue(i)) => Some(*i),
        _ => None,
    }
}

/// Runs the binary exporting to an OTLP receiver, sends one GET carrying a
/// caller's `traceparent` (replayed once after a 429), and returns the
/// server span, every span, and the simulator. `trusted`: the caller's
/// address is in `trusted_proxies`.
async fn traced_request(trusted: bool) -> (Span, Vec<Span>, SimHandle) {
    let (otlp, spans) = receiver().await;
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let h = sim.handle.clone();
    let (port, admin) = (free_port(), free_port());
    let mut command = crate::binary::command();
    command
        .arg("serve")
        .envs(crate::binary::sim_env(&h))
        .env("DATAVERSE_PROXY_LISTEN", format!("127.0.0.1:{port}"))
        .env("DATAVERSE_PROXY_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("RUST_LOG", "warn")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if trusted {
        command.env("DATAVERSE_PROXY_TRUSTED_PROXIES", "127.0.0.1");
    }
    let mut child = command.spawn().expect("spawn");
    let c = client();
    crate::harness::wait_ready(&c, &format!("http://127.0.0.1:{admin}")).await;
    // One 429 first: the request is replayed, a second attempt span.
    h.inject_dataverse_fault(DataverseFault {
        status: 429,
        retry_after: Some(0),
        count: 1,
    });
    let url = format!(
        "http://127.0.0.1:{port}/api/data/v9.2/accounts?$filter=name%20eq%20'SECRET-QUERY'"
    );
    let resp = c
        .get(&url)
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .header("tracestate", "vendor=1")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);

    let mut server = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let got = spans.lock().expect("spans").clone();
        let clients = got
            .iter()
            .filter(|s| s.kind == 3 && s.name == "GET")
            .count();
        if let Some(s) = got.iter().find(|s| s.kind == 2)
            && clients >= 2
        {
            server = Some((s.clone(), got));
            break;
        }
    }
    let (server, all) = server.expect("a server span and two client spans arrived");
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    (server, all, h)
}

/// A caller that is not a trusted proxy picks neither the trace id nor the
/// sampling decision: its `traceparent` is not the request span's parent.
#[tokio::test]
async fn an_untrusted_callers_trace_context_is_not_adopted() {
    let (server, all, h) = traced_request(false).await;
    assert_ne!(hex(&server.trace_id), TRACE, "a trace of the proxy's own");
    assert!(server.parent_span_id.is_empty(), "no caller's parent");
    let seen = h.seen();
    let last = seen.last().expect("seen");
    let traceparent = last.headers["traceparent"].to_str().expect("ascii");
    assert!(!traceparent.contains(TRACE), "{traceparent}");
    assert!(all.iter().all(|s| hex(&s.trace_id) != TRACE));
}

#[tokio::test]
async fn spans_follow_the_http_conventions_and_carry_the_callers_trace() {
    let (server, all, h) = traced_request(true).await;

    // SERVER: named `{method} {route}`, the caller's trace, its span the parent.
    assert_eq!(server.name, "GET /api/data/{*rest}");
    assert_eq!(hex(&server.trace_id), TRACE);
    assert_eq!(hex(&server.parent_span_id), PARENT);
    assert_eq!(text(&server, "http.request.method"), Some("GET"));
    assert_eq!(text(&server, "http.route"), Some("/api/data/{*rest}"));
    assert_eq!(text(&server, "url.path"), Some("/api/data/v9.2/accounts"));
    assert_eq!(
        int(&server, "http.response.status_code"),
        Some(200),
        "{:?}",
        server.attributes
    );
    assert!(attr(&server, "error.type").is_none());

    // CLIENT: one per attempt, children of the server span; the replay counted.
    let mut attempts: Vec<&Span> = all
        .iter()
        .filter(|s| s.kind == 3 && s.name == "GET")
        .collect();
    attempts.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    for a in &attempts {
        assert_eq!(a.trace_id, server.trace_id);
        assert_eq!(a.parent_span_id, server.span_id);
        assert_eq!(text(a, "server.address"), Some("127.0.0.1"));
        assert_eq!(text(a, "dataverse.lane"), Some("default"));
        assert!(attr(a, "dataverse.governor.wait_ms").is_some());
    }
    assert_eq!(int(attempts[0], "http.response.status_code"), Some(429));
    assert_eq!(text(attempts[0], "error.type"), Some("429"));
    assert!(attr(attempts[0], "http.request.resend_count").is_none());
    assert_eq!(int(attempts[1], "http.response.status_code"), Some(200));
    assert_eq!(int(attempts[1], "http.request.resend_count"), Some(1));

    // Dataverse got the attempt's context: the caller's trace, the
    // attempt's span as parent, the caller's tracestate.
    let seen = h.seen();
    let last = seen
        .iter()
        .rev()
        .find(|r| r.target.starts_with("/api/data/v9.2/accounts"))
        .expect("seen");
    let traceparent = last.headers["traceparent"].to_str().expect("ascii");
    assert_eq!(
        traceparent,
        format!("00-{TRACE}-{}-01", hex(&attempts[1].span_id))
    );
    assert_eq!(last.headers["tracestate"], "vendor=1");

    // The token fetch is a span of its own.
    assert!(
        all.iter().any(|s| s.name == "token fetch" && s.kind == 3),
        "{:?}",
        names(&all)
    );

    // Nothing from the query, no token, no secret, in any attribute.
    for s in &all {
        for kv in &s.attributes {
            let v = format!("{:?}", kv.value);
            for bad in ["SECRET-QUERY", "$filter", "eyJ", &h.config().client_secret] {
                assert!(!v.contains(bad), "{} {} = {v}", s.name, kv.key);
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn names(spans: &[Span]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}

/// Without an OTLP endpoint nothing is exported and a caller's trace
/// context reaches Dataverse as the caller sent it.
#[tokio::test]
async fn without_an_exporter_the_callers_trace_context_passes_untouched() {
    let h = crate::harness::Harness::start().await;
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let resp = h
        .get_with(
            "/WhoAmI",
            &[("traceparent", &traceparent), ("tracestate", "vendor=1")],
        )
        .await;
    assert_eq!(resp.status(), 200);
    let seen = h.sim.seen();
    assert_eq!(seen[0].headers["traceparent"], traceparent.as_str());
    assert_eq!(seen[0].headers["tracestate"], "vendor=1");
    h.stop().await;
}
