//! `distlock-tower`'s `LockLayer` in its default mode (lock failures as
//! `BoxError`), with tower-test's mock service, on a private `redis-server`
//! and in memory (`on_redis::*`, `on_memory::*`).
//!
//! The suite lives here rather than in `distlock-tower/tests/` because the
//! Redis harness does (see `tower_common`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use distlock::{Locker, LostReason, OnBusy, Policy};
use distlock_tower::{BoxError, LockInfo, LockLayer, LockRequest};
use tokio::sync::{oneshot, Notify};
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_test::mock;

mod tower_common;
use tower_common::{eventually, eventually_free, is_held, within, Backend};

on_both_backends! {
    second_same_key_request_waits_until_the_first_completes,
    local_waiters_on_one_key_are_served_in_arrival_order,
    requests_with_different_keys_do_not_wait_for_each_other,
    keyless_requests_pass_through_without_a_lock,
    the_ready_inner_service_moves_into_the_response_future,
    poll_ready_reflects_the_inner_service,
    inner_errors_pass_through_unchanged,
    a_wait_timeout_fails_with_the_timeout_error,
    reject_fails_at_once_when_the_key_is_held,
    try_policy_refuses_skip_since_a_request_needs_an_answer,
    skip_given_to_policy_fails_every_request_with_a_config_error,
    the_default_wait_is_bounded,
    an_invalid_key_is_refused_before_the_inner_service_runs,
    a_lost_lease_drops_the_inner_future_and_fails_with_lost,
    at_most_cancels_a_request_that_holds_the_lock_too_long,
    the_handler_sees_its_lease_in_the_request_and_through_current,
    a_dropped_response_future_gives_its_place_and_the_lock_back,
    several_keys_are_held_together_and_exclude_every_overlapping_request,
    a_request_waiting_for_several_keys_runs_once_all_are_released,
}

/// A request of a type of our own: the layer is not tied to HTTP.
#[derive(Debug)]
struct Req {
    key: Option<&'static str>,
    id: u32,
    lease: Option<LockInfo>,
}

impl LockRequest for Req {
    fn insert_lock_info(&mut self, info: LockInfo) {
        self.lease = Some(info);
    }
}

fn req(key: &'static str, id: u32) -> Req {
    Req {
        key: Some(key),
        id,
        lease: None,
    }
}

fn keyless(id: u32) -> Req {
    Req {
        key: None,
        id,
        lease: None,
    }
}

type KeyFn = fn(&Req) -> Option<String>;

fn by_key(r: &Req) -> Option<String> {
    r.key.map(str::to_owned)
}

fn layer(locker: &Locker) -> LockLayer<KeyFn> {
    LockLayer::new(locker.clone(), by_key as KeyFn)
}

async fn next_request(
    handle: &mut mock::Handle<Req, &'static str>,
) -> (Req, mock::SendResponse<&'static str>) {
    let next = within("the inner service got a request", handle.next_request()).await;
    next.unwrap_or_else(|| panic!("the mock service is gone"))
}

fn lock_error(err: &BoxError) -> &distlock::Error {
    err.downcast_ref::<distlock::Error>()
        .unwrap_or_else(|| panic!("not a distlock::Error: {err}"))
}

/// Waits until `n` keys have requests waiting in this process's lines: a
/// request found its key held (or queued behind one that did) and waits.
async fn waiting_on(locker: &Locker, n: usize) {
    eventually(&format!("{n} key(s) with waiting requests"), || {
        locker.__waiting_lines() == n
    })
    .await;
}

async fn second_same_key_request_waits_until_the_first_completes(backend: Backend) {
    let locker = backend.locker().await;
    let (mut svc, mut handle) = mock::spawn_layer::<Req, &'static str, _>(layer(&locker));

    assert_ready_ok!(svc.poll_ready());
    let first = tokio::spawn(svc.call(req("account:1", 1)));
    let (seen, respond_first) = next_request(&mut handle).await;
    assert_eq!(seen.id, 1);
    let first_token = seen
        .lease
        .expect("the first request carries its lease")
        .fencing_token();

    assert_ready_ok!(svc.poll_ready());
    let second = tokio::spawn(svc.call(req("account:1", 2)));
    waiting_on(&locker, 1).await;
    assert!(
        handle.poll_request().is_pending(),
        "the second request reached the inner service while the first held the lock"
    );

    respond_first.send_response("first");
    assert_eq!(
        within("the first response", first).await.unwrap().unwrap(),
        "first"
    );

    let (seen, respond_second) = next_request(&mut handle).await;
    assert_eq!(seen.id, 2, "the second request runs once the first is done");
    let second_token = seen
        .lease
        .expect("the second request carries its lease")
        .fencing_token();
    assert!(
        second_token > first_token,
        "fencing tokens increase: {first_token} then {second_token}"
    );
    respond_second.send_response("second");
    assert_eq!(
        within("the second response", second)
            .await
            .unwrap()
            .unwrap(),
        "second"
    );
}

async fn local_waiters_on_one_key_are_served_in_arrival_order(backend: Backend) {
    let locker = backend.locker().await;
    let (mut svc, mut handle) = mock::spawn_layer::<Req, &'static str, _>(layer(&locker));

    // One poll each, in order: a request joins the key's line in its first
    // poll, before any round trip to the backend.
    let mut pending = Vec::new();
    for id in 0..4 {
        assert_ready_ok!(svc.poll_ready());
        let mut fut = task::spawn(svc.call(req("k", id)));
        assert_pending!(fut.poll());
        pending.push(tokio::spawn(fut));
    }
    for id in 0..4 {
        let (seen, respond) = next_request(&mut handle).await;
        assert_eq!(seen.id, id, "served out of arrival order");
        respond.send_response("ok");
    }
    for fut in pending {
        within("a queued request", fut).await.unwrap().unwrap();
    }
}

async fn requests_with_different_keys_do_not_wait_for_each_other(backend: Backend) {
    let locker = backend.locker().await;
    let (mut svc, mut handle) = mock::spawn_layer::<Req, &'static str, _>(layer(&locker));

    assert_ready_ok!(svc.poll_ready());
    let a = tokio::spawn(svc.call(req("a", 1)));
    let (seen, respond_a) = next_request(&mut handle).await;
    assert_eq!(seen.id, 1);

    assert_ready_ok!(svc.poll_ready());
    let b = tokio::spawn(svc.call(req("b", 2)));
    let (seen, respond_b) = next_request(&mut handle).await;
    assert_eq!(
        seen.id, 2,
        "`b` reached the inner service while `a` is held"
    );

    respond_b.send_response("b");
    assert_eq!(within("b", b).await.unwrap().unwrap(), "b");
    respond_a.send_response("a");
    assert_eq!(within("a", a).await.unwrap().unwrap(), "a");
}

async fn keyless_requests_pass_through_without_a_lock(backend: Backend) {
    let locker = backend.locker().await;
    let (mut svc, mut handle) = mock::spawn_layer::<Req, &'static str, _>(layer(&locker));

    // Even while a keyed request holds its lock.
    assert_ready_ok!(svc.poll_ready());
    let held = tokio::spawn(svc.call(req("a", 1)));
    let (_, respond_held) = next_request(&mut handle).await;

    assert_ready_ok!(svc.poll_ready());
    let mut free = task::spawn(svc.call(keyless(2)));
    // Passed on in `call` itself, before the future is first polled.
    let (seen, respond) = match handle.poll_request() {
        std::task::Poll::Ready(Some(r)) => r,
        other => panic!("the keyless request did not pass straight through: {other:?}"),
    };
    assert_eq!(seen.id, 2);
    assert!(seen.lease.is_none(), "a keyless request has no lease");
    respond.send_response("free");
    assert_eq!(within("keyless", &mut free).await.unwrap(), "free");

    respond_held.send_response("held");
    assert_eq!(within("held", held).await.unwrap().unwrap(), "held");
}

async fn the_ready_inner_service_moves_into_the_response_future(backend: Backend) {
    let locker = backend.locker().await;
    let (mut svc, mut handle) = mock::spawn_layer::<Req, &'static str, _>(layer(&locker));
    let outside = locker.lock("a").acquire().await.unwrap();

    // The mock panics if a clone that `poll_ready` did not make ready is called:
    // the waiting future must call the very service that was ready.
    assert_ready_ok!(svc.poll_ready());
    let waiting = tokio::spawn(svc.call(req("a", 1)));
    waiting_on(&locker, 1).await;
    assert!(
        handle.poll_request().is_pending(),
        "called before the lock was held"
    );

    // The service left behind is a fresh clone: it must be made ready again.
    handle.allow(0);
    assert_pending!(svc.poll_ready());
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());

    outside.release().await.unwrap();
    let (seen, respond) = next_request(&mut handle).await;
    assert_eq!(seen.id, 1);
    respond.send_response("late");
    assert_eq!(
        within("the waiting request", waiting)
            .await
            .unwrap()
            .unwrap(),
        "late"
    );
}

async fn poll_ready_reflects_the_inner_service(backend: Backend) {
    let locker = backend.locker().await;
    let (mut svc, mut handle) = mock::spawn_layer::<Req, &'static str, _>(layer(&locker));

    handle.allow(0);
    assert_pending!(svc.poll_ready());
    handle.allow(1);
    assert!(
        svc.is_woken(),
        "the inner service's wake-up reaches the caller"
    );
    assert_ready_ok!(svc.poll_ready());

    handle.send_error("inner service down");
    let err = match svc.poll_ready() {
        std::task::Poll::Ready(Err(e)) => e,
        other => panic!("expected the inner error, got {other:?}"),
    };
    assert_eq!(err.to_string(), "inner service down");
}

async fn inner_errors_pass_through_unchanged(backend: Backend) {
    let locker = backend.locker().await;
    let (mut svc, mut handle) = mock::spawn_layer::<Req, &'static str, _>(layer(&locker));

    assert_ready_ok!(svc.poll_ready());
    let fut = tokio::spawn(svc.call(req("a", 1)));
    let (_, respond) = next_request(&mut handle).await;
    respond.send_error("handler failed");

    let err = within("the failed request", fut)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.to_string(), "handler failed");
    assert!(err.downcast_ref::<distlock::Error>().is_none());
    // And the lock was released before the error was returned.
    let again = locker.lock("a").try_acquire().await.unwrap();
    assert!(again.is_some(), "the lock is free after a failed request");
}

async fn a_wait_timeout_fails_with_the_timeout_error(backend: Backend) {
    let locker = backend.locker().await;
    let layer = layer(&locker).policy(Policy::new().timeout(Duration::from_millis(50)));
    let (mut svc, mut handle) = mock::spawn_layer::<Req, &'static str, _>(layer);
    let _outside = locker.lock("a").acquire().await.unwrap();

    assert_ready_ok!(svc.poll_ready());
    let err = within("the timeout", svc.call(req("a", 1)))
        .await
        .unwrap_err();
    let err = lock_error(&err);
    assert!(err.is_timeout(), "{err}");
    assert!(
        handle.poll_request().is_pending(),
        "the inner service was called without the lock"
    );
}

async fn reject_fails_at_once_when_the_key_is_held(backend: Backend) {
    let locker = backend.locker().await;
    let layer = layer(&locker).policy(Policy::new().on_busy(OnBusy::Reject));
    let (mut svc, mut handle) = mock::spawn_layer::<Req, &'static str, _>(layer);
    let _outside = locker.lock("a").acquire().await.unwrap();

    assert_ready_ok!(svc.poll_ready());
    let err = within("the rejection", svc.call(req("a", 1)))
        .await
        .unwrap_err();
    assert!(lock_error(&err).is_busy(), "{err}");
    assert!(
        handle.poll_request().is_pending(),
        "a rejected request reached the inner service"
    );
}

async fn try_policy_refuses_skip_since_a_request_needs_an_answer(backend: Backend) {
    let locker = backend.locker().await;
    let err = layer(&locker)
        .try_policy(Policy::new().on_busy(OnBusy::Skip))
        .unwrap_err();
    assert!(matches!(err, distlock::Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("OnBusy::Skip"), "{err}");
    for ok in [OnBusy::Wait, OnBusy::Reject] {
        assert!(layer(&locker).try_policy(Policy::new().on_busy(ok)).is_ok());
    }
}

/// Skip used to behave like Reject silently: a request that found the key
/// free ran, one that found it held was refused as busy.
async fn skip_given_to_policy_fails_every_request_with_a_config_error(backend: Backend) {
    let locker = backend.locker().await;
    let layer = layer(&locker).policy(Policy::new().on_busy(OnBusy::Skip));
    let (mut svc, mut handle) = mock::spawn_layer::<Req, &'static str, _>(layer);

    // The key is free: the request is refused all the same, before any lock.
    assert_ready_ok!(svc.poll_ready());
    let err = within("the refusal", svc.call(req("a", 1)))
        .await
        .unwrap_err();
    assert!(
        matches!(lock_error(&err), distlock::Error::Config { .. }),
        "{err}"
    );
    assert!(handle.poll_request().is_pending());
    assert!(locker.lock("a").try_acquire().await.unwrap().is_some());
}

/// `LockLayer::new` used to wait forever, so a request could hang long after
/// its client had gone.
///
/// In memory the clock is paused (and jumps ahead while the runtime is idle);
/// on Redis, whose replies take real time, this waits the real 30 seconds,
/// once for both layers.
async fn the_default_wait_is_bounded(backend: Backend) {
    if backend.is_memory() {
        tokio::time::pause();
    }
    let locker = backend.locker().await;
    let layers = [
        ("a", layer(&locker)),
        // A policy without a timeout gets the default wait too.
        (
            "b",
            layer(&locker).policy(Policy::new().on_busy(OnBusy::Wait)),
        ),
    ];
    let waits = layers.map(|(key, layer)| {
        let locker = locker.clone();
        async move {
            let (mut svc, mut handle) = mock::spawn_layer::<Req, &'static str, _>(layer);
            let _outside = locker.lock(key).acquire().await.unwrap();
            assert_ready_ok!(svc.poll_ready());
            let started = tokio::time::Instant::now();
            let err = tokio::time::timeout(Duration::from_secs(600), svc.call(req(key, 1)))
                .await
                .expect("still waiting for the lock after 10 minutes")
                .unwrap_err();
            assert!(lock_error(&err).is_timeout(), "{err}");
            let waited = started.elapsed();
            assert!(
                waited >= distlock_tower::DEFAULT_WAIT
                    && waited < distlock_tower::DEFAULT_WAIT + Duration::from_secs(5),
                "waited {waited:?}"
            );
            assert!(handle.poll_request().is_pending());
        }
    });
    let [a, b] = waits;
    tokio::join!(a, b);
}

async fn an_invalid_key_is_refused_before_the_inner_service_runs(backend: Backend) {
    let locker = backend.locker().await;
    let (mut svc, mut handle) = mock::spawn_layer::<Req, &'static str, _>(layer(&locker));

    assert_ready_ok!(svc.poll_ready());
    let err = within("the refusal", svc.call(req("{tag}", 1)))
        .await
        .unwrap_err();
    assert!(lock_error(&err).is_invalid_input(), "{err}");
    assert!(handle.poll_request().is_pending());
}

/// Sets its flag when dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A service whose futures never complete: they say when they started and
/// set `dropped` when they are dropped.
fn never_completes(
    started: Arc<Notify>,
    dropped: Arc<AtomicBool>,
) -> impl Service<Req, Response = (), Error = BoxError, Future: Send> + Clone + Send + 'static {
    service_fn(move |_: Req| {
        let flag = DropFlag(Arc::clone(&dropped));
        let started = Arc::clone(&started);
        async move {
            let _flag = flag;
            started.notify_one();
            std::future::pending::<()>().await;
            Ok::<(), BoxError>(())
        }
    })
}

async fn a_lost_lease_drops_the_inner_future_and_fails_with_lost(backend: Backend) {
    let locker = backend.locker().await;
    let started = Arc::new(Notify::new());
    let dropped = Arc::new(AtomicBool::new(false));
    let svc = layer(&locker).layer(never_completes(Arc::clone(&started), Arc::clone(&dropped)));

    let request = tokio::spawn(svc.oneshot(req("a", 1)));
    within("the handler started", started.notified()).await;
    assert!(!dropped.load(Ordering::SeqCst));

    // An operator deletes the key: the holder learns at once (same locker).
    assert!(locker.force_unlock("a").await.unwrap());

    let err = within("the cancelled request", request)
        .await
        .unwrap()
        .unwrap_err();
    let err = lock_error(&err);
    assert_eq!(err.lost_reason(), Some(LostReason::Stolen), "{err}");
    assert!(
        dropped.load(Ordering::SeqCst),
        "the inner future was not dropped"
    );
}

async fn at_most_cancels_a_request_that_holds_the_lock_too_long(backend: Backend) {
    let locker = backend.locker().await;
    let started = Arc::new(Notify::new());
    let dropped = Arc::new(AtomicBool::new(false));
    let svc = layer(&locker)
        .policy(Policy::new().at_most(Duration::from_millis(100)))
        .layer(never_completes(Arc::clone(&started), Arc::clone(&dropped)));

    let err = within("the cancelled request", svc.oneshot(req("a", 1)))
        .await
        .unwrap_err();
    assert_eq!(
        lock_error(&err).lost_reason(),
        Some(LostReason::MaxHold),
        "{err}"
    );
    assert!(
        dropped.load(Ordering::SeqCst),
        "the inner future was not dropped"
    );
    // At `at_most` the locker marks the lease lost and releases it in its
    // background task: on Redis the key goes a round trip after the request
    // has failed (as for `Lock::max_hold` itself), not before.
    eventually_free(&locker, "a").await;
}

async fn the_handler_sees_its_lease_in_the_request_and_through_current(backend: Backend) {
    let locker = backend.locker().await;
    let (tx, rx) = oneshot::channel();
    let tx = Arc::new(std::sync::Mutex::new(Some(tx)));
    let svc = layer(&locker).layer(service_fn(move |r: Req| {
        let tx = Arc::clone(&tx);
        async move {
            let current = distlock::current().map(|c| (c.key().to_owned(), c.fencing_token()));
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send((r.lease, current));
            }
            Ok::<_, BoxError>(())
        }
    }));

    within("the request", svc.oneshot(req("order:7", 1)))
        .await
        .unwrap();
    let (lease, current) = rx.await.unwrap();
    let lease = lease.expect("the request carried a LockInfo");
    assert_eq!(lease.key(), "order:7");
    assert!(!lease.is_lost());
    assert_eq!(current, Some(("order:7".to_owned(), lease.fencing_token())));
}

async fn a_dropped_response_future_gives_its_place_and_the_lock_back(backend: Backend) {
    let locker = backend.locker().await;
    let (mut svc, mut handle) = mock::spawn_layer::<Req, &'static str, _>(layer(&locker));

    assert_ready_ok!(svc.poll_ready());
    let first = tokio::spawn(svc.call(req("a", 1)));
    let (_, _respond_first) = next_request(&mut handle).await;

    // A waiter that gives up (its client went away) leaves the line.
    assert_ready_ok!(svc.poll_ready());
    let quitter = tokio::spawn(svc.call(req("a", 2)));
    waiting_on(&locker, 1).await;
    quitter.abort();
    waiting_on(&locker, 0).await;

    assert_ready_ok!(svc.poll_ready());
    let third = tokio::spawn(svc.call(req("a", 3)));
    waiting_on(&locker, 1).await;

    // The holder is dropped too: the lock goes to the next in line.
    first.abort();
    let (seen, respond) = next_request(&mut handle).await;
    assert_eq!(seen.id, 3);
    respond.send_response("third");
    assert_eq!(
        within("the third request", third).await.unwrap().unwrap(),
        "third"
    );
    waiting_on(&locker, 0).await;
}

/// A transfer's keys: both accounts (`Req::id` is the source, `Req::key` the
/// destination).
fn both_accounts(r: &Req) -> Option<Vec<String>> {
    let to = r.key?;
    Some(vec![format!("account:{}", r.id), format!("account:{to}")])
}

type KeysFn = fn(&Req) -> Option<Vec<String>>;

fn transfers(locker: &Locker) -> LockLayer<distlock_tower::key::Many<KeysFn>> {
    LockLayer::new(
        locker.clone(),
        distlock_tower::key::many(both_accounts as KeysFn),
    )
}

async fn several_keys_are_held_together_and_exclude_every_overlapping_request(backend: Backend) {
    let locker = backend.locker().await;
    let layer = transfers(&locker).policy(Policy::new().on_busy(OnBusy::Reject));
    let (mut svc, mut handle) = mock::spawn_layer::<Req, &'static str, _>(layer);

    // 1 -> 2 holds both accounts while the handler runs.
    assert_ready_ok!(svc.poll_ready());
    let first = tokio::spawn(svc.call(req("2", 1)));
    let (seen, respond_first) = next_request(&mut handle).await;
    assert_eq!(seen.id, 1);
    // The lease it sees is the last key's, in sorted order.
    assert_eq!(seen.lease.expect("its lease").key(), "account:2");
    assert!(is_held(&locker, "account:1").await);
    assert!(is_held(&locker, "account:2").await);

    // 3 -> 2 and 2 -> 1 (either order) share an account: refused, holding nothing.
    for (to, from) in [("2", 3), ("1", 2)] {
        assert_ready_ok!(svc.poll_ready());
        let err = within("the rejection", svc.call(req(to, from)))
            .await
            .unwrap_err();
        assert!(lock_error(&err).is_busy(), "{err}");
    }
    assert!(
        !is_held(&locker, "account:3").await,
        "a refused transfer kept account:3"
    );
    assert!(
        handle.poll_request().is_pending(),
        "an overlapping transfer ran"
    );

    // 3 -> 4 shares nothing: it runs alongside.
    assert_ready_ok!(svc.poll_ready());
    let other = tokio::spawn(svc.call(req("4", 3)));
    let (seen, respond_other) = next_request(&mut handle).await;
    assert_eq!(seen.id, 3);
    respond_other.send_response("3->4");
    assert_eq!(within("3->4", other).await.unwrap().unwrap(), "3->4");

    respond_first.send_response("1->2");
    assert_eq!(within("1->2", first).await.unwrap().unwrap(), "1->2");
    eventually_free(&locker, "account:1").await;
    eventually_free(&locker, "account:2").await;
}

async fn a_request_waiting_for_several_keys_runs_once_all_are_released(backend: Backend) {
    let locker = backend.locker().await;
    let layer = transfers(&locker).policy(Policy::new().timeout(Duration::from_secs(10)));
    let (mut svc, mut handle) = mock::spawn_layer::<Req, &'static str, _>(layer);
    let outside = locker.lock("account:6").acquire().await.unwrap();

    assert_ready_ok!(svc.poll_ready());
    let waiting = tokio::spawn(svc.call(req("6", 5)));
    // While it waits, it holds neither account: account:5 can be taken and
    // given back (again and again) by others.
    for _ in 0..3 {
        let guard = within("account:5", locker.lock("account:5").acquire())
            .await
            .unwrap();
        guard.release().await.unwrap();
    }
    assert!(
        handle.poll_request().is_pending(),
        "ran while account:6 was held"
    );
    outside.release().await.unwrap();
    let (seen, respond) = next_request(&mut handle).await;
    assert_eq!(seen.id, 5);
    assert!(is_held(&locker, "account:5").await);
    assert!(is_held(&locker, "account:6").await);
    respond.send_response("5->6");
    assert_eq!(within("5->6", waiting).await.unwrap().unwrap(), "5->6");
}
