//! Shared state, the proxy's request handler and the admin router.
//!
//! Every request on the proxy listener goes through [`handle`], in order:
//! 1. `x-request-id`: accepted from the caller or generated (UUID v4), sent
//!    to Dataverse and returned to the caller;
//! 2. sensitive headers: `Authorization`, `Proxy-Authorization`, `Cookie`
//!    and `X-API-Key` are marked so no trace or debug output prints them;
//! 3. trace: one span per request with id, method and path (never the
//!    query: it can carry personal data);
//! 4. the request body is limited, watched for stalls and counted;
//! 5. the forwarding handler ([`proxy::forward`]), which takes every path
//!    (routing and the path check answer 404 outside `/[org/]api/data/v9.x/`);
//! 6. access log and metrics ([`crate::access`]): one line per request when
//!    its answer's body ends.
//!
//! The admin router (`/livez`, `/readyz`, `/metrics`) is served on its own
//! listener.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use futures_util::FutureExt as _;
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::Instrument;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::access::{Entry, ErrorMessage, RequestInfo};
use crate::config::{Config, UpstreamConfig};
use crate::error::{PROXY_ERROR_HEADER, ProxyError};
use crate::governor::Governor;
use crate::metrics::{Metrics, RateLimitSeen};
use crate::proxy::body::{Inbound, ProxyBody};
use crate::proxy::public::{Base, PublicUrl};
use crate::proxy::{self, upstream::UpstreamClient};
use crate::rewrite::Rewriter;
use crate::token::{Target, TokenKey, TokenProvider};

/// Request-id header, accepted from callers and generated otherwise.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

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
    /// Pooled client towards the orgs.
    pub client: UpstreamClient,
    /// Timeouts towards the orgs.
    pub upstream: UpstreamConfig,
    /// How the proxy's public URL is found.
    pub public: Arc<PublicUrl>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Set when shutdown begins: `/readyz` answers 503 from then on.
    pub draining: Arc<AtomicBool>,
    /// Log query strings (off by default: they can carry personal data).
    pub log_query: bool,
    /// Limits at the edge.
    pub limits: Arc<crate::config::LimitsConfig>,
    /// Caller identification.
    pub access: Arc<crate::config::Access>,
    /// Caller request-rate quotas.
    pub quotas: Arc<crate::callers::Quotas>,
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
    /// The org's token.
    pub token: TokenProvider,
    /// The org's service-protection governor.
    pub governor: Governor,
    /// Last rate-limit headers Dataverse sent.
    pub ratelimit: RateLimitSeen,
    /// What may reach this org.
    pub policy: crate::config::Policy,
    /// Rewriters by public base URL (usually one entry).
    links: Mutex<Vec<(String, Arc<Links>)>>,
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
    /// The org's position in [`Shared::orgs`].
    pub index: usize,
}

impl AppState {
    /// Builds the state from a validated config (binds nothing, fetches nothing).
    pub fn new(config: &Config) -> std::io::Result<Self> {
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
            let key = TokenKey::new(&org.credential, &target);
            let token = match providers.get(&key) {
                Some(p) => p.clone(),
                None => {
                    let p = TokenProvider::new(
                        org.credential.clone(),
                        target,
                        config.token.clone(),
                        cache.clone(),
                    )
                    .map_err(std::io::Error::other)?;
                    providers.insert(key, p.clone());
                    p
                }
            };
            routes.by_name.insert(org.name.clone(), i);
            for host in &org.hosts {
                routes.by_host.insert(host.clone(), i);
            }
            if org.default {
                routes.default = Some(i);
            }
            let origin_uri = origin
                .parse::<http::Uri>()
                .map_err(|e| std::io::Error::other(format!("org {}: {e}", org.name)))?
                .into_parts();
            let host_header = origin_uri
                .authority
                .as_ref()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                .ok_or_else(|| std::io::Error::other(format!("org {}: no host", org.name)))?;
            orgs.push(Arc::new(OrgState {
                origin_uri,
                host_header,
                name: org.name.clone(),
                aliases: org_aliases(&origin),
                origin,
                token,
                governor: Governor::new(config.governor.clone()),
                ratelimit: RateLimitSeen::default(),
                policy: org.policy.clone(),
                links: Mutex::new(Vec::new()),
            }));
        }
        Ok(Self(Arc::new(Shared {
            orgs: orgs.into(),
            routes: Arc::new(routes),
            providers: providers.into_values().collect(),
            client: proxy::upstream::build_client(&config.upstream)?,
            upstream: config.upstream.clone(),
            public: Arc::new(PublicUrl {
                fixed: config
                    .public_url
                    .as_ref()
                    .map(|u| u.as_str().trim_end_matches('/').to_owned()),
                trusted: config.trusted_proxies.clone(),
                fallback_host: config.listen.to_string(),
            }),
            metrics: Arc::new(Metrics::with_orgs(config.orgs.len())),
            draining: Arc::new(AtomicBool::new(false)),
            log_query: config.log.query,
            limits: Arc::new(config.limits.clone()),
            access: Arc::new(config.access.clone()),
            quotas: Arc::default(),
        })))
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
                    index: i,
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
                index: i,
            }),
            None if r.default.is_some() => Err(ProxyError::NotFound),
            None => Err(ProxyError::UnknownOrg),
        }
    }

    /// Starts one background refresher per distinct token.
    pub fn spawn_refreshers(&self, shutdown: &CancellationToken) -> Vec<JoinHandle<()>> {
        self.providers
            .iter()
            .map(|p| p.spawn_refresher(shutdown.child_token()))
            .collect()
    }

    /// True when every org holds a valid token and shutdown has not begun.
    pub async fn ready(&self) -> bool {
        if self.draining.load(Ordering::SeqCst) {
            return false;
        }
        for p in self.providers.iter() {
            if !p.is_ready().await {
                return false;
            }
        }
        true
    }
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

/// Headers marked sensitive on arrival, so no trace or debug output prints them.
const SENSITIVE: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::COOKIE,
    HeaderName::from_static("x-api-key"),
];

/// Serves one request on the proxy listener: the request id, the span, the
/// access log and metrics around [`proxy::forward`]. Written out rather than
/// stacked as tower layers: this is the hot path, and one function with one
/// body type costs a fraction of a router and four boxed middlewares.
pub async fn handle(
    state: AppState,
    peer: SocketAddr,
    req: http::Request<Incoming>,
) -> http::Response<ProxyBody> {
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    let request_id = match parts.headers.get(&REQUEST_ID) {
        Some(id) => id.clone(),
        None => {
            let id = new_request_id();
            parts.headers.insert(REQUEST_ID, id.clone());
            id
        }
    };
    for (name, value) in parts.headers.iter_mut() {
        if SENSITIVE.contains(name) {
            value.set_sensitive(true);
        }
    }
    let span = tracing::info_span!(
        "request",
        request.id = %request_id.to_str().unwrap_or(""),
        method = %parts.method,
        path = %parts.uri.path(),
    );
    let (body, bytes_in) = if http_body::Body::is_end_stream(&body) {
        (Body::empty(), None)
    } else {
        let counted = Arc::new(AtomicU64::new(0));
        let body = Inbound::new(
            body,
            state.limits.max_body,
            state.limits.body_idle_timeout,
            counted.clone(),
        );
        (Body::new(body), Some(counted))
    };
    let method = parts.method.clone();
    let uri = parts.uri.clone();
    state.metrics.in_flight().inc();
    let mut info = RequestInfo::default();
    let forwarded = proxy::forward(&state, peer, Request::from_parts(parts, body), &mut info);
    // A bug must cost one request a 500, not the connection its answer.
    let outcome = AssertUnwindSafe(forwarded.instrument(span))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| {
            tracing::error!(request.id = %request_id.to_str().unwrap_or(""), "panic while handling a request");
            Err(ProxyError::Internal)
        });
    // Proxy-made errors name the request id, so a caller can quote it.
    let resp = outcome.unwrap_or_else(|e| e.to_response(Some(&request_id)).map(ProxyBody::local));
    let (mut parts, mut body) = resp.into_parts();
    parts.headers.insert(REQUEST_ID, request_id.clone());
    let entry = Entry {
        proxy_error: parts.headers.get(PROXY_ERROR_HEADER).cloned(),
        error: parts.extensions.remove::<ErrorMessage>().map(|e| e.0),
        state,
        start,
        request_id,
        method,
        uri,
        status: parts.status,
        info,
        bytes_in,
    };
    body.log_to(entry);
    http::Response::from_parts(parts, body)
}

/// A random (v4) UUID for a request that came without an id. Request ids
/// need to be unique, not secret: a fast thread-local generator is enough.
fn new_request_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf))
        .expect("a UUID is a valid header value")
}

/// The admin router: `/livez` (the process is up) and `/readyz` (a valid
/// token is held for every org).
pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let body = state.metrics.render(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.ready().await {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no valid token for every org yet\n",
        )
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
