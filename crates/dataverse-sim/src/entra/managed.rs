//! Managed identity endpoints: IMDS and App Service.

use super::*;

/// Query of the managed identity endpoints.
#[derive(Deserialize)]
pub(super) struct MiQuery {
    pub(super) resource: Option<String>,
    pub(super) client_id: Option<String>,
    #[serde(rename = "api-version")]
    pub(super) api_version: Option<String>,
}

/// IMDS (VM / VMSS): `Metadata: true` required; every number is a string.
pub(super) async fn imds(
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
pub(super) async fn app_service(
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

pub(super) fn mi_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": error, "error_description": description})),
    )
        .into_response()
}

pub(super) fn managed_token(
    sim: &EntraState,
    q: &MiQuery,
) -> Result<(String, u64, String), Response> {
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
