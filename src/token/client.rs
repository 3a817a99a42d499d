//! The OAuth2 client-credentials request and Entra ID's answers (docs/dataverse.md, "Tokens").

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::config::{
    CredentialConfig, CredentialKind, ManagedIdentity, SecretSource, TokenVersion,
};
use crate::token::certificate;

/// `client_assertion_type` of certificate and federated assertions.
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// What a token is requested for: one org.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// v2 scope, `{org}/.default`.
    pub scope: String,
    /// v1 / managed identity resource, the org URL.
    pub resource: String,
}

/// A successful token response, with the token already in a secret wrapper.
pub struct TokenResponse {
    /// The access token itself.
    pub access_token: SecretString,
    /// Lifetime from now.
    pub expires_in: Duration,
    /// Entra ID's hint of when to refresh, for long-lived tokens.
    pub refresh_in: Option<Duration>,
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &"[REDACTED]")
            .field("expires_in", &self.expires_in)
            .field("refresh_in", &self.refresh_in)
            .finish()
    }
}

/// Why a token could not be fetched. Display texts never contain secrets.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// A credential file (secret, federated token) could not be read.
    #[error("cannot read the {what} file {path}: {source}")]
    CredentialFile {
        /// Which file.
        what: &'static str,
        /// The configured path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The credential cannot be used as configured (e.g. an unreadable certificate).
    #[error("the configured credential cannot be used: {0}")]
    Credential(String),
    /// The token endpoint could not be reached or timed out.
    #[error("token endpoint unreachable: {0}")]
    Network(#[source] reqwest::Error),
    /// Entra ID answered with an OAuth2 error.
    #[error("Entra ID refused the token request: HTTP {status} {error}{}: {description}", aadsts_suffix(.codes))]
    Entra {
        /// HTTP status of the answer.
        status: u16,
        /// The OAuth2 `error` field, e.g. `invalid_client`.
        error: String,
        /// The AADSTS numbers from `error_codes`.
        codes: Vec<u32>,
        /// First line of `error_description` (without the trace lines).
        description: String,
    },
    /// The answer was not a token response nor an OAuth2 error.
    #[error("token endpoint answered HTTP {status} with an unexpected body: {detail}")]
    Malformed {
        /// HTTP status of the answer.
        status: u16,
        /// What was wrong with it.
        detail: String,
    },
}

fn aadsts_suffix(codes: &[u32]) -> String {
    codes
        .first()
        .map(|c| format!(" (AADSTS{c})"))
        .unwrap_or_default()
}

impl TokenError {
    /// What a caller may be told: the kind of failure and Entra ID's AADSTS
    /// code, without URLs, file names or I/O detail (those go to the log).
    pub fn caller_summary(&self) -> String {
        match self {
            Self::CredentialFile { what, .. } => format!("the {what} file cannot be read"),
            Self::Credential(_) => "the configured credential cannot be used".to_owned(),
            Self::Network(_) => "Entra ID cannot be reached".to_owned(),
            Self::Entra { error, codes, .. } => {
                format!(
                    "Entra ID refused the token request: {error}{}",
                    aadsts_suffix(codes)
                )
            }
            Self::Malformed { status, .. } => {
                format!("Entra ID answered HTTP {status} with an unreadable body")
            }
        }
    }

    /// True when retrying soon cannot help (bad secret, unknown app…): such
    /// errors need an operator.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::CredentialFile { .. } | Self::Credential(_) => true,
            Self::Network(_) | Self::Malformed { .. } => false,
            Self::Entra { status, error, .. } => {
                *status < 500
                    && *status != 429
                    && error != "temporarily_unavailable"
                    && !self.codes().iter().any(|c| TRANSIENT_CODES.contains(c))
            }
        }
    }

    fn codes(&self) -> &[u32] {
        match self {
            Self::Entra { codes, .. } => codes,
            Self::CredentialFile { .. }
            | Self::Credential(_)
            | Self::Network(_)
            | Self::Malformed { .. } => &[],
        }
    }

    /// Plain-words advice for an operator, by AADSTS code.
    pub fn advice(&self) -> Option<&'static str> {
        let code = *self.codes().first()?;
        advice_for(code)
    }
}

/// AADSTS codes that are worth retrying soon (throttling, transient outages).
const TRANSIENT_CODES: &[u32] = &[50196, 90055, 90024, 50033, 90033];

/// Advice for the AADSTS codes a client-credentials setup meets (docs/dataverse.md, "Tokens").
pub fn advice_for(code: u32) -> Option<&'static str> {
    Some(match code {
        7000215 => {
            "The client secret is wrong. Use the secret's Value (shown once when it was created), not its Secret ID, and check it belongs to this app registration."
        }
        7000222 => {
            "The client secret has expired. Create a new one under Certificates & secrets of the app registration and update AZURE_CLIENT_SECRET (or the secret file)."
        }
        7000218 => {
            "No client secret or assertion was sent. Set AZURE_CLIENT_SECRET or AZURE_CLIENT_SECRET_FILE."
        }
        700016 => {
            "No application with this client id exists in this tenant. Check AZURE_CLIENT_ID and AZURE_TENANT_ID; a multi-tenant app must first be consented to by an admin of this tenant."
        }
        90002 => {
            "The tenant was not found. Check AZURE_TENANT_ID (a GUID or a domain such as contoso.onmicrosoft.com) and that the authority host matches the cloud (public, US government, China)."
        }
        70011 | 1002012 => {
            "The scope is invalid. It must be the org URL followed by /.default, e.g. https://contoso.crm.dynamics.com/.default."
        }
        500011 => {
            "Dataverse's service principal was not found in this tenant: the org URL is probably wrong or belongs to another tenant."
        }
        700022 => "The scope names more than one resource. Use only {org}/.default.",
        9001023 => {
            "Client credentials need a tenant-specific authority. Set AZURE_TENANT_ID to the tenant id, not 'common' or 'organizations'."
        }
        901002 => {
            "The v2 token endpoint does not accept 'resource'; the proxy sends 'scope' there. Check DATAVERSE_PROXY_TOKEN_URL."
        }
        50196 | 90055 | 90024 => {
            "Entra ID is throttling this app. The proxy backs off and retries; reduce restarts or token-cache misses if this persists."
        }
        50033 | 90033 => "Entra ID had a transient failure. The proxy retries on its own.",
        700027 | 50012 => {
            "The client assertion was refused: the certificate is not the one uploaded to the app registration (Certificates & secrets), or the assertion's signature or claims are wrong."
        }
        700024 => {
            "The client assertion is outside its validity window: check this machine's clock."
        }
        700030 => {
            "Subject-name/issuer authentication failed: the app registration does not trust this certificate's subject, or AZURE_CLIENT_SEND_CERTIFICATE_CHAIN is off."
        }
        700211 | 700212 | 70021 | 700213 => {
            "The federated token was refused: add a federated credential to the app registration whose issuer, subject and audience (api://AzureADTokenExchange) match the token in AZURE_FEDERATED_TOKEN_FILE."
        }
        _ => return None,
    })
}

/// Entra ID's OAuth2 error body.
#[derive(Deserialize)]
pub(super) struct EntraErrorBody {
    pub(super) error: String,
    #[serde(default)]
    pub(super) error_description: String,
    #[serde(default)]
    pub(super) error_codes: Vec<u32>,
    /// A Conditional Access challenge (`interaction_required`).
    #[serde(default)]
    pub(super) claims: Option<String>,
}

/// The success body; numbers may be JSON integers (v2) or strings (v1,
/// managed identity). App Service sends `expires_on` but no `expires_in`.
#[derive(Deserialize)]
struct TokenBody {
    access_token: String,
    #[serde(default, deserialize_with = "opt_number_or_string")]
    expires_in: Option<u64>,
    #[serde(default, deserialize_with = "opt_number_or_string")]
    expires_on: Option<u64>,
    #[serde(default, deserialize_with = "opt_number_or_string")]
    refresh_in: Option<u64>,
}

/// App Service's error body.
#[derive(Deserialize)]
struct AppServiceError {
    message: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    Num(u64),
    Str(String),
}

impl NumOrStr {
    fn get<E: serde::de::Error>(self) -> Result<u64, E> {
        match self {
            Self::Num(n) => Ok(n),
            Self::Str(s) => s
                .trim()
                .parse()
                .map_err(|_| E::custom("expected a number or a numeric string")),
        }
    }
}

fn opt_number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Option::<NumOrStr>::deserialize(d)?
        .map(NumOrStr::get)
        .transpose()
}

/// Reads a credential file, trimmed of its line end (files are re-read at
/// every fetch so that rotating them needs no restart).
fn read_file(what: &'static str, path: &std::path::Path) -> Result<SecretString, TokenError> {
    std::fs::read_to_string(path)
        .map(|s| SecretString::from(s.trim_end_matches(['\r', '\n']).to_owned()))
        .map_err(|source| TokenError::CredentialFile {
            what,
            path: path.to_owned(),
            source,
        })
}

fn read_secret(source: &SecretSource) -> Result<SecretString, TokenError> {
    match source {
        SecretSource::Inline(s) => Ok(s.clone()),
        SecretSource::File(path) => read_file("client secret", path),
    }
}

fn now_epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Performs one token request for `target` with the configured credential.
pub async fn request_token(
    http: &reqwest::Client,
    cred: &CredentialConfig,
    target: &Target,
) -> Result<TokenResponse, TokenError> {
    let (token_url, client_id) = match (&cred.kind, &cred.token_url, &cred.client_id) {
        (CredentialKind::ManagedIdentity(mi), _, client_id) => {
            return managed_identity(http, mi, client_id.as_deref(), &target.resource).await;
        }
        (_, Some(url), Some(id)) => (url, id),
        _ => {
            return Err(TokenError::Credential(
                "no token URL or client id is configured".to_owned(),
            ));
        }
    };
    let mut form: Vec<(&str, SecretString)> = vec![("grant_type", "client_credentials".into())];
    match cred.version {
        TokenVersion::V2 => form.push(("scope", target.scope.as_str().into())),
        TokenVersion::V1 => form.push(("resource", target.resource.as_str().into())),
    }
    form.extend(client_auth(cred, client_id, token_url)?);
    let (status, bytes) = post_form(http, token_url, &form).await?;
    parse_response(status, &bytes)
}

/// How the app proves itself to the token endpoint: its client id and a
/// secret, a certificate's assertion, or a federated token.
pub(super) fn client_auth(
    cred: &CredentialConfig,
    client_id: &str,
    token_url: &url::Url,
) -> Result<Vec<(&'static str, SecretString)>, TokenError> {
    let mut form: Vec<(&'static str, SecretString)> = vec![("client_id", client_id.into())];
    match &cred.kind {
        CredentialKind::Secret(source) => form.push(("client_secret", read_secret(source)?)),
        CredentialKind::Certificate {
            path,
            password,
            send_chain,
            algorithm,
        } => {
            let cert = certificate::load_shared(path, password.as_ref().map(|p| &p.0))
                .map_err(TokenError::Credential)?;
            let assertion = cert
                .assertion(
                    client_id,
                    token_url.as_str(),
                    *algorithm,
                    *send_chain,
                    now_epoch(),
                )
                .map_err(TokenError::Credential)?;
            form.push(("client_assertion_type", JWT_BEARER.into()));
            form.push(("client_assertion", assertion));
        }
        CredentialKind::Federated { token_file } => {
            form.push(("client_assertion_type", JWT_BEARER.into()));
            form.push((
                "client_assertion",
                read_file("federated token", token_file)?,
            ));
        }
        CredentialKind::ManagedIdentity(_) => {
            return Err(TokenError::Credential(
                "a managed identity cannot authenticate at the token endpoint itself".to_owned(),
            ));
        }
    }
    Ok(form)
}

/// POSTs `form` to `token_url`; the status and the whole (small) body.
pub(super) async fn post_form(
    http: &reqwest::Client,
    token_url: &url::Url,
    form: &[(&str, SecretString)],
) -> Result<(u16, bytes::Bytes), TokenError> {
    let body: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form.iter().map(|(k, v)| (*k, v.expose_secret())))
        .finish();
    let req = http
        .post(token_url.clone())
        .header(reqwest::header::ACCEPT, "application/json")
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(body);
    exchange(req).await
}

/// Sends a token request; the status and the whole (small) body.
async fn exchange(req: reqwest::RequestBuilder) -> Result<(u16, bytes::Bytes), TokenError> {
    // The URL is configuration, not secret, but it adds nothing to the error.
    let network = |e: reqwest::Error| TokenError::Network(e.without_url());
    let resp = req.send().await.map_err(network)?;
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.map_err(network)?;
    Ok((status, bytes))
}

/// A managed identity token from IMDS or App Service (docs/dataverse.md, "Tokens", managed identity).
async fn managed_identity(
    http: &reqwest::Client,
    mi: &ManagedIdentity,
    client_id: Option<&str>,
    resource: &str,
) -> Result<TokenResponse, TokenError> {
    let (endpoint, api_version) = match mi {
        ManagedIdentity::Imds { endpoint } => (endpoint, "2018-02-01"),
        ManagedIdentity::AppService { endpoint, .. } => (endpoint, "2019-08-01"),
    };
    let mut query = vec![("api-version", api_version), ("resource", resource)];
    if let Some(id) = client_id {
        query.push(("client_id", id));
    }
    let mut req = http.get(endpoint.clone()).query(&query);
    req = match mi {
        ManagedIdentity::Imds { .. } => req.header("Metadata", "true"),
        ManagedIdentity::AppService { header, .. } => {
            req.header("X-IDENTITY-HEADER", header.0.expose_secret())
        }
    };
    let (status, bytes) = exchange(req).await?;
    if !(200..300).contains(&status)
        && let Ok(e) = serde_json::from_slice::<AppServiceError>(&bytes)
    {
        return Err(TokenError::Entra {
            status,
            error: "managed_identity_error".to_owned(),
            codes: Vec::new(),
            description: first_line(&e.message),
        });
    }
    parse_response(status, &bytes)
}

/// Interprets a token endpoint answer.
pub fn parse_response(status: u16, body: &[u8]) -> Result<TokenResponse, TokenError> {
    if (200..300).contains(&status) {
        let b: TokenBody = serde_json::from_slice(body).map_err(|e| TokenError::Malformed {
            status,
            // serde_json's message names the field and position, never the value.
            detail: e.to_string(),
        })?;
        let expires_in = match (b.expires_in, b.expires_on) {
            (Some(secs), _) => secs,
            (None, Some(on)) => on.saturating_sub(now_epoch()),
            (None, None) => {
                return Err(TokenError::Malformed {
                    status,
                    detail: "neither expires_in nor expires_on is present".to_owned(),
                });
            }
        };
        return Ok(TokenResponse {
            access_token: SecretString::from(b.access_token),
            expires_in: Duration::from_secs(expires_in),
            refresh_in: b.refresh_in.map(Duration::from_secs),
        });
    }
    match serde_json::from_slice::<EntraErrorBody>(body) {
        Ok(e) => Err(TokenError::Entra {
            status,
            error: e.error,
            codes: e.error_codes,
            description: first_line(&e.error_description),
        }),
        Err(_) => Err(TokenError::Malformed {
            status,
            detail: "not an OAuth2 error body".to_owned(),
        }),
    }
}

/// The human part of an `error_description`, without the `Trace ID:` lines,
/// capped in length.
fn first_line(description: &str) -> String {
    let line = description.lines().next().unwrap_or_default().trim();
    line.chars().take(400).collect()
}

/// The HTTP client towards Entra ID (tokens, and the keys caller tokens are
/// checked with). Egress comes from the configuration only (HTTPS_PROXY /
/// NO_PROXY reach it through the environment layer), as for the Dataverse
/// client.
pub fn entra_client(
    settings: &crate::config::TokenConfig,
    tls: rustls::ClientConfig,
) -> Result<reqwest::Client, reqwest::Error> {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .tls_backend_preconfigured(tls);
    if let Some(e) = &settings.egress {
        let proxy = reqwest::Proxy::all(&e.url)?;
        builder = builder.proxy(proxy.no_proxy(reqwest::NoProxy::from_string(&e.no_proxy)));
    }
    builder
        .timeout(settings.fetch_timeout)
        .connect_timeout(settings.fetch_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("dataverse-proxy/", env!("CARGO_PKG_VERSION")))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_numbers_are_ints_and_v1_numbers_strings() {
        let v2 = parse_response(
            200,
            br#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"abc"}"#,
        )
        .expect("v2");
        assert_eq!(v2.expires_in, Duration::from_secs(3599));
        let v1 = parse_response(
            200,
            br#"{"token_type":"Bearer","expires_in":"3599","refresh_in":"1800","access_token":"abc"}"#,
        )
        .expect("v1");
        assert_eq!(v1.refresh_in, Some(Duration::from_secs(1800)));
        assert!(!format!("{v1:?}").contains("abc"));
    }

    #[test]
    fn entra_errors_are_classified_with_advice() {
        let bad_secret = parse_response(
            401,
            br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: x\r\nCorrelation ID: y","error_codes":[7000215]}"#,
        )
        .expect_err("401");
        assert!(bad_secret.is_permanent());
        assert!(
            bad_secret
                .advice()
                .expect("advice")
                .contains("not its Secret ID")
        );
        let text = bad_secret.to_string();
        assert!(text.contains("AADSTS7000215"), "{text}");
        assert!(!text.contains("Trace ID"), "{text}");

        let busy = parse_response(
            503,
            br#"{"error":"temporarily_unavailable","error_description":"AADSTS50033: retry","error_codes":[50033]}"#,
        )
        .expect_err("503");
        assert!(!busy.is_permanent());
    }

    #[test]
    fn app_service_sends_only_expires_on() {
        let on = now_epoch() + 3000;
        let r = parse_response(
            200,
            format!(r#"{{"access_token":"x","expires_on":{on},"resource":"r"}}"#).as_bytes(),
        )
        .expect("app service");
        assert!((2990..=3000).contains(&r.expires_in.as_secs()));
        let r = parse_response(
            200,
            format!(r#"{{"access_token":"x","expires_on":"{on}"}}"#).as_bytes(),
        )
        .expect("string form");
        assert!(r.expires_in.as_secs() > 2900);
    }

    #[test]
    fn garbage_is_malformed() {
        let e = parse_response(502, b"<html>bad gateway</html>").expect_err("html");
        assert!(matches!(e, TokenError::Malformed { status: 502, .. }));
        assert!(!e.is_permanent());
    }
}
