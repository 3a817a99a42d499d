//! The proxy's public URL as a caller sees it, for link rewriting.
//!
//! In order: the configured `public_url`; else, when the peer is a trusted
//! proxy, `Forwarded` (RFC 7239) or `X-Forwarded-Proto` / `-Host` /
//! `-Prefix`; else the listener's own scheme (`https` with `[tls]`) + the
//! `Host` header; else the listen address.
//! Forwarded values from untrusted peers are ignored: anyone could send
//! them and steer the links of the answer. Every value is validated before
//! it is written into a body.

use std::net::IpAddr;

use axum::http::{HeaderMap, HeaderName, header};

/// RFC 7239.
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
/// De-facto forwarding headers.
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// De-facto forwarding headers.
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// De-facto forwarding headers.
const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");

/// Settings for deriving the public URL.
#[derive(Debug, Clone)]
pub struct PublicUrl {
    /// Configured `public_url`, without a trailing slash.
    pub fixed: Option<String>,
    /// Peers whose forwarding headers are believed.
    pub trusted: Vec<ipnet::IpNet>,
    /// Fallback authority (the listen address).
    pub fallback_host: String,
    /// The scheme of the proxy listener: `https` when it serves TLS, so
    /// that a link followed comes back to the same listener.
    pub scheme: &'static str,
}

impl PublicUrl {
    /// The public base URL (`scheme://host[:port][/prefix]`, no trailing
    /// slash), as pieces borrowed from the settings and the headers: the
    /// per-request lookup of its rewriters needs no allocation.
    pub fn derive<'a>(&'a self, headers: &'a HeaderMap, peer: IpAddr) -> Base<'a> {
        if let Some(fixed) = &self.fixed {
            return Base::new([fixed, "", "", "", "", ""], false);
        }
        let mut proto = self.scheme;
        let mut host = header_str(headers, header::HOST).filter(|h| valid_host(h));
        let mut prefix = "";
        let trusted = self.trusted.iter().any(|net| net.contains(&peer));
        if trusted {
            if let Some(fwd) = header_str(headers, FORWARDED) {
                let (p, h) = parse_forwarded(fwd);
                if let Some(p) = p {
                    proto = p;
                }
                if h.is_some() {
                    host = h;
                }
            } else {
                match header_str(headers, X_FORWARDED_PROTO).map(first_value) {
                    Some(p) if p.eq_ignore_ascii_case("https") => proto = "https",
                    Some(p) if p.eq_ignore_ascii_case("http") => proto = "http",
                    _ => {}
                }
                if let Some(h) = header_str(headers, X_FORWARDED_HOST)
                    .map(first_value)
                    .filter(|h| valid_host(h))
                {
                    host = Some(h);
                }
            }
            if let Some(p) = header_str(headers, X_FORWARDED_PREFIX)
                .map(first_value)
                .filter(|p| valid_prefix(p))
            {
                prefix = p.trim_end_matches('/');
            }
        }
        // An untrusted peer's own `Host` picks the links of its answer only.
        let from_caller = !trusted && host.is_some();
        let host = host.unwrap_or(&self.fallback_host);
        Base::new([proto, "://", host, prefix, "", ""], from_caller)
    }
}

/// A public base URL in pieces, joined only when a new one is seen.
#[derive(Debug, Clone, Copy)]
pub struct Base<'a> {
    pieces: [&'a str; 6],
    /// Taken from what any caller may send (the `Host` of an untrusted
    /// peer), not from the configuration or a trusted proxy: such a base
    /// is used for the caller's own answer, never kept for others.
    pub from_caller: bool,
}

impl<'a> Base<'a> {
    fn new(pieces: [&'a str; 6], from_caller: bool) -> Self {
        Self {
            pieces,
            from_caller,
        }
    }

    /// The same base followed by `/{segment}` (the org prefix of path routing).
    pub fn with_segment(mut self, segment: &'a str) -> Self {
        self.pieces[4] = "/";
        self.pieces[5] = segment;
        self
    }

    /// Whether `s` spells this base.
    pub fn is(&self, s: &str) -> bool {
        let mut rest = s;
        for piece in self.pieces {
            match rest.strip_prefix(piece) {
                Some(r) => rest = r,
                None => return false,
            }
        }
        rest.is_empty()
    }
}

impl std::fmt::Display for Base<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.pieces.iter().try_for_each(|p| f.write_str(p))
    }
}

fn header_str(headers: &HeaderMap, name: axum::http::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn first_value(v: &str) -> &str {
    v.split(',').next().unwrap_or("").trim()
}

/// `proto` and `host` of the first element of a `Forwarded` header.
fn parse_forwarded(value: &str) -> (Option<&'static str>, Option<&str>) {
    let first = value.split(',').next().unwrap_or("");
    let (mut proto, mut host) = (None, None);
    for pair in first.split(';') {
        let Some((k, v)) = pair.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"');
        match k.trim().to_ascii_lowercase().as_str() {
            "proto" if v.eq_ignore_ascii_case("https") => proto = Some("https"),
            "proto" if v.eq_ignore_ascii_case("http") => proto = Some("http"),
            "host" if valid_host(v) => host = Some(v),
            _ => {}
        }
    }
    (proto, host)
}

/// A host[:port] made only of characters a hostname, IPv6 literal or port uses.
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
        })
}

/// A path prefix such as `/dataverse`, with only unreserved characters.
fn valid_prefix(p: &str) -> bool {
    p.starts_with('/')
        && p.len() <= 200
        && !p.contains("//")
        && !p.split('/').any(|s| s == ".." || s == ".")
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn cfg(trusted: &[&str]) -> PublicUrl {
        PublicUrl {
            fixed: None,
            trusted: trusted.iter().map(|t| t.parse().expect("net")).collect(),
            fallback_host: "127.0.0.1:8080".into(),
            scheme: "http",
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 2, 3));

    #[test]
    fn host_header_without_trust() {
        let h = headers(&[
            ("host", "proxy.local:8080"),
            ("x-forwarded-host", "evil.example"),
        ]);
        let (untrusting, trusting) = (cfg(&[]), cfg(&["10.0.0.0/8"]));
        let base = untrusting.derive(&h, PEER);
        assert_eq!(base.to_string(), "http://proxy.local:8080");
        assert!(base.from_caller, "the caller's own Host");
        let trusted = trusting.derive(&h, PEER);
        assert!(!trusted.from_caller, "vouched for by a trusted proxy");
    }

    #[test]
    fn forwarded_headers_from_a_trusted_peer() {
        let h = headers(&[
            ("host", "10.0.0.5:8080"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "dv.example.com"),
            ("x-forwarded-prefix", "/sales/"),
        ]);
        assert_eq!(
            cfg(&["10.0.0.0/8"]).derive(&h, PEER).to_string(),
            "https://dv.example.com/sales"
        );
        let h = headers(&[
            ("host", "x"),
            (
                "forwarded",
                "for=1.2.3.4;proto=https;host=\"gw.example.com\", for=5.6.7.8",
            ),
        ]);
        assert_eq!(
            cfg(&["10.0.0.0/8"]).derive(&h, PEER).to_string(),
            "https://gw.example.com"
        );
    }

    #[test]
    fn a_tls_listener_keeps_its_scheme() {
        let tls = PublicUrl {
            scheme: "https",
            ..cfg(&["10.0.0.0/8"])
        };
        let h = headers(&[("host", "proxy.local:8443")]);
        assert_eq!(tls.derive(&h, PEER).to_string(), "https://proxy.local:8443");
        // A trusted proxy in front that speaks plain HTTP to its clients says so.
        let h = headers(&[("host", "proxy.local:8443"), ("x-forwarded-proto", "http")]);
        assert_eq!(tls.derive(&h, PEER).to_string(), "http://proxy.local:8443");
    }

    #[test]
    fn junk_is_never_used() {
        let h = headers(&[("host", "a\"b"), ("x-forwarded-prefix", "/../x")]);
        assert_eq!(
            cfg(&["10.0.0.0/8"]).derive(&h, PEER).to_string(),
            "http://127.0.0.1:8080"
        );
    }

    #[test]
    fn a_fixed_public_url_wins() {
        let mut c = cfg(&["10.0.0.0/8"]);
        c.fixed = Some("https://fixed.example.com/dv".into());
        assert_eq!(
            c.derive(&headers(&[("host", "x")]), PEER).to_string(),
            "https://fixed.example.com/dv"
        );
    }
}
