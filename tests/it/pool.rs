//! The pool of our own towards an org (src/http/upstream/pool.rs) against
//! small servers on real sockets that count their connections: reuse,
//! idle eviction, a server that closes between requests or after every
//! answer, and TLS. Tunnelling through an egress proxy is in operations.rs.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use dataverse_proxy::config::UpstreamConfig;
use dataverse_proxy::upstream::{self, Pool};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::listener::{Ca, temp_dir, write};

/// What the test server does after each answer.
#[derive(Clone, Copy, PartialEq)]
enum After {
    /// Keeps the connection for the next request.
    KeepAlive,
    /// Answers with `Connection: close` and closes.
    Close,
    /// Closes the connection without saying so (as a server's idle
    /// timeout does), after the first answer on it.
    DropSilently,
}

/// A server answering `ok` to every request; counts its connections and
/// tells when it closed one.
struct Server {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl Server {
    async fn start(after: After) -> Self {
        Self::start_with(after, None).await
    }

    async fn start_with(after: After, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let (tx, closed) = tokio::sync::mpsc::unbounded_channel();
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (tx, tls) = (tx.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(tls) => {
                            let Ok(stream) = tls.accept(tcp).await else {
                                return;
                            };
                            answer(stream, after).await;
                        }
                        None => answer(tcp, after).await,
                    }
                    let _ = tx.send(());
                });
            }
        });
        Self {
            addr,
            accepted,
            closed,
        }
    }

    fn origin(&self, scheme: &str) -> http::Uri {
        format!("{scheme}://localhost:{}/", self.addr.port())
            .parse()
            .expect("uri")
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Reads request heads (the tests send no bodies) and answers each.
async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut io: S, after: After) {
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
        buf.drain(..end);
        let close = if after == After::Close {
            "connection: close\r\n"
        } else {
            ""
        };
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n{close}\r\nok");
        if io.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        if after != After::KeepAlive {
            let _ = io.shutdown().await;
            return;
        }
    }
}

fn config(idle: Duration) -> UpstreamConfig {
    UpstreamConfig {
        connect_timeout: Duration::from_secs(5),
        response_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        pool_idle_timeout: idle,
        pool_max_idle: 8,
        egress: None,
        ca_file: None,
        replay_buffer: 0,
        compression: false,
        recompression_level: 1,
    }
}

fn pool_for(server: &Server, scheme: &str, idle: Duration, ca: Option<&str>) -> Pool {
    let cfg = config(idle);
    let tls =
        dataverse_proxy::upstream::tls::client_config(ca.map(std::path::Path::new)).expect("tls");
    upstream::pool(&cfg, &upstream::connector(&cfg, tls), server.origin(scheme))
}

/// One GET of `/x` through the pool; the body read to its end.
async fn get(pool: &Pool, port: u16) -> String {
    let req = http::Request::builder()
        .uri(format!("http://localhost:{port}/x"))
        .header(http::header::HOST, format!("localhost:{port}"))
        .body(Body::empty())
        .expect("request");
    let resp = pool.send(req).await.expect("answer");
    assert_eq!(resp.status(), 200);
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

#[tokio::test]
async fn a_connection_is_reused_once_its_answer_has_ended() {
    let server = Server::start(After::KeepAlive).await;
    let pool = pool_for(&server, "http", Duration::from_secs(90), None);
    for _ in 0..5 {
        assert_eq!(get(&pool, server.addr.port()).await, "ok");
    }
    assert_eq!((server.accepted(), pool.opened(), pool.idle()), (1, 1, 1));
    // An answer dropped before its end takes its connection with it.
    let req = http::Request::builder()
        .uri("/x")
        .header(http::header::HOST, "localhost")
        .body(Body::empty())
        .expect("request");
    drop(pool.send(req).await.expect("answer"));
    assert_eq!(pool.idle(), 0);
    assert_eq!(get(&pool, server.addr.port()).await, "ok");
    assert_eq!(server.accepted(), 2);
}

#[tokio::test]
async fn parallel_requests_open_their_own_connections_and_all_are_kept() {
    let server = Server::start(After::KeepAlive).await;
    let pool = pool_for(&server, "http", Duration::from_secs(90), None);
    let port = server.addr.port();
    let answers = futures_util::future::join_all((0..4).map(|_| get(&pool, port))).await;
    assert!(answers.iter().all(|a| a == "ok"));
    assert_eq!((pool.opened(), pool.idle()), (4, 4));
    // The next four reuse them.
    futures_util::future::join_all((0..4).map(|_| get(&pool, port))).await;
    assert_eq!(server.accepted(), 4);
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let mut server = Server::start(After::KeepAlive).await;
    let pool = pool_for(&server, "http", Duration::from_secs(30), None);
    get(&pool, server.addr.port()).await;
    assert_eq!(pool.idle(), 1);
    // The clock is paused only while nothing dials (a paused clock would
    // jump a connect timeout forward while the socket connects).
    tokio::time::pause();
    tokio::time::sleep(Duration::from_secs(61)).await;
    // The reaper closed it without a request coming to find it.
    assert_eq!(pool.idle(), 0);
    server
        .closed
        .recv()
        .await
        .expect("the server saw the close");
    tokio::time::resume();
    get(&pool, server.addr.port()).await;
    assert_eq!(pool.opened(), 2);
}

#[tokio::test]
async fn a_connection_the_server_closed_between_requests_is_not_used() {
    let mut server = Server::start(After::DropSilently).await;
    let pool = pool_for(&server, "http", Duration::from_secs(90), None);
    let port = server.addr.port();
    for _ in 0..3 {
        assert_eq!(get(&pool, port).await, "ok");
        server.closed.recv().await.expect("closed");
    }
    assert_eq!(server.accepted(), 3);
}

/// The close lands after the checkout found the connection ready, before
/// the connection's task has seen it: the request is written into a
/// closed connection. The pool names that `Stale` (the send loop sends an
/// idempotent request again at once: send.rs) and the next request
/// gets a new connection.
#[tokio::test]
async fn a_reused_connection_closed_under_a_request_is_named_stale() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (close, closing) = std::sync::mpsc::channel::<()>();
    let (closed, is_closed) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        for (n, tcp) in listener.incoming().enumerate() {
            let mut tcp = tcp.expect("accept");
            loop {
                let mut buf = [0u8; 4096];
                match tcp.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                if n == 0 {
                    closing.recv().expect("told to close");
                    let _ = tcp.shutdown(std::net::Shutdown::Both);
                    closed.send(()).expect("said closed");
                    break;
                }
            }
        }
    });
    let cfg = config(Duration::from_secs(90));
    let tls = dataverse_proxy::upstream::tls::client_config(None).expect("tls");
    let origin = format!("http://localhost:{port}/").parse().expect("uri");
    let pool = upstream::pool(&cfg, &upstream::connector(&cfg, tls), origin);
    assert_eq!(get(&pool, port).await, "ok");
    close.send(()).expect("close");
    // Blocking on purpose: this runtime's one thread does not run the
    // connection's task until the next request is on its way.
    is_closed.recv().expect("closed");
    let req = http::Request::builder()
        .uri("/x")
        .header(http::header::HOST, "localhost")
        .body(Body::empty())
        .expect("request");
    let err = pool
        .send(req)
        .await
        .expect_err("written into a closed connection");
    assert!(err.is_stale(), "{err:?}");
    assert_eq!(get(&pool, port).await, "ok");
    assert_eq!(pool.opened(), 2);
}

#[tokio::test]
async fn a_server_that_closes_after_every_answer_gets_a_new_connection_each_time() {
    let server = Server::start(After::Close).await;
    let pool = pool_for(&server, "http", Duration::from_secs(90), None);
    for _ in 0..4 {
        assert_eq!(get(&pool, server.addr.port()).await, "ok");
    }
    assert_eq!((server.accepted(), pool.opened()), (4, 4));
}

#[tokio::test]
async fn https_origins_are_dialled_with_tls_and_reused() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let ca = Ca::new("pool test CA");
    let (cert, key) = ca.leaf("dataverse", &["localhost"], &[]);
    dataverse_proxy::install_crypto_provider();
    let server_config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("cert")],
            PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key"),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let server = Server::start_with(After::KeepAlive, Some(acceptor)).await;
    let ca_file = write(&temp_dir(), "ca.pem", &ca.pem());
    let pool = pool_for(&server, "https", Duration::from_secs(90), Some(&ca_file));
    for _ in 0..3 {
        assert_eq!(get(&pool, server.addr.port()).await, "ok");
    }
    assert_eq!(server.accepted(), 1);
    // A CA the client does not trust: the handshake fails as a connect error.
    let untrusted = pool_for(&server, "https", Duration::from_secs(90), None);
    let req = http::Request::builder()
        .uri("/x")
        .header(http::header::HOST, "localhost")
        .body(Body::empty())
        .expect("request");
    let err = untrusted.send(req).await.expect_err("untrusted");
    assert!(err.is_connect(), "{err:?}");
}
