//! `Config`: the builder's options as a deserializable value, for configuration
//! files (`serde` feature), with human-readable durations ("30s").

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::builder::LockerBuilder;

/// Every [`LockerBuilder`] option, deserializable from a configuration file.
/// Durations are humantime strings (`"30s"`, `"1m 30s"`, `"250ms"`); missing
/// fields keep the builder's defaults; unknown fields are an error.
///
/// # Examples
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config: distlock::Config = serde_json::from_str(r#"{
///     "url": "redis://127.0.0.1:6379",
///     "key_prefix": "billing:locks:",
///     "expiry": "10s",
///     "retry_backoff": { "min": "20ms", "max": "500ms" }
/// }"#)?;
/// let builder = config.into_builder();
/// # let _ = builder;
/// # Ok(()) }
/// ```
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// One server's URL.
    pub url: Option<String>,
    /// Redlock: the independent servers (as [`LockerBuilder::redlock`];
    /// `servers` is accepted too).
    #[serde(default, alias = "servers")]
    pub redlock: Vec<String>,
    /// Redis Cluster seed nodes.
    #[serde(default)]
    pub cluster: Vec<String>,
    /// Sentinel URLs and the master's name.
    pub sentinel: Option<SentinelConfig>,
    /// Host (overrides the URL's).
    pub host: Option<String>,
    /// Port (overrides the URL's).
    pub port: Option<u16>,
    /// ACL user name.
    pub username: Option<String>,
    /// Password (never shown by `Debug`).
    pub password: Option<String>,
    /// Database number.
    pub db: Option<i64>,
    /// Use the in-memory backend.
    #[serde(default)]
    pub memory: bool,
    /// The pool's maximum size.
    pub pool_size: Option<usize>,
    /// Multiplexed connections kept checked out.
    pub connections: Option<usize>,
    /// Key prefix.
    pub key_prefix: Option<String>,
    /// Owner tag.
    pub owner_tag: Option<String>,
    /// The locker's name in metrics ([`LockerBuilder::name`](crate::LockerBuilder::name)).
    pub name: Option<String>,
    /// Lease expiry.
    #[serde(default, with = "humantime_serde")]
    pub expiry: Option<Duration>,
    /// Renewal cadence.
    #[serde(default, with = "humantime_serde")]
    pub renew_every: Option<Duration>,
    /// Clock drift margin: `{ factor = 0.01, floor = "2ms" }` (factor at
    /// least 0.001, floor at least 1ms).
    pub drift: Option<DriftConfig>,
    /// Hard hold limit.
    #[serde(default, with = "humantime_serde")]
    pub max_hold: Option<Duration>,
    /// Waiters' retry backoff.
    pub retry_backoff: Option<BackoffConfig>,
    /// One request's time limit.
    #[serde(default, with = "humantime_serde")]
    pub op_timeout: Option<Duration>,
    /// Connecting's time limit.
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// Refuse servers whose `maxmemory-policy` is not `noeviction` (see
    /// [`LockerBuilder::require_noeviction`]).
    #[serde(default)]
    pub require_noeviction: bool,
}

/// `sentinel = { urls = [...], master = "..." }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SentinelConfig {
    /// The Sentinels' URLs.
    pub urls: Vec<String>,
    /// The monitored master's name.
    pub master: String,
}

/// `drift = { factor = 0.01, floor = "2ms" }`: see [`LockerBuilder::drift`].
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DriftConfig {
    /// The share of the expiry (at least 0.001, below 0.5).
    pub factor: f64,
    /// The fixed part (at least 1ms).
    #[serde(with = "humantime_serde")]
    pub floor: Duration,
}

/// `retry_backoff = { min = "50ms", max = "1s" }`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BackoffConfig {
    /// The first delay.
    #[serde(with = "humantime_serde")]
    pub min: Duration,
    /// The largest delay.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The builder's Debug redacts URLs and the password.
        fmt::Debug::fmt(&self.clone().into_builder(), f)
    }
}

impl Config {
    /// The builder with these options; `build().await` validates them.
    pub fn into_builder(self) -> LockerBuilder {
        let mut b = LockerBuilder::new();
        if let Some(url) = self.url {
            b = b.url(url);
        }
        if !self.redlock.is_empty() {
            b = b.redlock(self.redlock);
        }
        if !self.cluster.is_empty() {
            b = b.cluster(self.cluster);
        }
        if let Some(s) = self.sentinel {
            b = b.sentinel(s.urls, s.master);
        }
        if let Some(v) = self.host {
            b = b.host(v);
        }
        if let Some(v) = self.port {
            b = b.port(v);
        }
        if let Some(v) = self.username {
            b = b.username(v);
        }
        if let Some(v) = self.password {
            b = b.password(v);
        }
        if let Some(v) = self.db {
            b = b.db(v);
        }
        if self.memory {
            b = b.memory();
        }
        if let Some(v) = self.pool_size {
            b = b.pool_size(v);
        }
        if let Some(v) = self.connections {
            b = b.connections(v);
        }
        if let Some(v) = self.key_prefix {
            b = b.key_prefix(v);
        }
        if let Some(v) = self.owner_tag {
            b = b.owner_tag(v);
        }
        if let Some(v) = self.name {
            b = b.name(v);
        }
        if let Some(v) = self.expiry {
            b = b.expiry(v);
        }
        if let Some(v) = self.renew_every {
            b = b.renew_every(v);
        }
        if let Some(d) = self.drift {
            b = b.drift(d.factor, d.floor);
        }
        if let Some(v) = self.max_hold {
            b = b.max_hold(v);
        }
        if let Some(r) = self.retry_backoff {
            b = b.retry_backoff(r.min, r.max);
        }
        if let Some(v) = self.op_timeout {
            b = b.op_timeout(v);
        }
        if let Some(v) = self.connect_timeout {
            b = b.connect_timeout(v);
        }
        b.require_noeviction(self.require_noeviction)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[tokio::test]
    async fn a_config_file_builds_a_locker_with_its_durations() {
        let config: Config = serde_json::from_str(
            r#"{ "memory": true, "expiry": "2s", "renew_every": "500ms",
                 "retry_backoff": { "min": "10ms", "max": "100ms" } }"#,
        )
        .unwrap();
        let locker = config.into_builder().build().await.unwrap();
        let guard = locker.lock("k").acquire().await.unwrap();
        assert_eq!(guard.expiry(), Duration::from_secs(2));
    }

    #[tokio::test]
    async fn bad_config_values_are_clear_errors() {
        assert!(serde_json::from_str::<Config>(r#"{ "expiry": "soon" }"#).is_err());
        assert!(serde_json::from_str::<Config>(r#"{ "expiry_ms": 5 }"#).is_err());
        let config: Config =
            serde_json::from_str(r#"{ "memory": true, "expiry": "10ms" }"#).unwrap();
        let err = config.into_builder().build().await.unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_zero_drift_margin_is_refused() {
        for drift in [
            r#"{ "factor": 0.0, "floor": "0ms" }"#,
            r#"{ "factor": 0.0, "floor": "2ms" }"#,
            r#"{ "factor": 0.01, "floor": "0ms" }"#,
        ] {
            let json = format!(r#"{{ "memory": true, "drift": {drift} }}"#);
            let config: Config = serde_json::from_str(&json).unwrap();
            let err = config.into_builder().build().await.unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{drift}: {err}");
        }
        let config: Config = serde_json::from_str(
            r#"{ "memory": true, "drift": { "factor": 0.001, "floor": "1ms" } }"#,
        )
        .unwrap();
        config.into_builder().build().await.unwrap();
    }

    #[test]
    fn require_noeviction_reaches_the_builder() {
        let config: Config = serde_json::from_str(r#"{ "require_noeviction": true }"#).unwrap();
        assert!(format!("{config:?}").contains("require_noeviction: true"));
    }

    #[test]
    fn debug_hides_the_password() {
        let config: Config =
            serde_json::from_str(r#"{ "url": "redis://u:hunter2@h:1", "password": "hunter3" }"#)
                .unwrap();
        assert!(!format!("{config:?}").contains("hunter"));
    }
}
