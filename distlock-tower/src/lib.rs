//! A tower [`Layer`](tower_layer::Layer) that serializes requests per key across
//! every replica sharing one Redis, for axum, tonic and any `tower::Service`.
//!
//! Requests whose key extractor gives the same key run one at a time, across
//! every process whose [`distlock::Locker`] uses the same Redis; requests with
//! different keys run in parallel; requests without a key pass straight
//! through. Withdrawals from one account, edits of one document, jobs of one
//! tenant: whatever must not overlap with itself.
//!
//! ```text
//!      replica A                                    replica B
//!       request                                      request
//!          │                                            │
//!          ▼                                            ▼
//!  ┌─ LockService ─────────────────────────┐   ┌─ LockService ─┐
//!  │ key = make_key(&request)              │   │  the same,    │
//!  │   None: to the inner service, as is   │   │  own Locker   │
//!  │ wait in this process's FIFO line      │   └───────┬───────┘
//!  │   for the key (one contender per key) │           │
//!  │ acquire the key ──────────────────────┼──▶ Redis ◀┘  one holder
//!  │ inner.call(request + LockInfo)        │              per key, across
//!  │   dropped if the lease is lost        │              all replicas
//!  │ release when the inner future is done │
//!  │   (or the body is sent, if asked)     │
//!  └───────────────────┬───────────────────┘
//!                      ▼
//!            inner service (your handler)
//! ```
//!
//! The lock is taken with [`distlock::Lock::run`], the same runner as
//! `#[distributed_lock]`, under the same [`Policy`](distlock::Policy): wait
//! timeout, reject when busy, `at_most`, `at_least`, expiry. The lease renews
//! itself while the request is handled; if it is lost anyway (Redis down for
//! longer than the expiry, the key deleted, `at_most` reached), the inner future
//! is dropped, which cancels the request, and the request fails with
//! [`distlock::Error::Lost`]. The handler sees its lease as a [`LockInfo`] in
//! the request (key, fencing token, lost signal).
//!
//! # axum
//!
//! [`LockLayer::http`] turns lock failures into responses (503 with
//! `Retry-After` on a wait timeout, 409 when busy, 503 when the lease is lost or
//! Redis is down; see [`http`]), so the layer goes onto a `Router` as it is:
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//!
//! use axum::{routing::post, Extension, Router};
//! use distlock::Policy;
//! use distlock_tower::{key, LockInfo, LockLayer};
//! use tower::ServiceExt;
//!
//! // With the `axum` feature, `lease: LockInfo` works as an extractor too.
//! async fn withdraw(Extension(lease): Extension<LockInfo>) -> String {
//!     // One withdrawal per account at a time, across every replica.
//!     format!("{} (fencing token {})\n", lease.key(), lease.fencing_token())
//! }
//!
//! // Locker::connect("redis://127.0.0.1:6379").await? in production.
//! let locker = distlock::Locker::memory();
//! let app = Router::new()
//!     .route("/accounts/{id}/withdraw", post(withdraw))
//!     // /accounts/42/withdraw → lock "account:42"
//!     .route_layer(
//!         LockLayer::new(locker, key::path_segment(1).prefix("account:"))
//!             .policy(Policy::new().timeout(Duration::from_secs(5)))
//!             .http(),
//!     );
//!
//! let request = http::Request::post("/accounts/42/withdraw").body(axum::body::Body::empty())?;
//! let response = app.oneshot(request).await?;
//! assert_eq!(response.status(), 200);
//! # Ok(()) }
//! ```
//!
//! `route_layer` locks only the requests that matched a route. The lock is
//! released when the handler returns its response; see
//! [`hold_until_body_sent`](LockLayer::hold_until_body_sent) for bodies that do
//! their work while they stream.
//!
//! # tonic
//!
//! `LockLayer::grpc()` (feature `tonic`) answers lock failures with gRPC
//! statuses (`ABORTED` when busy or lost, `UNAVAILABLE` on a wait timeout or
//! when Redis is down; see the `grpc` module). The key comes from metadata or
//! from the method's path, as the message is not decoded yet:
//!
//! ```no_run
//! # #[cfg(feature = "tonic")]
//! # async fn serve<S>(accounts: S) -> Result<(), Box<dyn std::error::Error>>
//! # where
//! #     S: tower_service::Service<http::Request<tonic::body::Body>, Error = std::convert::Infallible>
//! #         + tonic::server::NamedService + Clone + Send + Sync + 'static,
//! #     S::Response: axum::response::IntoResponse,
//! #     S::Future: Send + 'static,
//! # {
//! use distlock_tower::LockLayer;
//!
//! let locker = distlock::Locker::connect("redis://127.0.0.1:6379").await?;
//! // Lock Withdraw calls per account; other methods pass through.
//! let per_account = |req: &http::Request<tonic::body::Body>| {
//!     if req.uri().path() != "/bank.Accounts/Withdraw" {
//!         return None;
//!     }
//!     let account = req.headers().get("x-account-id")?.to_str().ok()?;
//!     Some(format!("account:{account}"))
//! };
//! tonic::transport::Server::builder()
//!     .layer(LockLayer::new(locker, per_account).grpc())
//!     .add_service(accounts) // AccountsServer::new(...) from tonic-build
//!     .serve("127.0.0.1:50051".parse()?)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # Any tower service
//!
//! Without `.http()` or `.grpc()`, the layer follows the tower convention: its
//! error is [`BoxError`], with a [`distlock::Error`] inside for lock failures
//! (`err.downcast_ref::<distlock::Error>()`) and the inner service's errors
//! passed through. Any request type works that implements [`LockRequest`]
//! (`http::Request` does; for your own type, an empty `impl` will do):
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), distlock_tower::BoxError> {
//! use distlock_tower::{LockLayer, LockRequest};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! struct Job {
//!     tenant: String,
//! }
//! impl LockRequest for Job {}
//!
//! let layer = LockLayer::new(distlock::Locker::memory(), |job: &Job| {
//!     Some(format!("tenant:{}", job.tenant))
//! });
//! let service = layer.layer(service_fn(|job: Job| async move {
//!     // Inside the lock, the runner's task-local says which lease is held.
//!     let lease = distlock::current().map(|l| l.fencing_token());
//!     Ok::<_, std::convert::Infallible>(format!("{} ran under token {lease:?}", job.tenant))
//! }));
//! let done = service.oneshot(Job { tenant: "acme".into() }).await?;
//! assert!(done.starts_with("acme ran under token Some("));
//! # Ok(()) }
//! ```
//!
//! With axum's `HandleErrorLayer`, downcast the error to choose the response
//! yourself; [`http::error_response`] is the mapping `.http()` uses.
//!
//! # Features
//!
//! | feature | default | adds |
//! |---|---|---|
//! | `http` | yes | `http::Request` support: [`key::header`], [`key::path_segment`], [`key::path`], `LockInfo` in the extensions, [`LockLayer::http`], [`http::LockBody`] |
//! | `axum` | no | `http`, and [`LockInfo`] as an axum extractor |
//! | `tonic` | no | `http`, and `LockLayer::grpc` with the `grpc` module (tonic 0.14, Rust 1.88) |

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod future;
#[cfg(feature = "tonic")]
pub mod grpc;
#[cfg(feature = "http")]
pub mod http;
mod info;
pub mod key;
mod layer;
mod service;

pub use distlock::BoxError;
pub use info::{LockInfo, LockRequest};
pub use key::MakeKey;
pub use layer::{LockLayer, DEFAULT_WAIT};
pub use service::{AsError, LockService};

/// The README's examples, compiled as doctests.
#[cfg(all(doctest, feature = "axum", feature = "tonic"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
