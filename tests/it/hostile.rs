//! More than 300 hostile requests, sent as raw bytes: none may reach
//! Dataverse, none may crash the proxy, and each gets the one status (and,
//! where the proxy answers rather than hyper's parser, the one error code)
//! it must get. A 400 that turns into a 404 fails the row.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Harness, Setup};

/// What a hostile request must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Expect {
    status: u16,
    /// The `x-dataverse-proxy-error` code; `None` where hyper's own parser
    /// refuses the request before the proxy sees it (no code is sent).
    code: Option<&'static str>,
}

const fn proxy(status: u16, code: &'static str) -> Expect {
    Expect {
        status,
        code: Some(code),
    }
}

const fn parser(status: u16) -> Expect {
    Expect { status, code: None }
}

const BAD_PATH: Expect = proxy(400, "bad_path");
const NOT_FOUND: Expect = proxy(404, "not_found");
const METHOD: Expect = proxy(405, "method_not_allowed");
const BAD_BATCH: Expect = proxy(400, "bad_batch");

struct Case {
    name: String,
    raw: Vec<u8>,
    expect: Expect,
}

fn get(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: proxy.test\r\nConnection: close\r\n\r\n").into_bytes()
}

fn case(name: impl Into<String>, raw: Vec<u8>, expect: Expect) -> Case {
    Case {
        name: name.into(),
        raw,
        expect,
    }
}

/// Traversal, encoded separators and non-RFC 3986 escapes: every spelling
/// is a 400 `bad_path`, except those hyper's parser refuses first.
fn traversal() -> Vec<Case> {
    let escapes = [
        "..",
        ".",
        "%2e%2e",
        "%2E%2E",
        "%2e%2E",
        ".%2e",
        "%2e.",
        "%252e%252e",
        "..%2f",
        "..%2F",
        "..%5c",
        "..%5C",
        "%2e%2e%2f",
        "%2e%2e%5c",
        "..;",
        "..;x",
        ".%00.",
        "%c0%ae%c0%ae",
        "%e0%80%ae",
        "%2f",
        "%2F",
        "%5c",
        "%5C",
        "%252f",
        "%25",
        "a%2fb",
        "a%5cb",
        "%00",
        "%0a",
        "%0d%0a",
        "%7f",
        "%ff",
        "%c3",
        ".hidden",
        "...",
        // IIS `%uNNNN` (http.sys with PercentUAllowed), bare `%`, `%` with one digit, mixed.
        "%u002e%u002e",
        "%U002E%U002E",
        "%u002E.",
        ".%u002e",
        "%u2215",
        "%u005c",
        "%u0041",
        "%",
        "%2",
        "%g0",
        "a%",
        "%%32%65",
        "%2e%u002e",
        "%u002e%2e%2f",
        "%%",
    ];
    let targets = [
        "XRMServices/2011/Organization.svc",
        "api/discovery",
        "main.aspx",
        "",
        "accounts",
    ];
    let mut out = Vec::new();
    for e in escapes {
        for (i, t) in targets.iter().enumerate() {
            let v = ["v9.0", "v9.1", "v9.2", "v9.2", "v9.2"][i];
            let path = if i == 4 {
                format!("/api/data/{v}/{t}/{e}")
            } else {
                format!("/api/data/{v}/{e}/{e}/{t}")
            };
            out.push(case(format!("traversal {path}"), get(&path), BAD_PATH));
        }
    }
    // A raw backslash (read as `/` by IIS and browsers).
    for path in ["/api/data/v9.2/..\\..\\XRMServices", "/api/data/v9.2/a\\b"] {
        out.push(case(format!("backslash {path}"), get(path), BAD_PATH));
    }
    out
}

/// Queries with escapes that are not RFC 3986.
fn queries() -> Vec<Case> {
    [
        "$filter=name%20eq%20%u0027x%u0027",
        "$filter=contains(name,'50%')",
        "$top=%",
        "$select=name%2",
        "$select=%zzname",
        "$filter=%U0041",
        "a=%%41",
        "$skiptoken=%g1",
    ]
    .into_iter()
    .map(|q| {
        let target = format!("/api/data/v9.2/accounts?{q}");
        case(format!("query {target}"), get(&target), BAD_PATH)
    })
    .collect()
}

/// Outside the Web API: 404, in mixed case and other versions.
fn outside() -> Vec<Case> {
    [
        "/",
        "/XRMServices/2011/Organization.svc",
        "/api",
        "/api/data",
        "/API/DATA/v9.2/accounts",
        "/Api/Data/V9.2/accounts",
        "/api/data/v8.2/accounts",
        "/api/data/v9.3/accounts",
        "/api/data/v10.0/accounts",
        "/api/data/v9.2x/accounts",
        "/api/search/v1.0/query",
        "/main.aspx",
        "/.well-known/openid-configuration",
        "/tools/diagnostics",
        "/default/../api/data/v9.2/accounts",
        "/nosuchorg/api/data/v9.2/accounts",
    ]
    .into_iter()
    .map(|p| case(format!("outside {p}"), get(p), NOT_FOUND))
    .collect()
}

/// Methods outside the Web API: 405 before routing, on any path.
fn methods() -> Vec<Case> {
    let methods = [
        "PROPFIND",
        "PROPPATCH",
        "MKCOL",
        "COPY",
        "MOVE",
        "LOCK",
        "UNLOCK",
        "M-SEARCH",
        "SEARCH",
        "MERGE",
        "PURGE",
        "OPTIONS",
        "TRACE",
        "REPORT",
        "BREW",
        "get",
        "Post",
        "PATCHX",
    ];
    let mut out = Vec::new();
    for m in methods {
        for path in [
            "/api/data/v9.2/accounts",
            "/XRMServices/2011/Organization.svc",
        ] {
            let raw = format!(
                "{m} {path} HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            out.push(case(format!("method {m} {path}"), raw.into_bytes(), METHOD));
        }
    }
    out.push(case(
        "authority-form CONNECT",
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n"
            .to_vec(),
        METHOD,
    ));
    out
}

/// Request-line forms, framing and header abuse.
fn framing() -> Vec<Case> {
    let absolute = proxy(400, "bad_request");
    let mut out = vec![
        case(
            "absolute-form to another host",
            get("http://evil.example/api/data/v9.2/accounts"),
            absolute,
        ),
        case(
            "absolute-form https",
            get("https://127.0.0.1:1/api/data/v9.2/accounts"),
            absolute,
        ),
        case(
            "absolute-form to the proxy",
            get("http://proxy.test/api/data/v9.2/WhoAmI"),
            absolute,
        ),
        case(
            "overlong path",
            get(&format!("/api/data/v9.2/{}", "a".repeat(5000))),
            proxy(414, "uri_too_long"),
        ),
        case(
            // Over 65,536 characters with the org's origin in front (what
            // not even $batch takes), and still under the 65,534 that the
            // `http` crate parses: the proxy's own 414. Shorter long GETs
            // go as $batch (long_get.rs).
            "overlong query",
            get(&format!(
                "/api/data/v9.2/accounts?$filter={}",
                "x".repeat(65_495)
            )),
            proxy(414, "uri_too_long"),
        ),
    ];
    let raw: [(&str, &[u8], Expect); 12] = [
        ("two TE headers", b"POST /api/data/v9.2/accounts HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n", proxy(400, "bad_request")),
        ("two CLs", b"POST /api/data/v9.2/accounts HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello", parser(400)),
        ("negative CL", b"POST /api/data/v9.2/accounts HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\nConnection: close\r\n\r\n", parser(400)),
        ("CL with sign", b"POST /api/data/v9.2/accounts HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\nConnection: close\r\n\r\nhello", parser(400)),
        ("TE not chunked", b"POST /api/data/v9.2/accounts HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n", parser(400)),
        ("CR in header", b"GET /api/data/v9.2/WhoAmI HTTP/1.1\r\nHost: x\r\nX-A: b\rX-Injected: c\r\nConnection: close\r\n\r\n", parser(400)),
        ("LF in header", b"GET /api/data/v9.2/WhoAmI HTTP/1.1\r\nHost: x\r\nX-A: b\nX-Injected : c\r\nConnection: close\r\n\r\n", parser(400)),
        ("space before colon", b"GET /api/data/v9.2/WhoAmI HTTP/1.1\r\nHost: x\r\nX-A : b\r\nConnection: close\r\n\r\n", parser(400)),
        ("NUL in path", b"GET /api/data/v9.2/Who\x00AmI HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", parser(400)),
        ("space in path", b"GET /api/data/v9.2/Who AmI HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", parser(400)),
        ("bad version", b"GET /api/data/v9.2/WhoAmI HTTP/9.9\r\nHost: x\r\nConnection: close\r\n\r\n", parser(400)),
        ("bad method", b"G(T /api/data/v9.2/WhoAmI HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", parser(400)),
    ];
    for (name, raw, expect) in raw {
        out.push(case(name, raw.to_vec(), expect));
    }
    out.push(case(
        "huge header",
        format!("GET /api/data/v9.2/WhoAmI HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(70_000)).into_bytes(),
        proxy(431, "headers_too_large"),
    ));
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    out.push(case(
        "150 headers",
        format!("GET /api/data/v9.2/WhoAmI HTTP/1.1\r\nHost: x\r\n{many}Connection: close\r\n\r\n")
            .into_bytes(),
        parser(431),
    ));
    out.push(case(
        "body too large",
        b"POST /api/data/v9.2/accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000000\r\nConnection: close\r\n\r\n{".to_vec(),
        proxy(413, "body_too_large"),
    ));
    out
}

/// `$batch` bodies the strict reader refuses (the org's policy restricts,
/// so nothing it cannot read exactly is forwarded).
fn batches() -> Vec<Case> {
    let part = |op: &str| format!("--b\r\nContent-Type: application/http\r\n\r\n{op}\r\n\r\n\r\n");
    let ok_get = part("GET /api/data/v9.2/accounts HTTP/1.1");
    let bodies: Vec<(&str, String)> = vec![
        ("LF-only lines", "--b\nContent-Type: application/http\n\nGET /api/data/v9.2/accounts HTTP/1.1\n\n\n--b--\n".into()),
        ("boundary in another case", format!("{ok_get}--B\r\nContent-Type: application/http\r\n\r\nDELETE /api/data/v9.2/accounts(1) HTTP/1.1\r\n\r\n\r\n--b--\r\n")),
        ("boundary mid-line", "--b\r\nContent-Type: application/http\r\n\r\nPOST /api/data/v9.2/tasks HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{\"a\":\"x --b y\"}\r\n--b--\r\n".to_owned()),
        ("LF before a delimiter", "--b\r\nContent-Type: application/http\r\n\r\nPOST /api/data/v9.2/tasks HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{}\n--b\r\nContent-Type: application/http\r\n\r\nDELETE /api/data/v9.2/accounts(1) HTTP/1.1\r\n\r\n\r\n--b--\r\n".to_owned()),
        ("nested change set", "--b\r\nContent-Type: multipart/mixed; boundary=cs\r\n\r\n--cs\r\nContent-Type: multipart/mixed; boundary=inner\r\n\r\n--inner\r\nContent-Type: application/http\r\n\r\nDELETE /api/data/v9.2/accounts(1) HTTP/1.1\r\n\r\n\r\n--inner--\r\n--cs--\r\n--b--\r\n".into()),
        ("missing part Content-Type", "--b\r\nContent-Transfer-Encoding: binary\r\n\r\nGET /api/data/v9.2/accounts HTTP/1.1\r\n\r\n\r\n--b--\r\n".into()),
        ("lower-case method", format!("{}--b--\r\n", part("delete /api/data/v9.2/accounts(1) HTTP/1.1"))),
        ("extra spaces", format!("{}--b--\r\n", part("GET  /api/data/v9.2/accounts HTTP/1.1"))),
        ("HTTP/1.0 operation", format!("{}--b--\r\n", part("GET /api/data/v9.2/accounts HTTP/1.0"))),
        ("part outside /api/data", format!("{}--b--\r\n", part("GET /XRMServices/2011/Organization.svc HTTP/1.1"))),
        ("part traversal", format!("{}--b--\r\n", part("GET /api/data/v9.2/%2e%2e/%2e%2e/XRMServices HTTP/1.1"))),
        ("part %u traversal", format!("{}--b--\r\n", part("GET /api/data/v9.2/%u002e%u002e/x HTTP/1.1"))),
        ("absolute URL to another host", format!("{}--b--\r\n", part("GET https://evil.example/api/data/v9.2/accounts HTTP/1.1"))),
        ("absolute URL to another version", format!("{}--b--\r\n", part("GET /api/data/v8.2/accounts HTTP/1.1"))),
        ("batch in a batch", format!("{}--b--\r\n", part("POST /api/data/v9.2/$batch HTTP/1.1"))),
        ("GET with a body", "--b\r\nContent-Type: application/http\r\n\r\nGET /api/data/v9.2/accounts HTTP/1.1\r\n\r\nDELETE /api/data/v9.2/accounts(1) HTTP/1.1\r\n--b--\r\n".to_owned()),
        ("no close delimiter", ok_get.clone()),
        ("text after close", format!("{ok_get}--b--\r\nepilogue\r\n")),
        ("undefined $1", format!("{}--b--\r\n", part("DELETE $1 HTTP/1.1"))),
        ("1,001 operations", format!("{}--b--\r\n", ok_get.repeat(1001))),
    ];
    bodies
        .into_iter()
        .map(|(name, body)| {
            let raw = format!(
                "POST /api/data/v9.2/$batch HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/mixed; boundary=b\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            case(format!("batch: {name}"), raw.into_bytes(), BAD_BATCH)
        })
        .collect()
}

fn cases() -> Vec<Case> {
    [
        traversal(),
        queries(),
        outside(),
        methods(),
        framing(),
        batches(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The status, the proxy's error code and the `Allow` header of an answer.
struct Answer {
    status: Option<u16>,
    code: Option<String>,
    allow: Option<String>,
}

async fn send(addr: &str, raw: &[u8]) -> Answer {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // Writing may fail once the proxy has answered and closed (huge headers).
    let _ = s.write_all(raw).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            })
            .map(|(_, v)| v.trim().to_owned())
    };
    Answer {
        status: text
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok()),
        code: header("x-dataverse-proxy-error"),
        allow: header("allow"),
    }
}

fn check(case: &Case, answer: &Answer) -> Option<String> {
    let e = case.expect;
    if answer.status != Some(e.status) || answer.code.as_deref() != e.code {
        return Some(format!(
            "{}: got {:?} {:?}, expected {} {:?}",
            case.name, answer.status, answer.code, e.status, e.code
        ));
    }
    if e == METHOD && answer.allow.as_deref() != Some("GET, HEAD, POST, PATCH, PUT, DELETE") {
        return Some(format!("{}: Allow header {:?}", case.name, answer.allow));
    }
    None
}

/// The proxy the rows are sent to: a 1 MiB body limit and a denied table.
async fn hostile_proxy() -> Harness {
    let setup = Setup::default()
        .set("limits.max_body", "1MiB")
        .set("org.policy.deny", "systemusers");
    let h = Harness::with(setup).await;
    h.wait_ready().await;
    // The table list needs the org's tables: read once, before the rows.
    assert_eq!(h.get("/accounts?$top=1").await.status(), 200);
    h
}

#[tokio::test]
async fn three_hundred_hostile_requests_each_get_their_status_and_never_reach_dataverse() {
    let h = hostile_proxy().await;
    let warm = h.sim.seen().len();
    let addr = h.proxy.trim_start_matches("http://").to_owned();
    let cases = cases();
    assert!(cases.len() >= 300, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let before = h.sim.seen().len();
        let answer = send(&addr, &case.raw).await;
        if h.sim.seen().len() != before {
            failures.push(format!("{}: reached Dataverse", case.name));
        }
        failures.extend(check(case, &answer));
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert_eq!(h.sim.seen().len(), warm, "no row reached Dataverse");
    // Still serving.
    assert_eq!(h.get("/WhoAmI").await.status(), 200);
    h.stop().await;
}

/// Content-Length with Transfer-Encoding: hyper resolves it as RFC 9112
/// §6.1 allows (Transfer-Encoding wins, Content-Length is removed) before
/// the proxy sees the request, so the proxy cannot refuse it; what matters
/// is that it reaches Dataverse with one unambiguous framing.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_forwarded_with_one_framing() {
    let h = Harness::start().await;
    h.wait_ready().await;
    let addr = h.proxy.trim_start_matches("http://").to_owned();
    let raw = b"POST /api/data/v9.2/accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nf\r\n{\"name\":\"smug\"}\r\n0\r\n\r\n";
    let answer = send(&addr, raw).await;
    assert_eq!(answer.status, Some(204));
    let seen = h.sim.seen();
    assert_eq!(seen.len(), 1);
    let te = seen[0].headers.get("transfer-encoding").is_some();
    let cl = seen[0].headers.get("content-length").is_some();
    assert!(
        te ^ cl,
        "exactly one framing reached Dataverse: {:?}",
        seen[0].headers
    );
    h.stop().await;
}

/// A caller that stops sending its body gets 408, with the connection closed.
#[tokio::test]
async fn a_stalled_upload_is_a_408() {
    let h = Harness::with(Setup::default().set("limits.body_idle_timeout", "300ms")).await;
    h.wait_ready().await;
    let addr = h.proxy.trim_start_matches("http://").to_owned();
    // Larger than the replay buffer would be buffered; both paths time out.
    for len in [100usize, 5_000_000] {
        let raw = format!(
            "POST /api/data/v9.2/accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n0123456789"
        );
        let answer = send(&addr, raw.as_bytes()).await;
        assert_eq!(answer.status, Some(408), "body of {len} bytes");
        assert_eq!(answer.code.as_deref(), Some("request_timeout"));
    }
    h.stop().await;
}

/// A chunked body the caller framed wrongly is the caller's fault: 400
/// `bad_request_body`, counted as a proxy-made 4xx, and Dataverse never
/// gets the request whole (the upstream request is aborted, not ended).
#[tokio::test]
async fn a_broken_chunked_body_is_the_callers_400_and_never_completes_upstream() {
    let h = Harness::start().await;
    h.wait_ready().await;
    let addr = h.proxy.trim_start_matches("http://").to_owned();
    let accounts = || async {
        let body: serde_json::Value = h
            .get("/accounts?$count=true")
            .await
            .json()
            .await
            .expect("json");
        body["value"].as_array().map_or(0, Vec::len)
    };
    let before_rows = accounts().await;
    let first = "f\r\n{\"name\":\"smug\"}\r\n";
    let broken: [(&str, String); 7] = [
        (
            "overflowing chunk size",
            format!("{first}fffffffffffffffff1\r\nx\r\n0\r\n\r\n"),
        ),
        (
            "negative chunk size",
            format!("{first}-5\r\nhello\r\n0\r\n\r\n"),
        ),
        ("LF-only chunk line", format!("{first}5\nhello\n0\n\n")),
        (
            "raw CR in a chunk extension",
            format!("{first}5;ext\rx\r\nhello\r\n0\r\n\r\n"),
        ),
        ("not hex", format!("{first}zz\r\nhello\r\n0\r\n\r\n")),
        (
            "no CRLF after the chunk data",
            format!("{first}5\r\nhelloXX0\r\n\r\n"),
        ),
        (
            "chunk longer than its size",
            format!("{first}2\r\nhello\r\n0\r\n\r\n"),
        ),
    ];
    for (name, chunks) in &broken {
        let seen_before = h.sim.seen().len();
        let broken_before = h.sim.broken_bodies();
        let raw = format!(
            "POST /api/data/v9.2/accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{chunks}"
        );
        let answer = send(&addr, raw.as_bytes()).await;
        assert_eq!(answer.status, Some(400), "{name}");
        assert_eq!(answer.code.as_deref(), Some("bad_request_body"), "{name}");
        // Dataverse saw nothing, or saw the head and a body that broke off.
        let reached = h.sim.seen().len() - seen_before;
        let aborted = h.sim.broken_bodies() - broken_before;
        assert!(
            reached == 0 || aborted == 1,
            "{name}: reached {reached}, aborted {aborted}"
        );
    }
    assert_eq!(
        accounts().await,
        before_rows,
        "no broken request created a row"
    );
    let metrics = h.metrics().await;
    let client_errors = metrics
        .lines()
        .find(|l| {
            l.starts_with("dataverse_proxy_requests_total{")
                && l.contains("status=\"4xx\"")
                && l.contains("source=\"proxy\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<f64>().ok());
    assert_eq!(client_errors, Some(broken.len() as f64), "{metrics}");
    h.stop().await;
}

/// A hostile row as an HTTP/2 request: method, target, headers and body,
/// or `None` where the row is about HTTP/1.1's own syntax or framing (what
/// httparse cannot read, chunked bodies, `Connection` games, conflicting
/// lengths), which HTTP/2 cannot express.
fn as_h2(raw: &[u8]) -> Option<http::Request<http_body_util::Full<bytes::Bytes>>> {
    let mut headers = [httparse::EMPTY_HEADER; 200];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(head_len) = req.parse(raw).ok()? else {
        return None;
    };
    let target = req.path?;
    if !target.starts_with('/') {
        return None;
    }
    let mut builder = http::Request::builder()
        .method(http::Method::from_bytes(req.method?.as_bytes()).ok()?)
        .uri(http::Uri::try_from(format!("http://proxy.test{target}")).ok()?)
        .version(http::Version::HTTP_2);
    let mut lengths = 0;
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        match name.as_str() {
            "host" | "connection" => continue,
            "transfer-encoding" | "te" | "upgrade" | "keep-alive" | "proxy-connection" => {
                return None;
            }
            "content-length" => lengths += 1,
            _ => {}
        }
        builder = builder.header(
            http::HeaderName::from_bytes(name.as_bytes()).ok()?,
            http::HeaderValue::from_bytes(h.value).ok()?,
        );
    }
    if lengths > 1 {
        return None;
    }
    let body = bytes::Bytes::copy_from_slice(&raw[head_len..]);
    builder.body(http_body_util::Full::new(body)).ok()
}

/// The same rows over HTTP/2 (h2c with prior knowledge): every row HTTP/2
/// can express gets the status and code it gets over HTTP/1.1.
#[tokio::test]
async fn the_hostile_rows_over_http2_get_the_same_answers() {
    use http_body_util::BodyExt;
    let h = hostile_proxy().await;
    let addr = h.proxy.trim_start_matches("http://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let cases = cases();
    let (mut sent, mut failures) = (0, Vec::new());
    for case in cases.iter().filter(|c| c.expect.code.is_some()) {
        let Some(req) = as_h2(&case.raw) else {
            continue;
        };
        sent += 1;
        let before = h.sim.seen().len();
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{}: {e}", case.name));
                continue;
            }
        };
        let answer = Answer {
            status: Some(resp.status().as_u16()),
            code: resp
                .headers()
                .get("x-dataverse-proxy-error")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            allow: resp
                .headers()
                .get("allow")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        };
        let _ = resp.into_body().collect().await;
        if h.sim.seen().len() != before {
            failures.push(format!("{}: reached Dataverse", case.name));
        }
        // HTTP/2's codec enforces the header-list size itself (its 431
        // carries no proxy code): the one row HTTP/2 answers a layer earlier.
        if case.expect.code == Some("headers_too_large") && answer.status == Some(431) {
            continue;
        }
        failures.extend(check(case, &answer));
    }
    assert!(sent >= 300, "only {sent} rows could be sent over HTTP/2");
    assert!(
        failures.is_empty(),
        "{} of {sent} rows wrong over HTTP/2:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(h.get("/WhoAmI").await.status(), 200);
    h.stop().await;
}
