//! The `#[distributed_lock]` attribute for [distlock](https://docs.rs/distlock):
//! run the body of an `async fn` while holding a distributed lock on Redis.
//!
//! Use it through distlock's `macros` feature, which re-exports it as
//! `distlock::distributed_lock`:
//!
//! ```toml
//! [dependencies]
//! distlock = { version = "0.1", features = ["macros"] }
//! ```
//!
//! ```
//! use std::time::Duration;
//! use distlock::distributed_lock;
//! # #[derive(Debug)] struct Invoice { id: u64 }
//! # #[derive(Debug)] struct Receipt;
//! # #[derive(Debug)] struct AppError;
//! # impl From<distlock::Error> for AppError { fn from(_: distlock::Error) -> Self { AppError } }
//!
//! /// Settles an invoice; never twice at once, on any replica.
//! #[distributed_lock(key = "invoice:{invoice.id}", timeout = "5s")]
//! async fn settle(invoice: &Invoice) -> Result<Receipt, AppError> {
//!     let lease = distlock::current().expect("inside the lock");
//!     // ... write with `lease.fencing_token()` so the storage can refuse stale writers ...
//!     Ok(Receipt)
//! }
//!
//! # #[tokio::main] async fn main() -> Result<(), AppError> {
//! // Once, at start-up (`Locker::connect(url).await?` in production):
//! distlock::set_default(distlock::Locker::memory());
//! settle(&Invoice { id: 42 }).await?;
//! # Ok(()) }
//! ```
//!
//! The macro is thin: it checks the arguments and the signature at compile time,
//! and expands to one call of distlock's runner (`Lock::run`), the same one the
//! tower layer uses. See [`distributed_lock`] for every option and the code it
//! stands for.

mod attr;
mod expand;
mod limits;
mod template;

/// Runs the body of an `async fn` while holding a distributed lock.
///
/// ```
/// # use distlock::distributed_lock;
/// # #[derive(Debug)] struct Invoice { id: u64 }
/// # #[derive(Debug)] struct AppError;
/// # impl From<distlock::Error> for AppError { fn from(_: distlock::Error) -> Self { AppError } }
/// #[distributed_lock(key = "invoice:{invoice.id}", timeout = "5s")]
/// async fn settle(invoice: &Invoice) -> Result<u64, AppError> {
///     Ok(invoice.id)
/// }
/// ```
///
/// Each call takes the lock named by `key`, runs the body while holding it (the
/// lease renews itself in the background), and releases it when the body ends.
/// Calls with the same key, in this process or any other using the same Redis,
/// run one at a time.
///
/// # Options
///
/// | option | default | meaning |
/// |---|---|---|
/// | `key = "..."` | required (or `keys`) | The lock's name, a template over the parameters (below). |
/// | `keys = ["...", "..."]` | none | Instead of `key`: several mutexes, taken all at once or not at all (`Locker::lock_many`), for a transfer between two accounts: `keys = ["account:{from}", "account:{to}"]`. Each is a template as `key` is; the order does not matter (they are taken in sorted order, so opposite transfers never deadlock). Not with `semaphore`. |
/// | `timeout = "5s"` | none: wait until acquired | How long to wait for the lock; then the call returns `Err(Error::Timeout)` converted into the function's error type. `"0s"` makes one attempt. Without a timeout the call waits as long as it takes (only a backend error or a closed locker ends the wait), so handlers should set one. With `on_busy = "wait"` only (a compile error otherwise). |
/// | `on_busy = "wait"` | `"wait"` | When the lock is held: `"wait"` (up to `timeout`); `"skip"`: do not run the body and return `Ok(Default::default())` (job deduplication, below); `"reject"`: return `Err(Error::Busy)` at once. |
/// | `at_least = "1m"` | none | Keep the lock this long after it was acquired, even if the body ends sooner (ShedLock's `lockAtLeastFor`): replicas firing the same job late keep skipping. The key then expires by itself. |
/// | `at_most = "10m"` | none: no limit | Cancel the body once it has held the lock this long: it is dropped, and the call returns `Err(Error::Lost)` with `LostReason::MaxHold`. |
/// | `expiry = "30s"` | the locker's (30 s unless configured) | The lease expiry: how long the key outlives a crashed holder. The lease renews every third of it. 100 ms to 24 h. |
/// | `semaphore = 3` | none: a mutex | Take one of N permits of a distributed semaphore on the key instead of the mutex: up to N calls run at once across every replica (see `distlock::Semaphore`). Every user of the key must agree on N. |
/// | `fair = true` | `false` | Calls on one key run in arrival order across every replica, and a release hands the lock to the next caller on the server (see `distlock::Lock::fair`). Give it to every user of the key. Not with `keys` or `semaphore`. |
/// | `locker = <expr>` | the default locker | Where the `Locker` comes from: any expression valid at the top of the body that gives a `Locker`, a `&Locker` or an `Arc<Locker>` (`locker = self.locks`, `locker = state.locker`, `locker = locker`). Without it, the process-wide default set once with `distlock::set_default(locker)`; if none was set, the call returns `Err(Error::Config)` (never a panic). |
/// | `crate = "path"` | `"distlock"` | The path to distlock, if the dependency is renamed (`crate = "my_distlock"`). |
///
/// Durations are [humantime](https://docs.rs/humantime) strings (`"500ms"`,
/// `"5s"`, `"1m 30s"`), checked at compile time.
///
/// ## The key template
///
/// `{name}` interpolates a parameter with `Display`; `{name.field.sub}` and
/// `{pair.0}` follow fields; `{self.field}` reads the receiver. Names bound
/// inside patterns work too: `Path(user_id): Path<u64>` gives `{user_id}`,
/// `State(AppState { db, .. }): State<AppState>` gives `{db}`. Placeholders name
/// parameters and fields only: no method calls or format specs (`{id:?}`), so
/// compute such a value into a parameter or a `Display` wrapper. `{{` and `}}` are
/// literal braces in the template's syntax, but distlock keys cannot contain
/// braces (they delimit the Redis Cluster hash tag), so they are a compile error
/// too. An unknown name, an unclosed or empty placeholder and an empty template
/// are compile errors at the string.
///
/// The key and the locker expression are evaluated when the call's future is
/// first polled, before the lock is taken; the body runs after.
///
/// # The function
///
/// - It must be an `async fn`: the lock is held across the body's awaits.
/// - It must return `Result<T, E>` (any path ending in `Result`, so aliases such
///   as `anyhow::Result<T>` and `io::Result<T>` too) with
///   `E: From<distlock::Error>`: timeouts, busy locks, lost leases, a missing
///   default locker and Redis errors are returned through it.
/// - With `on_busy = "skip"`, `T` must implement `Default`: `()` and `Option<T>`
///   work naturally (`Ok(None)` then means "skipped").
///
/// Everything else is kept as written: attributes, doc comments, visibility,
/// generics, `where` clauses, `impl Trait` arguments, patterns, and receivers
/// (`&self`, `&mut self`, `self: Arc<Self>`). It works on free functions,
/// inherent methods and `async fn`s in trait impls, and the returned future is
/// `Send` whenever the original was, so annotated axum handlers stay handlers.
///
/// Inside the body:
///
/// - `distlock::current()` gives the lease: key, fencing token, lost signal.
/// - If the lease is lost (the key expired or was taken while Redis was out of
///   reach, or `at_most` was reached), the body's future is dropped at its next
///   await point, and the call returns `Err(Error::Lost { .. })` converted into
///   `E`. Pass the fencing token to your storage so that a write from a holder
///   that lost its lease can be refused.
/// - A nested call that locks a key this task already holds through the same
///   locker runs directly (task-scoped reentrancy), so annotated functions can
///   call each other without deadlocking.
///
/// # Equivalent code without the macro
///
/// ```
/// # use std::time::Duration;
/// # #[derive(Debug)] struct Invoice { id: u64 }
/// # #[derive(Debug)] struct AppError;
/// # impl From<distlock::Error> for AppError { fn from(_: distlock::Error) -> Self { AppError } }
/// // #[distributed_lock(key = "invoice:{invoice.id}", timeout = "5s")]
/// async fn settle(invoice: &Invoice) -> Result<u64, AppError> {
///     let locker = distlock::default_locker(); // or: Ok(<locker expr>.clone())
///     let key = format!("invoice:{}", invoice.id);
///     let policy = distlock::Policy::new().timeout(Duration::from_secs(5));
///     let lock = match locker {
///         Ok(locker) => locker.lock(key),
///         Err(e) => return Err(e.into()),
///     };
///     let body = async move { Ok(invoice.id) }; // the original body
///     match lock.run(&policy, body).await {
///         Ok(Some(output)) => output,
///         Ok(None) => Ok(Default::default()), // only with `on_busy = "skip"`
///         Err(e) => Err(e.into()),
///     }
/// }
/// ```
///
/// # Job deduplication
///
/// A scheduled job runs on every replica, but must run once per schedule. Mark
/// it `on_busy = "skip"`: the replica that gets the lock runs it; the others
/// return `Ok(Default::default())` at once, without waiting. `at_least` covers
/// replicas whose timers fire late: the lock stays for that long after it was
/// taken, so a replica firing a few seconds after the job finished still skips.
/// Pick `at_least` below the schedule's period and above the clock skew between
/// replicas.
///
/// ```
/// use distlock::{distributed_lock, Error, Locker};
///
/// struct Scheduler {
///     locker: Locker,
/// }
///
/// impl Scheduler {
///     /// Runs every hour on every replica; one of them does the work.
///     #[distributed_lock(
///         key = "job:hourly-sync",
///         locker = self.locker,
///         on_busy = "skip",
///         at_least = "1m",
///         at_most = "50m"
///     )]
///     async fn hourly_sync(&self) -> Result<Option<usize>, Error> {
///         let synced = 0; // ... the job ...
///         Ok(Some(synced))
///     }
/// }
///
/// # #[tokio::main] async fn main() -> Result<(), Error> {
/// let locker = Locker::memory();
/// let (a, b) = (Scheduler { locker: locker.clone() }, Scheduler { locker });
/// assert!(a.hourly_sync().await?.is_some()); // ran
/// assert!(b.hourly_sync().await?.is_none()); // inside the minute: skipped
/// # Ok(()) }
/// ```
///
/// # With other attributes
///
/// - `#[tracing::instrument]`: either order.
/// - `#[tokio::test]` and `#[tokio::main]`: either order. Attribute macros
///   expand from the top, so below tokio's this macro sees the plain `fn` tokio
///   made, whose first statement `let body = async { .. };` holds the original
///   body; it wraps that block.
///
/// # What it cannot do
///
/// - Plain (non-`async`) functions: the lock must be held across awaits. (The
///   plain `fn` that `#[tokio::test]` or `#[tokio::main]` leaves is recognised by
///   its shape, above.)
/// - Trait method declarations without a body: put it on the implementation.
/// - Keys with `{` or `}`: distlock refuses them (Redis Cluster hash tags).
///
/// On any misuse the function is still emitted next to the error, so that
/// editors keep resolving it.
#[proc_macro_attribute]
pub fn distributed_lock(
    args: proc_macro::TokenStream,
    item: proc_macro::TokenStream,
) -> proc_macro::TokenStream {
    expand::distributed_lock(args.into(), item.into()).into()
}

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
