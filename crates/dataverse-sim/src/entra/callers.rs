//! Caller tokens: Entra ID access tokens for the proxy's own API (its
//! Application ID URI), as the apps and users that call the proxy get them.
//!
//! - Client credentials from a registered caller app with
//!   `scope={api}/.default` (v2) or `resource={api}` (v1) get an app-only
//!   token carrying the app roles assigned to the app.
//! - Tests mint user tokens (`scp`, a user's `oid`) and tokens with any
//!   claims, signed with the published key or with none.
//! - `/{tenant}/v2.0/.well-known/openid-configuration` and the v1 document
//!   name the issuer of each token version and the `jwks_uri`;
//!   `/{tenant}/discovery/v2.0/keys` publishes the RSA keys. Rotation adds a
//!   key and signs with it at once (the worst case for a verifier); the
//!   previous key stays published.
//!
//! The token format follows the API's accepted token version, as the
//! `requestedAccessTokenVersion` of a real app manifest decides: v2 tokens
//! have `aud` = the API's client id, `azp` and the `login.microsoftonline.com/
//! {tid}/v2.0` issuer; v1 tokens `aud` = the Application ID URI, `appid` and
//! `sts.windows.net/{tid}/`.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};

use super::assertion::b64url;
use super::*;

/// One RSA signing key, as published in the JWKS.
pub struct CallerKey {
    /// The key id (`kid`), the SHA-256 thumbprint of the public key.
    pub kid: String,
    encoding: EncodingKey,
    n: String,
    e: String,
    /// The public key as PEM (tests use it to forge HS256 tokens).
    pub public_pem: String,
}

impl CallerKey {
    /// A fresh 2048-bit RSA key.
    pub fn generate() -> Self {
        let private = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048)
            .expect("the simulator could not generate an RSA key");
        let public = private.to_public_key();
        let der = private
            .to_pkcs1_der()
            .expect("an RSA key always encodes as PKCS#1");
        let public_pem = public
            .to_public_key_pem(LineEnding::LF)
            .expect("an RSA public key always encodes as PEM");
        let n = b64url(&public.n().to_bytes_be());
        Self {
            kid: b64url(&sha2::Sha256::digest(n.as_bytes())[..20]),
            encoding: EncodingKey::from_rsa_der(der.as_bytes()),
            e: b64url(&public.e().to_bytes_be()),
            n,
            public_pem,
        }
    }

    /// Signs `claims` with RS256 under this key's `kid`.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .expect("RS256 signing with a valid key cannot fail")
    }

    /// The key a verifier checks this key's signatures with.
    pub fn decoding_key(&self) -> DecodingKey {
        DecodingKey::from_rsa_components(&self.n, &self.e)
            .expect("the simulator's own key components decode")
    }

    fn jwk(&self, issuer: &str) -> Value {
        json!({
            "kty": "RSA", "use": "sig", "kid": self.kid, "x5t": self.kid,
            "n": self.n, "e": self.e, "issuer": issuer,
        })
    }
}

/// An app registration that calls the proxy.
#[derive(Debug, Clone)]
pub struct CallerApp {
    /// Its client id.
    pub client_id: String,
    /// Its client secret.
    pub secret: String,
    /// App roles of the proxy's API assigned to it.
    pub roles: Vec<String>,
}

/// The proxy's API as registered in the simulated Entra ID, its callers and keys.
pub struct CallerDirectory {
    /// Published keys; the last one signs.
    keys: Mutex<Vec<Arc<CallerKey>>>,
    apps: Mutex<Vec<CallerApp>>,
    token_version: Mutex<u8>,
    /// Requests for the discovery documents and keys.
    pub(crate) key_requests: AtomicU64,
}

impl CallerDirectory {
    pub(crate) fn new() -> Self {
        Self {
            keys: Mutex::new(Vec::new()),
            apps: Mutex::new(Vec::new()),
            token_version: Mutex::new(2),
            key_requests: AtomicU64::new(0),
        }
    }

    /// The signing key, generated on first use (RSA generation takes time,
    /// and most simulators never mint a caller token).
    pub(crate) fn current_key(&self) -> Arc<CallerKey> {
        let mut keys = lock(&self.keys);
        if keys.is_empty() {
            keys.push(Arc::new(CallerKey::generate()));
        }
        keys.last().cloned().expect("a key was just ensured")
    }

    /// The keys published now (an assertion signed with any of them holds).
    pub(crate) fn published_keys(&self) -> Vec<Arc<CallerKey>> {
        self.current_key();
        lock(&self.keys).clone()
    }

    /// Publishes a new key and signs with it from now on; one older key
    /// stays published.
    pub(crate) fn rotate(&self) -> Arc<CallerKey> {
        let key = Arc::new(CallerKey::generate());
        let mut keys = lock(&self.keys);
        keys.push(key.clone());
        let excess = keys.len().saturating_sub(2);
        keys.drain(..excess);
        key
    }

    pub(crate) fn add_app(&self, roles: &[&str]) -> CallerApp {
        let app = CallerApp {
            client_id: Uuid::new_v4().to_string(),
            secret: format!("caller~{}", Uuid::new_v4().simple()),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        };
        lock(&self.apps).push(app.clone());
        app
    }

    pub(crate) fn set_token_version(&self, version: u8) {
        *lock(&self.token_version) = version;
    }

    pub(crate) fn token_version(&self) -> u8 {
        *lock(&self.token_version)
    }
}

/// The issuer of `version` tokens for `tenant`, as Entra ID names it.
pub fn issuer(tenant: &str, version: u8) -> String {
    if version == 1 {
        format!("https://sts.windows.net/{tenant}/")
    } else {
        format!("https://login.microsoftonline.com/{tenant}/v2.0")
    }
}

/// Who a minted token is for.
#[derive(Debug, Clone)]
pub enum TokenSubject {
    /// An app-only token for a caller app.
    App {
        /// The app's client id.
        client_id: String,
        /// Its app roles.
        roles: Vec<String>,
    },
    /// A delegated token: a signed-in user of client app `client_id`.
    User {
        /// The user's object id.
        oid: String,
        /// The client app the user signed in to.
        client_id: String,
        /// Delegated scopes (`scp`).
        scopes: Vec<String>,
    },
}

/// Realistic claims for a caller token of `version` (1 or 2), valid for an hour.
pub(crate) fn claims(sim: &EntraState, tenant: &str, who: &TokenSubject, version: u8) -> Value {
    let now = now_epoch();
    let cfg = &sim.config;
    let aud = if version == 1 {
        &cfg.api_app_id_uri
    } else {
        &cfg.api_client_id
    };
    let mut c = json!({
        "aud": aud, "iss": issuer(tenant, version), "iat": now, "nbf": now,
        "exp": now + 3600, "tid": tenant, "uti": Uuid::new_v4().simple().to_string(),
        "ver": if version == 1 { "1.0" } else { "2.0" },
    });
    let (client_id, oid) = match who {
        TokenSubject::App { client_id, roles } => {
            let oid = service_principal(tenant, client_id);
            c["sub"] = json!(oid);
            c["roles"] = json!(roles);
            c["idtyp"] = json!("app");
            (client_id, oid)
        }
        TokenSubject::User {
            oid,
            client_id,
            scopes,
        } => {
            c["sub"] = json!(b64url(
                &sha2::Sha256::digest(format!("{oid}/{client_id}"))[..16]
            ));
            c["scp"] = json!(scopes.join(" "));
            c["name"] = json!("Simulated User");
            (client_id, oid.clone())
        }
    };
    c["oid"] = json!(oid);
    let (app_claim, acr_claim) = if version == 1 {
        ("appid", "appidacr")
    } else {
        ("azp", "azpacr")
    };
    c[app_claim] = json!(client_id);
    c[acr_claim] = json!("1");
    c
}

/// The object id of an app's service principal in `tenant`.
fn service_principal(tenant: &str, client_id: &str) -> String {
    Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("sp/{tenant}/{client_id}").as_bytes(),
    )
    .to_string()
}

/// Whether `resource` names the proxy's API.
pub(super) fn is_api(sim: &EntraState, resource: &str) -> bool {
    let r = resource.trim_end_matches('/');
    r == sim.config.api_app_id_uri || r == sim.config.api_client_id
}

/// Client credentials for the proxy's API: a caller app and its secret.
pub(super) fn issue(
    sim: &EntraState,
    tenant: &str,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    version: Version,
    resource: &str,
) -> Result<Response, Response> {
    let basic = basic_credentials(headers);
    let id = form
        .get("client_id")
        .cloned()
        .or_else(|| basic.as_ref().map(|(i, _)| i.clone()));
    let secret = form
        .get("client_secret")
        .cloned()
        .or_else(|| basic.map(|(_, s)| s));
    let app = lock(&sim.callers.apps)
        .iter()
        .find(|a| Some(&a.client_id) == id.as_ref())
        .cloned()
        .ok_or_else(|| {
            bad_request(
                "unauthorized_client",
                700016,
                "Application was not found in the directory.",
            )
        })?;
    if secret.as_deref() != Some(app.secret.as_str()) {
        return Err(entra_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            "Invalid client secret provided.",
        ));
    }
    let who = TokenSubject::App {
        client_id: app.client_id,
        roles: app.roles,
    };
    let token =
        sim.callers
            .current_key()
            .sign(&claims(sim, tenant, &who, sim.callers.token_version()));
    let mut resp = (
        StatusCode::OK,
        axum::Json(token_body(sim, version, &token, 3600, resource)),
    )
        .into_response();
    no_store(resp.headers_mut());
    Ok(resp)
}

/// Counts a key request and applies the outage switch.
fn key_gate(sim: &EntraState) -> Result<(), Response> {
    sim.callers.key_requests.fetch_add(1, Ordering::SeqCst);
    if sim.entra_down.load(Ordering::SeqCst) {
        return Err(entra_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            50033,
            "The service is temporarily unavailable. Retry the request.",
        ));
    }
    Ok(())
}

fn known_tenant(sim: &EntraState, tenant: &str) -> Result<(), Response> {
    if lock(&sim.tenants).iter().any(|t| t == tenant) {
        Ok(())
    } else {
        Err(bad_request(
            "invalid_tenant",
            90002,
            &format!("Tenant '{tenant}' not found."),
        ))
    }
}

fn discovery(sim: &EntraState, tenant: &str, version: u8) -> Response {
    if let Err(resp) = key_gate(sim).and_then(|()| known_tenant(sim, tenant)) {
        return resp;
    }
    let (jwks, token) = if version == 1 {
        ("discovery/keys", "oauth2/token")
    } else {
        ("discovery/v2.0/keys", "oauth2/v2.0/token")
    };
    let url = &sim.url;
    axum::Json(json!({
        "issuer": issuer(tenant, version),
        "jwks_uri": format!("{url}/{tenant}/{jwks}"),
        "token_endpoint": format!("{url}/{tenant}/{token}"),
        "id_token_signing_alg_values_supported": ["RS256"],
        "tenant_region_scope": "EU",
    }))
    .into_response()
}

pub(super) async fn discovery_v2(
    State(sim): State<Arc<EntraState>>,
    Path(tenant): Path<String>,
) -> Response {
    discovery(&sim, &tenant, 2)
}

pub(super) async fn discovery_v1(
    State(sim): State<Arc<EntraState>>,
    Path(tenant): Path<String>,
) -> Response {
    discovery(&sim, &tenant, 1)
}

pub(super) async fn keys(
    State(sim): State<Arc<EntraState>>,
    Path(tenant): Path<String>,
) -> Response {
    if let Err(resp) = key_gate(&sim).and_then(|()| known_tenant(&sim, &tenant)) {
        return resp;
    }
    sim.callers.current_key();
    let issuer = format!("https://login.microsoftonline.com/{tenant}/v2.0");
    let keys: Vec<Value> = lock(&sim.callers.keys)
        .iter()
        .map(|k| k.jwk(&issuer))
        .collect();
    axum::Json(json!({ "keys": keys })).into_response()
}
