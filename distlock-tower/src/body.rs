//! [`LockBody`]: the response body of the HTTP and gRPC modes, which can hold the
//! lock until the body has been sent.

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

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
    /// also holds the lock: the lock is released when the inner body has ended
    /// (or when this body is dropped, e.g. because the client went away), and if
    /// the lease is lost before that, the body ends with an error (HTTP: the
    /// response is cut short, so the client sees it incomplete) or, for gRPC,
    /// with trailers that carry the error status.
    pub struct LockBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner {
            #[pin]
            body: B,
            hold: Option<Hold>,
        },
        Full {
            data: Option<Bytes>,
        },
    }
}

/// Builds the gRPC trailers that end a body whose lease was lost.
pub(crate) type Trailers = Box<dyn Fn(&distlock::Error) -> HeaderMap + Send + Sync>;

/// The lock, held while the body is sent: the runner of
/// [`distlock::Lock::run`], whose work waits for `done`.
pub(crate) struct Hold {
    /// `None` once it completed.
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

    /// Drives the runner (renewals, lost detection) while the body is sent.
    /// `Ready` if it ended before the body did: the lease was lost.
    fn poll_lease(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), distlock::Error>> {
        let Some(run) = self.run.as_mut() else {
            return Poll::Pending;
        };
        let ended = ready!(run.as_mut().poll(cx));
        self.run = None;
        Poll::Ready(ended.map(drop))
    }

    /// The body has been sent, or dropped: ends the work and polls the runner
    /// once, so that it starts the release (which then completes in the
    /// background, as `distlock`'s release does when its future is dropped, and
    /// honours the policy's `at_least`).
    fn finish(&mut self) {
        self.done = None;
        if let Some(run) = self.run.as_mut() {
            let mut cx = Context::from_waker(Waker::noop());
            if run.as_mut().poll(&mut cx).is_ready() {
                self.run = None;
            }
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B> LockBody<B> {
    /// The inner service's body, as it is.
    pub(crate) fn new(body: B) -> Self {
        LockBody {
            kind: Kind::Inner { body, hold: None },
        }
    }

    /// The inner service's body, holding the lock until it has been sent.
    pub(crate) fn holding(body: B, hold: Hold) -> Self {
        LockBody {
            kind: Kind::Inner {
                body,
                hold: Some(hold),
            },
        }
    }

    /// A body of one chunk (an error response).
    pub(crate) fn full(data: Bytes) -> Self {
        LockBody {
            kind: Kind::Full {
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
        let mut kind = self.project().kind;
        let cut_short = match kind.as_mut().project() {
            KindProj::Full { data } => return Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Inner { body, hold } => {
                let lost = match hold.as_mut().map(|h| h.poll_lease(cx)) {
                    Some(Poll::Ready(Err(lost))) => Some(lost),
                    _ => None,
                };
                match lost {
                    Some(lost) => match hold
                        .take()
                        .and_then(|h| h.trailers.as_ref().map(|t| t(&lost)))
                    {
                        Some(trailers) => Ok(Frame::trailers(trailers)),
                        None => Err(BoxError::from(lost)),
                    },
                    None => {
                        let frame = ready!(body.poll_frame(cx));
                        if !matches!(frame, Some(Ok(_))) {
                            // The body has ended (or failed): release now.
                            if let Some(mut h) = hold.take() {
                                h.finish();
                            }
                        }
                        return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
                    }
                }
            }
        };
        // The lease was lost before the body was sent: the inner body is dropped
        // and this one ends after `cut_short`.
        kind.set(Kind::Full { data: None });
        Poll::Ready(Some(cut_short))
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body, .. } => body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body, .. } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

impl<B> fmt::Debug for LockBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("LockBody");
        match &self.kind {
            Kind::Inner { hold, .. } => d.field("holds_lock", &hold.is_some()),
            Kind::Full { data } => d.field("error_body", &data.as_ref().map(Bytes::len)),
        };
        d.finish_non_exhaustive()
    }
}
