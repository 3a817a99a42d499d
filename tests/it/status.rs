//! The operator's view: `/status` as JSON and the status page, rendered by
//! a real headless Chromium (Debian's `chromium`; `tests/run.sh` installs it
//! where it is missing).

use std::process::Command;

use crate::harness::{Harness, Setup};

/// Chromium's rendered DOM of `url` after its scripts ran, or a failed test
/// naming the fix.
pub fn rendered_dom(url: &str) -> String {
    let dir = std::env::temp_dir().join(format!("dvp-chromium-{}", uuid::Uuid::new_v4()));
    let out = Command::new(chromium())
        .args(headless_flags(&dir))
        .args(["--virtual-time-budget=3000", "--dump-dom", url])
        .output()
        .unwrap_or_else(|e| panic!("cannot run chromium ({e}): {INSTALL}"));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 DOM")
}

const INSTALL: &str = "the status page test needs Debian's chromium package (bash tests/run.sh installs it where it is missing)";

fn chromium() -> &'static str {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| panic!("{INSTALL}"))
}

/// Headless, and quiet towards a machine without internet.
pub fn headless_flags(profile: &std::path::Path) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect()
}

#[tokio::test]
async fn the_status_page_renders_in_chromium() {
    let h = Harness::start().await;
    h.wait_ready().await;
    for _ in 0..5 {
        assert_eq!(h.get("/WhoAmI").await.status(), 200);
    }
    let url = format!("{}/", h.admin);
    let dom = tokio::task::spawn_blocking(move || rendered_dom(&url))
        .await
        .expect("chromium thread");

    assert!(
        dom.contains("class=\"org-name\">default</h2>"),
        "the org's name: {dom}"
    );
    let expiry = dom
        .split("data-field=\"token-expires\">")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .expect("a token expiry");
    assert!(expiry.contains("min"), "expires in minutes: {expiry}");
    let points: Vec<usize> = dom
        .split("data-points=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next()?.parse().ok())
        .collect();
    assert_eq!(points.len(), 3, "three charts: {dom}");
    assert!(
        points.iter().all(|n| *n >= 1),
        "charts with data points: {points:?}"
    );
    // The requests chart's line: its `points` attribute, as "x,y" pairs.
    let line = dom
        .split("data-series=\"rps\"")
        .next()
        .and_then(|before| before.rsplit("points=\"").next())
        .and_then(|rest| rest.split('"').next())
        .expect("the requests chart's line");
    let pairs: Vec<(f64, f64)> = line
        .split_whitespace()
        .filter_map(|p| {
            let (x, y) = p.split_once(',')?;
            Some((x.parse().ok()?, y.parse().ok()?))
        })
        .collect();
    assert!(!pairs.is_empty(), "the line has points: {line:?}");
    assert_eq!(pairs.len(), points[0], "one per data point");
    for secret in [h.sim.config().client_secret.as_str(), "Bearer "] {
        assert!(!dom.contains(secret), "nothing secret on the page");
    }
    h.stop().await;
}

#[tokio::test]
async fn status_json_has_the_documented_shape() {
    let h = Harness::with(Setup::default().set("org.policy.deny", "leads")).await;
    h.wait_ready().await;
    for _ in 0..3 {
        h.get("/WhoAmI").await;
    }
    // Errors of the proxy's own: one of the org (its policy), one before
    // any org (the edge).
    let refused = h.get("/leads").await;
    assert_eq!(refused.status(), 403);
    let code = refused.headers()["x-dataverse-proxy-error"]
        .to_str()
        .expect("code")
        .to_owned();
    let edge = h
        .send(reqwest::Method::OPTIONS, "/accounts", &[], None)
        .await;
    assert_eq!(edge.status(), 405);
    let resp = h.admin_get("/status").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let text = resp.text().await.expect("body");
    assert!(!text.contains(&h.sim.config().client_secret), "no secret");
    let s: serde_json::Value = serde_json::from_str(&text).expect("json");

    let number = |v: &serde_json::Value, path: &str| {
        let mut v = v;
        for key in path.split('.') {
            v = &v[key];
        }
        assert!(v.is_number(), "{path} is a number: {v}");
        v.as_f64().expect("number")
    };
    for key in ["now", "started", "config.loaded", "config.reloads"] {
        number(&s, key);
    }
    assert_eq!(s["ready"], true);
    assert_eq!(s["draining"], false);
    assert!(s["config"]["last_error"].is_null());
    let org = &s["orgs"][0];
    assert_eq!(org["name"], "default");
    assert_eq!(org["url"], h.sim.org_url());
    assert_eq!(org["token"]["valid"], true);
    assert_eq!(org["token"]["kind"], "client secret");
    assert!(number(org, "token.expires_in_s") > 60.0);
    number(org, "token.last_refresh");
    assert_eq!(number(org, "token.failures_in_a_row"), 0.0);
    for key in [
        "limit",
        "in_flight",
        "queued",
        "gate_closed_for_s",
        "throttled_5m",
        "throttled_total",
    ] {
        number(&org["governor"], key);
    }
    assert_eq!(org["governor"]["state"], "local");
    assert_eq!(org["interval_s"], 5);
    let series = org["series"].as_array().expect("series");
    let last = series.last().expect("a point");
    for key in ["t", "rps", "p50_ms", "p99_ms", "throttled"] {
        number(last, key);
    }
    assert!(number(last, "p50_ms") > 0.0, "requests were timed");
    let cache = &org["metadata_cache"];
    for key in ["hits", "misses", "revalidated", "changed", "bytes"] {
        number(cache, key);
    }
    assert!(org["callers"].is_array());
    assert_eq!(org["errors"][0]["code"], code.as_str());
    assert_eq!(org["errors"][0]["count"], 1);
    let recent = s["recent_errors"].as_array().expect("recent errors");
    assert_eq!(recent.len(), 2);
    assert_eq!(recent[0]["code"], "method_not_allowed", "newest first");
    assert_eq!(recent[0]["status"], 405);
    assert_eq!(recent[0]["org"], "-", "refused before any org");
    assert_eq!(recent[1]["code"], code.as_str());
    assert_eq!(recent[1]["org"], "default");
    assert!(
        recent[1]["request_id"]
            .as_str()
            .is_some_and(|r| !r.is_empty())
    );
    h.stop().await;
}

/// A page in the operator's browser reaching the admin listener through a
/// DNS-rebound name (a port-forward on 127.0.0.1) reads nothing: the views
/// answer only to an address, `localhost` or a name in `admin_hosts`; the
/// probes answer to any Host.
#[tokio::test]
async fn admin_views_answer_only_to_known_hosts() {
    let h = Harness::with(Setup::default().set("admin_hosts", "proxy-admin.monitoring.svc")).await;
    h.wait_ready().await;
    let port = h.admin.rsplit(':').next().expect("port").to_owned();
    let get = async |path: &str, host: &str| {
        h.client
            .get(format!("{}{path}", h.admin))
            .header("host", format!("{host}:{port}"))
            .send()
            .await
            .expect("admin")
            .status()
    };
    for path in ["/", "/status", "/metrics", "/usage"] {
        assert_eq!(get(path, "rebound.attacker.example").await, 403, "{path}");
        assert_eq!(get(path, "127.0.0.1").await, 200, "{path}");
        assert_eq!(get(path, "localhost").await, 200, "{path}");
        assert_eq!(get(path, "proxy-admin.monitoring.svc").await, 200, "{path}");
    }
    for path in ["/livez", "/readyz"] {
        assert_eq!(get(path, "rebound.attacker.example").await, 200, "{path}");
    }
    h.stop().await;
}
