//! The governor's state shared by every replica through Redis: slots as
//! leases that expire (a replica that dies gives its slots back within the
//! lease time), the Retry-After gate (a key with a TTL, announced on a
//! channel so waiting replicas close theirs at once), and the adaptive
//! limit. Each change is one Lua script, so no read-modify-write races
//! between replicas; Redis's own clock (`TIME`) dates the leases, so the
//! replicas' clocks do not matter.
//!
//! Every call has a short timeout. A failure marks the shared state down
//! (logged once, shown in metrics and `/readyz`'s body): the governor then
//! runs on its local fallback cap until a background check finds Redis
//! answering again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use conn::{Conn, Target};
use futures_util::StreamExt;
use secrecy::{ExposeSecret, SecretString};

use crate::config::RedisSettings;
use tokio::sync::Notify;

use super::store::{Gate, LocalStore, StoreError, Waiter};
use scripts::*;

mod conn;
mod renewal;
mod scripts;
mod store;

pub use store::RedisStore;

/// A client for `url`: `redis://`, or `rediss://` (TLS by rustls, the
/// server's certificate checked against `ca_file` or the system's roots).
/// Errors never echo the URL (it may carry a password).
fn client(url: &SecretString, ca_file: Option<&std::path::Path>) -> Result<redis::Client, String> {
    let not_a_url =
        |e: redis::RedisError| format!("governor.redis_url is not a Redis URL ({:?})", e.kind());
    let Some(ca_file) = ca_file else {
        return redis::Client::open(url.expose_secret()).map_err(not_a_url);
    };
    let root_cert = std::fs::read(ca_file).map_err(|e| {
        format!(
            "governor.redis_ca_file {} cannot be read: {e}",
            ca_file.display()
        )
    })?;
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(root_cert),
    };
    redis::Client::build_with_tls(url.expose_secret(), certificates).map_err(not_a_url)
}

/// One org's keys and what its replicas' messages reach.
struct OrgShared {
    /// `{prefix}:{org host}`; the keys are `…:leases`, `…:limit`, `…:gate`…
    key: String,
    /// `{prefix}:{org host}:events`.
    channel: String,
    released: Notify,
    gate: Arc<Gate>,
    bounds: Bounds,
    /// The shared limit as last read (how many heads a release wakes).
    limit: std::sync::atomic::AtomicUsize,
    /// Leases this replica holds (renewed until released).
    held: Mutex<HashSet<String>>,
    /// This replica's id: its heads' tickets are `{arrival}:{replica}:{seq}`.
    replica: String,
    /// This replica's heads, by seq, to wake when their ticket comes up.
    heads: Mutex<HashMap<u64, Arc<Notify>>>,
    /// The slots this replica's governor holds on its local fallback cap:
    /// registered in Redis as leases whenever it answers, so that no replica
    /// back on the shared state overlooks them.
    local: Arc<LocalStore>,
    /// How many local slots were registered last time (the ones past the
    /// count now are taken out).
    registered: AtomicUsize,
    /// The epoch of the org's keys this replica knows ('' before the
    /// first): another one means Redis lost the state it was written in.
    epoch: Mutex<String>,
    /// How many leases each other replica holds, by replica, as the
    /// renewals read them: what this replica leaves room for when Redis
    /// goes (see [`SharedRedis::reserve`]).
    others: Mutex<HashMap<String, usize>>,
}

impl OrgShared {
    /// A head's ticket: `{arrival ms}:{replica}:{seq}`, so that among equal
    /// tags the earlier head sorts first (replicas' clocks agree closely
    /// enough for an order among ties).
    fn ticket(&self, waiter: &Waiter) -> String {
        format!("{:013}:{}:{}", waiter.since, self.replica, waiter.seq)
    }

    /// Wakes the heads of this replica named in a release message.
    fn wake(&self, tickets: &str) {
        let heads = lock(&self.heads);
        for seq in tickets.split(',').filter_map(|t| {
            let (_, rest) = t.split_once(':')?;
            rest.strip_prefix(self.replica.as_str())?
                .strip_prefix(':')?
                .parse::<u64>()
                .ok()
        }) {
            if let Some(wake) = heads.get(&seq) {
                wake.notify_one();
            }
        }
    }

    fn wake_all(&self) {
        for wake in lock(&self.heads).values() {
            wake.notify_one();
        }
        self.released.notify_waiters();
    }
}

/// What a replica accepts from Redis: values outside these are clamped.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// The adaptive limit's floor.
    pub min: usize,
    /// The adaptive limit's ceiling.
    pub ceiling: usize,
    /// The longest the gate may stay closed.
    pub max_gate: Duration,
}

/// The connection to Redis, its health, and every org's shared state.
pub struct SharedRedis {
    client: redis::Client,
    target: Target,
    prefix: String,
    timeout: Duration,
    lease_time: Duration,
    conn: RwLock<Option<Conn>>,
    /// [`State`] as a number: down, returning, shared.
    state: AtomicU8,
    /// When Redis answered again after being away (the returning state).
    returned_at: Mutex<Option<tokio::time::Instant>>,
    /// When the shared state was lost last.
    lost_at: Mutex<Option<tokio::time::Instant>>,
    /// The shared state was in use once (a later return goes through
    /// the returning state).
    was_shared: std::sync::atomic::AtomicBool,
    /// Why the state last left `shared` (a short class, never the URL).
    reason: Mutex<&'static str>,
    /// Times the state left `shared` or `returning` since the start.
    losses: std::sync::atomic::AtomicU64,
    /// Every live store, by its channel and then its own id: two stores
    /// may share a channel (a governor replaced while a request of the old
    /// one still runs), and each keeps its leases renewed until it goes.
    orgs: Mutex<HashMap<String, HashMap<u64, Arc<OrgShared>>>>,
    /// The next store's id.
    next_store: std::sync::atomic::AtomicU64,
    scripts: Scripts,
}

struct Scripts {
    acquire: redis::Script,
    release: redis::Script,
    leave: redis::Script,
    renew: redis::Script,
    presence: redis::Script,
    gate: redis::Script,
    lower: redis::Script,
    raise: redis::Script,
    quota: redis::Script,
    epoch: redis::Script,
}

impl std::fmt::Debug for SharedRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL can carry a password: never printed.
        f.debug_struct("SharedRedis")
            .field("prefix", &self.prefix)
            .field("healthy", &self.is_shared())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SharedRedis {
    /// A client for `url` (nothing is connected until [`Self::spawn`]).
    pub fn new(settings: &RedisSettings) -> Result<Arc<Self>, String> {
        let client = client(&settings.url, settings.ca_file.as_deref())?;
        let root_cert = match &settings.ca_file {
            Some(file) => Some(std::fs::read(file).map_err(|e| {
                format!(
                    "governor.redis_ca_file {} cannot be read: {e}",
                    file.display()
                )
            })?),
            None => None,
        };
        Ok(Arc::new(Self {
            target: Target {
                client: client.clone(),
                url: settings.url.clone(),
                root_cert,
                cluster: settings.cluster,
                timeout: settings.timeout,
            },
            client,
            prefix: settings.prefix.clone(),
            timeout: settings.timeout,
            lease_time: settings.lease_time,
            conn: RwLock::new(None),
            state: AtomicU8::new(State::Down as u8),
            returned_at: Mutex::new(None),
            lost_at: Mutex::new(None),
            was_shared: std::sync::atomic::AtomicBool::new(false),
            reason: Mutex::new("not connected yet"),
            losses: std::sync::atomic::AtomicU64::new(0),
            orgs: Mutex::new(HashMap::new()),
            next_store: std::sync::atomic::AtomicU64::new(0),
            scripts: Scripts {
                acquire: redis::Script::new(ACQUIRE),
                release: redis::Script::new(RELEASE),
                leave: redis::Script::new(LEAVE),
                renew: redis::Script::new(RENEW),
                presence: redis::Script::new(PRESENCE),
                gate: redis::Script::new(GATE),
                lower: redis::Script::new(LOWER),
                raise: redis::Script::new(RAISE),
                quota: redis::Script::new(QUOTA),
                epoch: redis::Script::new(EPOCH),
            },
        }))
    }

    /// Whether the shared state is in use (Redis answers, and has for
    /// long enough since it was last away).
    pub fn is_shared(&self) -> bool {
        self.state() == State::Shared
    }

    /// Where the shared state stands now.
    pub fn state(&self) -> State {
        match self.state.load(Ordering::Relaxed) {
            2 => State::Shared,
            1 => State::Returning,
            _ => State::Down,
        }
    }

    /// The store of the org keyed `org_key` (its host), whose gate
    /// messages close `gate`.
    pub fn store(
        self: &Arc<Self>,
        org_key: &str,
        gate: Arc<Gate>,
        local: Arc<LocalStore>,
        bounds: Bounds,
    ) -> RedisStore {
        // One hash slot for every key of the org: `{…}` is the cluster's
        // hash tag, so each script's keys live on one node.
        let key = format!("{}:{{{org_key}}}", self.prefix);
        let shared = Arc::new(OrgShared {
            channel: format!("{key}:events"),
            key,
            released: Notify::new(),
            gate,
            bounds,
            limit: std::sync::atomic::AtomicUsize::new(bounds.ceiling),
            held: Mutex::new(HashSet::new()),
            replica: uuid::Uuid::new_v4().simple().to_string(),
            heads: Mutex::new(HashMap::new()),
            local,
            registered: AtomicUsize::new(0),
            epoch: Mutex::new(String::new()),
            others: Mutex::new(HashMap::new()),
        });
        let id = self.next_store.fetch_add(1, Ordering::Relaxed);
        lock(&self.orgs)
            .entry(shared.channel.clone())
            .or_default()
            .insert(id, shared.clone());
        RedisStore {
            redis: self.clone(),
            org: shared,
            id,
        }
    }

    /// Stops dispatching to the store `id` on `channel` (its governor is
    /// gone); another store on the same channel stays.
    pub(super) fn forget(&self, channel: &str, id: u64) {
        let mut orgs = lock(&self.orgs);
        if let Some(stores) = orgs.get_mut(channel) {
            stores.remove(&id);
            if stores.is_empty() {
                orgs.remove(channel);
            }
        }
    }

    /// The stores listening on `channel`.
    fn stores_on(&self, channel: &str) -> Vec<Arc<OrgShared>> {
        lock(&self.orgs)
            .get(channel)
            .map(|stores| stores.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The background tasks: connecting and health checks, the channel
    /// subscription, lease renewal.
    pub fn spawn(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        vec![
            tokio::spawn(self.clone().keep_connected()),
            tokio::spawn(self.clone().listen()),
            tokio::spawn(self.clone().renew_leases()),
        ]
    }

    /// Takes one request from `caller`'s shared quota: `Ok(Err(wait))`
    /// when it is used up.
    pub async fn take_quota(
        &self,
        caller: &str,
        rate: f64,
    ) -> Result<Result<(), Duration>, StoreError> {
        let mut call = self
            .scripts
            .quota
            .key(format!("{}:quota:{caller}", self.prefix));
        call.arg(rate);
        let (ok, wait): (i64, String) = self.run(call).await?;
        Ok(if ok == 1 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                wait.parse::<f64>().unwrap_or(1.0).clamp(0.001, 3600.0),
            ))
        })
    }

    fn mark_down(&self, why: &str) {
        *lock(&self.reason) = reason_class(why);
        let before = self.state.swap(State::Down as u8, Ordering::Relaxed);
        if before == State::Shared as u8 {
            *lock(&self.lost_at) = Some(tokio::time::Instant::now());
        }
        if before != State::Down as u8 {
            let losses = self.losses.fetch_add(1, Ordering::Relaxed) + 1;
            if losses > 3 {
                tracing::warn!(error = %why, losses, "shared governor state lost again (Redis keeps failing): each replica keeps its local fallback cap meanwhile");
            } else {
                tracing::warn!(error = %why, "shared governor state unavailable (Redis): each replica now keeps its local fallback cap");
            }
        }
    }

    /// Whether the shared state was lost less than [`SETTLE`] ago: the
    /// slots other replicas took from Redis are still running and nobody
    /// can count them, so no replica takes a slot on its fallback cap
    /// until they have had that long to end (callers wait in the queue).
    pub fn settling(&self) -> bool {
        self.lost_within(SETTLE)
    }

    /// The slots `org`'s other replicas held beyond their fallback `share`
    /// when this one last heard of them, while the shared state is lost and
    /// for at most `max_hold` after: those replicas take no fallback slot
    /// until they are below their share, and their extra slots may run
    /// that long, so this replica's fallback cap leaves room for them.
    fn reserve(&self, org: &OrgShared, share: usize, max_hold: Duration) -> usize {
        if !self.lost_within(max_hold) {
            return 0;
        }
        lock(&org.others)
            .values()
            .map(|held| held.saturating_sub(share))
            .sum()
    }

    fn lost_within(&self, time: Duration) -> bool {
        self.state() != State::Shared && lock(&self.lost_at).is_some_and(|t| t.elapsed() < time)
    }

    /// Why the state last left `shared` (`unreachable`, `CROSSSLOT`, …).
    pub fn reason(&self) -> &'static str {
        *lock(&self.reason)
    }

    /// Times the shared state was lost since the start.
    pub fn losses(&self) -> u64 {
        self.losses.load(Ordering::Relaxed)
    }

    /// Redis answered a health check: back to shared only after it has
    /// answered for a while, meanwhile on the local cap with its
    /// slots registered in Redis, so that every replica has seen Redis
    /// again and registered its own before any takes slots from it.
    fn mark_answering(&self) {
        let mut since = lock(&self.returned_at);
        match self.state() {
            State::Shared => {}
            State::Down => {
                *since = Some(tokio::time::Instant::now());
                self.state.store(State::Returning as u8, Ordering::Relaxed);
                tracing::info!(
                    "Redis answers again: registering this replica's slots before using the shared state"
                );
            }
            State::Returning => {
                if since.is_none_or(|t| t.elapsed() >= self.returning_for()) {
                    self.was_shared.store(true, Ordering::Relaxed);
                    self.state.store(State::Shared as u8, Ordering::Relaxed);
                    tracing::info!("shared governor state in use (Redis answers)");
                }
            }
        }
    }

    /// The prefix of every key (`governor.redis_prefix`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Runs a pipeline of plain commands with the timeout (the usage
    /// ledger's batched increments and reads, whose keys share one hash
    /// slot); a failure marks the state down.
    pub async fn pipeline<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let mut conn = self.connection()?;
        let result = tokio::time::timeout(self.timeout, pipe.query_async::<T>(&mut conn)).await;
        self.outcome(result)
    }

    /// Runs one script with the timeout; a failure marks the state down.
    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut conn = self.connection()?;
        let result =
            tokio::time::timeout(self.timeout, invocation.invoke_async::<T>(&mut conn)).await;
        self.outcome(result)
    }

    /// The connection, when there is one.
    fn connection(&self) -> Result<Conn, StoreError> {
        self.conn
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| StoreError("not connected".to_owned()))
    }

    /// A call's answer; a failure or no answer in time marks the state down.
    fn outcome<T>(
        &self,
        result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        let err = match result {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => format!("{:?}", e.kind()),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        self.mark_down(&err);
        Err(StoreError(err))
    }

    /// Every live store's org, for the background tasks.
    fn all_orgs(&self) -> Vec<Arc<OrgShared>> {
        lock(&self.orgs)
            .values()
            .flat_map(|stores| stores.values().cloned())
            .collect()
    }

    /// Connects, then checks every second; marks the state shared when Redis answers.
    async fn keep_connected(self: Arc<Self>) {
        loop {
            let existing = self
                .conn
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let conn = match existing {
                Some(c) => Some(c),
                None => self.target.connect().await,
            };
            if let Some(mut conn) = conn {
                let ping = tokio::time::timeout(
                    self.timeout,
                    redis::cmd("PING").query_async::<String>(&mut conn),
                )
                .await;
                let answered = matches!(ping, Ok(Ok(_)));
                // A connection that does not answer is replaced at the next
                // check rather than left to its own reconnect backoff: a
                // Redis that is back is noticed within about a second.
                *self
                    .conn
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = answered.then_some(conn);
                if answered {
                    self.answered().await;
                } else {
                    self.mark_down("no answer to PING");
                }
            } else {
                self.mark_down("cannot connect");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Subscribes to every org's channel; reconnects when the link drops.
    async fn listen(self: Arc<Self>) {
        let pattern = format!("{}:*:events", self.prefix);
        loop {
            let subscribed = async {
                let mut pubsub = self.client.get_async_pubsub().await.ok()?;
                pubsub.psubscribe(&pattern).await.ok()?;
                Some(pubsub)
            };
            if let Ok(Some(pubsub)) = tokio::time::timeout(self.timeout * 4, subscribed).await {
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    self.dispatch(
                        msg.get_channel_name(),
                        &msg.get_payload::<String>().unwrap_or_default(),
                    );
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn dispatch(&self, channel: &str, payload: &str) {
        for org in self.stores_on(channel) {
            Self::dispatch_to(&org, payload);
        }
    }

    fn dispatch_to(org: &OrgShared, payload: &str) {
        if let Some(tickets) = payload.strip_prefix("released:") {
            // The heads whose tickets come first are named; waking any
            // other head too would cost a Redis call per replica and
            // release for a try that must fail. With no ticket queued, one
            // head here that has none yet may take the slot.
            if tickets.is_empty() {
                org.released.notify_one();
            } else {
                org.wake(tickets);
            }
        } else if let Some(ms) = payload.strip_prefix("gate:").and_then(|m| m.parse().ok()) {
            // A published gate is believed only up to the longest Retry-After.
            let wait = Duration::from_millis(ms).min(org.bounds.max_gate);
            org.gate.close(wait);
            org.wake_all();
        }
    }

    /// How long Redis must answer again before this replica takes slots
    /// from it: longer than another replica needs to notice (a health
    /// check a second, a connect within four timeouts) and to register its
    /// local slots (every [`REGISTER_EVERY`]), with room for a busy
    /// machine: a lease time, [`MIN_RETURNING`] at least.
    fn returning_for(&self) -> Duration {
        self.lease_time.max(MIN_RETURNING)
    }

    /// Redis answered a health check. Its very first answer: the slots
    /// this replica took on its local cap before (requests that came
    /// before Redis answered) are registered, and the shared state is used
    /// at once: the other replicas, already sharing, see them.
    async fn answered(&self) {
        if self.state() != State::Down || self.was_shared.load(Ordering::Relaxed) {
            self.mark_answering();
            return;
        }
        for org in self.all_orgs() {
            let _ = self.adopt_epoch(&org).await;
            self.register_local(&org).await;
        }
        self.was_shared.store(true, Ordering::Relaxed);
        self.state.store(State::Shared as u8, Ordering::Relaxed);
        tracing::info!("shared governor state in use (Redis answers)");
    }
}

/// A failure's class for `/status` and the metric: what an operator acts
/// on, never the server's text (which may name hosts).
fn reason_class(why: &str) -> &'static str {
    let lower = why.to_ascii_lowercase();
    if lower.contains("crossslot") {
        "CROSSSLOT (a clustered Redis)"
    } else if lower.contains("auth") || lower.contains("noperm") || lower.contains("wrongpass") {
        "authentication refused"
    } else if lower.contains("script") || lower.contains("response") && lower.contains("error") {
        "script refused"
    } else if lower.contains("no answer") {
        "no answer within the timeout"
    } else {
        "unreachable"
    }
}

/// Where a replica's shared state stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Redis does not answer: the local fallback cap.
    Down = 0,
    /// Redis answers again: still the local cap, its slots registered in
    /// Redis, until every replica has had time to register its own.
    Returning = 1,
    /// The shared state.
    Shared = 2,
}

impl State {
    /// Its name on `/status`, `/readyz` and the metric.
    pub fn name(self) -> &'static str {
        match self {
            Self::Down => "local",
            Self::Returning => "returning",
            Self::Shared => "shared",
        }
    }
}

/// The shortest time Redis must answer again before a replica that used
/// its local cap takes slots from it (see `SharedRedis::returning_for`).
const MIN_RETURNING: Duration = Duration::from_secs(5);

/// How long after losing the shared state a replica takes no slot on its
/// fallback cap: the requests that held shared slots then (on any replica)
/// have had this long to end. Longer requests can still add to the
/// fallback caps for the rest of their time (docs/operations.md).
pub const SETTLE: Duration = Duration::from_secs(2);

/// How often held leases are renewed and local slots registered, at most.
const REGISTER_EVERY: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    fn redis() -> Arc<SharedRedis> {
        SharedRedis::new(&crate::config::RedisSettings {
            url: "redis://127.0.0.1:1".to_owned().into(),
            prefix: "test".to_owned(),
            timeout: Duration::from_millis(100),
            lease_time: Duration::from_secs(5),
            ca_file: None,
            cluster: Some(false),
        })
        .expect("client")
    }

    const BOUNDS: Bounds = Bounds {
        min: 1,
        ceiling: 52,
        max_gate: Duration::from_secs(300),
    };

    /// Two stores of one org (a governor replaced while a request of the
    /// old one still runs): forgetting the old one leaves the new one
    /// hearing its channel.
    #[tokio::test(start_paused = true)]
    async fn a_second_store_on_one_channel_is_not_replaced_or_forgotten() {
        let redis = redis();
        let (old_gate, new_gate) = (Arc::new(Gate::default()), Arc::new(Gate::default()));
        let old = redis.store("org.example:443", old_gate.clone(), Arc::default(), BOUNDS);
        let new = redis.store("org.example:443", new_gate.clone(), Arc::default(), BOUNDS);
        redis.dispatch("test:{org.example:443}:events", "gate:1000");
        assert!(old_gate.closed_until().is_some(), "both hear the channel");
        assert!(new_gate.closed_until().is_some());
        old.forget();
        tokio::time::sleep(Duration::from_secs(2)).await;
        redis.dispatch("test:{org.example:443}:events", "gate:1000");
        assert!(old_gate.closed_until().is_none(), "the old one is gone");
        assert!(new_gate.closed_until().is_some(), "the new one still hears");
        assert_eq!(redis.stores_on("test:{org.example:443}:events").len(), 1);
        drop(new);
    }
}
