//! Real Dataverse clients nobody here wrote, through the proxy in front of
//! the simulator: Microsoft's Python SDK (`PowerPlatform-Dataverse-Client`)
//! and DynamicsWebApi (npm), pinned and installed under `target/clients` by
//! `tests/clients/install.sh` (which `tests/run.sh` runs). Each client runs
//! its scenarios (`tests/clients/*/scenarios.*`) and prints what it read;
//! these tests hold that against the simulator's own answer, and check
//! that every request went to the proxy and no answer named the org.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use dataverse_sim::{Sim, SimConfig};
use serde_json::Value;
use uuid::Uuid;

use crate::harness::Harness;
use crate::listener::{Ca, temp_dir, write};

/// What `tests/clients/install.sh` made, or the fix when it has not run.
fn installed(path: &str) -> PathBuf {
    let full = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/clients")
        .join(path);
    assert!(
        full.exists(),
        "{} is missing: the real-client tests need `bash tests/clients/install.sh` \
         (bash tests/run.sh runs it)",
        full.display()
    );
    full
}

/// A proxy whose callers present a token for its API (as the clients'
/// credentials do), over TLS when `tls` is set; its base URL, the CA file
/// the clients trust, and a token for them.
async fn proxy(tls: bool) -> (Harness, String, Option<String>, String) {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let cfg = sim.handle.config();
    let callers = format!(
        "\n[caller_tokens]\naudiences = [\"{}\", \"{}\"]\ntenants = [\"{}\"]\nauthority_host = \"{}\"\n\n\
         [[callers]]\nname = \"apps\"\ntoken = {{ scopes = [\"user_impersonation\"] }}\n",
        cfg.api_app_id_uri,
        cfg.api_client_id,
        cfg.tenant_id,
        sim.handle.entra_url(),
    );
    let token = sim
        .handle
        .mint_user_token(&Uuid::new_v4().to_string(), &["user_impersonation"]);
    let dir = temp_dir();
    let mut set = Vec::new();
    let mut ca_file = None;
    if tls {
        let ca = Ca::new("clients' CA");
        let (cert, key) = ca.leaf("proxy", &["localhost", "127.0.0.1"], &[]);
        set.push(("tls.cert_file", write(&dir, "tls.crt", &cert)));
        set.push(("tls.key_file", write(&dir, "tls.key", &key)));
        ca_file = Some(write(&dir, "ca.pem", &ca.pem()));
    }
    let h = Harness::with_file(sim, "", &callers, &set).await;
    h.wait_ready().await;
    let base = match tls {
        true => h.proxy.replace("http://", "https://"),
        false => h.proxy.clone(),
    };
    (h, base, ca_file, token)
}

/// Runs a client's scenarios; their lines by scenario name.
async fn run(mut command: tokio::process::Command) -> HashMap<String, Value> {
    command
        .kill_on_drop(true)
        .stderr(std::process::Stdio::inherit());
    let output = tokio::time::timeout(Duration::from_secs(180), command.output())
        .await
        .expect("the client finished within 3 minutes")
        .expect("the client ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: HashMap<String, Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| (v["scenario"].as_str().unwrap_or_default().to_owned(), v))
        .collect();
    assert!(
        output.status.success() && lines.contains_key("wire"),
        "the client failed: {}\n{stdout}",
        output.status
    );
    let failed: Vec<&Value> = lines.values().filter(|v| v["ok"] != true).collect();
    assert!(failed.is_empty(), "scenarios failed: {failed:#?}");
    lines
}

fn env(command: &mut tokio::process::Command, h: &Harness, base: &str, token: &str) {
    let org = h.sim.org_url().trim_start_matches("http://").to_owned();
    command
        .env("DVP_URL", base)
        .env("DVP_TOKEN", token)
        .env("DVP_ORG", org);
}

async fn python_sdk(h: &Harness, base: &str, ca: &str, token: &str) -> HashMap<String, Value> {
    let mut command = tokio::process::Command::new(installed("venv/bin/python"));
    command
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/python/scenarios.py"
        ))
        .env("REQUESTS_CA_BUNDLE", ca)
        .env("PYTHONWARNINGS", "ignore");
    env(&mut command, h, base, token);
    run(command).await
}

async fn dynamics_web_api(
    h: &Harness,
    base: &str,
    ca: Option<&str>,
    token: &str,
) -> HashMap<String, Value> {
    let mut command = tokio::process::Command::new("node");
    command
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/node/scenarios.mjs"
        ))
        .env("DVP_NODE_MODULES", installed("node/node_modules"));
    if let Some(ca) = ca {
        command.env("NODE_EXTRA_CA_CERTS", ca);
    }
    env(&mut command, h, base, token);
    run(command).await
}

/// Straight from the simulator (not through the proxy): every page of
/// `query`'s rows.
async fn sim_rows(h: &Harness, query: &str) -> Vec<Value> {
    let token = h.sim_token().await;
    let mut url = format!("{}/api/data/v9.2/{query}", h.sim.org_url());
    let mut rows = Vec::new();
    loop {
        let page: Value = h
            .client
            .get(&url)
            .bearer_auth(&token)
            .send()
            .await
            .expect("simulator")
            .json()
            .await
            .expect("json");
        rows.extend(page["value"].as_array().expect("rows").iter().cloned());
        match page["@odata.nextLink"].as_str() {
            Some(next) => url = next.to_owned(),
            None => return rows,
        }
    }
}

/// The simulator's own answer, read before a client writes: every table's
/// logical name, and the ids of the active accounts in its order.
struct Expected {
    tables: Vec<String>,
    active_accounts: Vec<Value>,
}

async fn expected(h: &Harness) -> Expected {
    let mut tables: Vec<String> = sim_rows(h, "EntityDefinitions?$select=LogicalName")
        .await
        .iter()
        .map(|t| t["LogicalName"].as_str().expect("name").to_owned())
        .collect();
    tables.sort();
    let active_accounts: Vec<Value> =
        sim_rows(h, "accounts?$select=accountid&$filter=statecode%20eq%200")
            .await
            .iter()
            .map(|r| r["accountid"].clone())
            .collect();
    assert!(active_accounts.len() > 7, "more than one page");
    Expected {
        tables,
        active_accounts,
    }
}

/// What every client must have seen: the tables, every page, its own
/// writes, and nothing of the org.
fn check(h: &Harness, expected: &Expected, lines: &HashMap<String, Value>) {
    let wire = &lines["wire"]["data"];
    assert!(wire["requests"].as_u64() > Some(5), "{wire}");
    assert_eq!(
        wire["outside"],
        serde_json::json!([]),
        "requests not to the proxy"
    );
    assert_eq!(
        wire["org_in_answer"],
        serde_json::json!([]),
        "the org's URL reached the client"
    );

    let tables = &lines["tables"]["data"];
    assert_eq!(tables["logical_names"], serde_json::json!(expected.tables));
    assert_eq!(tables["account"]["entity_set"], "accounts");
    assert_eq!(tables["account"]["logical_name"], "account");
    assert_eq!(tables["account"]["primary_id"], "accountid");
    assert_eq!(
        lines["paging"]["data"]["ids"],
        Value::Array(expected.active_accounts.clone())
    );

    let crud = &lines["crud"]["data"];
    assert_eq!(
        crud["read"],
        serde_json::json!({"firstname": "Ada", "lastname": "Lovelace", "jobtitle": "Analyst"})
    );
    assert_eq!(crud["gone_after_delete"], true);
    let id: Uuid = crud["id"].as_str().expect("id").parse().expect("uuid");
    assert!(h.sim.row("contacts", id).is_none(), "deleted");
}

/// The `$batch`'s change set made a contact and an account bound to it
/// (by `Content-ID` reference).
fn check_batch(h: &Harness, created: &[Value]) {
    let ids: Vec<Uuid> = created
        .iter()
        .map(|v| v.as_str().expect("id").parse().expect("uuid"))
        .collect();
    let [contact, account] = ids[..] else {
        panic!("two records made: {created:?}");
    };
    assert!(h.sim.row("contacts", contact).is_some());
    let account = h.sim.row("accounts", account).expect("the account");
    assert_eq!(account["name"], "Navy Labs");
    assert_eq!(account["_primarycontactid_value"], contact.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsofts_python_sdk_over_tls() {
    let (h, base, ca, token) = proxy(true).await;
    let expected = expected(&h).await;
    let lines = python_sdk(&h, &base, ca.as_deref().expect("ca"), &token).await;
    check(&h, &expected, &lines);
    let batch = &lines["batch"]["data"];
    assert_eq!(batch["statuses"], serde_json::json!([204, 204, 200]));
    check_batch(&h, batch["created"].as_array().expect("ids"));
    h.stop().await;
}

async fn dynamics_web_api_on(tls: bool) {
    let (h, base, ca, token) = proxy(tls).await;
    let expected = expected(&h).await;
    let lines = dynamics_web_api(&h, &base, ca.as_deref(), &token).await;
    check(&h, &expected, &lines);
    let tables = &lines["tables"]["data"];
    assert!(
        tables["account"]["attributes"]
            .as_array()
            .is_some_and(|a| a.iter().any(|n| n == "name")),
        "{tables}"
    );
    let batch = &lines["batch"]["data"];
    assert_eq!(batch["last_is_page"], true);
    check_batch(&h, batch["created"].as_array().expect("ids"));
    let changes = &lines["changes"]["data"];
    assert_eq!(changes["delta_link_through_proxy"], true);
    assert_eq!(
        changes["delta_ids"],
        serde_json::json!([changes["created"]]),
        "the delta has the one change"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamics_web_api_over_plain_http() {
    dynamics_web_api_on(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamics_web_api_over_tls() {
    dynamics_web_api_on(true).await;
}
