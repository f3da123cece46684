#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// Where each job lives.
//
// The public handles:
//   locker      Locker: the handle users hold; makes locks, adopts leases, closes
//   builder     LockerBuilder: every option, validated in build()
//   config      Config: the builder's options from a file (`serde`)
//   lock        Lock: try_acquire, acquire (one attempt, the wait loop), run
//   multi       MultiLock: several keys, all or none, in canonical order
//   semaphore   Semaphore: a Lock with permits
//   rwlock      RwLock: its two sides as Locks
//   guard       LockGuard, the lost-signal future, detached Lease
//   run         Policy, and the runner behind Lock::run and the macro; current()
//   fence       fenced writes that the resource checks (Redis data, SQL)
//   inspect     who holds a lock (Locker::inspect), which are held (Locker::locks)
//   election    leader election on a lock whose holder's tag is the leader's value
//   macro_support   what #[distributed_lock] expands to call
// What keeps a lease:
//   lease       the state of one held lease, shared by its guard and the keeper
//   keeper      the task that renews, watches deadlines and releases
//   queue       local FIFO lines: one contender per key per process
//   notify      release wake-ups: the hub over pub/sub
// Talking to Redis (or memory):
//   backend     redis/ (one server, Sentinel, Cluster), redlock, memory, and
//               connect (wiring the topologies and checking them at start)
//   key         key validation and the Redis key layout
//   options     lease timing and its limits
//   token       owner tokens
//   redis_url   URL parsing and redaction
//   eviction    the maxmemory-policy check
// Across all: error (Error, LostReason), obs (tracing events, metrics).

mod backend;
mod builder;
#[cfg(feature = "serde")]
mod config;
mod election;
mod error;
mod eviction;
pub mod fence;
mod guard;
mod inspect;
mod keeper;
mod key;
mod lease;
mod lock;
mod locker;
mod multi;
mod notify;
mod obs;
mod options;
mod queue;
mod redis_url;
mod run;
mod rwlock;
mod semaphore;
mod token;

pub use backend::memory::MemoryStore;
pub use builder::LockerBuilder;
#[cfg(feature = "serde")]
pub use config::{BackoffConfig, Config, DriftConfig, SentinelConfig};
pub use election::{Election, Leader, Leadership};
pub use error::{BoxError, Error, LostReason, Result, ServerError};
pub use guard::{Lease, LockGuard, Lost};
pub use inspect::{Holder, LockStatus, LockType, Role};
pub use key::MAX_KEY_LEN;
pub use lock::Lock;
pub use locker::{default_locker, set_default, Locker};
pub use multi::{MultiGuard, MultiLock, MAX_KEYS};
pub use options::{MAX_EXPIRY, MAX_HOLD, MIN_EXPIRY};
pub use run::{current, Current, OnBusy, Policy};
pub use rwlock::{ReadGuard, RwLock, WriteGuard};
pub use semaphore::{Semaphore, SemaphorePermit};
/// The lost signal as a token ([`LockGuard::cancellation_token`],
/// [`Current::lost`]): tokio-util's, re-exported so that code can name it
/// without depending on a matching tokio-util itself. A new major version of
/// tokio-util would be a major version of distlock.
pub use tokio_util::sync::CancellationToken;

#[cfg(feature = "macros")]
#[cfg_attr(docsrs, doc(cfg(feature = "macros")))]
pub use distlock_macros::distributed_lock;

/// Used by code that `#[distributed_lock]` generates. Not a public API.
#[doc(hidden)]
#[path = "macro_support.rs"]
pub mod __private;
