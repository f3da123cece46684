//! A named mutex: `try_acquire`, `acquire_timeout`, `acquire`, and the waiting
//! machinery (local FIFO line, pub/sub wake-up, TTL-bounded jittered timers).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::Attempt;
use crate::error::{Error, Result};
use crate::guard::LockGuard;
use crate::keeper::{Cmd, LeaseState};
use crate::key::{Keys, Kind};
use crate::locker::Locker;
use crate::obs;
use crate::options::LeaseOptions;

/// A distributed mutex on one key; made by [`Locker::lock`]. Cheap to create and
/// to clone: it holds no connection and nothing in Redis until acquired.
///
/// # Examples
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
/// use std::time::Duration;
///
/// let locker = distlock::Locker::memory();
/// let lock = locker.lock("report:daily").expiry(Duration::from_secs(10));
/// let guard = lock.acquire_timeout(Duration::from_secs(5)).await?;
/// assert!(lock.try_acquire().await?.is_none()); // held: no second owner
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a lock does nothing until acquired"]
pub struct Lock {
    locker: Locker,
    key: String,
    kind: Kind,
    opts: LeaseOptions,
    /// The Redis names, built on first use and shared by every clone.
    keys: Arc<OnceLock<Keys>>,
}

/// One attempt: the guard, or how long the key has left if the server said.
type Try = std::result::Result<LockGuard, Option<Duration>>;

impl Lock {
    pub(crate) fn new(locker: Locker, key: String, kind: Kind, opts: LeaseOptions) -> Self {
        Lock {
            locker,
            key,
            kind,
            opts,
            keys: Arc::default(),
        }
    }

    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }

    /// The key, as given.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The locker this lock belongs to.
    pub fn locker(&self) -> &Locker {
        &self.locker
    }

    /// Sets the lease expiry for this lock (default: the locker's, 30 s). The
    /// renewal cadence follows (a third of it) unless the locker set one.
    /// Checked when acquiring: at least 100 ms, at most 24 h.
    pub fn expiry(mut self, expiry: Duration) -> Self {
        self.opts.expiry = expiry;
        self
    }

    /// Sets a hard limit on how long one acquisition may be held: the lost signal
    /// fires (with [`LostReason::MaxHold`](crate::LostReason::MaxHold)) and the
    /// lock is released when it is reached.
    pub fn max_hold(mut self, max_hold: Duration) -> Self {
        self.opts.max_hold = Some(max_hold);
        self
    }

    /// How many live holders the lock has (semaphores; 0 or 1 otherwise).
    pub(crate) async fn count(&self) -> Result<usize> {
        let keys = self.prepare()?;
        self.locker.backend().count(&keys).await
    }

    /// Makes one attempt. `Ok(None)` if another owner holds the lock.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`], [`Error::Config`] for bad input; [`Error::Closed`];
    /// [`Error::Unavailable`], [`Error::Auth`], [`Error::WrongType`] or
    /// [`Error::Redis`] from the backend.
    pub async fn try_acquire(&self) -> Result<Option<LockGuard>> {
        let keys = self.prepare()?;
        let started = Instant::now();
        let result = self.attempt(&keys).await;
        match &result {
            Ok(Ok(g)) => obs::acquired(&self.key, g.fencing_token(), started.elapsed()),
            Ok(Err(_)) => obs::acquire_failed(
                &self.key,
                &Error::Busy {
                    key: self.key.clone(),
                },
            ),
            Err(e) => obs::acquire_failed(&self.key, e),
        }
        Ok(result?.ok())
    }

    /// Waits up to `timeout` for the lock. A zero timeout makes exactly one attempt
    /// and waits for its answer; otherwise the call returns by the deadline, giving
    /// up on an attempt still in flight then (a lock that attempt may have taken is
    /// released in the background).
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when the time runs out; otherwise as
    /// [`try_acquire`](Lock::try_acquire).
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<LockGuard> {
        let deadline = Instant::now().checked_add(timeout);
        self.acquire_until(deadline).await
    }

    /// Waits until the lock is acquired, or until this future is dropped (which
    /// never leaks a lock).
    ///
    /// # Errors
    ///
    /// As [`try_acquire`](Lock::try_acquire): the backend's errors end the wait.
    pub async fn acquire(&self) -> Result<LockGuard> {
        self.acquire_until(None).await
    }

    fn prepare(&self) -> Result<Keys> {
        if self.locker.is_closed() {
            return Err(Error::Closed);
        }
        self.opts.validate()?;
        if self.kind == (Kind::Semaphore { max: 0 }) {
            return Err(Error::config(
                "a semaphore needs at least one permit (max = 0)",
            ));
        }
        if let Some(keys) = self.keys.get() {
            return Ok(keys.clone());
        }
        let keys = Keys::new(self.locker.key_prefix(), &self.key, self.kind)?;
        Ok(self.keys.get_or_init(|| keys).clone())
    }

    pub(crate) async fn acquire_until(&self, deadline: Option<Instant>) -> Result<LockGuard> {
        let started = Instant::now();
        let result = match self.prepare() {
            Ok(keys) => {
                let closed = self.locker.closed_token();
                let wait = self.wait(&keys, started, deadline);
                let bounded = async {
                    match deadline {
                        // The deadline also cuts a request in flight (a slow or
                        // unreachable server), except the one attempt of a zero
                        // timeout. `wait` is cancel safe.
                        Some(d) if d > started => tokio::time::timeout_at(d, wait)
                            .await
                            .unwrap_or_else(|_| Err(self.timeout(started))),
                        _ => wait.await,
                    }
                };
                // No span here: the benchmark's P7 (100,000 concurrent
                // acquisitions) fell behind on renewals with one (BENCHMARKS.md).
                tokio::select! {
                    biased;
                    () = closed.cancelled() => Err(Error::Closed),
                    r = bounded => r,
                }
            }
            Err(e) => Err(e),
        };
        match &result {
            Ok(g) => obs::acquired(&self.key, g.fencing_token(), started.elapsed()),
            Err(e) => obs::acquire_failed(&self.key, e),
        }
        result
    }

    fn timeout(&self, started: Instant) -> Error {
        Error::Timeout {
            key: crate::error::shorten(&self.key),
            waited: started.elapsed(),
        }
    }

    /// Queues locally, then contends in Redis as the head of the line: attempt,
    /// subscribe, attempt again, then sleep until a release message or a timer.
    async fn wait(
        &self,
        keys: &Keys,
        started: Instant,
        deadline: Option<Instant>,
    ) -> Result<LockGuard> {
        let ticket = self.locker.queues().join(&keys.lock);
        let head = match deadline {
            Some(d) => tokio::time::timeout_at(d, ticket.head())
                .await
                .map_err(|_| self.timeout(started))?,
            None => ticket.head().await,
        };
        let Some(mut head) = head else {
            return Err(Error::Closed);
        };
        let mut subscribed = head.sub.is_some();
        // When the previous head of this line took an exclusive lock, wait for
        // its release message before the first attempt: N local waiters make one
        // attempt per release, not two. (A semaphore permit or a read lock taken
        // by the predecessor may leave room for this waiter: it tries at once.)
        let mut skip_attempt = subscribed && std::mem::take(&mut head.predecessor_holds);
        let mut retries = 0u32;
        loop {
            let ttl = if std::mem::take(&mut skip_attempt) {
                None
            } else {
                match self.attempt(keys).await? {
                    Ok(guard) => {
                        head.predecessor_holds = !self.kind.shared();
                        return Ok(guard);
                    }
                    Err(ttl) => ttl,
                }
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
            if !subscribed {
                subscribed = true;
                // Waiting for the confirmation is part of this sleep: a pub/sub
                // connection that does not answer leaves the waiter on its timer.
                let asked = Instant::now();
                let (sub, confirmed) = self.locker.backend().subscribe(keys, sleep).await;
                head.sub = Some(sub);
                if confirmed {
                    // A release between the failed attempt and the subscription
                    // would be missed: try again now that messages will arrive.
                    continue;
                }
                sleep = sleep.saturating_sub(asked.elapsed());
            }
            retries = retries.saturating_add(1);
            obs::waiting(&self.key, retries, sleep);
            match head.sub.as_mut() {
                Some(sub) => {
                    tokio::select! {
                        () = sub.changed() => {}
                        () = tokio::time::sleep(sleep) => {}
                    }
                }
                None => tokio::time::sleep(sleep).await,
            }
        }
    }

    /// One attempt. From the backend's answer to the returned guard there is no
    /// await point, so a dropped future never strands an acquired lease.
    async fn attempt(&self, keys: &Keys) -> Result<Try> {
        let token = crate::token::mint(self.locker.owner_tag())?;
        let sent = Instant::now();
        let backend = self.locker.backend();
        let intent = (self.opts.retry_max * 3).max(Duration::from_secs(1));
        let fence = match backend
            .acquire(keys, &token, self.opts.expiry, intent)
            .await?
        {
            Attempt::Held { ttl } => return Ok(Err(ttl)),
            Attempt::Acquired { fence } => fence,
        };
        let lease = Arc::new(LeaseState::new(
            self.locker.next_lease_id(),
            keys.clone(),
            token,
            fence,
            self.opts.expiry,
        ));
        let valid_until = sent + self.opts.validity();
        let registered = self.locker.keeper().send(Cmd::Hold {
            lease: Arc::clone(&lease),
            valid_until,
            renew_every: self.opts.renew_every(),
            validity: self.opts.validity(),
            max_hold_at: self.opts.max_hold.and_then(|m| sent.checked_add(m)),
        });
        let guard = LockGuard::new(lease, self.locker.clone());
        if !registered {
            // Without its keeper the lease would expire unnoticed: give it back.
            let _ = backend.release(keys, guard.state().token.as_str()).await;
            return Err(Error::Closed);
        }
        if self.locker.is_closed() {
            drop(guard);
            return Err(Error::Closed);
        }
        if Instant::now() >= valid_until {
            // The answer came too late to be of use: the lease may already be
            // expiring. Release it and keep waiting.
            drop(guard);
            return Ok(Err(None));
        }
        Ok(Ok(guard))
    }
}
