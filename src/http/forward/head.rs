//! What Dataverse's answer head says, read in one pass over its headers.
//!
//! The send and answer steps need about a dozen facts from the answer's
//! headers (rate-limit remainders, the parallelism hint, Dataverse's request
//! id, coding, type, length, link headers, headers callers must not get).
//! Asked one `HeaderMap::get` at a time they cost a hash and a probe each;
//! one walk over the (usually 10–20) entries compares names instead.

use axum::http::{HeaderMap, HeaderValue, header};

use crate::compression::BodyCoding;

/// The facts of one answer head.
#[derive(Debug, Clone, Default)]
pub struct AnswerHead {
    /// `x-ms-dop-hint`: Dataverse's recommended parallelism.
    pub dop_hint: Option<usize>,
    /// `x-ms-ratelimit-burst-remaining-xrm-requests`.
    pub burst_remaining: Option<u64>,
    /// `x-ms-ratelimit-time-remaining-xrm-requests`, in milliseconds.
    pub time_remaining_ms: Option<u64>,
    /// `x-ms-service-request-id`, else `req_id` (on errors).
    pub request_id: Option<HeaderValue>,
    /// `Content-Encoding`.
    pub coding: BodyCoding,
    /// `Content-Type` is JSON or `multipart/mixed` (links may be inside).
    pub rewritable: bool,
    /// `Content-Length`.
    pub content_length: Option<usize>,
    /// `OData-EntityId`, `Location` or `Content-Location` is present.
    pub link_headers: bool,
    /// A header callers must not get is present (hop-by-hop, cookies,
    /// CORS, `Proxy-Authenticate`).
    pub for_upstream_only: bool,
}

impl AnswerHead {
    /// Reads `headers` once.
    pub fn read(headers: &HeaderMap) -> Self {
        let mut head = Self::default();
        let mut service_id = None;
        let mut req_id = None;
        let mut encodings = 0;
        let mut encoding = None;
        for (name, value) in headers {
            if name == header::CONTENT_TYPE {
                head.rewritable = crate::http::body::is_rewritable_type(value);
            } else if name == header::CONTENT_LENGTH {
                head.content_length = number(value);
            } else if name == header::CONTENT_ENCODING {
                encodings += 1;
                encoding = Some(value);
            } else if name == header::LOCATION || name == header::CONTENT_LOCATION {
                head.link_headers = true;
            } else {
                match name.as_str() {
                    "x-ms-dop-hint" => head.dop_hint = number(value),
                    "x-ms-ratelimit-burst-remaining-xrm-requests" => {
                        head.burst_remaining = number(value);
                    }
                    "x-ms-ratelimit-time-remaining-xrm-requests" => {
                        head.time_remaining_ms = value
                            .to_str()
                            .ok()
                            .and_then(crate::stats::metrics::parse_seconds)
                            .map(|s| (s * 1000.0) as u64);
                    }
                    "x-ms-service-request-id" => service_id = Some(value),
                    "req_id" => req_id = Some(value),
                    "odata-entityid" => head.link_headers = true,
                    other => {
                        head.for_upstream_only |=
                            crate::http::headers::is_dropped_downstream(other);
                    }
                }
            }
        }
        head.request_id = service_id.or(req_id).cloned();
        head.coding = match (encodings, encoding) {
            (0, _) => BodyCoding::Identity,
            (1, Some(v)) => BodyCoding::of_value(v),
            _ => BodyCoding::Unknown,
        };
        head
    }
}

fn number<T: std::str::FromStr>(value: &HeaderValue) -> Option<T> {
    value.to_str().ok().and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(pairs: &[(&str, &str)]) -> AnswerHead {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        AnswerHead::read(&h)
    }

    #[test]
    fn one_pass_reads_what_the_steps_need() {
        let h = head(&[
            ("content-type", "application/json; odata.metadata=minimal"),
            ("content-length", "2195"),
            ("content-encoding", "gzip"),
            ("x-ms-dop-hint", "8"),
            ("x-ms-ratelimit-burst-remaining-xrm-requests", "5999"),
            ("x-ms-ratelimit-time-remaining-xrm-requests", "1,199.83"),
            ("req_id", "r-1"),
            ("x-ms-service-request-id", "s-1"),
            (
                "odata-entityid",
                "https://org.crm.dynamics.com/api/data/v9.2/accounts(1)",
            ),
        ]);
        assert!(h.rewritable && h.link_headers && !h.for_upstream_only);
        assert_eq!(h.content_length, Some(2195));
        assert_eq!(
            h.coding,
            BodyCoding::Coded(crate::compression::Coding::Gzip)
        );
        assert_eq!(
            (h.dop_hint, h.burst_remaining, h.time_remaining_ms),
            (Some(8), Some(5999), Some(1_199_830))
        );
        assert_eq!(
            h.request_id.as_ref().map(HeaderValue::as_bytes),
            Some(&b"s-1"[..])
        );
    }

    #[test]
    fn what_callers_must_not_get_and_unusual_codings_are_noticed() {
        let h = head(&[("set-cookie", "ARRAffinity=x"), ("req_id", "r-1")]);
        assert!(h.for_upstream_only && !h.rewritable && !h.link_headers);
        assert_eq!(
            h.request_id.as_ref().map(HeaderValue::as_bytes),
            Some(&b"r-1"[..])
        );
        assert_eq!(h.coding, BodyCoding::Identity);
        assert!(head(&[("transfer-encoding", "chunked")]).for_upstream_only);
        assert!(head(&[("connection", "x-hop")]).for_upstream_only);
        let two = head(&[("content-encoding", "gzip"), ("content-encoding", "br")]);
        assert_eq!(two.coding, BodyCoding::Unknown);
        assert_eq!(
            head(&[("content-encoding", "identity")]).coding,
            BodyCoding::Identity
        );
        assert_eq!(
            head(&[("content-encoding", "zstd-x")]).coding,
            BodyCoding::Unknown
        );
    }
}
