//! [`LockBody`]: the response body of the HTTP and gRPC modes, which can hold the
//! lock until the body has been sent.

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::oneshot;

use crate::future::BoxFuture;
use crate::BoxError;

pin_project! {
    /// The response body of [`LockService`](crate::LockService) with
    /// [`AsResponse`](crate::http::AsResponse): the inner service's body, or the
    /// body of an error response.
    ///
    /// With [`hold_until_body_sent`](crate::LockLayer::hold_until_body_sent), it
    /// also holds the lock: the lock is released when the inner body has ended,
    /// before this body reports its end (so a client that has read the whole
    /// response finds the lock free), or in a task on the current runtime when
    /// this body is dropped first (the client went away); and if
    /// the lease is lost before that, the body ends with an error (HTTP: the
    /// response is cut short, so the client sees it incomplete) or, for gRPC,
    /// with trailers that carry the error status.
    pub struct LockBody<B> {
        #[pin]
        content: Content<B>,
    }
}

pin_project! {
    /// What the body sends: the inner body, with the lock held until it
    /// ends, or a whole error body of its own.
    #[project = ContentProj]
    enum Content<B> {
        Inner {
            #[pin]
            body: B,
            hold: Option<Hold>,
            // The inner body's last frame (its end, error or trailers), kept
            // while the lock is released.
            last: Option<Last>,
        },
        Full {
            data: Option<Bytes>,
        },
    }
}

/// The last frame of a body: its end (`None`), an error, or trailers.
type Last = Option<Result<Frame<Bytes>, BoxError>>;

/// Builds the gRPC trailers that end a body whose lease was lost.
pub(crate) type Trailers = Box<dyn Fn(&distlock::Error) -> HeaderMap + Send + Sync>;

/// The lock, held while the body is sent: the runner of
/// [`distlock::Lock::run`], whose work waits for `done`.
pub(crate) struct Hold {
    /// `None` once it completed (or was handed to a task).
    run: Option<BoxFuture<Result<Option<()>, distlock::Error>>>,
    /// Dropped when the body has been sent: the work then ends and the runner
    /// releases the lock.
    done: Option<oneshot::Sender<()>>,
    /// gRPC: end the body with these trailers if the lease is lost.
    trailers: Option<Trailers>,
}

impl Hold {
    pub(crate) fn new(
        run: BoxFuture<Result<Option<()>, distlock::Error>>,
        done: oneshot::Sender<()>,
        trailers: Option<Trailers>,
    ) -> Self {
        Hold {
            run: Some(run),
            done: Some(done),
            trailers,
        }
    }

    /// Drives the runner: renewals and lost detection while the body is sent
    /// (`Ready` then means the lease was lost), and, once [`end`](Hold::end)
    /// was called, the release (`Ready` when it is over, with its verdict).
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), distlock::Error>> {
        let Some(run) = self.run.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let ended = ready!(run.as_mut().poll(cx));
        self.run = None;
        Poll::Ready(ended.map(drop))
    }

    /// The body has been sent: the work ends, and the next polls of the runner
    /// release the lock.
    fn end(&mut self) {
        self.done = None;
    }

    fn releasing(&self) -> bool {
        self.done.is_none()
    }
}

impl Drop for Hold {
    /// The body was dropped before the release was over (the client went away,
    /// or the server does not poll a body that is already at its end).
    ///
    /// The runner must not be dropped part-way through its release: its release
    /// command may have reached Redis already, and the cancel-safe path of
    /// `distlock` would then release a second time, find the key gone and
    /// report the lease lost. So the rest of the runner (the release, which also
    /// honours the policy's `at_least`) goes to a task on the current runtime.
    /// Without a runtime, the runner is dropped before its release starts (it
    /// has not been polled since the work ended), and its guard hands the
    /// release to the locker's background task, once.
    fn drop(&mut self) {
        self.done = None;
        let Some(run) = self.run.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            drop(runtime.spawn(run));
        }
    }
}

impl<B> LockBody<B> {
    /// The inner service's body, as it is.
    pub(crate) fn new(body: B) -> Self {
        LockBody {
            content: Content::Inner {
                body,
                hold: None,
                last: None,
            },
        }
    }

    /// The inner service's body, holding the lock until it has been sent.
    pub(crate) fn holding(body: B, hold: Hold) -> Self {
        LockBody {
            content: Content::Inner {
                body,
                hold: Some(hold),
                last: None,
            },
        }
    }

    /// A body of one chunk (an error response).
    pub(crate) fn full(data: Bytes) -> Self {
        LockBody {
            content: Content::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

impl<B> Body for LockBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut content = self.project().content;
        let cut_short = match content.as_mut().project() {
            ContentProj::Full { data } => {
                return Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
            }
            ContentProj::Inner { body, hold, last } => {
                let Some(h) = hold.as_mut() else {
                    let frame = ready!(body.poll_frame(cx));
                    return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
                };
                if h.releasing() {
                    // The inner body has ended: release, then end as it did.
                    let released = ready!(h.poll_run(cx));
                    let trailers = hold.take().and_then(|mut h| h.trailers.take());
                    let last = last.take().flatten();
                    match released {
                        Ok(()) => return Poll::Ready(last),
                        // The body's own error wins over the lost lease.
                        Err(_) if matches!(last, Some(Err(_))) => return Poll::Ready(last),
                        Err(lost) => lost_frame(lost, trailers.as_ref()),
                    }
                } else {
                    match h.poll_run(cx) {
                        Poll::Ready(Err(lost)) => {
                            let trailers = hold.take().and_then(|mut h| h.trailers.take());
                            lost_frame(lost, trailers.as_ref())
                        }
                        // Not lost (the runner cannot end otherwise while the
                        // work waits for the body).
                        Poll::Ready(Ok(())) | Poll::Pending => {
                            let frame = ready!(body.poll_frame(cx));
                            let is_last = match &frame {
                                Some(Ok(f)) => f.is_trailers(),
                                Some(Err(_)) | None => true,
                            };
                            let frame = frame.map(|f| f.map_err(Into::into));
                            if !is_last {
                                return Poll::Ready(frame);
                            }
                            // The body has been sent: release before saying so,
                            // so that the lock is free when the client sees the
                            // end of the response.
                            h.end();
                            *last = Some(frame);
                            match ready!(h.poll_run(cx)) {
                                Ok(()) => {
                                    *hold = None;
                                    return Poll::Ready(last.take().flatten());
                                }
                                Err(_) if matches!(last, Some(Some(Err(_)))) => {
                                    *hold = None;
                                    return Poll::Ready(last.take().flatten());
                                }
                                Err(lost) => {
                                    let trailers = hold.take().and_then(|mut h| h.trailers.take());
                                    lost_frame(lost, trailers.as_ref())
                                }
                            }
                        }
                    }
                }
            }
        };
        // The lease was lost before the body was sent (or the release found it
        // lost): the inner body is dropped and this one ends after `cut_short`.
        content.set(Content::Full { data: None });
        Poll::Ready(Some(cut_short))
    }

    fn is_end_stream(&self) -> bool {
        match &self.content {
            // While it holds the lock, the end must be polled: that is when the
            // lock is released.
            Content::Inner { body, hold, .. } => hold.is_none() && body.is_end_stream(),
            Content::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.content {
            Content::Inner { body, .. } => body.size_hint(),
            Content::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// The frame that ends a body whose lease was lost: the gRPC error trailers, or
/// an error (HTTP: the response is cut short).
fn lost_frame(
    lost: distlock::Error,
    trailers: Option<&Trailers>,
) -> Result<Frame<Bytes>, BoxError> {
    match trailers {
        Some(trailers) => Ok(Frame::trailers(trailers(&lost))),
        None => Err(BoxError::from(lost)),
    }
}

impl<B> fmt::Debug for LockBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("LockBody");
        match &self.content {
            Content::Inner { hold, .. } => d.field("holds_lock", &hold.is_some()),
            Content::Full { data } => d.field("error_body", &data.as_ref().map(Bytes::len)),
        };
        d.finish_non_exhaustive()
    }
}
