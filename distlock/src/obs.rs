//! Observability: `tracing` events on acquire, wait, renew, lose and release (the
//! key and the outcome, never tokens or passwords), and, with the `metrics`
//! feature, counters and histograms through the `metrics` facade:
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `distlock_acquired_total` | counter | |
//! | `distlock_acquire_failed_total` | counter | `reason` = timeout, busy, closed, error |
//! | `distlock_wait_seconds` | histogram | |
//! | `distlock_hold_seconds` | histogram | |
//! | `distlock_renewals_total` | counter | `outcome` = ok, error |
//! | `distlock_lost_total` | counter | `reason` |

use std::time::Duration;

use crate::error::{Error, LostReason};

pub(crate) fn acquired(key: &str, fence: u64, waited: Duration) {
    tracing::debug!(
        key,
        fence,
        waited_ms = waited.as_millis() as u64,
        "lock acquired"
    );
    #[cfg(feature = "metrics")]
    {
        metrics::counter!("distlock_acquired_total").increment(1);
        metrics::histogram!("distlock_wait_seconds").record(waited.as_secs_f64());
    }
}

pub(crate) fn acquire_failed(key: &str, err: &Error) {
    let reason = match err {
        Error::Timeout { .. } => "timeout",
        Error::Busy { .. } => "busy",
        Error::Closed => "closed",
        _ => "error",
    };
    tracing::debug!(key, reason, error = %err, "lock not acquired");
    #[cfg(feature = "metrics")]
    metrics::counter!("distlock_acquire_failed_total", "reason" => reason).increment(1);
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

pub(crate) fn lost(key: &str, reason: LostReason) {
    tracing::warn!(key, reason = %reason, "lease lost");
    #[cfg(feature = "metrics")]
    metrics::counter!("distlock_lost_total", "reason" => format!("{reason:?}")).increment(1);
}

pub(crate) fn released(key: &str, held: Duration) {
    tracing::debug!(key, held_ms = held.as_millis() as u64, "lock released");
    #[cfg(feature = "metrics")]
    metrics::histogram!("distlock_hold_seconds").record(held.as_secs_f64());
}
