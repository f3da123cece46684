//! The HTTP mode's configuration: [`AsResponse`], and the [`LockLayer`]
//! methods that switch to it and tune it.

use std::fmt;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::Response;

use super::body::{LockBody, Trailers};
use super::response::error_response;
use crate::layer::LockLayer;
use crate::service::AsError;

/// The default error mapping of [`LockLayer::http`]: [`error_response`].
pub type ErrorFn = fn(&distlock::Error) -> Response<Bytes>;

/// Lock failures as responses made by `F`: the mode of [`LockLayer::http`] and
/// `LockLayer::grpc()` (feature `tonic`).
#[derive(Clone)]
pub struct AsResponse<F> {
    pub(crate) on_error: F,
    pub(crate) hold_body: bool,
    pub(crate) protocol: Protocol,
}

/// What the error responses speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http,
    #[cfg_attr(not(feature = "tonic"), allow(dead_code))]
    Grpc,
}

impl<F> AsResponse<F>
where
    F: Fn(&distlock::Error) -> Response<Bytes> + Clone + Send + Sync + 'static,
{
    pub(crate) fn new(on_error: F, protocol: Protocol) -> Self {
        AsResponse {
            on_error,
            hold_body: false,
            protocol,
        }
    }

    /// The response for a lock failure.
    pub(crate) fn respond<B>(&self, err: &distlock::Error) -> Response<LockBody<B>> {
        (self.on_error)(err).map(LockBody::full)
    }

    /// For gRPC, how a body whose lease is lost ends: with the error response's
    /// status as trailers.
    pub(crate) fn trailers_on_loss(&self) -> Option<Trailers> {
        if self.protocol != Protocol::Grpc {
            return None;
        }
        let on_error = self.on_error.clone();
        Some(Box::new(move |err: &distlock::Error| {
            let mut headers = on_error(err).into_parts().0.headers;
            headers.remove(CONTENT_TYPE);
            headers
        }))
    }
}

impl<F> fmt::Debug for AsResponse<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsResponse")
            .field("on_error", &std::any::type_name::<F>())
            .field("hold_body", &self.hold_body)
            .field("protocol", &self.protocol)
            .finish()
    }
}

impl<K> LockLayer<K, AsError> {
    /// Answers lock failures with HTTP responses ([`error_response`]; see the
    /// [module docs](crate::http) for the table) instead of errors, and keeps
    /// the inner service's error type: the layer then fits an axum `Router` as
    /// it is.
    ///
    /// The service takes `http::Request<B>` for any body `B`, and its responses
    /// carry a [`LockBody`] around the inner body (whose data must be
    /// [`Bytes`], as axum's and tonic's are).
    pub fn http(self) -> LockLayer<K, AsResponse<ErrorFn>> {
        self.with_mode(AsResponse::new(error_response as ErrorFn, Protocol::Http))
    }
}

impl<K, F> LockLayer<K, AsResponse<F>> {
    /// Replaces the error mapping: `on_error` makes the response for each lock
    /// failure. Call [`error_response`] (or, for gRPC, `grpc::error_response`)
    /// from it for the cases you keep.
    pub fn on_error<G>(self, on_error: G) -> LockLayer<K, AsResponse<G>>
    where
        G: Fn(&distlock::Error) -> Response<Bytes> + Clone + Send + Sync + 'static,
    {
        let AsResponse {
            hold_body,
            protocol,
            ..
        } = self.mode;
        self.with_mode(AsResponse {
            on_error,
            hold_body,
            protocol,
        })
    }

    /// Holds the lock until the response body has been sent (or dropped), rather
    /// than until the inner service's future completes. See the
    /// [module docs](crate::http#when-the-lock-is-released) for when to use it.
    ///
    /// The inner future and the body are then polled outside the runner's
    /// task-local scope once the response is returned: a body stream reads the
    /// lease from the [`LockInfo`](crate::LockInfo) its handler was given, not
    /// from `distlock::current()`.
    pub fn hold_until_body_sent(mut self) -> Self {
        self.mode.hold_body = true;
        self
    }
}
