//! The Redis backend: owner-checked Lua scripts over a few multiplexed connections
//! that stay checked out of the pool, plus one pub/sub connection for wake-ups.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use deadpool_redis::{Pool, PoolError};
use futures_util::StreamExt;
use redis::{RedisError, Script, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::conn::{AnyPool, Checked, Conn};
use super::{Attempt, Renewal};
use crate::error::{Error, Result};
use crate::key::{Keys, Kind};
use crate::notify::{Hub, SubCmd, Subscription};

/// How long the fencing counter outlives its creation. When it expires (or Redis
/// restarts empty) it starts again from the server's clock, so a token never
/// repeats.
const FENCE_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

/// Lua that mints the next fencing token into `f`: one more than the counter.
/// A counter that does not exist (first use, expired, or lost in a restart)
/// starts from the server's clock in microseconds, with a TTL, so tokens keep
/// increasing across its loss: one acquisition per microsecond for the
/// counter's 7 days would be needed to overtake the clock.
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
  if f == 1 then
    local t = redis.call('time')
    f = tonumber(t[1]) * 1000000 + tonumber(t[2])
    redis.call('set', KEYS[FENCE], string.format('%.0f', f), 'PX', ARGV[FTTL])
  end
  f = string.format('%.0f', f)
"
        )
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
/// KEYS: lock, fence, readers (write side only), intent (write side only).
/// ARGV: token, expiry ms, fence ttl ms, intent ms (write side only).
/// Returns `{1, fence}` when acquired (also when the key already holds our token:
/// a retried attempt), `{0, ms left}` when held, `{2, type}` for a key of another
/// type.
///
/// A mutex tries `SET NX` first: an uncontended acquisition is two commands
/// (`SET`, `INCR`). `SET NX` leaves a key of any type alone.
const ACQUIRE_EXCLUSIVE: &str = concat!(
    "local FENCE, FTTL = 2, 3\n",
    r"
if #KEYS == 2 and redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
",
    mint_fence!("redis.call('del', KEYS[1])"),
    r"
  return {1, f}
end
local kind = redis.call('type', KEYS[1])['ok']
if kind ~= 'string' and kind ~= 'none' then return {2, kind} end
if kind == 'string' then
  if redis.call('get', KEYS[1]) == ARGV[1] then
    redis.call('pexpire', KEYS[1], ARGV[2])
    return {1, redis.call('get', KEYS[2]) or '0'}
  end
  return {0, tostring(redis.call('pttl', KEYS[1]))}
end
if #KEYS == 4 then
  local rk = redis.call('type', KEYS[3])['ok']
  if rk ~= 'zset' and rk ~= 'none' then return {2, rk} end
",
    now_ms!(),
    r"
  redis.call('zremrangebyscore', KEYS[3], '-inf', nowms)
  local first = redis.call('zrange', KEYS[3], 0, 0, 'WITHSCORES')
  if #first > 0 then
    redis.call('set', KEYS[4], ARGV[1], 'PX', ARGV[4])
    return {0, tostring(math.max(1, tonumber(first[2]) - nowms))}
  end
end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
if #KEYS == 4 and redis.call('get', KEYS[4]) == ARGV[1] then redis.call('del', KEYS[4]) end
",
    mint_fence!("redis.call('del', KEYS[1])"),
    "return {1, f}\n"
);

/// Acquire a semaphore permit or a read lock: a member of a sorted set scored by
/// its expiry on the server's clock; expired members are purged first.
///
/// KEYS: holders, fence, then for a semaphore its max key, for a reader the
/// writer and the intent.
/// ARGV: token, expiry ms, fence ttl ms, max (semaphore) or 0 (reader).
/// Returns as `ACQUIRE_EXCLUSIVE`, plus `{3, stored max}` when the semaphore
/// exists with another permit count.
const ACQUIRE_SHARED: &str = concat!(
    "local FENCE, FTTL = 2, 3\n",
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
  return {1, redis.call('get', KEYS[2]) or '0'}
end
local count = redis.call('zcard', KEYS[1])
local max = tonumber(ARGV[4])
if max > 0 then
  local stored = redis.pcall('get', KEYS[3])
  if type(stored) == 'string' and count > 0 and tonumber(stored) ~= max then return {3, stored} end
  if count >= max then
    local first = redis.call('zrange', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, tostring(math.max(1, tonumber(first[2]) - nowms))}
  end
else
  local wk = redis.call('type', KEYS[3])['ok']
  if wk ~= 'string' and wk ~= 'none' then return {2, wk} end
  local w = redis.call('pttl', KEYS[3])
  if w ~= -2 then return {0, tostring(w)} end
  local i = redis.call('pttl', KEYS[4])
  if i > 0 then return {0, tostring(i)} end
end
redis.call('zadd', KEYS[1], nowms + ttl, ARGV[1])
if redis.call('pttl', KEYS[1]) < ttl then redis.call('pexpire', KEYS[1], ttl) end
if max > 0 then redis.call('set', KEYS[3], ARGV[4], 'PX', redis.call('pttl', KEYS[1])) end
",
    mint_fence!("redis.call('zrem', KEYS[1], ARGV[1])"),
    "return {1, f}\n"
);

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

/// Extend a batch: compare-and-pexpire each string, or push each live
/// sorted-set member's expiry.
///
/// KEYS: lock keys. ARGV: kind (`s`/`z`), token, ttl ms, for each key in turn.
const EXTEND_MANY: &str = concat!(
    now_ms!(),
    r"
local out = {}
for i = 1, #KEYS do
  local kind, tok, ttl = ARGV[3 * i - 2], ARGV[3 * i - 1], tonumber(ARGV[3 * i])
  out[i] = 0
  if kind == 'z' then
    local score = redis.pcall('zscore', KEYS[i], tok)
    if type(score) == 'string' and tonumber(score) > nowms then
      redis.call('zadd', KEYS[i], 'XX', nowms + ttl, tok)
      if redis.call('pttl', KEYS[i]) < ttl then redis.call('pexpire', KEYS[i], ttl) end
      out[i] = 1
    end
  elseif redis.pcall('get', KEYS[i]) == tok then
    redis.call('pexpire', KEYS[i], ttl)
    out[i] = 1
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

struct Scripts {
    exclusive: Script,
    shared: Script,
    release: Script,
    extend_many: Script,
    count: Script,
    fence_floor: Script,
    force_unlock: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    exclusive: Script::new(ACQUIRE_EXCLUSIVE),
    shared: Script::new(ACQUIRE_SHARED),
    release: Script::new(RELEASE),
    extend_many: Script::new(EXTEND_MANY),
    count: Script::new(COUNT),
    fence_floor: Script::new(FENCE_FLOOR),
    force_unlock: Script::new(FORCE_UNLOCK),
});

/// The acquire invocation for a kind of lock.
fn acquire_invocation<'a>(
    keys: &Keys,
    token: &str,
    expiry: Duration,
    intent: Duration,
) -> redis::ScriptInvocation<'a> {
    let px = millis(expiry);
    match keys.kind {
        Kind::Mutex => {
            let mut inv = SCRIPTS.exclusive.prepare_invoke();
            inv.key(&keys.lock)
                .key(&keys.fence)
                .arg(token)
                .arg(px)
                .arg(FENCE_TTL_MS);
            inv
        }
        Kind::Write => {
            let mut inv = SCRIPTS.exclusive.prepare_invoke();
            inv.key(&keys.lock)
                .key(&keys.fence)
                .key(&keys.aux)
                .key(&keys.intent)
                .arg(token)
                .arg(px)
                .arg(FENCE_TTL_MS)
                .arg(millis(intent));
            inv
        }
        Kind::Semaphore { max } => {
            let mut inv = SCRIPTS.shared.prepare_invoke();
            inv.key(&keys.lock)
                .key(&keys.fence)
                .key(&keys.aux)
                .arg(token)
                .arg(px)
                .arg(FENCE_TTL_MS)
                .arg(max);
            inv
        }
        Kind::Read => {
            let mut inv = SCRIPTS.shared.prepare_invoke();
            inv.key(&keys.lock)
                .key(&keys.fence)
                .key(&keys.aux)
                .key(&keys.intent)
                .arg(token)
                .arg(px)
                .arg(FENCE_TTL_MS)
                .arg(0);
            inv
        }
    }
}

fn kind_flag(shared: bool) -> &'static str {
    if shared {
        "z"
    } else {
        "s"
    }
}

/// The largest batch of renewals sent in one script call.
pub(crate) const MAX_BATCH: usize = 1000;

/// Connection settings the backend needs at run time.
#[derive(Debug, Clone)]
pub(crate) struct RedisSettings {
    /// How many multiplexed connections stay checked out.
    pub(crate) connections: usize,
    /// The longest one request may take.
    pub(crate) op_timeout: Duration,
    /// The longest connecting may take.
    pub(crate) connect_timeout: Duration,
    /// After each acquire and renewal, wait for this many replicas to
    /// acknowledge the write (`WAIT`), for up to this long.
    pub(crate) wait_replicas: Option<(u32, Duration)>,
    /// The locker's default lease expiry: the shortest restart quarantine, even
    /// for a locker that had not acquired anything before the restart.
    pub(crate) lease_expiry: Duration,
    /// False for a pool the application handed in: closing the locker returns
    /// its connections to that pool and leaves it open.
    pub(crate) owns_pool: bool,
}

struct Shared {
    pool: AnyPool,
    slots: Box<[Mutex<Option<Checked>>]>,
    /// One checkout per empty slot at a time: callers that find the slot empty
    /// wait for it instead of each opening a connection.
    refills: Box<[tokio::sync::Mutex<()>]>,
    next: AtomicUsize,
    settings: RedisSettings,
    hub: Arc<Hub>,
    /// The pub/sub task, started on first use (it needs a runtime).
    pubsub: Mutex<Option<(PubSubSource, mpsc::UnboundedReceiver<SubCmd>)>>,
    shutdown: CancellationToken,
    identity: Mutex<Identity>,
    /// Sentinel mode: the client that watches for `+switch-master`, and the
    /// master's name; taken when the watcher starts.
    watcher: Mutex<Option<(redis::sentinel::SentinelClient, String)>>,
    /// The longest lease expiry granted through this backend, in ms.
    longest_expiry_ms: AtomicU64,
}

/// Where the pub/sub connection goes.
pub(crate) enum PubSubSource {
    /// These nodes, in turn (one server, or a cluster's seeds).
    Nodes(Vec<redis::Client>),
    /// The master Sentinel names now.
    Sentinel(Box<tokio::sync::Mutex<redis::sentinel::SentinelClient>>),
}

impl PubSubSource {
    /// A client for the `attempt`th connection.
    async fn client(&self, attempt: usize) -> Option<redis::Client> {
        match self {
            PubSubSource::Nodes(nodes) => nodes.get(attempt % nodes.len().max(1)).cloned(),
            PubSubSource::Sentinel(s) => s.lock().await.async_get_client().await.ok(),
        }
    }
}

/// What the backend knows of the server it talks to. A new `run_id` on a new
/// connection means the server restarted, and may have lost every lock (no
/// persistence): acquisitions then wait until every lease granted before the
/// restart has expired, so that no old holder can still believe it holds a key
/// a new owner takes. (Its renewals fail at once, so it learns within one
/// renewal period; this closes the gap before that.)
#[derive(Debug, Default)]
struct Identity {
    run_id: Option<String>,
    quarantine_until: Option<Instant>,
}

/// One Redis server (or a Sentinel-managed master) reached through a pool.
#[derive(Clone)]
pub(crate) struct RedisBackend {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("pool_size", &self.shared.pool.size())
            .field("cluster", &self.shared.pool.is_cluster())
            .field("connections", &self.shared.settings.connections)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Wraps a pool. `pubsub` is the client for the wake-up connection; without it,
    /// waiters poll with backoff.
    pub(crate) fn new(pool: Pool, pubsub: Option<redis::Client>, settings: RedisSettings) -> Self {
        match pubsub {
            Some(client) => {
                let (hub, mut rxs) = Hub::remote(1, 1);
                let feed = rxs.pop().map(|rx| (PubSubSource::Nodes(vec![client]), rx));
                RedisBackend::with_hub(AnyPool::Single(pool), feed, hub, settings)
            }
            None => RedisBackend::with_hub(AnyPool::Single(pool), None, Hub::absent(), settings),
        }
    }

    /// Wraps a pool whose pub/sub connection (if any) feeds a hub shared with
    /// other servers (Redlock).
    /// A Redis Cluster through its pool. Scripts go to the node owning their
    /// keys' slot; wake-ups use plain PUBLISH, which a cluster delivers to
    /// subscribers on every node, so the pub/sub connection may use any node
    /// (the task moves to the next one when a node fails).
    pub(crate) fn cluster(
        pool: deadpool_redis::cluster::Pool,
        nodes: Vec<redis::Client>,
        settings: RedisSettings,
    ) -> Self {
        let (hub, mut rxs) = Hub::remote(1, 1);
        let feed = rxs.pop().map(|rx| (PubSubSource::Nodes(nodes), rx));
        RedisBackend::with_hub(AnyPool::Cluster(pool), feed, hub, settings)
    }

    /// The master named by Sentinel, found again after a failover (a connection
    /// that answers READONLY, from a demoted master, is discarded).
    pub(crate) fn sentinel(
        pool: deadpool_redis::sentinel::Pool,
        pubsub: redis::sentinel::SentinelClient,
        watcher: redis::sentinel::SentinelClient,
        master: String,
        settings: RedisSettings,
    ) -> Self {
        let (hub, mut rxs) = Hub::remote(1, 1);
        let source = PubSubSource::Sentinel(Box::new(tokio::sync::Mutex::new(pubsub)));
        let feed = rxs.pop().map(|rx| (source, rx));
        let backend = RedisBackend::with_hub(AnyPool::Sentinel(pool), feed, hub, settings);
        *backend
            .shared
            .watcher
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((watcher, master));
        backend
    }

    /// The master moved: drop every connection to the old one (checked out or
    /// idle) and move the pub/sub connection. New connections go to the master
    /// Sentinel names now (and the new `run_id` starts the restart quarantine:
    /// writes the old master took after the switch are gone).
    fn master_moved(&self) {
        for i in 0..self.shared.slots.len() {
            self.discard(i);
        }
        self.shared.pool.drop_idle();
        self.shared.hub.reconnect();
    }

    /// Starts the `+switch-master` watcher, once, in Sentinel mode.
    fn start_watcher(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let taken = self
            .shared
            .watcher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((client, master)) = taken {
            rt.spawn(watch_sentinel(self.clone(), client, master));
        }
    }

    /// One server of a Redlock: its pub/sub connection feeds the shared hub.
    pub(crate) fn member(
        pool: Pool,
        client: redis::Client,
        feed: mpsc::UnboundedReceiver<SubCmd>,
        hub: Arc<Hub>,
        settings: RedisSettings,
    ) -> Self {
        RedisBackend::with_hub(
            AnyPool::Single(pool),
            Some((PubSubSource::Nodes(vec![client]), feed)),
            hub,
            settings,
        )
    }

    fn with_hub(
        pool: AnyPool,
        pubsub: Option<(PubSubSource, mpsc::UnboundedReceiver<SubCmd>)>,
        hub: Arc<Hub>,
        settings: RedisSettings,
    ) -> Self {
        let slots = (0..settings.connections.max(1))
            .map(|_| Mutex::new(None))
            .collect();
        let refills = (0..settings.connections.max(1))
            .map(|_| tokio::sync::Mutex::new(()))
            .collect();
        let least_quarantine = millis(settings.lease_expiry);
        RedisBackend {
            shared: Arc::new(Shared {
                pool,
                slots,
                refills,
                next: AtomicUsize::new(0),
                settings,
                hub,
                pubsub: Mutex::new(pubsub),
                shutdown: CancellationToken::new(),
                identity: Mutex::default(),
                watcher: Mutex::new(None),
                longest_expiry_ms: AtomicU64::new(least_quarantine),
            }),
        }
    }

    pub(crate) fn shutdown(&self) {
        self.shared.shutdown.cancel();
        for slot in self.shared.slots.iter() {
            drop(slot.lock().unwrap_or_else(PoisonError::into_inner).take());
        }
        if self.shared.settings.owns_pool {
            self.shared.pool.close();
        }
    }

    /// Checks out one connection (which asks the server for its identity),
    /// proving the server is reachable and the credentials are right. Returns
    /// the server's `run_id` when the user may read it.
    pub(crate) async fn verify(&self) -> Result<Option<String>> {
        self.start_watcher();
        if self.shared.pool.is_cluster() {
            let _: String = self
                .call("PING", |mut c| async move {
                    redis::cmd("PING").query_async(&mut c).await
                })
                .await?;
            return Ok(None);
        }
        self.conn().await?;
        let id = self
            .shared
            .identity
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(id.run_id.clone())
    }

    /// A connection from the round-robin slots, checking one out of the pool if
    /// the slot is empty.
    async fn conn(&self) -> Result<(usize, Conn)> {
        let i = self.shared.next.fetch_add(1, Ordering::Relaxed) % self.shared.slots.len();
        self.conn_at(i).await
    }

    /// The connection in slot `i`, checking one out of the pool if it is empty.
    async fn conn_at(&self, i: usize) -> Result<(usize, Conn)> {
        if self.shared.shutdown.is_cancelled() {
            return Err(Error::Closed);
        }
        if let Some(c) = self.filled(i) {
            return Ok((i, c));
        }
        // Boxed: checking out and identifying a connection takes futures of
        // several kilobytes, which would otherwise sit inside every operation's
        // future (and be copied with it) for a path taken once per connection.
        Box::pin(self.refill(i)).await
    }

    /// The connection in slot `i`, if the slot holds one.
    fn filled(&self, i: usize) -> Option<Conn> {
        self.shared.slots[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(Checked::conn)
    }

    /// Fills the empty slot `i` from the pool.
    async fn refill(&self, i: usize) -> Result<(usize, Conn)> {
        let s = &self.shared;
        let no_connection = || Error::Unavailable {
            context: format!(
                "no connection within {}",
                crate::options::fmt(s.settings.connect_timeout)
            ),
            source: None,
        };
        // After a fault every caller finds the slot empty at once: one checks a
        // connection out, the others wait for it (within the same bound).
        let deadline = tokio::time::Instant::now() + s.settings.connect_timeout;
        let _refill = tokio::time::timeout_at(deadline, s.refills[i].lock())
            .await
            .map_err(|_| no_connection())?;
        if let Some(c) = self.filled(i) {
            return Ok((i, c));
        }
        let obj = tokio::time::timeout_at(deadline, s.pool.get())
            .await
            .map_err(|_| no_connection())?
            .map_err(pool_error)?;
        let mut conn = obj.conn();
        if !s.pool.is_cluster() {
            // A cluster answers INFO from any node: no single identity to track.
            self.check_identity(&mut conn).await?;
        }
        *s.slots[i].lock().unwrap_or_else(PoisonError::into_inner) = Some(obj);
        Ok((i, conn))
    }

    /// Learns the server's `run_id` on a new connection; a change starts the
    /// restart quarantine (see [`Identity`]).
    async fn check_identity(&self, conn: &mut Conn) -> Result<()> {
        let s = &self.shared;
        let info = tokio::time::timeout(
            s.settings.op_timeout,
            redis::cmd("INFO").arg("server").query_async::<String>(conn),
        )
        .await
        .map_err(|_| self.timed_out("INFO"))?;
        let info = match info {
            Ok(info) => info,
            // An ACL user without INFO cannot detect restarts; everything else works.
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {
                tracing::debug!("INFO not permitted: server restarts cannot be detected");
                return Ok(());
            }
            Err(e) => return Err(Error::from_redis("INFO", e)),
        };
        let Some(run_id) = info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|r| r.trim().to_owned())
        else {
            return Ok(());
        };
        let mut id = s.identity.lock().unwrap_or_else(PoisonError::into_inner);
        if id.run_id.as_deref().is_some_and(|known| known != run_id) {
            let wait = Duration::from_millis(s.longest_expiry_ms.load(Ordering::Relaxed));
            tracing::warn!(
                wait_ms = wait.as_millis() as u64,
                "redis restarted (new run_id): acquisitions wait until leases granted before the restart have expired"
            );
            id.quarantine_until = Some(Instant::now() + wait);
        }
        id.run_id = Some(run_id);
        Ok(())
    }

    /// How long acquisitions must still wait after a server restart.
    fn quarantine(&self) -> Option<Duration> {
        let id = self
            .shared
            .identity
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let until = id.quarantine_until?;
        let now = Instant::now();
        (until > now).then(|| until - now)
    }

    /// Returns a broken connection to the pool (which recycles or discards it).
    fn invalidate(&self, i: usize) {
        let old = self.shared.slots[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(old);
    }

    /// Drops a connection to a server that is no longer the master for good.
    fn discard(&self, i: usize) {
        let old = self.shared.slots[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(old) = old {
            old.discard();
        }
    }

    /// After an error on slot `i`: drop what cannot serve again.
    fn after_error(&self, i: usize, e: &RedisError) {
        if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly) {
            self.discard(i);
        } else if is_connection_error(e) {
            self.invalidate(i);
        }
    }

    fn timed_out(&self, what: &str) -> Error {
        Error::Unavailable {
            context: format!(
                "{what} got no reply within {}",
                crate::options::fmt(self.shared.settings.op_timeout)
            ),
            source: None,
        }
    }

    /// Runs an idempotent request, retrying once on a fresh connection when the
    /// connection itself failed.
    async fn call<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let mut tries = 0;
        let mut retry_slot = None;
        loop {
            tries += 1;
            let (i, conn) = match retry_slot {
                // The slot was emptied: this checks out a fresh connection. Another
                // slot's connection may be just as stale (after a server restart).
                Some(i) => self.conn_at(i).await?,
                None => self.conn().await?,
            };
            match tokio::time::timeout(self.shared.settings.op_timeout, f(conn)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => {
                    self.after_error(i, &e);
                    if !retryable(&e) || tries >= 2 {
                        return Err(Error::from_redis(what, e));
                    }
                    retry_slot = Some(i);
                }
                Err(_) => {
                    self.invalidate(i);
                    return Err(self.timed_out(what));
                }
            }
        }
    }

    pub(crate) async fn acquire(
        &self,
        keys: &Keys,
        token: &str,
        expiry: Duration,
        intent: Duration,
    ) -> Result<Attempt> {
        // Until a definite answer arrives, the attempt may have taken the lock: if
        // this future is dropped or fails, release the token in the background.
        let mut in_doubt = InDoubt {
            backend: self.clone(),
            keys: Some(keys.clone()),
            token: token.to_owned(),
            conn: None,
        };
        let mut tries = 0;
        let mut retry_slot = None;
        let reply: Vec<Value> = loop {
            tries += 1;
            let (i, conn) = match retry_slot {
                // A fresh connection in the slot just emptied (see `call`).
                Some(i) => self.conn_at(i).await?,
                None => self.conn().await?,
            };
            if let Some(wait) = self.quarantine() {
                in_doubt.keys = None;
                return Ok(Attempt::Held { ttl: Some(wait) });
            }
            self.shared
                .longest_expiry_ms
                .fetch_max(millis(expiry), Ordering::Relaxed);
            in_doubt.conn = Some(conn.clone());
            let mut conn = conn;
            let inv = acquire_invocation(keys, token, expiry, intent);
            let fut = inv.invoke_async(&mut conn);
            match tokio::time::timeout(self.shared.settings.op_timeout, fut).await {
                Ok(Ok(v)) => break v,
                Ok(Err(e)) => {
                    self.after_error(i, &e);
                    if !retryable(&e) || tries >= 2 {
                        return Err(Error::from_redis("acquire", e));
                    }
                    retry_slot = Some(i);
                }
                Err(_) => {
                    self.invalidate(i);
                    return Err(self.timed_out("acquire"));
                }
            }
        };
        let attempt = parse_attempt(keys, &reply);
        if let (Ok(Attempt::Acquired { .. }), Some(conn)) = (&attempt, in_doubt.conn.as_mut()) {
            // Dropped or failed from here on, the lock is released by `in_doubt`.
            self.wait_for_replicas(conn, "acquire").await?;
        }
        // A reply that cannot be read (a fencing counter beyond u64) may still
        // have taken the lock: `in_doubt` releases it then.
        if attempt.is_ok() {
            in_doubt.keys = None;
        }
        attempt
    }

    pub(crate) async fn release(&self, keys: &Keys, token: &str) -> Result<bool> {
        self.call("release", |mut c| async move {
            SCRIPTS
                .release
                .key(&keys.lock)
                .key(&keys.channel)
                .arg(token)
                .arg(kind_flag(keys.kind.shared()))
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await
        .map(|n| n == 1)
    }

    pub(crate) async fn count(&self, keys: &Keys) -> Result<usize> {
        let n: i64 = self
            .call("count", |mut c| async move {
                SCRIPTS.count.key(&keys.lock).invoke_async(&mut c).await
            })
            .await?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    pub(crate) async fn extend_many(&self, batch: &[Renewal]) -> Result<Vec<bool>> {
        if self.shared.pool.is_cluster() {
            // One script may only touch one slot: renew each lease on its own,
            // all at once (the cluster connection pipelines them per node).
            let each = batch
                .iter()
                .map(|r| self.extend_chunk(std::slice::from_ref(r)));
            let results = futures_util::future::join_all(each).await;
            let mut out = Vec::with_capacity(batch.len());
            for r in results {
                out.extend(r?);
            }
            return Ok(out);
        }
        let mut out = Vec::with_capacity(batch.len());
        for chunk in batch.chunks(MAX_BATCH) {
            out.extend(self.extend_chunk(chunk).await?);
        }
        Ok(out)
    }

    /// With `wait_replicas`, blocks (on `conn`, after the write just sent on
    /// it) until enough replicas acknowledged it.
    async fn wait_for_replicas(&self, conn: &mut Conn, what: &str) -> Result<()> {
        let Some((replicas, timeout)) = self.shared.settings.wait_replicas else {
            return Ok(());
        };
        let limit = self.shared.settings.op_timeout + timeout;
        let acked: i64 = tokio::time::timeout(
            limit,
            redis::cmd("WAIT")
                .arg(replicas)
                .arg(millis(timeout))
                .query_async(conn),
        )
        .await
        .map_err(|_| self.timed_out("WAIT"))?
        .map_err(|e| Error::from_redis("WAIT", e))?;
        if acked < i64::from(replicas) {
            return Err(Error::Unavailable {
                context: format!(
                    "{what}: only {acked} of {replicas} replicas acknowledged within {}",
                    crate::options::fmt(timeout)
                ),
                source: None,
            });
        }
        Ok(())
    }

    /// One renewal script call for leases in one slot.
    async fn extend_chunk(&self, chunk: &[Renewal]) -> Result<Vec<bool>> {
        let (flags, mut conn): (Vec<i64>, Conn) = self
            .call("renew", |mut c| async move {
                let mut inv = SCRIPTS.extend_many.prepare_invoke();
                for r in chunk {
                    inv.key(&r.key)
                        .arg(kind_flag(r.shared))
                        .arg(&r.token)
                        .arg(millis(r.ttl));
                }
                let flags = inv.invoke_async(&mut c).await?;
                Ok((flags, c))
            })
            .await?;
        self.wait_for_replicas(&mut conn, "renew").await?;
        if flags.len() != chunk.len() {
            return Err(Error::Redis {
                source: "renewal script returned a reply of the wrong length".into(),
            });
        }
        Ok(flags.into_iter().map(|f| f == 1).collect())
    }

    pub(crate) async fn force_unlock(&self, holders: &[String], channel: &str) -> Result<bool> {
        // A message of its own, so that waiters never take it for one they saw.
        let message = crate::token::mint("force:")?;
        let message = message.as_str();
        self.call("force unlock", |mut c| async move {
            let mut inv = SCRIPTS.force_unlock.prepare_invoke();
            for k in holders {
                inv.key(k);
            }
            inv.key(channel).arg(message);
            inv.invoke_async::<i64>(&mut c).await
        })
        .await
        .map(|n| n > 0)
    }

    /// Raises the fencing counter of `keys` to at least `floor`.
    pub(crate) async fn raise_fence(&self, keys: &Keys, floor: u64) -> Result<()> {
        self.call("fence", |mut c| async move {
            SCRIPTS
                .fence_floor
                .key(&keys.fence)
                .arg(floor)
                .arg(FENCE_TTL_MS)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await
        .map(drop)
    }

    /// The hub this backend's pub/sub connection feeds.
    pub(crate) fn hub(&self) -> &Arc<Hub> {
        &self.shared.hub
    }

    pub(crate) async fn subscribe(
        &self,
        channel: &str,
        ack_wait: Duration,
    ) -> (Subscription, bool) {
        self.start_pubsub();
        self.shared.hub.subscribe(channel, ack_wait).await
    }

    /// Starts the pub/sub connection task, once, if this backend has one.
    pub(crate) fn start_pubsub(&self) {
        let s = &self.shared;
        let mut slot = s.pubsub.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if let Some((client, rx)) = slot.take() {
            rt.spawn(pubsub_task(
                client,
                Arc::clone(&s.hub),
                rx,
                s.shutdown.clone(),
                s.settings.clone(),
            ));
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Worth one more try on a fresh connection: the connection broke, or it led
/// to a master that has since been demoted.
fn retryable(e: &RedisError) -> bool {
    is_connection_error(e) || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
}

fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}

fn pool_error(e: PoolError) -> Error {
    match e {
        PoolError::Backend(e) => Error::from_redis("connect", e),
        PoolError::Timeout(_) => Error::Unavailable {
            context: "timed out waiting for a pooled connection".into(),
            source: None,
        },
        PoolError::Closed => Error::Closed,
        other => Error::unavailable("connection pool", other.to_string()),
    }
}

fn parse_attempt(keys: &Keys, reply: &[Value]) -> Result<Attempt> {
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
                Kind::Semaphore { max } => max,
                _ => 0,
            }
        ))),
        _ => Err(bad()),
    }
}

/// An acquire attempt whose outcome is not known yet. Dropped while armed, it
/// releases the token in the background, first on the connection that carried the
/// attempt (so the release cannot overtake it), then on a fresh one.
struct InDoubt {
    backend: RedisBackend,
    keys: Option<Keys>,
    token: String,
    conn: Option<Conn>,
}

impl Drop for InDoubt {
    fn drop(&mut self) {
        let (Some(keys), Some(mut conn)) = (self.keys.take(), self.conn.take()) else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let backend = self.backend.clone();
        let token = std::mem::take(&mut self.token);
        rt.spawn(async move {
            let first = tokio::time::timeout(
                backend.shared.settings.op_timeout,
                SCRIPTS
                    .release
                    .key(&keys.lock)
                    .key(&keys.channel)
                    .arg(&token)
                    .arg(kind_flag(keys.kind.shared()))
                    .invoke_async::<i64>(&mut conn),
            )
            .await;
            if !matches!(first, Ok(Ok(_))) {
                let _ = backend.release(&keys, &token).await;
            }
        });
    }
}

/// Sentinel mode: listens for `+switch-master` on a Sentinel and moves the
/// backend's connections to the new master. Reconnects (to any Sentinel) when
/// its connection drops; stops with the backend.
async fn watch_sentinel(
    backend: RedisBackend,
    mut sentinel: redis::sentinel::SentinelClient,
    master: String,
) {
    let shutdown = backend.shared.shutdown.clone();
    let settings = backend.shared.settings.clone();
    loop {
        let connect = async {
            let client = sentinel.async_get_sentinel_client().await.ok()?;
            let mut pubsub = client.get_async_pubsub().await.ok()?;
            pubsub.subscribe("+switch-master").await.ok()?;
            Some(pubsub)
        };
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(settings.connect_timeout, connect) => r,
        };
        if let Ok(Some(pubsub)) = connected {
            let mut stream = pubsub.into_on_message();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    msg = stream.next() => match msg {
                        Some(msg) => {
                            let payload: String = msg.get_payload().unwrap_or_default();
                            if payload.split_whitespace().next() == Some(master.as_str()) {
                                tracing::warn!(%payload, "sentinel switched the master");
                                backend.master_moved();
                            }
                        }
                        None => break,
                    },
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Keeps one pub/sub connection: subscribes and unsubscribes in the order asked,
/// turns messages into wake-ups, and reconnects (resubscribing, and waking every
/// waiter in case a message was missed) when the connection drops.
async fn pubsub_task(
    source: PubSubSource,
    hub: Arc<Hub>,
    mut cmds: mpsc::UnboundedReceiver<SubCmd>,
    shutdown: CancellationToken,
    settings: RedisSettings,
) {
    let mut backoff = Duration::from_millis(50);
    let mut next = 0usize;
    loop {
        let attempt = next;
        next = next.wrapping_add(1);
        let connect = async {
            match source.client(attempt).await {
                Some(client) => client.get_async_pubsub().await.ok(),
                None => None,
            }
        };
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(settings.connect_timeout, connect) => r,
        };
        let Ok(Some(pubsub)) = connected else {
            tracing::debug!("pub/sub connection failed; waiters fall back to timers");
            // Answer pending subscriptions at once so waiters use their timers.
            while let Ok(cmd) = cmds.try_recv() {
                if let SubCmd::Subscribe(_, ack) = cmd {
                    let _ = ack.send(false);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
            continue;
        };
        backoff = Duration::from_millis(50);
        let (mut sink, mut stream) = pubsub.split();
        let mut healthy = true;
        for channel in hub.channels() {
            if sink.subscribe(&channel).await.is_err() {
                healthy = false;
                break;
            }
        }
        hub.notify_all();
        while healthy {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(SubCmd::Subscribe(channel, ack)) => {
                        let ok = matches!(
                            tokio::time::timeout(settings.op_timeout, sink.subscribe(&channel)).await,
                            Ok(Ok(()))
                        );
                        let _ = ack.send(ok);
                        healthy = ok;
                    }
                    Some(SubCmd::Reconnect) => healthy = false,
                    Some(SubCmd::Unsubscribe(channel)) => {
                        healthy = matches!(
                            tokio::time::timeout(settings.op_timeout, sink.unsubscribe(&channel)).await,
                            Ok(Ok(()))
                        );
                    }
                },
                msg = stream.next() => match msg {
                    Some(msg) => hub.notify_message(msg.get_channel_name(), msg.get_payload_bytes()),
                    None => healthy = false,
                },
            }
        }
        tracing::debug!("pub/sub connection lost; reconnecting");
    }
}
