//! The state of one held lease, shared by its guard and the keeper.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, LostReason};
use crate::key::Keys;
use crate::obs;
use crate::options::LeaseOptions;

/// The state of one held lease shared by its guard and the keeper.
#[derive(Debug)]
pub(crate) struct LeaseState {
    pub(crate) id: u64,
    pub(crate) keys: Keys,
    pub(crate) token: String,
    pub(crate) fence: u64,
    pub(crate) expiry: Duration,
    /// The drift margin's terms, for the validity of an extension of any length.
    drift_factor: f64,
    drift_floor: Duration,
    pub(crate) acquired_at: Instant,
    /// The metrics name of the lock.
    pub(crate) name: obs::Name,
    /// When the lost signal fires unless a renewal is confirmed first: the
    /// local validity deadline, or the hold limit if sooner. Written by the
    /// keeper (and by the locker when it hands the lease over), read by
    /// [`LockGuard::expires_in`](crate::LockGuard::expires_in).
    deadline: Mutex<Option<Instant>>,
    lost: CancellationToken,
    /// A lock on several keys: the signal all its leases share, fired with
    /// this one's.
    group: Mutex<Option<CancellationToken>>,
    reason: OnceLock<LostReason>,
    /// Counts the lease in the held-leases gauge until it is released,
    /// lost or detached, whichever comes first.
    held: Mutex<Option<obs::Unit>>,
    /// Set when its guard started releasing it: a renewal that then finds the
    /// key gone is the release, not a theft.
    releasing: AtomicBool,
}

impl LeaseState {
    pub(crate) fn new(
        id: u64,
        keys: Keys,
        token: String,
        fence: u64,
        opts: &LeaseOptions,
        name: obs::Name,
    ) -> Self {
        LeaseState {
            id,
            keys,
            token,
            fence,
            expiry: opts.expiry,
            drift_factor: opts.drift_factor,
            drift_floor: opts.drift_floor,
            acquired_at: Instant::now(),
            name,
            deadline: Mutex::new(None),
            lost: CancellationToken::new(),
            group: Mutex::new(None),
            reason: OnceLock::new(),
            releasing: AtomicBool::new(false),
            held: Mutex::new(None),
        }
    }

    /// How long the lease stays valid, locally, after a request that set its
    /// server TTL to `ttl` was sent: `ttl` less the drift margin for `ttl`.
    pub(crate) fn validity_for(&self, ttl: Duration) -> Duration {
        crate::options::validity_for(ttl, self.drift_factor, self.drift_floor)
    }

    pub(crate) fn set_deadline(&self, deadline: Instant) {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner) = Some(deadline);
    }

    pub(crate) fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn set_releasing(&self) {
        self.releasing.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_releasing(&self) -> bool {
        self.releasing.load(Ordering::Relaxed)
    }

    /// Counts the lease in the held-leases gauge.
    pub(crate) fn count_held(&self, unit: obs::Unit) {
        *self.held.lock().unwrap_or_else(PoisonError::into_inner) = Some(unit);
    }

    /// Takes the lease out of the held-leases gauge (once; later calls do nothing).
    pub(crate) fn uncount_held(&self) {
        let unit = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(unit);
    }

    /// Records the loss (the first reason wins) and fires the lost signal.
    pub(crate) fn mark_lost(&self, reason: LostReason) {
        self.uncount_held();
        if self.reason.set(reason).is_ok() {
            obs::lost(&self.keys.name, &self.name, reason);
            self.lost.cancel();
            if let Some(group) = &*self.group.lock().unwrap_or_else(PoisonError::into_inner) {
                group.cancel();
            }
        }
    }

    /// Makes `group` fire when this lease is lost (at once if it already is).
    pub(crate) fn join_group(&self, group: &CancellationToken) {
        let mut slot = self.group.lock().unwrap_or_else(PoisonError::into_inner);
        *slot = Some(group.clone());
        // Under the lock: a loss either saw the group or fired `lost` first.
        if self.lost.is_cancelled() {
            group.cancel();
        }
    }

    pub(crate) fn lost_reason(&self) -> Option<LostReason> {
        self.reason.get().copied()
    }

    pub(crate) fn lost_token(&self) -> &CancellationToken {
        &self.lost
    }

    pub(crate) fn lost_error(&self, reason: LostReason) -> Error {
        Error::Lost {
            key: crate::error::shorten(&self.keys.name),
            reason,
        }
    }
}
