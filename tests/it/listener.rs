//! The proxy listener itself: CORS preflights, HTTP/2 (h2c with prior
//! knowledge, h2 over TLS by ALPN), TLS with certificate reload, and client
//! certificates (mTLS) in caller rules.

use crate::harness::{Harness, Setup};

const APP: &str = "https://app.example.com";

#[tokio::test]
async fn cors_preflights_are_answered_by_the_proxy() {
    let h = Harness::with(Setup::default().set("cors.allowed_origins", APP)).await;
    h.wait_ready().await;
    h.sim.clear_seen();
    let preflight = |origin: &'static str| {
        h.client
            .request(reqwest::Method::OPTIONS, h.url("/accounts"))
            .header("origin", origin)
            .header("access-control-request-method", "PATCH")
            .header("access-control-request-headers", "content-type, if-match")
            .send()
    };
    let resp = preflight(APP).await.expect("preflight");
    assert!(resp.status().is_success(), "{}", resp.status());
    let h_ = resp.headers();
    assert_eq!(h_["access-control-allow-origin"], APP);
    let methods = h_["access-control-allow-methods"].to_str().expect("ascii");
    assert!(methods.contains("PATCH"), "{methods}");
    let allowed = h_["access-control-allow-headers"].to_str().expect("ascii");
    assert!(allowed.contains("if-match"), "{allowed}");
    assert_eq!(h_["access-control-max-age"], "600");
    // Another origin gets no grant.
    let resp = preflight("https://evil.example.net")
        .await
        .expect("preflight");
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    assert!(h.sim.seen().is_empty(), "preflights never reach Dataverse");
    // A real request from the app's origin is answered with the grant.
    let resp = h.get_with("/WhoAmI", &[("origin", APP)]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["access-control-allow-origin"], APP);
    // With CORS on, the layer answers every OPTIONS (tower-http's rule);
    // one without an origin gets no grant and still goes nowhere.
    h.sim.clear_seen();
    let resp = h
        .client
        .request(reqwest::Method::OPTIONS, h.url("/accounts"))
        .send()
        .await
        .expect("options");
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    assert!(h.sim.seen().is_empty());
    h.stop().await;
}

#[tokio::test]
async fn without_cors_a_preflight_is_a_405() {
    let h = Harness::start().await;
    h.wait_ready().await;
    let resp = h
        .client
        .request(reqwest::Method::OPTIONS, h.url("/accounts"))
        .header("origin", APP)
        .header("access-control-request-method", "GET")
        .send()
        .await
        .expect("preflight");
    assert_eq!(resp.status(), 405);
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    h.stop().await;
}

// --- HTTP/2 and TLS ---

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use dataverse_sim::{Sim, SimConfig};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};

/// A throw-away CA, made per test.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().expect("key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA"),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate and its key, as PEM.
    pub fn leaf(&self, cn: &str, dns: &[&str], uris: &[&str]) -> (String, String) {
        let mut params =
            CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>())
                .expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().expect("ia5")));
        }
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        (cert.pem(), key.serialize_pem())
    }
}

pub fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dvp-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    // Write then rename: the watcher never sees half a file.
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, &path).expect("rename");
    path.display().to_string()
}

/// A client trusting `ca`, optionally presenting `identity`, with ALPN h2 and http/1.1.
fn https_client(ca: &Ca, identity: Option<&(String, String)>, h1_only: bool) -> reqwest::Client {
    https_client_trusting(&ca.pem(), identity, h1_only)
}

/// A client that trusts the CA of `ca_pem` only.
pub(crate) fn https_client_trusting(
    ca_pem: &str,
    identity: Option<&(String, String)>,
    h1_only: bool,
) -> reqwest::Client {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    dataverse_proxy::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("ca"))
        .expect("root");
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("cert")],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key"),
            )
            .expect("client auth"),
    };
    config.alpn_protocols = if h1_only {
        vec![b"http/1.1".to_vec()]
    } else {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    };
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .no_proxy()
        .build()
        .expect("client")
}

/// A proxy whose config file is the simulator's org plus `extra`, with overrides.
async fn with_toml(extra: &str, set: &[(&'static str, String)]) -> Harness {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let h = Harness::with_file(sim, "", extra, set).await;
    h.wait_ready().await;
    h
}

#[tokio::test]
async fn h2c_with_prior_knowledge_round_trips_and_streams() {
    let h = Harness::start().await;
    h.wait_ready().await;
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .expect("client");
    let resp = h2c
        .get(h.url("/accounts?$top=1"))
        .send()
        .await
        .expect("h2c");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    let context = body["@odata.context"].as_str().expect("context");
    assert!(
        context.starts_with(&h.proxy),
        "links name the proxy: {context}"
    );
    // A file streamed both ways over HTTP/2.
    let id = h.sim.ids("accounts")[0];
    let data: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    assert!(h.sim.put_file(
        "accounts",
        id,
        "dvp_document",
        "big.bin",
        Bytes::from(data.clone())
    ));
    let resp = h2c
        .get(h.url(&format!("/accounts({id})/dvp_document/$value")))
        .send()
        .await
        .expect("download");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.expect("body").as_ref(), data.as_slice());
    // A refused request over HTTP/2 is the same OData error.
    let resp = h2c
        .get(format!("{}/api/data/v9.2/%u002e%u002e/x", h.proxy))
        .send()
        .await
        .expect("h2c");
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["x-dataverse-proxy-error"], "bad_path");
    h.stop().await;
}

/// RFC 9113 §8.3.1: a `host` that names another authority than
/// `:authority` makes an HTTP/2 request malformed; it is refused, never
/// routed or linked by either name.
#[tokio::test]
async fn an_http2_host_that_differs_from_the_authority_is_refused() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let h = Harness::start().await;
    h.wait_ready().await;
    let authority = h.proxy.trim_start_matches("http://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&authority)
        .await
        .expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let send = |host: &str| {
        http::Request::get(format!("http://{authority}/api/data/v9.2/WhoAmI"))
            .header("host", host)
            .body(Empty::<bytes::Bytes>::new())
            .expect("request")
    };
    let resp = sender
        .send_request(send("evil.example"))
        .await
        .expect("answer");
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["x-dataverse-proxy-error"], "bad_request");
    let _ = resp.into_body().collect().await;
    let resp = sender.send_request(send(&authority)).await.expect("answer");
    assert_eq!(resp.status(), 200, "the same authority is fine");
    assert_eq!(h.sim.seen().len(), 1, "only the good one reached Dataverse");
    h.stop().await;
}

#[tokio::test]
async fn tls_speaks_h2_by_alpn_and_reloads_its_certificate() {
    let (ca, ca2) = (Ca::new("first CA"), Ca::new("second CA"));
    let dir = temp_dir();
    let (cert, key) = ca.leaf("proxy", &["localhost", "127.0.0.1"], &[]);
    let cert_file = write(&dir, "tls.crt", &cert);
    let key_file = write(&dir, "tls.key", &key);
    let h = with_toml(
        "",
        &[
            ("tls.cert_file", cert_file),
            ("tls.key_file", key_file),
            ("tls.reload_interval", "50ms".to_owned()),
        ],
    )
    .await;
    let base = h.proxy.replace("http://", "https://");
    let url = format!("{base}/api/data/v9.2/WhoAmI");
    let resp = https_client(&ca, None, false)
        .get(&url)
        .send()
        .await
        .expect("h2");
    assert_eq!(
        (resp.status().as_u16(), resp.version()),
        (200, reqwest::Version::HTTP_2)
    );
    let resp = https_client(&ca, None, true)
        .get(&url)
        .send()
        .await
        .expect("h1");
    assert_eq!(
        (resp.status().as_u16(), resp.version()),
        (200, reqwest::Version::HTTP_11)
    );
    // Plain HTTP to a TLS listener gets nothing served.
    assert!(h.client.get(h.url("/WhoAmI")).send().await.is_err());
    // A new certificate from another CA replaces the files: served without a restart.
    let trusting_new = https_client(&ca2, None, false);
    assert!(
        trusting_new.get(&url).send().await.is_err(),
        "the old certificate is served"
    );
    let (cert2, key2) = ca2.leaf("proxy", &["localhost", "127.0.0.1"], &[]);
    write(&dir, "tls.key", &key2);
    write(&dir, "tls.crt", &cert2);
    let mut reloaded = false;
    for _ in 0..100 {
        if trusting_new
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "the new certificate was picked up");
    // A broken file keeps the running certificate.
    write(&dir, "tls.crt", "not a certificate");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        trusting_new
            .get(&url)
            .send()
            .await
            .expect("still served")
            .status(),
        200
    );
    h.stop().await;
}

#[tokio::test]
async fn client_certificates_name_callers_and_strangers_are_refused() {
    let (ca, other_ca) = (Ca::new("clients CA"), Ca::new("someone else's CA"));
    let dir = temp_dir();
    let (cert, key) = ca.leaf("proxy", &["localhost", "127.0.0.1"], &[]);
    let svc = ca.leaf("orders", &[], &["spiffe://cluster.local/ns/orders/sa/api"]);
    let known_cn = ca.leaf("reporting", &[], &[]);
    let stranger = ca.leaf("unknown", &[], &["spiffe://cluster.local/ns/x/sa/y"]);
    // Where a certificate has SANs, its CN is not its identity.
    let cn_with_san = ca.leaf("reporting", &["elsewhere.example"], &[]);
    // A DNS rule is not met by a URI spelt alike; DNS is case-blind.
    let (web_dns, web_uri) = (
        ca.leaf("x", &["WEB.internal"], &[]),
        ca.leaf("x", &[], &["web.internal"]),
    );
    let foreign = other_ca.leaf("orders", &[], &["spiffe://cluster.local/ns/orders/sa/api"]);
    let h = with_toml(
        "[[callers]]\nname = \"orders\"\nclient_certificate = { sans = [\"uri:spiffe://cluster.local/ns/orders/sa/api\"] }\n\n\
         [[callers]]\nname = \"reporting\"\nclient_certificate = { common_names = [\"reporting\"] }\nread_only = true\n\n\
         [[callers]]\nname = \"web\"\nclient_certificate = { sans = [\"dns:web.internal\"] }\n",
        &[
            ("tls.cert_file", write(&dir, "tls.crt", &cert)),
            ("tls.key_file", write(&dir, "tls.key", &key)),
            ("tls.client_ca_file", write(&dir, "ca.pem", &ca.pem())),
        ],
    )
    .await;
    let url = format!(
        "{}/api/data/v9.2/WhoAmI",
        h.proxy.replace("http://", "https://")
    );
    for (who, identity) in [("by SAN", &svc), ("by CN", &known_cn), ("by DNS", &web_dns)] {
        let resp = https_client(&ca, Some(identity), false)
            .get(&url)
            .send()
            .await
            .expect(who);
        assert_eq!(resp.status(), 200, "{who}");
    }
    let resp = https_client(&ca, Some(&stranger), false)
        .get(&url)
        .send()
        .await
        .expect("stranger");
    assert_eq!(resp.status(), 401, "a valid certificate no rule names");
    for (who, identity) in [("CN beside a SAN", &cn_with_san), ("URI as DNS", &web_uri)] {
        let resp = https_client(&ca, Some(identity), false)
            .get(&url)
            .send()
            .await
            .expect(who);
        assert_eq!(resp.status(), 401, "{who}");
    }
    h.sim.clear_seen();
    assert!(
        https_client(&ca, None, false)
            .get(&url)
            .send()
            .await
            .is_err(),
        "no certificate: no handshake"
    );
    assert!(
        https_client(&ca, Some(&foreign), false)
            .get(&url)
            .send()
            .await
            .is_err(),
        "another CA's certificate"
    );
    assert!(h.sim.seen().is_empty());
    let m = h.metrics().await;
    assert!(
        m.contains("caller=\"orders\"") && m.contains("caller=\"reporting\""),
        "{m}"
    );
    h.stop().await;
}

/// Links derived on a TLS listener keep its scheme: a client follows
/// `@odata.nextLink` back over TLS to the last page.
#[tokio::test]
async fn links_on_a_tls_listener_say_https_and_can_be_followed() {
    let ca = Ca::new("links CA");
    let dir = temp_dir();
    let (cert, key) = ca.leaf("proxy", &["localhost", "127.0.0.1"], &[]);
    let h = with_toml(
        "",
        &[
            ("tls.cert_file", write(&dir, "tls.crt", &cert)),
            ("tls.key_file", write(&dir, "tls.key", &key)),
        ],
    )
    .await;
    let base = h.proxy.replace("http://", "https://");
    let client = https_client(&ca, None, true);
    let mut url = format!("{base}/api/data/v9.2/accounts?$select=name");
    let (mut pages, mut rows) = (0, 0);
    loop {
        let body: serde_json::Value = client
            .get(&url)
            .header("Prefer", "odata.maxpagesize=2")
            .send()
            .await
            .expect("page over TLS")
            .json()
            .await
            .expect("json");
        let context = body["@odata.context"].as_str().expect("context");
        assert!(
            context.starts_with(&format!("{base}/api/data/v9.2/")),
            "{context}"
        );
        pages += 1;
        rows += body["value"].as_array().expect("rows").len();
        match body["@odata.nextLink"].as_str() {
            Some(next) => {
                assert!(next.starts_with(&base), "{next}");
                url = next.to_owned();
            }
            None => break,
        }
    }
    assert!(pages > 1, "paged");
    assert_eq!(rows, h.sim.ids("accounts").len());
    h.stop().await;
}
