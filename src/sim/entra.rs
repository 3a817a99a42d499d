//! Simulated Entra ID v2 token endpoint (dossier §1.1, §1.5, §1.6).
//!
//! `POST /{tenant}/oauth2/v2.0/token` with `grant_type=client_credentials`,
//! the client secret in the form body or in HTTP Basic, and
//! `scope={org}/.default` (the `//.default` form of Microsoft's samples is
//! accepted too). Errors carry Entra's JSON shape, AADSTS codes and statuses:
//! 401 `invalid_client` for a bad or missing secret, 400 for an unknown app,
//! an unknown tenant or a bad scope.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use bytes::Bytes;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{SimState, lock, now_epoch, utc_timestamp};

/// Claims of a simulated Dataverse access token (v1 token format, as Entra
/// issues for Dataverse).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Audience: the org URL.
    pub aud: String,
    /// Issuer: `https://sts.windows.net/{tenant}/`.
    pub iss: String,
    /// Issued at (epoch seconds).
    pub iat: u64,
    /// Not before (epoch seconds).
    pub nbf: u64,
    /// Expiry (epoch seconds).
    pub exp: u64,
    /// The client id of the app.
    pub appid: String,
    /// Object id of the app's service principal.
    pub oid: String,
    /// Subject (same as `oid` for app-only tokens).
    pub sub: String,
    /// Tenant id.
    pub tid: String,
    /// Unique token id.
    pub uti: String,
    /// Token version.
    pub ver: String,
}

pub(super) fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .with_state(state)
}

/// Entra's error JSON with its trace lines.
fn entra_error(status: StatusCode, error: &str, code: u32, message: &str) -> Response {
    let trace_id = Uuid::new_v4();
    let correlation_id = Uuid::new_v4();
    let timestamp = utc_timestamp(now_epoch());
    let body = serde_json::json!({
        "error": error,
        "error_description": format!(
            "AADSTS{code}: {message}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {timestamp}"
        ),
        "error_codes": [code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    let mut resp = (status, axum::Json(body)).into_response();
    no_store(resp.headers_mut());
    resp
}

fn no_store(h: &mut HeaderMap) {
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache"),
    );
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&Uuid::new_v4().to_string()) {
        h.insert("x-ms-request-id", v);
    }
}

/// Client id and secret from an `Authorization: Basic` header (RFC 6749 §2.3.1).
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    let unescape = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    Some((unescape(id)?, unescape(secret)?))
}

async fn token(
    State(sim): State<Arc<SimState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    sim.token_requests.fetch_add(1, Ordering::SeqCst);

    if sim.entra_down.load(Ordering::SeqCst)
        || sim
            .fail_token_requests
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    {
        return entra_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            50033,
            "The service is temporarily unavailable. Retry the request.",
        );
    }

    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let cfg = &sim.config;

    if tenant.eq_ignore_ascii_case("common") || tenant.eq_ignore_ascii_case("consumers") {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            9001023,
            "The grant type isn't supported over the /common or /consumers endpoints. Please use the /organizations or tenant-specific endpoint.",
        );
    }
    if tenant != cfg.tenant_id {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            &format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            ),
        );
    }
    match form.get("grant_type").map(String::as_str) {
        Some("client_credentials") => {}
        Some(other) => {
            return entra_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                &format!("The app requested an unsupported grant type '{other}'."),
            );
        }
        None => {
            return entra_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'grant_type'.",
            );
        }
    }

    let basic = basic_credentials(&headers);
    let client_id = form
        .get("client_id")
        .cloned()
        .or_else(|| basic.as_ref().map(|(id, _)| id.clone()));
    let Some(client_id) = client_id else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'client_id'.",
        );
    };
    if client_id != cfg.client_id {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."
            ),
        );
    }
    let secret = form
        .get("client_secret")
        .cloned()
        .or_else(|| basic.map(|(_, s)| s));
    match secret {
        None => {
            return entra_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            );
        }
        Some(s) if s != cfg.client_secret => {
            return entra_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000215,
                &format!(
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."
                ),
            );
        }
        Some(_) => {}
    }

    if form.contains_key("resource") {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            901002,
            "The 'resource' request parameter isn't supported.",
        );
    }
    let Some(scope) = form.get("scope") else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'scope'.",
        );
    };
    let Some(resource) = scope
        .strip_suffix("//.default")
        .or_else(|| scope.strip_suffix("/.default"))
    else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            &format!(
                "The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
            ),
        );
    };
    if resource.trim_end_matches('/') != sim.org_url {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_resource",
            500011,
            &format!(
                "The resource principal named {resource} was not found in the tenant named {tenant}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant."
            ),
        );
    }

    let lifetime = *lock(&sim.token_lifetime);
    let refresh_in = *lock(&sim.refresh_in);
    let now = now_epoch();
    let oid = Uuid::new_v5(&Uuid::NAMESPACE_OID, client_id.as_bytes()).to_string();
    let claims = Claims {
        aud: sim.org_url.clone(),
        iss: format!("https://sts.windows.net/{tenant}/"),
        iat: now,
        nbf: now,
        exp: now + lifetime.as_secs(),
        appid: client_id,
        sub: oid.clone(),
        oid,
        tid: tenant,
        uti: Uuid::new_v4().simple().to_string(),
        ver: "1.0".to_owned(),
    };
    let mut jwt_header = Header::new(Algorithm::HS256);
    jwt_header.kid = Some("sim-key".to_owned());
    let access_token = match jsonwebtoken::encode(
        &jwt_header,
        &claims,
        &EncodingKey::from_secret(&sim.signing_key),
    ) {
        Ok(t) => t,
        Err(e) => {
            return entra_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                50000,
                &format!("could not sign the token: {e}"),
            );
        }
    };
    let secs = lifetime.as_secs();
    let mut body = serde_json::json!({
        "token_type": "Bearer",
        "expires_in": secs,
        "ext_expires_in": secs,
        "access_token": access_token,
    });
    if let Some(r) = refresh_in {
        body["refresh_in"] = serde_json::json!(r.as_secs());
    }
    let mut resp = (StatusCode::OK, axum::Json(body)).into_response();
    no_store(resp.headers_mut());
    resp
}
