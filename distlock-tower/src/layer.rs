use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use distlock::{Locker, Policy};
use tower_layer::Layer;

use crate::service::{check_policy, AsError, LockService};

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
    /// The metrics name of its locks.
    pub(crate) name: Option<Arc<str>>,
    pub(crate) fair: bool,
}

/// How long a request waits for its lock unless the policy says otherwise:
/// 30 seconds.
///
/// A request has a client waiting for it, which will not wait forever: past
/// this, the request fails with [`distlock::Error::Timeout`] (503 with
/// `Retry-After` in [`http`](LockLayer::http) mode, `UNAVAILABLE` in gRPC mode)
/// rather than holding a connection, a task and a place in the lock's line for
/// a client that has long gone. 30 s is below the usual idle timeouts of the
/// proxies and load balancers in front of a service (60 s for nginx's
/// `proxy_read_timeout` and for AWS load balancers), so the client gets the 503
/// rather than the proxy's 504, and well above the time a normal same-key queue
/// takes to drain.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

impl<K> LockLayer<K> {
    /// A layer that locks each request on the key `make_key` gives it, with
    /// `locker` and the default policy: wait up to [`DEFAULT_WAIT`] (30 s).
    ///
    /// Share one [`Locker`] between the layers of one process: its clones share
    /// the connection pool, the lease keeper and the local waiting lines.
    pub fn new(locker: Locker, make_key: K) -> Self {
        LockLayer {
            locker,
            make_key,
            policy: Policy::new().timeout(DEFAULT_WAIT),
            mode: AsError,
            name: None,
            fair: false,
        }
    }
}

impl<K, M> LockLayer<K, M> {
    /// How to acquire and hold: wait timeout, busy behaviour, `at_most`,
    /// `at_least` and expiry, as for [`distlock::Lock::run`].
    ///
    /// A policy without a wait timeout waits [`DEFAULT_WAIT`], not forever: set
    /// a longer [`timeout`](Policy::timeout) to wait longer.
    ///
    /// [`OnBusy::Skip`] has no meaning for a request, which needs an answer
    /// (skipping it would either answer nothing or let it through unlocked):
    /// [`try_policy`](LockLayer::try_policy) refuses it. Given here, every
    /// locked request fails with [`distlock::Error::Config`] (500 in
    /// [`http`](LockLayer::http) mode) without reaching the inner service: use
    /// [`OnBusy::Reject`] to answer "busy" at once.
    ///
    /// [`OnBusy::Skip`]: distlock::OnBusy::Skip
    /// [`OnBusy::Reject`]: distlock::OnBusy::Reject
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = with_default_wait(policy);
        self
    }

    /// As [`policy`](LockLayer::policy), but refuses a policy the layer cannot
    /// follow.
    ///
    /// # Errors
    ///
    /// [`distlock::Error::Config`] for [`OnBusy::Skip`](distlock::OnBusy::Skip).
    ///
    /// ```
    /// use distlock::{OnBusy, Policy};
    /// use distlock_tower::LockLayer;
    ///
    /// let layer = LockLayer::new(distlock::Locker::memory(), |_: &()| None::<String>);
    /// let err = layer.try_policy(Policy::new().on_busy(OnBusy::Skip)).unwrap_err();
    /// assert!(err.to_string().contains("OnBusy::Skip"));
    /// ```
    pub fn try_policy(self, policy: Policy) -> Result<Self, distlock::Error> {
        check_policy(&policy)?;
        Ok(self.policy(policy))
    }

    /// Names the layer's locks in metrics (the `name` label of
    /// `distlock_acquired_total`, `distlock_wait_seconds`, ...; see
    /// [`distlock::Lock::name`]): the route it guards, say
    /// `"POST /accounts/:id/transfer"`. Never a key: each name is a time series.
    ///
    /// ```
    /// use distlock_tower::{key, LockLayer};
    ///
    /// let layer = LockLayer::new(distlock::Locker::memory(), key::path_segment(1))
    ///     .name("POST /accounts/:id/transfer");
    /// # let _ = layer;
    /// ```
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Serves the requests of one key in arrival order across every replica,
    /// handing the lock over on the server (see [`distlock::Lock::fair`]): for
    /// a hot key, such as one account taking many requests at once. Give it
    /// to the layer in every replica.
    ///
    /// ```
    /// use distlock_tower::{key, LockLayer};
    ///
    /// let layer = LockLayer::new(distlock::Locker::memory(), key::path_segment(1)).fair(true);
    /// # let _ = layer;
    /// ```
    pub fn fair(mut self, fair: bool) -> Self {
        self.fair = fair;
        self
    }

    /// The same layer in another mode (the HTTP and gRPC modes switch with it).
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) fn with_mode<N>(self, mode: N) -> LockLayer<K, N> {
        LockLayer {
            locker: self.locker,
            make_key: self.make_key,
            policy: self.policy,
            mode,
            name: self.name,
            fair: self.fair,
        }
    }
}

fn with_default_wait(policy: Policy) -> Policy {
    if policy.wait_timeout().is_none() {
        policy.timeout(DEFAULT_WAIT)
    } else {
        policy
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
            name: self.name.clone(),
            fair: self.fair,
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
            .field("name", &self.name)
            .field("fair", &self.fair)
            .finish()
    }
}
