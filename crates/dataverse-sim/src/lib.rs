//! A simulator of Microsoft Entra ID and the Dataverse Web API.
//!
//! It follows `docs/dataverse.md` closely enough
//! to be the proxy's test oracle and the `demo` command's backend:
//!
//! - [`entra`]: the v2 and v1 client-credentials token endpoints (client
//!   secret, certificate assertion, federated assertion) and the managed
//!   identity endpoints (IMDS, App Service), issuing signed JWT access
//!   tokens (`aud`, `tid`, `appid`, `exp`…) and answering mistakes with
//!   Entra's JSON errors and AADSTS codes; several tenants;
//! - [`dataverse`]: an in-memory Web API (accounts, contacts, leads) that
//!   checks the bearer and answers like Dataverse: OData JSON with absolute
//!   `@odata.context` / `@odata.nextLink`, paging cookies, ETags, file
//!   columns, Dataverse-format errors and the 401 bearer challenge.
//!
//! Entra ID and each org listen on separate ports, as they are separate
//! hosts in real life; [`Sim::add_org`] adds orgs, in any registered tenant. A [`SimHandle`] gives tests their hooks: counters, the
//! requests Dataverse saw, and fault switches.
//!
//! The simulator signs tokens with HS256 and a random per-run key instead of
//! Entra's RS256 keys: the proxy treats tokens as opaque, and only the
//! simulator itself checks them.

mod app_users;
pub mod dataverse;
pub mod demo_tls;
mod directory;
pub mod entra;
mod limits;
mod multipart;

pub use app_users::AppUser;
pub use limits::ServiceLimits;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::http::HeaderMap;
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Settings of the simulated home tenant, its app registration and org.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The home tenant (directory) id.
    pub tenant_id: String,
    /// The registered app's client id.
    pub client_id: String,
    /// The registered app's client secret.
    pub client_secret: String,
    /// Lifetime of issued tokens (Entra's default is about an hour).
    pub token_lifetime: Duration,
    /// A PEM certificate registered for the app (certificate credentials).
    pub certificate_pem: Option<String>,
    /// A federated identity credential trusted for the app.
    pub federation: Option<Federation>,
    /// The managed identity's client id (system-assigned, or the one
    /// user-assigned identity attached to the simulated host).
    pub managed_identity_client_id: String,
    /// The secret App Service hands its apps in `IDENTITY_HEADER`.
    pub identity_header: String,
    /// The proxy's own API registration: its Application ID URI (the
    /// audience of v1 caller tokens)…
    pub api_app_id_uri: String,
    /// …and its client id (the audience of v2 caller tokens).
    pub api_client_id: String,
}

/// A federated identity credential: tokens of `issuer` for `subject`,
/// signed with `key` (HS256), are accepted as client assertions.
#[derive(Debug, Clone)]
pub struct Federation {
    /// The external issuer, e.g. a Kubernetes cluster's OIDC issuer URL.
    pub issuer: String,
    /// The subject, e.g. `system:serviceaccount:ns:name`.
    pub subject: String,
    /// The issuer's signing key.
    pub key: Vec<u8>,
}

/// The audience Entra ID expects in federated assertions.
pub const FEDERATION_AUDIENCE: &str = "api://AzureADTokenExchange";

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            tenant_id: "7f3c8a2e-1b4d-4c6a-9e21-5d8f0a3b6c11".to_owned(),
            client_id: "3d9e5f1a-6b2c-4a8d-b7e4-0c1f2a3b4d5e".to_owned(),
            client_secret: format!("sim~{}", Uuid::new_v4().simple()),
            token_lifetime: Duration::from_secs(3599),
            certificate_pem: None,
            federation: None,
            managed_identity_client_id: "5a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d".to_owned(),
            identity_header: format!("ih-{}", Uuid::new_v4().simple()),
            api_app_id_uri: "api://dataverse-proxy-sim".to_owned(),
            api_client_id: "9b2d4f6a-8c1e-4a3b-9d5f-7e0a1b2c3d4e".to_owned(),
        }
    }
}

/// A request Dataverse received, as recorded for tests.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// HTTP method.
    pub method: String,
    /// Path and query exactly as received.
    pub target: String,
    /// All request headers.
    pub headers: HeaderMap,
    /// Whether the bearer token was accepted.
    pub authorized: bool,
    /// Claims of the accepted token.
    pub claims: Option<entra::Claims>,
}

/// An error Dataverse answers instead of serving, for the next `count` requests.
#[derive(Debug, Clone)]
pub struct DataverseFault {
    /// HTTP status, e.g. 429 or 503.
    pub status: u16,
    /// `Retry-After` seconds, if any.
    pub retry_after: Option<u64>,
    /// How many requests get it.
    pub count: u64,
}

/// Most recent requests kept by the recorder.
const SEEN_CAPACITY: usize = 20_000;

/// The simulated Entra ID, shared by every org of the simulator.
pub struct EntraState {
    config: SimConfig,
    url: String,
    signing_key: Vec<u8>,
    /// Tenants the app is registered or consented in.
    tenants: Mutex<Vec<String>>,
    /// Orgs (resource URL, tenant) tokens can be issued for.
    orgs: Mutex<Vec<(String, String)>>,
    token_lifetime: Mutex<Duration>,
    refresh_in: Mutex<Option<Duration>>,
    token_requests: AtomicU64,
    fail_token_requests: AtomicU64,
    entra_down: AtomicBool,
    /// `uti` of every token issued, and those revoked.
    issued: Mutex<Vec<String>>,
    revoked: Mutex<std::collections::HashSet<String>>,
    /// Assertion ids already used (replays are refused).
    used_jti: Mutex<std::collections::HashSet<String>>,
    /// Headers of the last token request (tests inspect assertions).
    last_request: Mutex<Option<(HeaderMap, String)>>,
    /// The proxy's API, its caller apps and signing keys.
    callers: entra::CallerDirectory,
    /// More application users of the org: client id → secret.
    app_users: Mutex<HashMap<String, String>>,
    /// Consent and Conditional Access for the on-behalf-of grant.
    obo: Mutex<entra::obo::OboState>,
}

/// One simulated Dataverse org.
pub struct SimState {
    entra: Arc<EntraState>,
    tenant_id: String,
    org_url: String,
    /// Added before Dataverse answers: a base and a spread (± uniform).
    latency: Mutex<(Duration, Duration)>,
    abort_downloads_after: Mutex<Option<usize>>,
    dataverse_faults: Mutex<Option<DataverseFault>>,
    seen: Mutex<VecDeque<SeenRequest>>,
    db: Mutex<dataverse::Db>,
    ids: dataverse::OrgIds,
    limiter: limits::WebServers,
    uploads: Mutex<std::collections::HashMap<String, dataverse::Upload>>,
    /// Request bodies that broke off or were framed wrongly while being read.
    broken_bodies: std::sync::atomic::AtomicU64,
    /// The body of the last `$batch` request, as received.
    last_batch: Mutex<Option<Bytes>>,
    /// Users by Entra object id → systemuserid (impersonation targets).
    users: Mutex<std::collections::HashMap<Uuid, Uuid>>,
    /// Whether the application user holds `prvActOnBehalfOfAnotherUser`.
    impersonation_privilege: AtomicBool,
    /// Published schema changes plus one (`$metadata` tags follow it).
    schema_version: std::sync::atomic::AtomicU64,
    /// The CSDL document of a schema version, built once.
    csdl: Mutex<Option<(u64, Bytes)>>,
    /// Compressed answers stop halfway (a broken coded stream).
    break_compression: AtomicBool,
}

impl SimState {
    fn schema_version(&self) -> u64 {
        self.schema_version
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Test hooks over one simulated org and the shared Entra ID. Cheap to clone.
#[derive(Clone)]
pub struct SimHandle(Arc<SimState>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SimHandle {
    /// The Entra ID base URL, e.g. `http://127.0.0.1:40001`.
    pub fn entra_url(&self) -> &str {
        &self.0.entra.url
    }

    /// Request bodies Dataverse began to read but never got whole (the
    /// sender aborted or broke the framing): such requests did nothing.
    pub fn broken_bodies(&self) -> u64 {
        self.0
            .broken_bodies
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The body of the last `$batch` request Dataverse received.
    pub fn last_batch_body(&self) -> Option<Bytes> {
        lock(&self.0.last_batch).clone()
    }

    /// The org URL, e.g. `http://127.0.0.1:40002`.
    pub fn org_url(&self) -> &str {
        &self.0.org_url
    }

    /// The tenant this org belongs to.
    pub fn tenant_id(&self) -> &str {
        &self.0.tenant_id
    }

    /// The v2 token endpoint of this org's tenant.
    pub fn token_url(&self) -> String {
        format!(
            "{}/{}/oauth2/v2.0/token",
            self.0.entra.url, self.0.tenant_id
        )
    }

    /// The v1 token endpoint of this org's tenant.
    pub fn token_url_v1(&self) -> String {
        format!("{}/{}/oauth2/token", self.0.entra.url, self.0.tenant_id)
    }

    /// The IMDS managed-identity endpoint.
    pub fn imds_endpoint(&self) -> String {
        format!("{}/metadata/identity/oauth2/token", self.0.entra.url)
    }

    /// The App Service managed-identity endpoint (`IDENTITY_ENDPOINT`).
    pub fn app_service_endpoint(&self) -> String {
        format!("{}/msi/token", self.0.entra.url)
    }

    /// The simulated home tenant, app and secret.
    pub fn config(&self) -> &SimConfig {
        &self.0.entra.config
    }

    /// Adds a user to the org with Entra object id `oid`; its systemuserid.
    pub fn add_user(&self, oid: Uuid) -> Uuid {
        *lock(&self.0.users).entry(oid).or_insert_with(Uuid::new_v4)
    }

    /// Grants or takes away the application user's `prvActOnBehalfOfAnotherUser`.
    pub fn set_impersonation_privilege(&self, granted: bool) {
        self.0
            .impersonation_privilege
            .store(granted, Ordering::SeqCst);
    }

    /// The application user's systemuserid (what `WhoAmI` answers without
    /// impersonation).
    pub fn application_user_id(&self) -> Uuid {
        self.0.ids.user
    }

    /// Adds latency before Dataverse answers.
    pub fn set_latency(&self, latency: Duration) {
        self.set_latency_spread(latency, Duration::ZERO);
    }

    /// Adds `latency ± spread` (uniform) before Dataverse answers.
    pub fn set_latency_spread(&self, latency: Duration, spread: Duration) {
        *lock(&self.0.latency) = (latency, spread.min(latency));
    }

    /// Makes file downloads break off after `bytes` (the connection is
    /// dropped mid-body), or behave again with `None`.
    pub fn abort_downloads_after(&self, bytes: Option<usize>) {
        *lock(&self.0.abort_downloads_after) = bytes;
    }

    /// Publishes a schema change: a column more on a custom table, and new
    /// tags for `$metadata`, `EntityDefinitions` and option sets.
    pub fn change_schema(&self) {
        self.0
            .schema_version
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Makes every compressed answer stop halfway (`true`), ended cleanly:
    /// a coded stream no decoder can finish.
    pub fn break_compressed_answers(&self, broken: bool) {
        self.0
            .break_compression
            .store(broken, std::sync::atomic::Ordering::Relaxed);
    }

    /// Adds `n` generated rows to a table (for paging tests).
    pub fn seed_rows(&self, entity_set: &str, n: usize) {
        lock(&self.0.db).seed_rows(entity_set, n);
    }

    /// Makes Dataverse answer the next requests with an error (after
    /// authenticating them). A 429 carries the request-limit error code.
    pub fn inject_dataverse_fault(&self, fault: DataverseFault) {
        *lock(&self.0.dataverse_faults) = Some(fault);
    }

    /// The requests Dataverse saw, oldest first (the most recent 20,000).
    pub fn seen(&self) -> Vec<SeenRequest> {
        lock(&self.0.seen).iter().cloned().collect()
    }

    /// Forgets the recorded requests.
    pub fn clear_seen(&self) {
        lock(&self.0.seen).clear();
    }

    /// Stores a file column value, as an upload would.
    pub fn put_file(
        &self,
        entity_set: &str,
        id: Uuid,
        column: &str,
        name: &str,
        data: Bytes,
    ) -> bool {
        lock(&self.0.db).put_file(entity_set, id, column, name, data)
    }

    /// A file column's content.
    pub fn file(&self, entity_set: &str, id: Uuid, column: &str) -> Option<Bytes> {
        lock(&self.0.db).file(entity_set, id, column)
    }

    /// Ids of the rows of a table, in paging order.
    pub fn ids(&self, entity_set: &str) -> Vec<Uuid> {
        lock(&self.0.db).ids(entity_set)
    }

    /// A row's attributes as JSON, if it exists.
    pub fn row(&self, entity_set: &str, id: Uuid) -> Option<serde_json::Value> {
        lock(&self.0.db).row(entity_set, id)
    }
}

/// A running simulator; dropping it does not stop it, [`Sim::shutdown`] does.
pub struct Sim {
    /// Hooks and addresses of the first org.
    pub handle: SimHandle,
    entra: Arc<EntraState>,
    shutdown: CancellationToken,
}

impl Sim {
    /// Starts the simulator (Entra ID and one org) on two ephemeral loopback ports.
    pub async fn start(config: SimConfig) -> std::io::Result<Self> {
        let entra = TcpListener::bind("127.0.0.1:0").await?;
        let dataverse = TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(config, entra, dataverse)
    }

    /// Starts the simulator on the given listeners.
    pub fn start_on(
        config: SimConfig,
        entra: TcpListener,
        dataverse: TcpListener,
    ) -> std::io::Result<Self> {
        Self::start_behind(config, entra, dataverse, None)
    }

    /// Starts the simulator with its org known by `org_url` (its links,
    /// token audience) rather than by its listener's address: for a relay
    /// in front of it, as Dataverse sits behind its front door (the WAN
    /// benchmark's link, `examples/wan_bench.rs`).
    pub fn start_behind(
        config: SimConfig,
        entra: TcpListener,
        dataverse: TcpListener,
        org_url: Option<String>,
    ) -> std::io::Result<Self> {
        let shutdown = CancellationToken::new();
        let entra_state = Arc::new(EntraState {
            url: format!("http://{}", entra.local_addr()?),
            signing_key: (0..32).map(|_| fastrand::u8(..)).collect(),
            tenants: Mutex::new(vec![config.tenant_id.clone()]),
            orgs: Mutex::new(Vec::new()),
            token_lifetime: Mutex::new(config.token_lifetime),
            config,
            refresh_in: Mutex::new(None),
            token_requests: AtomicU64::new(0),
            fail_token_requests: AtomicU64::new(0),
            entra_down: AtomicBool::new(false),
            issued: Mutex::new(Vec::new()),
            revoked: Mutex::new(std::collections::HashSet::new()),
            used_jti: Mutex::new(std::collections::HashSet::new()),
            last_request: Mutex::new(None),
            callers: entra::CallerDirectory::new(),
            app_users: Mutex::new(HashMap::new()),
            obo: Mutex::new(entra::obo::OboState::default()),
        });
        spawn(entra, entra::router(entra_state.clone()), &shutdown);
        let tenant = entra_state.config.tenant_id.clone();
        let handle = Self::org(&entra_state, &tenant, dataverse, org_url, &shutdown)?;
        Ok(Self {
            handle,
            entra: entra_state,
            shutdown,
        })
    }

    fn org(
        entra: &Arc<EntraState>,
        tenant_id: &str,
        listener: TcpListener,
        org_url: Option<String>,
        shutdown: &CancellationToken,
    ) -> std::io::Result<SimHandle> {
        let org_url = match org_url {
            Some(url) => url,
            None => format!("http://{}", listener.local_addr()?),
        };
        lock(&entra.orgs).push((org_url.clone(), tenant_id.to_owned()));
        let state = Arc::new(SimState {
            entra: entra.clone(),
            tenant_id: tenant_id.to_owned(),
            org_url,
            latency: Mutex::new((Duration::ZERO, Duration::ZERO)),
            abort_downloads_after: Mutex::new(None),
            dataverse_faults: Mutex::new(None),
            seen: Mutex::new(VecDeque::new()),
            db: Mutex::new(dataverse::Db::seeded()),
            ids: dataverse::OrgIds::new(),
            limiter: limits::WebServers::default(),
            uploads: Mutex::new(std::collections::HashMap::new()),
            broken_bodies: std::sync::atomic::AtomicU64::new(0),
            last_batch: Mutex::new(None),
            users: Mutex::new(std::collections::HashMap::new()),
            impersonation_privilege: AtomicBool::new(true),
            schema_version: std::sync::atomic::AtomicU64::new(1),
            csdl: Mutex::new(None),
            break_compression: AtomicBool::new(false),
        });
        spawn(listener, dataverse::router(state.clone()), shutdown);
        Ok(SimHandle(state))
    }

    /// Adds another org, in `tenant_id` (which the app must be registered
    /// in: the home tenant or one added with [`SimHandle::add_tenant`]).
    pub async fn add_org(&self, tenant_id: &str) -> std::io::Result<SimHandle> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::org(&self.entra, tenant_id, listener, None, &self.shutdown)
    }

    /// Stops every listener.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

fn spawn(listener: TcpListener, router: axum::Router, shutdown: &CancellationToken) {
    let stop = shutdown.clone().cancelled_owned();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "simulator listener failed");
        }
    });
}

/// Formats seconds since the Unix epoch as `YYYY-MM-DD HH:MM:SSZ` (UTC), the
/// form Entra ID and Dataverse use in bodies.
pub fn utc_timestamp(epoch: u64) -> String {
    let days = epoch / 86_400;
    let secs = epoch % 86_400;
    // Civil-from-days (H. Hinnant), valid for the years we meet.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Seconds since the Unix epoch.
pub fn now_epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_civil_dates() {
        assert_eq!(utc_timestamp(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc_timestamp(1_452_304_932), "2016-01-09 02:02:12Z");
        assert_eq!(utc_timestamp(1_709_210_096), "2024-02-29 12:34:56Z");
    }
}
