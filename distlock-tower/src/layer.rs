use std::fmt;

use distlock::{Locker, Policy};
use tower_layer::Layer;

use crate::service::LockService;

/// Serializes requests per key across every process sharing one Redis.
///
/// For each request, the key extractor `K` (a [`MakeKey`](crate::MakeKey))
/// names a lock; the layer acquires it under the [`Policy`], inserts a
/// [`LockInfo`](crate::LockInfo) into the request, calls the inner service, and
/// releases the lock when the inner service's future completes (or, with
/// [`hold_until_body_sent`](LockLayer::hold_until_body_sent), when the response
/// body has been sent). Requests whose extractor returns `None` pass through
/// unlocked. Local waiters on one key queue first-in first-out, and only the
/// head of the line contends in Redis.
///
/// The mode `M` says what becomes of a lock failure:
///
/// - [`AsError`] (the default, and the tower convention): the service's error
///   is [`BoxError`](crate::BoxError); lock failures are
///   [`distlock::Error`]s inside it and inner errors pass through unchanged.
///   Works with any request type that implements [`LockRequest`](crate::LockRequest).
/// - [`AsResponse`](crate::http::AsResponse), from [`http()`](LockLayer::http)
///   or `grpc()` (feature `tonic`): lock failures become HTTP or gRPC error
///   responses and the inner service's error type is kept, so the layer can go
///   straight onto an axum `Router` or a tonic `Server`.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use distlock::Policy;
/// use distlock_tower::{key, LockLayer};
///
/// let locker = distlock::Locker::memory(); // Locker::connect(url).await? in production
/// let layer = LockLayer::new(locker, key::path_segment(1).prefix("account:"))
///     .policy(Policy::new().timeout(Duration::from_secs(5)));
/// # let _ = layer;
/// ```
#[must_use]
pub struct LockLayer<K, M = AsError> {
    pub(crate) locker: Locker,
    pub(crate) make_key: K,
    pub(crate) policy: Policy,
    pub(crate) mode: M,
}

/// Lock failures as errors: the service's error is
/// [`BoxError`](crate::BoxError), with a [`distlock::Error`] inside for lock
/// failures. The default mode of [`LockLayer`].
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct AsError;

impl<K> LockLayer<K> {
    /// A layer that locks each request on the key `make_key` gives it, with
    /// `locker` and the default policy (wait without a timeout).
    ///
    /// Share one [`Locker`] between the layers of one process: its clones share
    /// the connection pool, the lease keeper and the local waiting lines.
    pub fn new(locker: Locker, make_key: K) -> Self {
        LockLayer {
            locker,
            make_key,
            policy: Policy::new(),
            mode: AsError,
        }
    }
}

impl<K, M> LockLayer<K, M> {
    /// How to acquire and hold: wait timeout, busy behaviour, `at_most`,
    /// `at_least` and expiry, as for [`distlock::Lock::run`].
    ///
    /// A request needs a response, so [`OnBusy::Skip`](distlock::OnBusy::Skip)
    /// cannot skip it: the layer treats it like
    /// [`OnBusy::Reject`](distlock::OnBusy::Reject) and fails with
    /// [`distlock::Error::Busy`].
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }
}

impl<S, K: Clone, M: Clone> Layer<S> for LockLayer<K, M> {
    type Service = LockService<S, K, M>;

    fn layer(&self, inner: S) -> Self::Service {
        LockService::new(inner, self.clone())
    }
}

impl<K: Clone, M: Clone> Clone for LockLayer<K, M> {
    fn clone(&self) -> Self {
        LockLayer {
            locker: self.locker.clone(),
            make_key: self.make_key.clone(),
            policy: self.policy.clone(),
            mode: self.mode.clone(),
        }
    }
}

impl<K, M: fmt::Debug> fmt::Debug for LockLayer<K, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockLayer")
            .field("locker", &self.locker)
            .field("make_key", &std::any::type_name::<K>())
            .field("policy", &self.policy)
            .field("mode", &self.mode)
            .finish()
    }
}
