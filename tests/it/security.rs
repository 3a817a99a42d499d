//! Access policy, `$batch` checks, impersonation, API keys, source CIDRs and
//! quotas, end to end.

use std::time::Duration;

use dataverse_proxy::callers::hash_key;
use dataverse_sim::{Sim, SimConfig};

use crate::harness::{Harness, Setup};

fn hex(bytes: [u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A proxy whose config file is `extra` plus the simulator's org and credential.
async fn with_toml(extra: &str) -> Harness {
    with_toml_top("", extra).await
}

/// `top` holds top-level keys, which TOML needs before the first table.
async fn with_toml_top(top: &str, extra: &str) -> Harness {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let h = Harness::with_file(sim, top, extra, &[]).await;
    h.wait_ready().await;
    h
}

fn batch(proxy: &str, method: &str, target: &str) -> String {
    format!(
        "--b\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nGET {proxy}/api/data/v9.2/accounts?$top=1 HTTP/1.1\r\n\r\n\r\n\
--b\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n--c\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\n\r\n\
{method} {proxy}/api/data/v9.2/{target} HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{{\"name\":\"x\"}}\r\n--c--\r\n\r\n--b--\r\n"
    )
}

async fn post_batch(h: &Harness, body: String) -> reqwest::Response {
    h.client
        .post(h.url("/$batch"))
        .header("content-type", "multipart/mixed; boundary=b")
        .body(body)
        .send()
        .await
        .expect("batch")
}

#[tokio::test]
async fn read_only_blocks_writes_directly_and_inside_batch() {
    let h = with_toml("[org.policy]\nread_only = true\n").await;
    assert_eq!(h.get("/accounts?$top=1").await.status(), 200);
    let id = h.sim.ids("accounts")[0];
    for (method, path) in [
        (reqwest::Method::POST, "/accounts".to_owned()),
        (reqwest::Method::PATCH, format!("/accounts({id})")),
        (reqwest::Method::DELETE, format!("/accounts({id})")),
    ] {
        let resp = h
            .client
            .request(method.clone(), h.url(&path))
            .json(&serde_json::json!({"name": "x"}))
            .send()
            .await
            .expect("write");
        assert_eq!(resp.status(), 403, "{method}");
        assert_eq!(resp.headers()["x-dataverse-proxy-error"], "policy_denied");
    }
    let before = h.sim.seen().len();
    let resp = post_batch(&h, batch(&h.proxy, "POST", "accounts")).await;
    assert_eq!(resp.status(), 403);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("in $batch"),
        "{body}"
    );
    assert_eq!(
        h.sim.seen().len(),
        before,
        "the batch never reached Dataverse"
    );
    // A batch of reads passes.
    let reads = "--b\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nGET accounts?$top=1 HTTP/1.1\r\n\r\n\r\n--b--\r\n".to_owned();
    assert_eq!(post_batch(&h, reads).await.status(), 200);
    h.stop().await;
}

#[tokio::test]
async fn a_denied_table_is_denied_directly_and_inside_batch() {
    let h = with_toml("[org.policy]\ndeny = [\"contacts\"]\nmetadata = false\n").await;
    assert_eq!(h.get("/accounts?$top=1").await.status(), 200);
    assert_eq!(h.get("/contacts?$top=1").await.status(), 403);
    assert_eq!(
        h.get("/Contacts?$top=1").await.status(),
        403,
        "case does not matter"
    );
    assert_eq!(h.get("/$metadata").await.status(), 403);
    let before = h.sim.seen().len();
    let resp = post_batch(&h, batch(&h.proxy, "POST", "contacts")).await;
    assert_eq!(resp.status(), 403);
    assert_eq!(h.sim.seen().len(), before);
    assert_eq!(
        post_batch(&h, batch(&h.proxy, "POST", "accounts"))
            .await
            .status(),
        200
    );
    h.stop().await;
}

#[tokio::test]
async fn impersonation_headers_reach_dataverse_only_when_allowed() {
    let allowed = "00000000-0000-0000-0000-00000000a11e";
    let h = with_toml(&format!("[org.policy]\nimpersonation = [\"{allowed}\"]\n")).await;
    for (value, expect) in [
        (allowed, true),
        ("00000000-0000-0000-0000-00000000bad0", false),
    ] {
        h.get_with(
            "/WhoAmI",
            &[("CallerObjectId", value), ("MSCRMCallerID", value)],
        )
        .await;
        let seen = h.sim.seen().pop().expect("seen");
        assert_eq!(
            seen.headers.get("callerobjectid").is_some(),
            expect,
            "{value}"
        );
        assert_eq!(
            seen.headers.get("mscrmcallerid").is_some(),
            expect,
            "{value}"
        );
    }
    h.stop().await;
    // The default drops them.
    let h = Harness::start().await;
    h.get_with("/WhoAmI", &[("CallerObjectId", allowed)]).await;
    assert!(
        h.sim
            .seen()
            .pop()
            .expect("seen")
            .headers
            .get("callerobjectid")
            .is_none()
    );
    h.stop().await;
}

#[tokio::test]
async fn api_keys_name_callers_and_unknown_keys_are_401() {
    let key = "reporting-key-0123456789";
    let h = with_toml(&format!(
        "[[callers]]\nname = \"reporting\"\napi_key_sha256 = \"{}\"\nread_only = true\n\n[[callers]]\nname = \"etl\"\napi_key_sha256 = \"{}\"\nrequests_per_second = 2\n",
        hex(hash_key(key)),
        hex(hash_key("etl-key")),
    ))
    .await;
    let resp = h.get("/WhoAmI").await;
    assert_eq!(resp.status(), 401, "no key");
    assert_eq!(resp.headers()["x-dataverse-proxy-error"], "unauthorized");
    let resp = h.get_with("/WhoAmI", &[("x-api-key", "wrong")]).await;
    assert_eq!(resp.status(), 401);
    let resp = h.get_with("/WhoAmI", &[("x-api-key", key)]).await;
    assert_eq!(resp.status(), 200);
    let seen = h.sim.seen().pop().expect("seen");
    assert!(
        seen.headers.get("x-api-key").is_none(),
        "the key is not forwarded"
    );
    // The caller's own read-only flag.
    let resp = h
        .send(
            reqwest::Method::POST,
            "/accounts",
            &[("x-api-key", key)],
            Some(&serde_json::json!({"name": "x"})),
        )
        .await;
    assert_eq!(resp.status(), 403);
    // Quota: 2 per second, then 429 with Retry-After.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = h.get_with("/WhoAmI", &[("x-api-key", "etl-key")]).await;
        statuses.push((
            r.status().as_u16(),
            r.headers().get("retry-after").is_some(),
        ));
    }
    assert_eq!(statuses[..2], [(200, false), (200, false)]);
    assert!(
        statuses[2..].iter().all(|s| *s == (429, true)),
        "{statuses:?}"
    );
    // Callers are named in the metrics.
    let m = h.metrics().await;
    assert!(m.contains("caller=\"reporting\""), "{m}");
    assert!(m.contains("caller=\"etl\""), "{m}");
    h.stop().await;
}

#[tokio::test]
async fn source_cidrs_and_forwarded_for_from_trusted_proxies() {
    // Only 10.0.0.0/8 may call; the ingress (127.0.0.1) is trusted.
    let h = with_toml_top(
        "trusted_proxies = [\"127.0.0.1\"]",
        "[access]\nallow_cidrs = [\"10.0.0.0/8\"]\n",
    )
    .await;
    assert_eq!(
        h.get("/WhoAmI").await.status(),
        403,
        "loopback itself is not allowed"
    );
    let ok = h
        .get_with("/WhoAmI", &[("x-forwarded-for", "10.1.2.3")])
        .await;
    assert_eq!(ok.status(), 200);
    let spoofed = h
        .get_with("/WhoAmI", &[("x-forwarded-for", "10.9.9.9, 192.0.2.1")])
        .await;
    assert_eq!(
        spoofed.status(),
        403,
        "the hop the ingress saw is 192.0.2.1"
    );
    h.stop().await;
    // Untrusted peers' X-Forwarded-For is ignored.
    let h = with_toml("[access]\nallow_cidrs = [\"10.0.0.0/8\"]\n").await;
    let r = h
        .get_with("/WhoAmI", &[("x-forwarded-for", "10.1.2.3")])
        .await;
    assert_eq!(r.status(), 403);
    tokio::time::sleep(Duration::from_millis(1)).await;
    h.stop().await;
}

const PRIVILEGED: [(&str, &str); 3] = [
    ("MSCRM.BypassCustomPluginExecution", "true"),
    (
        "mscrm.BYPASSBUSINESSLOGICEXECUTION",
        "CustomSync,CustomAsync",
    ),
    ("MSCRM.SuppressCallbackRegistrationExpanderJob", "true"),
];

async fn whoami_with_privileged(h: &Harness, key: Option<&str>) -> dataverse_sim::SeenRequest {
    let mut req = h
        .client
        .get(h.url("/WhoAmI"))
        .header("cookie", "ARRAffinity=pinned; ReqClientId=1");
    for (name, value) in PRIVILEGED {
        req = req.header(name, value);
    }
    if let Some(key) = key {
        req = req.header("x-api-key", key);
    }
    let resp = req.send().await.expect("get");
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers().get("set-cookie").is_none(),
        "Dataverse's cookies stop at the proxy"
    );
    h.sim.seen().pop().expect("seen")
}

fn privileged_seen(seen: &dataverse_sim::SeenRequest) -> Vec<&str> {
    seen.headers
        .keys()
        .map(|k| k.as_str())
        .filter(|k| k.starts_with("mscrm.bypass") || k.starts_with("mscrm.suppresscallback"))
        .collect()
}

#[tokio::test]
async fn privileged_headers_and_cookies_never_cross_unless_allowed() {
    // Default: dropped in any letter case; cookies dropped both ways.
    let h = Harness::start().await;
    h.wait_ready().await;
    let seen = whoami_with_privileged(&h, None).await;
    assert!(privileged_seen(&seen).is_empty(), "{:?}", seen.headers);
    assert!(seen.headers.get("cookie").is_none());
    h.stop().await;

    // The org policy lets one through.
    let h =
        with_toml("[org.policy]\nprivileged_headers = [\"MSCRM.BypassCustomPluginExecution\"]\n")
            .await;
    let seen = whoami_with_privileged(&h, None).await;
    assert_eq!(
        privileged_seen(&seen),
        ["mscrm.bypasscustompluginexecution"]
    );
    assert!(seen.headers.get("cookie").is_none());
    h.stop().await;

    // With callers configured, the caller needs the grant too.
    let h = with_toml(&format!(
        "[org.policy]\nprivileged_headers = [\"MSCRM.BypassCustomPluginExecution\", \"MSCRM.SuppressCallbackRegistrationExpanderJob\"]\n\n\
         [[callers]]\nname = \"importer\"\napi_key_sha256 = \"{}\"\nprivileged_headers = [\"MSCRM.BypassCustomPluginExecution\"]\n\n\
         [[callers]]\nname = \"app\"\napi_key_sha256 = \"{}\"\n",
        hex(hash_key("importer-key")),
        hex(hash_key("app-key")),
    ))
    .await;
    let seen = whoami_with_privileged(&h, Some("importer-key")).await;
    assert_eq!(
        privileged_seen(&seen),
        ["mscrm.bypasscustompluginexecution"]
    );
    let seen = whoami_with_privileged(&h, Some("app-key")).await;
    assert!(privileged_seen(&seen).is_empty(), "{:?}", seen.headers);
    h.stop().await;
}

#[tokio::test]
async fn batch_parts_lose_privileged_identity_and_cookie_headers() {
    let h = Harness::start().await;
    h.wait_ready().await;
    let body = "--b\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-Length: 400\r\n\r\n\
        POST /api/data/v9.2/accounts HTTP/1.1\r\nContent-Type: application/json\r\nmscrm.bypasscustompluginexecution: true\r\n\
        MSCRM.BypassBusinessLogicExecution: CustomSync\r\nMSCRM.SuppressCallbackRegistrationExpanderJob: true\r\n\
        CallerObjectId: 00000000-0000-0000-0000-0000000000aa\r\nCookie: ARRAffinity=pinned\r\n\r\n{\"name\":\"from batch\"}\r\n--b--\r\n";
    let resp = post_batch(&h, body.to_owned()).await;
    assert_eq!(resp.status(), 200);
    let answer = resp.text().await.expect("text");
    assert!(
        answer.contains("204 No Content"),
        "the operation ran: {answer}"
    );
    let received =
        String::from_utf8(h.sim.last_batch_body().expect("a batch").to_vec()).expect("utf8");
    let lower = received.to_ascii_lowercase();
    for gone in [
        "mscrm.bypass",
        "mscrm.suppresscallback",
        "callerobjectid",
        "cookie",
        "content-length",
    ] {
        assert!(
            !lower.contains(gone),
            "{gone} reached Dataverse: {received}"
        );
    }
    assert!(received.contains("{\"name\":\"from batch\"}"));
    h.stop().await;
}

#[tokio::test]
async fn errors_name_the_request_id_and_keep_internal_detail_in_the_log() {
    // An org nobody listens on: the connect error names 127.0.0.1 and a port.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("http://{}", dead.local_addr().expect("addr"));
    drop(dead);
    let h = Harness::with(Setup {
        org_url: Some(dead_url.clone()),
        ..Setup::default()
    })
    .await;
    h.wait_ready().await;
    let resp = h.get_with("/WhoAmI", &[("x-request-id", "req-1234")]).await;
    assert_eq!(resp.status(), 502);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "upstream_unavailable");
    assert_eq!(body["error"]["innererror"]["requestid"], "req-1234");
    let message = body["error"]["message"].as_str().expect("message");
    let port = dead_url.rsplit(':').next().expect("port");
    for detail in ["127.0.0.1", port, "tcp", "connect", "os error"] {
        assert!(
            !message.to_ascii_lowercase().contains(detail),
            "{detail} in {message:?}"
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn caller_request_ids_are_checked_and_never_break_the_status_page() {
    let h = crate::harness::Harness::start().await;
    h.wait_ready().await;
    let id_of = |resp: &reqwest::Response| {
        resp.headers()["x-request-id"]
            .to_str()
            .expect("ascii")
            .to_owned()
    };
    // Printable and short: kept.
    let kept = h
        .get_with("/WhoAmI", &[("x-request-id", "job-42/step.7")])
        .await;
    assert_eq!(id_of(&kept), "job-42/step.7");
    // Too long, or with spaces: replaced by a new id.
    let long = "a".repeat(129);
    for bad in [long.as_str(), "two words", "tab\there"] {
        let resp = h.get_with("/WhoAmI", &[("x-request-id", bad)]).await;
        let id = id_of(&resp);
        assert_ne!(id, bad);
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    }
    // A hostile but printable id on a proxy error ends up in the page's data…
    let hostile = "<!--<script>";
    let resp = h
        .client
        .get(format!("{}/nowhere", h.proxy))
        .header("x-request-id", hostile)
        .send()
        .await
        .expect("404");
    assert_eq!(resp.status(), 404);
    // …escaped, so it cannot open a comment or a script inside the page.
    let page = h.admin_get("/").await.text().await.expect("page");
    assert!(!page.contains(hostile), "the id is inlined raw");
    assert!(
        page.contains("\\u003c!--\\u003cscript\\u003e"),
        "the id is there, escaped"
    );
    h.stop().await;
}

/// Once a caller rule exists, an address no rule names gets nothing, not
/// more than the named read-only subnet; a catch-all rule admits the rest
/// on purpose, with the rights it says.
#[tokio::test]
async fn unknown_addresses_get_no_more_than_named_ones() {
    let reporting =
        "[[callers]]\nname = \"reporting\"\ncidrs = [\"10.1.0.0/16\"]\nread_only = true\n";
    let h = with_toml_top("trusted_proxies = [\"127.0.0.1\"]", reporting).await;
    let delete = async |from: &'static str| {
        h.send(
            reqwest::Method::DELETE,
            "/accounts(00000000-0000-0000-0000-000000000001)",
            &[("x-forwarded-for", from)],
            None,
        )
        .await
    };
    let named = delete("10.1.2.3").await;
    assert_eq!(named.status(), 403, "read-only");
    let unknown = delete("10.9.9.9").await;
    assert_eq!(unknown.status(), 403, "no rule: refused, never full rights");
    assert_eq!(unknown.headers()["x-dataverse-proxy-error"], "forbidden");
    let read = h
        .get_with("/WhoAmI", &[("x-forwarded-for", "10.9.9.9")])
        .await;
    assert_eq!(read.status(), 403);
    assert!(h.sim.seen().is_empty(), "nothing reached Dataverse");
    let ok = h
        .get_with("/WhoAmI", &[("x-forwarded-for", "10.1.2.3")])
        .await;
    assert_eq!(ok.status(), 200);
    h.stop().await;

    // A catch-all rule after it admits everyone else, read-only too.
    let everyone = format!(
        "{reporting}\n[[callers]]\nname = \"everyone\"\ncidrs = [\"0.0.0.0/0\", \"::/0\"]\nread_only = true\n"
    );
    let h = with_toml_top("trusted_proxies = [\"127.0.0.1\"]", &everyone).await;
    let read = h
        .get_with("/WhoAmI", &[("x-forwarded-for", "10.9.9.9")])
        .await;
    assert_eq!(read.status(), 200);
    let write = h
        .send(
            reqwest::Method::DELETE,
            "/accounts(00000000-0000-0000-0000-000000000001)",
            &[("x-forwarded-for", "10.9.9.9")],
            None,
        )
        .await;
    assert_eq!(write.status(), 403);
    h.stop().await;
}
