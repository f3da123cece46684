//! `distlock-tower`'s `LockLayer::grpc()`: lock failures as gRPC statuses, on
//! a private `redis-server` and in memory (`on_redis::*`, `on_memory::*`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use distlock::{Locker, LostReason, OnBusy, Policy};
use distlock_tower::{grpc, key, LockLayer};
use http::{HeaderMap, HeaderName, Request, Response, StatusCode};
use http_body_util::channel::{Channel, Sender};
use http_body_util::{BodyExt, Full};
use tokio::sync::{Mutex, Notify};
use tonic::Code;
use tower::{service_fn, Layer, ServiceExt};

mod tower_common;
use tower_common::{within, Backend};

on_both_backends! {
    a_busy_key_with_reject_is_aborted,
    a_wait_timeout_is_unavailable,
    a_lost_lease_is_aborted,
    a_lost_lease_ends_a_held_stream_with_aborted_trailers,
}

const ACCOUNT: HeaderName = HeaderName::from_static("x-account-id");

fn call(account: &str) -> Request<()> {
    let mut request = Request::post("/bank.Accounts/Withdraw").body(()).unwrap();
    request
        .headers_mut()
        .insert(ACCOUNT, account.parse().unwrap());
    request
}

fn layer(locker: &Locker) -> LockLayer<key::Header> {
    LockLayer::new(locker.clone(), key::header(ACCOUNT).prefix("account:"))
}

fn code(headers: &HeaderMap) -> Code {
    let value = headers
        .get("grpc-status")
        .expect("a grpc-status")
        .to_str()
        .unwrap();
    Code::from_i32(value.parse().unwrap())
}

/// Answers with a trailers-only response, as tonic does, and checks its shape.
fn status_of<B>(response: &Response<B>) -> Code {
    assert_eq!(response.status(), StatusCode::OK, "gRPC errors ride on 200");
    assert_eq!(response.headers()["content-type"], "application/grpc");
    code(response.headers())
}

fn ok() -> impl tower::Service<
    Request<()>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send,
> + Clone
       + Send
       + 'static {
    service_fn(|_: Request<()>| async { Ok(Response::new(Full::new(Bytes::new()))) })
}

#[test]
fn statuses_follow_the_documented_table() {
    let cases = [
        (distlock::Error::busy("k"), Code::Aborted),
        (
            distlock::Error::timeout("k", Duration::from_secs(1)),
            Code::Unavailable,
        ),
        (
            distlock::Error::lost("k", LostReason::Stolen),
            Code::Aborted,
        ),
        (
            distlock::Error::unavailable("connecting to 10.0.0.5", "connection refused"),
            Code::Unavailable,
        ),
        (distlock::Error::Closed, Code::Unavailable),
        (distlock::Error::config("bad"), Code::Internal),
    ];
    for (err, expected) in cases {
        let status = grpc::status(&err);
        assert_eq!(status.code(), expected, "{err}");
        assert!(!status.message().contains("10.0.0.5"), "leaks internals");
        assert_eq!(code(grpc::error_response(&err).headers()), expected);
    }
}

async fn a_busy_key_with_reject_is_aborted(backend: Backend) {
    let locker = backend.locker().await;
    let svc = layer(&locker)
        .policy(Policy::new().on_busy(OnBusy::Reject))
        .grpc()
        .layer(ok());
    let _held = locker.lock("account:1").acquire().await.unwrap();
    let response = within("the answer", svc.oneshot(call("1"))).await.unwrap();
    assert_eq!(status_of(&response), Code::Aborted);
    assert!(response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .is_empty());
}

async fn a_wait_timeout_is_unavailable(backend: Backend) {
    let locker = backend.locker().await;
    let svc = layer(&locker)
        .policy(Policy::new().timeout(Duration::from_millis(50)))
        .grpc()
        .layer(ok());
    let _held = locker.lock("account:1").acquire().await.unwrap();
    let response = within("the answer", svc.oneshot(call("1"))).await.unwrap();
    assert_eq!(status_of(&response), Code::Unavailable);
}

async fn a_lost_lease_is_aborted(backend: Backend) {
    let locker = backend.locker().await;
    let started = Arc::new(Notify::new());
    let svc = layer(&locker).grpc().layer(service_fn({
        let started = Arc::clone(&started);
        move |_: Request<()>| {
            let started = Arc::clone(&started);
            async move {
                started.notify_one();
                std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>().await
            }
        }
    }));
    let request = tokio::spawn(svc.oneshot(call("1")));
    within("the handler started", started.notified()).await;
    assert!(locker.force_unlock("account:1").await.unwrap());
    let response = within("the answer", request).await.unwrap().unwrap();
    assert_eq!(status_of(&response), Code::Aborted);
}

async fn a_lost_lease_ends_a_held_stream_with_aborted_trailers(backend: Backend) {
    let locker = backend.locker().await;
    let senders: Arc<Mutex<Vec<Sender<Bytes>>>> = Arc::default();
    let svc = layer(&locker)
        .grpc()
        .hold_until_body_sent()
        .layer(service_fn({
            let senders = Arc::clone(&senders);
            move |_: Request<()>| {
                let senders = Arc::clone(&senders);
                async move {
                    let (tx, body) = Channel::<Bytes>::new(4);
                    senders.lock().await.push(tx);
                    Ok::<_, Infallible>(Response::new(body))
                }
            }
        }));

    let response = within("the response", svc.oneshot(call("1")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut tx = senders.lock().await.pop().unwrap();
    tx.send_data(Bytes::from_static(b"message 1"))
        .await
        .unwrap();
    let first = within("a message", body.frame()).await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "message 1");

    assert!(locker.force_unlock("account:1").await.unwrap());
    let last = within("the trailers", body.frame()).await.unwrap().unwrap();
    let trailers = last.into_trailers().expect("trailers, not data");
    assert_eq!(code(&trailers), Code::Aborted);
    assert!(trailers.get("content-type").is_none());
    assert!(within("then the end", body.frame()).await.is_none());
}
