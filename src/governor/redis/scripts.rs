//! The Lua scripts the shared governor runs in Redis, one per change, so
//! that replicas never race in a read-modify-write.

/// Takes a lease unless the gate is closed, the shared limit is reached, or
/// tickets with a smaller fair-share tag are ahead. KEYS: leases, limit,
/// gate, queue (head tickets by their start tag), seen (tickets by last
/// attempt), tags (flow → finish tag), vtime, tags-used (flows by last
/// use), epoch; ARGV: lease ms, lease id,
/// default limit, ticket ('' when not queued), flow, cost, min limit,
/// ceiling, longest gate ms, slots this replica holds outside Redis, the
/// epoch this replica knows. An epoch that is not the known one (Redis
/// lost its data: restarted empty, flushed, failed over) answers {3, 0}
/// before anything is taken, so no lease is counted against a state that
/// forgot the others'.
/// A ticket's start tag is fixed (and its flow charged) when it first
/// enters, so its place never moves; tickets of equal tags are ordered by
/// their names, which begin with the head's arrival time.
/// Nothing read from Redis is trusted beyond the configured bounds: the
/// limit is clamped to min..ceiling, the gate to the longest Retry-After
/// (and shortened in Redis), the tags to a sane range. A ticket not seen
/// for a second (its head left, or its replica died) is dropped. A flow
/// unused for ten minutes loses its tag (a few per call, so the hash holds
/// only the flows of the last ten minutes, not every address ever seen);
/// coming back it starts at the virtual time, as a new flow does.
pub(super) const ACQUIRE: &str = r"
if redis.call('GET', KEYS[9]) ~= ARGV[11] then return {3, 0} end
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
  redis.call('ZADD', KEYS[8], now, ARGV[5])
  redis.call('PEXPIRE', KEYS[8], 600000)
  local unused = redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', now - 600000, 'LIMIT', 0, 16)
  for _, f in ipairs(unused) do redis.call('HDEL', KEYS[6], f); redis.call('ZREM', KEYS[8], f) end
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
pub(super) const RELEASE: &str = r"
redis.call('ZREM', KEYS[1], ARGV[1])
local free = tonumber(ARGV[3]) - redis.call('ZCARD', KEYS[1])
local front = {}
if free > 0 then front = redis.call('ZRANGE', KEYS[2], 0, free - 1) end
redis.call('PUBLISH', ARGV[2], 'released:' .. table.concat(front, ','))
return 1
";

/// A head left without a slot: its ticket leaves the line.
pub(super) const LEAVE: &str = r"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
";

/// Extends the leases still held (long answers outlive the lease time)
/// and reports what a replica needs to see a loss: the epoch ('' when
/// gone), the ids Redis no longer has (a restart, a failover that lost the
/// last writes, a lease renewed too late), and how many leases each other
/// replica holds (its ids begin with `{replica}:`), as replica, count,
/// replica, count… With ARGV[2] = 1 (the
/// replica is returning after Redis lost its state) the missing leases are
/// written again; otherwise a lease released meanwhile is never brought
/// back. KEYS: leases, epoch; ARGV: lease ms, re-add, replica, lease ids.
pub(super) const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local epoch = redis.call('GET', KEYS[2])
if epoch then redis.call('PEXPIRE', KEYS[2], 600000) else epoch = '' end
local readd = ARGV[2] == '1'
local missing = {}
for i = 4, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
  else
    table.insert(missing, ARGV[i])
    if readd then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i]) end
  end
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 3)
local counts, others = {}, {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local replica = string.match(id, '^([^:]+):')
  if replica and replica ~= ARGV[3] then counts[replica] = (counts[replica] or 0) + 1 end
end
for r, n in pairs(counts) do table.insert(others, r); table.insert(others, tostring(n)) end
return {epoch, missing, others}
";

/// The org's epoch: a random value written when there is none, so that a
/// Redis that lost its data is told from one that kept it. KEYS: epoch;
/// ARGV: a fresh value.
pub(super) const EPOCH: &str = r"
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', 600000)
  epoch = ARGV[1]
end
return epoch
";

/// Registers the slots a replica holds on its local fallback cap as leases
/// `{replica}:local:{n}` for n below ARGV[3], and takes out those from
/// ARGV[3] up to ARGV[4]. ARGV: lease ms, replica, held now, held before.
pub(super) const PRESENCE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held, before = tonumber(ARGV[3]), tonumber(ARGV[4])
for n = 0, held - 1 do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2] .. ':local:' .. n)
end
for n = held, before - 1 do
  redis.call('ZREM', KEYS[1], ARGV[2] .. ':local:' .. n)
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 3)
return 1
";

/// Closes the gate for ARGV[1] ms unless it is closed for longer.
pub(super) const GATE: &str = r"
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
  redis.call('PUBLISH', ARGV[2], 'gate:' .. ARGV[1])
end
return 1
";

/// Multiplies the shared limit by 0.7 (not below the floor), at most once
/// per hold time; returns the limit. ARGV: current, floor, hold ms, ceiling.
pub(super) const LOWER: &str = r"
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
pub(super) const RAISE: &str = r"
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
pub(super) const QUOTA: &str = r"
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
