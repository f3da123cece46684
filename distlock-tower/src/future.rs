//! Response future of [`LockService`](crate::LockService) in its default mode
//! ([`AsError`](crate::AsError)); the HTTP mode's is `http::future::ResponseFuture`.
//!
//! A request that is not locked (its key extractor returned `None`) is served by
//! the inner future as it is. A locked request is served by a boxed future that
//! runs [`distlock::Lock::run`], the one runner the crate shares with
//! `#[distributed_lock]`: its future cannot be named, hence the box, and hence
//! the `Send` bounds on the inner service, its future and the request.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

use crate::BoxError;

/// A boxed, `Send` future.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

pin_project! {
    /// Response future of [`LockService`](crate::LockService) with
    /// [`AsError`](crate::AsError): lock failures are
    /// [`distlock::Error`]s inside the [`BoxError`].
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F, T> {
        #[pin]
        driven: Driven<F, T, BoxError>,
    }
}

pin_project! {
    /// What a response future drives: the inner future as it is, or the boxed
    /// run of a locked request. Shared with the HTTP mode's future.
    #[project = DrivenProj]
    pub(crate) enum Driven<F, T, E> {
        Passthrough {
            #[pin]
            future: F,
        },
        Locked {
            future: BoxFuture<Result<T, E>>,
        },
    }
}

impl<F, T> ResponseFuture<F, T> {
    pub(crate) fn passthrough(future: F) -> Self {
        ResponseFuture {
            driven: Driven::Passthrough { future },
        }
    }

    pub(crate) fn locked(future: BoxFuture<Result<T, BoxError>>) -> Self {
        ResponseFuture {
            driven: Driven::Locked { future },
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F, T>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().driven.project() {
            DrivenProj::Passthrough { future } => future.poll(cx).map_err(Into::into),
            DrivenProj::Locked { future } => future.as_mut().poll(cx),
        }
    }
}

impl<F, T> fmt::Debug for ResponseFuture<F, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("locked", &matches!(self.driven, Driven::Locked { .. }))
            .finish_non_exhaustive()
    }
}
