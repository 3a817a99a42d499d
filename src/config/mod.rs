//! Typed configuration: layering, validation and error reporting.
//!
//! Precedence, highest first: command-line flags, environment variables, the
//! config file, built-in defaults. The file is `--config PATH`, else
//! `$DATAVERSE_PROXY_CONFIG`, else `./config.toml` when present.
//!
//! Loading happens in two steps. [figment] merges the layers and deserialises
//! them into [`RawConfig`], whose structs reject unknown keys. Then
//! [`RawConfig::validate`] turns every field into its typed form and collects
//! *all* problems before failing, so an operator sees every mistake at once.
//! Each problem names the key, where its value came from (file, variable or
//! flag) and the fix.
//!
//! The process environment is never read here: callers pass it in as a map
//! (`main.rs` collects it), which keeps tests free of `std::env::set_var`.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use secrecy::SecretString;
use serde::Deserialize;
use url::Url;
use uuid::Uuid;

mod callers;
mod credentials;
mod identity;
mod listener;
mod orgs;
mod policy;
mod problems;
mod raw;
mod sources;
mod types;
mod validate;

#[cfg(test)]
mod access_tests;
#[cfg(test)]
mod tests;

pub use credentials::warn_if_readable_by_others;
pub use identity::{
    ActAsCaller, CallerTokens, CertificateRequirement, SubjectName, TokenRequirement,
};
pub use listener::{CorsConfig, ListenerTls};
pub use policy::{Access, Caller, Impersonation, PRIVILEGED_HEADERS, Policy, WEB_API_METHODS};
pub use problems::{ConfigError, parse_duration, parse_size};
pub use raw::RawConfig;
pub use types::*;

use callers::*;
use credentials::*;
use identity::*;
use listener::*;
use orgs::*;
use policy::*;
use problems::*;
use raw::*;
use sources::*;

/// Exit code for configuration errors (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// Environment variables and the config keys they set (docs/configuration.md).
pub const ENV_KEYS: &[(&str, &str)] = &[
    ("DATAVERSE_URL", "org.url"),
    ("AZURE_TENANT_ID", "credential.tenant_id"),
    ("AZURE_CLIENT_ID", "credential.client_id"),
    ("AZURE_CLIENT_SECRET", "credential.client_secret"),
    ("AZURE_CLIENT_SECRET_FILE", "credential.client_secret_file"),
    (
        "AZURE_CLIENT_CERTIFICATE_PATH",
        "credential.certificate_path",
    ),
    (
        "AZURE_CLIENT_CERTIFICATE_PASSWORD",
        "credential.certificate_password",
    ),
    (
        "AZURE_CLIENT_SEND_CERTIFICATE_CHAIN",
        "credential.send_certificate_chain",
    ),
    (
        "AZURE_FEDERATED_TOKEN_FILE",
        "credential.federated_token_file",
    ),
    ("IDENTITY_ENDPOINT", "credential.identity_endpoint"),
    ("IDENTITY_HEADER", "credential.identity_header"),
    (
        "DATAVERSE_PROXY_MANAGED_IDENTITY",
        "credential.managed_identity",
    ),
    ("DATAVERSE_PROXY_IMDS_ENDPOINT", "credential.imds_endpoint"),
    ("DATAVERSE_PROXY_CLOUD", "credential.cloud"),
    ("AZURE_AUTHORITY_HOST", "credential.authority_host"),
    ("DATAVERSE_PROXY_TOKEN_URL", "credential.token_url"),
    ("DATAVERSE_PROXY_LISTEN", "listen"),
    ("DATAVERSE_PROXY_ADMIN_LISTEN", "admin_listen"),
    ("DATAVERSE_PROXY_ADMIN_RELOAD", "admin_reload"),
    ("DATAVERSE_PROXY_ADMIN_HOSTS", "admin_hosts"),
    ("DATAVERSE_PROXY_PUBLIC_URL", "public_url"),
    ("DATAVERSE_PROXY_TRUSTED_PROXIES", "trusted_proxies"),
    (
        "DATAVERSE_PROXY_MAX_CONCURRENCY",
        "governor.max_concurrency",
    ),
    ("DATAVERSE_PROXY_REDIS_URL", "governor.redis_url"),
    ("DATAVERSE_PROXY_REDIS_CLUSTER", "governor.redis_cluster"),
    (
        "DATAVERSE_PROXY_EXPECTED_REPLICAS",
        "governor.expected_replicas",
    ),
    ("DATAVERSE_PROXY_SHUTDOWN_DELAY", "shutdown.delay"),
    ("DATAVERSE_PROXY_SHUTDOWN_GRACE", "shutdown.grace"),
    ("https_proxy", "upstream.proxy"),
    ("HTTPS_PROXY", "upstream.proxy"),
    ("no_proxy", "upstream.no_proxy"),
    ("NO_PROXY", "upstream.no_proxy"),
    ("DATAVERSE_PROXY_CA_FILE", "upstream.ca_file"),
    ("DATAVERSE_PROXY_LOG_FORMAT", "log.format"),
];

/// Command-line flags and the config keys they set.
pub const FLAG_KEYS: &[(&str, &str)] = &[
    ("--listen", "listen"),
    ("--admin-listen", "admin_listen"),
    ("--org-url", "org.url"),
    ("--public-url", "public_url"),
    ("--log-format", "log.format"),
];

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
const DEFAULT_IMDS: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

/// Everything configuration is read from. Built by `main.rs` from the process
/// and by tests from literals.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// Explicit config file (`--config` or `$DATAVERSE_PROXY_CONFIG`); it must exist.
    pub file: Option<PathBuf>,
    /// Read `./config.toml` when no file is named and it exists.
    pub default_file: bool,
    /// Environment variables (only the names in [`ENV_KEYS`] are used).
    pub env: HashMap<String, String>,
    /// Flag values as `(flag, value)`, flags from [`FLAG_KEYS`].
    pub flags: Vec<(&'static str, String)>,
    /// Values that win over everything, as `(key, value)`, e.g. the `demo`
    /// command's simulator endpoints.
    pub overrides: Vec<(&'static str, String)>,
    /// TOML text layered just below the overrides (the `demo` command's
    /// caller rules, which `(key, value)` pairs cannot express).
    pub inline_toml: Option<String>,
}

impl Config {
    /// Loads, layers and validates the configuration.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = &sources.file {
            if !path.is_file() {
                return Err(ConfigError {
                    problems: vec![format!(
                        "config file {} does not exist or is not a file; fix the path given by --config or $DATAVERSE_PROXY_CONFIG",
                        path.display()
                    )],
                });
            }
            figment = figment.merge(Toml::file_exact(path));
        } else if sources.default_file && Path::new("config.toml").is_file() {
            figment = figment.merge(Toml::file_exact("config.toml"));
        }
        figment = figment
            .merge(MapProvider::from_env(&sources.env))
            .merge(MapProvider::new(
                "command-line flag",
                FLAG_KEYS,
                sources.flags.clone(),
            ))
            .merge(Toml::string(sources.inline_toml.as_deref().unwrap_or("")))
            .merge(MapProvider::overrides(&sources.overrides));

        let raw: RawConfig = figment.extract().map_err(|e| ConfigError {
            problems: e.into_iter().map(|e| explain_figment(&e)).collect(),
        })?;
        raw.validate(&figment)
    }
}
