//! The Lua scripts of the Redis backend, how each is invoked, and how an
//! acquire reply is read.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{Script, Value};

use super::millis;
use crate::backend::{Attempt, AttemptAll, RawHolder, Request, Snapshot};
use crate::error::{Error, Result};
use crate::inspect::Role;
use crate::key::{Keys, LockKind};

/// How long the fencing counter outlives its creation. When it expires (or Redis
/// restarts empty) it starts again from the server's clock, so a token never
/// repeats.
pub(super) const FENCE_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

/// Lua that mints the next fencing token into `f`: one more than the counter.
/// A counter below 10^15 (September 2001 in microseconds: missing, expired,
/// lost in a restart, or set by hand) starts from the server's clock in
/// microseconds, with a TTL, so tokens keep increasing across its loss: one
/// acquisition per microsecond for the counter's 7 days would be needed to
/// overtake the clock.
/// Expects `KEYS[FENCE]` and the fence TTL in `ARGV[FTTL]`; the argument is the
/// Lua that undoes the acquisition when the counter is corrupt (not an integer,
/// or at its limit), which is then an error and leaves nothing held.
macro_rules! mint_fence {
    ($undo:literal) => {
        concat!(
            r"
  local f = redis.pcall('incr', KEYS[FENCE])
  if type(f) == 'table' then
    ",
            $undo,
            r"
    return redis.error_reply('ERR fencing counter ' .. KEYS[FENCE] .. ': ' .. tostring(f.err))
  end
  if f < 1e15 then
    local t = redis.call('time')
    f = tonumber(t[1]) * 1000000 + tonumber(t[2])
    redis.call('set', KEYS[FENCE], string.format('%.0f', f), 'PX', ARGV[FTTL])
  end
  f = string.format('%.0f', f)
"
        )
    };
}

/// Lua that defines `reg()`: the expiry register's value when `ARGV[5]` asks
/// for it (the register is the last key), else nothing.
macro_rules! register {
    () => {
        r"
local function reg()
  if ARGV[5] == '1' then return redis.call('get', KEYS[#KEYS]) end
  return false
end
"
    };
}

/// Lua that sets `now` to the server's clock in milliseconds.
macro_rules! now_ms {
    () => {
        r"
local t0 = redis.call('time')
local nowms = tonumber(t0[1]) * 1000 + math.floor(tonumber(t0[2]) / 1000)
"
    };
}

/// Acquire a mutex (or a reader-writer lock's write side): set-if-absent, mint a
/// fencing token, or report how long the holder has left.
///
/// KEYS: lock, fence, then readers and intent (write side only), then the
/// expiry register (when ARGV[5] is `1`).
/// ARGV: token, expiry ms, fence ttl ms, intent ms (0: a mutex), `1` to read
/// the expiry register.
/// Returns `{1, fence, register}` when acquired (also when the key already
/// holds our token: a retried attempt, which gets a new token too), `{0, ms
/// left, register}` when held, `{2, type}` for a key of another type.
///
/// A mutex tries `SET NX` first: an uncontended acquisition is two commands
/// (`SET`, `INCR`), and a `GET` of the register. `SET NX` leaves a key of any
/// type alone.
const ACQUIRE_EXCLUSIVE: &str = concat!(
    "local FENCE, FTTL = 2, 3\n",
    register!(),
    r"
local write = ARGV[4] ~= '0'
if not write and redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
",
    mint_fence!("redis.call('del', KEYS[1])"),
    r"
  return {1, f, reg()}
end
local kind = redis.call('type', KEYS[1])['ok']
if kind ~= 'string' and kind ~= 'none' then return {2, kind} end
if kind == 'string' then
  if redis.call('get', KEYS[1]) == ARGV[1] then
    redis.call('pexpire', KEYS[1], ARGV[2])
    -- Ours already (a retried attempt): a new token, never the counter as
    -- it stands (gone, or at the top of its range).
",
    mint_fence!("redis.call('del', KEYS[1])"),
    r"
    return {1, f, reg()}
  end
  return {0, tostring(redis.call('pttl', KEYS[1])), reg()}
end
if write then
  local rk = redis.call('type', KEYS[3])['ok']
  if rk ~= 'zset' and rk ~= 'none' then return {2, rk} end
",
    now_ms!(),
    r"
  redis.call('zremrangebyscore', KEYS[3], '-inf', nowms)
  local first = redis.call('zrange', KEYS[3], 0, 0, 'WITHSCORES')
  if #first > 0 then
    redis.call('set', KEYS[4], ARGV[1], 'PX', ARGV[4])
    return {0, tostring(math.max(1, tonumber(first[2]) - nowms)), reg()}
  end
end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
if write then redis.call('del', KEYS[4]) end
",
    mint_fence!("redis.call('del', KEYS[1])"),
    "return {1, f, reg()}\n"
);

/// Acquire several mutexes at once, all or none (one server only: the keys
/// are in different cluster slots).
///
/// KEYS: the N locks, then their N fencing counters, then the expiry register
/// (when ARGV[5] is `1`).
/// ARGV: token, expiry ms, fence ttl ms, N, `1` to read the expiry register.
/// Returns `{1, register, fence 1, ..., fence N}` when all are ours (a lock
/// already holding our token, from a retried attempt, gets a new token too),
/// `{0, register, i, ms left}` when lock `i` is held (nothing is taken), `{2,
/// type, i}` for a key of another type.
const ACQUIRE_ALL: &str = concat!(
    "local FTTL = 3\n",
    register!(),
    r"
local n = tonumber(ARGV[4])
for i = 1, n do
  local kind = redis.call('type', KEYS[i])['ok']
  if kind ~= 'string' and kind ~= 'none' then return {2, kind, i} end
  if kind == 'string' and redis.call('get', KEYS[i]) ~= ARGV[1] then
    return {0, reg(), i, tostring(redis.call('pttl', KEYS[i]))}
  end
end
local out = {1, reg()}
for i = 1, n do
  local FENCE = n + i
  if redis.call('get', KEYS[i]) == ARGV[1] then
    redis.call('pexpire', KEYS[i], ARGV[2])
  else
    redis.call('set', KEYS[i], ARGV[1], 'PX', ARGV[2])
  end
",
    mint_fence!("for j = 1, n do if redis.call('get', KEYS[j]) == ARGV[1] then redis.call('del', KEYS[j]) end end"),
    r"
  out[i + 2] = f
end
return out
"
);

/// Acquire a semaphore permit or a read lock: a member of a sorted set scored by
/// its expiry on the server's clock; expired members are purged first.
///
/// KEYS: holders, fence, then for a semaphore its max key, for a reader the
/// writer and the intent; then the expiry register (when ARGV[5] is `1`).
/// ARGV: token, expiry ms, fence ttl ms, max (semaphore) or 0 (reader), `1` to
/// read the expiry register.
/// Returns as `ACQUIRE_EXCLUSIVE`, plus `{3, stored max}` when the semaphore
/// exists with another permit count.
const ACQUIRE_SHARED: &str = concat!(
    "local FENCE, FTTL = 2, 3\n",
    register!(),
    r"
local kind = redis.call('type', KEYS[1])['ok']
if kind ~= 'zset' and kind ~= 'none' then return {2, kind} end
",
    now_ms!(),
    r"
redis.call('zremrangebyscore', KEYS[1], '-inf', nowms)
local ttl = tonumber(ARGV[2])
if redis.call('zscore', KEYS[1], ARGV[1]) then
  redis.call('zadd', KEYS[1], nowms + ttl, ARGV[1])
  if redis.call('pttl', KEYS[1]) < ttl then redis.call('pexpire', KEYS[1], ttl) end
",
    mint_fence!("redis.call('zrem', KEYS[1], ARGV[1])"),
    r"
  return {1, f, reg()}
end
local count = redis.call('zcard', KEYS[1])
local max = tonumber(ARGV[4])
if max > 0 then
  local stored = redis.pcall('get', KEYS[3])
  if type(stored) == 'string' and count > 0 and tonumber(stored) ~= max then return {3, stored} end
  if count >= max then
    local first = redis.call('zrange', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, tostring(math.max(1, tonumber(first[2]) - nowms)), reg()}
  end
else
  local wk = redis.call('type', KEYS[3])['ok']
  if wk ~= 'string' and wk ~= 'none' then return {2, wk} end
  local w = redis.call('pttl', KEYS[3])
  if w ~= -2 then return {0, tostring(w), reg()} end
  local i = redis.call('pttl', KEYS[4])
  if i > 0 then return {0, tostring(i), reg()} end
end
redis.call('zadd', KEYS[1], nowms + ttl, ARGV[1])
if redis.call('pttl', KEYS[1]) < ttl then redis.call('pexpire', KEYS[1], ttl) end
if max > 0 then redis.call('set', KEYS[3], ARGV[4], 'PX', redis.call('pttl', KEYS[1])) end
",
    mint_fence!("redis.call('zrem', KEYS[1], ARGV[1])"),
    "return {1, f, reg()}\n"
);

/// Adopt a detached lease: replace its token with a new one and extend it,
/// if it still holds the old token. The old token is void afterwards, so a
/// second adoption of the same lease fails.
///
/// KEYS: lock, then for a semaphore its count key. ARGV: kind (`s` string, `z`
/// sorted set, `m` semaphore), old token, new token, ttl ms.
const RETOKEN: &str = concat!(
    now_ms!(),
    r"
local kind, old, new, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if kind == 's' then
  if redis.pcall('get', KEYS[1]) ~= old then return 0 end
  redis.call('set', KEYS[1], new, 'PX', ttl)
  return 1
end
local score = redis.pcall('zscore', KEYS[1], old)
if type(score) ~= 'string' or tonumber(score) <= nowms then return 0 end
redis.call('zrem', KEYS[1], old)
redis.call('zadd', KEYS[1], nowms + ttl, new)
if redis.call('pttl', KEYS[1]) < ttl then redis.call('pexpire', KEYS[1], ttl) end
if kind == 'm' then redis.call('pexpire', KEYS[2], redis.call('pttl', KEYS[1])) end
return 1
"
);

/// Raises the expiry register (the longest lease expiry any locker with this
/// key prefix has used on this server, in ms) to at least `ARGV[1]`, and
/// returns it.
///
/// KEYS: the register. ARGV: expiry ms.
const REGISTER: &str = r"
local v = tonumber(redis.pcall('get', KEYS[1])) or 0
if v < tonumber(ARGV[1]) then
  v = tonumber(ARGV[1])
  redis.call('set', KEYS[1], ARGV[1])
end
return v
";

/// Release: compare-and-delete a string, or remove a live sorted-set member;
/// then wake waiters.
///
/// KEYS: lock, channel. ARGV: token, `s` (string) or `z` (sorted set).
const RELEASE: &str = concat!(
    r"
local ok = 0
if ARGV[2] == 'z' then
",
    now_ms!(),
    r"
  local score = redis.pcall('zscore', KEYS[1], ARGV[1])
  if type(score) == 'string' then
    redis.call('zrem', KEYS[1], ARGV[1])
    if tonumber(score) > nowms then ok = 1 end
  end
elseif redis.pcall('get', KEYS[1]) == ARGV[1] then
  redis.call('del', KEYS[1])
  ok = 1
end
if ok == 1 then redis.call('publish', KEYS[2], ARGV[1]) end
return ok
"
);

/// Lua that defines the line of a fair mutex: `nowms` (the server's clock),
/// `leave(token)` (drops a token's ticket; its entry in the line is skipped
/// when it comes first) and `first()` (drops the dead entries at the head of
/// the line and returns the first live one, as `ms, token`, or nil; `ms` is
/// what a handover sets the lock for: the ticket's life).
/// Expects `KEYS[LINE]` and `KEYS[TICKETS]`.
macro_rules! line {
    () => {
        concat!(
            now_ms!(),
            r"
local function leave(token)
  redis.call('zrem', KEYS[TICKETS], token)
end
local function first()
  while true do
    local entry = redis.call('lindex', KEYS[LINE], 0)
    if not entry then return nil end
    local px, token = string.match(entry, '^(%d+):(.*)$')
    local until_ms = token and redis.call('zscore', KEYS[TICKETS], token)
    if until_ms and tonumber(until_ms) > nowms then return px, token end
    redis.call('lpop', KEYS[LINE])
    if token then redis.call('zrem', KEYS[TICKETS], token) end
  end
end
"
        )
    };
}

/// Acquire a fair mutex: take it when it is free and this token is first in
/// line (or the line is empty); otherwise join the line, or keep this token's
/// place in it, with a ticket that lives `ARGV[4]` ms (`0`: do not join, a
/// single attempt).
///
/// KEYS: lock, fence, line, tickets, then the expiry register (when ARGV[5]
/// is `1`). ARGV: token, expiry ms, fence ttl ms, ticket ms, `1` to read the
/// register.
/// With nobody in line, a free lock is taken with `SET NX` first, as a plain
/// mutex is.
/// Returns `{1, fence, register}` when acquired (also when the lock already
/// holds our token: handed over by a release whose message was missed, or a
/// retried attempt; a new token is minted then), `{0, ms left, register,
/// fence counter}` when not, `{2, type}` for a key of
/// another type. The fencing counter in a refusal (created from the server's
/// clock if missing, as when minting) tells a waiter which handovers came
/// before it: a handover message with a token at most that is stale.
const ACQUIRE_FAIR: &str = concat!(
    "local FENCE, FTTL, LINE, TICKETS = 2, 3, 3, 4\n",
    register!(),
    r"
if redis.call('exists', KEYS[LINE]) == 0
  and redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
",
    mint_fence!("redis.call('del', KEYS[1])"),
    r"
  return {1, f, reg()}
end
",
    line!(),
    r"
local kind = redis.call('type', KEYS[1])['ok']
if kind ~= 'string' and kind ~= 'none' then return {2, kind} end
if kind == 'string' then
  if redis.call('get', KEYS[1]) == ARGV[1] then
    redis.call('pexpire', KEYS[1], ARGV[2])
    leave(ARGV[1])
",
    mint_fence!("redis.call('del', KEYS[1])"),
    r"
    return {1, f, reg()}
  end
else
  local _, head = first()
  if not head or head == ARGV[1] then
    redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
    if head then redis.call('lpop', KEYS[LINE]) end
    leave(ARGV[1])
",
    mint_fence!("redis.call('del', KEYS[1])"),
    r"
    return {1, f, reg()}
  end
end
if ARGV[4] ~= '0' then
  local ticket = tonumber(ARGV[4])
  if redis.call('zadd', KEYS[TICKETS], nowms + ticket, ARGV[1]) == 1 then
    -- A handover sets the lock for the ticket's life (the new owner's first
    -- renewal extends it): a waiter that died in line costs no more.
    redis.call('rpush', KEYS[LINE], ARGV[4] .. ':' .. ARGV[1])
  end
  -- The line outlives every live ticket; a waiter with a shorter ticket
  -- never shortens it.
  local keep = math.floor(ticket * 1.5)
  for i = LINE, TICKETS do
    if redis.call('pttl', KEYS[i]) < keep then redis.call('pexpire', KEYS[i], keep) end
  end
end
local seen = redis.call('get', KEYS[2])
if not seen then
  local t = redis.call('time')
  seen = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))
  redis.call('set', KEYS[2], seen, 'PX', ARGV[FTTL])
end
return {0, tostring(redis.call('pttl', KEYS[1])), reg(), seen}
"
);

/// Release a fair mutex, or give up a place in its line: drop the token's
/// ticket; if the lock holds the token, hand it to the first live ticket (set
/// to that token for its ticket's life, which its first renewal extends, with
/// a new fencing token, and publish `grant:<fence>:<token>`), or, with nobody
/// in line, delete it and
/// publish the released token.
///
/// KEYS: lock, channel, fence, line, tickets. ARGV: token, fence ttl ms.
/// Returns `0` (not ours), `1` (released) or `2` (handed over). With no line,
/// it is a plain mutex's release.
const RELEASE_FAIR: &str = concat!(
    "local FENCE, FTTL, LINE, TICKETS = 3, 2, 4, 5\n",
    r"
if redis.call('exists', KEYS[LINE]) == 0 then
  if redis.pcall('get', KEYS[1]) ~= ARGV[1] then return 0 end
  redis.call('del', KEYS[1])
  redis.call('publish', KEYS[2], ARGV[1])
  return 1
end
",
    line!(),
    r"
leave(ARGV[1])
if redis.pcall('get', KEYS[1]) ~= ARGV[1] then return 0 end
local px, heir = first()
if heir then
  redis.call('lpop', KEYS[LINE])
  leave(heir)
  redis.call('set', KEYS[1], heir, 'PX', px)
",
    mint_fence!("redis.call('del', KEYS[1])"),
    r"
  redis.call('publish', KEYS[2], 'grant:' .. f .. ':' .. heir)
  return 2
end
redis.call('del', KEYS[1])
redis.call('publish', KEYS[2], ARGV[1])
return 1
"
);

/// Release several mutexes of one acquisition at once: compare-and-delete
/// each, then wake each one's waiters.
///
/// KEYS: the N locks, then their N channels. ARGV: token.
/// Returns `1` or `0` per lock: released, or not ours (any more).
const RELEASE_ALL: &str = r"
local n = #KEYS / 2
local out = {}
for i = 1, n do
  out[i] = 0
  if redis.pcall('get', KEYS[i]) == ARGV[1] then
    redis.call('del', KEYS[i])
    out[i] = 1
  end
end
for i = 1, n do
  if out[i] == 1 then redis.call('publish', KEYS[n + i], ARGV[1]) end
end
return out
";

/// Extend a batch: compare-and-pexpire each string, or push each live
/// sorted-set member's expiry. A semaphore's permit count lives as long as its
/// permits (so a process with another count is refused while they are held).
///
/// KEYS: per lease its lock key, then for a semaphore (`m`) its count key.
/// ARGV: kind (`s` string, `z` sorted set, `m` semaphore), token, ttl ms, for
/// each lease in turn.
const EXTEND_MANY: &str = concat!(
    now_ms!(),
    r"
local out = {}
local k = 1
for i = 1, #ARGV / 3 do
  local kind, tok, ttl = ARGV[3 * i - 2], ARGV[3 * i - 1], tonumber(ARGV[3 * i])
  local key = KEYS[k]
  k = k + 1
  out[i] = 0
  if kind == 's' then
    if redis.pcall('get', key) == tok then
      redis.call('pexpire', key, ttl)
      out[i] = 1
    end
  else
    local score = redis.pcall('zscore', key, tok)
    if type(score) == 'string' and tonumber(score) > nowms then
      redis.call('zadd', key, 'XX', nowms + ttl, tok)
      if redis.call('pttl', key) < ttl then redis.call('pexpire', key, ttl) end
      out[i] = 1
    end
    if kind == 'm' then
      if out[i] == 1 then redis.call('pexpire', KEYS[k], redis.call('pttl', key)) end
      k = k + 1
    end
  end
end
return out
"
);

/// Count a semaphore's live holders, purging expired ones.
///
/// KEYS: holders.
const COUNT: &str = concat!(
    now_ms!(),
    r"
local kind = redis.call('type', KEYS[1])['ok']
if kind ~= 'zset' and kind ~= 'none' then return redis.error_reply('WRONGTYPE ' .. kind) end
redis.call('zremrangebyscore', KEYS[1], '-inf', nowms)
return redis.call('zcard', KEYS[1])
"
);

/// Raises a fencing counter to at least `ARGV[1]` (Redlock's write-back).
///
/// KEYS: fence. ARGV: floor, ttl ms.
const FENCE_FLOOR: &str = r"
local c = tonumber(redis.pcall('get', KEYS[1]) or '0') or 0
if c < tonumber(ARGV[1]) then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
";

/// Force-unlock: delete every holder of the name, then wake waiters.
///
/// KEYS: holder keys..., channel (last). ARGV: the message (unique per call).
const FORCE_UNLOCK: &str = r"
local n = 0
for i = 1, #KEYS - 1 do n = n + redis.call('del', KEYS[i]) end
redis.call('publish', KEYS[#KEYS], ARGV[1])
return n
";

/// Inspect: every holder of a lock name, of every kind, read without writing
/// (expired sorted-set members are skipped, not purged).
///
/// KEYS: mutex, semaphore, semaphore max, writer, readers, intent, fence.
/// Returns `{fence or false, max or false, role, token, ms left, ...}` where a
/// role is `m` (mutex), `p` (permit), `r` (reader), `w` (writer) or `i` (a
/// waiting writer's intent), and ms left is `-1` for a key without a TTL.
/// Keys of another type (not ours) are skipped.
const INSPECT: &str = concat!(
    now_ms!(),
    r"
local out = {redis.pcall('get', KEYS[7]), redis.pcall('get', KEYS[3])}
for i = 1, 2 do
  if type(out[i]) ~= 'string' then out[i] = false end
end
local function one(key, role)
  if redis.call('type', key)['ok'] == 'string' then
    local left = redis.call('pttl', key)
    if left ~= -2 then
      table.insert(out, role)
      table.insert(out, redis.call('get', key))
      table.insert(out, tostring(left))
    end
  end
end
local function many(key, role)
  if redis.call('type', key)['ok'] == 'zset' then
    local m = redis.call('zrangebyscore', key, '(' .. nowms, '+inf', 'WITHSCORES')
    for i = 1, #m, 2 do
      table.insert(out, role)
      table.insert(out, m[i])
      table.insert(out, string.format('%.0f', tonumber(m[i + 1]) - nowms))
    end
  end
end
one(KEYS[1], 'm')
many(KEYS[2], 'p')
one(KEYS[4], 'w')
many(KEYS[5], 'r')
one(KEYS[6], 'i')
return out
"
);

pub(super) struct Scripts {
    pub(super) exclusive: Script,
    pub(super) fair: Script,
    pub(super) all: Script,
    pub(super) shared: Script,
    /// The scripts that wake waiters, publishing with PUBLISH: one server,
    /// Sentinel, Redlock, and a cluster without sharded pub/sub.
    pub(super) publish: Wakers,
    /// The same with SPUBLISH: a cluster with sharded pub/sub, where the
    /// message stays on the shard that owns the lock's slot.
    pub(super) spublish: Wakers,
    pub(super) extend_many: Script,
    pub(super) count: Script,
    pub(super) fence_floor: Script,
    pub(super) register: Script,
    pub(super) retoken: Script,
    pub(super) inspect: Script,
}

/// The three scripts that publish a release message.
pub(super) struct Wakers {
    pub(super) release: Script,
    pub(super) release_fair: Script,
    pub(super) release_all: Script,
    pub(super) force_unlock: Script,
}

/// The scripts that publish, in the order of [`Wakers`]' fields.
const WAKERS: [&str; 4] = [RELEASE, RELEASE_FAIR, RELEASE_ALL, FORCE_UNLOCK];

/// `source` publishing with SPUBLISH instead of PUBLISH. The channel is one
/// of the script's keys, so it hashes to the slot the script runs on.
fn sharded(source: &str) -> String {
    source.replace("redis.call('publish',", "redis.call('spublish',")
}

impl Wakers {
    fn new(sources: [&str; 4]) -> Self {
        let [release, release_fair, release_all, force_unlock] = sources.map(Script::new);
        Wakers {
            release,
            release_fair,
            release_all,
            force_unlock,
        }
    }
}

pub(super) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    exclusive: Script::new(ACQUIRE_EXCLUSIVE),
    fair: Script::new(ACQUIRE_FAIR),
    all: Script::new(ACQUIRE_ALL),
    shared: Script::new(ACQUIRE_SHARED),
    publish: Wakers::new(WAKERS),
    spublish: Wakers::new(WAKERS.map(sharded).each_ref().map(String::as_str)),
    extend_many: Script::new(EXTEND_MANY),
    count: Script::new(COUNT),
    fence_floor: Script::new(FENCE_FLOOR),
    register: Script::new(REGISTER),
    retoken: Script::new(RETOKEN),
    inspect: Script::new(INSPECT),
});

/// Every script's source but the SPUBLISH variants, for [`preload`] (a unit
/// test checks that, with those, it names every script of [`SCRIPTS`]).
const SOURCES: [&str; 14] = [
    ACQUIRE_EXCLUSIVE,
    ACQUIRE_FAIR,
    ACQUIRE_ALL,
    ACQUIRE_SHARED,
    RELEASE,
    RELEASE_FAIR,
    RELEASE_ALL,
    EXTEND_MANY,
    COUNT,
    FENCE_FLOOR,
    FORCE_UNLOCK,
    REGISTER,
    RETOKEN,
    INSPECT,
];

/// Loads every script into the server's script cache in one round trip.
/// Otherwise a script's first use on a server costs two (`EVALSHA`, refused,
/// then the script itself): over a slow link, enough for a first renewal to
/// time out and a lease to be lost for nothing. (Only one server's
/// connections are checked this way: a cluster, the one user of the SPUBLISH
/// forms, loads its scripts on first use.)
pub(super) async fn preload(conn: &mut super::Conn) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    for source in SOURCES {
        pipe.cmd("SCRIPT").arg("LOAD").arg(source).ignore();
    }
    pipe.query_async(conn).await
}

/// The acquire invocation for a kind of lock; with `register`, the script
/// also returns the expiry register's value.
pub(super) fn acquire_invocation<'a>(
    req: Request<'_>,
    register: Option<&str>,
) -> redis::ScriptInvocation<'a> {
    let Request {
        keys,
        token,
        expiry,
        intent,
        ticket,
    } = req;
    let px = millis(expiry);
    if keys.fair() {
        let mut inv = SCRIPTS.fair.prepare_invoke();
        inv.key(&keys.lock)
            .key(&keys.fence)
            .key(&keys.line)
            .key(&keys.tickets);
        if let Some(register) = register {
            inv.key(register);
        }
        inv.arg(token)
            .arg(px)
            .arg(FENCE_TTL_MS)
            // Zero, not `millis`'s smallest 1 ms: a single attempt never
            // joins the line (a ticket would be handed the lock by a release
            // within that millisecond, with nobody waiting to take it).
            .arg(if ticket.is_zero() { 0 } else { millis(ticket) })
            .arg(if register.is_some() { "1" } else { "0" });
        return inv;
    }
    let (script, extra, fourth) = match keys.kind {
        LockKind::Mutex => (&SCRIPTS.exclusive, [None, None], 0),
        LockKind::Write => (
            &SCRIPTS.exclusive,
            [Some(&keys.aux), Some(&keys.intent)],
            millis(intent),
        ),
        LockKind::Semaphore { max } => (&SCRIPTS.shared, [Some(&keys.aux), None], u64::from(max)),
        LockKind::Read => (&SCRIPTS.shared, [Some(&keys.aux), Some(&keys.intent)], 0),
    };
    let mut inv = script.prepare_invoke();
    inv.key(&keys.lock).key(&keys.fence);
    for k in extra.into_iter().flatten() {
        inv.key(k);
    }
    if let Some(register) = register {
        inv.key(register);
    }
    inv.arg(token)
        .arg(px)
        .arg(FENCE_TTL_MS)
        .arg(fourth)
        .arg(if register.is_some() { "1" } else { "0" });
    inv
}

/// The fencing counter a fair mutex's refusal reports (`0` otherwise).
pub(super) fn parse_seen(reply: &[Value]) -> u64 {
    reply
        .get(3)
        .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The release invocation for a lock: a fair mutex's also hands the lock to
/// the first in line.
pub(super) fn release_invocation<'a>(
    wakers: &'a Wakers,
    keys: &Keys,
    token: &str,
) -> redis::ScriptInvocation<'a> {
    if keys.fair() {
        let mut inv = wakers.release_fair.prepare_invoke();
        inv.key(&keys.lock)
            .key(&keys.channel)
            .key(&keys.fence)
            .key(&keys.line)
            .key(&keys.tickets)
            .arg(token)
            .arg(FENCE_TTL_MS);
        return inv;
    }
    let mut inv = wakers.release.prepare_invoke();
    inv.key(&keys.lock)
        .key(&keys.channel)
        .arg(token)
        .arg(kind_flag(keys.kind.shared()));
    inv
}

pub(super) fn kind_flag(shared: bool) -> &'static str {
    if shared {
        "z"
    } else {
        "s"
    }
}

pub(super) fn parse_attempt(keys: &Keys, reply: &[Value]) -> Result<Attempt> {
    let bad = || Error::Redis {
        source: format!("unexpected acquire reply: {reply:?}").into(),
    };
    let code: i64 = reply
        .first()
        .and_then(|v| redis::from_redis_value_ref(v).ok())
        .ok_or_else(bad)?;
    let text: String = reply
        .get(1)
        .and_then(|v| redis::from_redis_value_ref(v).ok())
        .ok_or_else(bad)?;
    match code {
        1 => text
            .parse()
            .map(|fence| Attempt::Acquired { fence })
            .map_err(|_| bad()),
        0 => {
            let pttl: i64 = text.parse().map_err(|_| bad())?;
            let ttl = u64::try_from(pttl).ok().map(Duration::from_millis);
            Ok(Attempt::Held { ttl })
        }
        2 => Err(Error::WrongType {
            key: crate::error::shorten(&keys.name),
            found: text,
        }),
        3 => Err(Error::config(format!(
            "semaphore `{}` exists with {text} permits, not {}",
            crate::error::shorten(&keys.name),
            match keys.kind {
                LockKind::Semaphore { max } => max,
                _ => 0,
            }
        ))),
        _ => Err(bad()),
    }
}

/// The all-or-none invocation of `ACQUIRE_ALL` for several mutexes; with
/// `register`, the script also returns the expiry register's value.
pub(super) fn acquire_all_invocation<'a>(
    locks: &[Keys],
    token: &str,
    expiry: Duration,
    register: Option<&str>,
) -> redis::ScriptInvocation<'a> {
    let mut inv = SCRIPTS.all.prepare_invoke();
    for keys in locks {
        inv.key(&keys.lock);
    }
    for keys in locks {
        inv.key(&keys.fence);
    }
    if let Some(register) = register {
        inv.key(register);
    }
    inv.arg(token)
        .arg(millis(expiry))
        .arg(FENCE_TTL_MS)
        .arg(locks.len())
        .arg(if register.is_some() { "1" } else { "0" });
    inv
}

/// Reads an `ACQUIRE_ALL` reply.
pub(super) fn parse_all(locks: &[Keys], reply: &[Value]) -> Result<AttemptAll> {
    let bad = || Error::Redis {
        source: format!("unexpected acquire reply: {reply:?}").into(),
    };
    let int = |i: usize| -> Option<i64> {
        reply
            .get(i)
            .and_then(|v| redis::from_redis_value_ref::<i64>(v).ok())
    };
    let text = |i: usize| -> Option<String> {
        reply
            .get(i)
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
    };
    // Lua's indexes count from 1.
    let index = |i: usize| -> Result<usize> {
        int(i)
            .and_then(|n| usize::try_from(n).ok())
            .and_then(|n| n.checked_sub(1))
            .filter(|n| *n < locks.len())
            .ok_or_else(bad)
    };
    match int(0).ok_or_else(bad)? {
        1 => {
            let fences = (0..locks.len())
                .map(|i| text(i + 2).and_then(|t| t.parse().ok()).ok_or_else(bad))
                .collect::<Result<Vec<u64>>>()?;
            Ok(AttemptAll::Acquired { fences })
        }
        0 => {
            let index = index(2)?;
            let pttl: i64 = text(3).and_then(|t| t.parse().ok()).ok_or_else(bad)?;
            let ttl = u64::try_from(pttl).ok().map(Duration::from_millis);
            Ok(AttemptAll::Held { index, ttl })
        }
        2 => {
            let index = index(2)?;
            Err(Error::WrongType {
                key: crate::error::shorten(&locks[index].name),
                found: text(1).ok_or_else(bad)?,
            })
        }
        _ => Err(bad()),
    }
}

/// Reads an inspection reply (see `INSPECT`).
pub(super) fn parse_snapshot(reply: &[Value]) -> Result<Snapshot> {
    let bad = || Error::Redis {
        source: "unexpected inspection reply".into(),
    };
    let text = |v: &Value| -> Option<String> { redis::from_redis_value_ref(v).ok() };
    let number = |i: usize| -> Result<Option<u64>> {
        match reply.get(i) {
            None => Err(bad()),
            Some(Value::Nil) => Ok(None),
            // A value we did not write (not a number): nothing to report.
            Some(v) => Ok(text(v).and_then(|t| t.parse().ok())),
        }
    };
    let fence = number(0)?;
    let permits = number(1)?.and_then(|m| u32::try_from(m).ok());
    let mut snapshot = Snapshot {
        holders: Vec::new(),
        intent: None,
        fence,
        permits,
    };
    for entry in reply.get(2..).unwrap_or_default().chunks(3) {
        let [role, token, left] = entry else {
            return Err(bad());
        };
        let (role, token, left) = (
            text(role).ok_or_else(bad)?,
            text(token).ok_or_else(bad)?,
            text(left).ok_or_else(bad)?,
        );
        let left: i64 = left.parse().map_err(|_| bad())?;
        let ttl = u64::try_from(left).ok().map(Duration::from_millis);
        let (role, intent) = match role.as_str() {
            "m" => (Role::Mutex, false),
            "p" => (Role::Permit, false),
            "r" => (Role::Reader, false),
            "w" => (Role::Writer, false),
            "i" => (Role::Writer, true),
            _ => return Err(bad()),
        };
        let holder = RawHolder { role, token, ttl };
        if intent {
            snapshot.intent = Some(holder);
        } else {
            snapshot.holders.push(holder);
        }
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preload_loads_every_script() {
        let loaded: Vec<String> = SOURCES
            .iter()
            .map(|s| Script::new(s).get_hash().to_owned())
            .chain(
                WAKERS
                    .iter()
                    .map(|s| Script::new(&sharded(s)).get_hash().to_owned()),
            )
            .collect();
        // No `..`: a new script is a compile error here until it is listed.
        let Scripts {
            exclusive,
            fair,
            all,
            shared,
            publish,
            spublish,
            extend_many,
            count,
            fence_floor,
            register,
            retoken,
            inspect,
        } = &*SCRIPTS;
        for (name, script) in [
            ("exclusive", exclusive),
            ("fair", fair),
            ("all", all),
            ("shared", shared),
            ("release", &publish.release),
            ("release_fair", &publish.release_fair),
            ("release_all", &publish.release_all),
            ("force_unlock", &publish.force_unlock),
            ("sharded release", &spublish.release),
            ("sharded release_fair", &spublish.release_fair),
            ("sharded release_all", &spublish.release_all),
            ("sharded force_unlock", &spublish.force_unlock),
            ("extend_many", extend_many),
            ("count", count),
            ("fence_floor", fence_floor),
            ("register", register),
            ("retoken", retoken),
            ("inspect", inspect),
        ] {
            assert!(
                loaded.iter().any(|h| h == script.get_hash()),
                "{name} is not in SOURCES"
            );
        }
        assert_ne!(publish.release.get_hash(), spublish.release.get_hash());
        for source in WAKERS {
            assert!(sharded(source).contains("redis.call('spublish',"));
            assert!(!sharded(source).contains("redis.call('publish',"));
        }
    }

    fn keys(kind: LockKind) -> Keys {
        Keys::new("t:", "job", kind).unwrap_or_else(|e| panic!("{e}"))
    }

    fn reply(code: i64, text: &str) -> Vec<Value> {
        vec![
            Value::Int(code),
            Value::BulkString(text.as_bytes().to_vec()),
        ]
    }

    #[test]
    fn a_grant_carries_its_fencing_token() {
        let got = parse_attempt(&keys(LockKind::Mutex), &reply(1, "1800000000000001"));
        assert!(matches!(
            got,
            Ok(Attempt::Acquired {
                fence: 1_800_000_000_000_001
            })
        ));
        // Tokens use the whole u64 range; beyond it the reply is an error.
        let max = u64::MAX.to_string();
        let got = parse_attempt(&keys(LockKind::Mutex), &reply(1, &max));
        assert!(matches!(got, Ok(Attempt::Acquired { fence: u64::MAX })));
        let over = "18446744073709551616";
        assert!(matches!(
            parse_attempt(&keys(LockKind::Mutex), &reply(1, over)),
            Err(Error::Redis { .. })
        ));
    }

    #[test]
    fn a_held_lock_says_how_long_it_has_left_when_the_server_knows() {
        let got = parse_attempt(&keys(LockKind::Mutex), &reply(0, "250"));
        assert!(
            matches!(got, Ok(Attempt::Held { ttl: Some(d) }) if d == Duration::from_millis(250))
        );
        // PTTL answers -1 for a key without expiry: held, time unknown.
        let got = parse_attempt(&keys(LockKind::Mutex), &reply(0, "-1"));
        assert!(matches!(got, Ok(Attempt::Held { ttl: None })));
    }

    #[test]
    fn other_types_and_other_permit_counts_are_named() {
        let got = parse_attempt(&keys(LockKind::Mutex), &reply(2, "list"));
        assert!(matches!(got, Err(Error::WrongType { ref found, .. }) if found == "list"));
        let got = parse_attempt(&keys(LockKind::Semaphore { max: 3 }), &reply(3, "5"));
        assert!(
            matches!(got, Err(Error::Config { message: ref m, .. }) if m.contains("5 permits, not 3")),
            "{got:?}"
        );
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let k = keys(LockKind::Mutex);
        for bad in [
            vec![],
            vec![Value::Int(1)],
            reply(1, "not a number"),
            reply(0, "soon"),
            reply(7, "1"),
            vec![Value::Nil, Value::Nil],
        ] {
            assert!(
                matches!(parse_attempt(&k, &bad), Err(Error::Redis { .. })),
                "{bad:?}"
            );
        }
    }
}
