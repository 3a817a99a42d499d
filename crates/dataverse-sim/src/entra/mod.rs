//! Simulated Entra ID (docs/dataverse.md, "Tokens").
//!
//! - `POST /{tenant}/oauth2/v2.0/token`: client credentials with
//!   `scope={org}/.default` (the `//.default` form of Microsoft's samples is
//!   accepted too); numbers in the answer are JSON integers.
//! - `POST /{tenant}/oauth2/token`: the v1 endpoint with `resource={org}`;
//!   numbers are strings.
//! - The same endpoints issue caller tokens for the proxy's own API to
//!   registered caller apps, and publish their keys (`callers`).
//! - Client authentication: a secret in the form body or in HTTP Basic; a
//!   certificate assertion (RS256 + `x5t` or PS256 + `x5t#S256`, `aud` = this
//!   endpoint, `iss` = `sub` = client id, a fresh `jti`, optional `x5c`)
//!   verified against the registered certificate; or a federated assertion
//!   (workload identity) verified against the registered issuer key.
//! - `GET /metadata/identity/oauth2/token` (IMDS, `Metadata: true`, string
//!   numbers) and `GET /msi/token` (App Service, `X-IDENTITY-HEADER`,
//!   `expires_on` as an integer, no `expires_in`): managed identity.
//!
//! Errors carry Entra's JSON shape, AADSTS codes and statuses: 401
//! `invalid_client` for a bad secret or assertion, 400 for an unknown app,
//! an unknown tenant or a bad scope.

// Handlers return early with ready-made responses; their size is irrelevant
// off the proxy's hot path.
#![expect(
    clippy::result_large_err,
    reason = "simulator code, not on the hot path"
)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use bytes::Bytes;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use uuid::Uuid;

use super::{EntraState, FEDERATION_AUDIENCE, lock, now_epoch, utc_timestamp};

mod assertion;
mod callers;
mod managed;
pub mod obo;

pub use callers::{CallerApp, CallerKey, TokenSubject, issuer};
pub(super) use callers::{CallerDirectory, claims as caller_claims};

use assertion::*;
use managed::*;

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
    /// How the app authenticated: `1` secret, `2` certificate or assertion,
    /// `0` managed identity.
    pub appidacr: String,
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
    /// Delegated scopes: set on a user's token (on-behalf-of), absent on
    /// an app's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scp: Option<String>,
}

pub(super) fn router(state: Arc<EntraState>) -> Router {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token_v2))
        .route("/{tenant}/oauth2/token", post(token_v1))
        .route(
            "/{tenant}/v2.0/.well-known/openid-configuration",
            get(callers::discovery_v2),
        )
        .route(
            "/{tenant}/.well-known/openid-configuration",
            get(callers::discovery_v1),
        )
        .route("/{tenant}/discovery/v2.0/keys", get(callers::keys))
        .route("/{tenant}/discovery/keys", get(callers::keys))
        .route("/metadata/identity/oauth2/token", get(imds))
        .route("/msi/token", get(app_service))
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

/// Counts the request and applies the outage switches.
fn gate(sim: &EntraState) -> Result<(), Response> {
    sim.token_requests.fetch_add(1, Ordering::SeqCst);
    let failing = sim.entra_down.load(Ordering::SeqCst)
        || sim
            .fail_token_requests
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    if failing {
        return Err(entra_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            50033,
            "The service is temporarily unavailable. Retry the request.",
        ));
    }
    Ok(())
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

async fn token_v2(
    State(sim): State<Arc<EntraState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let endpoint = format!("{}/{tenant}/oauth2/v2.0/token", sim.url);
    token(&sim, &tenant, &headers, &body, &endpoint, Version::V2)
}

async fn token_v1(
    State(sim): State<Arc<EntraState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let endpoint = format!("{}/{tenant}/oauth2/token", sim.url);
    token(&sim, &tenant, &headers, &body, &endpoint, Version::V1)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

fn token(
    sim: &EntraState,
    tenant: &str,
    headers: &HeaderMap,
    body: &[u8],
    endpoint: &str,
    version: Version,
) -> Response {
    *lock(&sim.last_request) = Some((headers.clone(), String::from_utf8_lossy(body).into_owned()));
    if let Err(resp) = gate(sim) {
        return resp;
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    match issue_for_client(sim, tenant, headers, &form, endpoint, version) {
        Ok(resp) | Err(resp) => resp,
    }
}

/// Issues a token to the configured client, or Entra ID's error: the
/// tenant, the grant type, the client and its credential, the resource.
fn issue_for_client(
    sim: &EntraState,
    tenant: &str,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    endpoint: &str,
    version: Version,
) -> Result<Response, Response> {
    check_tenant(sim, tenant)?;
    if form.get("grant_type").map(String::as_str) == Some(obo::JWT_BEARER) {
        return obo::issue(sim, tenant, headers, form, endpoint);
    }
    check_grant_type(form)?;
    if let Some(api) = requested_resource(form, version)
        .ok()
        .filter(|r| callers::is_api(sim, r))
    {
        return callers::issue(sim, tenant, headers, form, version, &api);
    }
    let basic = basic_credentials(headers);
    let client_id = client_id(sim, tenant, form, basic.as_ref())?;
    let acr = authenticate(sim, form, basic, &client_id, endpoint)?;
    let resource = requested_resource(form, version)?;
    let org = check_resource(sim, &resource, tenant)?;
    let (token, secs) = sign(sim, &org, tenant, &client_id, acr)?;
    let mut resp = (
        StatusCode::OK,
        axum::Json(token_body(sim, version, &token, secs, &resource)),
    )
        .into_response();
    no_store(resp.headers_mut());
    Ok(resp)
}

fn bad_request(error: &str, code: u32, message: &str) -> Response {
    entra_error(StatusCode::BAD_REQUEST, error, code, message)
}

fn check_tenant(sim: &EntraState, tenant: &str) -> Result<(), Response> {
    if tenant.eq_ignore_ascii_case("common") || tenant.eq_ignore_ascii_case("consumers") {
        return Err(bad_request(
            "invalid_request",
            9001023,
            "The grant type isn't supported over the /common or /consumers endpoints. Please use the /organizations or tenant-specific endpoint.",
        ));
    }
    if !lock(&sim.tenants).iter().any(|t| t == tenant) {
        return Err(bad_request(
            "invalid_request",
            90002,
            &format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            ),
        ));
    }
    Ok(())
}

fn check_grant_type(form: &HashMap<String, String>) -> Result<(), Response> {
    match form.get("grant_type").map(String::as_str) {
        Some("client_credentials") => Ok(()),
        Some(other) => Err(bad_request(
            "unsupported_grant_type",
            70003,
            &format!("The app requested an unsupported grant type '{other}'."),
        )),
        None => Err(bad_request(
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'grant_type'.",
        )),
    }
}

/// The client id, from the form or HTTP Basic; it must be the configured app.
fn client_id(
    sim: &EntraState,
    tenant: &str,
    form: &HashMap<String, String>,
    basic: Option<&(String, String)>,
) -> Result<String, Response> {
    let Some(client_id) = form
        .get("client_id")
        .cloned()
        .or_else(|| basic.map(|(id, _)| id.clone()))
    else {
        return Err(bad_request(
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'client_id'.",
        ));
    };
    if client_id != sim.config.client_id && !lock(&sim.app_users).contains_key(&client_id) {
        return Err(bad_request(
            "unauthorized_client",
            700016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."
            ),
        ));
    }
    Ok(client_id)
}

/// Checks the client's secret or assertion; the `acr` claim it earns
/// (`1` for a secret, `2` for a certificate or federated assertion).
fn authenticate(
    sim: &EntraState,
    form: &HashMap<String, String>,
    basic: Option<(String, String)>,
    client_id: &str,
    endpoint: &str,
) -> Result<&'static str, Response> {
    let secret = form
        .get("client_secret")
        .cloned()
        .or_else(|| basic.map(|(_, s)| s));
    // The org's own app, or one of its other application users.
    let expected = lock(&sim.app_users)
        .get(client_id)
        .cloned()
        .unwrap_or_else(|| sim.config.client_secret.clone());
    match (secret, form.get("client_assertion")) {
        (Some(s), _) if s != expected => Err(entra_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            &format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."
            ),
        )),
        (Some(_), _) => Ok("1"),
        (None, Some(assertion)) => {
            if form.get("client_assertion_type").map(String::as_str)
                != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            {
                return Err(bad_request(
                    "invalid_request",
                    50027,
                    "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer.",
                ));
            }
            check_assertion(sim, assertion, client_id, endpoint)?;
            Ok("2")
        }
        (None, None) => Err(entra_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        )),
    }
}

/// The resource asked for: `scope` ending in `/.default` (v2) or `resource` (v1).
fn requested_resource(
    form: &HashMap<String, String>,
    version: Version,
) -> Result<String, Response> {
    let missing = |name: &str| {
        bad_request(
            "invalid_request",
            900144,
            &format!("The request body must contain the following parameter: '{name}'."),
        )
    };
    if version == Version::V1 {
        return form
            .get("resource")
            .cloned()
            .ok_or_else(|| missing("resource"));
    }
    if form.contains_key("resource") {
        return Err(bad_request(
            "invalid_request",
            901002,
            "The 'resource' request parameter isn't supported.",
        ));
    }
    let scope = form.get("scope").ok_or_else(|| missing("scope"))?;
    scope
        .strip_suffix("//.default")
        .or_else(|| scope.strip_suffix("/.default"))
        .map(str::to_owned)
        .ok_or_else(|| {
            bad_request(
                "invalid_scope",
                1002012,
                &format!("The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."),
            )
        })
}

/// The token response: v2 numbers are numbers, v1 numbers are strings.
fn token_body(
    sim: &EntraState,
    version: Version,
    token: &str,
    secs: u64,
    resource: &str,
) -> serde_json::Value {
    let mut body = match version {
        Version::V2 => serde_json::json!({
            "token_type": "Bearer",
            "expires_in": secs,
            "ext_expires_in": secs,
            "access_token": token,
        }),
        Version::V1 => {
            let now = now_epoch();
            serde_json::json!({
                "token_type": "Bearer",
                "expires_in": secs.to_string(),
                "ext_expires_in": secs.to_string(),
                "expires_on": (now + secs).to_string(),
                "not_before": now.to_string(),
                "resource": resource,
                "access_token": token,
            })
        }
    };
    if let Some(r) = *lock(&sim.refresh_in) {
        body["refresh_in"] = match version {
            Version::V2 => serde_json::json!(r.as_secs()),
            Version::V1 => serde_json::json!(r.as_secs().to_string()),
        };
    }
    body
}

/// The org a resource names, if it lives in `tenant`.
fn check_resource(sim: &EntraState, resource: &str, tenant: &str) -> Result<String, Response> {
    let wanted = resource.trim_end_matches('/');
    let orgs = lock(&sim.orgs);
    orgs.iter()
        .find(|(url, t)| url == wanted && t == tenant)
        .map(|(url, _)| url.clone())
        .ok_or_else(|| {
            entra_error(
                StatusCode::BAD_REQUEST,
                "invalid_resource",
                500011,
                &format!("The resource principal named {resource} was not found in the tenant named {tenant}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant."),
            )
        })
}

/// Signs an app's access token; returns it and its lifetime in seconds.
fn sign(
    sim: &EntraState,
    org: &str,
    tenant: &str,
    client_id: &str,
    acr: &str,
) -> Result<(String, u64), Response> {
    let oid = Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("{tenant}/{client_id}").as_bytes(),
    )
    .to_string();
    sign_for(sim, (org, tenant), (client_id, acr), (&oid, None))
}

/// Signs a Dataverse token of `org` issued to `client_id` for the
/// principal `oid`: the app itself, or (with `scp`) a user it acts for.
fn sign_for(
    sim: &EntraState,
    (org, tenant): (&str, &str),
    (client_id, acr): (&str, &str),
    (oid, scp): (&str, Option<&str>),
) -> Result<(String, u64), Response> {
    let lifetime = *lock(&sim.token_lifetime);
    let now = now_epoch();
    let claims = Claims {
        aud: org.to_owned(),
        iss: format!("https://sts.windows.net/{tenant}/"),
        iat: now,
        nbf: now,
        exp: now + lifetime.as_secs(),
        appid: client_id.to_owned(),
        appidacr: acr.to_owned(),
        sub: oid.to_owned(),
        oid: oid.to_owned(),
        tid: tenant.to_owned(),
        uti: Uuid::new_v4().simple().to_string(),
        ver: "1.0".to_owned(),
        scp: scp.map(str::to_owned),
    };
    lock(&sim.issued).push(claims.uti.clone());
    let mut jwt_header = Header::new(Algorithm::HS256);
    jwt_header.kid = Some("sim-key".to_owned());
    jsonwebtoken::encode(
        &jwt_header,
        &claims,
        &EncodingKey::from_secret(&sim.signing_key),
    )
    .map(|t| (t, lifetime.as_secs()))
    .map_err(|e| {
        entra_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            50000,
            &format!("could not sign the token: {e}"),
        )
    })
}
