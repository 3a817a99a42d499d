//! No connection holds a place it does not use: silent connections and
//! half a preface are closed at the header-read deadline, idle keep-alive
//! connections after the idle timeout (or at once, to make room for a new
//! one), and one address can be held to its share.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Harness, Setup};

fn addr(h: &Harness) -> String {
    h.proxy.trim_start_matches("http://").to_owned()
}

/// Whether the proxy closes `s` within `within` (EOF or reset).
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// A metric's value from the text exposition.
fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// An HTTP/1.1 keep-alive connection that made one request.
async fn keep_alive(
    h: &Harness,
) -> (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = TcpStream::connect(addr(h)).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get("/api/data/v9.2/WhoAmI")
        .header("host", "proxy.test")
        .body(Empty::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("answer");
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await;
    (sender, task)
}

#[tokio::test]
async fn silent_connections_and_half_a_preface_cannot_shut_callers_out() {
    let setup = Setup::default()
        .set("limits.max_connections", "64")
        .set("limits.max_connections_per_ip", "64")
        .set("limits.header_read_timeout", "500ms");
    let h = Harness::with(setup).await;
    h.wait_ready().await;
    let mut held = Vec::new();
    for i in 0..64 {
        let mut s = TcpStream::connect(addr(&h)).await.expect("connect");
        if i % 2 == 1 {
            s.write_all(b"PRI * HTTP/2.0\r\n").await.expect("write");
        }
        held.push(s);
    }
    // Every place is taken by a connection that has sent no request, each
    // within its grace for a first request: a new one cannot get in now…
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut refused = TcpStream::connect(addr(&h)).await.expect("connect");
    assert!(closed_within(&mut refused, Duration::from_millis(400)).await);
    // …but each of them is closed at the header-read deadline.
    for s in &mut held {
        assert!(
            closed_within(s, Duration::from_secs(5)).await,
            "a silent connection stayed open"
        );
    }
    assert_eq!(h.get("/WhoAmI").await.status(), 200);
    let m = h.metrics().await;
    assert_eq!(
        metric(
            &m,
            "dataverse_proxy_connections_closed_total{reason=\"no_request\"}"
        ),
        64.0,
        "{m}"
    );
    h.stop().await;
}

#[tokio::test]
async fn an_http2_connection_that_only_sent_its_preface_is_closed() {
    let setup = Setup::default().set("limits.header_read_timeout", "300ms");
    let h = Harness::with(setup).await;
    h.wait_ready().await;
    let tcp = TcpStream::connect(addr(&h)).await.expect("connect");
    // A real HTTP/2 client: preface and SETTINGS, then no request.
    let (_sender, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "the idle HTTP/2 connection stayed open");
    h.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connections_close_after_the_idle_timeout_not_the_header_timeout() {
    let setup = Setup::default()
        .set("limits.header_read_timeout", "200ms")
        .set("limits.idle_timeout", "1s");
    let h = Harness::with(setup).await;
    h.wait_ready().await;
    let (mut sender, task) = keep_alive(&h).await;
    // Past the header-read timeout, the idle connection still serves.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let req = http::Request::get("/api/data/v9.2/WhoAmI")
        .header("host", "proxy.test")
        .body(Empty::new())
        .expect("request");
    let resp = sender
        .send_request(req)
        .await
        .expect("second request on the connection");
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await;
    // After the idle timeout it is closed.
    assert!(
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_ok()
    );
    let m = h.metrics().await;
    assert_eq!(
        metric(
            &m,
            "dataverse_proxy_connections_closed_total{reason=\"idle\"}"
        ),
        1.0,
        "{m}"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_trickled_second_request_head_is_cut_off() {
    let setup = Setup::default()
        .set("limits.header_read_timeout", "300ms")
        .set("limits.idle_timeout", "30s");
    let h = Harness::with(setup).await;
    h.wait_ready().await;
    let mut s = TcpStream::connect(addr(&h)).await.expect("connect");
    s.write_all(b"GET /api/data/v9.2/WhoAmI HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.expect("answer");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // The next head, one byte at a time, never finished.
    let trickle = async {
        for b in b"GET /api/data/v9.2/WhoAmI HTTP/1.1\r\nHost: x\r\n" {
            if s.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), trickle).await;
    assert!(closed_within(&mut s, Duration::from_secs(2)).await);
    h.stop().await;
}

#[tokio::test]
async fn at_the_limit_the_oldest_idle_keep_alive_connection_makes_room() {
    let setup = Setup::default()
        .set("limits.max_connections", "4")
        .set("limits.max_connections_per_ip", "4");
    let h = Harness::with(setup).await;
    h.wait_ready().await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(keep_alive(&h).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A fifth caller gets in at once: the oldest idle one is closed.
    assert_eq!(h.get("/WhoAmI").await.status(), 200);
    let (_, oldest) = idle.remove(0);
    assert!(
        tokio::time::timeout(Duration::from_secs(2), oldest)
            .await
            .is_ok()
    );
    for (sender, _) in &idle {
        assert!(!sender.is_closed(), "a newer idle connection was closed");
    }
    h.stop().await;
}

#[tokio::test]
async fn one_address_is_held_to_its_share_of_connections() {
    let setup = Setup::default().set("limits.max_connections_per_ip", "2");
    let h = Harness::with(setup).await;
    h.wait_ready().await;
    // Two connections within their grace for a first request hold the
    // address's share: a third is refused.
    let _a = TcpStream::connect(addr(&h)).await.expect("connect");
    let _b = TcpStream::connect(addr(&h)).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut third = TcpStream::connect(addr(&h)).await.expect("connect");
    assert!(closed_within(&mut third, Duration::from_secs(2)).await);
    let m = h.metrics().await;
    assert_eq!(
        metric(
            &m,
            "dataverse_proxy_connections_refused_total{reason=\"per_ip\"}"
        ),
        1.0,
        "{m}"
    );
    h.stop().await;
}

/// 64 places, and one address reconnecting 64 sockets that never send a
/// request as fast as they are closed: the kept-alive client beside them is
/// never the one closed to make room, and keeps being served.
#[tokio::test]
async fn sockets_that_send_nothing_cannot_push_out_a_kept_alive_client() {
    let setup = Setup::default()
        .set("limits.max_connections", "64")
        .set("limits.max_connections_per_ip", "64")
        .set("limits.header_read_timeout", "400ms");
    let h = Harness::with(setup).await;
    h.wait_ready().await;
    let (mut client, conn) = keep_alive(&h).await;
    let target = addr(&h);
    let stop = tokio_util::sync::CancellationToken::new();
    let flood = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut opened = 0u32;
            let mut held: Vec<TcpStream> = Vec::new();
            while !stop.is_cancelled() {
                // Drop the sockets the proxy closed, open new ones in their place.
                let mut open = Vec::new();
                for mut s in held.drain(..) {
                    if !closed_within(&mut s, Duration::from_millis(1)).await {
                        open.push(s);
                    }
                }
                held = open;
                while held.len() < 64 {
                    held.push(TcpStream::connect(&target).await.expect("connect"));
                    opened += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            opened
        }
    });
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!client.is_closed(), "the kept-alive connection was closed");
        let req = http::Request::get("/api/data/v9.2/WhoAmI")
            .header("host", "proxy.test")
            .body(Empty::new())
            .expect("request");
        let resp = client.send_request(req).await.expect("served");
        assert_eq!(resp.status(), 200);
        let _ = resp.into_body().collect().await;
    }
    stop.cancel();
    let opened = flood.await.expect("flood");
    assert!(opened > 128, "the sockets kept coming back: {opened}");
    assert!(!conn.is_finished(), "the client's connection lives");
    let m = h.metrics().await;
    assert!(
        metric(
            &m,
            "dataverse_proxy_connections_closed_total{reason=\"evicted\"}"
        ) + metric(
            &m,
            "dataverse_proxy_connections_closed_total{reason=\"no_request\"}"
        ) >= 64.0,
        "{m}"
    );
    h.stop().await;
}
