//! The lease as the handler sees it: [`LockInfo`], and [`LockRequest`] to hand it
//! over with the request.

use std::fmt;

use distlock::CancellationToken;

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
#[derive(Clone)]
pub struct LockInfo {
    key: String,
    fencing_token: u64,
    lost: CancellationToken,
}

impl LockInfo {
    /// The lease `distlock::current()` reports, if it is the lease on `key`.
    pub(crate) fn current(key: &str) -> Option<LockInfo> {
        let current = distlock::current()?;
        (current.key() == key).then(|| LockInfo {
            key: current.key().to_owned(),
            fencing_token: current.fencing_token(),
            lost: current.lost(),
        })
    }

    /// The lock's key, as the key extractor made it.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The fencing token of the acquisition: strictly greater than that of every
    /// earlier holder of this key. Hand it to the resource you write to.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    /// A token cancelled when the lease is lost, for work the handler hands to
    /// other tasks. (The handler's own future is dropped by the layer then.)
    pub fn lost(&self) -> CancellationToken {
        self.lost.child_token()
    }

    /// True once the lease is lost.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }
}

impl fmt::Debug for LockInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockInfo")
            .field("key", &self.key)
            .field("fencing_token", &self.fencing_token)
            .field("lost", &self.is_lost())
            .finish()
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
