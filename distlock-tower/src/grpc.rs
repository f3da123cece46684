//! gRPC: lock failures as gRPC statuses, for tonic servers (feature `tonic`).
//!
//! [`LockLayer::grpc`] answers lock failures with trailers-only gRPC responses
//! made by [`error_response`], so the layer goes straight onto a tonic `Server`
//! (`Server::builder().layer(...)`): the client gets a `Status` with the code
//! below, and a message saying what happened without internals.
//!
//! | lock failure | code | why |
//! |---|---|---|
//! | held, policy rejects ([`Error::Busy`]) | `ABORTED` | a concurrency conflict: retry the whole operation later |
//! | timed out waiting ([`Error::Timeout`]) | `UNAVAILABLE` | transient, and the handler never ran: safe to retry with backoff |
//! | lease lost while handling ([`Error::Lost`]) | `ABORTED` | the handler was cancelled part-way: retry at a higher level (re-read, then write), not blindly |
//! | Redis unreachable, no quorum, locker closed | `UNAVAILABLE` | transient |
//! | invalid key from the request ([`Error::InvalidKey`]) | `INVALID_ARGUMENT` | |
//! | anything else (configuration, Redis errors) | `INTERNAL` | |
//!
//! `DEADLINE_EXCEEDED` is left to the client's own deadline: a lock wait
//! timeout is the server's decision, and the call may well succeed if retried.
//!
//! At the tower level a gRPC request is an `http::Request`, so the key comes
//! from its metadata (headers) or its path (`/package.Service/Method`), not from
//! the message, which is still encoded when the layer sees it. Use
//! [`on_error`](crate::LockLayer::on_error) to change the mapping, with
//! [`status`] as the fallback.
//!
//! With [`hold_until_body_sent`](crate::LockLayer::hold_until_body_sent) (for
//! server-streaming methods), a lease lost while the stream is sent ends the
//! stream with the `ABORTED` status in its trailers.
//!
//! ```no_run
//! # async fn serve<S>(grpc_service: S) -> Result<(), Box<dyn std::error::Error>>
//! # where
//! #     S: tower_service::Service<http::Request<tonic::body::Body>, Error = std::convert::Infallible>
//! #         + tonic::server::NamedService + Clone + Send + Sync + 'static,
//! #     S::Response: axum::response::IntoResponse,
//! #     S::Future: Send + 'static,
//! # {
//! use std::time::Duration;
//! use distlock::Policy;
//! use distlock_tower::{key, LockLayer};
//! use http::HeaderName;
//!
//! const ACCOUNT: HeaderName = HeaderName::from_static("x-account-id");
//!
//! let locker = distlock::Locker::connect("redis://127.0.0.1:6379").await?;
//! let lock = LockLayer::new(locker, key::header(ACCOUNT).prefix("account:"))
//!     .policy(Policy::new().timeout(Duration::from_secs(5)))
//!     .grpc();
//! tonic::transport::Server::builder()
//!     .layer(lock)
//!     .add_service(grpc_service)
//!     .serve("127.0.0.1:50051".parse()?)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! [`Error::Timeout`]: distlock::Error::Timeout
//! [`Error::Busy`]: distlock::Error::Busy
//! [`Error::Lost`]: distlock::Error::Lost
//! [`Error::InvalidKey`]: distlock::Error::InvalidKey

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::Response;
use tonic::{Code, Status};

use crate::http::{AsResponse, ErrorFn, Failure, Protocol};
use crate::layer::LockLayer;
use crate::service::AsError;

impl<K> LockLayer<K, AsError> {
    /// Answers lock failures with gRPC statuses ([`error_response`]; see the
    /// [module docs](self) for the table) instead of errors, and keeps the inner
    /// service's error type: the layer then fits a tonic `Server` as it is.
    pub fn grpc(self) -> LockLayer<K, AsResponse<ErrorFn>> {
        self.with_mode(AsResponse::new(error_response as ErrorFn, Protocol::Grpc))
    }
}

/// The gRPC status for a lock failure; see the [module docs](self) for the table.
pub fn status(err: &distlock::Error) -> Status {
    let failure = Failure::of(err);
    let code = match failure {
        Failure::Busy | Failure::Lost => Code::Aborted,
        Failure::Timeout | Failure::Unavailable => Code::Unavailable,
        Failure::InvalidKey => Code::InvalidArgument,
        Failure::Internal => Code::Internal,
    };
    Status::new(code, failure.message())
}

/// The default mapping of lock failures for [`LockLayer::grpc`]: a trailers-only
/// response (HTTP 200, the status in the headers, no body) carrying
/// [`status(err)`](status).
pub fn error_response(err: &distlock::Error) -> Response<Bytes> {
    status_response(&status(err))
}

/// A trailers-only gRPC response carrying `status`.
pub fn status_response(status: &Status) -> Response<Bytes> {
    let mut response = Response::new(Bytes::new());
    let headers = response.headers_mut();
    if status.add_header(headers).is_err() {
        // The message did not fit a header value: send the code alone.
        headers.insert(
            HeaderName::from_static("grpc-status"),
            HeaderValue::from(status.code() as i32),
        );
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}
