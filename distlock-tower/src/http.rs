//! HTTP: lock failures as responses, ready for axum (feature `http`; `axum` adds
//! [`LockInfo`](crate::LockInfo) as an extractor).
//!
//! [`LockLayer::http`] turns lock failures into HTTP responses made by
//! [`error_response`], so the layer goes straight onto an axum `Router` (whose
//! services cannot fail) without a `HandleErrorLayer`:
//!
//! | lock failure | status | headers |
//! |---|---|---|
//! | timed out waiting ([`Error::Timeout`]) | 503 Service Unavailable | `Retry-After: 1` |
//! | held, policy rejects ([`Error::Busy`]) | 409 Conflict | |
//! | lease lost while handling ([`Error::Lost`]) | 503 Service Unavailable | |
//! | Redis unreachable, no quorum, locker closed | 503 Service Unavailable | `Retry-After: 1` |
//! | invalid key from the request ([`Error::InvalidKey`]) | 400 Bad Request | |
//! | anything else (configuration, Redis errors) | 500 Internal Server Error | |
//!
//! The body is one line of plain text saying what happened, without the key,
//! the Redis address or the underlying error (log those from your own
//! [`on_error`](LockLayer::on_error) if you want them). A lost lease is not
//! given a `Retry-After`: the handler was cancelled part-way, so whether to retry
//! depends on whether the request is idempotent.
//!
//! Replace the mapping with [`on_error`](LockLayer::on_error), and fall back to
//! [`error_response`] for the cases you do not change:
//!
//! ```
//! use bytes::Bytes;
//! use distlock_tower::{http::error_response, key, LockLayer};
//! use http::{Response, StatusCode};
//!
//! let layer = LockLayer::new(distlock::Locker::memory(), key::path_segment(1))
//!     .http()
//!     .on_error(|err: &distlock::Error| {
//!         if err.is_busy() {
//!             let mut busy = Response::new(Bytes::from_static(b"try again later\n"));
//!             *busy.status_mut() = StatusCode::TOO_MANY_REQUESTS;
//!             return busy;
//!         }
//!         error_response(err)
//!     });
//! # let _ = layer;
//! ```
//!
//! # When the lock is released
//!
//! By default, when the inner service's future completes: for an axum handler,
//! when it returns its response. That is when a handler has done its work, and
//! releasing then means a slow client, reading the body at its own pace, does
//! not hold up the next request on the same key. It is also what the plain
//! (`AsError`) mode and `#[distributed_lock]` do.
//!
//! [`hold_until_body_sent`](LockLayer::hold_until_body_sent) keeps the lock
//! until the response body has been sent, for handlers whose work happens while
//! the body streams (a body produced from a stream, server-sent events, a gRPC
//! server-streaming method). The lease is then watched while the body is
//! sent: if it is lost, the body is cut short (HTTP) or ends with an error
//! status in its trailers (gRPC).
//!
//! [`Error::Timeout`]: distlock::Error::Timeout
//! [`Error::Busy`]: distlock::Error::Busy
//! [`Error::Lost`]: distlock::Error::Lost
//! [`Error::InvalidKey`]: distlock::Error::InvalidKey

use std::fmt;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::body::{LockBody, Trailers};
use crate::layer::{AsError, LockLayer};

/// The default error mapping of [`LockLayer::http`]: [`error_response`].
pub type ErrorFn = fn(&distlock::Error) -> Response<Bytes>;

/// The `Retry-After` given with 503 responses for a wait timeout or an
/// unavailable backend, in seconds.
pub const RETRY_AFTER_SECS: u32 = 1;

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
    /// [module docs](self) for the table) instead of errors, and keeps the inner
    /// service's error type: the layer then fits an axum `Router` as it is.
    ///
    /// The service takes `http::Request<B>` for any body `B`, and its responses
    /// carry a [`LockBody`] around the inner body (whose data must be
    /// [`Bytes`], as axum's and tonic's are).
    pub fn http(self) -> LockLayer<K, AsResponse<ErrorFn>> {
        self.with_mode(AsResponse::new(error_response as ErrorFn, Protocol::Http))
    }

    pub(crate) fn with_mode<M>(self, mode: M) -> LockLayer<K, M> {
        LockLayer {
            locker: self.locker,
            make_key: self.make_key,
            policy: self.policy,
            mode,
        }
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
        LockLayer {
            locker: self.locker,
            make_key: self.make_key,
            policy: self.policy,
            mode: AsResponse {
                on_error,
                hold_body: self.mode.hold_body,
                protocol: self.mode.protocol,
            },
        }
    }

    /// Holds the lock until the response body has been sent (or dropped), rather
    /// than until the inner service's future completes. See the
    /// [module docs](self#when-the-lock-is-released) for when to use it.
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

/// The default mapping of lock failures to HTTP responses; see the
/// [module docs](self) for the table.
pub fn error_response(err: &distlock::Error) -> Response<Bytes> {
    let failure = Failure::of(err);
    let (status, retry) = match failure {
        Failure::Timeout => (StatusCode::SERVICE_UNAVAILABLE, true),
        Failure::Busy => (StatusCode::CONFLICT, false),
        Failure::Lost => (StatusCode::SERVICE_UNAVAILABLE, false),
        Failure::InvalidKey => (StatusCode::BAD_REQUEST, false),
        Failure::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, true),
        Failure::Internal => (StatusCode::INTERNAL_SERVER_ERROR, false),
    };
    let mut response = Response::new(Bytes::from(format!("{}\n", failure.message())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if retry {
        headers.insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    }
    response
}

/// What went wrong, as the HTTP and gRPC mappings tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    Timeout,
    Busy,
    Lost,
    InvalidKey,
    Unavailable,
    Internal,
}

impl Failure {
    pub(crate) fn of(err: &distlock::Error) -> Self {
        use distlock::Error;
        match err {
            Error::Timeout { .. } => Failure::Timeout,
            Error::Busy { .. } => Failure::Busy,
            Error::Lost { .. } => Failure::Lost,
            Error::InvalidKey { .. } => Failure::InvalidKey,
            e if e.is_unavailable() || e.is_closed() => Failure::Unavailable,
            _ => Failure::Internal,
        }
    }

    /// What the client is told: what happened, without internals.
    pub(crate) fn message(self) -> &'static str {
        match self {
            Failure::Timeout => {
                "timed out waiting for another request on the same resource to finish"
            }
            Failure::Busy => "another request on the same resource is in progress",
            Failure::Lost => "the request was cancelled: it lost exclusive access to its resource",
            Failure::InvalidKey => "the request does not name a resource that can be locked",
            Failure::Unavailable => "the lock service is unavailable",
            Failure::Internal => "the request could not be locked",
        }
    }
}

#[cfg(feature = "axum")]
pub use self::axum::MissingLockInfo;

#[cfg(feature = "axum")]
mod axum {
    use std::convert::Infallible;

    use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
    use axum_core::response::{IntoResponse, Response};
    use http::request::Parts;
    use http::StatusCode;

    use crate::LockInfo;

    /// The rejection of the [`LockInfo`] extractor: the request was not locked
    /// (the route is not behind a `LockLayer`, or the key extractor returned
    /// `None`). Answers 500, since it is a wiring mistake; take
    /// `Option<LockInfo>` for routes where that is expected.
    #[derive(Debug, Clone, Copy, Default)]
    #[non_exhaustive]
    pub struct MissingLockInfo;

    impl IntoResponse for MissingLockInfo {
        fn into_response(self) -> Response {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the request was not handled under a lock\n",
            )
                .into_response()
        }
    }

    /// `LockInfo` is an axum extractor: the lease of a route behind the layer.
    impl<S: Send + Sync> FromRequestParts<S> for LockInfo {
        type Rejection = MissingLockInfo;

        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
            parts
                .extensions
                .get::<LockInfo>()
                .cloned()
                .ok_or(MissingLockInfo)
        }
    }

    /// `Option<LockInfo>`: `None` when the request was not locked.
    impl<S: Send + Sync> OptionalFromRequestParts<S> for LockInfo {
        type Rejection = Infallible;

        async fn from_request_parts(
            parts: &mut Parts,
            _: &S,
        ) -> Result<Option<Self>, Self::Rejection> {
            Ok(parts.extensions.get::<LockInfo>().cloned())
        }
    }
}
