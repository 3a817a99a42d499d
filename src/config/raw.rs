//! The configuration as deserialised, before validation; every struct
//! rejects unknown keys, and a few fields accept strings for numbers and
//! booleans (environment variables are strings).

use super::*;

/// The configuration as deserialised, before validation. Every struct rejects
/// unknown keys.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub(super) listen: Option<String>,
    pub(super) admin_listen: Option<String>,
    #[serde(deserialize_with = "lenient_bool")]
    pub(super) admin_reload: Option<bool>,
    #[serde(deserialize_with = "lenient_list")]
    pub(super) admin_hosts: Option<Vec<String>>,
    pub(super) public_url: Option<String>,
    #[serde(deserialize_with = "lenient_list")]
    pub(super) trusted_proxies: Option<Vec<String>>,
    pub(super) org: RawOrg,
    pub(super) credential: RawCredential,
    pub(super) orgs: Option<Vec<RawNamedOrg>>,
    pub(super) credentials: Option<std::collections::BTreeMap<String, RawCredential>>,
    pub(super) upstream: RawUpstream,
    pub(super) token: RawToken,
    pub(super) governor: RawGovernor,
    pub(super) log: RawLog,
    pub(super) shutdown: RawShutdown,
    pub(super) usage: RawUsage,
    pub(super) limits: RawLimits,
    pub(super) callers: Option<Vec<RawCaller>>,
    pub(super) access: RawAccess,
    pub(super) caller_tokens: Option<RawCallerTokens>,
    pub(super) tls: Option<RawTls>,
    pub(super) cors: Option<RawCors>,
    pub(super) metadata_cache: RawMetadataCache,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawMetadataCache {
    #[serde(deserialize_with = "lenient_bool")]
    pub(super) enabled: Option<bool>,
    pub(super) max_bytes: Option<String>,
    pub(super) max_entry: Option<String>,
    pub(super) fresh_for: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCallerTokens {
    #[serde(deserialize_with = "lenient_list")]
    pub(super) audiences: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_list")]
    pub(super) tenants: Option<Vec<String>>,
    pub(super) authority_host: Option<String>,
    pub(super) clock_skew: Option<String>,
    pub(super) key_refetch_interval: Option<String>,
    pub(super) key_refresh: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTokenRequirement {
    #[serde(deserialize_with = "lenient_list")]
    pub(super) app_ids: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_list")]
    pub(super) object_ids: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_list")]
    pub(super) tenants: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_list")]
    pub(super) roles: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_list")]
    pub(super) scopes: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_list")]
    pub(super) groups: Option<Vec<String>>,
    pub(super) any_app: Option<bool>,
    pub(super) app_only: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCertificateRequirement {
    #[serde(deserialize_with = "lenient_list")]
    pub(super) common_names: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_list")]
    pub(super) sans: Option<Vec<String>>,
    pub(super) common_name_with_sans: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTls {
    pub(super) cert_file: Option<String>,
    pub(super) key_file: Option<String>,
    pub(super) client_ca_file: Option<String>,
    pub(super) client_certificate: Option<String>,
    pub(super) reload_interval: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCors {
    #[serde(deserialize_with = "lenient_list")]
    pub(super) allowed_origins: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_list")]
    pub(super) allowed_methods: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_list")]
    pub(super) allowed_headers: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_list")]
    pub(super) exposed_headers: Option<Vec<String>>,
    pub(super) max_age: Option<String>,
    #[serde(deserialize_with = "lenient_bool")]
    pub(super) allow_credentials: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawGovernor {
    #[serde(deserialize_with = "lenient_number")]
    pub(super) max_concurrency: Option<usize>,
    #[serde(deserialize_with = "lenient_number")]
    pub(super) max_queue: Option<usize>,
    pub(super) queue_timeout: Option<String>,
    #[serde(deserialize_with = "lenient_number")]
    pub(super) max_retries: Option<u32>,
    pub(super) retry_deadline: Option<String>,
    pub(super) max_retry_after: Option<String>,
    #[serde(deserialize_with = "lenient_number")]
    pub(super) min_concurrency: Option<usize>,
    #[serde(deserialize_with = "lenient_number")]
    pub(super) ceiling: Option<usize>,
    #[serde(deserialize_with = "lenient_number")]
    pub(super) transient_retries: Option<u32>,
    #[serde(deserialize_with = "lenient_number")]
    pub(super) retry_budget: Option<f64>,
    #[serde(deserialize_with = "lenient_number")]
    pub(super) min_retries: Option<u64>,
    pub(super) disconnect_grace: Option<String>,
    pub(super) max_hold: Option<String>,
    pub(super) redis_url: Option<RawSecret>,
    pub(super) redis_prefix: Option<String>,
    pub(super) redis_timeout: Option<String>,
    pub(super) lease_time: Option<String>,
    pub(super) redis_ca_file: Option<String>,
    #[serde(deserialize_with = "lenient_bool")]
    pub(super) redis_cluster: Option<bool>,
    #[serde(deserialize_with = "lenient_number")]
    pub(super) expected_replicas: Option<usize>,
    #[serde(deserialize_with = "lenient_number")]
    pub(super) fallback_concurrency: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawOrg {
    pub(super) url: Option<String>,
    #[serde(deserialize_with = "lenient_list")]
    pub(super) lanes: Option<Vec<String>>,
    pub(super) scope: Option<String>,
    pub(super) policy: Option<RawPolicy>,
    #[serde(deserialize_with = "lenient_list")]
    pub(super) hosts: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_number")]
    pub(super) daily_entitlement: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNamedOrg {
    pub(super) name: String,
    pub(super) url: Option<String>,
    #[serde(default)]
    pub(super) credential: Option<String>,
    #[serde(default, deserialize_with = "lenient_list")]
    pub(super) lanes: Option<Vec<String>>,
    #[serde(default, deserialize_with = "lenient_bool")]
    pub(super) default: Option<bool>,
    #[serde(default, deserialize_with = "lenient_list")]
    pub(super) hosts: Option<Vec<String>>,
    #[serde(default)]
    pub(super) scope: Option<String>,
    #[serde(default)]
    pub(super) policy: Option<RawPolicy>,
    #[serde(default, deserialize_with = "lenient_number")]
    pub(super) daily_entitlement: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPolicy {
    #[serde(deserialize_with = "lenient_bool")]
    pub(super) read_only: Option<bool>,
    #[serde(deserialize_with = "lenient_list")]
    pub(super) methods: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_list")]
    pub(super) allow: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_list")]
    pub(super) deny: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_bool")]
    pub(super) metadata: Option<bool>,
    #[serde(deserialize_with = "lenient_list")]
    pub(super) impersonation: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_list")]
    pub(super) privileged_headers: Option<Vec<String>>,
    pub(super) batch_buffer: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCaller {
    pub(super) name: String,
    #[serde(default)]
    pub(super) api_key_sha256: Option<String>,
    #[serde(default, deserialize_with = "lenient_list")]
    pub(super) cidrs: Option<Vec<String>>,
    #[serde(default, deserialize_with = "lenient_list")]
    pub(super) orgs: Option<Vec<String>>,
    #[serde(default, deserialize_with = "lenient_bool")]
    pub(super) read_only: Option<bool>,
    #[serde(default)]
    pub(super) requests_per_second: Option<f64>,
    #[serde(default, deserialize_with = "lenient_number")]
    pub(super) daily_requests: Option<u64>,
    #[serde(default, deserialize_with = "lenient_number")]
    pub(super) weight: Option<u32>,
    #[serde(default, deserialize_with = "lenient_number")]
    pub(super) max_concurrency: Option<usize>,
    #[serde(default, deserialize_with = "lenient_list")]
    pub(super) lanes: Option<Vec<String>>,
    #[serde(default, deserialize_with = "lenient_list")]
    pub(super) privileged_headers: Option<Vec<String>>,
    #[serde(default)]
    pub(super) token: Option<RawTokenRequirement>,
    #[serde(default)]
    pub(super) client_certificate: Option<RawCertificateRequirement>,
    #[serde(default)]
    pub(super) impersonate: Option<String>,
    #[serde(default)]
    pub(super) impersonate_apps: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAccess {
    #[serde(deserialize_with = "lenient_list")]
    pub(super) allow_cidrs: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_bool")]
    pub(super) require_credential: Option<bool>,
    /// The older name of `require_credential`.
    #[serde(deserialize_with = "lenient_bool")]
    pub(super) require_api_key: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCredential {
    pub(super) kind: Option<String>,
    pub(super) tenant_id: Option<String>,
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<RawSecret>,
    pub(super) client_secret_file: Option<String>,
    pub(super) certificate_path: Option<String>,
    pub(super) certificate_password: Option<RawSecret>,
    #[serde(deserialize_with = "lenient_bool")]
    pub(super) send_certificate_chain: Option<bool>,
    pub(super) assertion_algorithm: Option<String>,
    pub(super) federated_token_file: Option<String>,
    pub(super) managed_identity: Option<String>,
    pub(super) identity_endpoint: Option<String>,
    pub(super) identity_header: Option<RawSecret>,
    pub(super) imds_endpoint: Option<String>,
    pub(super) authority_host: Option<String>,
    pub(super) cloud: Option<String>,
    pub(super) token_url: Option<String>,
    pub(super) token_version: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUpstream {
    pub(super) connect_timeout: Option<String>,
    pub(super) response_timeout: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) pool_idle_timeout: Option<String>,
    #[serde(deserialize_with = "lenient_number")]
    pub(super) pool_max_idle: Option<usize>,
    pub(super) replay_buffer: Option<String>,
    #[serde(deserialize_with = "lenient_bool")]
    pub(super) compression: Option<bool>,
    #[serde(deserialize_with = "lenient_number")]
    pub(super) recompression_level: Option<u32>,
    pub(super) proxy: Option<String>,
    pub(super) no_proxy: Option<String>,
    pub(super) ca_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawToken {
    pub(super) fetch_timeout: Option<String>,
    pub(super) min_backoff: Option<String>,
    pub(super) max_backoff: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    pub(super) format: Option<String>,
    #[serde(deserialize_with = "lenient_bool")]
    pub(super) query: Option<bool>,
    #[serde(deserialize_with = "lenient_bool")]
    pub(super) trust_caller_trace_context: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    #[serde(deserialize_with = "lenient_number")]
    pub(super) max_connections: Option<usize>,
    pub(super) max_header_bytes: Option<String>,
    #[serde(deserialize_with = "lenient_number")]
    pub(super) max_headers: Option<usize>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) max_body: Option<String>,
    pub(super) body_idle_timeout: Option<String>,
    pub(super) max_path: Option<String>,
    pub(super) max_query: Option<String>,
    #[serde(deserialize_with = "lenient_number")]
    pub(super) max_concurrent_streams: Option<u32>,
    pub(super) idle_timeout: Option<String>,
    #[serde(deserialize_with = "lenient_number")]
    pub(super) max_connections_per_ip: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawShutdown {
    pub(super) delay: Option<String>,
    pub(super) grace: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUsage {
    #[serde(deserialize_with = "lenient_number")]
    pub(super) retention_days: Option<u32>,
    #[serde(deserialize_with = "lenient_number")]
    pub(super) warn_at: Option<f64>,
}

/// A number given as a number (TOML) or as a numeric string (environment
/// variables and flags are strings).
pub(super) fn lenient_number<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
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
pub(super) fn lenient_bool<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<bool>, D::Error> {
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
pub(super) fn lenient_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<String>>, D::Error> {
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
pub(super) struct RawSecret(pub(super) SecretString);

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
