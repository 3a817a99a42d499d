//! The on-behalf-of grant (docs/dataverse.md, "On-behalf-of"): the proxy
//! sends a caller's user token (for the proxy's API) as the assertion,
//! authenticates as itself, and gets the same user's token for Dataverse.
//! Checked as Entra ID does: the client and its credential, the assertion's
//! signature, audience, tenant and expiry, the scope, the tenant's consent;
//! a tenant can demand MFA, answered with a claims challenge.

use std::collections::{HashMap, HashSet};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use super::{
    EntraState, Version, authenticate, bad_request, basic_credentials, check_resource, client_id,
    no_store, sign_for, token_body,
};
use crate::{SimHandle, lock};

/// `grant_type` of the exchange.
pub(super) const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The challenge sent while MFA is demanded.
pub const MFA_CLAIMS: &str =
    r#"{"access_token":{"capolids":{"essential":true,"values":["sim-mfa-policy"]}}}"#;

/// Consent and Conditional Access of the simulated directory.
#[derive(Debug, Default)]
pub struct OboState {
    /// Tenants whose admin never consented to the proxy's delegated permission.
    unconsented: HashSet<String>,
    /// Demand MFA: assertions without `amr: ["mfa"]` get a claims challenge.
    require_mfa: bool,
    /// Exchanges that issued a token.
    exchanges: u64,
    /// Exchanges asked for, issued or refused.
    attempts: u64,
}

/// The claims of an assertion that matter here.
#[derive(Deserialize)]
struct Assertion {
    tid: String,
    oid: String,
    scp: Option<String>,
    #[serde(default)]
    amr: Vec<String>,
}

/// Issues the user's Dataverse token, or Entra ID's error.
pub(super) fn issue(
    sim: &EntraState,
    tenant: &str,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    endpoint: &str,
) -> Result<Response, Response> {
    if form.get("requested_token_use").map(String::as_str) != Some("on_behalf_of") {
        return Err(bad_request(
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'requested_token_use'.",
        ));
    }
    lock(&sim.obo).attempts += 1;
    let basic = basic_credentials(headers);
    let client = client_id(sim, tenant, form, basic.as_ref())?;
    authenticate(sim, form, basic, &client, endpoint)?;
    // The middle tier exchanges tokens issued to itself: the client must be
    // the API the assertion is for.
    if client != sim.config.api_client_id {
        return Err(bad_request(
            "invalid_grant",
            50013,
            &format!(
                "Assertion audience does not match the Client app presenting the assertion. The expected audience is '{client}'."
            ),
        ));
    }
    let user = check_assertion(sim, tenant, form.get("assertion").map(String::as_str))?;
    let scope = form.get("scope").cloned().unwrap_or_default();
    let Some(resource) = scope.strip_suffix("/user_impersonation") else {
        return Err(bad_request(
            "invalid_scope",
            70011,
            &format!(
                "The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid."
            ),
        ));
    };
    let org = check_resource(sim, resource, tenant)?;
    if lock(&sim.obo).unconsented.contains(tenant) {
        return Err(bad_request(
            "invalid_grant",
            65001,
            &format!(
                "The user or administrator has not consented to use the application with ID '{client}'. Send an interactive authorization request for this user and resource."
            ),
        ));
    }
    if lock(&sim.obo).require_mfa && !user.amr.iter().any(|m| m == "mfa") {
        return Err(mfa_challenge());
    }
    let scope = Some("user_impersonation");
    let (token, secs) = sign_for(sim, (&org, tenant), (&client, "1"), (&user.oid, scope))?;
    lock(&sim.obo).exchanges += 1;
    let mut resp = (
        StatusCode::OK,
        axum::Json(token_body(sim, Version::V2, &token, secs, &org)),
    )
        .into_response();
    no_store(resp.headers_mut());
    Ok(resp)
}

/// The assertion: the simulator's caller token for the proxy's API, of a
/// user of `tenant`, unexpired, signed with a published key.
fn check_assertion(
    sim: &EntraState,
    tenant: &str,
    token: Option<&str>,
) -> Result<Assertion, Response> {
    let Some(token) = token else {
        return Err(bad_request(
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'assertion'.",
        ));
    };
    let cfg = &sim.config;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[&cfg.api_app_id_uri, &cfg.api_client_id]);
    validation.leeway = 0;
    let mut last = None;
    for key in sim.callers.published_keys() {
        match jsonwebtoken::decode::<Assertion>(token, &key.decoding_key(), &validation) {
            Ok(d) => {
                let user = d.claims;
                if user.tid != tenant {
                    return Err(bad_request(
                        "invalid_grant",
                        50013,
                        "Assertion failed signature validation. [Reason - The assertion is not for this tenant.]",
                    ));
                }
                if user.scp.is_none() {
                    return Err(bad_request(
                        "invalid_grant",
                        50013,
                        "Assertion is not a user's token (no scp): app-only tokens cannot be exchanged on behalf of a user.",
                    ));
                }
                return Ok(user);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(match last.as_ref().map(|e| e.kind()) {
        Some(jsonwebtoken::errors::ErrorKind::ExpiredSignature) => bad_request(
            "invalid_grant",
            500133,
            "Assertion is not within its valid time range. Ensure that the access token is not expired before using it for user assertion, or request a new token.",
        ),
        _ => bad_request(
            "invalid_grant",
            50013,
            "Assertion failed signature validation.",
        ),
    })
}

/// A 400 `interaction_required` with the claims challenge in its body.
fn mfa_challenge() -> Response {
    let body = serde_json::json!({
        "error": "interaction_required",
        "error_description": "AADSTS50076: Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication to access the resource.",
        "error_codes": [50076],
        "suberror": "basic_action",
        "claims": MFA_CLAIMS,
    });
    let mut resp = (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
    no_store(resp.headers_mut());
    resp
}

impl SimHandle {
    /// Withdraws (`false`) or grants the admin consent of `tenant` to the
    /// proxy acting for its users.
    pub fn set_obo_consent(&self, tenant: &str, consented: bool) {
        let mut obo = lock(&self.0.entra.obo);
        if consented {
            obo.unconsented.remove(tenant);
        } else {
            obo.unconsented.insert(tenant.to_owned());
        }
    }

    /// Demands MFA for on-behalf-of exchanges (a claims challenge unless
    /// the assertion's `amr` has `mfa`).
    pub fn require_mfa(&self, required: bool) {
        lock(&self.0.entra.obo).require_mfa = required;
    }

    /// On-behalf-of exchanges that issued a token.
    pub fn obo_exchanges(&self) -> u64 {
        lock(&self.0.entra.obo).exchanges
    }

    /// On-behalf-of exchanges asked for, whether issued or refused.
    pub fn obo_attempts(&self) -> u64 {
        lock(&self.0.entra.obo).attempts
    }
}
