//! A rolling restart behind a real ingress drops nothing: three replicas
//! (the real binary, default `shutdown.delay`) behind haproxy in HTTP mode
//! with keep-alive to the replicas, health checks on `/readyz` every 500 ms
//! and no retries (as a non-retrying ingress or a Kubernetes Service
//! behaves); 40 callers (80 % GET, 20 % POST) while each replica in turn
//! gets SIGTERM, exits 0 and is replaced by a fresh one. Every request
//! succeeds, every POST that succeeded made exactly one row and none that
//! failed made any. A client connected straight to a draining replica is
//! served throughout its delay, each answer saying `Connection: close`.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dataverse_sim::{ServiceLimits, Sim, SimConfig, SimHandle};

use crate::binary::free_port;
use crate::harness::client;

/// One replica process and its ports.
struct Replica {
    child: Child,
    port: u16,
    admin: u16,
}

impl Replica {
    fn start(sim: &SimHandle, port: u16, admin: u16) -> Self {
        let child = crate::binary::command()
            .arg("serve")
            .envs(crate::binary::sim_env(sim))
            .env("DATAVERSE_PROXY_LISTEN", format!("127.0.0.1:{port}"))
            .env("DATAVERSE_PROXY_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn replica");
        Self { child, port, admin }
    }

    async fn ready(&self) {
        crate::harness::wait_ready(&client(), &format!("http://127.0.0.1:{}", self.admin)).await;
    }

    /// SIGTERM, then the exit code.
    async fn terminate(mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
        tokio::task::spawn_blocking(move || self.child.wait().expect("wait").code())
            .await
            .expect("join")
    }
}

/// haproxy in front of the replicas, stopped by its PID when dropped.
struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn haproxy(port: u16, replicas: &[Replica]) -> Haproxy {
    let servers: String = replicas
        .iter()
        .enumerate()
        .map(|(i, r)| {
            format!(
                "  server r{i} 127.0.0.1:{} check port {}\n",
                r.port, r.admin
            )
        })
        .collect();
    let config = format!(
        "global\n  maxconn 2000\n\ndefaults\n  mode http\n  timeout connect 2s\n  timeout client 30s\n  timeout server 10s\n  option http-keep-alive\n  retries 0\n\n\
         frontend fe\n  bind 127.0.0.1:{port}\n  default_backend replicas\n\n\
         backend replicas\n  balance roundrobin\n  option httpchk GET /readyz\n  http-check expect status 200\n  default-server inter 500ms fall 1 rise 1\n{servers}"
    );
    let dir = std::env::temp_dir().join(format!("dvp-haproxy-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("haproxy.cfg");
    std::fs::write(&file, config).expect("config");
    let bin = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("the rollout test needs Debian's haproxy package (bash tests/run.sh installs it)");
    Haproxy(
        Command::new(bin)
            .args(["-db", "-f"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn haproxy"),
    )
}

/// What the callers saw.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    failed: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
    created: std::sync::Mutex<Vec<String>>,
    posted_and_failed: std::sync::Mutex<Vec<String>>,
}

/// One caller: GETs and POSTs through `base` until `stop`.
async fn caller(n: usize, base: String, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let c = client();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        tally.sent.fetch_add(1, Ordering::Relaxed);
        let post = (n + i).is_multiple_of(5);
        let name = format!("rollout-{n}-{i}");
        let result = if post {
            c.post(format!("{base}/api/data/v9.2/accounts"))
                .json(&serde_json::json!({ "name": name }))
                .send()
                .await
        } else {
            c.get(format!("{base}/api/data/v9.2/WhoAmI")).send().await
        };
        let ok = match result {
            Ok(resp) if resp.status().is_success() => {
                let _ = resp.bytes().await;
                true
            }
            Ok(resp) => {
                let line = format!(
                    "{} {}",
                    resp.status(),
                    resp.text().await.unwrap_or_default()
                );
                tally.failures.lock().expect("lock").push(line);
                false
            }
            Err(e) => {
                tally.failures.lock().expect("lock").push(e.to_string());
                false
            }
        };
        if !ok {
            tally.failed.fetch_add(1, Ordering::Relaxed);
        }
        match (post, ok) {
            (true, true) => tally.created.lock().expect("lock").push(name),
            (true, false) => tally.posted_and_failed.lock().expect("lock").push(name),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_behind_an_ingress_drops_no_request() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    sim.handle.set_latency(Duration::from_millis(10));
    // An org with four web servers: 24,000 requests per five minutes,
    // above what the callers send, so every answer is the rollout's doing.
    sim.handle.set_service_limits(ServiceLimits {
        web_servers: 4,
        ..ServiceLimits::default()
    });
    let mut replicas: Vec<Replica> = (0..3)
        .map(|_| Replica::start(&sim.handle, free_port(), free_port()))
        .collect();
    for r in &replicas {
        r.ready().await;
    }
    let front = free_port();
    let _haproxy = haproxy(front, &replicas);
    let base = format!("http://127.0.0.1:{front}");
    let mut up = false;
    for _ in 0..100 {
        if client()
            .get(format!("{base}/api/data/v9.2/WhoAmI"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "haproxy serves");
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let callers: Vec<_> = (0..40)
        .map(|n| tokio::spawn(caller(n, base.clone(), stop.clone(), tally.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    for i in 0..3 {
        let old = replicas.remove(0);
        let (port, admin) = (old.port, old.admin);
        // A keep-alive client straight to the draining replica.
        let direct = (i == 0).then(|| tokio::spawn(direct_client(port)));
        assert_eq!(old.terminate().await, Some(0), "replica {i} exits 0");
        if let Some(d) = direct {
            let (served, closes) = d.await.expect("direct client");
            assert!(
                served > 0 && served == closes,
                "{served} served, {closes} with Connection: close"
            );
        }
        let fresh = Replica::start(&sim.handle, port, admin);
        fresh.ready().await;
        // haproxy's next check (500 ms) sees it ready.
        tokio::time::sleep(Duration::from_millis(700)).await;
        replicas.push(fresh);
    }
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.expect("caller");
    }
    let failures = tally.failures.lock().expect("lock").clone();
    let sent = tally.sent.load(Ordering::Relaxed);
    println!(
        "rolling restart: {sent} requests, {} failed",
        failures.len()
    );
    assert!(sent > 1000, "the load ran: {sent}");
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // Every POST that succeeded made exactly one row; none that failed made any.
    let names: std::collections::HashMap<String, usize> = sim
        .handle
        .ids("accounts")
        .into_iter()
        .filter_map(|id| sim.handle.row("accounts", id))
        .filter_map(|row| row["name"].as_str().map(str::to_owned))
        .fold(std::collections::HashMap::new(), |mut m, n| {
            *m.entry(n).or_default() += 1;
            m
        });
    for name in tally.created.lock().expect("lock").iter() {
        assert_eq!(names.get(name), Some(&1), "{name} created once");
    }
    for name in tally.posted_and_failed.lock().expect("lock").iter() {
        assert_eq!(names.get(name), None, "{name} failed and made no row");
    }
    for r in replicas {
        assert_eq!(r.terminate().await, Some(0));
    }
    sim.shutdown();
}

/// Requests straight to a replica on one keep-alive client for 3 s after
/// it gets SIGTERM (within its 5 s delay): each served, each answer saying
/// `Connection: close` (the client reconnects for the next).
async fn direct_client(port: u16) -> (u32, u32) {
    let c = client();
    // Let the SIGTERM arrive first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut served, mut closes) = (0, 0);
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        let resp = c
            .get(format!("http://127.0.0.1:{port}/api/data/v9.2/WhoAmI"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("served during the drain (after {served}): {e}"));
        assert_eq!(resp.status(), 200);
        served += 1;
        if resp
            .headers()
            .get("connection")
            .is_some_and(|v| v == "close")
        {
            closes += 1;
        }
        let _ = resp.bytes().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (served, closes)
}
