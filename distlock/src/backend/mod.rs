//! Where leases live: one Redis server, or process memory.
//!
//! Every operation is one round trip (one script); the enum dispatches without
//! boxing on the hot path.

pub(crate) mod connect;
pub(crate) mod memory;
pub(crate) mod redis;
pub(crate) mod redlock;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::error::Result;
use crate::inspect::Role;
use crate::key::{InspectKeys, Keys};
use crate::notify::Subscription;

/// Erases a backend future's type: redis-rs's futures (and Redlock's fan-out
/// over them) would otherwise nest deep inside every caller's future type, past
/// rustc's query depth limit in users' crates that wrap a lock in a few async
/// layers of their own. One small allocation per operation, next to a network
/// round trip.
fn boxed<'a, T>(
    fut: impl Future<Output = T> + Send + 'a,
) -> Pin<Box<dyn Future<Output = T> + Send + 'a>> {
    Box::pin(fut)
}

/// Where the in-memory backend's operations, which never wait, give the
/// runtime a turn once the task's cooperative budget is spent, as a network
/// operation would: a loop of memory acquisitions on a current-thread runtime
/// must still let the keeper run.
async fn yield_now() {
    tokio::task::coop::consume_budget().await;
}

/// The outcome of one acquire attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// The lock is ours, with this fencing token.
    Acquired { fence: u64 },
    /// Another owner holds it; it expires in `ttl` if the server said so.
    Held { ttl: Option<Duration> },
}

/// The outcome of one all-or-none attempt on several mutexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AttemptAll {
    /// Every lock is ours, with these fencing tokens (in the order asked).
    Acquired { fences: Vec<u64> },
    /// Lock `index` is held by another owner (for `ttl` more if the server
    /// said so); none was taken.
    Held { index: usize, ttl: Option<Duration> },
}

/// One lease to renew in a batch.
#[derive(Debug, Clone)]
pub(crate) struct Renewal {
    /// The lock's names: where the token lives, and for a semaphore the
    /// permit count, which lives as long as the permits do.
    pub(crate) keys: Keys,
    pub(crate) token: String,
    pub(crate) ttl: Duration,
}

/// One holder as a backend read it. The token never leaves the crate: only
/// its owner tag is shown (see [`crate::Holder`]), and `Debug` omits it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct RawHolder {
    pub(crate) role: Role,
    pub(crate) token: String,
    /// Time left on the server's clock; `None` for a key without a TTL.
    pub(crate) ttl: Option<Duration>,
}

impl std::fmt::Debug for RawHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawHolder")
            .field("role", &self.role)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// What one read of a lock name found, of every kind.
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot {
    pub(crate) holders: Vec<RawHolder>,
    /// A reader-writer lock's waiting writer.
    pub(crate) intent: Option<RawHolder>,
    /// The fencing counter: the latest token granted on the name.
    pub(crate) fence: Option<u64>,
    /// A semaphore's permit count.
    pub(crate) permits: Option<u32>,
}

/// What a majority of Redlock servers hold, from the views of those that
/// answered: a holder is reported when `quorum` views list its token, with
/// the time left until fewer than `quorum` servers hold it (the
/// `quorum`-th longest of its times left); the waiting writer likewise; the
/// fencing counter is the `quorum`-th highest, the highest value a majority
/// has reached (an acquisition writes its token back to the majority that
/// granted it, while a server outside that majority may have minted a
/// higher one of its own); the permit count is the highest seen.
pub(crate) fn majority_view(views: &[Snapshot], quorum: usize) -> Snapshot {
    fn agreed<'a>(all: impl Iterator<Item = &'a RawHolder>, quorum: usize) -> Vec<RawHolder> {
        let mut by_token: Vec<(&RawHolder, Vec<Option<Duration>>)> = Vec::new();
        for h in all {
            match by_token
                .iter_mut()
                .find(|(seen, _)| seen.role == h.role && seen.token == h.token)
            {
                Some((_, ttls)) => ttls.push(h.ttl),
                None => by_token.push((h, vec![h.ttl])),
            }
        }
        by_token
            .into_iter()
            .filter(|(_, ttls)| ttls.len() >= quorum)
            .map(|(h, mut ttls)| {
                // Longest first, a key without a TTL longest of all.
                ttls.sort_unstable_by(|a, b| match (a, b) {
                    (None, None) => std::cmp::Ordering::Equal,
                    (None, Some(_)) => std::cmp::Ordering::Less,
                    (Some(_), None) => std::cmp::Ordering::Greater,
                    (Some(a), Some(b)) => b.cmp(a),
                });
                RawHolder {
                    role: h.role,
                    token: h.token.clone(),
                    ttl: ttls.get(quorum.saturating_sub(1)).copied().flatten(),
                }
            })
            .collect()
    }
    Snapshot {
        holders: agreed(views.iter().flat_map(|v| &v.holders), quorum),
        intent: agreed(views.iter().filter_map(|v| v.intent.as_ref()), quorum)
            .into_iter()
            .next(),
        fence: {
            let mut fences: Vec<u64> = views.iter().filter_map(|v| v.fence).collect();
            fences.sort_unstable_by(|a, b| b.cmp(a));
            fences.get(quorum.saturating_sub(1)).copied()
        },
        permits: views.iter().filter_map(|v| v.permits).max(),
    }
}

/// A lease store.
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    Redis(redis::RedisBackend),
    Redlock(redlock::RedlockBackend),
    Memory(memory::MemoryBackend),
}

/// One acquisition attempt: which lock, under which token, for how long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request<'a> {
    pub(crate) keys: &'a Keys,
    pub(crate) token: &'a str,
    pub(crate) expiry: Duration,
    /// How long a writer's intent lives (the write side of a reader-writer
    /// lock; unused otherwise).
    pub(crate) intent: Duration,
    /// A fair mutex's waiter: how long its ticket in the line lives (zero:
    /// a single attempt, which does not join the line).
    pub(crate) ticket: Duration,
}

impl<'a> Request<'a> {
    /// Keys, token, expiry and intent.
    pub(crate) fn parts(self) -> (&'a Keys, &'a str, Duration, Duration) {
        (self.keys, self.token, self.expiry, self.intent)
    }
}

/// An adoption's change of token: the lease holding `old` gets `new` and
/// `ttl` more to live.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retoken<'a> {
    pub(crate) old: &'a str,
    pub(crate) new: &'a str,
    pub(crate) ttl: Duration,
}

impl Backend {
    /// True where a fair mutex's line lives on the server: one server,
    /// Sentinel, a Cluster. (Redlock would need a majority to agree on the
    /// line; memory's local lines are already FIFO.)
    pub(crate) fn has_lines(&self) -> bool {
        matches!(self, Backend::Redis(_))
    }

    /// One attempt of a fair mutex's waiter ([`Backend::has_lines`]), which
    /// joins the line or keeps its place there. Returns the attempt, and on a
    /// refusal the fencing counter at that moment (a handover whose token is
    /// at most that came before the refusal: it is stale). Cancel safe as
    /// [`acquire`](Backend::acquire).
    pub(crate) async fn acquire_in_line(&self, req: Request<'_>) -> Result<(Attempt, u64)> {
        match self {
            Backend::Redis(b) => boxed(b.acquire_in_line(req)).await,
            _ => self.acquire(req).await.map(|a| (a, 0)),
        }
    }

    /// One attempt to take the lock. Cancel safe: if the attempt may have
    /// succeeded when the future is dropped, the token is released in the background.
    pub(crate) async fn acquire(&self, req: Request<'_>) -> Result<Attempt> {
        match self {
            Backend::Redis(b) => boxed(b.acquire(req)).await,
            Backend::Redlock(b) => boxed(b.acquire(req)).await,
            Backend::Memory(b) => {
                yield_now().await;
                b.acquire(req)
            }
        }
    }

    /// One attempt to take several mutexes at once, all or none, where one
    /// request can do it: on one server (or Sentinel's master) and in memory.
    /// `None` on a Cluster, whose keys live in different slots, and on
    /// Redlock: the caller takes the keys one by one there. Cancel safe as
    /// [`acquire`](Backend::acquire).
    pub(crate) async fn acquire_all(
        &self,
        locks: &[Keys],
        token: &str,
        expiry: Duration,
    ) -> Option<Result<AttemptAll>> {
        match self {
            Backend::Redis(b) if !b.is_cluster() => {
                Some(boxed(b.acquire_all(locks, token, expiry)).await)
            }
            Backend::Redis(_) | Backend::Redlock(_) => None,
            Backend::Memory(b) => {
                yield_now().await;
                Some(Ok(b.acquire_all(locks, token, expiry)))
            }
        }
    }

    /// How many live holders a shared lock (semaphore) has.
    pub(crate) async fn count(&self, keys: &Keys) -> Result<usize> {
        match self {
            Backend::Redis(b) => boxed(b.count(keys)).await,
            Backend::Redlock(b) => boxed(b.count(keys)).await,
            Backend::Memory(b) => {
                yield_now().await;
                Ok(b.count(keys))
            }
        }
    }

    /// Compare-and-delete, publishing a release message. `Ok(false)`: the key was
    /// not ours (any more).
    ///
    /// When Redis confirms, this `Locker`'s own waiters on the key are woken at
    /// once (see [`Hub::released_here`](crate::notify::Hub::released_here));
    /// other replicas' hear the message.
    pub(crate) async fn release(&self, keys: &Keys, token: &str) -> Result<bool> {
        let (released, hub) = match self {
            Backend::Redis(b) => (boxed(b.release(keys, token)).await, b.hub()),
            Backend::Redlock(b) => (boxed(b.release(keys, token)).await, b.hub()),
            Backend::Memory(b) => {
                yield_now().await;
                return Ok(b.release(keys, token));
            }
        };
        // A fair mutex's release may have handed the lock over: its waiters
        // learn from the message, which says to whom.
        if let (Ok(true), false) = (&released, keys.fair()) {
            hub.released_here(&keys.channel, token);
        }
        released
    }

    /// Releases the mutexes of one acquisition on several keys (one token):
    /// in one request where [`acquire_all`](Backend::acquire_all) took them in
    /// one, so that nobody sees some released and others still held; else
    /// each at once. One `bool` per lock, in order.
    pub(crate) async fn release_all(&self, locks: &[Keys], token: &str) -> Result<Vec<bool>> {
        let (released, hub) = match self {
            Backend::Redis(b) if !b.is_cluster() => {
                (boxed(b.release_all(locks, token)).await, b.hub())
            }
            Backend::Redis(_) | Backend::Redlock(_) => {
                let each = locks.iter().map(|keys| self.release(keys, token));
                return futures_util::future::join_all(each)
                    .await
                    .into_iter()
                    .collect();
            }
            Backend::Memory(b) => {
                yield_now().await;
                return Ok(b.release_all(locks, token));
            }
        };
        if let Ok(released) = &released {
            for (keys, _) in locks.iter().zip(released).filter(|(_, r)| **r) {
                hub.released_here(&keys.channel, token);
            }
        }
        released
    }

    /// Compare-and-pexpire for a batch of leases; one `bool` per lease, in order.
    pub(crate) async fn extend_many(&self, batch: &[Renewal]) -> Result<Vec<bool>> {
        match self {
            Backend::Redis(b) => boxed(b.extend_many(batch)).await,
            Backend::Redlock(b) => boxed(b.extend_many(batch)).await,
            Backend::Memory(b) => {
                yield_now().await;
                Ok(b.extend_many(batch))
            }
        }
    }

    /// Gives a held lease a new token (voiding the old one) and extends it;
    /// `Ok(false)` if the key no longer holds the old token.
    pub(crate) async fn retoken(&self, keys: &Keys, change: &Retoken<'_>) -> Result<bool> {
        match self {
            Backend::Redis(b) => boxed(b.retoken(keys, change)).await,
            Backend::Redlock(b) => boxed(b.retoken(keys, change)).await,
            Backend::Memory(b) => {
                yield_now().await;
                Ok(b.retoken(keys, change))
            }
        }
    }

    /// Deletes these holder keys whoever holds them, publishing a release message.
    pub(crate) async fn force_unlock(&self, holders: &[String], channel: &str) -> Result<bool> {
        match self {
            Backend::Redis(b) => boxed(b.force_unlock(holders, channel)).await,
            Backend::Redlock(b) => boxed(b.force_unlock(holders, channel)).await,
            Backend::Memory(b) => {
                yield_now().await;
                Ok(b.force_unlock(holders, channel))
            }
        }
    }

    /// Reads every holder of a lock name, of every kind: one round trip (one
    /// per server on Redlock, sent at once).
    pub(crate) async fn inspect(&self, keys: &InspectKeys) -> Result<Snapshot> {
        match self {
            Backend::Redis(b) => boxed(b.inspect(keys)).await,
            Backend::Redlock(b) => boxed(b.inspect(keys)).await,
            Backend::Memory(b) => {
                yield_now().await;
                Ok(b.inspect(keys))
            }
        }
    }

    /// The names of the locks held under `prefix` whose names match the glob
    /// `pattern`, sorted, each once (`SCAN`, on every master of a cluster and
    /// every server of a Redlock).
    pub(crate) async fn held_names(&self, prefix: &str, pattern: &str) -> Result<Vec<String>> {
        let mut names = match self {
            Backend::Redis(b) => boxed(b.held_names(prefix, pattern)).await?,
            Backend::Redlock(b) => boxed(b.held_names(prefix, pattern)).await?,
            Backend::Memory(b) => {
                yield_now().await;
                b.held_names(prefix, pattern)
            }
        };
        names.sort_unstable();
        names.dedup();
        Ok(names)
    }

    /// Subscribes to the release channel of `keys`; `false` when the subscription
    /// is not confirmed within `ack_wait` (the waiter must rely on timers).
    pub(crate) async fn subscribe(&self, keys: &Keys, ack_wait: Duration) -> (Subscription, bool) {
        match self {
            Backend::Redis(b) => boxed(b.subscribe(&keys.channel, ack_wait)).await,
            Backend::Redlock(b) => boxed(b.subscribe(&keys.channel, ack_wait)).await,
            Backend::Memory(b) => b.hub().subscribe(&keys.channel, ack_wait).await,
        }
    }

    /// The longest one acquire attempt can take before the backend gives up
    /// on it (each try bounded by the operation timeout, a connection by the
    /// connect timeout).
    pub(crate) fn attempt_bound(&self) -> Duration {
        match self {
            Backend::Redis(b) => b.attempt_bound(),
            // The slowest server's attempt, then the fencing write-back.
            Backend::Redlock(b) => {
                let slowest = b.servers().map(redis::RedisBackend::attempt_bound).max();
                slowest.unwrap_or_default() + b.op_timeout()
            }
            Backend::Memory(_) => Duration::ZERO,
        }
    }

    /// Waits, at most `bound`, for what the backend's operations left running
    /// in the background (Redlock's calls to the servers that answered after
    /// the majority).
    pub(crate) async fn settle(&self, bound: Duration) {
        if let Backend::Redlock(b) = self {
            b.settle(bound).await;
        }
    }

    /// Stops background connections.
    pub(crate) fn shutdown(&self) {
        match self {
            Backend::Redis(b) => b.shutdown(),
            Backend::Redlock(b) => b.shutdown(),
            Backend::Memory(_) => {}
        }
    }
}
