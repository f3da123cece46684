//! The one error type of the crate, and the reasons a lease can be lost.

use std::fmt;
use std::time::Duration;

/// A boxed error from a lower layer (redis, the pool, the runtime).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a held lease stopped being held.
///
/// Whatever the reason, once a lease is lost the holder must assume that another
/// owner may hold (or soon hold) the lock, and stop the work it protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LostReason {
    /// A renewal found the key held by another owner or gone (deleted by an
    /// operator, evicted, or expired on the server).
    Stolen,
    /// No renewal was confirmed before the local validity deadline: the server may be
    /// down, paused or cut off, and the key may expire there at any moment.
    DeadlineMissed,
    /// The configured `max_hold` (or the policy's `at_most`) was reached.
    MaxHold,
    /// The [`Locker`](crate::Locker) was closed while the lease was held.
    Closed,
    /// The tokio runtime that ran the [`Locker`](crate::Locker)'s background
    /// work (renewals) shut down while the lease was held. The locker itself
    /// carries on in the next runtime that uses it.
    RuntimeShutdown,
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LostReason::Stolen => "the key was taken by another owner or removed",
            LostReason::DeadlineMissed => "no renewal was confirmed before the validity deadline",
            LostReason::MaxHold => "the maximum hold time was reached",
            LostReason::Closed => "the locker was closed",
            LostReason::RuntimeShutdown => "the runtime that renewed the lease shut down",
        })
    }
}

/// What went wrong with one server of a Redlock quorum.
#[derive(Debug)]
#[non_exhaustive]
pub struct ServerError {
    /// The server, as configured (passwords removed).
    pub server: String,
    /// What happened there.
    pub error: Error,
}

/// The error type of every fallible operation in this crate.
///
/// Match on the variant, or use the predicates (`is_timeout()`, `is_lost()`, ...).
/// Variants and their fields are `#[non_exhaustive]`: match with `..`, and
/// build the errors that code outside this crate has a reason to build
/// (a tower service's own refusal, a resource's stale-token answer, a test's
/// expected error) with the constructors ([`Error::busy`], [`Error::timeout`],
/// [`Error::lost`], [`Error::unavailable`], [`Error::redis`], [`Error::stale`],
/// [`Error::config`]), so that later versions can add detail without breaking
/// anyone.
///
/// ```
/// use distlock::Error;
///
/// let err = Error::stale("cart:7", 41, Some(42));
/// assert!(err.is_stale());
/// assert!(matches!(err, Error::Stale { offered: 41, .. }));
/// assert_eq!(err.key(), Some("cart:7"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Waiting for the lock took longer than the allowed time.
    #[error("timed out after {waited:?} waiting for lock `{key}`")]
    #[non_exhaustive]
    Timeout {
        /// The lock's key.
        key: String,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The lock is held and the policy said not to wait (`OnBusy::Reject`).
    #[error("lock `{key}` is held by another owner")]
    #[non_exhaustive]
    Busy {
        /// The lock's key.
        key: String,
    },
    /// The lease was lost while held, or before the caller asked to release it.
    #[error("lease on `{key}` was lost: {reason}")]
    #[non_exhaustive]
    Lost {
        /// The lock's key.
        key: String,
        /// Why the lease was lost.
        reason: LostReason,
    },
    /// Redis could not be reached, a connection failed, or a request timed out.
    #[error("redis is unavailable: {context}")]
    #[non_exhaustive]
    Unavailable {
        /// What was being attempted.
        context: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// Redis refused the credentials or the ACL user lacks a permission.
    #[error("redis refused access: {message}")]
    #[non_exhaustive]
    Auth {
        /// The server's message.
        message: String,
    },
    /// Redis answered with an error (out of memory, a script error, ...).
    #[error("redis returned an error")]
    #[non_exhaustive]
    Redis {
        /// The error redis returned.
        #[source]
        source: BoxError,
    },
    /// The key of the lock holds a value of another type (a list, a hash, ...): it is
    /// not a lock this crate can use.
    #[error("key for lock `{key}` holds a {found}, not a lock")]
    #[non_exhaustive]
    WrongType {
        /// The lock's key.
        key: String,
        /// The type Redis reports for the key.
        found: String,
    },
    /// Redlock: fewer than a majority of servers confirmed the operation.
    #[error("quorum not reached: {succeeded} of {needed} needed servers answered ({})", summarize(.causes))]
    #[non_exhaustive]
    Quorum {
        /// How many servers confirmed.
        succeeded: usize,
        /// How many are needed (a majority).
        needed: usize,
        /// What went wrong on each server that did not confirm.
        causes: Vec<ServerError>,
    },
    /// The lock key is empty, too long, or contains a forbidden character.
    #[error("invalid lock key `{key}`: {reason}")]
    #[non_exhaustive]
    InvalidKey {
        /// The key (shortened if long).
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An option or a URL is invalid.
    #[error("invalid configuration: {message}")]
    #[non_exhaustive]
    Config {
        /// What is wrong, and with which option.
        message: String,
    },
    /// The [`Locker`](crate::Locker) was closed.
    #[error("the locker is closed")]
    Closed,
    /// A fenced write carried an older fencing token than one the resource has
    /// seen: a newer holder of the lock has written since. Nothing was written;
    /// the caller's lease is over, whatever it believes (see [`crate::fence`]).
    #[error("stale fencing token {offered} for `{resource}`: {}", seen_token(.seen))]
    #[non_exhaustive]
    Stale {
        /// The fenced resource (a Redis key, a SQL resource name).
        resource: String,
        /// The token the write carried.
        offered: u64,
        /// The highest token the resource has seen, when it tells.
        seen: Option<u64>,
    },
    /// The database that holds fenced data returned an error.
    #[error("the database returned an error")]
    #[non_exhaustive]
    Database {
        /// The database driver's error.
        #[source]
        source: BoxError,
    },
}

fn seen_token(seen: &Option<u64>) -> String {
    match seen {
        Some(seen) => format!("the resource has seen {seen}"),
        None => "the resource has seen a newer one".to_owned(),
    }
}

/// Displays an error with its sources, `error: source: source's source`.
/// [`Error`]'s `Display` leaves the source to `source()`, where error
/// reporters find it; our own log lines print the whole chain.
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

fn summarize(causes: &[ServerError]) -> String {
    let parts: Vec<String> = causes
        .iter()
        .map(|c| format!("{}: {}", c.server, Chain(&c.error)))
        .collect();
    parts.join("; ")
}

impl Error {
    /// True for [`Error::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }
    /// True for [`Error::Busy`].
    pub fn is_busy(&self) -> bool {
        matches!(self, Error::Busy { .. })
    }
    /// True for [`Error::Lost`].
    pub fn is_lost(&self) -> bool {
        matches!(self, Error::Lost { .. })
    }
    /// True when the backend could not be reached ([`Error::Unavailable`]) or a
    /// quorum was not reached ([`Error::Quorum`]).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::Quorum { .. })
    }
    /// True for [`Error::Closed`].
    pub fn is_closed(&self) -> bool {
        matches!(self, Error::Closed)
    }
    /// True for [`Error::InvalidKey`] and [`Error::Config`]: the caller's input is wrong
    /// and retrying will not help.
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, Error::InvalidKey { .. } | Error::Config { .. })
    }
    /// True for [`Error::Stale`]: a fenced write was refused because a newer
    /// holder has written.
    pub fn is_stale(&self) -> bool {
        matches!(self, Error::Stale { .. })
    }
    /// The reason, for [`Error::Lost`].
    pub fn lost_reason(&self) -> Option<LostReason> {
        match self {
            Error::Lost { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// The key (lock or fenced resource) the error is about, for
    /// [`Error::Timeout`], [`Error::Busy`], [`Error::Lost`],
    /// [`Error::WrongType`], [`Error::InvalidKey`] and [`Error::Stale`].
    pub fn key(&self) -> Option<&str> {
        match self {
            Error::Timeout { key, .. }
            | Error::Busy { key }
            | Error::Lost { key, .. }
            | Error::WrongType { key, .. }
            | Error::InvalidKey { key, .. } => Some(key),
            Error::Stale { resource, .. } => Some(resource),
            _ => None,
        }
    }

    /// [`Error::Unavailable`]: the backend could not be reached while doing
    /// `context` (say what, never a password), because of `source`.
    pub fn unavailable(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Unavailable {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// [`Error::Timeout`]: waiting for the lock on `key` took `waited`.
    pub fn timeout(key: &str, waited: Duration) -> Self {
        Error::Timeout {
            key: shorten(key),
            waited,
        }
    }

    /// [`Error::Lost`]: the lease on `key` was lost for `reason`.
    pub fn lost(key: &str, reason: LostReason) -> Self {
        Error::Lost {
            key: shorten(key),
            reason,
        }
    }

    /// [`Error::Redis`]: a Redis reply that was an error (or not the reply
    /// expected), for code that talks to Redis beside this crate.
    pub fn redis(source: impl Into<BoxError>) -> Self {
        Error::Redis {
            source: source.into(),
        }
    }

    /// [`Error::Stale`]: a write to `resource` carried the fencing token
    /// `offered`, older than the highest the resource has seen (`seen`, when
    /// it tells). For resources that check tokens themselves.
    pub fn stale(resource: &str, offered: u64, seen: Option<u64>) -> Self {
        Error::Stale {
            resource: resource.to_owned(),
            offered,
            seen,
        }
    }

    pub(crate) fn invalid_key(key: &str, reason: &'static str) -> Self {
        Error::InvalidKey {
            key: shorten(key),
            reason,
        }
    }

    /// [`Error::Busy`]: the lock on `key` is held and the caller would not wait.
    pub fn busy(key: &str) -> Self {
        Error::Busy { key: shorten(key) }
    }

    /// [`Error::Config`]: an option is invalid, as `msg` says.
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config {
            message: msg.into(),
        }
    }

    /// Classifies an error that redis-rs returned.
    pub(crate) fn from_redis(context: &str, err: redis::RedisError) -> Self {
        use redis::ErrorKind;
        let detail = err.detail().map(str::to_owned);
        match err.kind() {
            ErrorKind::AuthenticationFailed => Error::Auth {
                message: detail.unwrap_or_else(|| "authentication failed".into()),
            },
            ErrorKind::Server(redis::ServerErrorKind::NoPerm) => Error::Auth {
                message: format!(
                    "permission denied: {}",
                    detail.unwrap_or_else(|| "the user lacks a command or key permission".into())
                ),
            },
            // redis-rs reports NOAUTH (no password given) under another kind than
            // WRONGPASS: match the code whatever the kind.
            _ if err
                .code()
                .is_some_and(|c| c == "WRONGPASS" || c == "NOAUTH") =>
            {
                Error::Auth {
                    message: detail.unwrap_or_else(|| "wrong username or password".into()),
                }
            }
            ErrorKind::InvalidClientConfig => Error::config(format!("{context}: {err}")),
            // SELECT of a database the server does not have, while connecting.
            ErrorKind::Server(redis::ServerErrorKind::ResponseError)
                if err.to_string().contains("refused to switch database") =>
            {
                Error::config(format!(
                    "db: {}",
                    detail.unwrap_or_else(|| "the server has no such database".into())
                ))
            }
            _ if err.is_io_error()
                || err.is_timeout()
                || err.is_connection_dropped()
                || err.is_connection_refusal()
                || err.is_unrecoverable_error() =>
            {
                Error::unavailable(context, err)
            }
            _ => Error::Redis {
                source: Box::new(err),
            },
        }
    }
}

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
impl From<sqlx::Error> for Error {
    /// [`Error::Database`], so that `?` works on `sqlx` calls beside
    /// [`fence::sql`](crate::fence::sql) ones.
    fn from(source: sqlx::Error) -> Self {
        Error::Database {
            source: Box::new(source),
        }
    }
}

/// Shortens a user-supplied string for an error message.
pub(crate) fn shorten(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_send_sync_static() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Error>();
    }

    #[test]
    fn messages_are_lower_case_without_period() {
        let errors = [
            Error::Timeout {
                key: "k".into(),
                waited: Duration::from_secs(1),
            },
            Error::Busy { key: "k".into() },
            Error::Lost {
                key: "k".into(),
                reason: LostReason::Stolen,
            },
            Error::Closed,
            Error::config("expiry must be at least 100ms"),
            Error::Stale {
                resource: "k".into(),
                offered: 1,
                seen: Some(2),
            },
            Error::Stale {
                resource: "k".into(),
                offered: 1,
                seen: None,
            },
        ];
        for e in errors {
            let m = e.to_string();
            assert!(m.chars().next().is_some_and(|c| c.is_lowercase()), "{m}");
            assert!(!m.ends_with('.'), "{m}");
        }
    }

    #[test]
    fn long_keys_are_shortened_in_messages() {
        let key = "é".repeat(1000);
        let e = Error::invalid_key(&key, "too long");
        assert!(e.to_string().len() < 200);
    }
}
