//! Client assertions: signed with the registered certificate (RS256 +
//! `x5t`, PS256 + `x5t#S256`, optional `x5c`), or federated tokens from an
//! external issuer.

use super::*;

/// Claims of a client assertion (certificate or federated).
#[derive(Deserialize)]
pub(super) struct AssertionClaims {
    pub(super) aud: serde_json::Value,
    pub(super) iss: String,
    pub(super) sub: String,
    #[serde(default)]
    pub(super) jti: Option<String>,
}

pub(super) fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// Checks a client assertion: signed with the registered certificate, or
/// a federated token from the configured external issuer.
pub(super) fn check_assertion(
    sim: &EntraState,
    assertion: &str,
    client_id: &str,
    endpoint: &str,
) -> Result<(), Response> {
    let header = jsonwebtoken::decode_header(assertion).map_err(|_| {
        invalid_client(
            50027,
            "Invalid JWT token. The token is not in a valid format.",
        )
    })?;
    if header.x5t.is_some() || header.x5t_s256.is_some() {
        let key = registered_key(sim, &header)?;
        certificate_assertion(sim, assertion, &header, &key, client_id, endpoint)
    } else {
        federated_assertion(sim, assertion)
    }
}

pub(super) fn invalid_client(code: u32, msg: &str) -> Response {
    entra_error(StatusCode::UNAUTHORIZED, "invalid_client", code, msg)
}

/// The registered certificate's key, if the header names it (by SHA-1 or
/// SHA-256 thumbprint) and its algorithm and chain fit.
pub(super) fn registered_key(
    sim: &EntraState,
    header: &jsonwebtoken::Header,
) -> Result<DecodingKey, Response> {
    let invalid = invalid_client;
    let cfg = &sim.config;
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
    DecodingKey::from_rsa_pem(pem.as_bytes())
        .map_err(|_| invalid(700027, "The registered certificate has no usable RSA key."))
}

/// The assertion's signature, audience, lifetime, `iss`/`sub` and `jti`.
pub(super) fn certificate_assertion(
    sim: &EntraState,
    assertion: &str,
    header: &jsonwebtoken::Header,
    key: &DecodingKey,
    client_id: &str,
    endpoint: &str,
) -> Result<(), Response> {
    let invalid = invalid_client;
    let mut validation = Validation::new(header.alg);
    validation.set_audience(&[endpoint]);
    validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    validation.leeway = 30;
    let data = jsonwebtoken::decode::<AssertionClaims>(assertion, key, &validation).map_err(|e| {
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
    Ok(())
}

/// A federated assertion from the configured external issuer.
pub(super) fn federated_assertion(sim: &EntraState, assertion: &str) -> Result<(), Response> {
    let invalid = invalid_client;
    let cfg = &sim.config;
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
