//! The `Locker`: a backend, its lease keeper, its local waiting lines, and the
//! defaults every lock inherits.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, Retoken};
use crate::builder::LockerBuilder;
use crate::error::{Error, LostReason, Result};
use crate::guard::{Lease, LockGuard};
use crate::keeper::{Cmd, Keeper};
use crate::key::{Keys, LockKind};
use crate::lease::LeaseState;
use crate::lock::Lock;
use crate::multi::MultiLock;
use crate::obs;
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
    /// The `locker` label of the gauges.
    name: Arc<str>,
    closed: CancellationToken,
    attempts: Attempts,
    next_lease: AtomicU64,
    description: String,
}

/// A lease just taken, for [`Locker::keep`].
pub(crate) struct Taken {
    pub(crate) keys: Keys,
    pub(crate) token: String,
    pub(crate) fence: u64,
    /// When the request that took it was sent.
    pub(crate) sent: tokio::time::Instant,
    /// The expiry the server set, when not the lock's own: a fair mutex's
    /// release hands the lock over for the waiter's ticket's life, and the
    /// first renewal, early, extends it to the full expiry.
    pub(crate) granted_for: Option<std::time::Duration>,
    pub(crate) max_hold_at: Option<tokio::time::Instant>,
    /// The metrics name of the lock.
    pub(crate) name: obs::Name,
}

/// Acquire attempts in flight, which [`Locker::close`] waits for: an attempt
/// answered after the keeper stopped could hand its lease to nobody, and the
/// backend, shut down, could not give it back.
#[derive(Debug, Default)]
struct Attempts {
    /// How many are in flight, and whether the locker is closing.
    state: std::sync::Mutex<(usize, bool)>,
    idle: tokio::sync::Notify,
}

/// One acquire attempt in flight; see [`Locker::begin_attempt`].
#[derive(Debug)]
pub(crate) struct InFlight<'a>(&'a Attempts);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A fair mutex's place in a line, which [`Locker::close`] waits for like an
/// attempt in flight, until the place is given up; see [`Locker::join_line`].
#[derive(Debug)]
pub(crate) struct Place(Locker);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.inner.attempts.end();
    }
}

impl Attempts {
    /// Counts one more in flight, unless the locker is closing.
    fn begin(&self) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.1 {
            return Err(Error::Closed);
        }
        state.0 += 1;
        Ok(())
    }

    fn end(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.0 -= 1;
        if state.0 == 0 && state.1 {
            self.idle.notify_waiters();
        }
    }
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
        name: Arc<str>,
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
                name,
                closed: CancellationToken::new(),
                attempts: Attempts::default(),
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
    /// see [`LockerBuilder::redlock`].
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
        Locker::builder().redlock(urls).build().await
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
        Lock::new(self.clone(), key.into(), LockKind::Mutex, self.inner.opts)
    }

    /// Mutexes on several keys, taken all at once or not at all: a
    /// transfer between two accounts, a job that rebuilds two reports. The
    /// keys are [`lock`](Locker::lock)'s keys (a `MultiLock` on `a` and `b`
    /// excludes `lock("a")`); duplicates count once. See [`MultiLock`] for
    /// how each backend takes them.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
    /// let locker = distlock::Locker::memory();
    /// let guard = locker.lock_many(["account:1", "account:2"]).acquire().await?;
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    pub fn lock_many<I>(&self, keys: I) -> MultiLock
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let keys = keys.into_iter().map(Into::into).collect();
        MultiLock::new(self.clone(), keys, self.inner.opts)
    }

    /// A counting semaphore on `key`: at most `max` holders at once. Every user
    /// of one semaphore must agree on `max` (a disagreement is an error while
    /// permits are held).
    pub fn semaphore(&self, key: impl Into<String>, max: u32) -> Semaphore {
        Semaphore::new(Lock::new(
            self.clone(),
            key.into(),
            LockKind::Semaphore { max },
            self.inner.opts,
        ))
    }

    /// A reader-writer lock on `key`: many readers or one writer; a waiting
    /// writer keeps new readers out, so writers are not starved.
    pub fn rw_lock(&self, key: impl Into<String>) -> RwLock {
        let key = key.into();
        RwLock::new(
            Lock::new(self.clone(), key.clone(), LockKind::Read, self.inner.opts),
            Lock::new(self.clone(), key, LockKind::Write, self.inner.opts),
        )
    }

    /// Deletes the lock on `key` whoever holds it, and wakes its waiters (an
    /// operator's tool, like Redisson's `forceUnlock`). A holder in this process
    /// learns at once that its lease is lost; holders elsewhere at their next
    /// renewal. Returns whether the key was held.
    ///
    /// # When it is right
    ///
    /// Only when you know the holder is gone or must be stopped: an operator
    /// clearing a lock whose holder crashed with a long expiry (the
    /// `distlock unlock` command), or a test. Never at a service's start-up to
    /// clear "leftovers": a lock you find may be a live replica's, and taking it
    /// puts two owners on the resource until that replica's next renewal (only
    /// fencing tokens checked by the resource keep the data safe then). A
    /// leftover of a crashed process expires by itself within its expiry; a
    /// demo that must not wait for it can use keys of its own per run (a
    /// [`key_prefix`](crate::LockerBuilder::key_prefix) with the process id),
    /// as this crate's examples do.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`], [`Error::Closed`], or the backend's errors.
    ///
    /// # Cancel safety
    ///
    /// Dropped while its request is in flight, the unlock may or may not have
    /// happened on the server; calling it again is harmless.
    pub async fn force_unlock(&self, key: &str) -> Result<bool> {
        let keys = self.keys(key, LockKind::Mutex)?;
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
    ///
    /// # Cancel safety
    ///
    /// As [`force_unlock`](Locker::force_unlock): repeat it to be sure.
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
    ///
    /// # Cancel safety
    ///
    /// Dropped in flight, the lease may or may not have been extended;
    /// extending it again is harmless.
    pub async fn extend_lease(&self, lease: &Lease) -> Result<()> {
        let keys = self.keys(lease.key(), lease.kind())?;
        let batch = [crate::backend::Renewal {
            keys: keys.clone(),
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
    /// Adopting gives the lease a new secret token: the `Lease` value (and
    /// any copy of it) can no longer extend or release it, and adopting it a
    /// second time, here or in another process, fails with [`Error::Lost`].
    /// So one lease has at most one live guard.
    ///
    /// # Errors
    ///
    /// As [`release_lease`](Locker::release_lease).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe. Until the server's answer is in, the new token may hold
    /// the key: if this future is dropped, or the answer is an error or a
    /// refusal, the new token is released in the background (the old one is
    /// void either way, so the lease is then over).
    pub async fn adopt(&self, lease: Lease) -> Result<LockGuard> {
        let keys = self.keys(lease.key(), lease.kind())?;
        let mut opts = self.inner.opts;
        opts.expiry = lease.expiry();
        opts.validate()?;
        let token = crate::token::mint(self.owner_tag())?;
        let sent = tokio::time::Instant::now();
        let mut in_doubt = TokenInDoubt {
            locker: self,
            keys: Some(keys.clone()),
            token: token.clone(),
        };
        let adopted = self
            .inner
            .backend
            .retoken(
                &keys,
                &Retoken {
                    old: lease.token(),
                    new: &token,
                    ttl: lease.expiry(),
                },
            )
            .await?;
        if !adopted {
            // Refused here; under Redlock a minority may still have taken it.
            return Err(lost(&lease));
        }
        in_doubt.keys = None;
        drop(in_doubt);
        let taken = Taken {
            keys,
            token,
            fence: lease.fencing_token(),
            sent,
            granted_for: None,
            max_hold_at: None,
            name: None,
        };
        self.keep(taken, &opts).await
    }

    /// Hands a lease just taken (its request sent at `sent`) to the keeper and
    /// returns its guard. Without a keeper (the locker closed) the lease is
    /// given back and the call fails with [`Error::Closed`]. No await point
    /// comes before the registration: a dropped future never strands a lease.
    pub(crate) async fn keep(&self, taken: Taken, opts: &LeaseOptions) -> Result<LockGuard> {
        let Taken {
            keys,
            token,
            fence,
            sent,
            granted_for,
            max_hold_at,
            name,
        } = taken;
        let lease = Arc::new(LeaseState::new(
            self.next_lease_id(),
            keys,
            token,
            fence,
            opts,
            name,
        ));
        lease.count_held(obs::held(self.metrics_name()));
        let validity = opts.validity_of(granted_for);
        let valid_until = sent + validity;
        lease.set_deadline(max_hold_at.map_or(valid_until, |m| m.min(valid_until)));
        let first_renewal = match granted_for {
            Some(_) => sent + opts.renew_every().min(validity / 2),
            None => sent + opts.renew_every(),
        };
        let registered = self.inner.keeper.send(Cmd::Hold {
            lease: Arc::clone(&lease),
            valid_until,
            first_renewal,
            renew_every: opts.renew_every(),
            max_hold_at,
        });
        if !registered {
            // Without its keeper the lease would expire unnoticed: give it back.
            let _ = self.inner.backend.release(&lease.keys, &lease.token).await;
            return Err(Error::Closed);
        }
        Ok(LockGuard::new(lease, self.clone()))
    }

    /// Closes the locker: waiters get [`Error::Closed`], every held lease is
    /// released (its lost signal fires with
    /// [`LostReason::Closed`](crate::LostReason::Closed)), and the background
    /// tasks stop. Later operations fail with [`Error::Closed`]. Idempotent:
    /// a later call waits for the same steps.
    ///
    /// # Errors
    ///
    /// None at present; the `Result` leaves room for reporting failed releases.
    ///
    /// # Cancel safety
    ///
    /// The closing runs as a task of its own once this future is first
    /// polled: dropping the future does not stop it, and never leaves a
    /// locker that refuses new work while its leases stay held.
    pub async fn close(&self) -> Result<()> {
        self.inner.closed.cancel();
        let spawned = tokio::runtime::Handle::try_current().map(|rt| {
            let this = self.clone();
            rt.spawn(async move { this.finish_close().await })
        });
        match spawned {
            Ok(closing) => {
                // A runtime shutting down may cancel the task before it ran:
                // then close here.
                if closing.await.is_err() {
                    self.finish_close().await;
                }
            }
            Err(_) => self.finish_close().await,
        }
        Ok(())
    }

    /// The steps of [`close`](Locker::close) after the locker refuses new
    /// work, each safe to repeat.
    async fn finish_close(&self) {
        // Attempts in flight hand what they took to the keeper (or give it
        // back) before it stops. They end by themselves within the backend's
        // bound on one attempt: waiting ones were just cancelled.
        let _ =
            tokio::time::timeout(self.inner.backend.attempt_bound(), self.attempts_done()).await;
        let (tx, rx) = oneshot::channel();
        if self.inner.keeper.send(Cmd::Close { reply: tx }) {
            let _ = rx.await;
        }
        // Releases (the keeper's, abandoned attempts') still running on
        // servers that answered after the majority finish before the
        // connections go.
        let backend = &self.inner.backend;
        backend.settle(backend.attempt_bound()).await;
        backend.shutdown();
    }

    /// True once [`close`](Locker::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// The prefix of every Redis key this locker uses.
    pub fn key_prefix(&self) -> &str {
        &self.inner.prefix
    }

    fn keys(&self, key: &str, kind: LockKind) -> Result<Keys> {
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
    /// The `locker` label of the gauges.
    pub(crate) fn metrics_name(&self) -> &Arc<str> {
        &self.inner.name
    }

    pub(crate) fn owner_tag(&self) -> &str {
        &self.inner.owner_tag
    }
    pub(crate) fn closed_token(&self) -> &CancellationToken {
        &self.inner.closed
    }
    /// Counts an acquire attempt in flight until the returned value is dropped.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once [`close`](Locker::close) began.
    pub(crate) fn begin_attempt(&self) -> Result<InFlight<'_>> {
        self.inner.attempts.begin()?;
        Ok(InFlight(&self.inner.attempts))
    }

    /// Counts a place in a fair mutex's line as an attempt in flight until the
    /// returned value is dropped (once the place is given up): `close()` then
    /// waits for a waiter it cancelled to leave the line before the
    /// connections go, so that no release hands the lock to it afterwards.
    pub(crate) fn join_line(&self) -> Result<Place> {
        self.inner.attempts.begin()?;
        Ok(Place(self.clone()))
    }

    /// Marks the locker closing and waits until no attempt is in flight.
    async fn attempts_done(&self) {
        let attempts = &self.inner.attempts;
        loop {
            let idle = attempts.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            {
                let mut state = attempts
                    .state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                state.1 = true;
                if state.0 == 0 {
                    return;
                }
            }
            idle.await;
        }
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

/// A token that may hold a key on the server while its request's outcome is
/// unknown (an adoption in flight). Dropped while armed (`keys` set), it
/// releases the token in the background.
struct TokenInDoubt<'a> {
    locker: &'a Locker,
    keys: Option<Keys>,
    token: String,
}

impl Drop for TokenInDoubt<'_> {
    fn drop(&mut self) {
        let Some(keys) = self.keys.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let backend = self.locker.inner.backend.clone();
        let token = std::mem::take(&mut self.token);
        rt.spawn(async move {
            let _ = backend.release(&keys, &token).await;
        });
    }
}
