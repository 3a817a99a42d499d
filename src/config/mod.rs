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

mod policy;

pub use policy::{Access, Caller, Impersonation, PRIVILEGED_HEADERS, Policy, WEB_API_METHODS};

/// Exit code for configuration errors (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// Environment variables and the config keys they set (design §2).
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
    ("DATAVERSE_PROXY_PUBLIC_URL", "public_url"),
    ("DATAVERSE_PROXY_TRUSTED_PROXIES", "trusted_proxies"),
    (
        "DATAVERSE_PROXY_MAX_CONCURRENCY",
        "governor.max_concurrency",
    ),
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

// === Validated configuration ===

/// The validated configuration the proxy runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address of the proxy listener.
    pub listen: SocketAddr,
    /// Address of the admin listener (`/livez`, `/readyz`).
    pub admin_listen: SocketAddr,
    /// The proxy's URL as callers see it, when fixed by configuration.
    pub public_url: Option<Url>,
    /// Peers whose `Forwarded` / `X-Forwarded-*` headers are believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The Dataverse organisations requests are forwarded to (at least one).
    pub orgs: Vec<OrgConfig>,
    /// Upstream (Dataverse) connection settings.
    pub upstream: UpstreamConfig,
    /// Token cache and refresh settings.
    pub token: TokenConfig,
    /// Service-protection governor settings.
    pub governor: GovernorConfig,
    /// Log output settings.
    pub log: LogConfig,
    /// Shutdown settings.
    pub shutdown: ShutdownConfig,
    /// Limits at the edge.
    pub limits: LimitsConfig,
    /// Caller identification.
    pub access: Access,
}

/// One Dataverse organisation.
#[derive(Debug, Clone)]
pub struct OrgConfig {
    /// Short name: the path prefix `/{name}/api/data/…` and the log/metrics label.
    pub name: String,
    /// Origin of the org, e.g. `https://contoso.crm.dynamics.com`, without a
    /// trailing slash or path.
    pub url: Url,
    /// The credential its tokens are requested with.
    pub credential: Arc<CredentialConfig>,
    /// OAuth2 scope (v2), `{url}/.default` unless overridden.
    pub scope: String,
    /// `Host` values routed to this org (host routing), lower-case.
    pub hosts: Vec<String>,
    /// Whether bare `/api/data/…` paths go to this org.
    pub default: bool,
    /// What may reach this org.
    pub policy: Policy,
}

impl OrgConfig {
    /// The org origin as a string without a trailing slash.
    pub fn origin(&self) -> String {
        self.url.as_str().trim_end_matches('/').to_owned()
    }
}

/// An app registration's (or managed identity's) credential settings.
#[derive(Debug, Clone)]
pub struct CredentialConfig {
    /// Name (`default` for `[credential]`, else the `[credentials.NAME]` key).
    pub name: String,
    /// Directory (tenant) id or domain (not used by managed identity).
    pub tenant_id: Option<String>,
    /// Application (client) id; for managed identity, the user-assigned
    /// identity's client id (none: system-assigned).
    pub client_id: Option<String>,
    /// How the credential proves itself.
    pub kind: CredentialKind,
    /// Token endpoint (Entra ID flows): derived from the authority and
    /// tenant unless overridden.
    pub token_url: Option<Url>,
    /// Token endpoint version (Entra ID flows).
    pub version: TokenVersion,
}

/// The kinds of credential, in azure-identity's precedence order.
#[derive(Debug, Clone)]
pub enum CredentialKind {
    /// A client secret.
    Secret(SecretSource),
    /// A certificate (PEM with key and certificate, or PFX / PKCS#12); the
    /// file is read at every fetch, so replacing it rotates the certificate.
    Certificate {
        /// The PEM or PFX file.
        path: PathBuf,
        /// Password of a PFX file.
        password: Option<SecretRef>,
        /// Send the certificate chain (`x5c`) for subject-name/issuer auth.
        send_chain: bool,
        /// Assertion signature algorithm.
        algorithm: AssertionAlgorithm,
    },
    /// Workload identity federation: a token file (e.g. a Kubernetes
    /// service-account token), re-read at every fetch.
    Federated {
        /// The token file.
        token_file: PathBuf,
    },
    /// An Azure managed identity.
    ManagedIdentity(ManagedIdentity),
}

/// A password or header value that must not print.
#[derive(Clone)]
pub struct SecretRef(pub SecretString);

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// Where a managed identity's token comes from.
#[derive(Debug, Clone)]
pub enum ManagedIdentity {
    /// The Instance Metadata Service of VMs and VM scale sets.
    Imds {
        /// The token endpoint (default `http://169.254.169.254/metadata/identity/oauth2/token`).
        endpoint: Url,
    },
    /// App Service / Functions (`IDENTITY_ENDPOINT`, `IDENTITY_HEADER`).
    AppService {
        /// `IDENTITY_ENDPOINT`.
        endpoint: Url,
        /// `IDENTITY_HEADER`.
        header: SecretRef,
    },
}

/// Client-assertion signature algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssertionAlgorithm {
    /// RSASSA-PSS with SHA-256 and an `x5t#S256` header (Entra's current default).
    Ps256,
    /// RSASSA-PKCS1-v1_5 with SHA-256 and an `x5t` (SHA-1) header (ADFS, older tenants).
    Rs256,
}

/// Entra ID token endpoint version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenVersion {
    /// `/oauth2/v2.0/token` with `scope`.
    V2,
    /// `/oauth2/token` with `resource` (ADFS, on-premises Dynamics).
    V1,
}

/// Where a client secret is read from.
#[derive(Clone)]
pub enum SecretSource {
    /// Given inline (config file or `AZURE_CLIENT_SECRET`).
    Inline(SecretString),
    /// Read from this file at every token fetch, so rotation needs no restart.
    File(PathBuf),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inline(_) => f.write_str("Inline([REDACTED])"),
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// Upstream connection settings; defaults suit Dataverse, whose `$batch`
/// and `$metadata` calls can take minutes.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// Time from sending the request until the response headers arrive.
    pub response_timeout: Duration,
    /// Longest pause between two chunks of a response body.
    pub idle_timeout: Duration,
    /// How long an unused pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per upstream host.
    pub pool_max_idle: usize,
    /// Outbound HTTP proxy for Entra ID and Dataverse traffic (CONNECT tunnels).
    pub egress: Option<EgressProxy>,
    /// Extra trusted CA certificates (PEM bundle) besides the system store.
    pub ca_file: Option<PathBuf>,
    /// Request bodies up to this size (with a `Content-Length`) are buffered,
    /// so they can be replayed after a 429 or a 401 and their links
    /// rewritten with an exact `Content-Length`; larger ones stream.
    pub replay_buffer: usize,
}

/// A corporate egress proxy.
#[derive(Clone)]
pub struct EgressProxy {
    /// `http://proxy.example.com:3128` (credentials in the URL are sent as Basic auth).
    pub url: String,
    /// Hosts reached directly: a comma list as in `NO_PROXY`.
    pub no_proxy: String,
}

impl fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressProxy")
            .field("url", &redact_userinfo(&self.url))
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

/// Service-protection governor settings (per org).
#[derive(Debug, Clone)]
pub struct GovernorConfig {
    /// Requests in flight to the org at most (Dataverse allows 52 per user
    /// per web server).
    pub max_concurrency: usize,
    /// Callers waiting for a slot at most; more get 429.
    pub max_queue: usize,
    /// Longest wait for a slot before a 429.
    pub queue_timeout: Duration,
    /// Replays of a throttled (429) request at most.
    pub max_retries: u32,
    /// A throttled request is replayed only if the wait ends within this
    /// time from its arrival; otherwise the 429 goes to the caller.
    pub retry_deadline: Duration,
    /// Longest pause honoured from one `Retry-After`.
    pub max_retry_after: Duration,
}

/// Token cache and refresh settings.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// Egress proxy and extra CAs, shared with the upstream client.
    pub egress: Option<EgressProxy>,
    /// Extra trusted CA certificates.
    pub ca_file: Option<PathBuf>,
    /// Timeout of one token request.
    pub fetch_timeout: Duration,
    /// First retry delay after a failed fetch; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest retry delay after failed fetches.
    pub max_backoff: Duration,
}

/// Log output settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Line format.
    pub format: LogFormat,
    /// Log query strings in request lines (they can carry personal data).
    pub query: bool,
}

/// Limits at the edge.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Open client connections at most; more are closed at once.
    pub max_connections: usize,
    /// Size of the request line and headers at most (431 beyond).
    pub max_header_bytes: usize,
    /// Number of request headers at most (431 beyond).
    pub max_headers: usize,
    /// Time a client has to send its request headers (slowloris).
    pub header_read_timeout: Duration,
    /// Request body size at most (413 beyond).
    pub max_body: usize,
    /// Longest pause in a request body (408 beyond).
    pub body_idle_timeout: Duration,
    /// Path length at most (414 beyond).
    pub max_path: usize,
    /// Query string length at most (414 beyond).
    pub max_query: usize,
}

/// Shutdown settings.
#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    /// After SIGTERM, how long `/readyz` answers 503 while the listener still
    /// accepts (lets load balancers stop sending first).
    pub delay: Duration,
    /// How long in-flight requests may finish after the listener closes;
    /// the rest are then aborted.
    pub grace: Duration,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

// === Raw (deserialised, unvalidated) configuration ===

/// The configuration as deserialised, before validation. Every struct rejects
/// unknown keys.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    listen: Option<String>,
    admin_listen: Option<String>,
    public_url: Option<String>,
    #[serde(deserialize_with = "lenient_list")]
    trusted_proxies: Option<Vec<String>>,
    org: RawOrg,
    credential: RawCredential,
    orgs: Option<Vec<RawNamedOrg>>,
    credentials: Option<std::collections::BTreeMap<String, RawCredential>>,
    upstream: RawUpstream,
    token: RawToken,
    governor: RawGovernor,
    log: RawLog,
    shutdown: RawShutdown,
    limits: RawLimits,
    callers: Option<Vec<RawCaller>>,
    access: RawAccess,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawGovernor {
    #[serde(deserialize_with = "lenient_number")]
    max_concurrency: Option<usize>,
    #[serde(deserialize_with = "lenient_number")]
    max_queue: Option<usize>,
    queue_timeout: Option<String>,
    #[serde(deserialize_with = "lenient_number")]
    max_retries: Option<u32>,
    retry_deadline: Option<String>,
    max_retry_after: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawOrg {
    url: Option<String>,
    scope: Option<String>,
    policy: Option<RawPolicy>,
    #[serde(deserialize_with = "lenient_list")]
    hosts: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamedOrg {
    name: String,
    url: Option<String>,
    #[serde(default)]
    credential: Option<String>,
    #[serde(default, deserialize_with = "lenient_bool")]
    default: Option<bool>,
    #[serde(default, deserialize_with = "lenient_list")]
    hosts: Option<Vec<String>>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    policy: Option<RawPolicy>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawPolicy {
    #[serde(deserialize_with = "lenient_bool")]
    read_only: Option<bool>,
    #[serde(deserialize_with = "lenient_list")]
    methods: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_list")]
    allow: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_list")]
    deny: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_bool")]
    metadata: Option<bool>,
    #[serde(deserialize_with = "lenient_list")]
    impersonation: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_list")]
    privileged_headers: Option<Vec<String>>,
    batch_buffer: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCaller {
    name: String,
    #[serde(default)]
    api_key_sha256: Option<String>,
    #[serde(default, deserialize_with = "lenient_list")]
    cidrs: Option<Vec<String>>,
    #[serde(default, deserialize_with = "lenient_list")]
    orgs: Option<Vec<String>>,
    #[serde(default, deserialize_with = "lenient_bool")]
    read_only: Option<bool>,
    #[serde(default)]
    requests_per_second: Option<f64>,
    #[serde(default, deserialize_with = "lenient_list")]
    privileged_headers: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawAccess {
    #[serde(deserialize_with = "lenient_list")]
    allow_cidrs: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_bool")]
    require_api_key: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawCredential {
    kind: Option<String>,
    tenant_id: Option<String>,
    client_id: Option<String>,
    client_secret: Option<RawSecret>,
    client_secret_file: Option<String>,
    certificate_path: Option<String>,
    certificate_password: Option<RawSecret>,
    #[serde(deserialize_with = "lenient_bool")]
    send_certificate_chain: Option<bool>,
    assertion_algorithm: Option<String>,
    federated_token_file: Option<String>,
    managed_identity: Option<String>,
    identity_endpoint: Option<String>,
    identity_header: Option<RawSecret>,
    imds_endpoint: Option<String>,
    authority_host: Option<String>,
    cloud: Option<String>,
    token_url: Option<String>,
    token_version: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawUpstream {
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    idle_timeout: Option<String>,
    pool_idle_timeout: Option<String>,
    #[serde(deserialize_with = "lenient_number")]
    pool_max_idle: Option<usize>,
    replay_buffer: Option<String>,
    proxy: Option<String>,
    no_proxy: Option<String>,
    ca_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawToken {
    fetch_timeout: Option<String>,
    min_backoff: Option<String>,
    max_backoff: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    format: Option<String>,
    #[serde(deserialize_with = "lenient_bool")]
    query: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    #[serde(deserialize_with = "lenient_number")]
    max_connections: Option<usize>,
    max_header_bytes: Option<String>,
    #[serde(deserialize_with = "lenient_number")]
    max_headers: Option<usize>,
    header_read_timeout: Option<String>,
    max_body: Option<String>,
    body_idle_timeout: Option<String>,
    max_path: Option<String>,
    max_query: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawShutdown {
    delay: Option<String>,
    grace: Option<String>,
}

/// A number given as a number (TOML) or as a numeric string (environment
/// variables and flags are strings).
fn lenient_number<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr + Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either<T> {
        Num(T),
        Str(String),
    }
    match Option::<Either<T>>::deserialize(d)? {
        None => Ok(None),
        Some(Either::Num(n)) => Ok(Some(n)),
        Some(Either::Str(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a whole number"))),
    }
}

/// A boolean given as a boolean (TOML) or as a string (`true`/`1`/`false`/`0`,
/// any case, as azure-identity reads `AZURE_CLIENT_SEND_CERTIFICATE_CHAIN`).
fn lenient_bool<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Bool(bool),
        Str(String),
    }
    match Option::<Either>::deserialize(d)? {
        None => Ok(None),
        Some(Either::Bool(b)) => Ok(Some(b)),
        Some(Either::Str(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(Some(true)),
            "false" | "0" | "" => Ok(Some(false)),
            _ => Err(serde::de::Error::custom(format!(
                "{s:?} is not true or false"
            ))),
        },
    }
}

/// A list given as a list (TOML) or as a comma-separated string
/// (environment variables and flags).
fn lenient_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Str(String),
    }
    Ok(Option::<Either>::deserialize(d)?.map(|e| match e {
        Either::List(l) => l,
        Either::Str(s) => s
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(str::to_owned)
            .collect(),
    }))
}

/// A secret as deserialised. Its deserialiser never echoes the value in an
/// error, whatever type was given.
struct RawSecret(SecretString);

impl<'de> Deserialize<'de> for RawSecret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RawSecret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawSecret, E> {
                Ok(RawSecret(SecretString::from(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<RawSecret, E> {
                Err(E::custom("a secret must be a quoted string"))
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<RawSecret, E> {
                Err(E::custom("a secret must be a quoted string"))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<RawSecret, E> {
                Err(E::custom("a secret must be a quoted string"))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<RawSecret, E> {
                Err(E::custom("a secret must be a quoted string"))
            }
        }
        d.deserialize_any(V)
    }
}

// === Loading ===

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
}

/// Every problem found while loading the configuration.
#[derive(Debug)]
pub struct ConfigError {
    /// One line per problem, each naming the key, its source and the fix.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "invalid configuration ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

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
            .merge(MapProvider::overrides(&sources.overrides));

        let raw: RawConfig = figment.extract().map_err(|e| ConfigError {
            problems: e.into_iter().map(|e| explain_figment(&e)).collect(),
        })?;
        raw.validate(&figment)
    }
}

/// Turns a figment error into one line that says what to do.
///
/// Nothing from the file's content is repeated: a TOML syntax error quotes
/// the offending line (which may hold a secret) and a type error quotes the
/// string it found; both are cut to where and what (found by fuzzing).
fn explain_figment(e: &figment::Error) -> String {
    use figment::error::{Actual, Kind};
    let mut e = e.clone();
    e.kind = match e.kind {
        Kind::Message(m) => Kind::Message(without_source_lines(&m)),
        Kind::InvalidType(Actual::Str(_), exp) => {
            Kind::InvalidType(Actual::Other("a string".into()), exp)
        }
        Kind::InvalidValue(Actual::Str(_), exp) => {
            Kind::InvalidValue(Actual::Other("a string".into()), exp)
        }
        other => other,
    };
    let mut line = e.to_string();
    if let figment::error::Kind::UnknownField(field, expected) = &e.kind {
        line = format!(
            "unknown key `{field}`{}; remove it or fix its spelling (known keys here: {})",
            e.metadata
                .as_ref()
                .map(|m| format!(" in {}", describe_metadata(m)))
                .unwrap_or_default(),
            expected.join(", ")
        );
    }
    line
}

/// A TOML parser message without its quoted source lines (`3 | …`, `  |  ^`).
fn without_source_lines(message: &str) -> String {
    message
        .lines()
        .filter(|l| {
            let t = l
                .trim_start()
                .trim_start_matches(|c: char| c.is_ascii_digit());
            !t.trim_start().starts_with('|')
        })
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}

fn describe_metadata(md: &Metadata) -> String {
    match &md.source {
        Some(Source::File(p)) => format!("config file {}", p.display()),
        Some(other) => format!("{} {}", md.name, other),
        None => md.name.to_string(),
    }
}

/// Collects validation problems with the origin of each key.
struct Problems<'a> {
    figment: &'a Figment,
    list: Vec<String>,
}

impl Problems<'_> {
    /// Where `key`'s value came from, for error messages.
    fn origin(&self, key: &str) -> String {
        match self.figment.find_metadata(key) {
            None => "(not set)".to_owned(),
            Some(md) => {
                let keys: Vec<&str> = key.split('.').collect();
                match &md.source {
                    Some(Source::File(p)) => format!("(in config file {})", p.display()),
                    _ => format!("(from {})", md.interpolate(&Profile::Default, &keys)),
                }
            }
        }
    }

    fn push(&mut self, key: &str, what: &str, fix: &str) {
        let origin = self.origin(key);
        self.list.push(format!("`{key}` {origin}: {what}; {fix}"));
    }

    fn addr(&mut self, key: &str, value: Option<&str>, default: &str) -> Option<SocketAddr> {
        let v = value.unwrap_or(default);
        match v.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.push(
                    key,
                    &format!("{v:?} is not a socket address"),
                    "use IP:PORT, e.g. \"127.0.0.1:8080\" or \"0.0.0.0:8080\"",
                );
                None
            }
        }
    }

    fn duration(&mut self, key: &str, value: Option<&str>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(v) => match parse_duration(v) {
                Some(d) => d,
                None => {
                    self.push(
                        key,
                        &format!("{v:?} is not a duration"),
                        "use a number with a unit: \"500ms\", \"30s\", \"5m\" or \"1h\"",
                    );
                    default
                }
            },
        }
    }

    fn size(&mut self, key: &str, value: Option<&str>, default: usize) -> usize {
        match value {
            None => default,
            Some(v) => parse_size(v).unwrap_or_else(|| {
                self.push(
                    key,
                    &format!("{v:?} is not a size"),
                    "use bytes or a unit: \"64KiB\", \"1MiB\", \"128MiB\"",
                );
                default
            }),
        }
    }

    /// Parses an http(s) URL; `http` only for loopback hosts.
    fn url(&mut self, key: &str, value: &str) -> Option<Url> {
        let url = match Url::parse(value) {
            Ok(u) => u,
            Err(e) => {
                self.push(
                    key,
                    &format!("{value:?} is not a URL ({e})"),
                    "give an absolute URL such as \"https://contoso.crm.dynamics.com\"",
                );
                return None;
            }
        };
        match url.scheme() {
            "https" => {}
            "http" if is_loopback(&url) => {}
            "http" => {
                self.push(
                    key,
                    &format!("{value:?} uses http:// for a host that is not loopback"),
                    "use https:// (plain http is accepted only for 127.0.0.1, ::1 and localhost)",
                );
                return None;
            }
            other => {
                self.push(
                    key,
                    &format!("scheme {other:?} is not supported"),
                    "use https://",
                );
                return None;
            }
        }
        if !url.username().is_empty() || url.password().is_some() {
            self.push(
                key,
                "the URL contains user information",
                "remove the user:password@ part; credentials belong in the credential section",
            );
            return None;
        }
        Some(url)
    }
}

impl Problems<'_> {
    /// A managed-identity endpoint: http is fine for loopback and link-local
    /// (IMDS is http://169.254.169.254) hosts, https anywhere.
    fn local_url(&mut self, key: &str, value: &str) -> Option<Url> {
        let url = Url::parse(value)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"));
        let Some(url) = url else {
            self.push(
                key,
                &format!("{value:?} is not an http(s) URL"),
                "give the endpoint URL, e.g. http://169.254.169.254/metadata/identity/oauth2/token",
            );
            return None;
        };
        let link_local = matches!(url.host(), Some(url::Host::Ipv4(ip)) if ip.is_link_local());
        if url.scheme() == "http" && !is_loopback(&url) && !link_local {
            self.push(
                key,
                &format!(
                    "{value:?} uses http:// for a host that is neither loopback nor link-local"
                ),
                "use https://",
            );
            return None;
        }
        Some(url)
    }
}

/// A URL with any `user:password@` replaced, for error messages.
fn redact_userinfo(v: &str) -> String {
    match (v.find("://"), v.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://[REDACTED]@{}", &v[..s], &v[at + 1..]),
        _ => v.to_owned(),
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// Parses `"512"`, `"64KiB"`, `"1MiB"`, `"2GiB"` (also `KB`/`MB`/`GB` as binary units).
pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num.parse().ok()?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "k" | "K" => 1 << 10,
        "MiB" | "MB" | "M" => 1 << 20,
        "GiB" | "GB" | "G" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Parses `"500ms"`, `"30s"`, `"5m"`, `"1h"` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    Some(d)
}

impl RawConfig {
    /// Validates every field, collecting all problems.
    fn validate(self, figment: &Figment) -> Result<Config, ConfigError> {
        let mut p = Problems {
            figment,
            list: Vec::new(),
        };

        let listen = p.addr("listen", self.listen.as_deref(), DEFAULT_LISTEN);
        let admin_listen = p.addr(
            "admin_listen",
            self.admin_listen.as_deref(),
            DEFAULT_ADMIN_LISTEN,
        );
        let public_url = self.public_url.as_deref().and_then(|v| match Url::parse(v) {
            Ok(u)
                if matches!(u.scheme(), "http" | "https")
                    && u.host().is_some()
                    && u.query().is_none()
                    && u.fragment().is_none() =>
            {
                Some(u)
            }
            _ => {
                p.push(
                    "public_url",
                    &format!("{v:?} is not an http(s) URL without query"),
                    "give the URL callers use, e.g. \"https://dataverse-proxy.example.com\" (a path prefix is allowed)",
                );
                None
            }
        });

        let mut trusted_proxies = Vec::new();
        for entry in self.trusted_proxies.unwrap_or_default() {
            let parsed = entry
                .parse::<ipnet::IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(ipnet::IpNet::from));
            match parsed {
                Ok(net) => trusted_proxies.push(net),
                Err(_) => p.push(
                    "trusted_proxies",
                    &format!("{entry:?} is not an IP address or CIDR block"),
                    "list addresses or blocks such as \"10.0.0.0/8\" or \"192.0.2.7\"",
                ),
            }
        }

        let orgs = validate_orgs(
            &mut p,
            self.org,
            self.credential,
            self.orgs,
            self.credentials,
        );

        let u = self.upstream;
        let egress = u.proxy.as_deref().filter(|v| !v.trim().is_empty()).and_then(|v| {
            match Url::parse(v) {
                Ok(url) if url.scheme() == "http" && url.host().is_some() => Some(EgressProxy {
                    url: v.trim().to_owned(),
                    no_proxy: u.no_proxy.clone().unwrap_or_default(),
                }),
                _ => {
                    p.push(
                        "upstream.proxy",
                        &format!("{:?} is not an http:// proxy URL", redact_userinfo(v)),
                        "use e.g. \"http://proxy.example.com:3128\" (HTTPS traffic is tunnelled with CONNECT)",
                    );
                    None
                }
            }
        });
        let ca_file = u.ca_file.map(PathBuf::from);
        if let Some(path) = &ca_file
            && let Err(e) = std::fs::read(path)
        {
            p.push(
                "upstream.ca_file",
                &format!("cannot read {} ({e})", path.display()),
                "point it at a PEM file of CA certificates",
            );
        }
        let upstream = UpstreamConfig {
            egress,
            ca_file,
            connect_timeout: p.duration(
                "upstream.connect_timeout",
                u.connect_timeout.as_deref(),
                Duration::from_secs(10),
            ),
            response_timeout: p.duration(
                "upstream.response_timeout",
                u.response_timeout.as_deref(),
                Duration::from_secs(300),
            ),
            idle_timeout: p.duration(
                "upstream.idle_timeout",
                u.idle_timeout.as_deref(),
                Duration::from_secs(120),
            ),
            pool_idle_timeout: p.duration(
                "upstream.pool_idle_timeout",
                u.pool_idle_timeout.as_deref(),
                Duration::from_secs(90),
            ),
            pool_max_idle: u.pool_max_idle.unwrap_or(64),
            replay_buffer: p.size(
                "upstream.replay_buffer",
                u.replay_buffer.as_deref(),
                1 << 20,
            ),
        };

        let g = self.governor;
        let governor = GovernorConfig {
            max_concurrency: g.max_concurrency.unwrap_or(50),
            max_queue: g.max_queue.unwrap_or(1000),
            queue_timeout: p.duration(
                "governor.queue_timeout",
                g.queue_timeout.as_deref(),
                Duration::from_secs(30),
            ),
            max_retries: g.max_retries.unwrap_or(3),
            retry_deadline: p.duration(
                "governor.retry_deadline",
                g.retry_deadline.as_deref(),
                Duration::from_secs(60),
            ),
            max_retry_after: p.duration(
                "governor.max_retry_after",
                g.max_retry_after.as_deref(),
                Duration::from_secs(300),
            ),
        };
        if governor.max_concurrency == 0 || governor.max_concurrency > 52 {
            p.push(
                "governor.max_concurrency",
                &format!("{} is outside 1..=52", governor.max_concurrency),
                "Dataverse allows 52 concurrent requests per user and web server; keep a margin, e.g. 50 (split it between replicas)",
            );
        }

        let t = self.token;
        let token = TokenConfig {
            egress: upstream.egress.clone(),
            ca_file: upstream.ca_file.clone(),
            fetch_timeout: p.duration(
                "token.fetch_timeout",
                t.fetch_timeout.as_deref(),
                Duration::from_secs(30),
            ),
            min_backoff: p.duration(
                "token.min_backoff",
                t.min_backoff.as_deref(),
                Duration::from_secs(1),
            ),
            max_backoff: p.duration(
                "token.max_backoff",
                t.max_backoff.as_deref(),
                Duration::from_secs(60),
            ),
        };
        if token.min_backoff.is_zero() || token.min_backoff > token.max_backoff {
            p.push(
                "token.min_backoff",
                "must be above zero and at most token.max_backoff",
                "e.g. min_backoff = \"1s\", max_backoff = \"60s\"",
            );
        }

        let shutdown = ShutdownConfig {
            delay: p.duration(
                "shutdown.delay",
                self.shutdown.delay.as_deref(),
                Duration::ZERO,
            ),
            grace: p.duration(
                "shutdown.grace",
                self.shutdown.grace.as_deref(),
                Duration::from_secs(30),
            ),
        };
        let access = validate_access(&mut p, self.callers, self.access, &trusted_proxies);
        let l = self.limits;
        let limits = LimitsConfig {
            max_connections: l.max_connections.unwrap_or(4096),
            max_header_bytes: p.size(
                "limits.max_header_bytes",
                l.max_header_bytes.as_deref(),
                64 << 10,
            ),
            max_headers: l.max_headers.unwrap_or(100),
            header_read_timeout: p.duration(
                "limits.header_read_timeout",
                l.header_read_timeout.as_deref(),
                Duration::from_secs(10),
            ),
            max_body: p.size("limits.max_body", l.max_body.as_deref(), 128 << 20),
            body_idle_timeout: p.duration(
                "limits.body_idle_timeout",
                l.body_idle_timeout.as_deref(),
                Duration::from_secs(60),
            ),
            max_path: p.size("limits.max_path", l.max_path.as_deref(), 4 << 10),
            max_query: p.size("limits.max_query", l.max_query.as_deref(), 32 << 10),
        };
        let format = match self.log.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                p.push(
                    "log.format",
                    &format!("{other:?} is not a log format"),
                    "use \"text\" or \"json\"",
                );
                LogFormat::Text
            }
        };

        match (listen, admin_listen) {
            (Some(listen), Some(admin_listen)) if p.list.is_empty() => Ok(Config {
                listen,
                admin_listen,
                public_url,
                trusted_proxies,
                orgs,
                upstream,
                token,
                governor,
                log: LogConfig {
                    format,
                    query: self.log.query.unwrap_or(false),
                },
                shutdown,
                limits,
                access,
            }),
            _ => Err(ConfigError { problems: p.list }),
        }
    }
}

/// Builds the org list: the `[org]` shorthand (named `default`) and every
/// `[[orgs]]` entry, each with its credential validated once.
fn validate_orgs(
    p: &mut Problems<'_>,
    org: RawOrg,
    credential: RawCredential,
    named: Option<Vec<RawNamedOrg>>,
    credentials: Option<std::collections::BTreeMap<String, RawCredential>>,
) -> Vec<OrgConfig> {
    struct Wanted {
        key: String,
        name: String,
        url: Option<String>,
        credential: String,
        default: Option<bool>,
        hosts: Vec<String>,
        scope: Option<String>,
        policy: Option<RawPolicy>,
    }
    let mut wanted = Vec::new();
    let named = named.unwrap_or_default();
    if org.url.is_some() || named.is_empty() {
        wanted.push(Wanted {
            key: "org".to_owned(),
            name: "default".to_owned(),
            url: org.url,
            credential: "default".to_owned(),
            default: None,
            hosts: org.hosts.unwrap_or_default(),
            scope: org.scope,
            policy: org.policy,
        });
    }
    for (i, o) in named.into_iter().enumerate() {
        wanted.push(Wanted {
            key: format!("orgs[{i}]"),
            name: o.name,
            url: o.url,
            credential: o.credential.unwrap_or_else(|| "default".to_owned()),
            default: o.default,
            hosts: o.hosts.unwrap_or_default(),
            scope: o.scope,
            policy: o.policy,
        });
    }

    let mut raw_creds = credentials.unwrap_or_default();
    if raw_creds.contains_key("default") {
        p.push(
            "credentials.default",
            "the name `default` is taken by the [credential] section",
            "rename this credential, or move its keys to [credential]",
        );
    }
    raw_creds.insert("default".to_owned(), credential);
    let mut validated: std::collections::HashMap<String, Option<Arc<CredentialConfig>>> =
        std::collections::HashMap::new();

    let explicit_defaults = wanted.iter().filter(|w| w.default == Some(true)).count();
    if explicit_defaults > 1 {
        p.push(
            "orgs",
            "more than one org is marked default = true",
            "mark at most one",
        );
    }
    let single = wanted.len() == 1;
    let mut names = std::collections::HashSet::new();
    let mut out = Vec::new();
    for w in wanted {
        let name_ok = !w.name.is_empty()
            && w.name.len() <= 64
            && w.name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            && w.name != "api";
        if !name_ok {
            p.push(
                &format!("{}.name", w.key),
                &format!(
                    "{:?} cannot be an org name (it is the path prefix /NAME/api/data/…)",
                    w.name
                ),
                "use lower-case letters, digits, - and _ (and not \"api\")",
            );
        }
        if !names.insert(w.name.clone()) {
            p.push(
                &format!("{}.name", w.key),
                &format!("the org name {:?} is used twice", w.name),
                "give every org its own name",
            );
        }
        let url_key = format!("{}.url", w.key);
        let url = match w.url.as_deref() {
            None => {
                p.push(
                    &url_key,
                    "the Dataverse org URL is required",
                    "set DATAVERSE_URL, --org-url or [org] url, e.g. \"https://contoso.crm.dynamics.com\"",
                );
                None
            }
            Some(v) => p.url(&url_key, v).and_then(|u| {
                let path = u.path().trim_end_matches('/');
                if !path.is_empty() || u.query().is_some() {
                    p.push(
                        &url_key,
                        &format!("{v:?} has a path or query"),
                        "give only the origin, e.g. \"https://contoso.crm.dynamics.com\" (the proxy adds /api/data/v9.x/)",
                    );
                    None
                } else {
                    Some(u)
                }
            }),
        };
        let credential = match validated.get(&w.credential) {
            Some(c) => c.clone(),
            None => {
                let c = match raw_creds.remove(&w.credential) {
                    Some(raw) => validate_credential(p, &w.credential, raw).map(Arc::new),
                    None => {
                        p.push(
                            &format!("{}.credential", w.key),
                            &format!("no credential named {:?}", w.credential),
                            "define it as [credentials.NAME], or use \"default\" for [credential]",
                        );
                        None
                    }
                };
                validated.insert(w.credential.clone(), c.clone());
                c
            }
        };
        let policy = validate_policy(
            p,
            &format!("{}.policy", w.key),
            w.policy.unwrap_or_default(),
        );
        if let (Some(url), Some(credential)) = (url, credential) {
            let origin = url.as_str().trim_end_matches('/').to_owned();
            out.push(OrgConfig {
                name: w.name,
                scope: w.scope.unwrap_or_else(|| format!("{origin}/.default")),
                url,
                credential,
                hosts: w
                    .hosts
                    .iter()
                    .map(|h| h.trim().to_ascii_lowercase())
                    .collect(),
                default: w
                    .default
                    .unwrap_or(single || (explicit_defaults == 0 && w.key == "org")),
                policy,
            });
        }
    }
    out
}

/// Validates an org's access policy.
fn validate_policy(p: &mut Problems<'_>, key: &str, r: RawPolicy) -> Policy {
    let mut methods = Vec::new();
    for m in r.methods.unwrap_or_default() {
        match http::Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes()) {
            Ok(method) if WEB_API_METHODS.contains(&method) => methods.push(method),
            _ => p.push(
                &format!("{key}.methods"),
                &format!("{m:?} is not a Web API method"),
                "list some of GET, HEAD, POST, PATCH, PUT, DELETE (the policy can only narrow these)",
            ),
        }
    }
    let lower = |v: Option<Vec<String>>| -> Vec<String> {
        v.unwrap_or_default()
            .into_iter()
            .map(|s| s.trim().to_ascii_lowercase())
            .collect()
    };
    let impersonation = match r.impersonation {
        None => Impersonation::Drop,
        Some(list) => match list.as_slice() {
            [one] if one.eq_ignore_ascii_case("drop") => Impersonation::Drop,
            [one] if one.eq_ignore_ascii_case("allow") => Impersonation::Allow,
            ids => Impersonation::Only(ids.iter().map(|s| s.trim().to_owned()).collect()),
        },
    };
    Policy {
        read_only: r.read_only.unwrap_or(false),
        methods,
        allow: lower(r.allow),
        deny: lower(r.deny),
        metadata: r.metadata.unwrap_or(true),
        impersonation,
        privileged: privileged_headers(
            p,
            &format!("{key}.privileged_headers"),
            r.privileged_headers,
        ),
        batch_buffer: p.size(
            &format!("{key}.batch_buffer"),
            r.batch_buffer.as_deref(),
            16 << 20,
        ),
    }
}

/// Validates a list of privileged header names; lower-case.
fn privileged_headers(p: &mut Problems<'_>, key: &str, list: Option<Vec<String>>) -> Vec<String> {
    let mut out = Vec::new();
    for name in list.unwrap_or_default() {
        let lower = name.trim().to_ascii_lowercase();
        if PRIVILEGED_HEADERS.contains(&lower.as_str()) {
            out.push(lower);
        } else {
            p.push(
                key,
                &format!("{name:?} is not a privileged Dataverse header"),
                "list some of MSCRM.BypassCustomPluginExecution, MSCRM.BypassBusinessLogicExecution, \
                 MSCRM.SuppressCallbackRegistrationExpanderJob",
            );
        }
    }
    out
}

/// Validates callers and the global source list.
fn validate_access(
    p: &mut Problems<'_>,
    callers: Option<Vec<RawCaller>>,
    access: RawAccess,
    trusted_proxies: &[ipnet::IpNet],
) -> Access {
    let nets = |p: &mut Problems<'_>, key: &str, list: Option<Vec<String>>| -> Vec<ipnet::IpNet> {
        let mut out = Vec::new();
        for entry in list.unwrap_or_default() {
            match entry
                .parse::<ipnet::IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(ipnet::IpNet::from))
            {
                Ok(n) => out.push(n),
                Err(_) => p.push(
                    key,
                    &format!("{entry:?} is not an IP address or CIDR block"),
                    "use e.g. \"10.0.0.0/8\"",
                ),
            }
        }
        out
    };
    let allow_cidrs = nets(p, "access.allow_cidrs", access.allow_cidrs);
    let mut out = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (i, c) in callers.unwrap_or_default().into_iter().enumerate() {
        let key = format!("callers[{i}]");
        if !names.insert(c.name.clone()) || c.name.trim().is_empty() {
            p.push(
                &format!("{key}.name"),
                &format!("caller name {:?} is empty or used twice", c.name),
                "give every caller its own name",
            );
        }
        let key_sha256 = match c.api_key_sha256.as_deref() {
            None => None,
            Some(h) => {
                let bytes: Option<Vec<u8>> = (h.len() == 64)
                    .then(|| {
                        (0..32)
                            .map(|j| u8::from_str_radix(&h[2 * j..2 * j + 2], 16).ok())
                            .collect()
                    })
                    .flatten();
                match bytes.and_then(|b| <[u8; 32]>::try_from(b).ok()) {
                    Some(b) => Some(b),
                    None => {
                        p.push(
                            &format!("{key}.api_key_sha256"),
                            "is not 64 hex digits",
                            "store the SHA-256 of the key, e.g. `printf %s \"$KEY\" | sha256sum`",
                        );
                        None
                    }
                }
            }
        };
        let cidrs = nets(p, &format!("{key}.cidrs"), c.cidrs);
        if key_sha256.is_none() && cidrs.is_empty() {
            p.push(
                &key,
                "a caller needs an api_key_sha256 or cidrs to be recognised",
                "set one of them",
            );
        }
        if let Some(r) = c.requests_per_second
            && !(r > 0.0 && r.is_finite())
        {
            p.push(
                &format!("{key}.requests_per_second"),
                "must be above zero",
                "e.g. requests_per_second = 20",
            );
        }
        out.push(Caller {
            name: c.name.into(),
            key_sha256,
            cidrs,
            orgs: c.orgs.unwrap_or_default(),
            read_only: c.read_only.unwrap_or(false),
            requests_per_second: c.requests_per_second,
            privileged: privileged_headers(
                p,
                &format!("{key}.privileged_headers"),
                c.privileged_headers,
            ),
        });
    }
    let any_key = out.iter().any(|c| c.key_sha256.is_some());
    Access {
        require_key: access.require_api_key.unwrap_or(any_key),
        callers: out,
        allow_cidrs,
        trusted_proxies: trusted_proxies.to_vec(),
    }
}

/// The authority host of a sovereign cloud (dossier §1.8).
fn cloud_authority(cloud: &str) -> Option<&'static str> {
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

/// Validates one credential; `name` is `default` for `[credential]`.
fn validate_credential(
    p: &mut Problems<'_>,
    name: &str,
    c: RawCredential,
) -> Option<CredentialConfig> {
    let prefix = if name == "default" {
        "credential".to_owned()
    } else {
        format!("credentials.{name}")
    };
    let key = |k: &str| format!("{prefix}.{k}");
    let kind = match c.kind.as_deref() {
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
                &key("client_secret"),
                "no credential is configured",
                "set AZURE_CLIENT_SECRET / AZURE_CLIENT_SECRET_FILE, AZURE_CLIENT_CERTIFICATE_PATH, AZURE_FEDERATED_TOKEN_FILE, or managed_identity (see docs/configuration.md)",
            );
            // Keep going, so missing tenant and client ids are reported too.
            "unknown".to_owned()
        }
    };
    let version = match c.token_version.as_deref() {
        None | Some("v2" | "2" | "2.0") => TokenVersion::V2,
        Some("v1" | "1" | "1.0") => TokenVersion::V1,
        Some(other) => {
            p.push(
                &key("token_version"),
                &format!("{other:?} is not a token endpoint version"),
                "use \"v2\" (default) or \"v1\"",
            );
            TokenVersion::V2
        }
    };
    let client_id = c
        .client_id
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());

    if kind == "managed_identity" {
        let mode = c.managed_identity.as_deref().map(str::to_ascii_lowercase);
        let app_service = match mode.as_deref() {
            Some("app_service" | "appservice" | "functions") => true,
            Some("imds" | "vm") => false,
            None | Some("true" | "1" | "auto" | "system") => c.identity_endpoint.is_some(),
            Some(other) => {
                p.push(
                    &key("managed_identity"),
                    &format!("{other:?} is not a managed identity kind"),
                    "use \"imds\", \"app_service\" or \"auto\"",
                );
                return None;
            }
        };
        let identity = if app_service {
            let endpoint = match c.identity_endpoint.as_deref() {
                Some(e) => p.local_url(&key("identity_endpoint"), e)?,
                None => {
                    p.push(
                        &key("identity_endpoint"),
                        "App Service managed identity needs IDENTITY_ENDPOINT",
                        "set IDENTITY_ENDPOINT (App Service sets it for you)",
                    );
                    return None;
                }
            };
            let Some(header) = c.identity_header else {
                p.push(
                    &key("identity_header"),
                    "App Service managed identity needs IDENTITY_HEADER",
                    "set IDENTITY_HEADER (App Service sets it for you)",
                );
                return None;
            };
            ManagedIdentity::AppService {
                endpoint,
                header: SecretRef(header.0),
            }
        } else {
            let e = c.imds_endpoint.as_deref().unwrap_or(DEFAULT_IMDS);
            ManagedIdentity::Imds {
                endpoint: p.local_url(&key("imds_endpoint"), e)?,
            }
        };
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
        &key("tenant_id"),
        c.tenant_id,
        "set AZURE_TENANT_ID or tenant_id to the directory (tenant) id",
    );
    let client_id = required(
        p,
        &key("client_id"),
        client_id,
        "set AZURE_CLIENT_ID or client_id to the application (client) id",
    );
    let kind = match kind.as_str() {
        "client_secret" | "secret" => match (c.client_secret, c.client_secret_file) {
            (Some(s), None) => CredentialKind::Secret(SecretSource::Inline(s.0)),
            (None, Some(f)) => {
                let path = PathBuf::from(f);
                if let Err(e) = std::fs::metadata(&path) {
                    p.push(
                        &key("client_secret_file"),
                        &format!("cannot read {} ({e})", path.display()),
                        "point it at a readable file that holds only the secret",
                    );
                }
                CredentialKind::Secret(SecretSource::File(path))
            }
            (Some(_), Some(_)) => {
                p.push(
                    &key("client_secret"),
                    "both client_secret and client_secret_file are set",
                    "set only one of them",
                );
                return None;
            }
            (None, None) => {
                p.push(
                    &key("client_secret"),
                    "kind is client_secret but no secret is set",
                    "set AZURE_CLIENT_SECRET or AZURE_CLIENT_SECRET_FILE",
                );
                return None;
            }
        },
        "certificate" => {
            let Some(path) = c.certificate_path.map(PathBuf::from) else {
                p.push(
                    &key("certificate_path"),
                    "kind is certificate but no certificate file is set",
                    "set AZURE_CLIENT_CERTIFICATE_PATH to a PEM (key + certificate) or PFX file",
                );
                return None;
            };
            if let Err(e) = std::fs::metadata(&path) {
                p.push(
                    &key("certificate_path"),
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
                        &key("assertion_algorithm"),
                        &format!("{other:?} is not supported"),
                        "use \"PS256\" (default) or \"RS256\" (ADFS, older tenants)",
                    );
                    AssertionAlgorithm::Ps256
                }
            };
            CredentialKind::Certificate {
                path,
                password: c.certificate_password.map(|s| SecretRef(s.0)),
                send_chain: c.send_certificate_chain.unwrap_or(false),
                algorithm,
            }
        }
        "federated" | "workload_identity" => {
            let Some(file) = c.federated_token_file.map(PathBuf::from) else {
                p.push(
                    &key("federated_token_file"),
                    "kind is federated but no token file is set",
                    "set AZURE_FEDERATED_TOKEN_FILE",
                );
                return None;
            };
            CredentialKind::Federated { token_file: file }
        }
        "unknown" => return None,
        other => {
            p.push(
                &key("kind"),
                &format!("{other:?} is not a credential kind"),
                "use client_secret, certificate, federated or managed_identity",
            );
            return None;
        }
    };

    let authority = match (c.authority_host.as_deref(), c.cloud.as_deref()) {
        (Some(h), _) => Some(h.to_owned()),
        (None, Some(cloud)) => match cloud_authority(cloud) {
            Some(h) => Some(h.to_owned()),
            None => {
                p.push(
                    &key("cloud"),
                    &format!("{cloud:?} is not a known cloud"),
                    "use \"public\", \"usgovernment\" or \"china\", or set authority_host",
                );
                None
            }
        },
        (None, None) => Some(DEFAULT_AUTHORITY.to_owned()),
    };
    let token_url = match (c.token_url.as_deref(), tenant_id.as_deref(), authority) {
        (Some(u), _, _) => p.url(&key("token_url"), u),
        (None, Some(tenant), Some(host)) => {
            let host = if host.contains("://") {
                host
            } else {
                format!("https://{host}")
            };
            p.url(&key("authority_host"), &host).and_then(|h| {
                let base = h.as_str().trim_end_matches('/');
                let path = match version {
                    TokenVersion::V2 => "oauth2/v2.0/token",
                    TokenVersion::V1 => "oauth2/token",
                };
                p.url(&key("tenant_id"), &format!("{base}/{tenant}/{path}"))
            })
        }
        _ => None,
    };
    Some(CredentialConfig {
        name: name.to_owned(),
        tenant_id: Some(tenant_id?),
        client_id: Some(client_id?),
        kind,
        token_url: Some(token_url?),
        version,
    })
}

fn required(p: &mut Problems<'_>, key: &str, value: Option<String>, fix: &str) -> Option<String> {
    match value {
        Some(v) if !v.trim().is_empty() => Some(v.trim().to_owned()),
        _ => {
            p.push(key, "is required", fix);
            None
        }
    }
}

// === impl MapProvider ===

/// A figment provider over `(name, key, value)` triples, whose metadata names
/// the environment variable or flag a key came from.
struct MapProvider {
    name: &'static str,
    table: &'static [(&'static str, &'static str)],
    values: Vec<(&'static str, String)>,
}

impl MapProvider {
    fn new(
        name: &'static str,
        table: &'static [(&'static str, &'static str)],
        values: Vec<(&'static str, String)>,
    ) -> Self {
        Self {
            name,
            table,
            values,
        }
    }

    fn from_env(env: &HashMap<String, String>) -> Self {
        let values = ENV_KEYS
            .iter()
            .filter_map(|(var, _)| {
                env.get(*var)
                    .filter(|v| !v.is_empty())
                    .map(|v| (*var, v.clone()))
            })
            .collect();
        Self::new("environment variable", ENV_KEYS, values)
    }

    /// Overrides are given by key directly; the table maps each key to itself.
    fn overrides(values: &[(&'static str, String)]) -> Self {
        Self {
            name: "built-in override",
            table: &[],
            values: values.to_vec(),
        }
    }

    fn key_of(&self, name: &'static str) -> &'static str {
        self.table
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(name, |(_, k)| k)
    }
}

impl Provider for MapProvider {
    fn metadata(&self) -> Metadata {
        let table = self.table;
        let name = self.name;
        Metadata::named(name).interpolater(move |_, keys| {
            let key = keys.join(".");
            match table.iter().find(|(_, k)| *k == key) {
                Some((var, _)) if name == "environment variable" => format!("${var}"),
                Some((flag, _)) => (*flag).to_owned(),
                None => format!("{name} {key}"),
            }
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (name, value) in &self.values {
            let key = self.key_of(name);
            insert_nested(&mut root, key, Value::from(value.clone()));
        }
        let mut map = Map::new();
        map.insert(Profile::Default, root);
        Ok(map)
    }
}

fn insert_nested(dict: &mut Dict, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            dict.insert(key.to_owned(), value);
        }
        Some((head, rest)) => {
            let entry = dict
                .entry(head.to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert_nested(inner, rest, value);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Writes `text` to a fresh temporary config file and loads it with `env`.
    fn load_toml(
        text: &str,
        env: HashMap<String, String>,
    ) -> (PathBuf, Result<Config, ConfigError>) {
        let dir = std::env::temp_dir().join(format!("dvp-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("c.toml");
        std::fs::write(&path, text).expect("write");
        let result = Config::load(&Sources {
            file: Some(path.clone()),
            env,
            ..Sources::default()
        });
        (path, result)
    }

    fn minimal_env() -> HashMap<String, String> {
        env(&[
            ("DATAVERSE_URL", "https://contoso.crm.dynamics.com"),
            ("AZURE_TENANT_ID", "tenant-1"),
            ("AZURE_CLIENT_ID", "client-1"),
            ("AZURE_CLIENT_SECRET", "s3cr3t-value"),
        ])
    }

    #[test]
    fn env_alone_is_enough() {
        let cfg = Config::load(&Sources {
            env: minimal_env(),
            ..Sources::default()
        })
        .expect("valid");
        let org = &cfg.orgs[0];
        assert_eq!(org.origin(), "https://contoso.crm.dynamics.com");
        assert_eq!(
            org.credential.token_url.as_ref().map(Url::as_str),
            Some("https://login.microsoftonline.com/tenant-1/oauth2/v2.0/token")
        );
        assert_eq!(org.scope, "https://contoso.crm.dynamics.com/.default");
        assert!(org.default);
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(cfg.upstream.response_timeout, Duration::from_secs(300));
        // The secret never shows in Debug output.
        assert!(!format!("{cfg:?}").contains("s3cr3t-value"));
    }

    #[test]
    fn flags_beat_env_and_authority_host_is_used() {
        let mut e = minimal_env();
        e.insert("DATAVERSE_PROXY_LISTEN".into(), "127.0.0.1:1111".into());
        e.insert(
            "AZURE_AUTHORITY_HOST".into(),
            "login.microsoftonline.us".into(),
        );
        let cfg = Config::load(&Sources {
            env: e,
            flags: vec![("--listen", "127.0.0.1:2222".into())],
            ..Sources::default()
        })
        .expect("valid");
        assert_eq!(cfg.listen.port(), 2222);
        assert_eq!(
            cfg.orgs[0].credential.token_url.as_ref().map(Url::as_str),
            Some("https://login.microsoftonline.us/tenant-1/oauth2/v2.0/token")
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_source() {
        let e = env(&[
            ("DATAVERSE_URL", "http://contoso.crm.dynamics.com"),
            ("DATAVERSE_PROXY_LISTEN", "nonsense"),
        ]);
        let err = Config::load(&Sources {
            env: e,
            ..Sources::default()
        })
        .expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("`org.url` (from $DATAVERSE_URL)"), "{text}");
        assert!(text.contains("https://"), "{text}");
        assert!(
            text.contains("`listen` (from $DATAVERSE_PROXY_LISTEN)"),
            "{text}"
        );
        assert!(text.contains("`credential.tenant_id` (not set)"), "{text}");
        assert!(text.contains("`credential.client_id`"), "{text}");
        assert!(text.contains("`credential.client_secret`"), "{text}");
        assert_eq!(err.problems.len(), 5, "{text}");
    }

    #[test]
    fn unknown_keys_in_the_file_are_rejected() {
        let (path, result) = load_toml(
            "[org]
url = \"https://a.crm.dynamics.com\"
urll = 1
",
            HashMap::new(),
        );
        let err = result.expect_err("unknown key");
        let text = err.to_string();
        assert!(text.contains("unknown key `urll`"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
    }

    #[test]
    fn a_secret_of_the_wrong_type_is_not_echoed() {
        let (_, result) = load_toml(
            "[credential]
client_secret = 987654321
",
            HashMap::new(),
        );
        let err = result.expect_err("bad type");
        assert!(!err.to_string().contains("987654321"), "{err}");
    }

    /// Found by the `config_load` fuzz target: TOML syntax errors quoted the
    /// offending line, secret and all.
    #[test]
    fn syntax_and_type_errors_never_quote_the_file() {
        for text in [
            "i=\"\"\"'=\"\"'\n[credential]\nclient_secret = \"hunter2-secret-value\"\n",
            "[credential]\nclient_secret = \"hunter2-secret-value\" x\n",
            "[credential]\nclient_secret = \"hunter2-secret-value\n",
        ] {
            let (_, result) = load_toml(text, HashMap::new());
            let err = result.expect_err("invalid").to_string();
            assert!(!err.contains("hunter2"), "{err}");
            assert!(err.contains("TOML parse error at line"), "{err}");
        }
    }

    #[test]
    fn http_is_loopback_only() {
        let mut e = minimal_env();
        e.insert("DATAVERSE_URL".into(), "http://127.0.0.1:9999".into());
        e.insert(
            "DATAVERSE_PROXY_TOKEN_URL".into(),
            "http://localhost:1/t/oauth2/v2.0/token".into(),
        );
        assert!(
            Config::load(&Sources {
                env: e,
                ..Sources::default()
            })
            .is_ok()
        );
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("64KiB"), Some(65_536));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("128 MB"), Some(128 << 20));
        assert_eq!(parse_size("1 furlong"), None);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("12"), Some(Duration::from_secs(12)));
        assert_eq!(parse_duration("5 minutes"), None);
        assert_eq!(parse_duration("s"), None);
    }

    #[test]
    fn the_shipped_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let mut e = HashMap::new();
        e.insert("AZURE_CLIENT_SECRET".to_owned(), "x".to_owned());
        let cfg = Config::load(&Sources {
            file: Some(path),
            env: e,
            ..Sources::default()
        })
        .expect("config.toml is valid");
        assert_eq!(cfg.orgs[0].origin(), "https://contoso.crm.dynamics.com");
        assert_eq!(cfg.upstream.idle_timeout, Duration::from_secs(120));
    }

    #[test]
    fn the_shipped_multi_org_example_parses_when_uncommented() {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml"))
                .expect("config.toml");
        let start = text.find("# --- multi-org example").expect("example start");
        let end = text
            .find("# --- end of multi-org example")
            .expect("example end");
        let block: String = text[start..end]
            .lines()
            .skip(1)
            .map(|l| {
                l.strip_prefix("# ")
                    .or_else(|| l.strip_prefix('#'))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        let full = format!("{}{block}\n{}", &text[..start], &text[end..]);
        let mut e = HashMap::new();
        e.insert("AZURE_CLIENT_SECRET".to_owned(), "x".to_owned());
        let cfg = load_toml(&full, e)
            .1
            .expect("the multi-org example is valid");
        assert_eq!(cfg.orgs.len(), 2);
        assert!(cfg.orgs[0].default && !cfg.orgs[1].default);
        assert_eq!(cfg.orgs[1].name, "fabrikam");
        assert_eq!(
            cfg.orgs[1].hosts,
            ["fabrikam-dataverse.internal.example.com"]
        );
        assert!(matches!(
            cfg.orgs[1].credential.kind,
            CredentialKind::Federated { .. }
        ));
    }

    #[test]
    fn credential_kinds_are_inferred_in_azure_identity_order() {
        let mut e = minimal_env();
        e.remove("AZURE_CLIENT_SECRET");
        e.insert("AZURE_FEDERATED_TOKEN_FILE".into(), "/tmp/t".into());
        e.insert("DATAVERSE_PROXY_CLOUD".into(), "usgovernment".into());
        let cfg = Config::load(&Sources {
            env: e.clone(),
            ..Sources::default()
        })
        .expect("valid");
        let c = &cfg.orgs[0].credential;
        assert!(matches!(c.kind, CredentialKind::Federated { .. }));
        assert_eq!(
            c.token_url.as_ref().map(Url::as_str),
            Some("https://login.microsoftonline.us/tenant-1/oauth2/v2.0/token")
        );
        e.remove("AZURE_FEDERATED_TOKEN_FILE");
        e.insert("DATAVERSE_PROXY_MANAGED_IDENTITY".into(), "imds".into());
        let cfg = Config::load(&Sources {
            env: e.clone(),
            ..Sources::default()
        })
        .expect("valid");
        assert!(matches!(
            cfg.orgs[0].credential.kind,
            CredentialKind::ManagedIdentity(ManagedIdentity::Imds { .. })
        ));
        e.insert(
            "DATAVERSE_PROXY_IMDS_ENDPOINT".into(),
            "http://10.1.2.3/token".into(),
        );
        let err = Config::load(&Sources {
            env: e,
            ..Sources::default()
        })
        .expect_err("plain http off-host");
        assert!(
            err.to_string().contains("credential.imds_endpoint"),
            "{err}"
        );
    }

    #[test]
    fn org_names_and_references_are_checked() {
        let (_, result) = load_toml(
            "[[orgs]]
name = \"api\"
url = \"https://a.crm.dynamics.com\"
credential = \"nope\"
",
            HashMap::new(),
        );
        let err = result.expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("`orgs[0].name`"), "{text}");
        assert!(text.contains("no credential named \"nope\""), "{text}");
    }
}
