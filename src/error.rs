//! Proxy-made errors: one enum, one status table, one conversion to HTTP.
//!
//! Every error the proxy itself produces becomes an OData-shaped JSON body
//! (`{"error":{"code":…,"message":…}}`) so Dataverse clients parse it, plus an
//! `x-dataverse-proxy-error` header carrying the same code, so callers can
//! tell proxy failures from Dataverse's own errors (which pass through
//! untouched and are never wrapped). Messages say what happened and what to
//! do in a plain sentence, and the body names the request id
//! (`innererror.requestid`) so a caller can quote it. They never contain
//! secrets, tokens or internal detail: the error's source chain (connect
//! errors with hosts and ports, egress proxy names, file paths) goes only to
//! the request's log line ([`ProxyError::log_detail`]).

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// What the request's log line says about a proxy-made error (a response
/// extension, read by the access log; never sent).
#[derive(Debug, Clone)]
pub struct ErrorDetail(pub String);

/// Header that marks a response as made by the proxy, valued with the error code.
pub const PROXY_ERROR_HEADER: HeaderName = HeaderName::from_static("x-dataverse-proxy-error");

/// An error produced by the proxy (not by Dataverse).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// 404: the path is not under `/api/data/v9.x/`.
    #[error("only /api/data/v9.0, v9.1 and v9.2 paths are proxied to Dataverse")]
    NotFound,
    /// 404: the path names no configured org and there is no default org.
    #[error(
        "no org matches this path: use /{{org name}}/api/data/v9.x/… (several orgs are configured and none is the default)"
    )]
    UnknownOrg,
    /// 405: a method outside the Web API's (GET, HEAD, POST, PATCH, PUT,
    /// DELETE); answered with an `Allow` header.
    #[error(
        "this method is not part of the Dataverse Web API; use GET, HEAD, POST, PATCH, PUT or DELETE"
    )]
    MethodNotAllowed,
    /// 414: the path or query is longer than the configured limit.
    #[error(
        "the request path or query is longer than the proxy accepts (limits.max_path, limits.max_query)"
    )]
    UriTooLong,
    /// 414: a GET's URL is longer than Dataverse takes even inside `$batch`.
    #[error(
        "the request URL is {0} characters long at Dataverse; Dataverse takes at most 65,536, even inside $batch: split the query"
    )]
    UrlTooLongForDataverse(usize),
    /// 431: the request headers are larger or more numerous than the limits.
    #[error("the request headers are too large (limits.max_header_bytes, limits.max_headers)")]
    HeadersTooLarge,
    /// 408: the caller stopped sending its body.
    #[error("the request body stalled for longer than limits.body_idle_timeout")]
    RequestTimeout,
    /// 413: the request body is larger than the configured limit.
    #[error("the request body is larger than the proxy accepts ({0} bytes, limits.max_body)")]
    BodyTooLarge(usize),
    /// 401: the caller's API key is missing or unknown.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 401: the caller's Entra ID token is not valid (expired, wrong
    /// audience or issuer, bad signature…); the reason is safe to show.
    #[error("the caller token is not valid ({0}); get a new token for the proxy's API")]
    InvalidCallerToken(&'static str),
    /// 403: a valid caller token that no caller rule admits.
    #[error(
        "the caller token is valid but no caller rule admits it (its app, roles, scopes or groups)"
    )]
    InsufficientCallerToken,
    /// 503: no signing keys to check caller tokens with (Entra ID unreachable
    /// since start-up); nothing is admitted unverified.
    #[error(
        "caller tokens cannot be checked now (no signing keys from Entra ID yet); try again later"
    )]
    CallerKeysUnavailable,
    /// 403: the caller may not use the proxy from here, or this org.
    #[error("{0}")]
    Forbidden(String),
    /// 403: the access policy does not allow this request.
    #[error("denied by the access policy: {0}")]
    PolicyDenied(String),
    /// 429: the caller used up its request-rate quota.
    #[error("this caller's request-rate quota is used up; retry later")]
    CallerQuota {
        /// When a request is allowed again.
        retry_after: Duration,
    },
    /// 429: the caller spent its `daily_requests` today.
    #[error(
        "caller {caller} has spent its daily budget of {budget} Power Platform requests ([[callers]] daily_requests); it renews at 00:00 UTC"
    )]
    CallerDailyBudget {
        caller: std::sync::Arc<str>,
        budget: u64,
        /// Until the next UTC midnight.
        retry_after: Duration,
    },
    /// 400: the request head cannot be forwarded (framing, target form).
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    /// 400: the path or query is ambiguous (dot segments, encoded
    /// separators, `%` not followed by two hex digits, control bytes).
    #[error("malformed request path: {0}")]
    BadPath(&'static str),
    /// 400: the caller's body is framed wrongly (a chunk size or chunk line
    /// that cannot be read, a body shorter than its `Content-Length`).
    #[error(
        "the request body is malformed: its framing could not be read; the request was not completed towards Dataverse"
    )]
    BadRequestBody,
    /// 400: a `$batch` body the proxy cannot read exactly, so cannot check.
    #[error("the $batch body cannot be checked: {0}")]
    BadBatch(String),
    /// 503: no valid access token (Entra ID unreachable or refusing).
    #[error(
        "no valid Dataverse access token is available ({reason}); the proxy keeps retrying Entra ID, try again later"
    )]
    TokenUnavailable {
        /// Why, in words safe to show a caller (an AADSTS code at most).
        reason: String,
        /// The whole story, for the log only (URLs, file names).
        detail: String,
        /// When the next fetch attempt is due.
        retry_after: Duration,
    },
    /// 403: the tenant never consented to the proxy acting for its users.
    #[error(
        "the proxy may not act for users of this tenant yet: an administrator must grant admin consent to its Dynamics CRM user_impersonation permission"
    )]
    ConsentRequired {
        /// Until the refusal is asked again.
        retry_after: Duration,
    },
    /// 401: the caller's token cannot be exchanged for the user's own.
    #[error("the caller's token can no longer be exchanged for a Dataverse token; sign in again")]
    DelegationRefused {
        /// Until the refusal is asked again.
        retry_after: Duration,
    },
    /// 401: Dataverse refused the user's freshly exchanged token.
    #[error(
        "Dataverse refused the user's token (the user may be disabled in this org or lack access to it); try again later"
    )]
    UserTokenRefused {
        /// Until the refusal is asked again.
        retry_after: Duration,
    },
    /// 401: Conditional Access wants more of the user's sign-in; `claims`
    /// is Entra's challenge, passed back for MSAL to step up.
    #[error(
        "Conditional Access requires the user to sign in again with more (MFA or a compliant device)"
    )]
    ClaimsRequired {
        /// The claims challenge (JSON), as Entra sent it.
        claims: String,
        /// Where the client signs the user in again.
        authorization_uri: String,
        /// Until this assertion's refusal is asked again.
        retry_after: Duration,
    },
    /// 503: the org's tables could not be read for the table policy.
    #[error(
        "the org's tables could not be read from its $metadata, so the policy's table list cannot be checked; try again later"
    )]
    PolicyTablesUnavailable(
        /// For the log only.
        String,
    ),
    /// 503: the caller is pinned to lanes the org does not run.
    #[error(
        "this caller is pinned to lanes (application users) this org does not run; the operator must restart the proxy with a configuration that runs them"
    )]
    CallerLaneUnavailable,
    /// 503: Entra ID could not exchange the user's token now.
    #[error("Entra ID could not exchange the caller's token now; try again later")]
    DelegationUnavailable {
        /// For the log only.
        detail: String,
        /// Until this assertion is exchanged again.
        retry_after: Duration,
    },
    /// 429: the governor's queue for the org is full.
    #[error(
        "too many requests are waiting for this Dataverse org (the proxy keeps it under its service-protection limits); retry later"
    )]
    GovernorQueueFull {
        /// Suggested wait.
        retry_after: Duration,
    },
    /// 429: the request waited in the governor's queue too long.
    #[error(
        "the request waited {waited:?} for a free slot towards this Dataverse org (service-protection limits); retry later"
    )]
    GovernorQueueTimeout {
        /// How long it waited.
        waited: Duration,
        /// Suggested wait.
        retry_after: Duration,
    },
    /// 502: the upstream could not be reached or broke the protocol.
    #[error("Dataverse could not be reached or broke the protocol; try again later")]
    UpstreamUnavailable(#[source] crate::upstream::UpstreamError),
    /// 502: the upstream broke off a (small, buffered) answer's body.
    #[error("Dataverse broke off its answer; try again later")]
    UpstreamBody(#[source] axum::BoxError),
    /// 504: the upstream did not send response headers in time.
    #[error("Dataverse did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    /// 500: a bug in the proxy (a panic while handling the request).
    #[error("the proxy failed while handling this request")]
    Internal,
}

impl ProxyError {
    /// The HTTP status for this error; exhaustive on purpose.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound | Self::UnknownOrg => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unauthorized(_)
            | Self::InvalidCallerToken(_)
            | Self::DelegationRefused { .. }
            | Self::UserTokenRefused { .. }
            | Self::ClaimsRequired { .. } => StatusCode::UNAUTHORIZED,
            Self::ConsentRequired { .. } => StatusCode::FORBIDDEN,
            Self::DelegationUnavailable { .. }
            | Self::CallerLaneUnavailable
            | Self::PolicyTablesUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Forbidden(_) | Self::PolicyDenied(_) | Self::InsufficientCallerToken => {
                StatusCode::FORBIDDEN
            }
            Self::CallerKeysUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::CallerQuota { .. } | Self::CallerDailyBudget { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::UriTooLong | Self::UrlTooLongForDataverse(_) => StatusCode::URI_TOO_LONG,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::BadRequest(_) | Self::BadPath(_) | Self::BadRequestBody | Self::BadBatch(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::TokenUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::GovernorQueueFull { .. } | Self::GovernorQueueTimeout { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::UpstreamUnavailable(_) | Self::UpstreamBody(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code, used in the body and the header.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::UnknownOrg => "unknown_org",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Unauthorized(_) => "unauthorized",
            Self::InvalidCallerToken(_) => "invalid_token",
            Self::InsufficientCallerToken => "insufficient_scope",
            Self::CallerKeysUnavailable => "caller_keys_unavailable",
            Self::Forbidden(_) => "forbidden",
            Self::PolicyDenied(_) => "policy_denied",
            Self::CallerQuota { .. } => "caller_quota_exceeded",
            Self::CallerDailyBudget { .. } => "caller_daily_budget_exhausted",
            Self::UriTooLong | Self::UrlTooLongForDataverse(_) => "uri_too_long",
            Self::HeadersTooLarge => "headers_too_large",
            Self::BodyTooLarge(_) => "body_too_large",
            Self::RequestTimeout => "request_timeout",
            Self::BadRequest(_) => "bad_request",
            Self::BadPath(_) => "bad_path",
            Self::BadRequestBody => "bad_request_body",
            Self::BadBatch(_) => "bad_batch",
            Self::TokenUnavailable { .. } => "token_unavailable",
            Self::ConsentRequired { .. } => "consent_required",
            Self::DelegationRefused { .. } => "invalid_token",
            Self::UserTokenRefused { .. } => "user_token_refused",
            Self::ClaimsRequired { .. } => "insufficient_claims",
            Self::DelegationUnavailable { .. } => "token_exchange_unavailable",
            Self::CallerLaneUnavailable => "caller_lane_unavailable",
            Self::PolicyTablesUnavailable(_) => "policy_tables_unavailable",
            Self::GovernorQueueFull { .. } => "governor_queue_full",
            Self::GovernorQueueTimeout { .. } => "governor_queue_timeout",
            Self::UpstreamUnavailable(_) | Self::UpstreamBody(_) => "upstream_unavailable",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::Internal => "internal_error",
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::TokenUnavailable { retry_after, .. }
            | Self::GovernorQueueFull { retry_after }
            | Self::GovernorQueueTimeout { retry_after, .. }
            | Self::CallerQuota { retry_after }
            | Self::CallerDailyBudget { retry_after, .. }
            | Self::ConsentRequired { retry_after }
            | Self::DelegationRefused { retry_after }
            | Self::UserTokenRefused { retry_after }
            | Self::ClaimsRequired { retry_after, .. }
            | Self::DelegationUnavailable { retry_after, .. } => Some(*retry_after),
            Self::CallerKeysUnavailable | Self::PolicyTablesUnavailable(_) => {
                Some(Duration::from_secs(5))
            }
            Self::NotFound
            | Self::UnknownOrg
            | Self::MethodNotAllowed
            | Self::Unauthorized(_)
            | Self::InvalidCallerToken(_)
            | Self::InsufficientCallerToken
            | Self::Forbidden(_)
            | Self::PolicyDenied(_)
            | Self::UriTooLong
            | Self::UrlTooLongForDataverse(_)
            | Self::HeadersTooLarge
            | Self::BodyTooLarge(_)
            | Self::RequestTimeout
            | Self::BadRequest(_)
            | Self::BadPath(_)
            | Self::BadRequestBody
            | Self::BadBatch(_)
            | Self::UpstreamUnavailable(_)
            | Self::UpstreamBody(_)
            | Self::UpstreamTimeout(_)
            | Self::CallerLaneUnavailable
            | Self::Internal => None,
        }
    }

    /// What the request's log line says: the caller's sentence plus the
    /// source chain and anything else kept from callers.
    pub fn log_detail(&self) -> String {
        let mut msg = self.to_string();
        if let Self::TokenUnavailable { detail, .. }
        | Self::DelegationUnavailable { detail, .. }
        | Self::PolicyTablesUnavailable(detail) = self
        {
            msg.push_str(": ");
            msg.push_str(detail);
        }
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        msg
    }

    /// The answer for a caller: status, code header, OData body naming
    /// `request_id` (when known), and the detail for the log line.
    pub fn to_response(&self, request_id: Option<&HeaderValue>) -> Response {
        let mut error = serde_json::json!({ "code": self.code(), "message": self.to_string() });
        if let Some(id) = request_id.and_then(|v| v.to_str().ok()) {
            error["innererror"] = serde_json::json!({ "requestid": id });
        }
        let mut resp = (
            self.status(),
            axum::Json(serde_json::json!({ "error": error })),
        )
            .into_response();
        // Logged once, by the access log, not here.
        resp.extensions_mut().insert(ErrorDetail(self.log_detail()));
        let h = resp.headers_mut();
        h.insert(PROXY_ERROR_HEADER, HeaderValue::from_static(self.code()));
        match self {
            Self::Unauthorized(_) => {
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                h.append(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("ApiKey header=\"X-API-Key\""),
                );
            }
            Self::InvalidCallerToken(why) => {
                let challenge =
                    format!("Bearer error=\"invalid_token\", error_description=\"{why}\"");
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    h.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            Self::InsufficientCallerToken => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"insufficient_scope\""),
                );
            }
            Self::DelegationRefused { .. } | Self::UserTokenRefused { .. } => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            Self::ClaimsRequired {
                claims,
                authorization_uri,
                ..
            } => {
                // Microsoft's claims challenge: MSAL reads `claims` (base64
                // of Entra's JSON) and asks the user to step up.
                use base64::Engine;
                let encoded = base64::engine::general_purpose::STANDARD.encode(claims);
                let challenge = format!(
                    "Bearer realm=\"\", authorization_uri=\"{authorization_uri}\", error=\"insufficient_claims\", claims=\"{encoded}\""
                );
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    h.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            Self::MethodNotAllowed => {
                h.insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
            }
            // The unread (or unreadable) body must not reach a reused connection.
            Self::BodyTooLarge(_) | Self::RequestTimeout | Self::BadRequestBody => {
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        if let Some(after) = self.retry_after() {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// The methods of the Dataverse Web API: the only ones the proxy forwards,
/// as the `Allow` header of a 405 says.
pub const ALLOWED_METHODS: &str = "GET, HEAD, POST, PATCH, PUT, DELETE";

impl From<crate::token::TokenUnavailable> for ProxyError {
    fn from(e: crate::token::TokenUnavailable) -> Self {
        Self::TokenUnavailable {
            reason: e.reason,
            detail: e.detail,
            retry_after: e.retry_after,
        }
    }
}

impl From<crate::token::Refused> for ProxyError {
    fn from(e: crate::token::Refused) -> Self {
        use crate::token::OboError;
        let retry_after = e.retry_after;
        match e.reason {
            OboError::ConsentRequired => Self::ConsentRequired { retry_after },
            OboError::InvalidGrant => Self::DelegationRefused { retry_after },
            OboError::RefusedByDataverse => Self::UserTokenRefused { retry_after },
            OboError::ClaimsChallenge {
                claims,
                authorization_uri,
            } => Self::ClaimsRequired {
                claims,
                authorization_uri,
                retry_after,
            },
            OboError::Unavailable { detail } => Self::DelegationUnavailable {
                detail,
                retry_after,
            },
        }
    }
}

impl From<crate::governor::GovernorError> for ProxyError {
    fn from(e: crate::governor::GovernorError) -> Self {
        use crate::governor::GovernorError;
        match e {
            GovernorError::QueueFull { retry_after } => Self::GovernorQueueFull { retry_after },
            GovernorError::QueueTimeout {
                waited,
                retry_after,
            } => Self::GovernorQueueTimeout {
                waited,
                retry_after,
            },
        }
    }
}

impl From<crate::guard::PathError> for ProxyError {
    fn from(e: crate::guard::PathError) -> Self {
        match e {
            crate::guard::PathError::OutsideApi => Self::NotFound,
            crate::guard::PathError::Ambiguous(why) => Self::BadPath(why),
        }
    }
}

impl From<crate::policy::PolicyError> for ProxyError {
    fn from(e: crate::policy::PolicyError) -> Self {
        match e {
            crate::policy::PolicyError::Denied(why) => Self::PolicyDenied(why),
            crate::policy::PolicyError::BadBatch(why) => Self::BadBatch(why),
        }
    }
}

impl From<crate::callers::AdmissionError> for ProxyError {
    fn from(e: crate::callers::AdmissionError) -> Self {
        use crate::callers::AdmissionError;
        match e {
            AdmissionError::Unauthorized(why) => Self::Unauthorized(why),
            AdmissionError::Token(crate::identity::TokenError::Invalid(why)) => {
                Self::InvalidCallerToken(why)
            }
            AdmissionError::Token(crate::identity::TokenError::KeysUnavailable) => {
                Self::CallerKeysUnavailable
            }
            AdmissionError::InsufficientToken => Self::InsufficientCallerToken,
            AdmissionError::Forbidden(why) => Self::Forbidden(why),
            AdmissionError::Quota { retry_after } => Self::CallerQuota { retry_after },
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        self.to_response(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table_is_pinned() {
        let cases = [
            (ProxyError::NotFound, 404, "not_found"),
            (ProxyError::BadRequest("x"), 400, "bad_request"),
            (
                ProxyError::TokenUnavailable {
                    reason: "r".into(),
                    detail: "d".into(),
                    retry_after: Duration::from_millis(1500),
                },
                503,
                "token_unavailable",
            ),
            (
                ProxyError::GovernorQueueFull {
                    retry_after: Duration::from_secs(2),
                },
                429,
                "governor_queue_full",
            ),
            (
                ProxyError::UpstreamTimeout(Duration::from_secs(1)),
                504,
                "upstream_timeout",
            ),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.status().as_u16(), status);
            assert_eq!(err.code(), code);
            let resp = err.into_response();
            assert_eq!(resp.headers()[&PROXY_ERROR_HEADER], code);
            if status == 503 || status == 429 {
                assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
            }
        }
    }
}
