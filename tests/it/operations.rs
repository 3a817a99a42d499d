//! Operations: metrics move, readiness follows tokens and drain, SIGTERM
//! drains a long download, request ids and access-log fields.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use dataverse_sim::{DataverseFault, Sim, SimConfig};
use sha2::{Digest, Sha256};

use crate::harness::{Harness, Setup, client};

async fn metrics(h: &Harness) -> String {
    h.metrics().await
}

/// The value of the first sample whose line starts with `prefix`.
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_move_for_requests_token_fetches_429s_and_waits() {
    let h = Harness::with(
        Setup::default()
            .set("governor.max_concurrency", "1")
            .set("governor.max_retries", "0"),
    )
    .await;
    h.wait_ready().await;
    let before = metrics(&h).await;
    assert!(
        before.contains("dataverse_proxy_build_info{version=\""),
        "{before}"
    );
    assert_eq!(
        sample(
            &before,
            "dataverse_proxy_token_fetches_total{credential=\"default\",result=\"ok\",reason=\"startup\"}"
        ),
        1.0,
        "{before}"
    );

    assert_eq!(h.get("/WhoAmI").await.status(), 200);
    h.sim.inject_dataverse_fault(DataverseFault {
        status: 429,
        retry_after: Some(1),
        count: 1,
    });
    assert_eq!(h.get("/WhoAmI").await.status(), 429);
    // While the gate is closed, the next caller waits.
    assert_eq!(h.get("/WhoAmI").await.status(), 200);
    let after = metrics(&h).await;
    let ok = "dataverse_proxy_requests_total{org=\"default\",method=\"GET\",status=\"2xx\",source=\"dataverse\",caller=\"-\"}";
    assert_eq!(sample(&after, ok), 2.0, "{after}");
    assert_eq!(
        sample(
            &after,
            "dataverse_proxy_governor_throttled_total{org=\"default\",lane=\"default\"}"
        ),
        1.0,
        "{after}"
    );
    assert!(
        sample(
            &after,
            "dataverse_proxy_governor_waits_total{org=\"default\",lane=\"default\"}"
        ) >= 1.0,
        "{after}"
    );
    assert!(
        sample(
            &after,
            "dataverse_proxy_token_expiry_seconds{org=\"default\",credential=\"default\"}"
        ) > 3000.0,
        "{after}"
    );
    assert!(
        sample(
            &after,
            "dataverse_proxy_dataverse_ratelimit_burst_remaining{org=\"default\"}"
        ) > 5000.0,
        "{after}"
    );
    assert!(
        after.contains("dataverse_proxy_upstream_duration_seconds_bucket{"),
        "{after}"
    );
    assert!(
        after.contains("dataverse_proxy_gateway_duration_seconds_count{org=\"default\"} 3"),
        "{after}"
    );
    // Three requests one after the other, the 429 read whole: one
    // connection, back in the pool after each.
    let pool = |name: &str| {
        sample(
            &after,
            &format!("dataverse_proxy_upstream_connections_{name}{{org=\"default\"}}"),
        )
    };
    assert_eq!((pool("opened_total"), pool("idle")), (1.0, 1.0), "{after}");
    assert!(
        sample(
            &after,
            "dataverse_proxy_response_bytes_total{org=\"default\"}"
        ) > 100.0,
        "{after}"
    );
    h.stop().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// SIGTERM to the real binary while a slow 64 MiB download runs: the download
/// completes, readiness is false, new connections are refused, exit code 0.
#[tokio::test]
async fn sigterm_drains_a_slow_download_then_exits_zero() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let h = sim.handle.clone();
    let id = h.ids("accounts")[0];
    let mut data = vec![0u8; 64 * 1024 * 1024];
    fastrand::Rng::with_seed(7).fill(&mut data);
    let digest = Sha256::digest(&data);
    assert!(h.put_file("accounts", id, "dvp_document", "big.bin", data.into()));

    let (port, admin) = (free_port(), free_port());
    let mut child = crate::binary::command()
        .envs(crate::binary::sim_env(&h))
        .env("DATAVERSE_PROXY_LISTEN", format!("127.0.0.1:{port}"))
        .env("DATAVERSE_PROXY_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("DATAVERSE_PROXY_SHUTDOWN_DELAY", "1s")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let c = client();
    let ready = format!("http://127.0.0.1:{admin}/readyz");
    let mut up = false;
    for _ in 0..200 {
        if c.get(&ready).send().await.is_ok_and(|r| r.status() == 200) {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(up, "proxy became ready");

    // A raw, slow reader: 64 KiB every 2 ms keeps the download going ~2 s.
    let url = format!("/api/data/v9.2/accounts({id})/dvp_document/$value");
    let download = std::thread::spawn(move || {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        write!(
            s,
            "GET {url} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .expect("write");
        let mut all = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e) => panic!("download broke: {e}"),
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        all
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Within the delay: not ready, but still serving, and each answer
    // tells a keep-alive client to take its next request elsewhere.
    let r = c
        .get(&ready)
        .send()
        .await
        .expect("admin still up while draining");
    assert_eq!(r.status(), 503);
    let served = c
        .get(format!("http://127.0.0.1:{port}/api/data/v9.2/WhoAmI"))
        .send()
        .await
        .expect("served during the delay");
    assert_eq!(served.status(), 200);
    assert_eq!(served.headers()["connection"], "close");
    // After it, the proxy port refuses new connections.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "new connections are refused once the delay is over"
    );

    let raw = tokio::task::spawn_blocking(move || download.join().expect("download thread"))
        .await
        .expect("join");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers")
        + 4;
    let head = String::from_utf8_lossy(&raw[..split]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(
        raw.len() - split,
        64 * 1024 * 1024,
        "the whole body arrived"
    );
    assert_eq!(Sha256::digest(&raw[split..])[..], digest[..]);

    let exit = tokio::task::spawn_blocking(move || child.wait().expect("wait"))
        .await
        .expect("join");
    assert_eq!(exit.code(), Some(0));
    sim.shutdown();
}

/// A minimal egress proxy: CONNECT tunnels and absolute-form forwarding;
/// records the targets it was asked for.
async fn egress_proxy() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let mut words = text.split_whitespace();
                let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let authority = if method == "CONNECT" {
                    target.to_owned()
                } else {
                    target
                        .trim_start_matches("http://")
                        .split('/')
                        .next()
                        .unwrap_or("")
                        .to_owned()
                };
                log.lock()
                    .expect("log")
                    .push(format!("{method} {authority}"));
                let Ok(mut upstream) = tokio::net::TcpStream::connect(&authority).await else {
                    return;
                };
                if method == "CONNECT" {
                    let _ = client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await;
                } else {
                    let _ = upstream.write_all(&head).await;
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (url, seen)
}

#[tokio::test]
async fn an_egress_proxy_carries_token_and_dataverse_traffic() {
    let (proxy, seen) = egress_proxy().await;
    let h = Harness::with(Setup::default().set("upstream.proxy", &proxy)).await;
    h.wait_ready().await;
    assert_eq!(h.get("/WhoAmI").await.status(), 200);
    let seen = seen.lock().expect("seen").clone();
    let entra = h.sim.entra_url().trim_start_matches("http://");
    let org = h.sim.org_url().trim_start_matches("http://");
    assert!(
        seen.iter().any(|s| s.ends_with(entra)),
        "token traffic went through the proxy: {seen:?}"
    );
    assert!(
        seen.iter().any(|s| s == &format!("CONNECT {org}")),
        "Dataverse traffic was tunnelled: {seen:?}"
    );
    h.stop().await;
}

#[test]
fn an_extra_ca_bundle_is_loaded_into_the_shared_tls_config() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cert.pem");
    assert!(dataverse_proxy::upstream::tls::client_config(Some(&path)).is_ok());
    assert!(
        dataverse_proxy::upstream::tls::client_config(Some(std::path::Path::new(
            "/nonexistent.pem"
        )))
        .is_err()
    );
}

/// SIGHUP to the real binary re-reads its config file: a table the file
/// stops denying becomes reachable; a broken file changes nothing.
#[tokio::test]
async fn sighup_reloads_the_policy_from_the_config_file() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let h = sim.handle.clone();
    let (port, admin) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("dvp-hup-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let file = dir.join("config.toml");
    let config = |deny: &str| {
        format!(
            "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n[org]\nurl = \"{}\"\n[org.policy]\ndeny = [{deny}]\n",
            h.org_url()
        )
    };
    std::fs::write(&file, config("\"leads\"")).expect("write");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dataverse-proxy"))
        .env_clear()
        .env("DATAVERSE_PROXY_CONFIG", &file)
        .env("AZURE_TENANT_ID", &h.config().tenant_id)
        .env("AZURE_CLIENT_ID", &h.config().client_id)
        .env("AZURE_CLIENT_SECRET", &h.config().client_secret)
        .env("DATAVERSE_PROXY_TOKEN_URL", h.token_url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let c = client();
    crate::harness::wait_ready(&c, &format!("http://127.0.0.1:{admin}")).await;
    let leads = format!("http://127.0.0.1:{port}/api/data/v9.2/leads");
    let status = || async { c.get(&leads).send().await.expect("get").status().as_u16() };
    assert_eq!(status().await, 403);
    let hup = |child: &std::process::Child| {
        let pid = child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .expect("kill")
                .success()
        );
    };

    std::fs::write(&file, "listen = [this is not TOML").expect("write");
    hup(&child);
    let status_page = format!("http://127.0.0.1:{admin}/status");
    let mut refused = false;
    for _ in 0..100 {
        let s: serde_json::Value = c
            .get(&status_page)
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("json");
        if !s["config"]["last_error"].is_null() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the broken file was refused");
    assert_eq!(status().await, 403, "the running rules stay");

    std::fs::write(&file, config("")).expect("write");
    hup(&child);
    let mut allowed = false;
    for _ in 0..100 {
        if status().await == 200 {
            allowed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(allowed, "the new policy applies after SIGHUP");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
