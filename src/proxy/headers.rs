//! Header policy for both directions of the proxy.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1: `Connection`, `Proxy-Connection`,
//! `Keep-Alive`, `TE`, `Transfer-Encoding`, `Upgrade`, plus every header named
//! in `Connection`) belong to one connection and are never forwarded.
//! Towards Dataverse the caller's credentials (`Authorization`,
//! `Proxy-Authorization`) and impersonation headers (`CallerObjectId`,
//! `MSCRMCallerID`) are dropped: callers act as the proxy's application user
//! and nothing else. Everything else (`Prefer`, `If-Match`, `OData-*`,
//! `MSCRM.*`, `x-ms-*`, `Retry-After`, `ETag`…) passes through untouched.

use axum::http::{HeaderMap, HeaderName, header};

/// Hop-by-hop headers per RFC 9110 §7.6.1 (and the obsolete `Proxy-Connection`).
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TRAILER,
];

/// Request headers that never reach Dataverse.
static DROPPED_TOWARDS_UPSTREAM: [HeaderName; 6] = [
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::HOST,
    // hyper's client cannot wait for `100 Continue`; the proxy's own server
    // side answers the caller's `Expect` instead.
    header::EXPECT,
    HeaderName::from_static("callerobjectid"),
    HeaderName::from_static("mscrmcallerid"),
];

/// Response headers from Dataverse that are not passed to callers.
static DROPPED_TOWARDS_CALLER: [HeaderName; 1] = [header::PROXY_AUTHENTICATE];

/// Removes hop-by-hop headers, including those listed in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Prepares a caller's request headers for Dataverse (the bearer is added by the caller of this).
pub fn to_upstream(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    for name in &DROPPED_TOWARDS_UPSTREAM {
        headers.remove(name);
    }
}

/// Prepares Dataverse's response headers for the caller.
pub fn to_caller(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    for name in &DROPPED_TOWARDS_CALLER {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn connection_named_and_standard_hop_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("prefer", "odata.maxpagesize=10"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["prefer"], "odata.maxpagesize=10");
    }

    #[test]
    fn caller_credentials_and_impersonation_never_go_upstream() {
        let mut h = map(&[
            ("authorization", "Bearer caller-token"),
            ("proxy-authorization", "Basic xyz"),
            ("host", "proxy.local"),
            ("CallerObjectId", "00000000-0000-0000-0000-000000000001"),
            ("MSCRMCallerID", "00000000-0000-0000-0000-000000000002"),
            ("if-match", "W/\"12\""),
            ("odata-version", "4.0"),
            ("mscrm.bypasscustompluginexecution", "true"),
            ("x-ms-client-request-id", "abc"),
        ]);
        to_upstream(&mut h);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "if-match",
                "mscrm.bypasscustompluginexecution",
                "odata-version",
                "x-ms-client-request-id"
            ]
        );
    }

    #[test]
    fn dataverse_headers_reach_the_caller() {
        let mut h = map(&[
            ("etag", "W/\"5\""),
            ("retry-after", "17"),
            ("x-ms-ratelimit-burst-remaining-xrm-requests", "5999"),
            ("odata-entityid", "https://o/api/data/v9.2/accounts(1)"),
            ("connection", "close"),
            ("proxy-authenticate", "Basic"),
        ]);
        to_caller(&mut h);
        assert_eq!(h.len(), 4, "{h:?}");
    }
}
