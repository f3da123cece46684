//! A named mutex: `try_acquire`, `acquire_timeout`, `acquire`, and the waiting
//! machinery (local FIFO line, pub/sub wake-up, TTL-bounded jittered timers).

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use crate::backend::{Attempt, Request};
use crate::error::{Error, Result};
use crate::guard::LockGuard;
use crate::key::{Keys, LockKind};
use crate::locker::{Locker, Taken};
use crate::notify::{Heard, Subscription};
use crate::obs;
use crate::options::LeaseOptions;
use crate::run::Policy;

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
    kind: LockKind,
    opts: LeaseOptions,
    /// The Redis names, built on first use and shared by every clone.
    keys: Arc<OnceLock<Keys>>,
    /// The `name` label of its metrics.
    name: obs::Name,
    /// The owner tag its tokens start with, when not the locker's (an
    /// election's candidates carry their value there).
    owner: Option<Arc<str>>,
    /// Waiters queue on the server and a release hands the lock over.
    fair: bool,
}

/// What one attempt came to.
enum Try {
    /// The lock is ours.
    Acquired(LockGuard),
    /// Another owner holds it, for about `ttl` more when the server said.
    Held { ttl: Option<Duration> },
    /// Granted, but the answer came when the lease could already be expiring:
    /// given back at once.
    TooLate,
}

impl Lock {
    pub(crate) fn new(locker: Locker, key: String, kind: LockKind, opts: LeaseOptions) -> Self {
        Lock {
            locker,
            key,
            kind,
            opts,
            keys: Arc::default(),
            name: None,
            owner: None,
            fair: false,
        }
    }

    /// Starts its tokens with `tag` instead of the locker's owner tag, so that
    /// [`Locker::inspect`] reports `tag` as the holder.
    pub(crate) fn owned_by(mut self, tag: Arc<str>) -> Self {
        self.owner = Some(tag);
        self
    }

    /// A subscription to this lock's release messages, confirmed within
    /// `ack_wait` when the backend has pub/sub (`false` if not confirmed: the
    /// subscriber then relies on its timers).
    pub(crate) async fn releases(&self, ack_wait: Duration) -> Result<(Subscription, bool)> {
        let keys = self.prepare()?;
        Ok(self.locker.backend().subscribe(&keys, ack_wait).await)
    }

    pub(crate) fn kind(&self) -> LockKind {
        self.kind
    }

    /// Names what this lock protects in metrics (the `name` label of
    /// `distlock_acquired_total`, `distlock_wait_seconds`,
    /// `distlock_lost_total`...; `unnamed` if not set). Give a name per kind
    /// of work, never per key: `"invoice"`, not `"invoice:42"`, since each
    /// name is a time series of its own. `#[distributed_lock]` names its
    /// locks after the key template.
    ///
    /// ```
    /// let locker = distlock::Locker::memory();
    /// let lock = locker.lock("invoice:42").name("invoice");
    /// # let _ = lock;
    /// ```
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Makes waiting fair across replicas, and hands the lock over on the
    /// server (a mutex on one server, under Sentinel or on a Cluster; elsewhere
    /// this changes nothing).
    ///
    /// Waiters queue on the server in the order they first tried, each with a
    /// ticket it refreshes while it waits; a waiter that gives up leaves the
    /// line at once, and one that died is skipped once its ticket runs out
    /// (three refreshes of a fifth of the expiry each, 1.5 s at most). A
    /// release hands the lock, in the same script, to the first live ticket,
    /// with a new fencing token, for the ticket's life (so a waiter that died
    /// and is handed the lock holds it no longer than that), and publishes
    /// the handover: the next owner holds the lock from that moment, without
    /// a round trip of its own (its first renewal, at once, extends the lock
    /// to its expiry), and nobody can overtake it, not even a
    /// flood of [`try_acquire`](Lock::try_acquire), which is refused while
    /// anyone waits. Within a process, waiters keep their local line: one
    /// ticket per process at a time.
    ///
    /// Every `Lock` on the key should be fair: a lock that is not takes the
    /// key whenever it is free, ahead of the line (never beside its owner).
    ///
    /// ```
    /// let locker = distlock::Locker::memory();
    /// let lock = locker.lock("account:7").fair(true);
    /// # let _ = lock;
    /// ```
    pub fn fair(mut self, fair: bool) -> Self {
        self.fair = fair;
        self
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
    ///
    /// # Cancel safety
    ///
    /// Cancel safe. Dropped while its request is in flight, the attempt may
    /// still take the lock on the server: the lock is then released in the
    /// background (first on the connection that carried the attempt, so the
    /// release cannot overtake it). Once the server answered, no await point
    /// remains before the guard is returned.
    pub async fn try_acquire(&self) -> Result<Option<LockGuard>> {
        let keys = self.prepare()?;
        let started = Instant::now();
        let result = self.attempt(&keys).await;
        match &result {
            Ok(Try::Acquired(g)) => {
                obs::acquired(&self.key, &self.name, g.fencing_token(), started.elapsed());
            }
            Ok(Try::Held { .. } | Try::TooLate) => obs::acquire_busy(&self.key, &self.name),
            Err(e) => obs::acquire_failed(&self.key, &self.name, e),
        }
        match result? {
            Try::Acquired(guard) => Ok(Some(guard)),
            Try::Held { .. } | Try::TooLate => Ok(None),
        }
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
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`try_acquire`](Lock::try_acquire): a dropped wait
    /// also leaves this process's line of waiters for the key.
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
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`acquire_timeout`](Lock::acquire_timeout).
    pub async fn acquire(&self) -> Result<LockGuard> {
        self.acquire_until(None).await
    }

    fn prepare(&self) -> Result<Keys> {
        if self.locker.is_closed() {
            return Err(Error::Closed);
        }
        self.opts.validate()?;
        if self.kind == (LockKind::Semaphore { max: 0 }) {
            return Err(Error::config(
                "a semaphore needs at least one permit (max = 0)",
            ));
        }
        if let Some(keys) = self.keys.get() {
            return Ok(keys.clone());
        }
        let keys = if self.fair && self.kind == LockKind::Mutex && self.locker.backend().has_lines()
        {
            Keys::in_line(self.locker.key_prefix(), &self.key)?
        } else {
            Keys::new(self.locker.key_prefix(), &self.key, self.kind)?
        };
        Ok(self.keys.get_or_init(|| keys).clone())
    }

    /// Acquires the lock under `policy`, runs `work` while holding it, and
    /// releases it. If the lease is lost, `work` is dropped (cancelled) at its
    /// next await point and the run returns [`Error::Lost`].
    ///
    /// Inside `work`, [`current()`](crate::current) gives the lease (key, fencing token, lost
    /// signal). A nested `run` on a key the same task already holds through the
    /// same locker runs its work directly, without re-acquiring (task-scoped
    /// reentrancy).
    ///
    /// Returns `Ok(None)` only with [`OnBusy::Skip`](crate::OnBusy::Skip) when the lock was held.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`], [`Error::Busy`] (with [`OnBusy::Reject`](crate::OnBusy::Reject)),
    /// [`Error::Lost`] (also when the release finds the lease already gone: the
    /// work may have overlapped with another owner's), and the acquisition
    /// errors of [`try_acquire`](Lock::try_acquire).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops `work` where it stands and releases the lock
    /// in the background, as dropping a guard does (with `at_least`, the key
    /// is left to expire at its time instead).
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
    /// use std::time::Duration;
    /// let locker = distlock::Locker::memory();
    /// let policy = distlock::Policy::new().timeout(Duration::from_secs(5));
    /// let total = locker.lock("ledger").run(&policy, async { 40 + 2 }).await?;
    /// assert_eq!(total, Some(42));
    /// # Ok(()) }
    /// ```
    pub fn run<F: Future>(
        &self,
        policy: &Policy,
        work: F,
    ) -> impl Future<Output = Result<Option<F::Output>>> + use<F> {
        // The future owns what it needs (a clone of this cheap handle and of the
        // policy): it borrows neither, and is `'static` when `work` is.
        let span = tracing::debug_span!("distlock.run", key = %self.key());
        crate::run::run_locked(self.clone(), policy.clone(), work).instrument(span)
    }

    pub(crate) async fn acquire_until(&self, deadline: Option<Instant>) -> Result<LockGuard> {
        let started = Instant::now();
        let result = match self.prepare() {
            Ok(keys) => {
                let wait = self.wait(&keys, started, deadline);
                // No span here: the benchmark's P7 (100,000 concurrent
                // acquisitions) fell behind on renewals with one (BENCHMARKS.md).
                bounded(&self.locker, started, deadline, wait, || {
                    self.timeout(started)
                })
                .await
            }
            Err(e) => Err(e),
        };
        match &result {
            Ok(g) => obs::acquired(&self.key, &self.name, g.fencing_token(), started.elapsed()),
            Err(e) => obs::acquire_failed(&self.key, &self.name, e),
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
        let _waiting = obs::waiting_task(self.locker.metrics_name());
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
        if keys.fair() {
            return self.wait_in_line(keys, &mut head, deadline, started).await;
        }
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
                    Try::Acquired(guard) => {
                        head.predecessor_holds = !self.kind.shared();
                        return Ok(guard);
                    }
                    Try::Held { ttl } => ttl,
                    Try::TooLate => None,
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

    /// The head of this process's line for a fair mutex: joins the line on
    /// the server with one token for the whole wait, and holds the lock when
    /// a release hands it over (or, should that message be lost, when its next
    /// attempt finds the lock holding its token). A wait that ends without the
    /// lock, or is dropped, gives up its place, and a handover it did not see
    /// is passed on (see [`InLine`]).
    async fn wait_in_line(
        &self,
        keys: &Keys,
        head: &mut crate::queue::HeadState,
        deadline: Option<Instant>,
        started: Instant,
    ) -> Result<LockGuard> {
        if deadline.is_some_and(|d| d <= started) {
            // A zero timeout: one attempt, which does not join the line.
            return match self.attempt(keys).await? {
                Try::Acquired(guard) => Ok(guard),
                Try::Held { .. } | Try::TooLate => Err(self.timeout(started)),
            };
        }
        let mut line = InLine {
            locker: self.locker.clone(),
            keys: keys.clone(),
            token: self.mint()?,
            place: Some(self.locker.join_line()?),
        };
        let refresh = ticket_refresh(&self.opts);
        let ticket = refresh * 3;
        // The highest fencing counter a refusal reported, and when the latest
        // refusal was sent: a handover minted a higher token after it, so the
        // server's expiry counts from later than that send.
        let mut seen = 0u64;
        let mut refused_at = started;
        let mut retries = 0u32;
        loop {
            let sent = Instant::now();
            let ttl = match self.attempt_as(keys, line.token.clone(), ticket).await? {
                (Try::Acquired(guard), _) => {
                    line.done();
                    return Ok(guard);
                }
                (Try::Held { ttl }, counter) => {
                    // Only a refusal the server sent counts (it reports the
                    // counter); one the restart quarantine made up never
                    // reached it.
                    if counter > 0 {
                        seen = seen.max(counter);
                        refused_at = sent;
                    }
                    ttl
                }
                (Try::TooLate, _) => {
                    // Given back (and handed on): queue again, afresh.
                    line.token = self.mint()?;
                    None
                }
            };
            if head.sub.is_none() {
                let ack = self.opts.backoff(0).max(refresh);
                let (sub, confirmed) = self.locker.backend().subscribe(keys, ack).await;
                head.sub = Some(sub);
                if confirmed {
                    // A handover between the refusal and the subscription
                    // was not heard: the next attempt finds it.
                    continue;
                }
            }
            let mut sleep = self.opts.backoff(retries).min(refresh);
            if let Some(ttl) = ttl {
                sleep = sleep.min(ttl + Duration::from_millis(1));
            }
            let mut wake_at = Instant::now() + sleep;
            if let Some(d) = deadline {
                if Instant::now() >= d {
                    return Err(self.timeout(started));
                }
                wake_at = wake_at.min(d);
            }
            retries = retries.saturating_add(1);
            obs::waiting(&self.key, retries, sleep);
            let Some(sub) = head.sub.as_mut() else {
                tokio::time::sleep_until(wake_at).await;
                continue;
            };
            loop {
                tokio::select! {
                    () = sub.changed() => {}
                    () = tokio::time::sleep_until(wake_at) => break,
                }
                match sub.heard(&line.token, seen) {
                    Heard::Granted(fence) => {
                        match self
                            .take_over(keys, &line.token, fence, refused_at, ticket)
                            .await?
                        {
                            Try::Acquired(guard) => {
                                line.done();
                                return Ok(guard);
                            }
                            _ => {
                                line.token = self.mint()?;
                                break;
                            }
                        }
                    }
                    // Handed to someone ahead of us: keep waiting our turn.
                    Heard::HandedOver => {}
                    // A plain release (or an expiry, a reconnect): try now.
                    Heard::Released => break,
                }
            }
        }
    }

    /// A token for one attempt, or one wait in line.
    fn mint(&self) -> Result<String> {
        let tag = self.owner.as_deref().unwrap_or(self.locker.owner_tag());
        crate::token::mint(tag)
    }

    /// Holds a lock a release handed to `token` with fencing token `fence`,
    /// after a refusal sent at `refused_at`: the handover came after that
    /// refusal reached the server, so the server's expiry ends after
    /// `refused_at` + `ticket` (the release sets the waiter's ticket's life,
    /// so that a waiter that died in line costs no more), and the lease's
    /// local deadline counts from there. The first renewal, early, extends it
    /// to the full expiry.
    async fn take_over(
        &self,
        keys: &Keys,
        token: &str,
        fence: u64,
        refused_at: Instant,
        ticket: Duration,
    ) -> Result<Try> {
        let _in_flight = self.locker.begin_attempt()?;
        self.hold(keys, token.to_owned(), fence, refused_at, Some(ticket))
            .await
    }

    /// One attempt. From the backend's answer to the returned guard there is no
    /// await point, so a dropped future never strands an acquired lease.
    async fn attempt(&self, keys: &Keys) -> Result<Try> {
        let token = self.mint()?;
        Ok(self.attempt_as(keys, token, Duration::ZERO).await?.0)
    }

    /// One attempt under `token`; a fair mutex's waiter passes how long its
    /// ticket in the line lives, and gets back the fencing counter of a refusal.
    async fn attempt_as(&self, keys: &Keys, token: String, ticket: Duration) -> Result<(Try, u64)> {
        // `close()` waits for this attempt, so that what it takes is either
        // registered with the keeper before it stops, or given back.
        let _in_flight = self.locker.begin_attempt()?;
        let sent = Instant::now();
        let backend = self.locker.backend();
        let intent = (self.opts.retry_max * 3).max(Duration::from_secs(1));
        let fence = match backend
            .acquire_in_line(Request {
                keys,
                token: &token,
                expiry: self.opts.expiry,
                intent,
                ticket,
            })
            .await?
        {
            (Attempt::Held { ttl }, seen) => return Ok((Try::Held { ttl }, seen)),
            (Attempt::Acquired { fence }, _) => fence,
        };
        Ok((self.hold(keys, token, fence, sent, None).await?, 0))
    }

    /// Registers a lease taken by a request sent at `sent` with the keeper,
    /// or gives it back when that is too late to be of use. `granted_for`:
    /// the expiry the server set, when not the lock's own (a handover).
    async fn hold(
        &self,
        keys: &Keys,
        token: String,
        fence: u64,
        sent: Instant,
        granted_for: Option<Duration>,
    ) -> Result<Try> {
        let max_hold_at = self.opts.max_hold.and_then(|m| sent.checked_add(m));
        let taken = Taken {
            keys: keys.clone(),
            token,
            fence,
            sent,
            granted_for,
            max_hold_at,
            name: self.name.clone(),
        };
        let guard = self.locker.keep(taken, &self.opts).await?;
        if self.locker.is_closed() {
            drop(guard);
            return Err(Error::Closed);
        }
        if Instant::now() >= sent + self.opts.validity_of(granted_for) {
            // The answer came too late to be of use: the lease may already be
            // expiring. Release it and keep waiting.
            drop(guard);
            return Ok(Try::TooLate);
        }
        Ok(Try::Acquired(guard))
    }
}

/// How often a fair mutex's waiter refreshes its ticket (which lives three
/// times as long): often enough that a handover leaves the new owner most of
/// its expiry (its deadline counts from its last refusal), rarely enough to
/// cost little: a fifth of the expiry, at most 500 ms.
fn ticket_refresh(opts: &LeaseOptions) -> Duration {
    (opts.expiry / 5).min(Duration::from_millis(500))
}

/// A fair mutex's waiter's place in the line. Dropped before [`InLine::done`]
/// (the wait failed, timed out or was cancelled), it gives the place up in the
/// background, and should a release have handed the lock to its token
/// meanwhile, releases it, which hands it on. `close()` waits for that (the
/// place counts as an attempt in flight until it is given up).
struct InLine {
    locker: Locker,
    keys: Keys,
    token: String,
    place: Option<crate::locker::Place>,
}

impl InLine {
    fn done(&mut self) {
        self.token.clear();
    }
}

impl Drop for InLine {
    fn drop(&mut self) {
        if self.token.is_empty() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let backend = self.locker.backend().clone();
        let (keys, token) = (self.keys.clone(), std::mem::take(&mut self.token));
        let place = self.place.take();
        rt.spawn(async move {
            let _ = backend.release(&keys, &token).await;
            drop(place);
        });
    }
}

/// Runs `wait` (cancel safe) until `deadline`, which also cuts a request in
/// flight (a slow or unreachable server) except the one attempt of a zero
/// timeout, then fails with `timeout()`; or until the locker closes.
pub(crate) async fn bounded<T>(
    locker: &Locker,
    started: Instant,
    deadline: Option<Instant>,
    wait: impl Future<Output = Result<T>>,
    timeout: impl FnOnce() -> Error,
) -> Result<T> {
    let closed = locker.closed_token();
    let bounded = async {
        match deadline {
            Some(d) if d > started => tokio::time::timeout_at(d, wait)
                .await
                .unwrap_or_else(|_| Err(timeout())),
            _ => wait.await,
        }
    };
    tokio::select! {
        biased;
        () = closed.cancelled() => Err(Error::Closed),
        r = bounded => r,
    }
}
