//! Response future of [`LockService`](crate::LockService) in the HTTP and gRPC
//! modes.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use super::body::LockBody;
use crate::future::{BoxFuture, Driven, DrivenProj};

pin_project! {
    /// Response future of [`LockService`](crate::LockService) with
    /// [`AsResponse`](crate::http::AsResponse): lock failures are error
    /// responses, and the inner service's error `E` passes through.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        driven: Driven<F, Response<LockBody<B>>, E>,
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn passthrough(future: F) -> Self {
        ResponseFuture {
            driven: Driven::Passthrough { future },
        }
    }

    pub(crate) fn locked(future: BoxFuture<Result<Response<LockBody<B>>, E>>) -> Self {
        ResponseFuture {
            driven: Driven::Locked { future },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<LockBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().driven.project() {
            DrivenProj::Passthrough { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(LockBody::new)))
            }
            DrivenProj::Locked { future } => future.as_mut().poll(cx),
        }
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("locked", &matches!(self.driven, Driven::Locked { .. }))
            .finish_non_exhaustive()
    }
}
