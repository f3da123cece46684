//! The lease as the handler sees it: [`LockInfo`], and [`LockRequest`] to hand it
//! over with the request.

use std::ops::Deref;

use distlock::Current;

/// The lease a request is handled under: its key, fencing token and lost signal.
///
/// The layer inserts it into the request before calling the inner service: into
/// the extensions of an `http::Request` (so an axum handler takes it as an
/// extractor with the `axum` feature, or as `Extension<LockInfo>`, and a tonic
/// handler finds it in `request.extensions()`), and through
/// [`LockRequest::insert_lock_info`] for other request types. Inside the inner
/// service's future, [`distlock::current()`] gives the same lease.
///
/// # Examples
///
/// ```
/// use distlock_tower::LockInfo;
///
/// async fn withdraw(lease: LockInfo) -> String {
///     // Pass the fencing token to the storage, so that a write from a request
///     // whose lease was lost (and that another replica has since overtaken) is
///     // refused there.
///     format!("withdrawn under {} with token {}", lease.key(), lease.fencing_token())
/// }
/// # let _ = withdraw;
/// ```
#[derive(Clone, Debug)]
pub struct LockInfo(Current);

impl LockInfo {
    /// The lease `distlock::current()` reports, if it is the lease on `key`.
    pub(crate) fn current(key: &str) -> Option<LockInfo> {
        distlock::current().filter(|c| c.key() == key).map(LockInfo)
    }
}

/// The lease's key, fencing token and lost signal: [`Current::key`],
/// [`Current::fencing_token`], [`Current::lost`], [`Current::is_lost`].
impl Deref for LockInfo {
    type Target = Current;

    fn deref(&self) -> &Current {
        &self.0
    }
}

/// A request that can carry a [`LockInfo`] to the inner service.
///
/// Implemented for `http::Request<B>` (feature `http`, on by default), which
/// keeps it in its extensions. For your own request type, implement it to store
/// the info, or leave the body empty (the default) if the handler reads the
/// lease through [`distlock::current()`] or does not need it:
///
/// ```
/// struct Job {
///     id: u64,
/// }
///
/// impl distlock_tower::LockRequest for Job {}
/// ```
pub trait LockRequest {
    /// Stores `info` in the request. The default does nothing.
    fn insert_lock_info(&mut self, info: LockInfo) {
        let _ = info;
    }
}

#[cfg(feature = "http")]
impl<B> LockRequest for ::http::Request<B> {
    fn insert_lock_info(&mut self, info: LockInfo) {
        self.extensions_mut().insert(info);
    }
}
