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
//! [`on_error`](crate::LockLayer::on_error) if you want them). A lost lease is not
//! given a `Retry-After`: the handler was cancelled part-way, so whether to retry
//! depends on whether the request is idempotent.
//!
//! Replace the mapping with [`on_error`](crate::LockLayer::on_error), and fall back to
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
//! [`hold_until_body_sent`](crate::LockLayer::hold_until_body_sent) keeps the lock
//! until the response body has been sent, for handlers whose work happens while
//! the body streams (a body produced from a stream, server-sent events, a gRPC
//! server-streaming method). The lease is then watched while the body is
//! sent: if it is lost, the body is cut short (HTTP) or ends with an error
//! status in its trailers (gRPC).
//!
//! # What the mode is made of
//!
//! The service's responses carry a [`LockBody`] around the inner service's
//! body, and its future is [`future::ResponseFuture`]. The gRPC flavour of the
//! mode (feature `tonic`) lives in the crate's `grpc` module: the same service with
//! gRPC statuses for answers.
//!
//! [`LockLayer::http`]: crate::LockLayer::http
//! [`Error::Timeout`]: distlock::Error::Timeout
//! [`Error::Busy`]: distlock::Error::Busy
//! [`Error::Lost`]: distlock::Error::Lost
//! [`Error::InvalidKey`]: distlock::Error::InvalidKey

#[cfg(feature = "axum")]
mod axum;
mod body;
pub mod future;
mod layer;
mod response;
mod service;

#[cfg(feature = "axum")]
pub use self::axum::MissingLockInfo;
pub use body::LockBody;
pub use layer::{AsResponse, ErrorFn};
// For the gRPC mode (`crate::grpc`).
#[cfg(feature = "tonic")]
pub(crate) use layer::Protocol;
#[cfg(feature = "tonic")]
pub(crate) use response::Failure;
pub use response::{error_response, RETRY_AFTER_SECS};
