use std::fmt;
use std::task::{Context, Poll};

use distlock::{Lock, Policy};
use tower_service::Service;

use crate::future::ResponseFuture;
use crate::info::{LockInfo, LockRequest};
use crate::key::MakeKey;
use crate::layer::{AsError, LockLayer};
use crate::BoxError;

/// The service made by [`LockLayer`]: locks each request on its key while the
/// inner service handles it.
///
/// `poll_ready` is the inner service's. `call` moves the ready inner service
/// into the response future (leaving a clone in its place), which acquires the
/// lock, then calls it. So the inner service is only called once the lock is
/// held, and a readiness reservation it made (a concurrency permit, a buffer
/// slot) is kept while the request waits for the lock.
pub struct LockService<S, K, M = AsError> {
    inner: S,
    config: LockLayer<K, M>,
}

impl<S, K, M> LockService<S, K, M> {
    pub(crate) fn new(inner: S, config: LockLayer<K, M>) -> Self {
        LockService { inner, config }
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
    pub(crate) fn lock_for<Req>(&self, request: &Req) -> Option<Lock>
    where
        K: MakeKey<Req>,
    {
        let key = self.config.make_key.make_key(request)?;
        Some(self.config.locker.lock(key))
    }

    pub(crate) fn policy(&self) -> Policy {
        self.config.policy.clone()
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
        let policy = self.policy();
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

/// Acquires `lock` under `policy` and, holding it, hands the lease to `request`
/// and calls `inner` (which must be ready). The lock is released when the inner
/// future completes; if the lease is lost first, the inner future is dropped and
/// the result is [`distlock::Error::Lost`].
pub(crate) async fn run<S, Req>(
    lock: Lock,
    policy: Policy,
    inner: S,
    request: Req,
) -> Result<Result<S::Response, S::Error>, distlock::Error>
where
    S: Service<Req>,
    Req: LockRequest,
{
    let work = call_with_lease(lock.key(), inner, request);
    match lock.run(&policy, work).await? {
        Some(result) => Ok(result),
        None => Err(busy(&lock)),
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
pub(crate) fn busy(lock: &Lock) -> distlock::Error {
    distlock::Error::Busy {
        key: lock.key().to_owned(),
    }
}

#[cfg(feature = "http")]
mod http {
    use std::future::{poll_fn, Future};
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use ::http::{Request, Response};
    use bytes::Bytes;
    use distlock::{Lock, Policy};
    use tokio::sync::oneshot;
    use tower_service::Service;

    use super::{busy, call_with_lease, run, LockService};
    use crate::body::{Hold, LockBody};
    use crate::future::{BoxFuture, HttpResponseFuture};
    use crate::http::AsResponse;
    use crate::key::MakeKey;

    impl<S, K, F, ReqBody, ResBody> Service<Request<ReqBody>> for LockService<S, K, AsResponse<F>>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: Send + 'static,
        K: MakeKey<Request<ReqBody>>,
        F: Fn(&distlock::Error) -> Response<Bytes> + Clone + Send + Sync + 'static,
        ReqBody: Send + 'static,
        ResBody: Send + 'static,
    {
        type Response = Response<LockBody<ResBody>>;
        type Error = S::Error;
        type Future = HttpResponseFuture<S::Future, ResBody, S::Error>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.inner.poll_ready(cx)
        }

        fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
            let Some(lock) = self.lock_for(&request) else {
                return HttpResponseFuture::passthrough(self.inner.call(request));
            };
            let policy = self.policy();
            let mode = self.config.mode.clone();
            let inner = self.take_ready();
            if mode.hold_body {
                return HttpResponseFuture::locked(Box::pin(run_until_body_sent(
                    lock, policy, inner, request, mode,
                )));
            }
            HttpResponseFuture::locked(Box::pin(async move {
                match run(lock, policy, inner, request).await {
                    Ok(Ok(response)) => Ok(response.map(LockBody::new)),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Ok(mode.respond(&e)),
                }
            }))
        }
    }

    /// What the response future waited for.
    enum Step<T> {
        /// The inner service answered (and, if it answered `Ok`, its work now
        /// waits for the body to be sent).
        Answered(T),
        /// The runner ended first: the lock was not acquired, or the lease was lost.
        Ended(Result<Option<()>, distlock::Error>),
    }

    /// As [`run`], but the work goes on holding the lock after the inner future
    /// completes, until the response body has been sent: the response leaves
    /// through a channel, and the runner moves into the body.
    async fn run_until_body_sent<S, ReqBody, ResBody, F>(
        lock: Lock,
        policy: Policy,
        inner: S,
        request: Request<ReqBody>,
        mode: AsResponse<F>,
    ) -> Result<Response<LockBody<ResBody>>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
        S::Future: Send,
        S::Error: Send + 'static,
        F: Fn(&distlock::Error) -> Response<Bytes> + Clone + Send + Sync + 'static,
        ReqBody: Send + 'static,
        ResBody: Send + 'static,
    {
        let (answer_tx, mut answer_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let busy = busy(&lock);
        let mut runner: BoxFuture<Result<Option<()>, distlock::Error>> = Box::pin(async move {
            let work = async {
                let answer = call_with_lease(lock.key(), inner, request).await;
                let answered = answer.is_ok();
                if answer_tx.send(answer).is_ok() && answered {
                    // Hold the lock until the body is sent (or dropped).
                    let _ = done_rx.await;
                }
            };
            lock.run(&policy, work).await
        });
        let step = poll_fn(|cx| {
            if let Poll::Ready(ended) = runner.as_mut().poll(cx) {
                return Poll::Ready(Step::Ended(ended));
            }
            match Pin::new(&mut answer_rx).poll(cx) {
                Poll::Ready(Ok(answer)) => Poll::Ready(Step::Answered(answer)),
                // No answer yet; or the work was dropped (the lease was lost)
                // and the runner, which has our waker, is ending.
                Poll::Ready(Err(_)) | Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match step {
            Step::Answered(Ok(response)) => {
                let trailers = mode.trailers_on_loss();
                let hold = Hold::new(runner, done_tx, trailers);
                Ok(response.map(|body| LockBody::holding(body, hold)))
            }
            Step::Answered(Err(e)) => match runner.await {
                // The work has ended; the release said the lease had been lost.
                Err(lost) => Ok(mode.respond(&lost)),
                Ok(_) => Err(e),
            },
            Step::Ended(Err(e)) => Ok(mode.respond(&e)),
            Step::Ended(Ok(None)) => Ok(mode.respond(&busy)),
            // The work ended, so it failed: an answer that is a response makes it
            // wait for `done_tx`, which is still here.
            Step::Ended(Ok(Some(()))) => match answer_rx.try_recv() {
                Ok(Err(e)) => Err(e),
                Ok(Ok(response)) => Ok(response.map(LockBody::new)),
                // Unreachable: the work sends its answer before it ends.
                Err(_) => Ok(mode.respond(&distlock::Error::Closed)),
            },
        }
    }
}

impl<S: Clone, K: Clone, M: Clone> Clone for LockService<S, K, M> {
    fn clone(&self) -> Self {
        LockService {
            inner: self.inner.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: fmt::Debug, K, M: fmt::Debug> fmt::Debug for LockService<S, K, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockService")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish()
    }
}
