//! A counting semaphore: at most `max` holders of one key at once.

use std::future::Future;
use std::time::Duration;

use crate::error::Result;
use crate::guard::LockGuard;
use crate::lock::Lock;
use crate::run::Policy;

/// A permit of a [`Semaphore`]: the same lease API as a mutex guard (lost
/// signal, cancellation token, fencing token, release, drop, detach).
pub type SemaphorePermit = LockGuard;

/// A distributed counting semaphore; made by [`Locker::semaphore`](crate::Locker::semaphore).
///
/// In Redis it is a sorted set of holder tokens scored by their expiry on the
/// server's clock: expired holders (crashed processes) are purged by the next
/// acquire, so their permits come back after the lease expiry. Permits renew and
/// get lost exactly like mutex guards, and a release wakes waiters.
///
/// # Examples
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
/// let locker = distlock::Locker::memory();
/// let gpus = locker.semaphore("gpus", 2);
/// let a = gpus.acquire().await?;
/// let b = gpus.acquire().await?;
/// assert!(gpus.try_acquire().await?.is_none()); // both permits taken
/// assert_eq!(gpus.current_count().await?, 2);
/// drop((a, b));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a semaphore does nothing until acquired"]
pub struct Semaphore {
    lock: Lock,
}

impl Semaphore {
    pub(crate) fn new(lock: Lock) -> Self {
        Semaphore { lock }
    }

    /// The key, as given.
    pub fn key(&self) -> &str {
        self.lock.key()
    }

    /// The [`Lock`] that takes this semaphore's permits.
    pub(crate) fn into_lock(self) -> Lock {
        self.lock
    }

    /// Sets the lease expiry of permits taken through this handle.
    pub fn expiry(mut self, expiry: Duration) -> Self {
        self.lock = self.lock.expiry(expiry);
        self
    }

    /// Names what the semaphore protects in metrics; see [`Lock::name`].
    pub fn name(mut self, name: impl Into<std::sync::Arc<str>>) -> Self {
        self.lock = self.lock.name(name);
        self
    }

    /// Sets a hard limit on how long one permit may be held.
    pub fn max_hold(mut self, max_hold: Duration) -> Self {
        self.lock = self.lock.max_hold(max_hold);
        self
    }

    /// Takes a permit if one is free now. `Ok(None)` if all are held.
    ///
    /// # Errors
    ///
    /// As [`Lock::try_acquire`]; [`Error::Config`](crate::Error::Config) for
    /// `max` = 0 or a `max` that disagrees with the semaphore's current holders.
    ///
    /// # Cancel safety
    ///
    /// As [`Lock::try_acquire`].
    pub async fn try_acquire(&self) -> Result<Option<SemaphorePermit>> {
        self.lock.try_acquire().await
    }

    /// Waits up to `timeout` for a permit.
    ///
    /// # Errors
    ///
    /// As [`Lock::acquire_timeout`].
    ///
    /// # Cancel safety
    ///
    /// As [`Lock::acquire_timeout`].
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<SemaphorePermit> {
        self.lock.acquire_timeout(timeout).await
    }

    /// Waits for a permit.
    ///
    /// # Errors
    ///
    /// As [`Lock::acquire`].
    ///
    /// # Cancel safety
    ///
    /// As [`Lock::acquire`].
    pub async fn acquire(&self) -> Result<SemaphorePermit> {
        self.lock.acquire().await
    }

    /// Runs `work` holding a permit; see [`Lock::run`].
    ///
    /// # Errors
    ///
    /// As [`Lock::run`].
    pub fn run<F: Future>(
        &self,
        policy: &Policy,
        work: F,
    ) -> impl Future<Output = Result<Option<F::Output>>> + use<F> {
        self.lock.run(policy, work)
    }

    /// How many permits are held now (expired holders are purged first).
    ///
    /// # Errors
    ///
    /// The backend's errors; [`Error::WrongType`](crate::Error::WrongType) if the
    /// key holds something else.
    pub async fn current_count(&self) -> Result<usize> {
        self.lock.count().await
    }
}
