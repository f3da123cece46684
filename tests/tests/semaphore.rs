//! The semaphore's behavioural suite, on three backends (one test per backend,
//! made by `suite!`): a private `redis-server`, a three-node Redis Cluster, and
//! the in-memory store.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use distlock::{Error, Locker, LostReason, Policy};
use distlock_tests::RedisServer;
use tokio::time::{timeout, Instant};

mod common;
use common::{eventually, Fixture};

suite! {
    fifty_tasks_on_two_lockers_hold_at_most_three_permits => check_bound;
    a_crashed_holders_permit_frees_after_its_expiry => check_crash;
    permits_renew => check_renewal;
    lost_fires_when_an_operator_removes_the_holders => check_lost;
    a_release_wakes_a_waiter_at_once => check_wake;
    zero_or_disagreeing_permits_are_errors => check_bad_max;
    a_different_max_is_refused_while_permits_are_held_past_their_first_expiry => check_max_lapse;
    current_count_ignores_expired_holders => check_count;
    run_holds_a_permit => check_run;
}

async fn check_bound(fx: Fixture) {
    let lockers = [fx.locker().await, fx.locker().await];
    let inside = Arc::new(AtomicUsize::new(0));
    let max_inside = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..50 {
        let sem = lockers[i % 2].semaphore("pool", 3);
        let (inside, max_inside) = (inside.clone(), max_inside.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..3 {
                let permit = sem.acquire().await.expect("acquire");
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max_inside.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                permit.release().await.expect("release");
            }
        }));
    }
    for t in tasks {
        timeout(Duration::from_secs(60), t)
            .await
            .expect("tasks finish")
            .expect("task");
    }
    assert_eq!(
        max_inside.load(Ordering::SeqCst),
        3,
        "never more than 3, and 3 was reached"
    );
}

async fn check_crash(fx: Fixture) {
    let a = fx
        .builder()
        .expiry(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let b = fx
        .builder()
        .retry_backoff(Duration::from_secs(10), Duration::from_secs(10))
        .build()
        .await
        .unwrap();
    // A detached permit is neither renewed nor released: its holder "crashed".
    let _crashed = a.semaphore("crash", 1).acquire().await.unwrap().detach();
    let started = Instant::now();
    let permit = timeout(Duration::from_secs(3), b.semaphore("crash", 1).acquire())
        .await
        .expect("the permit came back")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
    permit.release().await.unwrap();
}

async fn check_renewal(fx: Fixture) {
    let a = fx
        .builder()
        .expiry(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let sem = a.semaphore("renewed", 1);
    let permit = sem.acquire().await.unwrap();
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert!(!permit.is_lost(), "{:?}", permit.lost_reason());
    assert_eq!(sem.current_count().await.unwrap(), 1);
    assert!(sem.try_acquire().await.unwrap().is_none());
    permit.release().await.unwrap();
    assert_eq!(sem.current_count().await.unwrap(), 0);
}

async fn check_lost(fx: Fixture) {
    let a = fx
        .builder()
        .expiry(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let permit = a.semaphore("removed", 2).acquire().await.unwrap();
    fx.delete_all("removed").await;
    let reason = timeout(Duration::from_secs(2), permit.lost())
        .await
        .expect("lost fired");
    assert_eq!(reason, LostReason::Stolen);
    assert!(permit.release().await.unwrap_err().is_lost());
}

async fn check_wake(fx: Fixture) {
    let a = fx.locker().await;
    let b = fx
        .builder()
        .retry_backoff(Duration::from_secs(5), Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    let held = a.semaphore("wake", 1).acquire().await.unwrap();
    let waiter = tokio::spawn(async move {
        let p = b.semaphore("wake", 1).acquire().await.unwrap();
        (p, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let released = Instant::now();
    held.release().await.unwrap();
    let (_p, acquired) = timeout(Duration::from_secs(2), waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(
        acquired - released < Duration::from_millis(100),
        "{:?}",
        acquired - released
    );
}

async fn check_bad_max(fx: Fixture) {
    let a = fx.locker().await;
    let err = a.semaphore("bad", 0).try_acquire().await.unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    let _held = a.semaphore("bad", 2).acquire().await.unwrap();
    let err = a.semaphore("bad", 3).try_acquire().await.unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("2 permits"), "{err}");
}

/// Regression: the permit count was written at acquire and never renewed, so
/// one expiry later a process with another `max` was let in beside the holder,
/// and the set held more permits than the first process's max.
async fn check_max_lapse(fx: Fixture) {
    let expiry = Duration::from_millis(400);
    let a = fx.builder().expiry(expiry).build().await.unwrap();
    let b = fx.builder().expiry(expiry).build().await.unwrap();
    let held = a.semaphore("lapse", 1).acquire().await.unwrap();
    // Several expiries later, the permit renewed all along...
    tokio::time::sleep(expiry * 3).await;
    assert!(!held.is_lost());
    // ... a process that thinks the semaphore has 2 permits is still refused.
    let err = b.semaphore("lapse", 2).try_acquire().await.unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert_eq!(a.semaphore("lapse", 1).current_count().await.unwrap(), 1);
    held.release().await.unwrap();
    // Once nobody holds it, another count may start afresh.
    let other = b.semaphore("lapse", 2).try_acquire().await.unwrap();
    assert!(other.is_some());
}

async fn check_count(fx: Fixture) {
    let a = fx
        .builder()
        .expiry(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let sem = a.semaphore("count", 5);
    let _p1 = sem.acquire().await.unwrap();
    let _p2 = sem.acquire().await.unwrap().detach();
    assert_eq!(sem.current_count().await.unwrap(), 2);
    eventually(Duration::from_secs(3), || async {
        sem.current_count().await.unwrap() == 1
    })
    .await;
}

async fn check_run(fx: Fixture) {
    let a = fx.locker().await;
    let sem = a.semaphore("run", 1);
    let inner = sem.clone();
    let out = sem
        .run(&Policy::new().timeout(Duration::from_secs(1)), async move {
            assert_eq!(inner.current_count().await.unwrap(), 1);
            distlock::current().unwrap().fencing_token()
        })
        .await
        .unwrap();
    assert!(out.unwrap() > 0);
    assert_eq!(sem.current_count().await.unwrap(), 0);
}

#[tokio::test]
async fn a_semaphore_key_holding_a_list_is_a_wrong_type_error() {
    let server = RedisServer::start().await;
    let mut conn = server.conn().await;
    let _: i64 = redis::cmd("RPUSH")
        .arg("distlock:{jobs}:sem")
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let a = Locker::connect(&server.url()).await.unwrap();
    let err = a.semaphore("jobs", 2).try_acquire().await.unwrap_err();
    assert!(matches!(err, Error::WrongType { .. }), "{err}");
    let err = a.semaphore("jobs", 2).current_count().await.unwrap_err();
    assert!(
        matches!(err, Error::Redis { .. } | Error::WrongType { .. }),
        "{err}"
    );
}
