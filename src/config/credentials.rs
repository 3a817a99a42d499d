//! Credentials: `[credential]` and `[credentials.NAME]`, sovereign clouds,
//! and the readability of credential files.

use super::*;

/// The authority host of a sovereign cloud (docs/dataverse.md, "Tokens").
pub(super) fn cloud_authority(cloud: &str) -> Option<&'static str> {
    Some(
        match cloud
            .to_ascii_lowercase()
            .replace(['-', '_', ' '], "")
            .as_str()
        {
            "public" | "azurepublic" | "azurepubliccloud" | "global" => {
                "https://login.microsoftonline.com"
            }
            "usgovernment" | "usgov" | "azureusgovernment" | "gcchigh" | "dod" => {
                "https://login.microsoftonline.us"
            }
            "china" | "azurechina" | "azurechinacloud" | "21vianet" => {
                "https://login.partner.microsoftonline.cn"
            }
            _ => return None,
        },
    )
}

/// The full keys of one credential's fields: `credential.X` for the
/// default one, `credentials.NAME.X` for the others.
struct Keys(String);

impl Keys {
    fn new(name: &str) -> Self {
        Self(if name == "default" {
            "credential".to_owned()
        } else {
            format!("credentials.{name}")
        })
    }

    fn of(&self, field: &str) -> String {
        format!("{}.{field}", self.0)
    }
}

/// Validates one credential; `name` is `default` for `[credential]`.
pub(super) fn validate_credential(
    p: &mut Problems<'_>,
    name: &str,
    c: RawCredential,
) -> Option<CredentialConfig> {
    let keys = Keys::new(name);
    let kind = kind_name(p, &keys, &c);
    let version = token_version(p, &keys, c.token_version.as_deref());
    let client_id = c
        .client_id
        .as_ref()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    if kind == "managed_identity" {
        let identity = managed_identity(p, &keys, &c)?;
        return Some(CredentialConfig {
            name: name.to_owned(),
            tenant_id: c.tenant_id,
            client_id,
            kind: CredentialKind::ManagedIdentity(identity),
            token_url: None,
            version,
        });
    }
    let tenant_id = required(
        p,
        &keys.of("tenant_id"),
        c.tenant_id.clone(),
        "set AZURE_TENANT_ID or tenant_id to the directory (tenant) id",
    );
    let client_id = required(
        p,
        &keys.of("client_id"),
        client_id,
        "set AZURE_CLIENT_ID or client_id to the application (client) id",
    );
    let token_url = token_url(p, &keys, &c, tenant_id.as_deref(), version);
    let kind = app_credential(p, &keys, &kind, c)?;
    Some(CredentialConfig {
        name: name.to_owned(),
        tenant_id: Some(tenant_id?),
        client_id: Some(client_id?),
        kind,
        token_url: Some(token_url?),
        version,
    })
}

/// The credential kind: `kind` when set, else inferred in azure-identity's
/// order (secret, certificate, federated, managed identity).
fn kind_name(p: &mut Problems<'_>, keys: &Keys, c: &RawCredential) -> String {
    match c.kind.as_deref() {
        Some(k) => k.to_ascii_lowercase().replace('-', "_"),
        None if c.client_secret.is_some() || c.client_secret_file.is_some() => {
            "client_secret".to_owned()
        }
        None if c.certificate_path.is_some() => "certificate".to_owned(),
        None if c.federated_token_file.is_some() => "federated".to_owned(),
        None if c.managed_identity.is_some() || c.identity_endpoint.is_some() => {
            "managed_identity".to_owned()
        }
        None => {
            p.push(
                &keys.of("client_secret"),
                "no credential is configured",
                "set AZURE_CLIENT_SECRET / AZURE_CLIENT_SECRET_FILE, AZURE_CLIENT_CERTIFICATE_PATH, AZURE_FEDERATED_TOKEN_FILE, or managed_identity (see docs/configuration.md)",
            );
            // Keep going, so missing tenant and client ids are reported too.
            "unknown".to_owned()
        }
    }
}

fn token_version(p: &mut Problems<'_>, keys: &Keys, raw: Option<&str>) -> TokenVersion {
    match raw {
        None | Some("v2" | "2" | "2.0") => TokenVersion::V2,
        Some("v1" | "1" | "1.0") => TokenVersion::V1,
        Some(other) => {
            p.push(
                &keys.of("token_version"),
                &format!("{other:?} is not a token endpoint version"),
                "use \"v2\" (default) or \"v1\"",
            );
            TokenVersion::V2
        }
    }
}

/// IMDS or App Service (`IDENTITY_ENDPOINT` + `IDENTITY_HEADER`).
fn managed_identity(
    p: &mut Problems<'_>,
    keys: &Keys,
    c: &RawCredential,
) -> Option<ManagedIdentity> {
    let mode = c.managed_identity.as_deref().map(str::to_ascii_lowercase);
    let app_service = match mode.as_deref() {
        Some("app_service" | "appservice" | "functions") => true,
        Some("imds" | "vm") => false,
        None | Some("true" | "1" | "auto" | "system") => c.identity_endpoint.is_some(),
        Some(other) => {
            p.push(
                &keys.of("managed_identity"),
                &format!("{other:?} is not a managed identity kind"),
                "use \"imds\", \"app_service\" or \"auto\"",
            );
            return None;
        }
    };
    if !app_service {
        let e = c.imds_endpoint.as_deref().unwrap_or(DEFAULT_IMDS);
        return Some(ManagedIdentity::Imds {
            endpoint: p.local_url(&keys.of("imds_endpoint"), e)?,
        });
    }
    let Some(endpoint) = c.identity_endpoint.as_deref() else {
        p.push(
            &keys.of("identity_endpoint"),
            "App Service managed identity needs IDENTITY_ENDPOINT",
            "set IDENTITY_ENDPOINT (App Service sets it for you)",
        );
        return None;
    };
    let endpoint = p.local_url(&keys.of("identity_endpoint"), endpoint)?;
    let Some(header) = &c.identity_header else {
        p.push(
            &keys.of("identity_header"),
            "App Service managed identity needs IDENTITY_HEADER",
            "set IDENTITY_HEADER (App Service sets it for you)",
        );
        return None;
    };
    Some(ManagedIdentity::AppService {
        endpoint,
        header: SecretRef(header.0.clone()),
    })
}

/// A credential of the app registration itself: secret, certificate or
/// federated token.
fn app_credential(
    p: &mut Problems<'_>,
    keys: &Keys,
    kind: &str,
    c: RawCredential,
) -> Option<CredentialKind> {
    match kind {
        "client_secret" | "secret" => client_secret(p, keys, c),
        "certificate" => certificate(p, keys, c),
        "federated" | "workload_identity" => {
            let Some(file) = c.federated_token_file.map(PathBuf::from) else {
                p.push(
                    &keys.of("federated_token_file"),
                    "kind is federated but no token file is set",
                    "set AZURE_FEDERATED_TOKEN_FILE",
                );
                return None;
            };
            Some(CredentialKind::Federated { token_file: file })
        }
        "unknown" => None,
        other => {
            p.push(
                &keys.of("kind"),
                &format!("{other:?} is not a credential kind"),
                "use client_secret, certificate, federated or managed_identity",
            );
            None
        }
    }
}

fn client_secret(p: &mut Problems<'_>, keys: &Keys, c: RawCredential) -> Option<CredentialKind> {
    match (c.client_secret, c.client_secret_file) {
        (Some(s), None) => Some(CredentialKind::Secret(SecretSource::Inline(s.0))),
        (None, Some(f)) => {
            let path = PathBuf::from(f);
            if let Err(e) = std::fs::metadata(&path) {
                p.push(
                    &keys.of("client_secret_file"),
                    &format!("cannot read {} ({e})", path.display()),
                    "point it at a readable file that holds only the secret",
                );
            }
            Some(CredentialKind::Secret(SecretSource::File(path)))
        }
        (Some(_), Some(_)) => {
            p.push(
                &keys.of("client_secret"),
                "both client_secret and client_secret_file are set",
                "set only one of them",
            );
            None
        }
        (None, None) => {
            p.push(
                &keys.of("client_secret"),
                "kind is client_secret but no secret is set",
                "set AZURE_CLIENT_SECRET or AZURE_CLIENT_SECRET_FILE",
            );
            None
        }
    }
}

fn certificate(p: &mut Problems<'_>, keys: &Keys, c: RawCredential) -> Option<CredentialKind> {
    let Some(path) = c.certificate_path.map(PathBuf::from) else {
        p.push(
            &keys.of("certificate_path"),
            "kind is certificate but no certificate file is set",
            "set AZURE_CLIENT_CERTIFICATE_PATH to a PEM (key + certificate) or PFX file",
        );
        return None;
    };
    if let Err(e) = std::fs::metadata(&path) {
        p.push(
            &keys.of("certificate_path"),
            &format!("cannot read {} ({e})", path.display()),
            "point it at a readable PEM or PFX file",
        );
    }
    let algorithm = match c
        .assertion_algorithm
        .as_deref()
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        None | Some("PS256") => AssertionAlgorithm::Ps256,
        Some("RS256") => AssertionAlgorithm::Rs256,
        Some(other) => {
            p.push(
                &keys.of("assertion_algorithm"),
                &format!("{other:?} is not supported"),
                "use \"PS256\" (default) or \"RS256\" (ADFS, older tenants)",
            );
            AssertionAlgorithm::Ps256
        }
    };
    Some(CredentialKind::Certificate {
        path,
        password: c.certificate_password.map(|s| SecretRef(s.0)),
        send_chain: c.send_certificate_chain.unwrap_or(false),
        algorithm,
    })
}

/// The token URL: `token_url` as given, else `{authority}/{tenant}/oauth2/…`
/// with the authority from `authority_host`, `cloud` or the public cloud.
fn token_url(
    p: &mut Problems<'_>,
    keys: &Keys,
    c: &RawCredential,
    tenant_id: Option<&str>,
    version: TokenVersion,
) -> Option<Url> {
    if let Some(u) = c.token_url.as_deref() {
        return p.url(&keys.of("token_url"), u);
    }
    let host = match (c.authority_host.as_deref(), c.cloud.as_deref()) {
        (Some(h), _) => h.to_owned(),
        (None, Some(cloud)) => match cloud_authority(cloud) {
            Some(h) => h.to_owned(),
            None => {
                p.push(
                    &keys.of("cloud"),
                    &format!("{cloud:?} is not a known cloud"),
                    "use \"public\", \"usgovernment\" or \"china\", or set authority_host",
                );
                return None;
            }
        },
        (None, None) => DEFAULT_AUTHORITY.to_owned(),
    };
    let tenant = tenant_id?;
    let host = if host.contains("://") {
        host
    } else {
        format!("https://{host}")
    };
    let base = p.url(&keys.of("authority_host"), &host)?;
    let base = base.as_str().trim_end_matches('/');
    let path = match version {
        TokenVersion::V2 => "oauth2/v2.0/token",
        TokenVersion::V1 => "oauth2/token",
    };
    p.url(&keys.of("tenant_id"), &format!("{base}/{tenant}/{path}"))
}

pub(super) fn required(
    p: &mut Problems<'_>,
    key: &str,
    value: Option<String>,
    fix: &str,
) -> Option<String> {
    match value {
        Some(v) if !v.trim().is_empty() => Some(v.trim().to_owned()),
        _ => {
            p.push(key, "is required", fix);
            None
        }
    }
}

/// Warns when a credential file can be read by other users.
pub fn warn_if_readable_by_others(what: &str, path: &std::path::Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the {what} file is readable by other users; restrict it (chmod 600 or 400)"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = (what, path);
}
