//! Correctness mode: the resource checks the fencing token.
//!
//! A lease can end while its holder still believes it holds it: the process is
//! paused (a GC pause, `SIGSTOP`, a VM migration) or cut off from Redis past the
//! lease's expiry, another client acquires the lock, and then the first one
//! wakes up and writes. No lock service can stop that late write, because the
//! holder checked its lease *before* the pause. Only the resource written to
//! can: every acquisition carries a [fencing token](crate::LockGuard::fencing_token)
//! that is strictly greater than every earlier holder's, the resource keeps the
//! highest token it has seen, and it refuses a write that carries a lower one
//! (Kleppmann, "How to do distributed locking"). This module is that checking
//! side, ready to use:
//!
//! - [`FencedKey`]: fenced `SET`, `HSET` and `DEL` of data held in Redis, and
//!   [`FencedScript`] for any Lua of yours that must run only while the token
//!   is current. Each is one script: the check, the write and the new highest
//!   token happen atomically, beside the data.
//! - `sql` (feature `postgres`): the same for PostgreSQL through `sqlx`: a
//!   per-resource token table that [`sql::advance`] checks and raises inside
//!   your transaction, and the conditional `UPDATE`/upsert statements for a
//!   token column on your own rows.
//!
//! A write with an older token fails with [`Error::Stale`]
//! (test it with [`Error::is_stale`](crate::Error::is_stale)) and changes
//! nothing. A token *equal* to the highest seen passes: a holder writes as
//! often as it likes.
//!
//! # Getting the token
//!
//! Every fenced operation takes `impl Into<FencingToken>`: a guard
//! (`&guard`), the lease inside [`Lock::run`](crate::Lock::run) or
//! `#[distributed_lock]` (`&distlock::current()?`, or
//! [`FencingToken::current()`]), a detached [`Lease`], or a
//! plain `u64` (`lock_info.fencing_token()` in a `distlock-tower` handler).
//!
//! # What fencing covers, and what it does not
//!
//! Covered: any write that reaches a checking resource after a newer holder's
//! write did, whatever delayed it: a paused or partitioned client, a lease lost
//! and acted on late, a request retried by the network, a lock server that
//! restarted empty (tokens keep increasing across it: a missing counter starts
//! from the server's clock in microseconds), Redlock.
//!
//! Not covered:
//! - A resource that does not check (a file, an e-mail, a third-party API
//!   without such a check): fencing is only as good as the resource's check.
//! - A late write that arrives *before* the newer holder's first fenced write:
//!   it is accepted (nothing newer has been seen yet) and then overwritten. The
//!   new holder can close that window by calling
//!   [`FencedKey::advance`] / [`sql::advance`] first, before it reads.
//! - Data and its highest token that are lost together (a data Redis restarted
//!   empty, a failover that drops acknowledged writes): the fence is exactly as
//!   durable as the data it guards.
//! - One resource fenced by tokens of *different* lock names: tokens are ordered
//!   per lock name only. Fence each resource with one lock.
//! - Read-modify-write across two holders: the fence refuses the stale write,
//!   it does not merge; the refused holder must give up (its lease is gone).
//!
//! # Examples
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use distlock::fence::FencedKey;
//!
//! let locker = distlock::Locker::connect("redis://127.0.0.1:6379").await?;
//! let mut data = redis::Client::open("redis://127.0.0.1:6379")?
//!     .get_multiplexed_async_connection()
//!     .await?;
//! let order = FencedKey::new("order:42")?;
//!
//! let guard = locker.lock("order:42").acquire().await?;
//! // ... a pause here may outlive the lease ...
//! match order.set(&mut data, "paid", &guard).await {
//!     Ok(()) => println!("written with token {}", guard.fencing_token()),
//!     Err(e) if e.is_stale() => println!("refused, a newer holder wrote: {e}"),
//!     Err(e) => return Err(e.into()),
//! }
//! # Ok(()) }
//! ```

use std::fmt;

use crate::error::{Error, Result};
use crate::guard::{Lease, LockGuard};
use crate::run::Current;

mod redis;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod sql;

pub use self::redis::{FencedInvocation, FencedKey, FencedScript};

/// A fencing token, as a fenced resource takes it: strictly greater for each
/// new holder of one lock name.
///
/// Made from a guard, the lease inside [`Lock::run`](crate::Lock::run)
/// ([`Current`]), a detached [`Lease`] or a `u64`, so every fenced operation can
/// take `impl Into<FencingToken>`. Only exclusive holders (a mutex guard, a
/// writer) have a meaningful token: semaphore permits and readers are many at
/// once, and a lower token among them is not stale.
///
/// # Examples
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
/// use distlock::fence::FencingToken;
///
/// let locker = distlock::Locker::memory();
/// let guard = locker.lock("k").acquire().await?;
/// assert_eq!(FencingToken::from(&guard).get(), guard.fencing_token());
/// guard.release().await?;
/// let policy = distlock::Policy::new().timeout(std::time::Duration::from_secs(5));
/// let token = locker
///     .lock("k")
///     .run(&policy, async { FencingToken::current() })
///     .await?;
/// assert!(token.flatten().is_some());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// The token `value`.
    pub const fn new(value: u64) -> Self {
        FencingToken(value)
    }

    /// The token as a number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The token of the innermost lease held by the current task through
    /// [`Lock::run`](crate::Lock::run) or `#[distributed_lock]`, if any (see
    /// [`current()`](crate::current)).
    pub fn current() -> Option<Self> {
        crate::run::current().map(|c| FencingToken(c.fencing_token()))
    }

    /// The token as a SQL `BIGINT` (a signed 64-bit integer).
    ///
    /// Tokens start near 1.8·10^15 (the server's clock in microseconds), far
    /// beyond a 32-bit `INTEGER`: a token column **must be `BIGINT`**.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if the token is above `i64::MAX` (no token minted by
    /// this crate is; one from elsewhere may be).
    pub fn to_bigint(self) -> Result<i64> {
        i64::try_from(self.0).map_err(|_| {
            Error::config(format!(
                "fencing token {} does not fit a SQL BIGINT (at most {})",
                self.0,
                i64::MAX
            ))
        })
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<u64> for FencingToken {
    fn from(value: u64) -> Self {
        FencingToken(value)
    }
}

impl From<FencingToken> for u64 {
    fn from(token: FencingToken) -> Self {
        token.0
    }
}

impl From<&LockGuard> for FencingToken {
    fn from(guard: &LockGuard) -> Self {
        FencingToken(guard.fencing_token())
    }
}

impl From<&Current> for FencingToken {
    fn from(lease: &Current) -> Self {
        FencingToken(lease.fencing_token())
    }
}

impl From<&crate::Leader> for FencingToken {
    /// The leader's term.
    fn from(leader: &crate::Leader) -> Self {
        FencingToken(leader.term())
    }
}

impl From<&crate::Leadership> for FencingToken {
    /// This leadership's term.
    fn from(leadership: &crate::Leadership) -> Self {
        FencingToken(leadership.term())
    }
}

impl From<&Lease> for FencingToken {
    fn from(lease: &Lease) -> Self {
        FencingToken(lease.fencing_token())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bigint_conversion_is_checked() {
        assert_eq!(
            FencingToken::new(1_800_000_000_000_000).to_bigint().ok(),
            Some(1_800_000_000_000_000)
        );
        assert_eq!(
            FencingToken::new(i64::MAX as u64).to_bigint().ok(),
            Some(i64::MAX)
        );
        let err = FencingToken::new(u64::MAX).to_bigint().unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
        assert!(err.to_string().contains("BIGINT"), "{err}");
    }

    #[tokio::test]
    async fn the_token_comes_from_guards_leases_and_the_running_task() {
        let locker = crate::Locker::memory();
        let guard = locker.lock("fence:k").acquire().await.unwrap();
        let expected = guard.fencing_token();
        assert_eq!(FencingToken::from(&guard).get(), expected);
        let lease = guard.detach();
        assert_eq!(FencingToken::from(&lease).get(), expected);
        locker.release_lease(&lease).await.unwrap();

        assert_eq!(FencingToken::current(), None);
        let inside = locker
            .lock("fence:k")
            .run(&crate::Policy::new(), async {
                let current = crate::current().unwrap();
                (FencingToken::from(&current), FencingToken::current())
            })
            .await
            .unwrap()
            .unwrap();
        assert!(inside.0.get() > expected);
        assert_eq!(Some(inside.0), inside.1);
    }
}
