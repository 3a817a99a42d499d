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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::{ExposeSecret, SecretString};

use crate::config::RedisSettings;
use tokio::sync::Notify;

use super::store::{Ask, Gate, Lease, SlotStore, StoreError, StoreFuture, TryAcquire, Waiter};

/// Takes a lease unless the gate is closed, the shared limit is reached, or
/// tickets with a smaller fair-share tag are ahead. KEYS: leases, limit,
/// gate, queue (head tickets by their start tag), seen (tickets by last
/// attempt), tags (flow → finish tag), vtime; ARGV: lease ms, lease id,
/// default limit, ticket ('' when not queued), flow, cost, min limit,
/// ceiling, longest gate ms, slots this replica holds outside Redis.
/// A ticket's start tag is fixed (and its flow charged) when it first
/// enters, so its place never moves; tickets of equal tags are ordered by
/// their names, which begin with the head's arrival time.
/// Nothing read from Redis is trusted beyond the configured bounds: the
/// limit is clamped to min..ceiling, the gate to the longest Retry-After
/// (and shortened in Redis), the tags to a sane range. A ticket not seen
/// for a second (its head left, or its replica died) is dropped.
const ACQUIRE: &str = r"
local maxgate = tonumber(ARGV[9])
local gate = redis.call('PTTL', KEYS[3])
if gate > maxgate then redis.call('PEXPIRE', KEYS[3], maxgate); gate = maxgate end
if gate > 0 then return {2, gate} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local stale = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now - 1000)
for _, s in ipairs(stale) do redis.call('ZREM', KEYS[4], s); redis.call('ZREM', KEYS[5], s) end
local limit = tonumber(redis.call('GET', KEYS[2])) or tonumber(ARGV[3])
if limit ~= limit then limit = tonumber(ARGV[3]) end
limit = math.max(tonumber(ARGV[7]), math.min(tonumber(ARGV[8]), math.floor(limit)))
local free = limit - redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[10])
local vt = tonumber(redis.call('GET', KEYS[7])) or 0
if vt ~= vt or vt < 0 or vt > 4503599627370496 then vt = 0; redis.call('DEL', KEYS[6]) end
local ticket = ARGV[4]
local start = tonumber(redis.call('ZSCORE', KEYS[4], ticket))
if not start then
  -- A new head, or a caller that has not queued: its start tag, charged now.
  local fin = tonumber(redis.call('HGET', KEYS[6], ARGV[5])) or 0
  if fin ~= fin or fin < vt then fin = vt end
  if fin > vt + 1000000000 then fin = vt + 1000000000 end
  start = fin
  redis.call('HSET', KEYS[6], ARGV[5], start + tonumber(ARGV[6]))
  redis.call('PEXPIRE', KEYS[6], 600000)
end
local ahead
if ticket == '' then
  ahead = redis.call('ZCARD', KEYS[4])
else
  redis.call('ZADD', KEYS[4], start, ticket)
  redis.call('ZADD', KEYS[5], now, ticket)
  redis.call('PEXPIRE', KEYS[4], 60000)
  redis.call('PEXPIRE', KEYS[5], 60000)
  ahead = redis.call('ZRANK', KEYS[4], ticket)
end
if ahead < free then
  if ticket ~= '' then redis.call('ZREM', KEYS[4], ticket); redis.call('ZREM', KEYS[5], ticket) end
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 3)
  redis.call('SET', KEYS[7], math.max(vt, start), 'PX', 600000)
  return {1, limit}
end
return {0, limit}
";

/// Gives a lease back and wakes the heads whose tickets come first (as
/// many as slots are free), wherever they wait. KEYS: leases, queue;
/// ARGV: lease id, channel, limit.
const RELEASE: &str = r"
redis.call('ZREM', KEYS[1], ARGV[1])
local free = tonumber(ARGV[3]) - redis.call('ZCARD', KEYS[1])
local front = {}
if free > 0 then front = redis.call('ZRANGE', KEYS[2], 0, free - 1) end
redis.call('PUBLISH', ARGV[2], 'released:' .. table.concat(front, ','))
return 1
";

/// A head left without a slot: its ticket leaves the line.
const LEAVE: &str = r"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
";

/// Extends the leases still held (long answers outlive the lease time).
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
  end
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 3)
return 1
";

/// Closes the gate for ARGV[1] ms unless it is closed for longer.
const GATE: &str = r"
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
  redis.call('PUBLISH', ARGV[2], 'gate:' .. ARGV[1])
end
return 1
";

/// Multiplies the shared limit by 0.7 (not below the floor), at most once
/// per hold time; returns the limit. ARGV: current, floor, hold ms, ceiling.
const LOWER: &str = r"
local cur = tonumber(redis.call('GET', KEYS[1])) or tonumber(ARGV[1])
if cur ~= cur then cur = tonumber(ARGV[1]) end
cur = math.max(tonumber(ARGV[2]), math.min(tonumber(ARGV[4]), math.floor(cur)))
if redis.call('EXISTS', KEYS[2]) == 1 then return cur end
local new = math.max(tonumber(ARGV[2]), math.floor(cur * 0.7))
redis.call('SET', KEYS[1], new, 'PX', 3600000)
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
return new
";

/// Moves the shared limit one step towards the target; returns it.
/// ARGV: current, target, floor, ceiling.
const RAISE: &str = r"
local cur = tonumber(redis.call('GET', KEYS[1])) or tonumber(ARGV[1])
if cur ~= cur then cur = tonumber(ARGV[1]) end
local lo, hi = tonumber(ARGV[3]), tonumber(ARGV[4])
cur = math.max(lo, math.min(hi, math.floor(cur)))
local target = math.max(lo, math.min(hi, tonumber(ARGV[2])))
if cur < target then cur = cur + 1 elseif cur > target then cur = target end
redis.call('SET', KEYS[1], cur, 'PX', 3600000)
return cur
";

/// A caller's token bucket: `rate` per second, a burst of `max(rate, 1)`;
/// returns {1, 0} or {0, seconds to wait}.
const QUOTA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = math.max(rate, 1)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local ok, wait = 0, 0
if tokens >= 1 then tokens = tokens - 1; ok = 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 10)
return {ok, tostring(wait)}
";

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
    /// This replica's id: its heads' tickets are `{replica}:{seq}`.
    replica: String,
    /// This replica's heads, by seq, to wake when their ticket comes up.
    heads: Mutex<HashMap<u64, Arc<Notify>>>,
}

impl OrgShared {
    /// A head's ticket: `{arrival ms}:{replica}:{seq}`, so that among equal
    /// tags the earlier head sorts first (replicas' clocks agree closely
    /// enough for an order among ties).
    fn ticket(&self, waiter: &Waiter) -> String {
        let arrived = waiter.since.saturating_sub(1_000_000_000_000);
        format!("{arrived:013}:{}:{}", self.replica, waiter.seq)
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
    prefix: String,
    timeout: Duration,
    lease_time: Duration,
    conn: RwLock<Option<ConnectionManager>>,
    healthy: AtomicBool,
    orgs: Mutex<HashMap<String, Arc<OrgShared>>>,
    scripts: Scripts,
}

struct Scripts {
    acquire: redis::Script,
    release: redis::Script,
    leave: redis::Script,
    renew: redis::Script,
    gate: redis::Script,
    lower: redis::Script,
    raise: redis::Script,
    quota: redis::Script,
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
        Ok(Arc::new(Self {
            client,
            prefix: settings.prefix.clone(),
            timeout: settings.timeout,
            lease_time: settings.lease_time,
            conn: RwLock::new(None),
            healthy: AtomicBool::new(false),
            orgs: Mutex::new(HashMap::new()),
            scripts: Scripts {
                acquire: redis::Script::new(ACQUIRE),
                release: redis::Script::new(RELEASE),
                leave: redis::Script::new(LEAVE),
                renew: redis::Script::new(RENEW),
                gate: redis::Script::new(GATE),
                lower: redis::Script::new(LOWER),
                raise: redis::Script::new(RAISE),
                quota: redis::Script::new(QUOTA),
            },
        }))
    }

    /// Whether the shared state is in use (Redis answered last time).
    pub fn is_shared(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The store of the org keyed `org_key` (its host), whose gate
    /// messages close `gate`.
    pub fn store(self: &Arc<Self>, org_key: &str, gate: Arc<Gate>, bounds: Bounds) -> RedisStore {
        let key = format!("{}:{org_key}", self.prefix);
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
        });
        lock(&self.orgs).insert(shared.channel.clone(), shared.clone());
        RedisStore {
            redis: self.clone(),
            org: shared,
        }
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
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %why, "shared governor state unavailable (Redis): each replica now keeps its local fallback cap");
        }
    }

    /// Runs one command with the timeout; a failure marks the state down.
    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let conn = self
            .conn
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let Some(mut conn) = conn else {
            return Err(StoreError("not connected".to_owned()));
        };
        let result =
            tokio::time::timeout(self.timeout, invocation.invoke_async::<T>(&mut conn)).await;
        let err = match result {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => format!("{:?}", e.kind()),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        self.mark_down(&err);
        Err(StoreError(err))
    }

    /// Connects, then checks every second; marks the state shared when Redis answers.
    async fn keep_connected(self: Arc<Self>) {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        loop {
            let existing = self
                .conn
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let conn = match existing {
                Some(c) => Some(c),
                None => tokio::time::timeout(
                    self.timeout * 4,
                    ConnectionManager::new_with_config(self.client.clone(), config.clone()),
                )
                .await
                .ok()
                .and_then(Result::ok),
            };
            if let Some(mut conn) = conn {
                let ping = tokio::time::timeout(
                    self.timeout,
                    redis::cmd("PING").query_async::<String>(&mut conn),
                )
                .await;
                *self
                    .conn
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(conn);
                if matches!(ping, Ok(Ok(_))) {
                    if !self.healthy.swap(true, Ordering::Relaxed) {
                        tracing::info!("shared governor state in use (Redis answers)");
                    }
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
        let Some(org) = lock(&self.orgs).get(channel).cloned() else {
            return;
        };
        if let Some(tickets) = payload.strip_prefix("released:") {
            org.wake(tickets);
            org.released.notify_one();
        } else if let Some(ms) = payload.strip_prefix("gate:").and_then(|m| m.parse().ok()) {
            // A published gate is believed only up to the longest Retry-After.
            let wait = Duration::from_millis(ms).min(org.bounds.max_gate);
            org.gate.close(wait);
            org.wake_all();
        }
    }

    async fn renew_leases(self: Arc<Self>) {
        let every = (self.lease_time / 3).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(every).await;
            let orgs: Vec<Arc<OrgShared>> = lock(&self.orgs).values().cloned().collect();
            for org in orgs {
                let held: Vec<String> = lock(&org.held).iter().cloned().collect();
                if held.is_empty() {
                    continue;
                }
                let mut call = self.scripts.renew.key(format!("{}:leases", org.key));
                call.arg(self.lease_time.as_millis() as u64);
                for id in &held {
                    call.arg(id);
                }
                let _ = self.run::<i64>(call).await;
            }
        }
    }
}

/// One org's view of the shared state.
pub struct RedisStore {
    redis: Arc<SharedRedis>,
    org: Arc<OrgShared>,
}

impl RedisStore {
    /// Whether the shared state is in use.
    pub fn is_shared(&self) -> bool {
        self.redis.is_shared()
    }

    /// Closes every replica's gate for `wait`.
    pub async fn close_gate(&self, wait: Duration) -> Result<(), StoreError> {
        let mut call = self
            .redis
            .scripts
            .gate
            .key(format!("{}:gate", self.org.key));
        call.arg(wait.as_millis().max(1) as u64)
            .arg(&self.org.channel);
        self.redis.run::<i64>(call).await.map(|_| ())
    }

    /// Lowers the shared limit (once per `hold`); the new limit.
    pub async fn lower_limit(
        &self,
        current: usize,
        floor: usize,
        hold: Duration,
    ) -> Result<usize, StoreError> {
        let mut call = self
            .redis
            .scripts
            .lower
            .key(format!("{}:limit", self.org.key));
        call.key(format!("{}:limit-hold", self.org.key));
        call.arg(current)
            .arg(floor)
            .arg(hold.as_millis() as u64)
            .arg(self.org.bounds.ceiling);
        self.redis.run::<usize>(call).await
    }

    /// Moves the shared limit one step towards `target`; the new limit.
    pub async fn raise_limit(&self, current: usize, target: usize) -> Result<usize, StoreError> {
        let mut call = self
            .redis
            .scripts
            .raise
            .key(format!("{}:limit", self.org.key));
        let b = self.org.bounds;
        call.arg(current).arg(target).arg(b.min).arg(b.ceiling);
        self.redis.run::<usize>(call).await
    }
}

impl SlotStore for RedisStore {
    fn try_acquire(&self, ask: Ask<'_>) -> StoreFuture<'_, TryAcquire> {
        let ticket = ask.waiter.map_or(String::new(), |w| {
            lock(&self.org.heads).insert(w.seq, w.wake.clone());
            self.org.ticket(w)
        });
        let seq = ask.waiter.map(|w| w.seq);
        let (flow, cost) = (ask.flow.key.clone(), ask.flow.cost());
        Box::pin(async move {
            let id = uuid::Uuid::new_v4().simple().to_string();
            let key = &self.org.key;
            let mut call = self.redis.scripts.acquire.key(format!("{key}:leases"));
            for k in ["limit", "gate", "queue", "queue-seen", "tags", "vtime"] {
                call.key(format!("{key}:{k}"));
            }
            let b = self.org.bounds;
            call.arg(self.redis.lease_time.as_millis() as u64)
                .arg(&id)
                .arg(ask.limit)
                .arg(&ticket)
                .arg(&*flow)
                .arg(cost)
                .arg(b.min)
                .arg(b.ceiling)
                .arg(b.max_gate.as_millis().max(1) as u64)
                .arg(ask.extra);
            let (code, value): (i64, u64) = self.redis.run(call).await?;
            Ok(match code {
                1 => {
                    if let Some(seq) = seq {
                        lock(&self.org.heads).remove(&seq);
                    }
                    lock(&self.org.held).insert(id.clone());
                    let limit = (value as usize).clamp(b.min, b.ceiling);
                    self.org.limit.store(limit, Ordering::Relaxed);
                    TryAcquire::Got {
                        lease: Lease::Shared(id),
                        limit,
                    }
                }
                2 => TryAcquire::Gated(Duration::from_millis(value).min(b.max_gate)),
                _ => TryAcquire::Full,
            })
        })
    }

    fn release(&self, lease: Lease) {
        let Lease::Shared(id) = lease else {
            return;
        };
        lock(&self.org.held).remove(&id);
        let (redis, org) = (self.redis.clone(), self.org.clone());
        let limit = self.org.limit.load(Ordering::Relaxed);
        let release = async move {
            let mut call = redis.scripts.release.key(format!("{}:leases", org.key));
            call.key(format!("{}:queue", org.key));
            call.arg(&id).arg(&org.channel).arg(limit);
            // A lease Redis never hears back about expires by itself.
            let _ = redis.run::<i64>(call).await;
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(release);
        }
    }

    fn released(&self) -> &Notify {
        &self.org.released
    }

    fn leave(&self, waiter: &Waiter) {
        lock(&self.org.heads).remove(&waiter.seq);
        let (redis, org) = (self.redis.clone(), self.org.clone());
        let ticket = org.ticket(waiter);
        let leave = async move {
            let mut call = redis.scripts.leave.key(format!("{}:queue", org.key));
            call.key(format!("{}:queue-seen", org.key));
            call.arg(&ticket);
            // A ticket Redis never hears back about is dropped after a second.
            let _ = redis.run::<i64>(call).await;
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(leave);
        }
    }

    fn taken(&self) -> usize {
        lock(&self.org.held).len()
    }
}
