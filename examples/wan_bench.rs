//! The WAN hop, measured (`bash bench/wan.sh`; results in
//! docs/benchmarks.md): bytes between the proxy and Dataverse, identity
//! against compressed; the proxy's CPU per MB to decode, rewrite and encode
//! again; and what a user waits for over a constrained link: paging through
//! 10,000 rows and loading `$metadata`, straight to Dataverse and through
//! the proxy, and the second `$metadata` load from the metadata cache.
//!
//! The link is emulated in user space: this kernel has no `netem` qdisc
//! (`tc qdisc add … netem` says "Specified qdisc kind is unknown"), so a
//! relay between the proxy (or a direct client) and the simulator delays
//! every chunk by the one-way latency and paces each direction to the link
//! rate, shared by all connections, with a bounded queue (TCP backpressure
//! beyond it). It does not emulate TCP slow start or loss, so the times are
//! a floor for a real link of that rate and latency. Everything is loopback.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dataverse_proxy::compression::Coding;
use dataverse_proxy::compression::stream::{decode, encode};
use dataverse_proxy::config::{Config, Sources};
use dataverse_proxy::rewrite::{RewriteBody, Rewriter};
use dataverse_sim::{ServiceLimits, Sim, SimConfig, SimHandle};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// A link: its rate in bits per second each way and its round-trip time.
#[derive(Clone, Copy)]
struct Link {
    name: &'static str,
    bits_per_second: f64,
    rtt: Duration,
}

const LINKS: [Link; 2] = [
    Link {
        name: "10 Mbit/s, 40 ms RTT (branch office VPN)",
        bits_per_second: 10e6,
        rtt: Duration::from_millis(40),
    },
    Link {
        name: "100 Mbit/s, 20 ms RTT (data centre to Azure region)",
        bits_per_second: 100e6,
        rtt: Duration::from_millis(20),
    },
];

/// One direction of the link: when it is free again, and bytes carried.
struct Direction {
    free_at: Mutex<Instant>,
    bytes: AtomicU64,
}

/// The emulated link between the proxy (or a client) and Dataverse.
struct Relay {
    link: std::sync::Mutex<Link>,
    down: Direction,
    up: Direction,
}

impl Relay {
    fn new() -> Arc<Self> {
        let direction = || Direction {
            free_at: Mutex::new(Instant::now()),
            bytes: AtomicU64::new(0),
        };
        Arc::new(Self {
            link: std::sync::Mutex::new(LINKS[0]),
            down: direction(),
            up: direction(),
        })
    }

    fn link(&self) -> Link {
        *self.link.lock().expect("link")
    }

    /// Bytes carried towards the client so far.
    fn down_bytes(&self) -> u64 {
        self.down.bytes.load(Ordering::Relaxed)
    }

    async fn serve(self: Arc<Self>, listener: TcpListener, target: std::net::SocketAddr) {
        while let Ok((client, _)) = listener.accept().await {
            let relay = self.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let up = tokio::spawn(pump(relay.clone(), cr, sw, false));
                pump(relay, sr, cw, true).await;
                up.abort();
            });
        }
    }
}

/// Carries one direction: each chunk leaves when the link has sent it
/// (paced to the rate) and arrives one-way latency later.
async fn pump(
    relay: Arc<Relay>,
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    down: bool,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Bytes)>(64);
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at.into()).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let link = relay.link();
        let direction = if down { &relay.down } else { &relay.up };
        direction.bytes.fetch_add(n as u64, Ordering::Relaxed);
        let sent = {
            let mut free = direction.free_at.lock().await;
            let start = (*free).max(Instant::now());
            *free = start + Duration::from_secs_f64(n as f64 * 8.0 / link.bits_per_second);
            *free
        };
        let chunk = Bytes::copy_from_slice(&buf[..n]);
        if tx.send((sent + link.rtt / 2, chunk)).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// A proxy in front of the relay; its base URL and stop switch.
async fn proxy(sim: &SimHandle, extra: &[(&'static str, &str)]) -> (String, CancellationToken) {
    let mut overrides = sim.proxy_overrides();
    overrides.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let config = Config::load(&Sources {
        overrides,
        ..Sources::default()
    })
    .expect("config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!(
        "http://{}/api/data/v9.2",
        listener.local_addr().expect("addr")
    );
    let stop = CancellationToken::new();
    tokio::spawn(dataverse_proxy::serve(
        config,
        listener,
        admin,
        stop.clone(),
    ));
    let client = reqwest::Client::new();
    for _ in 0..500 {
        if client
            .get(format!("{base}/WhoAmI"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (base, stop)
}

/// A Dataverse token for the direct client.
async fn token(sim: &SimHandle) -> String {
    let cfg = sim.config();
    let body: serde_json::Value = reqwest::Client::new()
        .post(sim.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &cfg.client_id),
            ("client_secret", &cfg.client_secret),
            ("scope", &format!("{}/.default", sim.org_url())),
        ])
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("token json");
    body["access_token"].as_str().expect("token").to_owned()
}

/// Who asks: straight to Dataverse with a token, or through a proxy.
struct Client {
    http: reqwest::Client,
    base: String,
    bearer: Option<String>,
    gzip: bool,
}

impl Client {
    /// GET `url` to its end: bytes received (as sent, still coded).
    async fn get(&self, url: &str, prefer: Option<&str>) -> (u16, Bytes, Option<String>) {
        let mut req = self.http.get(url);
        if let Some(b) = &self.bearer {
            req = req.bearer_auth(b);
        }
        if self.gzip {
            req = req.header("accept-encoding", "gzip");
        }
        if let Some(p) = prefer {
            req = req.header("prefer", p);
        }
        let resp = req.send().await.expect("send");
        let status = resp.status().as_u16();
        let body = resp.bytes().await.expect("body");
        let plain = if self.gzip && !body.is_empty() && body[0] == 0x1f {
            decoded(&body)
        } else {
            body
        };
        let next = serde_json::from_slice::<serde_json::Value>(&plain)
            .ok()
            .and_then(|v| v["@odata.nextLink"].as_str().map(str::to_owned));
        (status, plain, next)
    }

    /// Pages through `rows` accounts, `page` per request: elapsed time.
    async fn page_through(&self, page: usize) -> (Duration, usize) {
        let started = Instant::now();
        let mut url = format!("{}/accounts", self.base);
        let mut rows = 0;
        loop {
            let prefer = format!("odata.maxpagesize={page}");
            let (status, body, next) = self.get(&url, Some(&prefer)).await;
            assert_eq!(status, 200);
            let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
            rows += v["value"].as_array().map_or(0, Vec::len);
            match next {
                Some(n) => url = n,
                None => return (started.elapsed(), rows),
            }
        }
    }

    async fn metadata(&self) -> Duration {
        let started = Instant::now();
        let (status, body, _) = self.get(&format!("{}/$metadata", self.base), None).await;
        assert_eq!(status, 200);
        assert!(body.len() > 1 << 20);
        started.elapsed()
    }
}

fn decoded(gz: &[u8]) -> Bytes {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(gz)
        .read_to_end(&mut out)
        .expect("gzip");
    Bytes::from(out)
}

fn mb(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Rows seeded into the simulated org (besides its few own).
const ROWS: usize = 10_000;

#[tokio::main]
async fn main() {
    dataverse_proxy::install_crypto_provider();
    let relay = Relay::new();
    let relay_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let org_url = format!("http://{}", relay_listener.local_addr().expect("addr"));
    let entra = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dataverse = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target = dataverse.local_addr().expect("addr");
    let sim = Sim::start_behind(
        SimConfig::default(),
        entra,
        dataverse,
        Some(org_url.clone()),
    )
    .expect("sim");
    tokio::spawn(relay.clone().serve(relay_listener, target));
    let sim = sim.handle;
    sim.set_service_limits(ServiceLimits {
        requests: 100_000_000,
        execution: Duration::from_secs(100_000_000),
        ..ServiceLimits::default()
    });
    sim.seed_rows("accounts", ROWS);
    let bearer = token(&sim).await;
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let direct = |gzip| Client {
        http: http.clone(),
        base: format!("{org_url}/api/data/v9.2"),
        bearer: Some(bearer.clone()),
        gzip,
    };

    println!("# The WAN hop\n");
    let page = page_rows(&direct(false)).await;
    bytes_on_the_hop(&relay, &direct(false), &direct(true), page).await;
    cpu_per_mb(&direct(false), page).await;

    let (plain_proxy, stop_plain) = proxy(
        &sim,
        &[
            ("upstream.compression", "false"),
            ("metadata_cache.enabled", "false"),
        ],
    )
    .await;
    let (gzip_proxy, stop_gzip) = proxy(&sim, &[]).await;
    let through = |base: &str, gzip| Client {
        http: http.clone(),
        base: base.to_owned(),
        bearer: None,
        gzip,
    };
    for link in LINKS {
        *relay.link.lock().expect("link") = link;
        println!("\n## Over {}\n", link.name);
        println!(
            "| what | direct, identity | direct, gzip | proxy, compression off | proxy, compression on (caller identity) | proxy, compression on (caller gzip) |"
        );
        println!("|---|---|---|---|---|---|");
        let clients = [
            direct(false),
            direct(true),
            through(&plain_proxy, false),
            through(&gzip_proxy, false),
            through(&gzip_proxy, true),
        ];
        let mut row = format!("| page through {ROWS} rows, 5,000 per page |");
        for c in &clients {
            let (t, rows) = c.page_through(5000).await;
            assert!(rows >= ROWS, "{rows} rows");
            row.push_str(&format!(" {} |", secs(t)));
        }
        println!("{row}");
        let mut row = format!("| page through {ROWS} rows, {page} per page (~1 MB) |");
        for c in &clients {
            let (t, _) = c.page_through(page).await;
            row.push_str(&format!(" {} |", secs(t)));
        }
        println!("{row}");
        // Fresh proxies per link, so that a first load is a miss.
        let (fresh_proxy, stop_fresh) = proxy(&sim, &[]).await;
        let (cached_proxy, stop_cached) = proxy(&sim, &[]).await;
        let cached = through(&cached_proxy, true);
        let mut row = "| `$metadata`, first load |".to_owned();
        for c in &clients[..3] {
            row.push_str(&format!(" {} |", secs(c.metadata().await)));
        }
        let fresh = through(&fresh_proxy, false).metadata().await;
        row.push_str(&format!(
            " {} | {} |",
            secs(fresh),
            secs(cached.metadata().await)
        ));
        println!("{row}");
        let before = relay.down_bytes();
        let second = cached.metadata().await;
        let crossed = relay.down_bytes() - before;
        println!(
            "| `$metadata`, second load (proxy: from the metadata cache) | {} | {} | {} | {} | {} ({crossed} bytes crossed the link) |",
            secs(direct(false).metadata().await),
            secs(direct(true).metadata().await),
            secs(through(&plain_proxy, false).metadata().await),
            secs(through(&fresh_proxy, false).metadata().await),
            secs(second),
        );
        stop_fresh.cancel();
        stop_cached.cancel();
    }
    stop_plain.cancel();
    stop_gzip.cancel();
}

/// Rows per page for a page of about 1 MB.
async fn page_rows(client: &Client) -> usize {
    let url = format!("{}/accounts", client.base);
    let (_, body, _) = client.get(&url, Some("odata.maxpagesize=1000")).await;
    (1000 * 1_000_000 / body.len()).clamp(100, 5000)
}

async fn bytes_on_the_hop(relay: &Relay, plain: &Client, gzip: &Client, page: usize) {
    *relay.link.lock().expect("link") = Link {
        name: "unlimited",
        bits_per_second: 1e12,
        rtt: Duration::ZERO,
    };
    println!("## Bytes on the Dataverse hop (response bytes incl. headers)\n");
    println!("| answer | identity | gzip | ratio |");
    println!("|---|---|---|---|");
    let page_url = format!("{}/accounts", plain.base);
    let prefer = format!("odata.maxpagesize={page}");
    let meta_url = format!("{}/$metadata", plain.base);
    for (name, url, prefer) in [
        (
            format!("a page of {page} accounts"),
            &page_url,
            Some(prefer.as_str()),
        ),
        ("`$metadata`".to_owned(), &meta_url, None),
    ] {
        let mut sizes = [0u64; 2];
        for (i, c) in [plain, gzip].iter().enumerate() {
            let before = relay.down_bytes();
            c.get(url, prefer).await;
            sizes[i] = relay.down_bytes() - before;
        }
        println!(
            "| {name} | {} | {} | {:.1} × |",
            mb(sizes[0]),
            mb(sizes[1]),
            sizes[0] as f64 / sizes[1] as f64
        );
    }
}

/// The proxy's work on one page, in process, one core: rewriting alone
/// (identity from Dataverse), decoding + rewriting, and + encoding again.
async fn cpu_per_mb(plain: &Client, page: usize) {
    let url = format!("{}/accounts", plain.base);
    let (_, body, _) = plain
        .get(&url, Some(&format!("odata.maxpagesize={page}")))
        .await;
    let org = plain.base.trim_end_matches("/api/data/v9.2").to_owned();
    let rewriter = Rewriter::api_prefix(&[&org], "http://proxy.internal:8080").expect("rewriter");
    let gz = collect(encode(full(body.clone()), Coding::Gzip, 6)).await;
    let megabytes = body.len() as f64 / 1e6;
    println!(
        "\n## The proxy's CPU per MB of JSON (one core, in process, {page}-row page of {:.2} MB, median of 15)\n",
        megabytes
    );
    println!("| work | ms per MB | out bytes |");
    println!("|---|---|---|");
    let r = rewriter.clone();
    let b = body.clone();
    let (t, n) = timed(|| {
        let (r, b) = (r.clone(), b.clone());
        async move { collect(RewriteBody::new(full(b), Some(r))).await }
    })
    .await;
    println!(
        "| rewrite (identity from Dataverse) | {:.2} | {n} |",
        t / megabytes
    );
    let (t, n) = timed(|| {
        let (r, g) = (rewriter.clone(), gz.clone());
        async move { collect(RewriteBody::new(decode(full(g), Coding::Gzip), Some(r))).await }
    })
    .await;
    println!(
        "| gunzip + rewrite (caller identity) | {:.2} | {n} |",
        t / megabytes
    );
    for level in [1, 4, 6] {
        let (t, n) = timed(|| {
            let (r, g) = (rewriter.clone(), gz.clone());
            async move {
                let rewritten = RewriteBody::new(decode(full(g), Coding::Gzip), Some(r));
                collect(encode(rewritten, Coding::Gzip, level)).await
            }
        })
        .await;
        println!(
            "| gunzip + rewrite + gzip level {level} (caller gzip) | {:.2} | {n} |",
            t / megabytes
        );
    }
}

fn full(b: Bytes) -> http_body_util::Full<Bytes> {
    http_body_util::Full::new(b)
}

async fn collect<B>(body: B) -> Bytes
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    body.collect().await.expect("body").to_bytes()
}

/// Median milliseconds of 15 runs of `work`, and its output's size.
async fn timed<F, Fut>(work: F) -> (f64, usize)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Bytes>,
{
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..15 {
        let started = Instant::now();
        size = work().await.len();
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], size)
}
