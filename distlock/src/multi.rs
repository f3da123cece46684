//! A lock on several keys at once: all of them or none, in one canonical
//! order, so that two overlapping sets can never deadlock.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backend::AttemptAll;
use crate::error::{Error, LostReason, Result};
use crate::guard::{LockGuard, Lost};
use crate::key::{Keys, LockKind};
use crate::lease::LeaseState;
use crate::lock::Lock;
use crate::locker::{Locker, Taken};
use crate::notify::Subscription;
use crate::obs;
use crate::options::LeaseOptions;
use crate::run::Policy;

/// The most keys one [`MultiLock`] takes.
pub const MAX_KEYS: usize = 256;

/// Mutexes on several keys, taken all at once or not at all; made by
/// [`Locker::lock_many`]. For a transfer between two accounts, or a job that
/// rebuilds several reports.
///
/// The keys are the same locks as [`Locker::lock`]'s: a `MultiLock` on
/// `["account:1", "account:2"]` excludes `locker.lock("account:1")` and any
/// other `MultiLock` that shares a key. Duplicates count once, and the keys
/// are kept sorted: [`keys`](MultiLock::keys) returns them in that order.
///
/// # How the keys are taken
///
/// - **One server (or Sentinel's master), and memory:** one script takes every
///   key or none. No other client ever sees some of the keys taken, and a
///   waiter never holds one key while it waits for another.
/// - **Redis Cluster and Redlock**, where one request cannot reach every key:
///   the keys are taken one by one in their sorted order; when one is held
///   by another owner, those already taken are given back before waiting.
///   Another client may see some keys taken for the length of an attempt,
///   but two overlapping sets never deadlock and never both proceed.
///
/// A waiter wakes when the key that stopped it is released (pub/sub), or on
/// its timer. Waiters for several keys do not join the per-key lines of
/// [`Lock::acquire`]: under constant contention on one of their keys, a
/// waiter for a single key tends to get it first.
///
/// # Examples
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
/// use std::time::Duration;
///
/// let locker = distlock::Locker::memory();
/// let transfer = locker.lock_many(["account:7", "account:3"]);
/// let guard = transfer.acquire_timeout(Duration::from_secs(5)).await?;
/// // Both accounts are ours; neither can be taken alone meanwhile.
/// assert!(locker.lock("account:3").try_acquire().await?.is_none());
/// println!("account:7 fenced with {:?}", guard.fencing_token("account:7"));
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a lock does nothing until acquired"]
pub struct MultiLock {
    locker: Locker,
    keys: Arc<[String]>,
    opts: LeaseOptions,
    name: obs::Name,
    /// The Redis names, built on first use and shared by every clone.
    prepared: Arc<OnceLock<Arc<[Keys]>>>,
}

/// What one attempt came to.
enum Try {
    Acquired(MultiGuard),
    /// Key `index` is held by another owner, for about `ttl` more when the
    /// server said.
    Held {
        index: usize,
        ttl: Option<Duration>,
    },
    /// Granted, but the answer came when the leases could already be
    /// expiring: given back at once.
    TooLate,
}

impl MultiLock {
    pub(crate) fn new(locker: Locker, keys: Vec<String>, opts: LeaseOptions) -> Self {
        let mut keys = keys;
        keys.sort_unstable();
        keys.dedup();
        MultiLock {
            locker,
            keys: keys.into(),
            opts,
            name: None,
            prepared: Arc::default(),
        }
    }

    /// The keys, sorted, each once: the order they are taken in.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// The locker this lock belongs to.
    pub fn locker(&self) -> &Locker {
        &self.locker
    }

    /// Names what this lock protects in metrics; see [`Lock::name`].
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the lease expiry of every key; see [`Lock::expiry`].
    pub fn expiry(mut self, expiry: Duration) -> Self {
        self.opts.expiry = expiry;
        self
    }

    /// Sets a hard limit on how long one acquisition may be held; see
    /// [`Lock::max_hold`].
    pub fn max_hold(mut self, max_hold: Duration) -> Self {
        self.opts.max_hold = Some(max_hold);
        self
    }

    /// Makes one attempt. `Ok(None)` if another owner holds one of the keys
    /// (then none is held by this call).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an empty set or more than [`MAX_KEYS`] keys;
    /// otherwise as [`Lock::try_acquire`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`Lock::try_acquire`]: whatever a dropped attempt may
    /// have taken is released in the background.
    pub async fn try_acquire(&self) -> Result<Option<MultiGuard>> {
        let locks = self.prepare()?;
        match self.attempt(&locks).await? {
            Try::Acquired(guard) => Ok(Some(guard)),
            Try::Held { .. } | Try::TooLate => Ok(None),
        }
    }

    /// Waits up to `timeout` for every key; see [`Lock::acquire_timeout`].
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when the time runs out; otherwise as
    /// [`try_acquire`](MultiLock::try_acquire).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped wait leaves no key held.
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<MultiGuard> {
        self.acquire_until(Instant::now().checked_add(timeout))
            .await
    }

    /// Waits until every key is acquired, or until this future is dropped
    /// (which leaves no key held).
    ///
    /// # Errors
    ///
    /// As [`try_acquire`](MultiLock::try_acquire).
    pub async fn acquire(&self) -> Result<MultiGuard> {
        self.acquire_until(None).await
    }

    /// Acquires every key under `policy`, runs `work` while holding them, and
    /// releases them; see [`Lock::run`]. If any key's lease is lost, `work`
    /// is dropped (cancelled) at its next await point and the run returns
    /// [`Error::Lost`] naming that key. Inside `work`, [`current()`](crate::current)
    /// gives the last key's lease, and a nested [`Lock::run`] on any of the
    /// keys runs directly.
    ///
    /// Keys the task already holds through an enclosing `run` of the same
    /// locker are not taken again; the others are. (That nested acquisition
    /// waits while holding the outer keys: take every key in one `MultiLock`
    /// where you can.)
    ///
    /// # Errors
    ///
    /// As [`Lock::run`].
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
    /// use std::time::Duration;
    /// let locker = distlock::Locker::memory();
    /// let policy = distlock::Policy::new().timeout(Duration::from_secs(5));
    /// let moved = locker
    ///     .lock_many(["account:1", "account:2"])
    ///     .run(&policy, async { 100 })
    ///     .await?;
    /// assert_eq!(moved, Some(100));
    /// # Ok(()) }
    /// ```
    pub fn run<F: Future>(
        &self,
        policy: &Policy,
        work: F,
    ) -> impl Future<Output = Result<Option<F::Output>>> + use<F> {
        let span = tracing::debug_span!("distlock.run", keys = ?self.keys);
        run_many(self.clone(), policy.clone(), work).instrument(span)
    }

    fn prepare(&self) -> Result<Arc<[Keys]>> {
        if self.locker.is_closed() {
            return Err(Error::Closed);
        }
        self.opts.validate()?;
        if self.keys.is_empty() {
            return Err(Error::config("lock_many needs at least one key"));
        }
        if self.keys.len() > MAX_KEYS {
            return Err(Error::config(format!(
                "lock_many takes at most {MAX_KEYS} keys, not {}",
                self.keys.len()
            )));
        }
        if let Some(locks) = self.prepared.get() {
            return Ok(Arc::clone(locks));
        }
        let prefix = self.locker.key_prefix();
        let locks = self
            .keys
            .iter()
            .map(|k| Keys::new(prefix, k, LockKind::Mutex))
            .collect::<Result<Arc<[Keys]>>>()?;
        Ok(Arc::clone(self.prepared.get_or_init(|| locks)))
    }

    /// The keys as one string, for errors.
    fn label(&self) -> String {
        crate::error::shorten(&self.keys.join(", "))
    }

    pub(crate) async fn acquire_until(&self, deadline: Option<Instant>) -> Result<MultiGuard> {
        let started = Instant::now();
        let locks = self.prepare()?;
        let wait = self.wait(&locks, started, deadline);
        crate::lock::bounded(&self.locker, started, deadline, wait, || {
            self.timeout(started)
        })
        .await
    }

    fn timeout(&self, started: Instant) -> Error {
        Error::Timeout {
            key: self.label(),
            waited: started.elapsed(),
        }
    }

    /// Attempts, then sleeps until the key that stopped the attempt is
    /// released (or a timer runs out), holding nothing meanwhile.
    async fn wait(
        &self,
        locks: &[Keys],
        started: Instant,
        deadline: Option<Instant>,
    ) -> Result<MultiGuard> {
        let _waiting = obs::waiting_task(self.locker.metrics_name());
        let mut sub: Option<(usize, Subscription)> = None;
        let mut retries = 0u32;
        loop {
            let (index, ttl) = match self.attempt(locks).await? {
                Try::Acquired(guard) => return Ok(guard),
                Try::Held { index, ttl } => (index, ttl),
                Try::TooLate => (0, None),
            };
            let mut sleep = self.opts.backoff(retries);
            if let Some(ttl) = ttl {
                sleep = sleep.min(ttl + Duration::from_millis(1));
            }
            if let Some(d) = deadline {
                let now = Instant::now();
                if now >= d {
                    return Err(self.timeout(started));
                }
                sleep = sleep.min(d - now);
            }
            if sub.as_ref().map(|(i, _)| *i) != Some(index) {
                // Listen to the key in the way; a release between the attempt
                // and the subscription would be missed, so try again once
                // messages will arrive.
                let asked = Instant::now();
                let keys = locks.get(index).ok_or_else(|| Error::config("bad index"))?;
                let (s, confirmed) = self.locker.backend().subscribe(keys, sleep).await;
                sub = Some((index, s));
                if confirmed {
                    continue;
                }
                sleep = sleep.saturating_sub(asked.elapsed());
            }
            retries = retries.saturating_add(1);
            obs::waiting(&self.keys[index], retries, sleep);
            match sub.as_mut() {
                Some((_, s)) => {
                    tokio::select! {
                        () = s.changed() => {}
                        () = tokio::time::sleep(sleep) => {}
                    }
                }
                None => tokio::time::sleep(sleep).await,
            }
        }
    }

    /// One attempt: all the keys in one request where the backend can, else
    /// one by one in sorted order.
    async fn attempt(&self, locks: &[Keys]) -> Result<Try> {
        let started = Instant::now();
        let result = self.attempt_once(locks).await;
        let label = self.keys.join(",");
        match &result {
            Ok(Try::Acquired(g)) => {
                let fence = g.guards.iter().map(LockGuard::fencing_token).max();
                obs::acquired(&label, &self.name, fence.unwrap_or(0), started.elapsed());
            }
            Ok(Try::Held { .. } | Try::TooLate) => obs::acquire_busy(&label, &self.name),
            Err(e) => obs::acquire_failed(&label, &self.name, e),
        }
        result
    }

    async fn attempt_once(&self, locks: &[Keys]) -> Result<Try> {
        // `close()` waits for this attempt (see `Lock`).
        let _in_flight = self.locker.begin_attempt()?;
        let token = crate::token::mint(self.locker.owner_tag())?;
        let sent = Instant::now();
        let backend = self.locker.backend();
        let fences = match backend.acquire_all(locks, &token, self.opts.expiry).await {
            None => return self.one_by_one().await,
            Some(attempt) => match attempt? {
                AttemptAll::Held { index, ttl } => return Ok(Try::Held { index, ttl }),
                AttemptAll::Acquired { fences } => fences,
            },
        };
        let max_hold_at = self.opts.max_hold.and_then(|m| sent.checked_add(m));
        let mut guards = Vec::with_capacity(locks.len());
        for (keys, fence) in locks.iter().zip(fences) {
            let taken = Taken {
                keys: keys.clone(),
                token: token.clone(),
                fence,
                sent,
                granted_for: None,
                max_hold_at,
                name: self.name.clone(),
            };
            match self.locker.keep(taken, &self.opts).await {
                Ok(guard) => guards.push(guard),
                Err(e) => {
                    // The keeper is gone (the locker closed): give back the
                    // keys not handed to it; the guards taken so far release
                    // theirs when dropped.
                    for keys in &locks[guards.len() + 1..] {
                        let _ = backend.release(keys, &token).await;
                    }
                    return Err(e);
                }
            }
        }
        if self.locker.is_closed() {
            return Err(Error::Closed);
        }
        if Instant::now() >= sent + self.opts.validity() {
            return Ok(Try::TooLate);
        }
        Ok(Try::Acquired(MultiGuard::new(guards)))
    }

    /// Takes the keys one at a time, in sorted order; at the first held by
    /// another owner, gives back those taken.
    async fn one_by_one(&self) -> Result<Try> {
        let mut guards: Vec<LockGuard> = Vec::with_capacity(self.keys.len());
        for (index, key) in self.keys.iter().enumerate() {
            let mut lock = Lock::new(self.locker.clone(), key.clone(), LockKind::Mutex, self.opts);
            if let Some(name) = &self.name {
                lock = lock.name(Arc::clone(name));
            }
            match lock.try_acquire().await? {
                Some(guard) => guards.push(guard),
                None => {
                    // Given back before waiting: never hold and wait. A
                    // release dropped halfway is finished in the background.
                    for guard in guards {
                        let _ = guard.release().await;
                    }
                    return Ok(Try::Held { index, ttl: None });
                }
            }
        }
        Ok(Try::Acquired(MultiGuard::new(guards)))
    }
}

/// Held locks on several keys; see [`MultiLock`]. Each key's lease renews
/// itself until the guard is released or dropped; the guard has one lost
/// signal, which fires when any of them is lost.
///
/// Dropping the guard releases every key at once, in the background.
#[must_use = "dropping the guard releases the locks at once"]
pub struct MultiGuard {
    /// One per key, in the keys' sorted order.
    guards: Vec<LockGuard>,
    /// Fired by the first lease lost.
    signal: CancellationToken,
}

impl fmt::Debug for MultiGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultiGuard")
            .field("guards", &self.guards)
            .finish_non_exhaustive()
    }
}

impl MultiGuard {
    fn new(guards: Vec<LockGuard>) -> Self {
        let signal = CancellationToken::new();
        for guard in &guards {
            guard.state().join_group(&signal);
        }
        MultiGuard { guards, signal }
    }

    /// The keys held, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.guards.iter().map(LockGuard::key)
    }

    /// The fencing token of `key`'s acquisition (`None` for a key not in the
    /// set). Each key has its own counter, so each resource checks its own
    /// key's token.
    pub fn fencing_token(&self, key: &str) -> Option<u64> {
        self.guards
            .iter()
            .find(|g| g.key() == key)
            .map(LockGuard::fencing_token)
    }

    /// The guard of each key, sorted by key.
    pub fn guards(&self) -> &[LockGuard] {
        &self.guards
    }

    /// How long, at most, until the lost signal fires unless renewals are
    /// confirmed first: the soonest of the keys'.
    pub fn expires_in(&self) -> Duration {
        self.guards
            .iter()
            .map(LockGuard::expires_in)
            .min()
            .unwrap_or_default()
    }

    /// A future that completes, with the reason, when any key's lease is
    /// lost. It never completes if the locks are released normally.
    pub fn lost(&self) -> Lost {
        Lost::any(&self.signal, self.leases())
    }

    /// True once any key's lease is lost.
    pub fn is_lost(&self) -> bool {
        self.signal.is_cancelled()
    }

    /// Why the first lease lost was lost, if one was.
    pub fn lost_reason(&self) -> Option<LostReason> {
        self.guards.iter().find_map(LockGuard::lost_reason)
    }

    /// A token cancelled when any key's lease is lost. Cancelling it yourself
    /// releases nothing.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.signal.child_token()
    }

    fn leases(&self) -> Box<[Arc<LeaseState>]> {
        self.guards.iter().map(|g| Arc::clone(g.state())).collect()
    }

    /// Releases every key and wakes their waiters.
    ///
    /// # Errors
    ///
    /// [`Error::Lost`] if a lease was lost before the release (naming its
    /// key), else the first other error; every key is released either way
    /// (or left to expire when Redis cannot be told).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the keys not released yet when the future is dropped are
    /// released in the background.
    pub async fn release(self) -> Result<()> {
        first_error(LockGuard::release_together(self.guards).await)
    }

    /// [`release`](MultiGuard::release), leaving each key held until `until`.
    async fn release_at(self, until: Instant) -> Result<()> {
        let outcomes =
            futures_util::future::join_all(self.guards.into_iter().map(|g| g.release_at(until)))
                .await;
        first_error(outcomes)
    }
}

/// A loss first, else the first error.
fn first_error(outcomes: Vec<Result<()>>) -> Result<()> {
    let mut first = None;
    for outcome in outcomes {
        match outcome {
            Err(e @ Error::Lost { .. }) => return Err(e),
            Err(e) => {
                first.get_or_insert(e);
            }
            Ok(()) => {}
        }
    }
    first.map_or(Ok(()), Err)
}

/// The body of [`MultiLock::run`].
async fn run_many<F: Future>(
    this: MultiLock,
    policy: Policy,
    work: F,
) -> Result<Option<F::Output>> {
    let locker_id = this.locker.id();
    let missing: Vec<String> = this
        .keys
        .iter()
        .filter(|k| !crate::run::held_here(locker_id, LockKind::Mutex, k))
        .cloned()
        .collect();
    if missing.is_empty() {
        return Ok(Some(work.await));
    }
    let mut lock = MultiLock::new(this.locker.clone(), missing, this.opts);
    lock.name = this.name.clone();
    let lock = crate::run::with_policy(&policy, lock, MultiLock::expiry, MultiLock::max_hold)?;
    let label = lock.keys.join(", ");
    let lock = &lock;
    let acquired = crate::run::acquire_by(
        &policy,
        &label,
        |deadline| lock.acquire_until(deadline),
        || lock.try_acquire(),
    )
    .await?;
    let Some(mut guard) = acquired else {
        return Ok(None);
    };
    let keep_until = crate::run::keep_until(&policy, &guard.guards);
    if let Some(until) = keep_until {
        for g in &mut guard.guards {
            g.keep_until(until);
        }
    }
    let leases = guard.leases();
    let output = crate::run::hold(locker_id, &leases, guard.lost(), work).await;
    drop(leases);
    let released = match keep_until {
        Some(until) if until > Instant::now() => guard.release_at(until).await,
        _ => guard.release().await,
    };
    crate::run::outcome(&label, output, released)
}
