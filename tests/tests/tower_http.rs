//! `distlock-tower`'s `LockLayer::http()`: lock failures as HTTP responses,
//! and when the lock is released (handler returned, or body sent), on a
//! private `redis-server` and in memory (`on_redis::*`, `on_memory::*`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use distlock::{Locker, OnBusy, Policy};
use distlock_tower::http::LockBody;
use distlock_tower::{key, LockInfo, LockLayer};
use http::{Request, Response, StatusCode};
use http_body_util::channel::{Channel, Sender};
use http_body_util::{BodyExt, Full};
use tokio::sync::{Mutex, Notify};
use tower::{service_fn, Layer, Service, ServiceExt};

mod tower_common;
use tower_common::{eventually_free, is_held, within, Backend};

on_both_backends! {
    a_wait_timeout_answers_503_with_retry_after,
    a_busy_key_with_reject_answers_409,
    a_lost_lease_cancels_the_handler_and_answers_503,
    a_closed_locker_answers_503_with_retry_after,
    an_invalid_key_from_the_request_answers_400,
    a_bad_policy_answers_500_without_details,
    on_error_replaces_the_mapping_and_can_fall_back,
    responses_and_unlocked_requests_pass_through,
    by_default_the_lock_is_released_when_the_handler_returns,
    hold_until_body_sent_keeps_the_lock_until_the_body_ends,
    dropping_a_held_body_releases_the_lock,
    a_lost_lease_cuts_a_held_body_short,
    at_least_keeps_the_key_after_a_held_body_ends,
    lock_info_is_an_axum_extractor_on_locked_routes,
}

fn post(path: &str) -> Request<()> {
    Request::post(path).body(()).unwrap()
}

/// `/accounts/{id}/...` locks `account:{id}`.
fn accounts(locker: &Locker) -> LockLayer<key::PathSegment> {
    LockLayer::new(locker.clone(), key::path_segment(1).prefix("account:"))
}

/// A handler answering `200 done`.
fn done(
) -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
       + Clone
       + Send
       + 'static {
    service_fn(|_: Request<()>| async { Ok(Response::new(Full::new(Bytes::from("done")))) })
}

/// A handler that never answers; it says when it started.
fn stuck(
    started: Arc<Notify>,
) -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
       + Clone
       + Send
       + 'static {
    service_fn(move |_: Request<()>| {
        let started = Arc::clone(&started);
        async move {
            started.notify_one();
            std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>().await
        }
    })
}

/// A handler whose response body streams from a channel the test holds.
fn streaming(
    senders: Arc<Mutex<Vec<Sender<Bytes>>>>,
) -> impl Service<Request<()>, Response = Response<Channel<Bytes>>, Error = Infallible, Future: Send>
       + Clone
       + Send
       + 'static {
    service_fn(move |_: Request<()>| {
        let senders = Arc::clone(&senders);
        async move {
            let (tx, body) = Channel::new(4);
            senders.lock().await.push(tx);
            Ok(Response::new(body))
        }
    })
}

async fn text<B>(body: LockBody<B>) -> String
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<distlock_tower::BoxError>,
{
    let bytes = body.collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

struct Expected {
    status: StatusCode,
    retry_after: Option<&'static str>,
    says: &'static str,
}

async fn check<B>(what: &str, response: Response<LockBody<B>>, expected: Expected)
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<distlock_tower::BoxError>,
{
    assert_eq!(response.status(), expected.status, "{what}");
    assert_eq!(
        response
            .headers()
            .get(http::header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap()),
        expected.retry_after,
        "{what}: Retry-After"
    );
    assert_eq!(
        response.headers()[http::header::CONTENT_TYPE],
        "text/plain; charset=utf-8"
    );
    let body = text(response.into_body()).await;
    assert!(body.contains(expected.says), "{what}: body {body:?}");
    assert!(
        !body.contains("account:"),
        "{what}: the body leaks the key: {body:?}"
    );
}

async fn a_wait_timeout_answers_503_with_retry_after(backend: Backend) {
    let locker = backend.locker().await;
    let svc = accounts(&locker)
        .policy(Policy::new().timeout(Duration::from_millis(50)))
        .http()
        .layer(done());
    let _held = locker.lock("account:1").acquire().await.unwrap();

    let response = within("the answer", svc.oneshot(post("/accounts/1/withdraw")))
        .await
        .unwrap();
    let expected = Expected {
        status: StatusCode::SERVICE_UNAVAILABLE,
        retry_after: Some("1"),
        says: "timed out waiting",
    };
    check("timeout", response, expected).await;
}

async fn a_busy_key_with_reject_answers_409(backend: Backend) {
    let locker = backend.locker().await;
    let svc = accounts(&locker)
        .policy(Policy::new().on_busy(OnBusy::Reject))
        .http()
        .layer(done());
    let _held = locker.lock("account:1").acquire().await.unwrap();

    let response = within("the answer", svc.oneshot(post("/accounts/1/withdraw")))
        .await
        .unwrap();
    let expected = Expected {
        status: StatusCode::CONFLICT,
        retry_after: None,
        says: "in progress",
    };
    check("busy", response, expected).await;
}

async fn a_lost_lease_cancels_the_handler_and_answers_503(backend: Backend) {
    let locker = backend.locker().await;
    let started = Arc::new(Notify::new());
    let svc = accounts(&locker).http().layer(stuck(Arc::clone(&started)));

    let request = tokio::spawn(svc.oneshot(post("/accounts/1/withdraw")));
    within("the handler started", started.notified()).await;
    assert!(locker.force_unlock("account:1").await.unwrap());

    let response = within("the answer", request).await.unwrap().unwrap();
    let expected = Expected {
        status: StatusCode::SERVICE_UNAVAILABLE,
        retry_after: None,
        says: "lost exclusive access",
    };
    check("lost", response, expected).await;
}

async fn a_closed_locker_answers_503_with_retry_after(backend: Backend) {
    let locker = backend.locker().await;
    let svc = accounts(&locker).http().layer(done());
    locker.close().await.unwrap();

    let response = within("the answer", svc.oneshot(post("/accounts/1/withdraw")))
        .await
        .unwrap();
    let expected = Expected {
        status: StatusCode::SERVICE_UNAVAILABLE,
        retry_after: Some("1"),
        says: "unavailable",
    };
    check("closed", response, expected).await;
}

async fn an_invalid_key_from_the_request_answers_400(backend: Backend) {
    let locker = backend.locker().await;
    let by_header = LockLayer::new(
        locker.clone(),
        key::header(http::HeaderName::from_static("x-id")),
    )
    .http()
    .layer(done());
    let mut request = post("/");
    request
        .headers_mut()
        .insert("x-id", http::HeaderValue::from_static("a{b}"));
    let response = within("the answer", by_header.oneshot(request))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body = text(response.into_body()).await;
    assert!(body.contains("does not name a resource"), "{body:?}");
}

async fn a_bad_policy_answers_500_without_details(backend: Backend) {
    let locker = backend.locker().await;
    let svc = accounts(&locker)
        .policy(Policy::new().expiry(Duration::from_millis(1)))
        .http()
        .layer(done());

    let response = within("the answer", svc.oneshot(post("/accounts/1/withdraw")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = text(response.into_body()).await;
    assert_eq!(body, "the request could not be locked\n");
}

async fn on_error_replaces_the_mapping_and_can_fall_back(backend: Backend) {
    let locker = backend.locker().await;
    let layer = accounts(&locker)
        .policy(Policy::new().on_busy(OnBusy::Reject))
        .http()
        .on_error(|err: &distlock::Error| {
            if err.is_busy() {
                let mut r = Response::new(Bytes::from_static(b"slow down\n"));
                *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                return r;
            }
            distlock_tower::http::error_response(err)
        });
    let _held = locker.lock("account:1").acquire().await.unwrap();

    let response = layer
        .layer(done())
        .oneshot(post("/accounts/1/withdraw"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(text(response.into_body()).await, "slow down\n");

    locker.close().await.unwrap();
    let response = layer
        .layer(done())
        .oneshot(post("/accounts/2/withdraw"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
}

async fn responses_and_unlocked_requests_pass_through(backend: Backend) {
    let locker = backend.locker().await;
    let svc = accounts(&locker).http().layer(done());

    let locked = svc
        .clone()
        .oneshot(post("/accounts/1/withdraw"))
        .await
        .unwrap();
    assert_eq!(locked.status(), StatusCode::OK);
    assert_eq!(text(locked.into_body()).await, "done");

    // `/health` has no segment 1: no key, no lock, even with the locker closed.
    locker.close().await.unwrap();
    let free = svc.oneshot(post("/health")).await.unwrap();
    assert_eq!(free.status(), StatusCode::OK);
    assert_eq!(text(free.into_body()).await, "done");
}

async fn by_default_the_lock_is_released_when_the_handler_returns(backend: Backend) {
    let locker = backend.locker().await;
    let senders = Arc::default();
    let svc = accounts(&locker)
        .http()
        .layer(streaming(Arc::clone(&senders)));

    let response = svc.oneshot(post("/accounts/1/withdraw")).await.unwrap();
    // The body has not been sent yet, and the key is already free.
    assert!(!is_held(&locker, "account:1").await);
    let mut tx = senders.lock().await.pop().unwrap();
    tx.send_data(Bytes::from("late")).await.unwrap();
    drop(tx);
    assert_eq!(text(response.into_body()).await, "late");
}

async fn hold_until_body_sent_keeps_the_lock_until_the_body_ends(backend: Backend) {
    let locker = backend.locker().await;
    let senders = Arc::default();
    let svc = accounts(&locker)
        .http()
        .hold_until_body_sent()
        .layer(streaming(Arc::clone(&senders)));

    let response = svc.oneshot(post("/accounts/1/withdraw")).await.unwrap();
    let mut body = response.into_body();
    let mut tx = senders.lock().await.pop().unwrap();
    tx.send_data(Bytes::from("part 1")).await.unwrap();
    let frame = within("the first part", body.frame())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(frame.into_data().unwrap(), "part 1");
    assert!(
        is_held(&locker, "account:1").await,
        "released before the body was sent"
    );

    drop(tx); // the end of the body
    assert!(within("the end", body.frame()).await.is_none());
    // Released before the end was reported: a client that has read the whole
    // response finds the key free.
    assert!(
        !is_held(&locker, "account:1").await,
        "still held once the body has ended"
    );
}

async fn dropping_a_held_body_releases_the_lock(backend: Backend) {
    let locker = backend.locker().await;
    let senders = Arc::default();
    let svc = accounts(&locker)
        .http()
        .hold_until_body_sent()
        .layer(streaming(Arc::clone(&senders)));

    let response = svc.oneshot(post("/accounts/1/withdraw")).await.unwrap();
    assert!(is_held(&locker, "account:1").await);
    drop(response); // the client went away
    eventually_free(&locker, "account:1").await;
}

async fn a_lost_lease_cuts_a_held_body_short(backend: Backend) {
    let locker = backend.locker().await;
    let senders = Arc::default();
    let svc = accounts(&locker)
        .http()
        .hold_until_body_sent()
        .layer(streaming(Arc::clone(&senders)));

    let response = svc.oneshot(post("/accounts/1/withdraw")).await.unwrap();
    let mut body = response.into_body();
    let _tx = senders.lock().await.pop().unwrap();
    assert!(locker.force_unlock("account:1").await.unwrap());

    let err = within("the body fails", body.frame())
        .await
        .expect("an error, not the end")
        .unwrap_err();
    let err = err.downcast_ref::<distlock::Error>().unwrap();
    assert!(err.is_lost(), "{err}");
    assert!(within("then the end", body.frame()).await.is_none());
}

async fn at_least_keeps_the_key_after_a_held_body_ends(backend: Backend) {
    let locker = backend.locker().await;
    let senders = Arc::default();
    let svc = accounts(&locker)
        .policy(Policy::new().at_least(Duration::from_millis(300)))
        .http()
        .hold_until_body_sent()
        .layer(streaming(Arc::clone(&senders)));

    let started = tokio::time::Instant::now();
    let response = svc.oneshot(post("/accounts/1/withdraw")).await.unwrap();
    drop(senders.lock().await.pop().unwrap());
    assert_eq!(text(response.into_body()).await, "");
    eventually_free(&locker, "account:1").await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "released after {:?}, before `at_least`",
        started.elapsed()
    );
}

/// An axum handler that says which lease it runs under.
async fn whoami(lease: LockInfo) -> String {
    format!("{} {}", lease.key(), lease.fencing_token())
}

/// An axum handler for routes that may or may not be locked.
async fn maybe(lease: Option<LockInfo>) -> String {
    lease.map_or_else(|| "none".to_owned(), |l| l.key().to_owned())
}

async fn send(app: &axum::Router, path: &str) -> (StatusCode, String) {
    let request = Request::post(path).body(axum::body::Body::empty()).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn lock_info_is_an_axum_extractor_on_locked_routes(backend: Backend) {
    let locker = backend.locker().await;
    let app = axum::Router::new()
        .route("/accounts/{id}/withdraw", axum::routing::post(whoami))
        .route_layer(accounts(&locker).http())
        .route("/unlocked", axum::routing::post(whoami))
        .route("/optional", axum::routing::post(maybe));

    let (status, body) = send(&app, "/accounts/7/withdraw").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("account:7 "), "{body}");

    let (status, _) = send(&app, "/unlocked").await;
    assert_eq!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "a route outside the layer has no lease"
    );
    assert_eq!(send(&app, "/optional").await.1, "none");
}
