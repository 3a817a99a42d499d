//! Header policy for both directions of the proxy.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1: `Connection`, `Proxy-Connection`,
//! `Keep-Alive`, `TE`, `Transfer-Encoding`, `Upgrade`, plus every header named
//! in `Connection`) belong to one connection and are never forwarded.
//! Towards Dataverse the caller's credentials (`Authorization`,
//! `Proxy-Authorization`, `X-API-Key`), its cookies, impersonation headers
//! (`CallerObjectId`, `MSCRMCallerID`) and the privileged headers that skip
//! Dataverse's own logic (`MSCRM.BypassCustomPluginExecution`,
//! `MSCRM.BypassBusinessLogicExecution`,
//! `MSCRM.SuppressCallbackRegistrationExpanderJob`) are dropped: callers act
//! as the proxy's application user and nothing more, unless the org's
//! policy puts some back. Towards callers, Dataverse's `Set-Cookie`
//! (`ARRAffinity`, `ReqClientId`, scoped to the org's domain) is dropped:
//! the proxy keeps no session and must not let a caller pin it to one web
//! server. Everything else (`Prefer`, `If-Match`, `OData-*`, other
//! `MSCRM.*`, `x-ms-*`, `Retry-After`, `ETag`…) passes through untouched.

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};

/// Header names used on the hot path, parsed once.
pub mod names {
    use axum::http::HeaderName;

    /// Dataverse's recommended degree of parallelism.
    pub const X_MS_DOP_HINT: HeaderName = HeaderName::from_static("x-ms-dop-hint");
    /// Dataverse's request id.
    pub const X_MS_SERVICE_REQUEST_ID: HeaderName =
        HeaderName::from_static("x-ms-service-request-id");
    /// Dataverse's request id on errors.
    pub const REQ_ID: HeaderName = HeaderName::from_static("req_id");
    /// Remaining requests in the window.
    pub const RATELIMIT_BURST: HeaderName =
        HeaderName::from_static("x-ms-ratelimit-burst-remaining-xrm-requests");
    /// Remaining execution time in the window.
    pub const RATELIMIT_TIME: HeaderName =
        HeaderName::from_static("x-ms-ratelimit-time-remaining-xrm-requests");
}

/// Hop-by-hop headers per RFC 9110 §7.6.1 (and the obsolete `Proxy-Connection`).
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "proxy-connection"
            | "keep-alive"
            | "te"
            | "transfer-encoding"
            | "upgrade"
            | "trailer"
    )
}

/// Request headers that never reach Dataverse as sent: hop-by-hop ones,
/// `Expect` (hyper's client cannot wait for `100 Continue`; the proxy's
/// server side answers the caller's), and the guarded ones (credentials,
/// cookies, impersonation and privileged headers; the policy puts back
/// what it allows).
fn is_dropped_upstream(name: &str) -> bool {
    is_hop_by_hop(name) || name == "expect" || crate::policy::is_guarded(name)
}

/// Response headers from Dataverse that are not passed to callers; CORS
/// headers are the proxy's own to give (`http/cors.rs`).
pub fn is_dropped_downstream(name: &str) -> bool {
    is_hop_by_hop(name)
        || name == "proxy-authenticate"
        || name == "set-cookie"
        || name.starts_with("access-control-")
}

/// Removes the headers named in `Connection`, then those `drop` selects.
///
/// One pass over the names finds what to remove (into a small array on the
/// stack: a request usually drops one to three headers), so a request with
/// nothing to strip costs no hashing and none costs an allocation.
fn strip(headers: &mut HeaderMap, drop: fn(&str) -> bool) {
    let mut doomed: [Option<HeaderName>; 8] = Default::default();
    let mut more: Vec<HeaderName> = Vec::new();
    let mut n = 0;
    let mut has_connection = false;
    for name in headers.keys() {
        if name == header::CONNECTION {
            has_connection = true;
        }
        if drop(name.as_str()) {
            match doomed.get_mut(n) {
                Some(slot) => *slot = Some(name.clone()),
                None => more.push(name.clone()),
            }
            n += 1;
        }
    }
    if has_connection {
        more.extend(
            headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                // The usual tokens name no header (or a hop-by-hop one,
                // already gone): no need to parse them as names.
                .filter(|t| {
                    !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close")
                })
                .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok()),
        );
    }
    for name in doomed.into_iter().flatten().chain(more) {
        headers.remove(name);
    }
}

/// Removes hop-by-hop headers, including those listed in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip(headers, is_hop_by_hop);
}

/// Prepares a caller's request headers for Dataverse: `host` (the org's)
/// replaces the caller's `Host`; the bearer is added by the caller of this.
pub fn to_upstream(headers: &mut HeaderMap, host: HeaderValue) {
    strip(headers, is_dropped_upstream);
    headers.insert(header::HOST, host);
}

/// Prepares Dataverse's response headers for the caller.
pub fn to_caller(headers: &mut HeaderMap) {
    strip(headers, is_dropped_downstream);
}

#[cfg(test)]
mod tests {
    use super::*;

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
            ("x-api-key", "caller-key"),
            ("host", "proxy.local"),
            ("CallerObjectId", "00000000-0000-0000-0000-000000000001"),
            ("MSCRMCallerID", "00000000-0000-0000-0000-000000000002"),
            ("if-match", "W/\"12\""),
            ("odata-version", "4.0"),
            ("MSCRM.BypassCustomPluginExecution", "true"),
            (
                "mscrm.bypassbusinesslogicexecution",
                "CustomSync,CustomAsync",
            ),
            ("MSCRM.SuppressCallbackRegistrationExpanderJob", "true"),
            ("cookie", "ARRAffinity=abc; ReqClientId=1"),
            ("mscrm.suppressduplicatedetection", "false"),
            ("x-ms-client-request-id", "abc"),
        ]);
        to_upstream(&mut h, HeaderValue::from_static("contoso.crm.dynamics.com"));
        assert_eq!(h[header::HOST], "contoso.crm.dynamics.com");
        h.remove(header::HOST);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "if-match",
                "mscrm.suppressduplicatedetection",
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
            (
                "set-cookie",
                "ARRAffinity=1; path=/; domain=.crm.dynamics.com",
            ),
            ("set-cookie", "ReqClientId=2; path=/"),
        ]);
        to_caller(&mut h);
        assert_eq!(h.len(), 4, "{h:?}");
    }
}
