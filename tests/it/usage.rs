//! Who spent the Dataverse budget: the Power Platform requests each caller
//! spent, counted as Dataverse counts them (docs/dataverse.md, "Power
//! Platform requests"), seen in `/metrics`, `/status` and `GET /usage`,
//! shared by replicas through Redis, and daily budgets that refuse a
//! caller once its share is spent.

use std::time::Duration;

use dataverse_proxy::callers::hash_key;
use dataverse_sim::{DataverseFault, Sim, SimConfig};
use serde_json::{Value, json};

use crate::harness::{Harness, client};
use crate::redis::RedisServer;
use crate::shared::Replica;
use crate::status::rendered_dom;

fn hex(bytes: [u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Two callers by API key: `orders` (its own budget) and `reports`.
fn callers(orders_budget: u64) -> String {
    format!(
        "[[callers]]\nname = \"orders\"\napi_key_sha256 = \"{}\"\ndaily_requests = {orders_budget}\n\n\
         [[callers]]\nname = \"reports\"\napi_key_sha256 = \"{}\"\n",
        hex(hash_key("orders-key")),
        hex(hash_key("reports-key")),
    )
}

async fn get(url: &str, key: &str) -> reqwest::Response {
    client()
        .get(url)
        .header("x-api-key", key)
        .send()
        .await
        .expect("request")
}

/// A `$batch` of ten operations: a change set of four creates, six reads.
fn batch_of_ten(api: &str) -> String {
    let mut body =
        String::from("--batch_U\r\nContent-Type: multipart/mixed; boundary=changeset_U\r\n\r\n");
    for i in 1..=4 {
        body.push_str(&format!(
            "--changeset_U\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: {i}\r\n\r\n\
             POST {api}/contacts HTTP/1.1\r\nContent-Type: application/json; type=entry\r\n\r\n\
             {{\"firstname\":\"Batch {i}\"}}\r\n"
        ));
    }
    body.push_str("--changeset_U--\r\n\r\n");
    for _ in 0..6 {
        body.push_str(&format!(
            "--batch_U\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
             GET {api}/accounts?$top=1 HTTP/1.1\r\nAccept: application/json\r\n\r\n"
        ));
    }
    body.push_str("--batch_U--\r\n");
    body
}

/// The counter's value for `caller` and `kind` in `metrics` (0 when absent).
fn counted(metrics: &str, caller: &str, kind: &str) -> u64 {
    let wanted = format!(
        "dataverse_proxy_power_platform_requests_total{{org=\"default\",lane=\"default\",caller=\"{caller}\",kind=\"{kind}\"}} "
    );
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&wanted))
        .map_or(0, |n| n.trim().parse().expect("a count"))
}

/// Polls `check` until it holds (counts land when an answer's body ends,
/// and reach Redis within a second).
async fn eventually<F: AsyncFn() -> bool>(what: &str, check: F) {
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never: {what}");
}

/// A day's known mix, counted by hand: three reads (3), a `$batch` of ten
/// with a change set (10), a `CreateMultiple` of 100 targets (100), the
/// metadata read three times (0, the last from the cache), a 429 (refused).
#[tokio::test]
async fn a_days_mix_is_counted_as_dataverse_counts_it() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let h = Harness::with_file(sim, "", &callers(1_000), &[]).await;
    h.wait_ready().await;
    for _ in 0..3 {
        assert_eq!(
            get(&h.url("/accounts?$top=1"), "orders-key").await.status(),
            200
        );
    }
    let batch = client()
        .post(h.url("/$batch"))
        .header("x-api-key", "orders-key")
        .header("Content-Type", "multipart/mixed; boundary=batch_U")
        .body(batch_of_ten(&format!("{}/api/data/v9.2", h.proxy)))
        .send()
        .await
        .expect("batch");
    assert_eq!(batch.status(), 200);
    let targets: Vec<Value> = (0..100)
        .map(|i| json!({"@odata.type": "Microsoft.Dynamics.CRM.account", "name": format!("Bulk {i}")}))
        .collect();
    let bulk = client()
        .post(h.url("/accounts/Microsoft.Dynamics.CRM.CreateMultiple"))
        .header("x-api-key", "reports-key")
        .json(&json!({ "Targets": targets }))
        .send()
        .await
        .expect("CreateMultiple");
    assert_eq!(bulk.status(), 200);
    for path in [
        "/$metadata",
        "/EntityDefinitions?$select=LogicalName",
        "/$metadata",
    ] {
        assert_eq!(
            get(&h.url(path), "orders-key").await.status(),
            200,
            "{path}"
        );
    }
    // Past the replay deadline: the 429 goes back to the caller (and, as
    // the last request here, its closed gate delays nothing).
    h.sim.inject_dataverse_fault(DataverseFault {
        status: 429,
        retry_after: Some(120),
        count: 1,
    });
    assert_eq!(get(&h.url("/WhoAmI"), "orders-key").await.status(), 429);

    eventually("the counts in /metrics", async || {
        let m = h.metrics().await;
        counted(&m, "orders", "executed") == 13
            && counted(&m, "orders", "refused") == 1
            && counted(&m, "reports", "executed") == 100
    })
    .await;
    let status: Value = h.admin_get("/status").await.json().await.expect("json");
    let usage = &status["orgs"][0]["usage"];
    assert_eq!(usage["executed"], 113, "{usage}");
    assert_eq!(usage["refused"], 1);
    let orders = usage["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["caller"] == "orders")
        .expect("orders' row");
    assert_eq!(orders["budget"], 1_000);
    assert_eq!(orders["lane"], "default");
    assert!(orders["dataverse_s_5m"].as_f64() > Some(0.0), "{orders}");
    assert_eq!(orders["dataverse_limit_s"], 1_200.0);

    let csv = h.admin_get("/usage").await.text().await.expect("csv");
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some(
            "Date,Caller ID,Caller Type,Environment,Lane,Proxy Caller,Executed,Refused,Dataverse Seconds"
        )
    );
    let reports = lines
        .find(|l| l.contains(",reports,"))
        .expect("a row for reports");
    let cols: Vec<&str> = reports.split(',').collect();
    assert_eq!(
        cols[1],
        h.sim.config().client_id,
        "Caller ID is the lane's application user"
    );
    assert_eq!(cols[2], "Application");
    assert_eq!(cols[3], h.sim.org_url());
    assert_eq!((cols[6], cols[7]), ("100", "0"));
    h.stop().await;
}

/// A caller over its daily budget is refused before Dataverse sees the
/// request, with Retry-After to the next UTC midnight; another caller
/// still passes.
#[tokio::test]
async fn a_caller_over_its_budget_is_refused_until_midnight_while_others_pass() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let h = Harness::with_file(sim, "", &callers(5), &[]).await;
    h.wait_ready().await;
    for _ in 0..5 {
        assert_eq!(get(&h.url("/WhoAmI"), "orders-key").await.status(), 200);
    }
    eventually("five counted", async || {
        counted(&h.metrics().await, "orders", "executed") == 5
    })
    .await;
    let seen = h.sim.seen().len();
    let refused = get(&h.url("/WhoAmI"), "orders-key").await;
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused.headers()["x-dataverse-proxy-error"],
        "caller_daily_budget_exhausted"
    );
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let to_midnight = 86_400 - now % 86_400;
    assert!(
        retry.abs_diff(to_midnight) <= 2,
        "{retry} against {to_midnight}"
    );
    let body: Value = refused.json().await.expect("json");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("daily_requests") && message.contains("00:00 UTC"),
        "{message}"
    );
    assert_eq!(h.sim.seen().len(), seen, "Dataverse never saw it");
    assert_eq!(get(&h.url("/WhoAmI"), "reports-key").await.status(), 200);
    h.stop().await;
}

/// Three replicas on one redis-server: every replica's `/status` shows the
/// exact total of all three; Redis restarted empty mid-run loses no count
/// (each replica writes its own again), and counts made while it was down
/// are added when it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_count_exactly_through_a_redis_restart() {
    let mut redis = RedisServer::start().await;
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let overrides = vec![
        ("governor.redis_url", redis.url()),
        ("governor.lease_time", "2s".to_owned()),
    ];
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Replica::start_with(&sim.handle, &overrides, Some(callers(100_000))).await);
    }
    let spend = async |n: usize| {
        for i in 0..n {
            let r = &replicas[i % 3];
            assert_eq!(get(&r.url("/WhoAmI"), "orders-key").await.status(), 200);
        }
    };
    let total = async |r: &Replica| -> u64 {
        r.status().await["orgs"][0]["usage"]["executed"]
            .as_u64()
            .unwrap_or(0)
    };
    spend(30).await;
    eventually("30 on every replica", async || {
        total(&replicas[0]).await == 30
            && total(&replicas[1]).await == 30
            && total(&replicas[2]).await == 30
    })
    .await;
    redis.stop();
    spend(9).await;
    redis.restart().await;
    spend(3).await;
    eventually("42 on every replica after the restart", async || {
        total(&replicas[0]).await == 42
            && total(&replicas[1]).await == 42
            && total(&replicas[2]).await == 42
    })
    .await;
    // A replica replaced (its last counts written as it stops) loses nothing.
    let replaced = replicas.pop().expect("a replica");
    assert_eq!(
        get(&replaced.url("/WhoAmI"), "orders-key").await.status(),
        200
    );
    replaced.stop().await;
    let fresh = Replica::start_with(&sim.handle, &overrides, Some(callers(100_000))).await;
    eventually("43 on the new replica", async || total(&fresh).await == 43).await;
    replicas.push(fresh);
    for r in replicas {
        r.stop().await;
    }
    sim.shutdown();
}

/// The status page's table of today's use, rendered by Chromium: the
/// caller's row against its budget, the org against its entitlement.
#[tokio::test]
async fn the_status_page_shows_todays_use_per_caller_in_chromium() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let extra = format!("daily_entitlement = 40\n\n{}", callers(20));
    let h = Harness::with_file(sim, "", &extra, &[]).await;
    h.wait_ready().await;
    for _ in 0..10 {
        assert_eq!(get(&h.url("/WhoAmI"), "orders-key").await.status(), 200);
    }
    eventually("ten counted", async || {
        counted(&h.metrics().await, "orders", "executed") == 10
    })
    .await;
    let url = format!("{}/", h.admin);
    let dom = tokio::task::spawn_blocking(move || rendered_dom(&url))
        .await
        .expect("chromium thread");
    let usage = dom
        .split("data-box=\"usage\"")
        .nth(1)
        .expect("the usage box");
    let today = usage
        .split("data-field=\"usage-today\">")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .expect("today's count");
    assert_eq!(today, "10 (25 %)", "10 of the entitlement of 40");
    let row = usage
        .split("<tr>")
        .find(|r| r.contains(">orders<"))
        .expect("orders' row");
    assert!(row.contains(">10<"), "10 today: {row}");
    assert!(
        row.contains(">20 (50 %)<"),
        "half of its budget of 20: {row}"
    );
    assert!(
        row.contains("/ 1200<"),
        "its Dataverse time against 1,200 s: {row}"
    );
    h.stop().await;
}

/// A reload changes a caller's budget and keeps what it spent: refused at
/// 3, allowed 3 more under a budget of 6, refused again.
#[tokio::test]
async fn a_reload_changes_budgets_and_keeps_the_counts() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let h = Harness::with_file(sim, "admin_reload = true", &callers(3), &[]).await;
    h.wait_ready().await;
    let whoami = h.url("/WhoAmI");
    for _ in 0..3 {
        assert_eq!(get(&whoami, "orders-key").await.status(), 200);
    }
    eventually("three counted", async || {
        counted(&h.metrics().await, "orders", "executed") == 3
    })
    .await;
    assert_eq!(get(&whoami, "orders-key").await.status(), 429);
    assert!(
        h.metrics().await.contains(
            "dataverse_proxy_daily_budget_warnings_total{scope=\"caller\",name=\"orders\"} 1"
        ),
        "a warning at 80 % of the budget"
    );
    let path = h.config_file.as_ref().expect("a config file");
    let text = std::fs::read_to_string(path).expect("config");
    std::fs::write(
        path,
        text.replace("daily_requests = 3", "daily_requests = 6"),
    )
    .expect("write");
    assert_eq!(crate::reload::reload(&h).await.0, 200);
    for _ in 0..3 {
        assert_eq!(get(&whoami, "orders-key").await.status(), 200);
    }
    eventually("six counted", async || {
        counted(&h.metrics().await, "orders", "executed") == 6
    })
    .await;
    assert_eq!(
        get(&whoami, "orders-key").await.status(),
        429,
        "refused at 6"
    );
    h.stop().await;
}
