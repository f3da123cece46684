//! The Redis backend: owner-checked Lua scripts over a few multiplexed connections
//! that stay checked out of the pool, plus one pub/sub connection for wake-ups.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use deadpool_redis::{Connection, Pool, PoolError};
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{RedisError, Script, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Attempt, Renewal};
use crate::error::{Error, Result};
use crate::key::Keys;
use crate::notify::{Hub, SubCmd, Subscription};

/// How long the fencing counter outlives its last acquisition. The counter also
/// takes the server's clock into account, so its expiry never lets a token repeat.
const FENCE_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

/// Acquire: set-if-absent, mint a fencing token, or report who holds the key.
///
/// KEYS: lock, fence. ARGV: token, expiry ms, fence ttl ms, restart quarantine ms.
/// Returns `{1, fence}` when acquired (also when the key already holds our token:
/// a retried attempt), `{0, pttl}` when held, `{2, type}` for a key of another type.
///
/// With a restart quarantine, a free key is not handed out while the server has
/// been up for less than the quarantine: a server restarted without its data
/// may have forgotten a lease whose holder has not yet seen its lost signal. The
/// answer is then `{0, ms left}`, as if the key were held that long. Redis counts
/// `uptime_in_seconds` between two whole seconds of its clock, so a reading of
/// `n` proves only `n - 1` seconds: the quarantine lasts up to a second longer.
const ACQUIRE: &str = r"
if tonumber(ARGV[4]) > 0 and redis.call('exists', KEYS[1]) == 0 then
  local up = string.match(redis.call('info', 'server'), 'uptime_in_seconds:(%d+)')
  if not up then
    return redis.error_reply('distlock: the server does not report uptime_in_seconds, needed by restart_quarantine')
  end
  local left = tonumber(ARGV[4]) - (tonumber(up) - 1) * 1000
  if left > 0 then
    return {0, tostring(left)}
  end
end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local t = redis.call('time')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local f = tonumber(redis.call('get', KEYS[2]) or '0') + 1
  if now > f then f = now end
  redis.call('set', KEYS[2], string.format('%.0f', f), 'PX', ARGV[3])
  return {1, string.format('%.0f', f)}
end
local kind = redis.call('type', KEYS[1])['ok']
if kind ~= 'string' then
  return {2, kind}
end
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return {1, redis.call('get', KEYS[2]) or '0'}
end
return {0, tostring(redis.call('pttl', KEYS[1]))}
";

/// Release: compare-and-delete, then wake waiters.
///
/// KEYS: lock, channel. ARGV: token.
const RELEASE: &str = r"
local v = redis.pcall('get', KEYS[1])
if v == ARGV[1] then
  redis.call('del', KEYS[1])
  redis.call('publish', KEYS[2], 'released')
  return 1
end
return 0
";

/// Extend a batch: compare-and-pexpire each lease.
///
/// KEYS: lock keys. ARGV: token, ttl ms, token, ttl ms, ...
const EXTEND_MANY: &str = r"
local out = {}
for i = 1, #KEYS do
  local v = redis.pcall('get', KEYS[i])
  if v == ARGV[2 * i - 1] then
    redis.call('pexpire', KEYS[i], ARGV[2 * i])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
";

/// Force-unlock: delete whoever holds it, then wake waiters.
///
/// KEYS: lock, channel.
const FORCE_UNLOCK: &str = r"
local n = redis.call('del', KEYS[1])
redis.call('publish', KEYS[2], 'released')
return n
";

struct Scripts {
    acquire: Script,
    release: Script,
    extend_many: Script,
    force_unlock: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    acquire: Script::new(ACQUIRE),
    release: Script::new(RELEASE),
    extend_many: Script::new(EXTEND_MANY),
    force_unlock: Script::new(FORCE_UNLOCK),
});

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
    /// No acquisition on a server up for less than this (zero: off).
    pub(crate) restart_quarantine: Duration,
}

struct Shared {
    pool: Pool,
    slots: Box<[Mutex<Option<Connection>>]>,
    next: AtomicUsize,
    settings: RedisSettings,
    hub: Arc<Hub>,
    /// The pub/sub task, started on first use (it needs a runtime).
    pubsub: Mutex<Option<(redis::Client, mpsc::UnboundedReceiver<SubCmd>)>>,
    shutdown: CancellationToken,
}

/// One Redis server (or a Sentinel-managed master) reached through a pool.
#[derive(Clone)]
pub(crate) struct RedisBackend {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("pool", &self.shared.pool.status())
            .field("connections", &self.shared.settings.connections)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Wraps a pool. `pubsub` is the client for the wake-up connection; without it,
    /// waiters poll with backoff.
    pub(crate) fn new(pool: Pool, pubsub: Option<redis::Client>, settings: RedisSettings) -> Self {
        let (hub, pubsub) = match pubsub {
            Some(client) => {
                let (hub, rx) = Hub::remote();
                (hub, Some((client, rx)))
            }
            None => (Hub::absent(), None),
        };
        let slots = (0..settings.connections.max(1))
            .map(|_| Mutex::new(None))
            .collect();
        RedisBackend {
            shared: Arc::new(Shared {
                pool,
                slots,
                next: AtomicUsize::new(0),
                settings,
                hub,
                pubsub: Mutex::new(pubsub),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    pub(crate) fn shutdown(&self) {
        self.shared.shutdown.cancel();
        for slot in self.shared.slots.iter() {
            drop(slot.lock().unwrap_or_else(PoisonError::into_inner).take());
        }
        self.shared.pool.close();
    }

    /// Checks out one connection, proving the server is reachable and the
    /// credentials are right.
    pub(crate) async fn verify(&self) -> Result<()> {
        let (_, mut conn) = self.conn().await?;
        let pong: RedisResultTimeout<String> = tokio::time::timeout(
            self.shared.settings.op_timeout,
            redis::cmd("PING").query_async(&mut conn),
        )
        .await;
        match pong {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Error::from_redis("PING", e)),
            Err(_) => Err(self.timed_out("PING")),
        }
    }

    /// A connection from the round-robin slots, checking one out of the pool if
    /// the slot is empty.
    async fn conn(&self) -> Result<(usize, MultiplexedConnection)> {
        let i = self.shared.next.fetch_add(1, Ordering::Relaxed) % self.shared.slots.len();
        self.conn_at(i).await
    }

    /// The connection in slot `i`, checking one out of the pool if it is empty.
    async fn conn_at(&self, i: usize) -> Result<(usize, MultiplexedConnection)> {
        let s = &self.shared;
        if s.shutdown.is_cancelled() {
            return Err(Error::Closed);
        }
        if let Some(c) = s.slots[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            return Ok((i, (**c).clone()));
        }
        let obj = tokio::time::timeout(s.settings.connect_timeout, s.pool.get())
            .await
            .map_err(|_| Error::Unavailable {
                context: format!(
                    "no connection within {}",
                    crate::options::fmt(s.settings.connect_timeout)
                ),
                source: None,
            })?
            .map_err(pool_error)?;
        let conn = (*obj).clone();
        *s.slots[i].lock().unwrap_or_else(PoisonError::into_inner) = Some(obj);
        Ok((i, conn))
    }

    /// Returns a broken connection to the pool (which recycles or discards it).
    fn invalidate(&self, i: usize) {
        let old = self.shared.slots[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(old);
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
        F: Fn(MultiplexedConnection) -> Fut,
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
                Ok(Err(e)) if is_connection_error(&e) => {
                    self.invalidate(i);
                    if tries >= 2 {
                        return Err(Error::from_redis(what, e));
                    }
                    retry_slot = Some(i);
                }
                Ok(Err(e)) => return Err(Error::from_redis(what, e)),
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
    ) -> Result<Attempt> {
        // Until a definite answer arrives, the attempt may have taken the lock: if
        // this future is dropped or fails, release the token in the background.
        let mut in_doubt = InDoubt {
            backend: self.clone(),
            keys: Some(keys.clone()),
            token: token.to_owned(),
            conn: None,
        };
        let px = millis(expiry);
        let quarantine =
            u64::try_from(self.shared.settings.restart_quarantine.as_millis()).unwrap_or(u64::MAX);
        let mut tries = 0;
        let mut retry_slot = None;
        let reply: Vec<Value> = loop {
            tries += 1;
            let (i, conn) = match retry_slot {
                // A fresh connection in the slot just emptied (see `call`).
                Some(i) => self.conn_at(i).await?,
                None => self.conn().await?,
            };
            in_doubt.conn = Some(conn.clone());
            let mut conn = conn;
            let mut inv = SCRIPTS.acquire.prepare_invoke();
            inv.key(&keys.lock)
                .key(&keys.fence)
                .arg(token)
                .arg(px)
                .arg(FENCE_TTL_MS)
                .arg(quarantine);
            let fut = inv.invoke_async(&mut conn);
            match tokio::time::timeout(self.shared.settings.op_timeout, fut).await {
                Ok(Ok(v)) => break v,
                Ok(Err(e)) if is_connection_error(&e) && tries < 2 => {
                    self.invalidate(i);
                    retry_slot = Some(i);
                }
                Ok(Err(e)) => {
                    if is_connection_error(&e) {
                        self.invalidate(i);
                    }
                    return Err(Error::from_redis("acquire", e));
                }
                Err(_) => {
                    self.invalidate(i);
                    return Err(self.timed_out("acquire"));
                }
            }
        };
        in_doubt.keys = None;
        parse_attempt(keys, &reply)
    }

    pub(crate) async fn release(&self, keys: &Keys, token: &str) -> Result<bool> {
        self.call("release", |mut c| async move {
            SCRIPTS
                .release
                .key(&keys.lock)
                .key(&keys.channel)
                .arg(token)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await
        .map(|n| n == 1)
    }

    pub(crate) async fn extend_many(&self, batch: &[Renewal]) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(batch.len());
        for chunk in batch.chunks(MAX_BATCH) {
            let flags: Vec<i64> = self
                .call("renew", |mut c| async move {
                    let mut inv = SCRIPTS.extend_many.prepare_invoke();
                    for r in chunk {
                        inv.key(&r.key).arg(&r.token).arg(millis(r.ttl));
                    }
                    inv.invoke_async(&mut c).await
                })
                .await?;
            if flags.len() != chunk.len() {
                return Err(Error::Redis {
                    source: "renewal script returned a reply of the wrong length".into(),
                });
            }
            out.extend(flags.into_iter().map(|f| f == 1));
        }
        Ok(out)
    }

    pub(crate) async fn force_unlock(&self, keys: &Keys) -> Result<bool> {
        self.call("force unlock", |mut c| async move {
            SCRIPTS
                .force_unlock
                .key(&keys.lock)
                .key(&keys.channel)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await
        .map(|n| n == 1)
    }

    pub(crate) async fn subscribe(
        &self,
        channel: &str,
        ack_wait: Duration,
    ) -> (Subscription, bool) {
        self.start_pubsub();
        self.shared.hub.subscribe(channel, ack_wait).await
    }

    fn start_pubsub(&self) {
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

type RedisResultTimeout<T> =
    std::result::Result<redis::RedisResult<T>, tokio::time::error::Elapsed>;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
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
    conn: Option<MultiplexedConnection>,
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
                    .invoke_async::<i64>(&mut conn),
            )
            .await;
            if !matches!(first, Ok(Ok(_))) {
                let _ = backend.release(&keys, &token).await;
            }
        });
    }
}

/// Keeps one pub/sub connection: subscribes and unsubscribes in the order asked,
/// turns messages into wake-ups, and reconnects (resubscribing, and waking every
/// waiter in case a message was missed) when the connection drops.
async fn pubsub_task(
    client: redis::Client,
    hub: Arc<Hub>,
    mut cmds: mpsc::UnboundedReceiver<SubCmd>,
    shutdown: CancellationToken,
    settings: RedisSettings,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(settings.connect_timeout, client.get_async_pubsub()) => r,
        };
        let Ok(Ok(pubsub)) = connected else {
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
                    Some(SubCmd::Unsubscribe(channel)) => {
                        healthy = matches!(
                            tokio::time::timeout(settings.op_timeout, sink.unsubscribe(&channel)).await,
                            Ok(Ok(()))
                        );
                    }
                },
                msg = stream.next() => match msg {
                    Some(msg) => hub.notify(msg.get_channel_name()),
                    None => healthy = false,
                },
            }
        }
        tracing::debug!("pub/sub connection lost; reconnecting");
    }
}
