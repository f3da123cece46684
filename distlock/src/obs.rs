//! Observability: `tracing` events on acquire, wait, renew, lose and release (the
//! key and the outcome, never tokens or passwords), and, with the `metrics`
//! feature, counters, histograms and gauges through the `metrics` facade.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `distlock_acquired_total` | counter | `name` |
//! | `distlock_acquire_failed_total` | counter | `name`, `reason` = timeout, busy, closed, error |
//! | `distlock_wait_seconds` | histogram | `name` |
//! | `distlock_hold_seconds` | histogram | `name` |
//! | `distlock_lost_total` | counter | `name`, `reason` |
//! | `distlock_renewals_total` | counter | `outcome` = ok, error |
//! | `distlock_held_leases` | gauge | `locker` |
//! | `distlock_waiting_tasks` | gauge | `locker` |
//!
//! `name` is a low-cardinality name for what is locked, never the key itself
//! (keys such as `invoice:42` would make a time series per invoice): the one
//! given to [`Lock::name`](crate::Lock::name), the key *template* of
//! `#[distributed_lock]`, a tower layer's name, or `unnamed`. `locker` is the
//! name given to [`LockerBuilder::name`](crate::LockerBuilder::name)
//! (`default` if none): the gauges are per locker.

use std::sync::Arc;
use std::time::Duration;

use crate::error::{Chain, Error, LostReason};

/// The metrics name of a lock, if one was given.
pub(crate) type Name = Option<Arc<str>>;

#[cfg(feature = "metrics")]
fn label(name: &Name) -> metrics::SharedString {
    match name {
        Some(n) => metrics::SharedString::from(Arc::clone(n)),
        None => metrics::SharedString::const_str("unnamed"),
    }
}

/// One unit of a per-locker gauge, given back when dropped: a lease the
/// keeper holds, a task waiting for a lock. Nothing without `metrics`.
#[derive(Debug)]
pub(crate) struct Unit {
    #[cfg(feature = "metrics")]
    gauge: metrics::Gauge,
}

impl Unit {
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn new(metric: &'static str, locker: &Arc<str>) -> Unit {
        #[cfg(feature = "metrics")]
        {
            let gauge = metrics::gauge!(metric, "locker" => metrics::SharedString::from(Arc::clone(locker)));
            gauge.increment(1.0);
            Unit { gauge }
        }
        #[cfg(not(feature = "metrics"))]
        Unit {}
    }
}

impl Drop for Unit {
    fn drop(&mut self) {
        #[cfg(feature = "metrics")]
        self.gauge.decrement(1.0);
    }
}

/// A lease the keeper of the locker named `locker` now holds.
pub(crate) fn held(locker: &Arc<str>) -> Unit {
    Unit::new("distlock_held_leases", locker)
}

/// A task of the locker named `locker` now waits for a lock.
pub(crate) fn waiting_task(locker: &Arc<str>) -> Unit {
    Unit::new("distlock_waiting_tasks", locker)
}

pub(crate) fn acquired(key: &str, name: &Name, fence: u64, waited: Duration) {
    tracing::debug!(
        key,
        fence,
        waited_ms = waited.as_millis() as u64,
        "lock acquired"
    );
    #[cfg(feature = "metrics")]
    {
        metrics::counter!("distlock_acquired_total", "name" => label(name)).increment(1);
        metrics::histogram!("distlock_wait_seconds", "name" => label(name))
            .record(waited.as_secs_f64());
    }
    #[cfg(not(feature = "metrics"))]
    let _ = name;
}

pub(crate) fn acquire_failed(key: &str, name: &Name, err: &Error) {
    let reason = match err {
        Error::Timeout { .. } => "timeout",
        Error::Busy { .. } => "busy",
        Error::Closed => "closed",
        _ => "error",
    };
    tracing::debug!(key, reason, error = %Chain(err), "lock not acquired");
    failed(name, reason);
}

/// A `try_acquire` found the lock held.
pub(crate) fn acquire_busy(key: &str, name: &Name) {
    tracing::debug!(key, reason = "busy", "lock not acquired");
    failed(name, "busy");
}

fn failed(name: &Name, reason: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("distlock_acquire_failed_total", "name" => label(name), "reason" => reason)
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (name, reason);
}

pub(crate) fn waiting(key: &str, attempt: u32, sleep: Duration) {
    tracing::trace!(
        key,
        attempt,
        sleep_ms = sleep.as_millis() as u64,
        "lock held elsewhere; waiting"
    );
}

pub(crate) fn renewed(leases: usize, ok: bool) {
    tracing::trace!(leases, ok, "renewal batch");
    #[cfg(feature = "metrics")]
    metrics::counter!("distlock_renewals_total", "outcome" => if ok { "ok" } else { "error" })
        .increment(leases as u64);
}

pub(crate) fn lost(key: &str, name: &Name, reason: LostReason) {
    tracing::warn!(key, reason = %reason, "lease lost");
    #[cfg(feature = "metrics")]
    metrics::counter!("distlock_lost_total", "name" => label(name), "reason" => format!("{reason:?}"))
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = name;
}

pub(crate) fn released(key: &str, name: &Name, held: Duration) {
    tracing::debug!(key, held_ms = held.as_millis() as u64, "lock released");
    #[cfg(feature = "metrics")]
    metrics::histogram!("distlock_hold_seconds", "name" => label(name)).record(held.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = name;
}
