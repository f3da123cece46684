#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
mod builder;
#[cfg(feature = "serde")]
mod config;
mod error;
mod guard;
mod keeper;
mod key;
mod lock;
mod locker;
mod notify;
mod obs;
mod options;
mod queue;
mod run;
mod rwlock;
mod semaphore;
mod token;

pub use builder::{LockerBuilder, MemoryStore};
#[cfg(feature = "serde")]
pub use config::{BackoffConfig, Config, SentinelConfig};
pub use error::{BoxError, Error, LostReason, Result, ServerError};
pub use guard::{Lease, LockGuard, Lost};
pub use key::MAX_KEY_LEN;
pub use lock::Lock;
pub use locker::{default_locker, set_default, Locker};
pub use options::{MAX_EXPIRY, MIN_EXPIRY};
pub use run::{current, Current, OnBusy, Policy};
pub use rwlock::{ReadGuard, RwLock, WriteGuard};
pub use semaphore::{Semaphore, SemaphorePermit};
pub use tokio_util::sync::CancellationToken;

#[cfg(feature = "macros")]
#[cfg_attr(docsrs, doc(cfg(feature = "macros")))]
pub use distlock_macros::distributed_lock;

/// Used by code that `#[distributed_lock]` generates. Not a public API.
#[doc(hidden)]
pub mod __private {
    use std::future::Future;
    use std::sync::Arc;

    pub use crate::locker::default_locker;
    use crate::{Error, Locker, Policy, Result};

    /// The return type of an annotated function: a `Result` that can carry our error.
    #[diagnostic::on_unimplemented(
        message = "`#[distributed_lock]` needs `{Self}` to be a `Result<T, E>` with `E: From<distlock::Error>`",
        label = "lock errors (timeout, busy, lost) are returned through this type"
    )]
    pub trait Output: Sized {
        /// `Err(error.into())`.
        fn lock_error(error: Error) -> Self;
    }

    #[diagnostic::do_not_recommend]
    impl<T, E: From<Error>> Output for std::result::Result<T, E> {
        fn lock_error(error: Error) -> Self {
            Err(E::from(error))
        }
    }

    /// `on_busy = "skip"`: what a skipped call returns.
    #[diagnostic::on_unimplemented(
        message = "`on_busy = \"skip\"` returns `Ok(Default::default())` when the lock is busy, so the success type of `{Self}` must implement `Default`",
        label = "the success type of this `Result` has no `Default`",
        note = "return `Result<Option<T>, E>` or `Result<(), E>`, or use `on_busy = \"reject\"`"
    )]
    pub trait Skipped: Output {
        /// `Ok(T::default())`.
        fn skipped() -> Self;
    }

    #[diagnostic::do_not_recommend]
    impl<T: Default, E: From<Error>> Skipped for std::result::Result<T, E> {
        fn skipped() -> Self {
            Ok(T::default())
        }
    }

    /// `locker = <expr>`: a `Locker`, a reference to one, or an `Arc` of one.
    #[diagnostic::on_unimplemented(
        message = "`locker = ...` must be a `distlock::Locker` (or a reference or `Arc` to one), not `{Self}`",
        label = "not a `distlock::Locker`"
    )]
    pub trait AsLocker {
        /// The locker.
        fn as_locker(&self) -> &Locker;
    }

    impl AsLocker for Locker {
        fn as_locker(&self) -> &Locker {
            self
        }
    }

    #[diagnostic::do_not_recommend]
    impl<L: AsLocker + ?Sized> AsLocker for &L {
        fn as_locker(&self) -> &Locker {
            (**self).as_locker()
        }
    }

    #[diagnostic::do_not_recommend]
    impl<L: AsLocker + ?Sized> AsLocker for Arc<L> {
        fn as_locker(&self) -> &Locker {
            (**self).as_locker()
        }
    }

    /// `locker = <expr>`, checked.
    pub fn locker<L: AsLocker + ?Sized>(locker: &L) -> Result<Locker> {
        Ok(locker.as_locker().clone())
    }

    /// The body of an annotated function with `on_busy = "wait"` or `"reject"`.
    pub async fn run<R: Output, F: Future<Output = R>>(
        locker: Result<Locker>,
        key: String,
        permits: Option<u32>,
        policy: Policy,
        work: F,
    ) -> R {
        run_or(locker, key, permits, policy, work, R::lock_error).await
    }

    /// The body of an annotated function with `on_busy = "skip"`.
    pub async fn run_or_skip<R: Skipped, F: Future<Output = R>>(
        locker: Result<Locker>,
        key: String,
        permits: Option<u32>,
        policy: Policy,
        work: F,
    ) -> R {
        run_or(locker, key, permits, policy, work, |_| R::skipped()).await
    }

    async fn run_or<R: Output>(
        locker: Result<Locker>,
        key: String,
        permits: Option<u32>,
        policy: Policy,
        work: impl Future<Output = R>,
        skipped: impl FnOnce(Error) -> R,
    ) -> R {
        let locker = match locker {
            Ok(locker) => locker,
            Err(e) => return R::lock_error(e),
        };
        let busy = Error::Busy {
            key: crate::error::shorten(&key),
        };
        let result = match permits {
            Some(n) => locker.semaphore(key, n).run(&policy, work).await,
            None => locker.lock(key).run(&policy, work).await,
        };
        match result {
            Ok(Some(output)) => output,
            // `Lock::run` skips only with `OnBusy::Skip`.
            Ok(None) => skipped(busy),
            Err(e) => R::lock_error(e),
        }
    }
}
