//! Lease options shared by every lock of a `Locker`, and their validation.

use std::time::Duration;

use crate::error::{Error, Result};

/// The shortest lease expiry accepted.
pub const MIN_EXPIRY: Duration = Duration::from_millis(100);
/// The longest lease expiry accepted.
pub const MAX_EXPIRY: Duration = Duration::from_secs(24 * 3600);
/// The smallest drift factor accepted: 0.1 %. The client measures a lease on
/// its monotonic clock and Redis expires the key on its own; NTP may slew
/// either clock's rate by up to 500 ppm, so two clocks slewed in opposite
/// directions disagree by up to 0.1 % of the expiry.
pub(crate) const MIN_DRIFT_FACTOR: f64 = 0.001;
/// The smallest drift floor accepted: 1 ms. Redis keeps expiries in whole
/// milliseconds and the client's timers fire on a millisecond wheel, so a
/// deadline exactly at the server's expiry may be signalled after it.
pub(crate) const MIN_DRIFT_FLOOR: Duration = Duration::from_millis(1);
/// The longest `max_hold` (`at_most`) or `at_least` accepted: one year.
pub const MAX_HOLD: Duration = Duration::from_secs(365 * 24 * 3600);

/// Checks a hold bound (`max_hold`, `at_most`, `at_least`) against
/// [`MAX_HOLD`]; `at_least` may be zero, the others may not.
pub(crate) fn check_hold(name: &str, d: Duration) -> Result<()> {
    let zero_ok = name == "at_least";
    if (d.is_zero() && !zero_ok) || d > MAX_HOLD {
        let low = if zero_ok { "0" } else { "1ms" };
        return Err(Error::config(format!(
            "{name} must be between {low} and 365 days (got {})",
            fmt(d)
        )));
    }
    Ok(())
}

/// The drift margin for a server TTL of `ttl`: `factor` of it plus `floor`.
fn drift_for(ttl: Duration, factor: f64, floor: Duration) -> Duration {
    ttl.mul_f64(factor) + floor
}

/// How long a lease stays valid, locally, after a request that set its
/// server TTL to `ttl` was sent: `ttl` less the drift margin for `ttl`.
pub(crate) fn validity_for(ttl: Duration, factor: f64, floor: Duration) -> Duration {
    ttl.saturating_sub(drift_for(ttl, factor, floor))
}

/// Lease timing: expiry, renewal cadence, drift margin, hold limit and retry backoff.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LeaseOptions {
    pub(crate) expiry: Duration,
    /// `None`: a third of the expiry.
    pub(crate) renew_every: Option<Duration>,
    pub(crate) drift_factor: f64,
    pub(crate) drift_floor: Duration,
    pub(crate) max_hold: Option<Duration>,
    pub(crate) retry_min: Duration,
    pub(crate) retry_max: Duration,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions {
            expiry: Duration::from_secs(30),
            renew_every: None,
            drift_factor: 0.01,
            drift_floor: Duration::from_millis(2),
            max_hold: None,
            retry_min: Duration::from_millis(50),
            retry_max: Duration::from_secs(1),
        }
    }
}

impl LeaseOptions {
    /// The renewal cadence.
    pub(crate) fn renew_every(&self) -> Duration {
        self.renew_every.unwrap_or(self.expiry / 3)
    }

    /// How much earlier than the server the client considers a lease expired.
    pub(crate) fn drift(&self) -> Duration {
        drift_for(self.expiry, self.drift_factor, self.drift_floor)
    }

    /// How long a lease stays valid, locally, after the request that set its
    /// expiry was sent.
    pub(crate) fn validity(&self) -> Duration {
        self.validity_of(None)
    }

    /// [`validity`](Self::validity) of a lease the server set to expire
    /// after `granted_for` instead of the expiry (`None`).
    pub(crate) fn validity_of(&self, granted_for: Option<Duration>) -> Duration {
        validity_for(
            granted_for.unwrap_or(self.expiry),
            self.drift_factor,
            self.drift_floor,
        )
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.expiry < MIN_EXPIRY {
            return Err(Error::config(format!(
                "expiry must be at least 100ms (got {})",
                fmt(self.expiry)
            )));
        }
        if self.expiry > MAX_EXPIRY {
            return Err(Error::config(format!(
                "expiry must be at most 24h (got {})",
                fmt(self.expiry)
            )));
        }
        // The local deadline must come strictly before the server's expiry,
        // whatever the clocks' rates: a zero margin voids the guarantee.
        if !(MIN_DRIFT_FACTOR..0.5).contains(&self.drift_factor) {
            return Err(Error::config(format!(
                "drift factor must be in [0.001, 0.5) (got {}): Redis's clock and this \
                 process's may run at rates 0.1 % apart",
                self.drift_factor
            )));
        }
        if self.drift_floor < MIN_DRIFT_FLOOR {
            return Err(Error::config(format!(
                "drift floor must be at least 1ms (got {}): Redis expires keys on \
                 millisecond boundaries",
                fmt(self.drift_floor)
            )));
        }
        if self.drift() >= self.expiry / 2 {
            return Err(Error::config(format!(
                "the drift margin ({}) must be less than half the expiry ({})",
                fmt(self.drift()),
                fmt(self.expiry)
            )));
        }
        let renew = self.renew_every();
        if renew.is_zero() {
            return Err(Error::config("renew_every must be greater than zero"));
        }
        if renew >= self.validity() {
            return Err(Error::config(format!(
                "renew_every ({}) must be shorter than the expiry less the drift margin ({})",
                fmt(renew),
                fmt(self.validity())
            )));
        }
        if let Some(max) = self.max_hold {
            check_hold("max_hold", max)?;
        }
        if self.retry_min.is_zero() || self.retry_min > self.retry_max {
            return Err(Error::config(format!(
                "retry backoff must satisfy 0 < min <= max (got {} and {})",
                fmt(self.retry_min),
                fmt(self.retry_max)
            )));
        }
        if self.retry_max > Duration::from_secs(60) {
            return Err(Error::config("retry backoff maximum must be at most 60s"));
        }
        Ok(())
    }

    /// The `n`th retry delay: exponential from `retry_min` to `retry_max`, with
    /// ±25 % jitter so that contenders spread out.
    pub(crate) fn backoff(&self, n: u32) -> Duration {
        let base = self
            .retry_min
            .saturating_mul(1u32 << n.min(16))
            .min(self.retry_max);
        base.mul_f64(0.75 + fastrand::f64() * 0.5)
    }
}

/// Formats a duration the way users write them ("1s 500ms").
pub(crate) fn fmt(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut LeaseOptions)) -> LeaseOptions {
        let mut o = LeaseOptions::default();
        f(&mut o);
        o
    }

    #[test]
    fn defaults_are_valid() {
        let o = LeaseOptions::default();
        o.validate().unwrap();
        assert_eq!(o.renew_every(), Duration::from_secs(10));
        assert_eq!(o.drift(), Duration::from_millis(302));
    }

    #[test]
    fn invalid_options_are_rejected() {
        let cases = [
            with(|o| o.expiry = Duration::from_millis(99)),
            with(|o| o.expiry = Duration::ZERO),
            with(|o| o.expiry = Duration::MAX),
            with(|o| o.renew_every = Some(Duration::from_secs(30))),
            with(|o| o.renew_every = Some(Duration::from_secs(40))),
            with(|o| o.renew_every = Some(Duration::ZERO)),
            with(|o| o.drift_factor = 0.9),
            with(|o| o.drift_factor = f64::NAN),
            with(|o| o.drift_factor = 0.0),
            with(|o| o.drift_factor = 0.000_9),
            with(|o| o.drift_factor = -0.01),
            with(|o| o.drift_floor = Duration::ZERO),
            with(|o| o.drift_floor = Duration::from_micros(999)),
            with(|o| o.max_hold = Some(Duration::MAX)),
            with(|o| o.retry_min = Duration::ZERO),
            with(|o| o.retry_min = Duration::from_secs(2)),
        ];
        for o in cases {
            assert!(matches!(o.validate(), Err(Error::Config { .. })), "{o:?}");
        }
    }

    #[test]
    fn the_smallest_drift_margin_is_accepted() {
        with(|o| {
            o.drift_factor = MIN_DRIFT_FACTOR;
            o.drift_floor = MIN_DRIFT_FLOOR;
        })
        .validate()
        .unwrap();
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let o = LeaseOptions::default();
        assert!(o.backoff(0) <= Duration::from_millis(63));
        assert!(o.backoff(100) <= Duration::from_millis(1250));
        assert!(o.backoff(100) >= Duration::from_millis(750));
    }
}
