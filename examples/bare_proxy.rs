//! The floor for the benchmark: the least a hyper-based proxy does.
//!
//! One hyper HTTP/1.1 server, one pooled hyper-util client, one header
//! injected, the body streamed back. No token, governor, rewriting, policy,
//! logging or metrics. `bench/run.sh` runs it next to dataverse-proxy so the
//! cost of the Rust stack and the cost of our features can be told apart.
//!
//! ```sh
//! cargo run --release --example bare_proxy -- 127.0.0.1:18084 http://127.0.0.1:18081 "Bearer bench-token"
//! ```
//!
//! It runs on tokio's `current_thread` runtime; with `BARE_MT` set, on the
//! multi-thread one (`TOKIO_WORKER_THREADS` workers), to compare the two.

use std::net::SocketAddr;

use http::{HeaderValue, Request, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args.next().ok_or("listen address")?.parse()?;
    let upstream: Uri = args.next().ok_or("upstream origin")?.parse()?;
    let auth = HeaderValue::from_str(&args.next().ok_or("Authorization value")?)?;
    let rt = if std::env::var_os("BARE_MT").is_some() {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    };
    rt.block_on(async move {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<_, Incoming> = Client::builder(TokioExecutor::new()).build(connector);
        let listener = tokio::net::TcpListener::bind(listen).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let (client, upstream, auth) = (client.clone(), upstream.clone(), auth.clone());
            tokio::spawn(async move {
                let service = service_fn(move |mut req: Request<Incoming>| {
                    let mut parts = upstream.clone().into_parts();
                    parts.path_and_query = req.uri().path_and_query().cloned();
                    *req.uri_mut() = Uri::from_parts(parts).expect("uri");
                    req.headers_mut().remove(http::header::HOST);
                    req.headers_mut()
                        .insert(http::header::AUTHORIZATION, auth.clone());
                    client.request(req)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
