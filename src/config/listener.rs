//! `[tls]` (TLS and client certificates on the proxy listener) and `[cors]`.

use super::*;

/// `[tls]`: the proxy listener speaks TLS (and h2 by ALPN).
#[derive(Debug, Clone)]
pub struct ListenerTls {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA bundle client certificates are verified against (mTLS).
    pub client_ca_file: Option<PathBuf>,
    /// Whether a client certificate is required (else only verified when sent).
    pub require_client_certificate: bool,
    /// How often the files are checked for changes (SIGHUP reloads at once).
    pub reload_interval: Duration,
}

/// `[cors]`: answers to browsers' preflights, off unless origins are listed.
#[derive(Debug, Clone)]
pub struct CorsConfig {
    /// Exact origins (`https://app.example.com`) allowed to call.
    pub allowed_origins: Vec<String>,
    /// Methods a preflight may ask for.
    pub allowed_methods: Vec<http::Method>,
    /// Request headers a preflight may ask for (lower-case).
    pub allowed_headers: Vec<String>,
    /// Response headers scripts may read.
    pub exposed_headers: Vec<String>,
    /// How long browsers may cache a preflight answer.
    pub max_age: Duration,
    /// Whether credentials (cookies, `Authorization`) may be sent.
    pub allow_credentials: bool,
}

/// `[tls]`, if given: both files must be readable.
pub(super) fn tls(p: &mut Problems<'_>, raw: Option<RawTls>) -> Option<ListenerTls> {
    let raw = raw?;
    let mut file = |key: &str, value: Option<String>, required: bool| -> Option<PathBuf> {
        let Some(v) = value else {
            if required {
                p.push(key, "is missing", "give the path of a PEM file");
            }
            return None;
        };
        let path = PathBuf::from(v);
        if let Err(e) = std::fs::metadata(&path) {
            p.push(
                key,
                &format!("cannot read {} ({e})", path.display()),
                "give the path of a readable PEM file",
            );
        }
        Some(path)
    };
    let cert_file = file("tls.cert_file", raw.cert_file, true);
    let key_file = file("tls.key_file", raw.key_file, true);
    let client_ca_file = file("tls.client_ca_file", raw.client_ca_file, false);
    pem_contents(
        p,
        cert_file.as_deref(),
        key_file.as_deref(),
        client_ca_file.as_deref(),
    );
    let require_client_certificate = match raw.client_certificate.as_deref() {
        None | Some("required") => client_ca_file.is_some(),
        Some("optional") => false,
        Some(other) => {
            p.push(
                "tls.client_certificate",
                &format!("{other:?} is not \"required\" or \"optional\""),
                "use \"required\" (the default with a client_ca_file) or \"optional\"",
            );
            false
        }
    };
    if raw.client_certificate.is_some() && client_ca_file.is_none() {
        p.push(
            "tls.client_certificate",
            "is set without tls.client_ca_file",
            "give the CA bundle client certificates are verified against",
        );
    }
    let reload_interval = p.nonzero_duration(
        "tls.reload_interval",
        raw.reload_interval.as_deref(),
        Duration::from_secs(10),
    );
    Some(ListenerTls {
        cert_file: cert_file?,
        key_file: key_file?,
        client_ca_file,
        require_client_certificate,
        reload_interval,
    })
}

/// The files hold what they should: certificates, a private key (so a
/// wrong file is a config error at start, not a failed listener).
fn pem_contents(p: &mut Problems<'_>, cert: Option<&Path>, key: Option<&Path>, ca: Option<&Path>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    for (name, path) in [("tls.cert_file", cert), ("tls.client_ca_file", ca)] {
        let Some(path) = path.filter(|p| p.is_file()) else {
            continue;
        };
        let certs = CertificateDer::pem_file_iter(path).map(|i| i.filter(Result::is_ok).count());
        if !matches!(certs, Ok(n) if n > 0) {
            p.push(
                name,
                &format!("{} holds no PEM CERTIFICATE block", path.display()),
                "give a PEM file of certificates (leaf first for cert_file)",
            );
        }
    }
    if let Some(path) = key.filter(|p| p.is_file())
        && PrivateKeyDer::from_pem_file(path).is_err()
    {
        // The key's own bytes are never quoted.
        p.push(
            "tls.key_file",
            &format!("{} holds no PEM private key", path.display()),
            "give a PEM PKCS#8, PKCS#1 or SEC1 private key",
        );
    }
}

/// `[cors]`, if it lists any origin.
pub(super) fn cors(p: &mut Problems<'_>, raw: Option<RawCors>) -> Option<CorsConfig> {
    let raw = raw?;
    let allowed_origins = raw.allowed_origins.unwrap_or_default();
    for o in &allowed_origins {
        let ok = Url::parse(o).is_ok_and(|u| {
            matches!(u.scheme(), "http" | "https")
                && u.path() == "/"
                && !o.ends_with('/')
                && u.query().is_none()
        });
        if !ok || o == "*" {
            p.push(
                "cors.allowed_origins",
                &format!("{o:?} is not an origin"),
                "list exact origins such as \"https://app.example.com\" (no path, no wildcard)",
            );
        }
    }
    let allowed_methods = cors_methods(p, raw.allowed_methods);
    let lower = |l: Option<Vec<String>>, default: &[&str]| -> Vec<String> {
        l.unwrap_or_else(|| default.iter().map(|s| (*s).to_owned()).collect())
            .into_iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .collect()
    };
    let allowed_headers = lower(
        raw.allowed_headers,
        &[
            "authorization",
            "content-type",
            "accept",
            "odata-version",
            "odata-maxversion",
            "prefer",
            "if-match",
            "if-none-match",
        ],
    );
    let exposed_headers = lower(
        raw.exposed_headers,
        &[
            "etag",
            "odata-entityid",
            "preference-applied",
            "x-request-id",
            "retry-after",
        ],
    );
    for h in allowed_headers.iter().chain(&exposed_headers) {
        if http::HeaderName::from_bytes(h.as_bytes()).is_err() || h == "*" {
            p.push(
                "cors",
                &format!("{h:?} is not a header name"),
                "list header names, no wildcard",
            );
        }
    }
    Some(CorsConfig {
        allowed_origins,
        allowed_methods,
        allowed_headers,
        exposed_headers,
        max_age: p.duration(
            "cors.max_age",
            raw.max_age.as_deref(),
            Duration::from_secs(600),
        ),
        allow_credentials: raw.allow_credentials.unwrap_or(false),
    })
    .filter(|c| !c.allowed_origins.is_empty())
}

/// `cors.allowed_methods`: Web API methods only.
fn cors_methods(p: &mut Problems<'_>, raw: Option<Vec<String>>) -> Vec<http::Method> {
    let mut allowed_methods = Vec::new();
    let methods = raw.unwrap_or_else(|| {
        ["GET", "POST", "PATCH", "PUT", "DELETE"]
            .map(str::to_owned)
            .to_vec()
    });
    for m in methods {
        match m.trim().to_ascii_uppercase().parse::<http::Method>() {
            Ok(method) if WEB_API_METHODS.contains(&method) => allowed_methods.push(method),
            _ => p.push(
                "cors.allowed_methods",
                &format!("{m:?} is not a Web API method"),
                "list some of GET, HEAD, POST, PATCH, PUT, DELETE",
            ),
        }
    }
    allowed_methods
}
