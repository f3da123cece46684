//! Guards of held locks, the lost-signal future, and detached leases.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::error::{Error, LostReason, Result};
use crate::keeper::Cmd;
use crate::key::LockKind;
use crate::lease::LeaseState;
use crate::locker::Locker;

/// A held lock. The lease renews itself in the background until the guard is
/// released, dropped or detached, or until the lease is lost.
///
/// Dropping the guard releases the lock at once, in the background (`Drop` never
/// blocks). Call [`release`](LockGuard::release) to learn whether the lease was
/// still held at the end.
///
/// # Examples
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
/// let locker = distlock::Locker::memory();
/// let guard = locker.lock("invoice:42").acquire().await?;
/// println!("fencing token {}", guard.fencing_token());
/// tokio::select! {
///     reason = guard.lost() => println!("lost the lock: {reason}"),
///     () = async { /* the critical section */ } => {}
/// }
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[must_use = "dropping the guard releases the lock at once"]
pub struct LockGuard {
    lease: Arc<LeaseState>,
    locker: Locker,
    armed: bool,
    /// Dropped, the key is left held until then (the runner's `at_least`).
    keep_until: Option<Instant>,
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.lease.keys.name)
            .field("fencing_token", &self.lease.fence)
            .field("lost", &self.lease.lost_reason())
            .finish_non_exhaustive()
    }
}

impl LockGuard {
    pub(crate) fn new(lease: Arc<LeaseState>, locker: Locker) -> Self {
        LockGuard {
            lease,
            locker,
            armed: true,
            keep_until: None,
        }
    }

    /// Dropped before `until`, the guard leaves the key held until then
    /// instead of releasing it (the runner's `at_least`, also when its future
    /// is dropped mid-work).
    pub(crate) fn keep_until(&mut self, until: Instant) {
        self.keep_until = Some(until);
    }

    pub(crate) fn state(&self) -> &Arc<LeaseState> {
        &self.lease
    }

    /// The lock's key, as passed to [`Locker::lock`].
    pub fn key(&self) -> &str {
        &self.lease.keys.name
    }

    /// The fencing token: strictly greater than the token of every earlier holder
    /// of this key. Pass it to the resource you protect, and have the resource
    /// reject writes carrying a smaller token than one it has seen.
    pub fn fencing_token(&self) -> u64 {
        self.lease.fence
    }

    /// The lease expiry (how long the key lives on the server without a renewal).
    pub fn expiry(&self) -> Duration {
        self.lease.expiry
    }

    /// How long until this process considers the lease lost unless a renewal
    /// is confirmed first: the time to the local validity deadline (the
    /// instant the last confirmed acquire or renewal request was *sent*, plus
    /// the TTL it set, less the drift margin), or to the hold limit if that
    /// comes sooner. Zero once the lease is lost.
    ///
    /// This is the local view, on the monotonic clock, with no round trip: it
    /// is always earlier than the key's expiry on the server (which
    /// [`Locker::inspect`] reports), so that the lost signal fires before any
    /// other client could take the lock. While renewals succeed it moves
    /// forward at every renewal.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
    /// use std::time::Duration;
    ///
    /// let locker = distlock::Locker::memory();
    /// let guard = locker.lock("report").acquire().await?;
    /// assert!(guard.expires_in() <= guard.expiry());
    /// assert!(guard.expires_in() > Duration::from_secs(20)); // 30 s by default
    /// # Ok(()) }
    /// ```
    pub fn expires_in(&self) -> Duration {
        if self.is_lost() {
            return Duration::ZERO;
        }
        self.lease.deadline().map_or(Duration::ZERO, |d| {
            d.saturating_duration_since(Instant::now())
        })
    }

    /// Extends the lease so that its key lives on the server at least `by`
    /// from now, in one round trip, and keeps it at least that long: the
    /// renewals that follow set the key's TTL to reach that far too (never
    /// less than the lease's expiry), until it has passed. For work whose
    /// length you know in advance (a long step ahead: extend before it), or a
    /// lease managed by hand. An extension never shortens a lease: `by`
    /// shorter than what the key has left changes nothing but renews it.
    ///
    /// On success the local validity deadline ([`expires_in`]) moves to the
    /// time the request was sent plus `by`, less the drift margin for `by`:
    /// still earlier than the server's expiry, so the lost signal keeps
    /// firing before another client could take the lock. The lease is still
    /// renewed every renewal period; extensions and renewals are sent one at
    /// a time, so a renewal can never land after an extension and cut it
    /// short.
    ///
    /// [`expires_in`]: LockGuard::expires_in
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
    /// use std::time::Duration;
    ///
    /// let locker = distlock::Locker::memory();
    /// let guard = locker.lock("nightly-export").acquire().await?;
    /// guard.extend(Duration::from_secs(600)).await?; // the slow part is next
    /// assert!(guard.expires_in() > Duration::from_secs(500));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Lost`] if the lease is gone (another owner holds the key, it
    /// expired, or it was lost before); [`Error::Config`] if `by` is longer
    /// than [`MAX_EXPIRY`](crate::MAX_EXPIRY); [`Error::Closed`] if the
    /// locker was closed; [`Error::Unavailable`] (or another backend error)
    /// if the server did not answer: the extension may then have happened or
    /// not, and the renewals keep trying to reach it.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future does not cancel the extension: once asked for,
    /// the renewals keep the key alive for `by` (or the lease is released
    /// or lost first).
    pub async fn extend(&self, by: Duration) -> Result<()> {
        if by > crate::MAX_EXPIRY {
            return Err(Error::config(format!(
                "cannot extend a lease by {}: the longest is {}",
                crate::options::fmt(by),
                crate::options::fmt(crate::MAX_EXPIRY)
            )));
        }
        if let Some(reason) = self.lease.lost_reason() {
            return Err(self.lease.lost_error(reason));
        }
        let (tx, rx) = oneshot::channel();
        let sent = self.locker.keeper().send(Cmd::Extend {
            lease: Arc::clone(&self.lease),
            by,
            reply: tx,
        });
        if !sent {
            return Err(Error::Closed);
        }
        match rx.await {
            Ok(result) => result,
            // The keeper let the lease go (lost, or closed) before answering.
            Err(_) => Err(match self.lease.lost_reason() {
                Some(reason) => self.lease.lost_error(reason),
                None => Error::Closed,
            }),
        }
    }

    /// A future that completes, with the reason, when the lease is lost. It never
    /// completes if the lease is released normally.
    pub fn lost(&self) -> Lost {
        Lost::new(Arc::clone(&self.lease))
    }

    /// True once the lease is lost.
    pub fn is_lost(&self) -> bool {
        self.lease.lost_reason().is_some()
    }

    /// Why the lease was lost, if it was.
    pub fn lost_reason(&self) -> Option<LostReason> {
        self.lease.lost_reason()
    }

    /// A token cancelled when the lease is lost: hand it to work that must stop
    /// then. Cancelling it yourself does not release the lock.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.lease.lost_token().child_token()
    }

    /// Releases the lock and wakes its waiters.
    ///
    /// # Errors
    ///
    /// [`Error::Lost`] if the lease was lost before the release (the critical
    /// section may have overlapped with another owner's), [`Error::Unavailable`]
    /// or another backend error if Redis could not be told (the key then expires
    /// by itself).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if this future is dropped, the release still happens
    /// (the keeper carries it out); only its outcome is not reported, and no
    /// lost signal fires for it.
    pub async fn release(self) -> Result<()> {
        self.finish(None).await
    }

    /// Releases the lock so that the key stays held until `until` and then
    /// expires, without renewal (ShedLock's "lock at least for"). Releases at once
    /// if `until` has passed.
    pub(crate) async fn release_at(self, until: Instant) -> Result<()> {
        self.finish(Some(until)).await
    }

    async fn finish(mut self, keep_until: Option<Instant>) -> Result<()> {
        self.armed = false;
        if let Some(reason) = self.lease.lost_reason() {
            return Err(self.lease.lost_error(reason));
        }
        if keep_until.is_none() {
            return self.release_here().await;
        }
        let (tx, rx) = oneshot::channel();
        let sent = self.locker.keeper().send(Cmd::Release {
            lease: Arc::clone(&self.lease),
            keep_until,
            reply: Some(tx),
        });
        if !sent {
            return Err(Error::Closed);
        }
        rx.await.unwrap_or(Err(Error::Closed))
    }

    /// Releases in the caller's task: one round trip, without a hop through the
    /// keeper task and back (which cost more than the round trip itself). The
    /// keeper is told afterwards, without waiting; if this future is dropped
    /// before Redis answers, the keeper releases instead.
    async fn release_here(&self) -> Result<()> {
        let handover = Handover {
            lease: Some(Arc::clone(&self.lease)),
            locker: &self.locker,
        };
        self.lease.set_releasing();
        let result = crate::keeper::release(self.locker.backend(), &self.lease, None).await;
        handover.done();
        result
    }

    /// Releases the guards of one acquisition on several keys together (see
    /// [`Backend::release_all`](crate::backend::Backend::release_all)); one
    /// outcome per guard, or one error for all. Cancel safe as
    /// [`release`](LockGuard::release).
    pub(crate) async fn release_together(guards: Vec<LockGuard>) -> Vec<Result<()>> {
        let (lost, mut live): (Vec<_>, Vec<_>) = guards
            .into_iter()
            .partition(|g| g.lease.lost_reason().is_some());
        for g in &mut live {
            g.armed = false;
        }
        // From here the handovers release what this future, dropped, did not.
        let handovers: Vec<Handover<'_>> = live
            .iter()
            .map(|g| {
                g.lease.set_releasing();
                Handover {
                    lease: Some(Arc::clone(&g.lease)),
                    locker: &g.locker,
                }
            })
            .collect();
        let mut out = Vec::with_capacity(lost.len() + live.len());
        if let Some(first) = live.first() {
            let leases: Vec<&LeaseState> = live.iter().map(|g| &*g.lease).collect();
            out.extend(crate::keeper::release_all(first.locker.backend(), &leases).await);
        }
        for handover in handovers {
            handover.done();
        }
        for guard in lost {
            out.push(guard.release().await);
        }
        out
    }

    /// Stops renewing and returns the lease as a plain value, to be extended or
    /// released later, from another task or process, with
    /// [`Locker::extend_lease`], [`Locker::release_lease`] or [`Locker::adopt`].
    /// The key expires by itself if nobody does.
    pub fn detach(mut self) -> Lease {
        self.armed = false;
        self.lease.uncount_held();
        self.locker.keeper().send(Cmd::Forget { id: self.lease.id });
        Lease {
            key: self.lease.keys.name.clone(),
            kind: self.lease.keys.kind,
            token: self.lease.token.clone(),
            fencing_token: self.lease.fence,
            expiry: self.lease.expiry,
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.armed {
            self.locker.keeper().send(Cmd::Release {
                lease: Arc::clone(&self.lease),
                keep_until: self.keep_until,
                reply: None,
            });
        }
    }
}

/// A release in progress in the caller's task. Dropped before [`done`], it
/// hands the release to the keeper (the cancel-safe path).
///
/// [`done`]: Handover::done
struct Handover<'a> {
    lease: Option<Arc<LeaseState>>,
    locker: &'a Locker,
}

impl Handover<'_> {
    /// The release is over: the keeper only forgets the lease.
    fn done(mut self) {
        if let Some(lease) = self.lease.take() {
            lease.uncount_held();
            self.locker.keeper().send(Cmd::Forget { id: lease.id });
        }
    }
}

impl Drop for Handover<'_> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.locker.keeper().send(Cmd::Release {
                lease,
                keep_until: None,
                reply: None,
            });
        }
    }
}

pin_project_lite::pin_project! {
    /// A future that completes with the reason when a lease is lost; see
    /// [`LockGuard::lost`] and [`MultiGuard::lost`](crate::MultiGuard::lost).
    /// It is `Send + 'static`, so it can be moved into other tasks.
    #[must_use = "futures do nothing unless polled"]
    pub struct Lost {
        #[pin]
        cancelled: WaitForCancellationFutureOwned,
        // The leases whose loss fires it (one, or those of a lock on
        // several keys).
        leases: Box<[Arc<LeaseState>]>,
    }
}

impl Lost {
    pub(crate) fn new(lease: Arc<LeaseState>) -> Self {
        Lost {
            cancelled: lease.lost_token().clone().cancelled_owned(),
            leases: Box::new([lease]),
        }
    }

    /// Fires with `signal`, which any of `leases` fires when lost.
    pub(crate) fn any(signal: &CancellationToken, leases: Box<[Arc<LeaseState>]>) -> Self {
        Lost {
            cancelled: signal.clone().cancelled_owned(),
            leases,
        }
    }
}

impl fmt::Debug for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<&str> = self.leases.iter().map(|l| l.keys.name.as_str()).collect();
        f.debug_struct("Lost")
            .field("keys", &keys)
            .finish_non_exhaustive()
    }
}

impl Future for Lost {
    type Output = LostReason;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<LostReason> {
        let this = self.project();
        ready!(this.cancelled.poll(cx));
        let reason = this.leases.iter().find_map(|l| l.lost_reason());
        Poll::Ready(reason.unwrap_or(LostReason::Closed))
    }
}

/// A detached lease: what is needed to extend or release a held lock later, from
/// anywhere. Serializable with the `serde` feature.
///
/// The token is the proof of ownership: treat a `Lease` like a credential.
#[derive(Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Lease {
    key: String,
    kind: LockKind,
    token: String,
    fencing_token: u64,
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    expiry: Duration,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("kind", &self.kind)
            .field("fencing_token", &self.fencing_token)
            .field("expiry", &self.expiry)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// The lock's key.
    pub fn key(&self) -> &str {
        &self.key
    }
    /// The fencing token of the acquisition.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }
    /// The expiry each extension sets.
    pub fn expiry(&self) -> Duration {
        self.expiry
    }
    pub(crate) fn token(&self) -> &str {
        &self.token
    }
    pub(crate) fn kind(&self) -> LockKind {
        self.kind
    }
}
