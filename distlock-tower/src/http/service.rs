//! [`LockService`] in the HTTP and gRPC modes: lock failures become responses,
//! and the lock can be held until the response body has been sent.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use distlock::Policy;
use http::{Request, Response};
use tokio::sync::oneshot;
use tower_service::Service;

use super::body::{Hold, LockBody};
use super::future::ResponseFuture;
use super::layer::AsResponse;
use crate::key::MakeKey;
use crate::service::{busy, call_with_lease, run, LockService, Runner, Target};

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
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let Some(lock) = self.lock_for(&request) else {
            return ResponseFuture::passthrough(self.inner.call(request));
        };
        let mode = self.layer.mode.clone();
        let policy = match self.policy() {
            Ok(policy) => policy,
            Err(e) => {
                let response = mode.respond(&e);
                return ResponseFuture::locked(Box::pin(async move { Ok(response) }));
            }
        };
        let inner = self.take_ready();
        if mode.hold_body {
            return ResponseFuture::locked(Box::pin(run_until_body_sent(
                lock, policy, inner, request, mode,
            )));
        }
        ResponseFuture::locked(Box::pin(async move {
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
    lock: Target,
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
    let worked = Arc::new(AtomicBool::new(false));
    let ended = Arc::clone(&worked);
    let mut runner = Runner::new(
        async move {
            let work = async {
                let answer = call_with_lease(lock.key(), inner, request).await;
                let answered = answer.is_ok();
                // An error ends the work now; dropped from here on, the runner
                // must finish its release.
                ended.store(!answered, Ordering::Release);
                if answer_tx.send(answer).is_ok() && answered {
                    // Hold the lock until the body is sent (or dropped).
                    let _ = done_rx.await;
                }
            };
            lock.run(&policy, work).await
        },
        worked,
    );
    let step = poll_fn(|cx| {
        if let Poll::Ready(ended) = Pin::new(&mut runner).poll(cx) {
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
            match runner.take() {
                Some(run) => {
                    let hold = Hold::new(run, done_tx, trailers);
                    Ok(response.map(|body| LockBody::holding(body, hold)))
                }
                // Unreachable: the runner has not ended.
                None => Ok(response.map(LockBody::new)),
            }
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
