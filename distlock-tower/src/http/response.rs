//! The default mapping of lock failures to HTTP responses, and what the HTTP
//! and gRPC mappings share.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

/// The `Retry-After` given with 503 responses for a wait timeout or an
/// unavailable backend, in seconds.
pub const RETRY_AFTER_SECS: u32 = 1;

/// The default mapping of lock failures to HTTP responses; see the
/// [module docs](crate::http) for the table.
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
