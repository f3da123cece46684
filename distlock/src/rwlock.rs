//! A reader-writer lock: many readers or one writer, and a waiting writer keeps
//! new readers out.

use std::time::Duration;

use crate::error::Result;
use crate::guard::LockGuard;
use crate::lock::Lock;

/// A held read lock: the lease API of a mutex guard.
pub type ReadGuard = LockGuard;
/// A held write lock: the lease API of a mutex guard.
pub type WriteGuard = LockGuard;

/// A distributed reader-writer lock; made by [`Locker::rw_lock`](crate::Locker::rw_lock).
///
/// Readers are members of a sorted set scored by expiry (like semaphore
/// permits); the writer is a string key (like a mutex). A writer that finds
/// readers leaves an *intent* key that new readers respect, so a steady stream
/// of readers cannot starve it; the intent expires by itself if the writer gives
/// up. The first writer to get in clears the intent, whichever writer left it:
/// the readers have drained, and keeping it would let a stream of writers
/// starve the readers. For [`Lock::run`] and the macro, [`reader`](RwLock::reader) and
/// [`writer`](RwLock::writer) give the two sides as [`Lock`]s.
///
/// # Examples
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
/// let locker = distlock::Locker::memory();
/// let config = locker.rw_lock("config");
/// let r1 = config.read().await?;
/// let r2 = config.read().await?; // readers share
/// assert!(config.try_write().await?.is_none());
/// drop((r1, r2));
/// let w = config.write().await?;
/// assert!(config.try_read().await?.is_none());
/// w.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a lock does nothing until acquired"]
pub struct RwLock {
    read: Lock,
    write: Lock,
}

impl RwLock {
    pub(crate) fn new(read: Lock, write: Lock) -> Self {
        RwLock { read, write }
    }

    /// The key, as given.
    pub fn key(&self) -> &str {
        self.read.key()
    }

    /// Sets the lease expiry of both sides.
    pub fn expiry(mut self, expiry: Duration) -> Self {
        self.read = self.read.expiry(expiry);
        self.write = self.write.expiry(expiry);
        self
    }

    /// Names what the lock protects in metrics, for both sides; see
    /// [`Lock::name`].
    pub fn name(mut self, name: impl Into<std::sync::Arc<str>>) -> Self {
        let name = name.into();
        self.read = self.read.name(std::sync::Arc::clone(&name));
        self.write = self.write.name(name);
        self
    }

    /// The read side, as a [`Lock`] (for [`Lock::run`]).
    pub fn reader(&self) -> Lock {
        self.read.clone()
    }

    /// The write side, as a [`Lock`] (for [`Lock::run`]).
    pub fn writer(&self) -> Lock {
        self.write.clone()
    }

    /// Takes a read lock if no writer holds or waits for the lock.
    ///
    /// # Errors
    ///
    /// As [`Lock::try_acquire`].
    ///
    /// # Cancel safety
    ///
    /// As [`Lock::try_acquire`].
    pub async fn try_read(&self) -> Result<Option<ReadGuard>> {
        self.read.try_acquire().await
    }

    /// Waits up to `timeout` for a read lock.
    ///
    /// # Errors
    ///
    /// As [`Lock::acquire_timeout`].
    ///
    /// # Cancel safety
    ///
    /// As [`Lock::acquire_timeout`].
    pub async fn read_timeout(&self, timeout: Duration) -> Result<ReadGuard> {
        self.read.acquire_timeout(timeout).await
    }

    /// Waits for a read lock.
    ///
    /// # Errors
    ///
    /// As [`Lock::acquire`].
    ///
    /// # Cancel safety
    ///
    /// As [`Lock::acquire`].
    pub async fn read(&self) -> Result<ReadGuard> {
        self.read.acquire().await
    }

    /// Takes the write lock if nobody holds the lock (it registers an intent if
    /// readers do, which holds new readers back for a short while).
    ///
    /// # Errors
    ///
    /// As [`Lock::try_acquire`].
    ///
    /// # Cancel safety
    ///
    /// As [`Lock::try_acquire`].
    pub async fn try_write(&self) -> Result<Option<WriteGuard>> {
        self.write.try_acquire().await
    }

    /// Waits up to `timeout` for the write lock.
    ///
    /// # Errors
    ///
    /// As [`Lock::acquire_timeout`].
    ///
    /// # Cancel safety
    ///
    /// As [`Lock::acquire_timeout`].
    pub async fn write_timeout(&self, timeout: Duration) -> Result<WriteGuard> {
        self.write.acquire_timeout(timeout).await
    }

    /// Waits for the write lock.
    ///
    /// # Errors
    ///
    /// As [`Lock::acquire`].
    ///
    /// # Cancel safety
    ///
    /// As [`Lock::acquire`].
    pub async fn write(&self) -> Result<WriteGuard> {
        self.write.acquire().await
    }
}
