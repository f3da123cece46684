//! The Redis backend: owner-checked Lua scripts over a few multiplexed connections
//! that stay checked out of the pool, plus one pub/sub connection for wake-ups.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | [`RedisBackend`] and its operations |
//! | `scripts.rs` | the Lua scripts, their invocations and reply parsing |
//! | `slots.rs` | the checked-out connections, their refill, the restart quarantine and the one retry loop |
//! | `tasks.rs` | the background tasks: pub/sub wake-ups and the Sentinel watcher |
//! | `conn.rs` | one connection type over single, Sentinel and Cluster pools |

mod conn;
mod scripts;
mod slots;
mod tasks;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deadpool_redis::Pool;
use redis::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::conn::{AnyPool, Checked, Conn};
use self::scripts::{
    acquire_all_invocation, acquire_invocation, kind_flag, parse_all, parse_attempt, parse_seen,
    parse_snapshot, release_invocation, Wakers, FENCE_TTL_MS, SCRIPTS,
};
use self::slots::Identity;
pub(crate) use self::tasks::PubSubSource;
use super::{Attempt, AttemptAll, Renewal, Request, Retoken, Snapshot};
use crate::error::{Error, Result};
use crate::eviction::Eviction;
use crate::key::{holder_name, InspectKeys, Keys, LockKind};
use crate::notify::{Hub, SubCmd, Subscription};

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
    /// Where lockers sharing this server record the longest expiry they use
    /// (see [`Identity`]); `None` on a Cluster, where restarts are not tracked.
    pub(crate) register_key: Option<String>,
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
    /// The longest expiry this backend recorded in the server's register since
    /// the server last started, in ms (0: none yet).
    registered_ms: AtomicU64,
    /// The longest expiry seen in the register, by any locker, in ms.
    register_seen_ms: AtomicU64,
    /// A cluster whose nodes run SPUBLISH for us (Redis 7 and later, and the
    /// ACL user may): releases publish on their shard, and the pub/sub task
    /// subscribes with SSUBSCRIBE. Decided when the backend is verified.
    sharded: AtomicBool,
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

    /// A Redis Cluster through its pool. Scripts go to the node owning their
    /// keys' slot. Wake-ups use sharded pub/sub where every node has it
    /// (SPUBLISH stays on the shard that owns the channel's slot, and the
    /// pub/sub task follows the slots); otherwise plain PUBLISH, which a
    /// cluster forwards to subscribers on every node, so that the pub/sub
    /// connection may use any node (moving to the next one when a node fails).
    pub(crate) fn cluster(
        pool: deadpool_redis::cluster::Pool,
        nodes: Vec<redis::Client>,
        settings: RedisSettings,
    ) -> Self {
        let (hub, mut rxs) = Hub::remote(1, 1);
        let feed = rxs.pop().map(|rx| (PubSubSource::Cluster(nodes), rx));
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

    /// One server of a Redlock: its pub/sub connection feeds a hub shared
    /// with the other servers.
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
                registered_ms: AtomicU64::new(0),
                register_seen_ms: AtomicU64::new(0),
                sharded: AtomicBool::new(false),
            }),
        }
    }

    /// The longest one acquire can take: two tries, each perhaps on a new
    /// connection that is identified first, and the replicas'
    /// acknowledgement.
    pub(crate) fn attempt_bound(&self) -> Duration {
        let s = &self.shared.settings;
        let wait = s
            .wait_replicas
            .map_or(Duration::ZERO, |(_, t)| t + s.op_timeout);
        // Each of the two tries may fill its slot first: checking out
        // connections (within connect_timeout in all) and identifying each of
        // up to two (INFO, loading the scripts, then the expiry register:
        // three requests), before the request itself.
        let per_try = s.connect_timeout + s.op_timeout * 7;
        per_try * 2 + wait
    }

    /// True for a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        self.shared.pool.is_cluster()
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
            let sharded = self.spublish_works().await?;
            self.shared.sharded.store(sharded, Ordering::Relaxed);
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

    /// Whether the cluster runs SPUBLISH for this user: a probe on a channel
    /// nobody subscribes to. An unknown command (Redis before 7) or a refusal
    /// (an ACL user without `+spublish`) keeps plain PUBLISH, never an error.
    async fn spublish_works(&self) -> Result<bool> {
        let probed = self
            .try_call(None, "SPUBLISH", |mut c| async move {
                Ok(redis::cmd("SPUBLISH")
                    .arg("distlock:{probe}:sharded")
                    .arg("")
                    .query_async::<i64>(&mut c)
                    .await)
            })
            .await;
        match probed {
            Ok(_) => Ok(true),
            Err(Error::Auth { .. } | Error::Redis { .. }) => {
                tracing::info!(
                    "the cluster does not run SPUBLISH for this user (Redis before 7, or an ACL \
                     without +spublish): releases are published with PUBLISH, which every node forwards"
                );
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The scripts that publish a release, in the form this backend uses.
    fn wakers(&self) -> &'static Wakers {
        if self.sharded() {
            &SCRIPTS.spublish
        } else {
            &SCRIPTS.publish
        }
    }

    /// True when releases publish on their shard (see [`Shared::sharded`]).
    pub(super) fn sharded(&self) -> bool {
        self.shared.sharded.load(Ordering::Relaxed)
    }

    /// The eviction policy of the servers this backend writes to (the server,
    /// Sentinel's master, or each master of a cluster), from `INFO memory`, or
    /// `CONFIG GET maxmemory-policy` where the ACL user may not run `INFO`.
    /// `None` when it may run neither. Asked on the connection `verify`
    /// checked out, so that building takes no second one from the pool.
    pub(crate) async fn eviction(&self) -> Result<Option<Vec<Eviction>>> {
        let slots = self.shared.slots.len();
        let slot = (0..slots).find(|&i| self.filled(i).is_some()).unwrap_or(0);
        let query = |what: &'static str, cmd: redis::Cmd| {
            self.try_call(Some(slot), what, move |mut c| {
                let cmd = cmd.clone();
                async move { Ok(cmd.query_async::<Value>(&mut c).await) }
            })
        };
        match query("INFO memory", redis::cmd("INFO").arg("memory").clone()).await {
            Ok(reply) => {
                let found = Eviction::from_info(&reply);
                if !found.is_empty() {
                    return Ok(Some(found));
                }
            }
            // Not permitted, or renamed away: try CONFIG GET.
            Err(Error::Auth { .. } | Error::Redis { .. }) => {}
            Err(e) => return Err(e),
        }
        let config = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .clone();
        match query("CONFIG GET", config).await {
            Ok(reply) => Ok(Eviction::from_config(&reply).map(|e| vec![e])),
            Err(Error::Auth { .. } | Error::Redis { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(crate) async fn acquire(&self, req: Request<'_>) -> Result<Attempt> {
        self.acquire_in_line(req).await.map(|(attempt, _)| attempt)
    }

    /// An attempt, and on a fair mutex's refusal the fencing counter then
    /// (see [`Backend::acquire_in_line`](crate::backend::Backend::acquire_in_line)).
    pub(crate) async fn acquire_in_line(&self, req: Request<'_>) -> Result<(Attempt, u64)> {
        let (keys, token, expiry, _) = req.parts();
        let locks = std::slice::from_ref(keys);
        self.acquire_with(
            locks,
            token,
            expiry,
            2,
            |register| acquire_invocation(req, register),
            |reply| {
                let attempt = parse_attempt(keys, reply)?;
                let taken = matches!(attempt, Attempt::Acquired { .. });
                Ok(((attempt, parse_seen(reply)), taken))
            },
        )
        .await
        .map(|a| a.unwrap_or_else(|wait| (Attempt::Held { ttl: Some(wait) }, 0)))
    }

    /// One all-or-none attempt on several mutexes, in one script (a single
    /// server: never a Cluster, whose keys live in different slots).
    pub(crate) async fn acquire_all(
        &self,
        locks: &[Keys],
        token: &str,
        expiry: Duration,
    ) -> Result<AttemptAll> {
        self.acquire_with(
            locks,
            token,
            expiry,
            1,
            |register| acquire_all_invocation(locks, token, expiry, register),
            |reply| {
                let attempt = parse_all(locks, reply)?;
                let taken = matches!(attempt, AttemptAll::Acquired { .. });
                Ok((attempt, taken))
            },
        )
        .await
        .map(|a| {
            a.unwrap_or_else(|wait| AttemptAll::Held {
                index: 0,
                ttl: Some(wait),
            })
        })
    }

    /// The steps of every acquisition: the restart quarantine, the expiry
    /// register, the script (built by `invocation`, given the register's key
    /// when the script should read it, which it returns at `register_at`),
    /// and the replicas' acknowledgement of a grant. `Err(wait)` inside the
    /// `Ok`: not sent, the server restarted and acquisitions wait this long.
    /// Cancel safe: until a definite answer arrives, the attempt may have
    /// taken the locks, which a drop or a failure releases in the
    /// background.
    async fn acquire_with<T>(
        &self,
        locks: &[Keys],
        token: &str,
        expiry: Duration,
        register_at: usize,
        invocation: impl Fn(Option<&str>) -> redis::ScriptInvocation<'static>,
        parse: impl FnOnce(&[Value]) -> Result<(T, bool)>,
    ) -> Result<std::result::Result<T, Duration>> {
        let mut in_doubt = InDoubt {
            backend: self.clone(),
            keys: locks.to_vec(),
            token: token.to_owned(),
            conn: Mutex::new(None),
        };
        let carried = &in_doubt.conn;
        let invocation = &invocation;
        let reply = self
            .try_call(None, "acquire", |mut conn| async move {
                if let Some(wait) = self.quarantine() {
                    return Ok(Ok(Reply::Quarantined(wait)));
                }
                self.shared
                    .longest_expiry_ms
                    .fetch_max(millis(expiry), Ordering::Relaxed);
                // A longer expiry than this locker recorded is recorded first,
                // so that other lockers' restart quarantines cover it.
                self.register(&mut conn, millis(expiry)).await?;
                *carried.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
                let register = self.shared.settings.register_key.as_deref();
                let inv = invocation(register);
                Ok(inv.invoke_async(&mut conn).await.map(Reply::Answer))
            })
            .await?;
        let reply: Vec<Value> = match reply {
            Reply::Answer(reply) => reply,
            Reply::Quarantined(wait) => {
                in_doubt.keys.clear();
                return Ok(Err(wait));
            }
        };
        if let Some(seen) = reply
            .get(register_at)
            .and_then(|v| redis::from_redis_value_ref::<u64>(v).ok())
        {
            self.shared
                .register_seen_ms
                .fetch_max(seen, Ordering::Relaxed);
        }
        // A reply that cannot be read (a fencing counter beyond u64) may still
        // have taken the locks: `in_doubt` releases them then.
        let (attempt, taken) = parse(&reply)?;
        let carrier = in_doubt
            .conn
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let (true, Some(mut conn)) = (taken, carrier) {
            // Dropped or failed from here on, the locks are released by `in_doubt`.
            self.wait_for_replicas(&mut conn, "acquire").await?;
        }
        in_doubt.keys.clear();
        Ok(Ok(attempt))
    }

    pub(crate) async fn release(&self, keys: &Keys, token: &str) -> Result<bool> {
        let wakers = self.wakers();
        self.call("release", |mut c| async move {
            release_invocation(wakers, keys, token)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await
        .map(|n| n >= 1)
    }

    /// Releases several mutexes of one acquisition in one script (one
    /// server: never a Cluster); one `bool` per lock, in order.
    pub(crate) async fn release_all(&self, locks: &[Keys], token: &str) -> Result<Vec<bool>> {
        let wakers = self.wakers();
        let released: Vec<i64> = self
            .call("release", |mut c| async move {
                let mut inv = wakers.release_all.prepare_invoke();
                for keys in locks {
                    inv.key(&keys.lock);
                }
                for keys in locks {
                    inv.key(&keys.channel);
                }
                inv.arg(token).invoke_async(&mut c).await
            })
            .await?;
        Ok(released.into_iter().map(|n| n == 1).collect())
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
                    inv.key(&r.keys.lock);
                    let kind = match r.keys.kind {
                        LockKind::Semaphore { .. } => {
                            inv.key(&r.keys.aux);
                            "m"
                        }
                        kind => kind_flag(kind.shared()),
                    };
                    inv.arg(kind).arg(&r.token).arg(millis(r.ttl));
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

    /// Gives a held lease a new token and extends it; `false` if the key no
    /// longer holds the old one.
    pub(crate) async fn retoken(&self, keys: &Keys, change: &Retoken<'_>) -> Result<bool> {
        let Retoken { old, new, ttl } = *change;
        // Until the answer is in, the new token may hold the key: released in
        // the background if this fails or is dropped, on the connection that
        // carried the request first, so the release cannot overtake it.
        let mut in_doubt = InDoubt {
            backend: self.clone(),
            keys: vec![keys.clone()],
            token: new.to_owned(),
            conn: Mutex::new(None),
        };
        let carried = &in_doubt.conn;
        let adopted = self
            .call("adopt", |mut c| async move {
                *carried.lock().unwrap_or_else(PoisonError::into_inner) = Some(c.clone());
                let mut inv = SCRIPTS.retoken.prepare_invoke();
                inv.key(&keys.lock);
                let kind = match keys.kind {
                    LockKind::Semaphore { .. } => {
                        inv.key(&keys.aux);
                        "m"
                    }
                    kind => kind_flag(kind.shared()),
                };
                inv.arg(kind)
                    .arg(old)
                    .arg(new)
                    .arg(millis(ttl))
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await
            .map(|n| n == 1)?;
        in_doubt.keys.clear();
        Ok(adopted)
    }

    pub(crate) async fn force_unlock(&self, holders: &[String], channel: &str) -> Result<bool> {
        // A message of its own, so that waiters never take it for one they saw.
        let message = crate::token::mint("force:")?;
        let message = message.as_str();
        let wakers = self.wakers();
        self.call("force unlock", |mut c| async move {
            let mut inv = wakers.force_unlock.prepare_invoke();
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

    /// Reads every holder of a lock name in one script (see `INSPECT`).
    pub(crate) async fn inspect(&self, keys: &InspectKeys) -> Result<Snapshot> {
        let reply: Vec<Value> = self
            .call("inspect", |mut c| async move {
                SCRIPTS
                    .inspect
                    .key(&keys.mutex)
                    .key(&keys.sem)
                    .key(&keys.sem_max)
                    .key(&keys.writer)
                    .key(&keys.readers)
                    .key(&keys.intent)
                    .key(&keys.fence)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        parse_snapshot(&reply)
    }

    /// The names of locks with a holder key under `prefix` matching `pattern`
    /// (unsorted, perhaps repeated): `SCAN` over the server, or over every
    /// master of a cluster.
    pub(crate) async fn held_names(&self, prefix: &str, pattern: &str) -> Result<Vec<String>> {
        let matcher = format!("{}{{{pattern}}}*", glob_escape(prefix));
        let mut names = Vec::new();
        let nodes = if self.shared.pool.is_cluster() {
            self.masters().await?.into_iter().map(Some).collect()
        } else {
            vec![None]
        };
        for node in nodes {
            let mut cursor = 0u64;
            loop {
                let (next, keys) = self.scan_page(node.as_ref(), cursor, &matcher).await?;
                names.extend(keys.iter().filter_map(|key| {
                    let key = std::str::from_utf8(key).ok()?;
                    let name = holder_name(prefix, key)?;
                    crate::inspect::glob_match(pattern, name).then(|| name.to_owned())
                }));
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(names)
    }

    /// One `SCAN` page, on `node` of a cluster (host, port) or on the server.
    async fn scan_page(
        &self,
        node: Option<&(String, u16)>,
        cursor: u64,
        matcher: &str,
    ) -> Result<(u64, Vec<Vec<u8>>)> {
        let cmd = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(matcher)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .clone();
        self.call("scan", |c| {
            let cmd = cmd.clone();
            async move {
                match (c, node) {
                    (Conn::Cluster(mut c), Some((host, port))) => {
                        let route = redis::cluster_routing::RoutingInfo::SingleNode(
                            redis::cluster_routing::SingleNodeRoutingInfo::ByAddress {
                                host: host.clone(),
                                port: *port,
                            },
                        );
                        let reply = c.route_command(cmd, route).await?;
                        Ok(redis::from_redis_value(reply)?)
                    }
                    (mut c, _) => cmd.query_async(&mut c).await,
                }
            }
        })
        .await
    }

    /// The addresses of a cluster's masters, from `CLUSTER NODES`.
    async fn masters(&self) -> Result<Vec<(String, u16)>> {
        let nodes: String = self
            .call("CLUSTER NODES", |mut c| async move {
                redis::cmd("CLUSTER").arg("NODES").query_async(&mut c).await
            })
            .await?;
        Ok(cluster_masters(&nodes))
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
}

/// How many keys one `SCAN` call looks at.
const SCAN_COUNT: u64 = 1000;

/// `s` with the glob metacharacters of Redis's `MATCH` escaped.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The addresses of the live masters in a `CLUSTER NODES` reply: lines of
/// `id ip:port@cport[,hostname] flags master-id ...`.
fn cluster_masters(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let addr = fields.nth(1)?;
            let flags = fields.next()?;
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master") || flags.iter().any(|f| f.starts_with("fail")) {
                return None;
            }
            let addr = addr.split(['@', ',']).next()?;
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// What one try of an acquisition came to.
enum Reply {
    /// The script's reply.
    Answer(Vec<Value>),
    /// Not sent: the server restarted and acquisitions wait this long.
    Quarantined(Duration),
}

/// An acquire or adopt attempt whose outcome is not known yet. Dropped while
/// armed, it releases the token in the background, first on the connection that carried the
/// attempt (so the release cannot overtake it), then on a fresh one.
struct InDoubt {
    backend: RedisBackend,
    /// What the attempt may have taken; emptied once the answer is known.
    keys: Vec<Keys>,
    token: String,
    /// The connection that carried the attempt (set before it is sent).
    conn: Mutex<Option<Conn>>,
}

impl Drop for InDoubt {
    fn drop(&mut self) {
        let conn = self
            .conn
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let keys = std::mem::take(&mut self.keys);
        let (false, Some(mut conn)) = (keys.is_empty(), conn) else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let backend = self.backend.clone();
        let token = std::mem::take(&mut self.token);
        rt.spawn(async move {
            for keys in &keys {
                let first = tokio::time::timeout(
                    backend.shared.settings.op_timeout,
                    release_invocation(backend.wakers(), keys, &token)
                        .invoke_async::<i64>(&mut conn),
                )
                .await;
                if !matches!(first, Ok(Ok(_))) {
                    let _ = backend.release(keys, &token).await;
                }
            }
        });
    }
}
