//! The validated configuration: what the rest of the proxy reads.

use super::*;

/// The validated configuration the proxy runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address of the proxy listener.
    pub listen: SocketAddr,
    /// Address of the admin listener (`/livez`, `/readyz`).
    pub admin_listen: SocketAddr,
    /// `POST /reload` on the admin listener reloads the configuration
    /// (off: only SIGHUP does).
    pub admin_reload: bool,
    /// Names (lower-case, without a port) besides addresses and
    /// `localhost` under which the admin listener answers.
    pub admin_hosts: Vec<String>,
    /// The proxy's URL as callers see it, when fixed by configuration.
    pub public_url: Option<Url>,
    /// Peers whose `Forwarded` / `X-Forwarded-*` headers are believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The Dataverse organisations requests are forwarded to (at least one).
    pub orgs: Vec<OrgConfig>,
    /// Upstream (Dataverse) connection settings.
    pub upstream: UpstreamConfig,
    /// The metadata cache.
    pub metadata_cache: MetadataCacheConfig,
    /// Token cache and refresh settings.
    pub token: TokenConfig,
    /// Service-protection governor settings.
    pub governor: GovernorConfig,
    /// Log output settings.
    pub log: LogConfig,
    /// Shutdown settings.
    pub shutdown: ShutdownConfig,
    /// Power Platform request accounting.
    pub usage: UsageConfig,
    /// Limits at the edge.
    pub limits: LimitsConfig,
    /// Caller identification.
    pub access: Access,
    /// TLS on the proxy listener; `None`: plain HTTP (h1 and h2c).
    pub tls: Option<ListenerTls>,
    /// CORS preflights answered by the proxy; `None`: off.
    pub cors: Option<CorsConfig>,
}

/// One Dataverse organisation.
#[derive(Debug, Clone)]
pub struct OrgConfig {
    /// Short name: the path prefix `/{name}/api/data/…` and the log/metrics label.
    pub name: String,
    /// Origin of the org, e.g. `https://contoso.crm.dynamics.com`, without a
    /// trailing slash or path.
    pub url: Url,
    /// The credential its tokens are requested with: the first lane's.
    pub credential: Arc<CredentialConfig>,
    /// Its lanes: each an application user of the org with its own token
    /// and Dataverse budget (`lanes = [...]`; without it, one lane: the
    /// credential). Never empty; names are distinct.
    pub lanes: Vec<Arc<CredentialConfig>>,
    /// OAuth2 scope (v2), `{url}/.default` unless overridden.
    pub scope: String,
    /// `Host` values routed to this org (host routing), lower-case.
    pub hosts: Vec<String>,
    /// Whether bare `/api/data/…` paths go to this org.
    pub default: bool,
    /// What may reach this org.
    pub policy: Policy,
    /// The tenant's daily Power Platform request entitlement, for the
    /// status page's projection and the warning (`None`: not shown).
    pub daily_entitlement: Option<u64>,
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

impl CredentialKind {
    /// What kind of credential it is, for the status page (nothing of
    /// its value or path).
    pub fn label(&self) -> &'static str {
        match self {
            Self::Secret(_) => "client secret",
            Self::Certificate { .. } => "certificate",
            Self::Federated { .. } => "workload identity federation",
            Self::ManagedIdentity(ManagedIdentity::Imds { .. }) => "managed identity (IMDS)",
            Self::ManagedIdentity(ManagedIdentity::AppService { .. }) => {
                "managed identity (App Service)"
            }
        }
    }
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
    /// Ask Dataverse for compressed answers (`Accept-Encoding: gzip, br,
    /// deflate`); answers whose links are rewritten are decoded and, for
    /// callers that accept it, encoded again.
    pub compression: bool,
    /// Level (1 fastest … 9 smallest) for answers encoded again after
    /// rewriting.
    pub recompression_level: u32,
}

/// `[metadata_cache]`: `$metadata`, `EntityDefinitions…` and
/// `GlobalOptionSetDefinitions…` answers kept per org and revalidated with
/// Dataverse after `fresh_for`.
#[derive(Debug, Clone)]
pub struct MetadataCacheConfig {
    pub enabled: bool,
    /// Bytes kept per org (bodies as Dataverse sent them, compressed).
    pub max_bytes: usize,
    /// Larger answers are not kept.
    pub max_entry: usize,
    /// Served without asking Dataverse for this long after it was fetched
    /// or revalidated.
    pub fresh_for: Duration,
}

impl Default for MetadataCacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: 256 << 20,
            max_entry: 64 << 20,
            fresh_for: Duration::from_secs(300),
        }
    }
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
    /// The concurrency limit to start from, and the most it grows to unless
    /// Dataverse's `x-ms-dop-hint` allows more (Dataverse allows 52 per user
    /// per web server).
    pub max_concurrency: usize,
    /// The adaptive limit never goes below this.
    pub min_concurrency: usize,
    /// The adaptive limit never goes above this, whatever the hint says.
    pub ceiling: usize,
    /// Replays of a transient failure (unreachable, 502/503/504) at most.
    pub transient_retries: u32,
    /// Transient replays may add at most this share of the org's requests.
    pub retry_budget: f64,
    /// …and at least this many per 10 s window.
    pub min_retries: u64,
    /// A slot whose caller went away before Dataverse's answer ended stays
    /// taken this long (Dataverse may still be executing the request).
    pub disconnect_grace: Duration,
    /// No slot is held longer than this, whatever the caller does
    /// (Dataverse gives up on a request after about 2 minutes).
    pub max_hold: Duration,
    /// Shared state across replicas; `None`: this process only.
    pub redis: Option<RedisSettings>,
    /// The cap while Redis does not answer.
    pub fallback_concurrency: usize,
    /// Replicas expected in the deployment (the fallback cap's divisor). A
    /// replica governing alone among several never lets Dataverse's hint
    /// raise its limit above `max_concurrency`: only a shared limit may.
    pub expected_replicas: usize,
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
    /// Egress proxy, shared with the upstream client (TLS is shared too:
    /// the outbound TLS setup).
    pub egress: Option<EgressProxy>,
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
    /// Adopt any caller's `traceparent` (not only a trusted proxy's) as the
    /// request span's parent: its trace id and sampling decision.
    pub trust_caller_trace_context: bool,
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
    /// Time a client has from accept to its first request head (protocol
    /// sniff and TLS handshake included), and for each later HTTP/1 head
    /// from its first byte (slowloris).
    pub header_read_timeout: Duration,
    /// Request body size at most (413 beyond).
    pub max_body: usize,
    /// Longest pause in a request body (408 beyond).
    pub body_idle_timeout: Duration,
    /// Path length at most (414 beyond).
    pub max_path: usize,
    /// Query string length at most (414 beyond).
    pub max_query: usize,
    /// HTTP/2 streams per connection at most.
    pub max_concurrent_streams: u32,
    /// A connection with no request in progress for this long is closed
    /// (HTTP/1.1 keep-alive and HTTP/2 alike).
    pub idle_timeout: Duration,
    /// Open connections from one source address at most (default: a
    /// quarter of `max_connections`).
    pub max_connections_per_ip: usize,
}

/// Power Platform request accounting (`[usage]`).
#[derive(Debug, Clone, Copy)]
pub struct UsageConfig {
    /// Days of daily counts kept for `GET /usage`.
    pub retention_days: u32,
    /// The share of a daily budget or entitlement at which a warning is
    /// logged and counted (0.8: 80 %).
    pub warn_at: f64,
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

/// `governor.redis_url` and its companions.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// The URL (it may carry a password: redacted in `Debug`).
    pub url: SecretString,
    /// Key prefix of this deployment.
    pub prefix: String,
    /// Timeout of every Redis call.
    pub timeout: Duration,
    /// Lifetime of a slot lease unless renewed.
    pub lease_time: Duration,
    /// CA bundle (PEM) that a `rediss://` server's certificate must chain
    /// to; `None`: the system's roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// A clustered Redis (Redis Cluster, Azure Managed Redis with the OSS
    /// cluster policy): `Some(true)`; `Some(false)`: a single server;
    /// `None`: asked of the server (`CLUSTER INFO`) at connect.
    pub cluster: Option<bool>,
}

impl Default for GovernorConfig {
    /// The defaults config.toml documents.
    fn default() -> Self {
        Self {
            max_concurrency: 50,
            min_concurrency: 2,
            ceiling: 200,
            max_queue: 1000,
            queue_timeout: Duration::from_secs(30),
            max_retries: 3,
            retry_deadline: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(300),
            transient_retries: 2,
            retry_budget: 0.2,
            min_retries: 10,
            disconnect_grace: Duration::from_secs(5),
            max_hold: Duration::from_secs(130),
            redis: None,
            fallback_concurrency: 50,
            expected_replicas: 1,
        }
    }
}
