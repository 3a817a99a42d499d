//! Shared state: the orgs (token, governor, policy, link rewriters each),
//! the upstream client, the callers, the limits; and which org a request is for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use axum::http::HeaderValue;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::stats::metrics::{Metrics, RateLimitSeen, RequestHandles};
use public::{Base, PublicUrl};

pub mod public;
pub mod reload;
pub mod rules;
use crate::config::{Config, UpstreamConfig};
use crate::error::ProxyError;
use crate::governor::Governor;
use crate::rewrite::Rewriter;
use crate::token::{Target, TokenKey, TokenProvider};

/// State shared by every request: one `Arc`, so handing it to each request
/// is a single reference-count increment.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct Shared {
    /// The configured orgs.
    pub orgs: Arc<[Arc<OrgState>]>,
    /// How requests find their org.
    routes: Arc<Routes>,
    /// One token provider per distinct token (orgs may share one).
    providers: Arc<[TokenProvider]>,
    /// Timeouts towards the orgs.
    pub upstream: UpstreamConfig,
    /// How the proxy's public URL is found.
    pub public: Arc<PublicUrl>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Request metrics of requests that never reached an org.
    pub unrouted: RequestHandles,
    /// Set when shutdown begins: `/readyz` answers 503 from then on.
    pub draining: Arc<AtomicBool>,
    /// Log query strings (off by default: they can carry personal data).
    pub log_query: bool,
    /// Limits at the edge (a reload may change them).
    pub limits: Arc<ArcSwap<crate::config::LimitsConfig>>,
    /// Callers and policies (a reload may change them; each request keeps
    /// the generation it was admitted under).
    pub rules: ArcSwap<rules::Rules>,
    /// The configuration as started (a reload names what differs from it
    /// but needs a restart), and where a reload reads it again (set by
    /// `serve_with`; `None`: no reload).
    pub running: Mutex<(Arc<Config>, Option<crate::config::Sources>)>,
    /// `POST /reload` on the admin listener is switched on.
    pub admin_reload: bool,
    /// Names the admin listener answers to besides addresses and `localhost`.
    pub admin_hosts: Arc<[String]>,
    /// Whose trace context a request span adopts.
    pub trace_context_from: crate::telemetry::TraceContextFrom,
    /// Caller request-rate quotas.
    pub quotas: Arc<crate::callers::Quotas>,
    /// Checks caller tokens, where `[caller_tokens]` is configured.
    pub verifier: Option<Arc<crate::identity::Verifier>>,
    /// Exchanges users' tokens on-behalf-of (`impersonate = "delegated"`).
    pub obo: Arc<crate::token::OnBehalfOf>,
    /// CORS settings; `None`: off.
    pub cors: Option<crate::config::CorsConfig>,
    /// The governors' shared state, where `governor.redis_url` is set.
    pub redis: Option<Arc<crate::governor::SharedRedis>>,
    /// The Power Platform requests spent, by org, lane, caller and user
    /// (shared through `redis` where it is set).
    pub usage: Arc<crate::usage::Ledger>,
    /// When a daily budget or entitlement warns (`[usage] warn_at`).
    pub usage_warn_at: f64,
    /// When the proxy started (Unix milliseconds), for the status page.
    pub started: u64,
    /// The last proxy errors, for the status page.
    pub recent_errors: crate::stats::board::Recent,
    /// Loads and reloads of the configuration, for the status page.
    pub config_history: Mutex<reload::ConfigStatus>,
    /// The accept loop's counters (open connections, closes by reason).
    pub connections: Arc<crate::server::ConnectionStats>,
}

/// One org and everything per org: its token, its governor, its rewriters.
pub struct OrgState {
    /// Short name (path prefix, log and metrics label).
    pub name: String,
    /// Origin without a trailing slash, e.g. `https://contoso.crm.dynamics.com`.
    pub origin: String,
    /// The origin, parsed once: scheme and authority of every upstream URI.
    pub origin_uri: http::uri::Parts,
    /// The `Host` header Dataverse gets (the origin's authority).
    pub host_header: HeaderValue,
    /// Every origin under which the org writes its links: the configured
    /// one and its `.api.` sibling (`contoso.crm…` ⇄ `contoso.api.crm…`).
    pub aliases: Vec<String>,
    /// Idle connections to the origin, and how new ones are made.
    pub pool: crate::upstream::Pool,
    /// The org's lanes: each an application user's token and governor
    /// (one lane without `lanes` in the config).
    pub lanes: crate::lanes::Lanes,
    /// A governor per user, for requests with the user's own token.
    pub users: crate::governor::UserGovernors,
    /// Last rate-limit headers Dataverse sent.
    pub ratelimit: RateLimitSeen,
    /// Its place in `orgs` (and in every generation of the rules).
    pub index: usize,
    /// `$metadata` and `EntityDefinitions…` answers (`None`: switched off).
    pub metadata: Option<Arc<crate::metadata_cache::MetadataCache>>,
    /// The org's tables as its `$metadata` last described them, and when
    /// that was read (for the table policy; filled on first need).
    pub tables: arc_swap::ArcSwapOption<crate::policy::tables::Loaded>,
    /// Held by the one request reading the org's `$metadata` again.
    pub tables_refresh: tokio::sync::Mutex<()>,
    /// Rewriters by public base URL (usually one entry).
    links: Mutex<Vec<(String, Arc<Links>)>>,
    /// What the status page shows of its requests.
    pub board: crate::stats::board::OrgBoard,
    /// Request metrics of this org without a known caller (the callers'
    /// own are in the rules, which a reload may change).
    pub metrics: RequestHandles,
    /// The tenant's daily Power Platform request entitlement, if given.
    pub daily_entitlement: Option<u64>,
    /// `name`, shared by every count of the org's usage.
    pub label: Arc<str>,
}

/// The two link rewriters for one public URL.
#[derive(Debug)]
pub struct Links {
    /// Org links → proxy links, in answers.
    pub to_caller: Option<Rewriter>,
    /// Proxy links → org links, in request bodies.
    pub to_org: Option<Rewriter>,
}

/// Most distinct public URLs whose rewriters are kept per org.
const LINK_CACHE: usize = 64;

impl OrgState {
    /// The link rewriters for a public base URL (`{public}` or
    /// `{public}/{name}`). Usually one entry per org: a linear scan that
    /// compares the pieces, with no allocation and no hashing per request.
    pub fn links(&self, public: Base<'_>) -> Arc<Links> {
        let mut cache = self
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, links)) = cache.iter().find(|(key, _)| public.is(key)) {
            return links.clone();
        }
        if cache.len() >= LINK_CACHE {
            cache.clear();
        }
        let public = public.to_string();
        let aliases: Vec<&str> = self.aliases.iter().map(String::as_str).collect();
        let links = Arc::new(Links {
            to_caller: Rewriter::api_prefix(&aliases, &public),
            to_org: Rewriter::api_prefix(&[&public], &self.origin),
        });
        cache.push((public, links.clone()));
        links
    }
}

impl OrgState {
    fn new(
        (index, org): (usize, &crate::config::OrgConfig),
        origin: String,
        (lanes, users, pool): (
            crate::lanes::Lanes,
            crate::governor::UserGovernors,
            impl FnOnce(http::Uri) -> crate::upstream::Pool,
        ),
        config: &Config,
        metrics: &Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let origin_uri = origin
            .parse::<http::Uri>()
            .map_err(|e| std::io::Error::other(format!("org {}: {e}", org.name)))?
            .into_parts();
        let host_header = origin_uri
            .authority
            .as_ref()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .ok_or_else(|| std::io::Error::other(format!("org {}: no host", org.name)))?;
        let mut dial = http::uri::Parts::default();
        dial.scheme = origin_uri.scheme.clone();
        dial.authority = origin_uri.authority.clone();
        dial.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        let dial = http::Uri::from_parts(dial)
            .map_err(|e| std::io::Error::other(format!("org {}: {e}", org.name)))?;
        Ok(OrgState {
            pool: pool(dial),
            origin_uri,
            host_header,
            name: org.name.clone(),
            aliases: org_aliases(&origin),
            origin,
            lanes,
            users,
            ratelimit: RateLimitSeen::default(),
            index,
            metadata: config.metadata_cache.enabled.then(|| {
                Arc::new(crate::metadata_cache::MetadataCache::new(
                    &config.metadata_cache,
                ))
            }),
            tables: arc_swap::ArcSwapOption::empty(),
            tables_refresh: tokio::sync::Mutex::new(()),
            links: Mutex::new(Vec::new()),
            board: crate::stats::board::OrgBoard::default(),
            metrics: metrics.handles(&org.name, "-"),
            daily_entitlement: org.daily_entitlement,
            label: Arc::from(org.name.as_str()),
        })
    }
}

impl std::fmt::Debug for OrgState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrgState")
            .field("name", &self.name)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// Request routing: by path prefix, by `Host`, or to the default org.
#[derive(Debug, Default)]
struct Routes {
    by_name: HashMap<String, usize>,
    by_host: HashMap<String, usize>,
    default: Option<usize>,
}

/// Where a request goes.
#[derive(Debug)]
pub struct Routed<'a> {
    /// The org.
    pub org: &'a Arc<OrgState>,
    /// Bytes of the path taken by the `/{name}` prefix (0 without one).
    pub prefix_len: usize,
}

impl AppState {
    /// Builds the state from a validated config (binds nothing, fetches nothing).
    pub fn new(config: &Config) -> std::io::Result<Self> {
        let metrics = Arc::new(Metrics::new());
        // One TLS setup for the token client and the Dataverse client.
        let tls = crate::upstream::tls::client_config(config.upstream.ca_file.as_deref())
            .map_err(std::io::Error::other)?;
        let redis = shared_redis(config)?;
        let connector = crate::upstream::connector(&config.upstream, tls.clone());
        let built = build_orgs(config, &metrics, (&tls, &connector), redis.as_ref())?;
        let verifier = verifier(config, &tls)?;
        let obo = Arc::new(crate::token::OnBehalfOf::new(
            crate::token::entra_client(&config.token, tls.clone())
                .map_err(std::io::Error::other)?,
        ));
        let rules = rules::Rules::new(config, &metrics);
        Ok(Self(Arc::new(Shared {
            orgs: built.orgs.into(),
            routes: Arc::new(built.routes),
            providers: built.providers,
            upstream: config.upstream.clone(),
            public: Arc::new(PublicUrl {
                fixed: config
                    .public_url
                    .as_ref()
                    .map(|u| u.as_str().trim_end_matches('/').to_owned()),
                trusted: config.trusted_proxies.clone(),
                fallback_host: config.listen.to_string(),
                scheme: if config.tls.is_some() {
                    "https"
                } else {
                    "http"
                },
            }),
            unrouted: metrics.handles("-", "-"),
            metrics,
            draining: Arc::new(AtomicBool::new(false)),
            log_query: config.log.query,
            limits: Arc::new(ArcSwap::from_pointee(config.limits.clone())),
            rules: ArcSwap::from_pointee(rules),
            running: Mutex::new((Arc::new(config.clone()), None)),
            admin_reload: config.admin_reload,
            admin_hosts: config.admin_hosts.clone().into(),
            trace_context_from: if config.log.trust_caller_trace_context {
                crate::telemetry::TraceContextFrom::Anyone
            } else {
                crate::telemetry::TraceContextFrom::Peers(config.trusted_proxies.clone().into())
            },
            quotas: Arc::new(match &redis {
                Some(r) => crate::callers::Quotas::shared(r.clone()),
                None => crate::callers::Quotas::default(),
            }),
            verifier,
            obo,
            cors: config.cors.clone(),
            usage: Arc::new(crate::usage::Ledger::new(
                config.usage.retention_days,
                redis.clone(),
            )),
            usage_warn_at: config.usage.warn_at,
            redis,
            started: crate::stats::activity::unix_ms(),
            recent_errors: crate::stats::board::Recent::default(),
            connections: Arc::default(),
            config_history: Mutex::new(reload::ConfigStatus {
                loaded: crate::stats::activity::unix_ms(),
                ..Default::default()
            }),
        })))
    }

    /// Where a reload reads the configuration again.
    pub fn set_sources(&self, sources: Option<crate::config::Sources>) {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1 = sources;
    }

    /// The configuration's history, for the status page.
    pub fn config_status(&self) -> reload::ConfigStatus {
        self.config_history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The distinct token providers.
    pub fn providers(&self) -> &[TokenProvider] {
        &self.providers
    }

    /// Marks the start of shutdown (readiness goes false).
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// The org a request is for: `/{name}/api/…` by name; `/api/…` by `Host`
    /// when a host is configured for an org, else the default org.
    pub fn route(&self, path: &str, host: Option<&str>) -> Result<Routed<'_>, ProxyError> {
        let r = &self.routes;
        if path == "/api" || path.starts_with("/api/") {
            let by_host = host
                .filter(|_| !r.by_host.is_empty())
                .and_then(|h| r.by_host.get(&h.to_ascii_lowercase()));
            return match by_host.or(r.default.as_ref()) {
                Some(&i) => Ok(Routed {
                    org: &self.orgs[i],
                    prefix_len: 0,
                }),
                None => Err(ProxyError::UnknownOrg),
            };
        }
        let name = path
            .strip_prefix('/')
            .and_then(|p| p.split('/').next())
            .unwrap_or("");
        match r.by_name.get(name) {
            Some(&i) => Ok(Routed {
                org: &self.orgs[i],
                prefix_len: name.len() + 1,
            }),
            None if r.default.is_some() => Err(ProxyError::NotFound),
            None => Err(ProxyError::UnknownOrg),
        }
    }

    /// The error for a path that is no Web API route: 404 `not_found`, or
    /// `unknown_org` when several orgs are configured and none is the default.
    pub fn outside_the_api(&self) -> ProxyError {
        if self.routes.default.is_some() {
            ProxyError::NotFound
        } else {
            ProxyError::UnknownOrg
        }
    }

    /// Starts one background refresher per distinct token.
    pub fn spawn_refreshers(&self, shutdown: &CancellationToken) -> Vec<JoinHandle<()>> {
        self.providers
            .iter()
            .map(|p| p.spawn_refresher(shutdown.child_token()))
            .collect()
    }

    /// True when every org holds a valid token on at least one lane and
    /// shutdown has not begun.
    pub async fn ready(&self) -> bool {
        if self.draining.load(Ordering::SeqCst) {
            return false;
        }
        for org in self.orgs.iter() {
            let mut any = false;
            for lane in org.lanes.iter() {
                if lane.token.is_ready().await {
                    any = true;
                    break;
                }
            }
            if !any {
                return false;
            }
        }
        true
    }
}

/// What each org's pool dials with.
type Connector = hyper_rustls::HttpsConnector<crate::upstream::Egress>;

/// The orgs with their token providers (one per distinct token) and routes.
struct BuiltOrgs {
    orgs: Vec<Arc<OrgState>>,
    routes: Routes,
    providers: Arc<[TokenProvider]>,
}

fn build_orgs(
    config: &Config,
    metrics: &Arc<Metrics>,
    (tls, connector): (&rustls::ClientConfig, &Connector),
    redis: Option<&Arc<crate::governor::SharedRedis>>,
) -> std::io::Result<BuiltOrgs> {
    let cache = crate::token::new_cache();
    let mut providers: HashMap<TokenKey, TokenProvider> = HashMap::new();
    let mut orgs = Vec::new();
    let mut routes = Routes::default();
    for (i, org) in config.orgs.iter().enumerate() {
        let origin = org.origin();
        let target = Target {
            scope: org.scope.clone(),
            resource: origin.clone(),
        };
        let mut lanes = Vec::new();
        for credential in &org.lanes {
            let key = TokenKey::new(credential, &target);
            let token = match providers.get(&key) {
                Some(p) => p.clone(),
                None => {
                    let p = TokenProvider::new(
                        credential.clone(),
                        target.clone(),
                        config.token.clone(),
                        cache.clone(),
                        tls.clone(),
                    )
                    .map_err(std::io::Error::other)?;
                    providers.insert(key, p.clone());
                    p
                }
            };
            let governor = match redis {
                Some(r) => Governor::shared(config.governor.clone(), r, &lane_key(org, credential)),
                None => Governor::new(config.governor.clone()),
            };
            lanes.push(crate::lanes::Lane::new(&credential.name, token, governor));
        }
        let lanes = crate::lanes::Lanes::new(&org.name, lanes);
        routes.by_name.insert(org.name.clone(), i);
        for host in &org.hosts {
            routes.by_host.insert(host.clone(), i);
        }
        if org.default {
            routes.default = Some(i);
        }
        let users = crate::governor::UserGovernors::new(
            config.governor.clone(),
            redis.cloned(),
            &governor_key(&org.url),
        );
        let pool = |origin: http::Uri| crate::upstream::pool(&config.upstream, connector, origin);
        let state = OrgState::new((i, org), origin, (lanes, users, pool), config, metrics)?;
        orgs.push(Arc::new(state));
    }
    Ok(BuiltOrgs {
        orgs,
        routes,
        providers: providers.into_values().collect(),
    })
}

/// The caller-token verifier, where `[caller_tokens]` is configured; it
/// fetches keys with the Entra ID client's TLS setup.
fn verifier(
    config: &Config,
    tls: &rustls::ClientConfig,
) -> std::io::Result<Option<Arc<crate::identity::Verifier>>> {
    let Some(tokens) = &config.access.caller_tokens else {
        return Ok(None);
    };
    let http =
        crate::token::entra_client(&config.token, tls.clone()).map_err(std::io::Error::other)?;
    let source = crate::identity::HttpKeySource::new(http, tokens.authority.clone());
    Ok(Some(Arc::new(crate::identity::Verifier::new(
        tokens.clone(),
        Arc::new(source),
    ))))
}

/// Where a lane's shared state lives in Redis: by the org's host and port
/// (two deployments that call different orgs by one config name never
/// share a gate) and, for an org with several lanes, the lane's
/// application user (its client id, else its name), whose budget it is.
fn lane_key(org: &crate::config::OrgConfig, lane: &crate::config::CredentialConfig) -> String {
    let host = governor_key(&org.url);
    if org.lanes.len() == 1 {
        return host;
    }
    format!("{host}/{}", lane.client_id.as_deref().unwrap_or(&lane.name))
}

/// The governors' shared state, where `governor.redis_url` is set.
fn shared_redis(config: &Config) -> std::io::Result<Option<Arc<crate::governor::SharedRedis>>> {
    config
        .governor
        .redis
        .as_ref()
        .map(|r| crate::governor::SharedRedis::new(r).map_err(std::io::Error::other))
        .transpose()
}

/// The org origin and, for Dynamics hosts, its `.api.` sibling: the Web API
/// is served under both, and links may name either.
fn org_aliases(origin: &str) -> Vec<String> {
    let mut out = vec![origin.to_owned()];
    if let Some((scheme, host)) = origin.split_once("://") {
        let (name, rest) = host.split_once('.').unwrap_or((host, ""));
        if let Some(without_api) = rest.strip_prefix("api.") {
            out.push(format!("{scheme}://{name}.{without_api}"));
        } else if rest.starts_with("crm") && rest.contains(".dynamics.") {
            out.push(format!("{scheme}://{name}.api.{rest}"));
        }
    }
    out
}

/// The org's Redis key: its host (and port, where one is given), lower case.
fn governor_key(url: &url::Url) -> String {
    let host = url.host_str().unwrap_or("-").to_ascii_lowercase();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    }
}

#[cfg(test)]
mod tests {
    use super::org_aliases;

    #[test]
    fn api_siblings_are_aliases() {
        assert_eq!(
            org_aliases("https://contoso.crm4.dynamics.com"),
            [
                "https://contoso.crm4.dynamics.com",
                "https://contoso.api.crm4.dynamics.com"
            ]
        );
        assert_eq!(
            org_aliases("https://contoso.api.crm.dynamics.com"),
            [
                "https://contoso.api.crm.dynamics.com",
                "https://contoso.crm.dynamics.com"
            ]
        );
        assert_eq!(org_aliases("http://127.0.0.1:9"), ["http://127.0.0.1:9"]);
    }
}
