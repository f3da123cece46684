//! Where leases live: one Redis server, or process memory.
//!
//! Every operation is one round trip (one script); the enum dispatches without
//! boxing on the hot path.

mod conn;
pub(crate) mod memory;
pub(crate) mod redis;
pub(crate) mod redlock;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::error::Result;
use crate::key::Keys;
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

/// The outcome of one acquire attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// The lock is ours, with this fencing token.
    Acquired { fence: u64 },
    /// Another owner holds it; it expires in `ttl` if the server said so.
    Held { ttl: Option<Duration> },
}

/// One lease to renew in a batch.
#[derive(Debug, Clone)]
pub(crate) struct Renewal {
    pub(crate) key: String,
    /// The token is a sorted-set member (semaphore, reader), not a string value.
    pub(crate) shared: bool,
    pub(crate) token: String,
    pub(crate) ttl: Duration,
}

/// A lease store.
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    Redis(redis::RedisBackend),
    Redlock(redlock::RedlockBackend),
    Memory(memory::MemoryBackend),
}

impl Backend {
    /// One attempt to take the lock. Cancel safe: if the attempt may have
    /// succeeded when the future is dropped, the token is released in the background.
    pub(crate) async fn acquire(
        &self,
        keys: &Keys,
        token: &str,
        expiry: Duration,
        intent: Duration,
    ) -> Result<Attempt> {
        match self {
            Backend::Redis(b) => boxed(b.acquire(keys, token, expiry, intent)).await,
            Backend::Redlock(b) => boxed(b.acquire(keys, token, expiry, intent)).await,
            Backend::Memory(b) => b.acquire(keys, token, expiry, intent),
        }
    }

    /// How many live holders a shared lock (semaphore) has.
    pub(crate) async fn count(&self, keys: &Keys) -> Result<usize> {
        match self {
            Backend::Redis(b) => boxed(b.count(keys)).await,
            Backend::Redlock(b) => boxed(b.count(keys)).await,
            Backend::Memory(b) => Ok(b.count(keys)),
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
            Backend::Memory(b) => return Ok(b.release(keys, token)),
        };
        if let Ok(true) = released {
            hub.released_here(&keys.channel, token);
        }
        released
    }

    /// Compare-and-pexpire for a batch of leases; one `bool` per lease, in order.
    pub(crate) async fn extend_many(&self, batch: &[Renewal]) -> Result<Vec<bool>> {
        match self {
            Backend::Redis(b) => boxed(b.extend_many(batch)).await,
            Backend::Redlock(b) => boxed(b.extend_many(batch)).await,
            Backend::Memory(b) => Ok(b.extend_many(batch)),
        }
    }

    /// Deletes these holder keys whoever holds them, publishing a release message.
    pub(crate) async fn force_unlock(&self, holders: &[String], channel: &str) -> Result<bool> {
        match self {
            Backend::Redis(b) => boxed(b.force_unlock(holders, channel)).await,
            Backend::Redlock(b) => boxed(b.force_unlock(holders, channel)).await,
            Backend::Memory(b) => Ok(b.force_unlock(holders, channel)),
        }
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

    /// Stops background connections.
    pub(crate) fn shutdown(&self) {
        match self {
            Backend::Redis(b) => b.shutdown(),
            Backend::Redlock(b) => b.shutdown(),
            Backend::Memory(_) => {}
        }
    }
}
