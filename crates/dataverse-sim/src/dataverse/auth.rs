//! Who a request is: the bearer token checked as Dataverse does (signature,
//! audience, issuer, expiry, revocation), the 401 challenge, and the
//! recorder of what Dataverse was sent.

use super::*;

pub(super) fn record(sim: &SimState, req: &Request, claims: Result<Claims, &'static str>) {
    let seen = SeenRequest {
        method: req.method().to_string(),
        target: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned()),
        headers: req.headers().clone(),
        authorized: claims.is_ok(),
        claims: claims.ok(),
    };
    let mut log = lock(&sim.seen);
    if log.len() >= SEEN_CAPACITY {
        log.pop_front();
    }
    log.push_back(seen);
}

/// Validates the bearer: signature, audience (this org) and expiry.
pub(super) fn check_token(sim: &SimState, headers: &HeaderMap) -> Result<Claims, &'static str> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or("MissingCrmAuthenticationToken")?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or("InvalidAuthTicket")?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_audience(&[&sim.org_url]);
    validation.set_issuer(&[format!("https://sts.windows.net/{}/", sim.tenant_id)]);
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp", "aud"]);
    jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(&sim.entra.signing_key),
        &validation,
    )
    .map_err(|e| match e.kind() {
        jsonwebtoken::errors::ErrorKind::ExpiredSignature => "ExpiredAuthTicket",
        _ => "InvalidAuthTicket",
    })
    .and_then(|d| {
        // A token Entra ID has revoked is refused as a bad ticket.
        if lock(&sim.entra.revoked).contains(&d.claims.uti) {
            Err("BadAuthTicket")
        } else {
            Ok(d.claims)
        }
    })
}

/// Dataverse's 401 with the bearer challenge (docs/dataverse.md, "The Web API").
pub(super) fn challenge(sim: &SimState, why: &str) -> Response {
    let mut resp = dv_error(
        StatusCode::UNAUTHORIZED,
        "0x80072560",
        &format!("The user is not authenticated ({why})."),
    );
    let challenge = format!(
        "Bearer authorization_uri={}/{}/oauth2/authorize, resource_id={}/",
        sim.entra.url, sim.tenant_id, sim.org_url
    );
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}
