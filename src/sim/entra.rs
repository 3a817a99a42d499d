//! Simulated Entra ID (dossier §1).
//!
//! - `POST /{tenant}/oauth2/v2.0/token`: client credentials with
//!   `scope={org}/.default` (the `//.default` form of Microsoft's samples is
//!   accepted too); numbers in the answer are JSON integers.
//! - `POST /{tenant}/oauth2/token`: the v1 endpoint with `resource={org}`;
//!   numbers are strings.
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
}

pub(super) fn router(state: Arc<EntraState>) -> Router {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token_v2))
        .route("/{tenant}/oauth2/token", post(token_v1))
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

#[expect(
    clippy::result_large_err,
    reason = "simulator code, not on the hot path"
)]
fn issue_for_client(
    sim: &EntraState,
    tenant: &str,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    endpoint: &str,
    version: Version,
) -> Result<Response, Response> {
    let cfg = &sim.config;
    if tenant.eq_ignore_ascii_case("common") || tenant.eq_ignore_ascii_case("consumers") {
        return Err(entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            9001023,
            "The grant type isn't supported over the /common or /consumers endpoints. Please use the /organizations or tenant-specific endpoint.",
        ));
    }
    if !lock(&sim.tenants).iter().any(|t| t == tenant) {
        return Err(entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            &format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            ),
        ));
    }
    match form.get("grant_type").map(String::as_str) {
        Some("client_credentials") => {}
        Some(other) => {
            return Err(entra_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                &format!("The app requested an unsupported grant type '{other}'."),
            ));
        }
        None => {
            return Err(entra_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'grant_type'.",
            ));
        }
    }

    let basic = basic_credentials(headers);
    let client_id = form
        .get("client_id")
        .cloned()
        .or_else(|| basic.as_ref().map(|(id, _)| id.clone()));
    let Some(client_id) = client_id else {
        return Err(entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'client_id'.",
        ));
    };
    if client_id != cfg.client_id {
        return Err(entra_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."
            ),
        ));
    }
    let secret = form
        .get("client_secret")
        .cloned()
        .or_else(|| basic.map(|(_, s)| s));
    let acr = match (secret, form.get("client_assertion")) {
        (Some(s), _) if s != cfg.client_secret => {
            return Err(entra_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000215,
                &format!(
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."
                ),
            ));
        }
        (Some(_), _) => "1",
        (None, Some(assertion)) => {
            if form.get("client_assertion_type").map(String::as_str)
                != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            {
                return Err(entra_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    50027,
                    "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer.",
                ));
            }
            check_assertion(sim, assertion, &client_id, endpoint)?;
            "2"
        }
        (None, None) => {
            return Err(entra_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            ));
        }
    };

    let resource = match version {
        Version::V2 => {
            if form.contains_key("resource") {
                return Err(entra_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    901002,
                    "The 'resource' request parameter isn't supported.",
                ));
            }
            let Some(scope) = form.get("scope") else {
                return Err(entra_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    900144,
                    "The request body must contain the following parameter: 'scope'.",
                ));
            };
            scope
                .strip_suffix("//.default")
                .or_else(|| scope.strip_suffix("/.default"))
                .ok_or_else(|| {
                    entra_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_scope",
                        1002012,
                        &format!("The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."),
                    )
                })?
                .to_owned()
        }
        Version::V1 => form.get("resource").cloned().ok_or_else(|| {
            entra_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'resource'.",
            )
        })?,
    };
    let org = check_resource(sim, &resource, tenant)?;
    let (token, secs) = sign(sim, &org, tenant, &client_id, acr)?;
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
    let mut resp = (StatusCode::OK, axum::Json(body)).into_response();
    no_store(resp.headers_mut());
    Ok(resp)
}

/// The org a resource names, if it lives in `tenant`.
#[expect(
    clippy::result_large_err,
    reason = "simulator code, not on the hot path"
)]
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

/// Signs an access token; returns it and its lifetime in seconds.
#[expect(
    clippy::result_large_err,
    reason = "simulator code, not on the hot path"
)]
fn sign(
    sim: &EntraState,
    org: &str,
    tenant: &str,
    client_id: &str,
    acr: &str,
) -> Result<(String, u64), Response> {
    let lifetime = *lock(&sim.token_lifetime);
    let now = now_epoch();
    let oid = Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("{tenant}/{client_id}").as_bytes(),
    )
    .to_string();
    let claims = Claims {
        aud: org.to_owned(),
        iss: format!("https://sts.windows.net/{tenant}/"),
        iat: now,
        nbf: now,
        exp: now + lifetime.as_secs(),
        appid: client_id.to_owned(),
        appidacr: acr.to_owned(),
        sub: oid.clone(),
        oid,
        tid: tenant.to_owned(),
        uti: Uuid::new_v4().simple().to_string(),
        ver: "1.0".to_owned(),
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

/// Claims of a client assertion (certificate or federated).
#[derive(Deserialize)]
struct AssertionClaims {
    aud: serde_json::Value,
    iss: String,
    sub: String,
    #[serde(default)]
    jti: Option<String>,
}

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// Verifies a client assertion: a certificate-signed JWT (`x5t` /
/// `x5t#S256` header) or a federated token from the registered issuer.
#[expect(
    clippy::result_large_err,
    reason = "simulator code, not on the hot path"
)]
fn check_assertion(
    sim: &EntraState,
    assertion: &str,
    client_id: &str,
    endpoint: &str,
) -> Result<(), Response> {
    let invalid =
        |code: u32, msg: &str| entra_error(StatusCode::UNAUTHORIZED, "invalid_client", code, msg);
    let header = jsonwebtoken::decode_header(assertion).map_err(|_| {
        invalid(
            50027,
            "Invalid JWT token. The token is not in a valid format.",
        )
    })?;
    let cfg = &sim.config;

    if header.x5t.is_some() || header.x5t_s256.is_some() {
        let Some(pem) = &cfg.certificate_pem else {
            return Err(invalid(
                700027,
                "Client assertion failed signature validation: no certificate is registered for the app.",
            ));
        };
        let der = ::pem::parse(pem)
            .map_err(|_| invalid(700027, "The registered certificate is unreadable."))?
            .into_contents();
        // The header names the key: it must be the registered certificate's.
        let matches = match (&header.x5t_s256, &header.x5t) {
            (Some(t), _) => *t == b64url(&sha2::Sha256::digest(&der)),
            (None, Some(t)) => *t == b64url(&<sha1::Sha1 as sha1::Digest>::digest(&der)),
            (None, None) => false,
        };
        if !matches {
            return Err(invalid(
                700027,
                "Client assertion failed signature validation. The key was not found: the thumbprint does not match a certificate registered for the app.",
            ));
        }
        let expected_alg = if header.x5t_s256.is_some() {
            Algorithm::PS256
        } else {
            Algorithm::RS256
        };
        if header.alg != expected_alg
            && !(header.alg == Algorithm::RS256 || header.alg == Algorithm::PS256)
        {
            return Err(invalid(700027, "Unsupported assertion signing algorithm."));
        }
        if let Some(chain) = &header.x5c
            && chain.first().map(String::as_str)
                != Some(&base64::engine::general_purpose::STANDARD.encode(&der))
        {
            return Err(invalid(
                700030,
                "The certificate chain (x5c) does not start with the registered certificate.",
            ));
        }
        let key = DecodingKey::from_rsa_pem(pem.as_bytes())
            .map_err(|_| invalid(700027, "The registered certificate has no usable RSA key."))?;
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[endpoint]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        validation.leeway = 30;
        let data = jsonwebtoken::decode::<AssertionClaims>(assertion, &key, &validation).map_err(|e| {
            match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature | jsonwebtoken::errors::ErrorKind::ImmatureSignature => {
                    invalid(700024, "Client assertion is not within its valid time range.")
                }
                jsonwebtoken::errors::ErrorKind::InvalidAudience => invalid(
                    700212,
                    &format!("No matching federated identity record found for presented assertion audience; the assertion's aud must be {endpoint}."),
                ),
                _ => invalid(700027, "Client assertion failed signature validation."),
            }
        })?;
        let c = data.claims;
        if c.iss != client_id || c.sub != client_id {
            return Err(invalid(
                50012,
                "The client assertion's iss and sub must both be the client id.",
            ));
        }
        let Some(jti) = c.jti else {
            return Err(invalid(50012, "The client assertion must carry a jti."));
        };
        if !lock(&sim.used_jti).insert(jti) {
            return Err(invalid(
                50013,
                "The client assertion was already used (jti replay).",
            ));
        }
        return Ok(());
    }

    // A federated assertion from an external issuer.
    let Some(fed) = &cfg.federation else {
        return Err(invalid(
            700211,
            "No matching federated identity record found for presented assertion issuer.",
        ));
    };
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_audience(&[FEDERATION_AUDIENCE]);
    validation.set_issuer(&[&fed.issuer]);
    validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    validation.leeway = 30;
    let data = jsonwebtoken::decode::<AssertionClaims>(
        assertion,
        &DecodingKey::from_secret(&fed.key),
        &validation,
    )
    .map_err(|e| match e.kind() {
        jsonwebtoken::errors::ErrorKind::InvalidIssuer => invalid(
            700211,
            "No matching federated identity record found for presented assertion issuer.",
        ),
        jsonwebtoken::errors::ErrorKind::ExpiredSignature => invalid(
            700024,
            "Client assertion is not within its valid time range.",
        ),
        _ => invalid(
            700213,
            "The federated assertion could not be validated against the issuer's keys.",
        ),
    })?;
    if data.claims.sub != fed.subject {
        return Err(invalid(
            70021,
            "No matching federated identity record found for presented assertion. Assertion subject does not match.",
        ));
    }
    let _ = data.claims.aud;
    Ok(())
}

/// Query of the managed identity endpoints.
#[derive(Deserialize)]
struct MiQuery {
    resource: Option<String>,
    client_id: Option<String>,
    #[serde(rename = "api-version")]
    api_version: Option<String>,
}

/// IMDS (VM / VMSS): `Metadata: true` required; every number is a string.
async fn imds(
    State(sim): State<Arc<EntraState>>,
    headers: HeaderMap,
    Query(q): Query<MiQuery>,
) -> Response {
    if let Err(resp) = gate(&sim) {
        return resp;
    }
    if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
        return mi_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required metadata header not specified",
        );
    }
    if q.api_version.is_none() {
        return mi_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required query variable 'api-version' is missing",
        );
    }
    match managed_token(&sim, &q) {
        Ok((token, secs, resource)) => {
            let now = now_epoch();
            axum::Json(serde_json::json!({
                "access_token": token,
                "refresh_token": "",
                "expires_in": secs.to_string(),
                "expires_on": (now + secs).to_string(),
                "not_before": now.to_string(),
                "resource": resource,
                "token_type": "Bearer",
            }))
            .into_response()
        }
        Err(resp) => resp,
    }
}

/// App Service / Functions: `X-IDENTITY-HEADER` required; `expires_on` is an
/// integer and there is no `expires_in`.
async fn app_service(
    State(sim): State<Arc<EntraState>>,
    headers: HeaderMap,
    Query(q): Query<MiQuery>,
) -> Response {
    if let Err(resp) = gate(&sim) {
        return resp;
    }
    let ok = headers
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == sim.config.identity_header);
    if !ok {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({"statusCode": 401, "message": "Unauthorized: the X-IDENTITY-HEADER is missing or wrong."})),
        )
            .into_response();
    }
    match managed_token(&sim, &q) {
        Ok((token, secs, resource)) => axum::Json(serde_json::json!({
            "access_token": token,
            "expires_on": now_epoch() + secs,
            "resource": resource,
            "token_type": "Bearer",
            "client_id": sim.config.managed_identity_client_id,
        }))
        .into_response(),
        Err(resp) => resp,
    }
}

fn mi_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": error, "error_description": description})),
    )
        .into_response()
}

#[expect(
    clippy::result_large_err,
    reason = "simulator code, not on the hot path"
)]
fn managed_token(sim: &EntraState, q: &MiQuery) -> Result<(String, u64, String), Response> {
    let cfg = &sim.config;
    let Some(resource) = &q.resource else {
        return Err(mi_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required query variable 'resource' is missing",
        ));
    };
    if let Some(id) = &q.client_id
        && *id != cfg.managed_identity_client_id
    {
        return Err(mi_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Identity not found: no user-assigned identity with this client_id is attached to the host",
        ));
    }
    // The identity lives in the home tenant.
    let tenant = cfg.tenant_id.clone();
    let org = check_resource(sim, resource, &tenant).map_err(|_| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(serde_json::json!({"statusCode": 500, "message": "An unexpected error occured while fetching the AAD Token."})),
        )
            .into_response()
    })?;
    let (token, secs) = sign(sim, &org, &tenant, &cfg.managed_identity_client_id, "0")?;
    Ok((token, secs, resource.clone()))
}
