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
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LostReason::Stolen => "the key was taken by another owner or removed",
            LostReason::DeadlineMissed => "no renewal was confirmed before the validity deadline",
            LostReason::MaxHold => "the maximum hold time was reached",
            LostReason::Closed => "the locker was closed",
        })
    }
}

/// What went wrong with one server of a Redlock quorum.
#[derive(Debug)]
pub struct ServerError {
    /// The server, as configured (passwords removed).
    pub server: String,
    /// What happened there.
    pub error: Error,
}

/// The error type of every fallible operation in this crate.
///
/// Match on the variant, or use the predicates (`is_timeout()`, `is_lost()`, ...).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Waiting for the lock took longer than the allowed time.
    #[error("timed out after {waited:?} waiting for lock `{key}`")]
    Timeout {
        /// The lock's key.
        key: String,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The lock is held and the policy said not to wait (`OnBusy::Reject`).
    #[error("lock `{key}` is held by another owner")]
    Busy {
        /// The lock's key.
        key: String,
    },
    /// The lease was lost while held, or before the caller asked to release it.
    #[error("lease on `{key}` was lost: {reason}")]
    Lost {
        /// The lock's key.
        key: String,
        /// Why the lease was lost.
        reason: LostReason,
    },
    /// Redis could not be reached, a connection failed, or a request timed out.
    #[error("redis is unavailable: {context}{}", cause(.source))]
    Unavailable {
        /// What was being attempted.
        context: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// Redis refused the credentials or the ACL user lacks a permission.
    #[error("redis refused access: {message}")]
    Auth {
        /// The server's message.
        message: String,
    },
    /// Redis answered with an error (out of memory, a script error, ...).
    #[error("redis returned an error: {source}")]
    Redis {
        /// The error redis returned.
        #[source]
        source: BoxError,
    },
    /// The key of the lock holds a value of another type (a list, a hash, ...): it is
    /// not a lock this crate can use.
    #[error("key for lock `{key}` holds a {found}, not a lock")]
    WrongType {
        /// The lock's key.
        key: String,
        /// The type Redis reports for the key.
        found: String,
    },
    /// Redlock: fewer than a majority of servers confirmed the operation.
    #[error("quorum not reached: {succeeded} of {needed} needed servers answered ({})", summarize(.causes))]
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
    InvalidKey {
        /// The key (shortened if long).
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An option or a URL is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The [`Locker`](crate::Locker) was closed.
    #[error("the locker is closed")]
    Closed,
}

fn cause(source: &Option<BoxError>) -> String {
    source
        .as_ref()
        .map(|e| format!(": {e}"))
        .unwrap_or_default()
}

fn summarize(causes: &[ServerError]) -> String {
    let parts: Vec<String> = causes
        .iter()
        .map(|c| format!("{}: {}", c.server, c.error))
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
        matches!(self, Error::InvalidKey { .. } | Error::Config(_))
    }
    /// The reason, for [`Error::Lost`].
    pub fn lost_reason(&self) -> Option<LostReason> {
        match self {
            Error::Lost { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    pub(crate) fn unavailable(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Unavailable {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    pub(crate) fn invalid_key(key: &str, reason: &'static str) -> Self {
        Error::InvalidKey {
            key: shorten(key),
            reason,
        }
    }

    pub(crate) fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
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
            ErrorKind::InvalidClientConfig => Error::Config(format!("{context}: {err}")),
            // SELECT of a database the server does not have, while connecting.
            ErrorKind::Server(redis::ServerErrorKind::ResponseError)
                if err.to_string().contains("refused to switch database") =>
            {
                Error::Config(format!(
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
