use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use distlock::{Lock, MultiLock, OnBusy, Policy};
use tower_service::Service;

use crate::future::{BoxFuture, ResponseFuture};
use crate::info::{LockInfo, LockRequest};
use crate::key::MakeKey;
use crate::layer::LockLayer;
use crate::BoxError;

/// Lock failures as errors: the service's error is
/// [`BoxError`](crate::BoxError), with a [`distlock::Error`] inside for lock
/// failures. The default mode of [`LockLayer`](crate::LockLayer).
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct AsError;

/// The service made by [`LockLayer`](crate::LockLayer): locks each request on
/// its key while the inner service handles it.
///
/// `poll_ready` is the inner service's. `call` moves the ready inner service
/// into the response future (leaving a clone in its place), which acquires the
/// lock, then calls it. So the inner service is only called once the lock is
/// held, and a readiness reservation it made (a concurrency permit, a buffer
/// slot) is kept while the request waits for the lock.
pub struct LockService<S, K, M = AsError> {
    pub(crate) inner: S,
    /// The layer that made it: locker, key, policy, mode and metrics name.
    pub(crate) layer: LockLayer<K, M>,
}

impl<S, K, M> LockService<S, K, M> {
    pub(crate) fn new(inner: S, layer: LockLayer<K, M>) -> Self {
        LockService { inner, layer }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The lock for `request`, or `None` to let it through.
    pub(crate) fn lock_for<Req>(&self, request: &Req) -> Option<Target>
    where
        K: MakeKey<Req>,
    {
        let mut keys = self.layer.make_key.make_keys(request)?;
        let locker = &self.layer.locker;
        let name = self.layer.name.as_ref();
        Some(match (keys.pop(), keys.is_empty()) {
            (Some(key), true) => {
                let lock = locker.lock(key).fair(self.layer.fair);
                Target::One(match name {
                    Some(n) => lock.name(Arc::clone(n)),
                    None => lock,
                })
            }
            // Several keys (or none, which the run refuses as a bad
            // configuration rather than let the request through unlocked).
            (last, _) => {
                keys.extend(last);
                let lock = locker.lock_many(keys);
                Target::Many(match name {
                    Some(n) => lock.name(Arc::clone(n)),
                    None => lock,
                })
            }
        })
    }

    /// The policy, or why the layer refuses it.
    pub(crate) fn policy(&self) -> Result<Policy, distlock::Error> {
        check_policy(&self.layer.policy)?;
        Ok(self.layer.policy.clone())
    }

    /// Takes the inner service, which `poll_ready` made ready, and leaves a clone
    /// (not yet ready) in its place.
    pub(crate) fn take_ready(&mut self) -> S
    where
        S: Clone,
    {
        let clone = self.inner.clone();
        std::mem::replace(&mut self.inner, clone)
    }
}

/// What a request locks: one key, or several taken together
/// ([`MakeKey::make_keys`]).
#[derive(Debug, Clone)]
pub(crate) enum Target {
    One(Lock),
    Many(MultiLock),
}

impl Target {
    /// The key whose lease [`distlock::current`] reports while the work runs
    /// (the last in sorted order, for several).
    pub(crate) fn key(&self) -> &str {
        match self {
            Target::One(lock) => lock.key(),
            Target::Many(lock) => lock.keys().last().map_or("", String::as_str),
        }
    }

    /// Runs `work` holding the lock(s); see [`Lock::run`].
    pub(crate) fn run<F: Future>(
        &self,
        policy: &Policy,
        work: F,
    ) -> impl Future<Output = Result<Option<F::Output>, distlock::Error>> + use<F> {
        match self {
            Target::One(lock) => Either::Left {
                f: lock.run(policy, work),
            },
            Target::Many(lock) => Either::Right {
                f: lock.run(policy, work),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// One of two futures with the same output.
    #[project = EitherProj]
    pub(crate) enum Either<A, B> {
        Left { #[pin] f: A },
        Right { #[pin] f: B },
    }
}

impl<A: Future, B: Future<Output = A::Output>> Future for Either<A, B> {
    type Output = A::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<A::Output> {
        match self.project() {
            EitherProj::Left { f } => f.poll(cx),
            EitherProj::Right { f } => f.poll(cx),
        }
    }
}

/// Whether the layer can follow `policy`.
pub(crate) fn check_policy(policy: &Policy) -> Result<(), distlock::Error> {
    match policy.busy() {
        OnBusy::Skip => Err(distlock::Error::config(
            "the lock layer cannot follow OnBusy::Skip: a request needs an answer; use OnBusy::Reject",
        )),
        _ => Ok(()),
    }
}

impl<S, K, Req> Service<Req> for LockService<S, K, AsError>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    K: MakeKey<Req>,
    Req: LockRequest + Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let Some(lock) = self.lock_for(&request) else {
            return ResponseFuture::passthrough(self.inner.call(request));
        };
        let policy = match self.policy() {
            Ok(policy) => policy,
            Err(e) => return ResponseFuture::locked(Box::pin(async move { Err(e.into()) })),
        };
        let inner = self.take_ready();
        ResponseFuture::locked(Box::pin(async move {
            match run(lock, policy, inner, request).await {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(e.into()),
            }
        }))
    }
}

/// Acquires `lock` (one key or several) under `policy` and, holding it, hands the lease to `request`
/// and calls `inner` (which must be ready). The lock is released when the inner
/// future completes; if the lease is lost first, the inner future is dropped and
/// the result is [`distlock::Error::Lost`].
///
/// Dropped after the inner future completed (during the release), the release
/// goes on in a task: see [`Runner`].
pub(crate) async fn run<S, Req>(
    lock: Target,
    policy: Policy,
    inner: S,
    request: Req,
) -> Result<Result<S::Response, S::Error>, distlock::Error>
where
    S: Service<Req> + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    Req: LockRequest + Send + 'static,
{
    let busy = busy(&lock);
    let worked = Arc::new(AtomicBool::new(false));
    let work = {
        let worked = Arc::clone(&worked);
        let key = lock.key().to_owned();
        async move {
            let answer = call_with_lease(&key, inner, request).await;
            worked.store(true, Ordering::Release);
            answer
        }
    };
    let runner = Runner::new(lock.run(&policy, work), worked);
    match runner.await? {
        Some(result) => Ok(result),
        None => Err(busy),
    }
}

/// The runner of [`distlock::Lock::run`], which is not dropped part-way through
/// its release.
///
/// Dropping a `distlock` release mid-flight is cancel safe, but not quiet: the
/// release is handed to the locker's background task, which sends it again; if
/// the first one had reached Redis, the second finds the key gone and reports
/// the lease lost (the lost signal fires, `distlock_lost_total` rises) after a
/// request that went well. A response future is dropped whenever the client
/// goes away, so: dropped once its work has ended (`worked`), the runner
/// finishes in a task on the current runtime. Dropped earlier, it is dropped:
/// the work is cancelled, and the guard (if the lock was acquired) hands its
/// release to the background task, once.
pub(crate) struct Runner<T: Send + 'static> {
    run: Option<BoxFuture<T>>,
    worked: Arc<AtomicBool>,
}

impl<T: Send + 'static> Runner<T> {
    pub(crate) fn new(
        run: impl Future<Output = T> + Send + 'static,
        worked: Arc<AtomicBool>,
    ) -> Self {
        Runner {
            run: Some(Box::pin(run)),
            worked,
        }
    }
}

impl<T: Send + 'static> Runner<T> {
    /// The runner, to be driven elsewhere; `None` if it has completed.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) fn take(&mut self) -> Option<BoxFuture<T>> {
        self.run.take()
    }
}

impl<T: Send + 'static> Future for Runner<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let Some(run) = self.run.as_mut() else {
            return Poll::Pending;
        };
        let out = ready!(run.as_mut().poll(cx));
        self.run = None;
        Poll::Ready(out)
    }
}

impl<T: Send + 'static> Drop for Runner<T> {
    fn drop(&mut self) {
        let Some(run) = self.run.take() else {
            return;
        };
        if !self.worked.load(Ordering::Acquire) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            drop(runtime.spawn(run));
        }
    }
}

/// The work done under the lock: hands the lease to the request, then calls the
/// inner service. Both happen inside the runner, where `distlock::current()`
/// reports the lease.
pub(crate) async fn call_with_lease<S, Req>(
    key: &str,
    mut inner: S,
    mut request: Req,
) -> Result<S::Response, S::Error>
where
    S: Service<Req>,
    Req: LockRequest,
{
    if let Some(info) = LockInfo::current(key) {
        request.insert_lock_info(info);
    }
    inner.call(request).await
}

/// What a request gets when the runner skipped it ([`distlock::OnBusy::Skip`]):
/// there is no response to skip to, so it is refused as busy.
pub(crate) fn busy(lock: &Target) -> distlock::Error {
    match lock {
        Target::One(lock) => distlock::Error::busy(lock.key()),
        Target::Many(lock) => distlock::Error::busy(&lock.keys().join(", ")),
    }
}

impl<S: Clone, K: Clone, M: Clone> Clone for LockService<S, K, M> {
    fn clone(&self) -> Self {
        LockService::new(self.inner.clone(), self.layer.clone())
    }
}

impl<S: fmt::Debug, K, M: fmt::Debug> fmt::Debug for LockService<S, K, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockService")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}
