//! The `Locker`: a backend, its lease keeper, its local waiting lines, and the
//! defaults every lock inherits.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::builder::LockerBuilder;
use crate::error::{Error, LostReason, Result};
use crate::guard::{Lease, LockGuard};
use crate::keeper::{Cmd, Keeper, LeaseState};
use crate::key::{Keys, Kind};
use crate::lock::Lock;
use crate::options::LeaseOptions;
use crate::queue::Queues;
use crate::rwlock::RwLock;
use crate::semaphore::Semaphore;

/// The entry point: a connection to Redis (or the in-memory backend) that hands
/// out locks, keeps their leases alive, and wakes their waiters.
///
/// Cheap to clone (an `Arc`); every clone shares one pool, one lease keeper task
/// and one pub/sub connection. Create one per process and share it.
///
/// # Examples
///
/// ```no_run
/// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
/// use std::time::Duration;
///
/// let locker = distlock::Locker::connect("redis://127.0.0.1:6379").await?;
/// let guard = locker.lock("orders:42").acquire_timeout(Duration::from_secs(5)).await?;
/// // ... work that must not run twice at once, across every replica ...
/// guard.release().await?;
/// locker.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Locker {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    backend: Backend,
    keeper: Keeper,
    queues: Arc<Queues>,
    opts: LeaseOptions,
    prefix: String,
    owner_tag: String,
    closed: CancellationToken,
    next_lease: AtomicU64,
    description: String,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The keeper, if it runs, shuts the backend down once it has released
        // what guards handed back; otherwise nobody will.
        if !self.keeper.started() {
            self.backend.shutdown();
        }
    }
}

impl fmt::Debug for Locker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Locker")
            .field("backend", &self.inner.description)
            .field("key_prefix", &self.inner.prefix)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

static NEXT_LOCKER: AtomicU64 = AtomicU64::new(1);

impl Locker {
    pub(crate) fn from_parts(
        backend: Backend,
        opts: LeaseOptions,
        prefix: String,
        owner_tag: String,
        description: String,
    ) -> Self {
        Locker {
            inner: Arc::new(Inner {
                id: NEXT_LOCKER.fetch_add(1, Ordering::Relaxed),
                keeper: Keeper::new(backend.clone()),
                backend,
                queues: Arc::default(),
                opts,
                prefix,
                owner_tag,
                closed: CancellationToken::new(),
                next_lease: AtomicU64::new(1),
                description,
            }),
        }
    }

    /// Connects to the Redis at `url` (`redis://[user:password@]host:port[/db]`,
    /// or `rediss://` for TLS) with default options, and checks that it answers.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a malformed URL, [`Error::Unavailable`] if the server
    /// cannot be reached, [`Error::Auth`] if it refuses the credentials.
    pub async fn connect(url: &str) -> Result<Locker> {
        Locker::builder().url(url).build().await
    }

    /// Redlock over these independent servers (3 or 5) with default options;
    /// see [`LockerBuilder::servers`].
    ///
    /// # Errors
    ///
    /// As [`Locker::connect`] for each server; [`Error::Quorum`] if more than a
    /// minority cannot be reached; [`Error::Config`] if two URLs reach the same
    /// server.
    pub async fn redlock<I, S>(urls: I) -> Result<Locker>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Locker::builder().servers(urls).build().await
    }

    /// A builder for every option; see [`LockerBuilder`].
    pub fn builder() -> LockerBuilder {
        LockerBuilder::new()
    }

    /// Connects to `REDIS_URL`, or to `redis://127.0.0.1:6379` when it is unset.
    ///
    /// # Errors
    ///
    /// As [`Locker::connect`].
    pub async fn from_env() -> Result<Locker> {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| crate::builder::DEFAULT_URL.into());
        Locker::connect(&url).await
    }

    /// Uses an existing deadpool-redis pool. Wake-ups then come from polling
    /// with backoff; give the builder a URL too
    /// (`Locker::builder().pool(pool).url(url)`) for pub/sub wake-ups.
    ///
    /// # Errors
    ///
    /// As [`Locker::connect`]: the pool is asked for one connection.
    pub async fn from_pool(pool: deadpool_redis::Pool) -> Result<Locker> {
        Locker::builder().pool(pool).build().await
    }

    /// An in-process locker with the same semantics as Redis (tokens, expiry,
    /// renewal, lost signal, fencing, waiting), on `tokio::time`: use it in
    /// development and in your own tests, with `tokio::time::pause()` to drive
    /// expiry. Locks are shared by the clones of this locker only.
    pub fn memory() -> Locker {
        Locker::builder().memory().build_now()
    }

    /// A mutex on `key`. Keys are 1 to 1024 bytes, without `{`, `}` or control
    /// characters; they are checked when acquiring.
    pub fn lock(&self, key: impl Into<String>) -> Lock {
        Lock::new(self.clone(), key.into(), Kind::Mutex, self.inner.opts)
    }

    /// A counting semaphore on `key`: at most `max` holders at once. Every user
    /// of one semaphore must agree on `max` (a disagreement is an error while
    /// permits are held).
    pub fn semaphore(&self, key: impl Into<String>, max: u32) -> Semaphore {
        Semaphore::new(Lock::new(
            self.clone(),
            key.into(),
            Kind::Semaphore { max },
            self.inner.opts,
        ))
    }

    /// A reader-writer lock on `key`: many readers or one writer; a waiting
    /// writer keeps new readers out, so writers are not starved.
    pub fn rw_lock(&self, key: impl Into<String>) -> RwLock {
        let key = key.into();
        RwLock::new(
            Lock::new(self.clone(), key.clone(), Kind::Read, self.inner.opts),
            Lock::new(self.clone(), key, Kind::Write, self.inner.opts),
        )
    }

    /// Deletes the lock on `key` whoever holds it, and wakes its waiters (an
    /// operator's tool, like Redisson's `forceUnlock`). A holder in this process
    /// learns at once that its lease is lost; holders elsewhere at their next
    /// renewal. Returns whether the key was held.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`], [`Error::Closed`], or the backend's errors.
    pub async fn force_unlock(&self, key: &str) -> Result<bool> {
        let keys = self.keys(key, Kind::Mutex)?;
        let holders = Keys::all_holders(&self.inner.prefix, key)?;
        let existed = self
            .inner
            .backend
            .force_unlock(&holders, &keys.channel)
            .await?;
        self.inner.keeper.send(Cmd::Check {
            name: key.to_owned(),
        });
        Ok(existed)
    }

    /// Releases a detached lease (see [`LockGuard::detach`]).
    ///
    /// # Errors
    ///
    /// [`Error::Lost`] if the key no longer holds this lease's token; otherwise
    /// as [`force_unlock`](Locker::force_unlock).
    pub async fn release_lease(&self, lease: &Lease) -> Result<()> {
        let keys = self.keys(lease.key(), lease.kind())?;
        if self.inner.backend.release(&keys, lease.token()).await? {
            Ok(())
        } else {
            Err(lost(lease))
        }
    }

    /// Extends a detached lease by its expiry, from now.
    ///
    /// # Errors
    ///
    /// As [`release_lease`](Locker::release_lease).
    pub async fn extend_lease(&self, lease: &Lease) -> Result<()> {
        let keys = self.keys(lease.key(), lease.kind())?;
        let batch = [crate::backend::Renewal {
            shared: keys.kind.shared(),
            key: keys.lock.clone(),
            token: lease.token().to_owned(),
            ttl: lease.expiry(),
        }];
        match self.inner.backend.extend_many(&batch).await?.first() {
            Some(true) => Ok(()),
            _ => Err(lost(lease)),
        }
    }

    /// Takes a detached lease back under this locker's keeper: it is extended
    /// now and then renewed like any other, and released when the guard is.
    ///
    /// # Errors
    ///
    /// As [`release_lease`](Locker::release_lease).
    pub async fn adopt(&self, lease: Lease) -> Result<LockGuard> {
        let keys = self.keys(lease.key(), lease.kind())?;
        let mut opts = self.inner.opts;
        opts.expiry = lease.expiry();
        opts.validate()?;
        let sent = tokio::time::Instant::now();
        self.extend_lease(&lease).await?;
        let state = Arc::new(LeaseState::new(
            self.next_lease_id(),
            keys,
            lease.token().to_owned(),
            lease.fencing_token(),
            lease.expiry(),
        ));
        let registered = self.inner.keeper.send(Cmd::Hold {
            lease: Arc::clone(&state),
            valid_until: sent + opts.validity(),
            renew_every: opts.renew_every(),
            validity: opts.validity(),
            max_hold_at: None,
        });
        if !registered {
            return Err(Error::Closed);
        }
        Ok(LockGuard::new(state, self.clone()))
    }

    /// Closes the locker: waiters get [`Error::Closed`], every held lease is
    /// released (its lost signal fires with
    /// [`LostReason::Closed`](crate::LostReason::Closed)), and the background
    /// tasks stop. Later operations fail with [`Error::Closed`]. Idempotent.
    ///
    /// # Errors
    ///
    /// None at present; the `Result` leaves room for reporting failed releases.
    pub async fn close(&self) -> Result<()> {
        if self.inner.closed.is_cancelled() {
            return Ok(());
        }
        self.inner.closed.cancel();
        let (tx, rx) = oneshot::channel();
        if self.inner.keeper.send(Cmd::Close { reply: tx }) {
            let _ = rx.await;
        }
        self.inner.backend.shutdown();
        Ok(())
    }

    /// True once [`close`](Locker::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// True for a locker made by [`Locker::memory`].
    pub fn is_memory(&self) -> bool {
        matches!(self.inner.backend, Backend::Memory(_))
    }

    /// The prefix of every Redis key this locker uses.
    pub fn key_prefix(&self) -> &str {
        &self.inner.prefix
    }

    fn keys(&self, key: &str, kind: Kind) -> Result<Keys> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        Keys::new(&self.inner.prefix, key, kind)
    }

    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }
    pub(crate) fn backend(&self) -> &Backend {
        &self.inner.backend
    }
    pub(crate) fn keeper(&self) -> &Keeper {
        &self.inner.keeper
    }
    pub(crate) fn queues(&self) -> &Arc<Queues> {
        &self.inner.queues
    }
    pub(crate) fn owner_tag(&self) -> &str {
        &self.inner.owner_tag
    }
    pub(crate) fn closed_token(&self) -> &CancellationToken {
        &self.inner.closed
    }
    pub(crate) fn next_lease_id(&self) -> u64 {
        self.inner.next_lease.fetch_add(1, Ordering::Relaxed)
    }

    /// How many keys have local waiters (for leak checks in tests).
    #[doc(hidden)]
    pub fn __waiting_lines(&self) -> usize {
        self.inner.queues.len()
    }
}

fn lost(lease: &Lease) -> Error {
    Error::Lost {
        key: crate::error::shorten(lease.key()),
        reason: LostReason::Stolen,
    }
}

static DEFAULT: OnceLock<std::sync::RwLock<Option<Locker>>> = OnceLock::new();

/// Sets the process-wide default locker, used by `#[distributed_lock]` when no
/// `locker = ...` is given. Replaces any previous default.
pub fn set_default(locker: Locker) {
    let slot = DEFAULT.get_or_init(|| std::sync::RwLock::new(None));
    let mut slot = slot
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *slot = Some(locker);
}

/// The process-wide default locker.
///
/// # Errors
///
/// [`Error::Config`] if [`set_default`] was never called.
pub fn default_locker() -> Result<Locker> {
    DEFAULT
        .get()
        .and_then(|slot| {
            slot.read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        })
        .ok_or_else(|| {
            Error::config("no default locker: call distlock::set_default(locker) at start-up")
        })
}
