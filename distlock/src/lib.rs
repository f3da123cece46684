#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
mod builder;
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

/// Used by code that `#[distributed_lock]` generates. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::locker::default_locker;
}
