//! [`LockInfo`] as an axum extractor (feature `axum`).

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

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<LockInfo>().cloned())
    }
}
