//! The shared runner: acquire, run the work, cancel it if the lease is lost,
//! release. `#[distributed_lock]` and the tower layer both call it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{Chain, Error, Result};
use crate::guard::{LockGuard, Lost};
use crate::key::LockKind;
use crate::lease::LeaseState;
use crate::lock::Lock;

/// What to do when the lock is held by another owner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OnBusy {
    /// Wait for it, up to the policy's timeout (forever without one).
    #[default]
    Wait,
    /// Do not run the work: [`Lock::run`] returns `Ok(None)`. For job
    /// deduplication: the job runs on whichever replica gets the lock.
    Skip,
    /// Fail with [`Error::Busy`].
    Reject,
}

/// How [`Lock::run`] acquires, holds and releases.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use distlock::{OnBusy, Policy};
///
/// // Wait up to 5 s; cancel the work after 10 minutes.
/// let handler = Policy::new()
///     .timeout(Duration::from_secs(5))
///     .at_most(Duration::from_secs(600));
///
/// // A scheduled job on N replicas: one runs it, the others skip; keep the lock
/// // a minute after it ends, so replicas with late clocks skip too.
/// let job = Policy::new()
///     .on_busy(OnBusy::Skip)
///     .at_least(Duration::from_secs(60));
/// # let _ = (handler, job);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
#[must_use]
pub struct Policy {
    timeout: Option<Duration>,
    on_busy: OnBusy,
    at_least: Option<Duration>,
    at_most: Option<Duration>,
    expiry: Option<Duration>,
}

impl Policy {
    /// Wait without a timeout, no hold limits, the lock's own expiry.
    pub const fn new() -> Self {
        Policy {
            timeout: None,
            on_busy: OnBusy::Wait,
            at_least: None,
            at_most: None,
            expiry: None,
        }
    }

    /// How long to wait for the lock (with [`OnBusy::Wait`]); zero makes one
    /// attempt. Without it, wait until acquired.
    pub const fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// What to do when the lock is held.
    pub const fn on_busy(mut self, on_busy: OnBusy) -> Self {
        self.on_busy = on_busy;
        self
    }

    /// Keep the lock this long after acquiring it, even if the work ends sooner
    /// (ShedLock's "lock at least for"): the key then expires by itself.
    pub const fn at_least(mut self, at_least: Duration) -> Self {
        self.at_least = Some(at_least);
        self
    }

    /// Cancel the work (the run returns [`Error::Lost`] with
    /// [`LostReason::MaxHold`](crate::LostReason::MaxHold)) once it has held the
    /// lock this long.
    pub const fn at_most(mut self, at_most: Duration) -> Self {
        self.at_most = Some(at_most);
        self
    }

    /// The lease expiry for this run (default: the lock's).
    pub const fn expiry(mut self, expiry: Duration) -> Self {
        self.expiry = Some(expiry);
        self
    }

    /// The wait timeout, if any.
    pub const fn wait_timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The busy behaviour.
    pub const fn busy(&self) -> OnBusy {
        self.on_busy
    }
}

/// The lease held by the running task, as seen from inside [`Lock::run`].
#[derive(Debug, Clone)]
pub struct Current {
    locker_id: u64,
    kind: LockKind,
    key: String,
    fencing_token: u64,
    lost: CancellationToken,
}

impl Current {
    /// The lock's key.
    pub fn key(&self) -> &str {
        &self.key
    }
    /// The fencing token of the acquisition.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }
    /// A token cancelled when the lease is lost.
    pub fn lost(&self) -> CancellationToken {
        self.lost.child_token()
    }
    /// True once the lease is lost.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }
}

tokio::task_local! {
    static HELD: Vec<Current>;
}

/// The innermost lease held by the current task through [`Lock::run`] (or
/// `#[distributed_lock]`), if any.
///
/// # Examples
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
/// let locker = distlock::Locker::memory();
/// let policy = distlock::Policy::new();
/// locker.lock("k").run(&policy, async {
///     let lease = distlock::current().expect("inside run");
///     println!("writing with fencing token {}", lease.fencing_token());
/// }).await?;
/// # Ok(()) }
/// ```
pub fn current() -> Option<Current> {
    HELD.try_with(|held| held.last().cloned()).ok().flatten()
}

/// True when the running task holds `key` through a `run` of this locker.
pub(crate) fn held_here(locker_id: u64, kind: LockKind, key: &str) -> bool {
    HELD.try_with(|held| {
        held.iter()
            .any(|c| c.locker_id == locker_id && c.kind == kind && c.key == key)
    })
    .unwrap_or(false)
}

/// `lock` with the policy's expiry and hold limit (`expiry` and `max_hold`
/// set them); checks `at_least`.
pub(crate) fn with_policy<L>(
    policy: &Policy,
    mut lock: L,
    expiry: impl FnOnce(L, Duration) -> L,
    max_hold: impl FnOnce(L, Duration) -> L,
) -> Result<L> {
    if let Some(e) = policy.expiry {
        lock = expiry(lock, e);
    }
    if let Some(at_most) = policy.at_most {
        lock = max_hold(lock, at_most);
    }
    if let Some(at_least) = policy.at_least {
        crate::options::check_hold("at_least", at_least)?;
    }
    Ok(lock)
}

/// Acquires as the policy says: `wait` until the timeout's deadline (none:
/// until acquired) with [`OnBusy::Wait`], else one attempt (`try_once`).
/// `Ok(None)`: skipped.
pub(crate) async fn acquire_by<G, W, T>(
    policy: &Policy,
    key: &str,
    wait: impl FnOnce(Option<Instant>) -> W,
    try_once: impl FnOnce() -> T,
) -> Result<Option<G>>
where
    W: Future<Output = Result<G>>,
    T: Future<Output = Result<Option<G>>>,
{
    match policy.on_busy {
        OnBusy::Wait => {
            let deadline = policy.timeout.and_then(|t| Instant::now().checked_add(t));
            wait(deadline).await.map(Some)
        }
        OnBusy::Skip => try_once().await,
        OnBusy::Reject => match try_once().await? {
            Some(g) => Ok(Some(g)),
            None => Err(Error::busy(key)),
        },
    }
}

/// When the keys of a run with `at_least` may be let go: that long after
/// the first was acquired.
pub(crate) fn keep_until(policy: &Policy, guards: &[LockGuard]) -> Option<Instant> {
    let acquired = guards.iter().map(|g| g.state().acquired_at).min()?;
    policy.at_least.and_then(|a| acquired.checked_add(a))
}

/// What a run returns, from the work's outcome and the release's.
pub(crate) fn outcome<T>(key: &str, output: Result<T>, released: Result<()>) -> Result<Option<T>> {
    match (output, released) {
        (Err(lost), _) => Err(lost),
        (Ok(_), Err(e @ Error::Lost { .. })) => Err(e),
        (Ok(out), Err(e)) => {
            // The work finished while the lease was held; only telling Redis
            // failed, and the key expires by itself.
            tracing::warn!(key, error = %Chain(&e), "release failed after the work finished");
            Ok(Some(out))
        }
        (Ok(out), Ok(())) => Ok(Some(out)),
    }
}

/// The body of [`Lock::run`]: the future owns a clone of the lock and of
/// the policy.
pub(crate) async fn run_locked<F: Future>(
    this: Lock,
    policy: Policy,
    work: F,
) -> Result<Option<F::Output>> {
    let locker_id = this.locker().id();
    if held_here(locker_id, this.kind(), this.key()) {
        return Ok(Some(work.await));
    }
    let lock = with_policy(&policy, this.clone(), Lock::expiry, Lock::max_hold)?;
    let lock = &lock;
    let acquired = acquire_by(
        &policy,
        this.key(),
        |deadline| lock.acquire_until(deadline),
        || lock.try_acquire(),
    )
    .await?;
    let Some(mut guard) = acquired else {
        return Ok(None);
    };
    let keep_until = keep_until(&policy, std::slice::from_ref(&guard));
    if let Some(until) = keep_until {
        // Also when this future is dropped mid-work: a job deduplicated with
        // `at_least` must not run again elsewhere at once.
        guard.keep_until(until);
    }
    let output = hold(locker_id, &[Arc::clone(guard.state())], guard.lost(), work).await;
    let released = match keep_until {
        Some(until) if until > Instant::now() => guard.release_at(until).await,
        _ => guard.release().await,
    };
    outcome(this.key(), output, released)
}

/// Runs `work` with the leases visible through [`current()`], racing it
/// against the lost signal `lost` (which any of them fires).
pub(crate) async fn hold<F: Future>(
    locker_id: u64,
    leases: &[Arc<LeaseState>],
    lost: Lost,
    work: F,
) -> Result<F::Output> {
    let mut stack = HELD.try_with(Clone::clone).unwrap_or_default();
    for state in leases {
        stack.push(Current {
            locker_id,
            kind: state.keys.kind,
            key: state.keys.name.clone(),
            fencing_token: state.fence,
            lost: state.lost_token().clone(),
        });
    }
    tokio::select! {
        biased;
        reason = lost => {
            let state = leases.iter().find(|l| l.lost_reason().is_some()).or(leases.first());
            Err(match state {
                Some(state) => state.lost_error(reason),
                None => Error::Closed,
            })
        }
        out = HELD.scope(stack, work) => Ok(out),
    }
}
