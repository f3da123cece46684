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
use crate::keeper::{Cmd, LeaseState};
use crate::key::Kind;
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
/// # async fn main_() -> Result<(), distlock::Error> {
/// let locker = distlock::Locker::memory();
/// let guard = locker.lock("invoice:42").acquire().await?;
/// println!("fencing token {}", guard.fencing_token());
/// tokio::select! {
///     reason = guard.lost() => println!("lost the lock: {reason}"),
///     () = async { /* the critical section */ } => {}
/// }
/// guard.release().await?;
/// # Ok(()) }
/// # tokio::runtime::Runtime::new().unwrap().block_on(main_()).unwrap();
/// ```
#[must_use = "dropping the guard releases the lock at once"]
pub struct LockGuard {
    lease: Arc<LeaseState>,
    locker: Locker,
    armed: bool,
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
        }
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
    /// Cancel safe: if this future is dropped, the release still happens.
    ///
    /// # Errors
    ///
    /// [`Error::Lost`] if the lease was lost before the release (the critical
    /// section may have overlapped with another owner's), [`Error::Unavailable`]
    /// or another backend error if Redis could not be told (the key then expires
    /// by itself).
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

    /// Stops renewing and returns the lease as a plain value, to be extended or
    /// released later, from another task or process, with
    /// [`Locker::extend_lease`], [`Locker::release_lease`] or [`Locker::adopt`].
    /// The key expires by itself if nobody does.
    pub fn detach(mut self) -> Lease {
        self.armed = false;
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
                keep_until: None,
                reply: None,
            });
        }
    }
}

pin_project_lite::pin_project! {
    /// A future that completes with the reason when a lease is lost; see
    /// [`LockGuard::lost`]. It is `Send + 'static`, so it can be moved into other
    /// tasks.
    #[must_use = "futures do nothing unless polled"]
    pub struct Lost {
        #[pin]
        cancelled: WaitForCancellationFutureOwned,
        lease: Arc<LeaseState>,
    }
}

impl Lost {
    pub(crate) fn new(lease: Arc<LeaseState>) -> Self {
        Lost {
            cancelled: lease.lost_token().clone().cancelled_owned(),
            lease,
        }
    }
}

impl fmt::Debug for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lost")
            .field("key", &self.lease.keys.name)
            .finish_non_exhaustive()
    }
}

impl Future for Lost {
    type Output = LostReason;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<LostReason> {
        let this = self.project();
        ready!(this.cancelled.poll(cx));
        Poll::Ready(this.lease.lost_reason().unwrap_or(LostReason::Closed))
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
    kind: Kind,
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
    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }
}
