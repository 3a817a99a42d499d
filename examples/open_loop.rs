//! An open-loop load: requests sent at a fixed rate whatever the answers
//! do, each one's latency counted from the moment it was due (so a stall
//! is not hidden by the load slowing down with it, as a closed loop such
//! as wrk's does). `bench/run.sh` uses it for the latency added at 5,000
//! requests/s. Debian has no wrk2, and oha would be another download;
//! this is ~100 lines on the hyper client the project already has.
//!
//! ```sh
//! cargo run --release --example open_loop -- URL RATE SECONDS CONNECTIONS [HEADER: VALUE]
//! ```
//!
//! Prints one line: `sent p50_us p99_us p999_us max_us errors late`,
//! where `late` counts requests sent more than 1 ms after they were due
//! (the load generator itself could not keep up).

use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    errors: u64,
    late: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, rate, secs, conns, rest @ ..] = args.as_slice() else {
        return Err("usage: open_loop URL RATE SECONDS CONNECTIONS [HEADER: VALUE]".into());
    };
    let uri: Uri = url.parse()?;
    let (rate, secs, conns): (f64, f64, usize) = (rate.parse()?, secs.parse()?, conns.parse()?);
    let header = match rest.first().and_then(|h| h.split_once(':')) {
        Some((n, v)) => Some((
            HeaderName::from_bytes(n.trim().as_bytes())?,
            HeaderValue::from_str(v.trim())?,
        )),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tally = runtime.block_on(run(uri, header, (rate, secs, conns)))?;
    let mut l = tally.latencies_us;
    l.sort_unstable();
    let q = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{} {} {} {} {} {} {}",
        l.len(),
        q(0.50),
        q(0.99),
        q(0.999),
        l.last().copied().unwrap_or(0),
        tally.errors,
        tally.late
    );
    Ok(())
}

/// Connection `k` of `n` sends the requests due at `start + (k + i·n)/rate`.
async fn run(
    uri: Uri,
    header: Option<(HeaderName, HeaderValue)>,
    (rate, secs, conns): (f64, f64, usize),
) -> Result<Tally, Box<dyn std::error::Error>> {
    let total = (rate * secs) as usize;
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::new();
    for k in 0..conns {
        let authority = uri.authority().ok_or("URL without a host")?.clone();
        let tcp = TcpStream::connect(authority.as_str()).await?;
        tcp.set_nodelay(true)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let (uri, header) = (uri.clone(), header.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            for i in (k..total).step_by(conns) {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                // tokio's timers tick in milliseconds: sleep to within one,
                // then yield until the microsecond it is due.
                if let Some(early) = due.checked_sub(Duration::from_millis(1)) {
                    tokio::time::sleep_until(early.into()).await;
                }
                while Instant::now() < due {
                    tokio::task::yield_now().await;
                }
                if due.elapsed() > Duration::from_millis(1) {
                    tally.late += 1;
                }
                let mut req = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
                    .header(http::header::HOST, authority.as_str())
                    .body(Empty::<bytes::Bytes>::new())
                    .expect("request");
                if let Some((n, v)) = &header {
                    req.headers_mut().insert(n.clone(), v.clone());
                }
                let ok = match sender.send_request(req).await {
                    Ok(resp) => {
                        resp.status().is_success() && resp.into_body().collect().await.is_ok()
                    }
                    Err(_) => false,
                };
                if ok {
                    tally.latencies_us.push(due.elapsed().as_micros() as u64);
                } else {
                    tally.errors += 1;
                }
            }
            tally
        }));
    }
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await?;
        all.latencies_us.extend(t.latencies_us);
        all.errors += t.errors;
        all.late += t.late;
    }
    Ok(all)
}
