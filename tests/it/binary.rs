//! The real binary: exit codes, the demo, `check`, and what reaches the logs.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use dataverse_sim::{DataverseFault, Sim, SimConfig};

use crate::harness::{client, sim_overrides};

const BIN: &str = env!("CARGO_BIN_EXE_dataverse-proxy");

/// A command with a clean environment (no stray AZURE_* from the machine).
pub(crate) fn command() -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(std::env::temp_dir());
    c
}

/// The environment variables that point the binary at `sim`.
pub(crate) fn sim_env(sim: &dataverse_sim::SimHandle) -> Vec<(&'static str, String)> {
    let names = [
        ("org.url", "DATAVERSE_URL"),
        ("credential.tenant_id", "AZURE_TENANT_ID"),
        ("credential.client_id", "AZURE_CLIENT_ID"),
        ("credential.client_secret", "AZURE_CLIENT_SECRET"),
        ("credential.token_url", "DATAVERSE_PROXY_TOKEN_URL"),
    ];
    sim_overrides(sim)
        .into_iter()
        .map(|(key, value)| {
            let var = names.iter().find(|(k, _)| *k == key).expect("known key").1;
            (var, value)
        })
        .collect()
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

#[test]
fn config_errors_exit_64_and_name_every_key() {
    let out = command()
        .env("DATAVERSE_URL", "http://contoso.crm.dynamics.com")
        .env("AZURE_CLIENT_SECRET", "do-not-print-me")
        .arg("serve")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`org.url` (from $DATAVERSE_URL)"), "{err}");
    assert!(err.contains("`credential.tenant_id` (not set)"), "{err}");
    assert!(err.contains("`credential.client_id` (not set)"), "{err}");
    assert!(!err.contains("do-not-print-me"), "{err}");
}

#[test]
fn a_missing_explicit_config_file_is_an_error() {
    let out = command()
        .args(["--config", "/nonexistent/dataverse-proxy.toml", "check"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/dataverse-proxy.toml"));
}

#[tokio::test]
async fn check_reports_ids_or_explains_the_entra_error() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let env = sim_env(&sim.handle);
    let ok = tokio::task::spawn_blocking({
        let env = env.clone();
        move || command().envs(env).arg("check").output().expect("run")
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(ok.status.code(), Some(0), "{text}");
    assert!(text.contains("WhoAmI: ok"), "{text}");
    assert!(text.contains("OrganizationId: "), "{text}");

    let bad = tokio::task::spawn_blocking(move || {
        command()
            .envs(env)
            .env("AZURE_CLIENT_SECRET", "the-secret-id-not-the-value")
            .arg("check")
            .output()
            .expect("run")
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{text}");
    assert!(text.contains("AADSTS7000215"), "{text}");
    assert!(text.contains("not its Secret ID"), "{text}");
    assert!(!text.contains("the-secret-id-not-the-value"), "{text}");
    sim.shutdown();
}

/// `check` tests every lane: a working one is ok, a broken one is named
/// with Entra's code, and the exit code says something failed.
#[tokio::test]
async fn check_tests_every_lane() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let (good, bad) = (
        sim.handle.add_application_user(),
        sim.handle.add_application_user(),
    );
    let lane = |name: &str, client: &str, secret: &str| {
        format!(
            "[credentials.{name}]\ntenant_id = \"{}\"\nclient_id = \"{client}\"\nclient_secret = \"{secret}\"\ntoken_url = \"{}\"\n\n",
            sim.handle.config().tenant_id,
            sim.handle.token_url()
        )
    };
    let file = std::env::temp_dir().join(format!("dvp-lanes-{}.toml", uuid::Uuid::new_v4()));
    let toml = format!(
        "[org]\nlanes = [\"default\", \"bulk-2\", \"bulk-3\"]\n\n{}{}",
        lane("bulk-2", &good.client_id, &good.secret),
        lane("bulk-3", &bad.client_id, "wrong"),
    );
    std::fs::write(&file, toml).expect("config file");
    let env = sim_env(&sim.handle);
    let out = tokio::task::spawn_blocking({
        let file = file.clone();
        move || {
            command()
                .envs(env)
                .arg("--config")
                .arg(&file)
                .arg("check")
                .output()
                .expect("run")
        }
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for name in ["lane default", "lane bulk-2", "lane bulk-3"] {
        assert!(text.contains(name), "{name}: {text}");
    }
    assert_eq!(text.matches("WhoAmI: ok").count(), 2, "{text}");
    assert!(text.contains("AADSTS7000215"), "{text}");
    assert!(!text.contains("wrong\""), "{text}");
    let _ = std::fs::remove_file(&file);
    sim.shutdown();
}

#[tokio::test]
async fn the_token_command_prints_a_token_dataverse_accepts() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let env = sim_env(&sim.handle);
    let out = tokio::task::spawn_blocking(move || {
        command().envs(env).arg("token").output().expect("run")
    })
    .await
    .expect("join");
    assert_eq!(out.status.code(), Some(0));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let resp = client()
        .get(format!("{}/api/data/v9.2/WhoAmI", sim.handle.org_url()))
        .bearer_auth(&token)
        .send()
        .await
        .expect("whoami");
    assert_eq!(resp.status(), 200);
    sim.shutdown();
}

/// The README's first command: `demo` prints curl lines that work.
#[tokio::test]
async fn demo_serves_the_simulators_leads() {
    let wanted = ["/leads?$select=subject", "Authorization: Bearer"];
    let (mut child, lines) = demo(&[], &wanted).await;
    let [leads, as_user, delegated] = lines;
    let url = leads.split('\'').nth(1).expect("quoted URL").to_owned();
    let resp = client().get(&url).send().await.expect("request");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert!(body["value"][0]["subject"].is_string(), "{body}");
    // The caller-token line: `curl -H 'Authorization: Bearer …' '<url>'`.
    let quoted: Vec<&str> = as_user.split('\'').collect();
    let (auth, whoami) = (quoted[1], quoted[3]);
    let token = auth.strip_prefix("Authorization: ").expect("header");
    let as_app: serde_json::Value = client()
        .get(whoami)
        .send()
        .await
        .expect("whoami")
        .json()
        .await
        .expect("json");
    let resp = client()
        .get(whoami)
        .header("authorization", token)
        .send()
        .await
        .expect("whoami");
    assert_eq!(resp.status(), 200);
    let as_user: serde_json::Value = resp.json().await.expect("json");
    assert!(as_user["UserId"].is_string());
    assert_ne!(
        as_user["UserId"], as_app["UserId"],
        "the token's user, not the application user"
    );
    // The on-behalf-of line: the same user, with the user's own token.
    let quoted: Vec<&str> = delegated.split('\'').collect();
    let token = quoted[1].strip_prefix("Authorization: ").expect("header");
    let resp = client()
        .get(quoted[3])
        .header("authorization", token)
        .send()
        .await
        .expect("whoami");
    assert_eq!(resp.status(), 200);
    let own: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(own["UserId"], as_user["UserId"], "the same user, own token");
    let _ = child.kill();
    let _ = child.wait();
}

/// `demo --tls`: the banner names the CA to trust, and a client that trusts
/// it pages over TLS with links that keep the https scheme.
#[tokio::test]
async fn the_tls_demo_serves_https_with_a_ca_it_names() {
    let wanted = ["REQUESTS_CA_BUNDLE=", "/leads?$select=subject"];
    let (mut child, [trust, leads]) = demo(&["--tls"], &wanted).await;
    let ca_file = trust
        .split("REQUESTS_CA_BUNDLE=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the CA file");
    let ca = std::fs::read_to_string(ca_file).expect("the CA file is written");
    let url = leads.split('\'').nth(1).expect("quoted URL").to_owned();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let base = url.split("/api/").next().expect("base").to_owned();
    let client = crate::listener::https_client_trusting(&ca, None, true);
    let body: serde_json::Value = client
        .get(format!("{base}/api/data/v9.2/accounts?$select=name"))
        .header("Prefer", "odata.maxpagesize=3")
        .send()
        .await
        .expect("https")
        .json()
        .await
        .expect("json");
    let next = body["@odata.nextLink"].as_str().expect("a next page");
    assert!(next.starts_with(&base), "{next}");
    let page = client.get(next).send().await.expect("next page over TLS");
    assert_eq!(page.status(), 200);
    let _ = child.kill();
    let _ = child.wait();
    if let Some(dir) = std::path::Path::new(ca_file).parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Runs the real binary at trace level through successes and failures and
/// checks that neither the client secret nor any token reaches its logs.
#[tokio::test]
async fn logs_never_contain_the_secret_or_a_token() {
    let sim = Sim::start(SimConfig {
        token_lifetime: Duration::from_secs(2),
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let h = sim.handle.clone();
    let proxy = Logged::start(
        &h,
        &[
            ("RUST_LOG", "trace"),
            ("DATAVERSE_PROXY_LOG_FORMAT", "json"),
        ],
    )
    .await;
    let c = client();
    let port = proxy.port;
    let base = format!("http://127.0.0.1:{port}/api/data/v9.2");
    let caller_token = "caller-supplied-token-ABC123";
    for _ in 0..3 {
        let r = c
            .get(format!("{base}/leads?$top=2"))
            .bearer_auth(caller_token)
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    c.post(format!("{base}/accounts"))
        .json(&serde_json::json!({"name": "x"}))
        .send()
        .await
        .expect("post");
    h.inject_dataverse_fault(DataverseFault {
        status: 401,
        retry_after: None,
        count: 1,
    });
    let _ = c.get(format!("{base}/WhoAmI")).send().await;
    // A failing Entra ID, then an expired token: errors are logged too.
    h.set_entra_down(true);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let r = c.get(format!("{base}/WhoAmI")).send().await.expect("get");
    assert_eq!(r.status(), 503);
    let _ = c.get(format!("http://127.0.0.1:{port}/nope")).send().await;

    // Lines are buffered for up to a second: SIGTERM writes what is left
    // before the exit, the last request's line included.
    let logs = proxy.stop();
    assert!(logs.contains("token fetch failed"), "logs were captured");

    // One access line per request, with the fields docs/logging.md lists.
    let access: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "dataverse_proxy::access")
        .collect();
    assert!(access.len() >= 7, "{} access lines", access.len());
    for field in [
        "request.id",
        "caller",
        "principal",
        "org",
        "method",
        "path",
        "status",
        "bytes_in",
        "bytes_out",
        "duration_ms",
        "upstream_ms",
        "dataverse_request_id",
        "proxy_error",
        "error",
        "outcome",
    ] {
        assert!(
            access.iter().all(|v| v.get(field).is_some()),
            "field {field} missing"
        );
    }
    assert!(
        access
            .iter()
            .all(|v| !v["path"].as_str().unwrap_or("?").contains('?')),
        "no query by default"
    );
    let leads = access
        .iter()
        .find(|v| v["path"] == "/api/data/v9.2/leads")
        .expect("a leads line");
    assert_eq!(leads["status"], 200);
    assert_eq!(leads["org"], "default");
    assert!(leads["bytes_out"].as_u64().expect("bytes") > 100);
    assert_eq!(
        leads["dataverse_request_id"].as_str().map(str::len),
        Some(36)
    );
    let unavailable = access
        .iter()
        .find(|v| v["status"] == 503)
        .expect("a 503 line");
    assert_eq!(unavailable["proxy_error"], "token_unavailable");
    let last = access.last().expect("lines");
    assert_eq!(
        (&last["path"], &last["status"]),
        (&"/nope".into(), &404.into())
    );
    assert!(
        unavailable["error"]
            .as_str()
            .expect("error")
            .contains("AADSTS50033")
    );
    assert!(logs.lines().count() > 20, "trace logging was on");

    let secret = &h.config().client_secret;
    assert!(
        !logs.contains(secret.as_str()),
        "client secret leaked into logs"
    );
    assert!(
        !logs.contains(caller_token),
        "caller token leaked into logs"
    );
    let tokens: Vec<String> = h
        .seen()
        .iter()
        .filter_map(|r| r.headers.get("authorization"))
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.trim_start_matches("Bearer ").to_owned())
        .collect();
    assert!(tokens.len() >= 4);
    for t in &tokens {
        // The JWT signature part alone must not appear either.
        let sig = t.rsplit('.').next().expect("signature");
        assert!(!logs.contains(sig), "an access token leaked into logs");
    }
    sim.shutdown();
}

/// Text lines on a pipe: no colour codes, one line per request.
#[tokio::test]
async fn text_logs_on_a_pipe_have_no_colours() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let proxy = Logged::start(&sim.handle, &[("RUST_LOG", "info")]).await;
    for _ in 0..2 {
        let url = format!("http://127.0.0.1:{}/api/data/v9.2/leads?$top=1", proxy.port);
        let r = client().get(url).send().await.expect("get");
        assert_eq!(r.status(), 200);
    }
    let logs = proxy.stop();
    assert!(!logs.contains('\x1b'), "colour codes on a pipe:\n{logs}");
    let requests: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("  INFO dataverse_proxy::access: request request.id="))
        .collect();
    assert_eq!(requests.len(), 2, "{logs}");
    assert!(
        requests[0].contains(" path=/api/data/v9.2/leads status=200 "),
        "{}",
        requests[0]
    );
    sim.shutdown();
}

/// The binary serving, its stderr in a file.
struct Logged {
    child: std::process::Child,
    port: u16,
    log_path: std::path::PathBuf,
}

impl Logged {
    async fn start(sim: &dataverse_sim::SimHandle, env: &[(&str, &str)]) -> Self {
        let (port, admin) = (free_port(), free_port());
        let log_path = std::env::temp_dir().join(format!("dvp-log-{}.txt", uuid::Uuid::new_v4()));
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut child = command()
            .envs(sim_env(sim))
            .envs(env.iter().copied())
            .env("DATAVERSE_PROXY_LISTEN", format!("127.0.0.1:{port}"))
            .env("DATAVERSE_PROXY_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("DATAVERSE_PROXY_SHUTDOWN_DELAY", "0s")
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn");
        let ready = format!("http://127.0.0.1:{admin}/readyz");
        for _ in 0..200 {
            if let Ok(r) = client().get(&ready).send().await
                && r.status() == 200
            {
                return Self {
                    child,
                    port,
                    log_path,
                };
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the proxy never became ready");
    }

    /// SIGTERM, exit 0, and everything it logged.
    fn stop(mut self) -> String {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        assert_eq!(self.child.wait().expect("wait").code(), Some(0));
        let logs = std::fs::read_to_string(&self.log_path).expect("logs");
        let _ = std::fs::remove_file(&self.log_path);
        logs
    }
}

/// `demo` with `extra` arguments on ephemeral ports, and the first `N`
/// lines of its banner that hold one of `wanted`, in order.
async fn demo<const N: usize>(
    extra: &[&str],
    wanted: &[&'static str],
) -> (std::process::Child, [String; N]) {
    let mut child = command()
        .arg("demo")
        .args(extra)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let wanted = wanted.to_vec();
    // Read the banner on a thread that keeps draining stdout afterwards.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if wanted.iter().any(|w| line.contains(w)) {
                let _ = tx.send(line);
            }
        }
    });
    let lines = tokio::task::spawn_blocking(move || {
        [(); N].map(|()| {
            rx.recv_timeout(Duration::from_secs(30))
                .expect("a banner line")
        })
    })
    .await
    .expect("join");
    (child, lines)
}
