//! A `Locker` used from more than one runtime: a `static` locker shared by
//! several `#[tokio::test]`s, a locker built in a short-lived runtime and used
//! afterwards in another. Runs on the in-memory backend and on a private
//! `redis-server` started by the harness.
//!
//! The guarantee under test: no guard is ever silently unkept. When the runtime
//! that ran a locker's background work ends, every lease it was keeping has its
//! lost signal fired (`LostReason::RuntimeShutdown`), and the locker carries on
//! in the next runtime that uses it: renewals, `max_hold`, `close()`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::time::Duration;

use distlock::{Locker, LockerBuilder, LostReason, MemoryStore};
use distlock_tests::RedisServer;
use tokio::runtime::{Builder, Runtime};
use tokio::time::timeout;

fn current_thread() -> Runtime {
    Builder::new_current_thread().enable_all().build().unwrap()
}

fn multi_thread() -> Runtime {
    Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Builds a locker and takes `key` in a runtime that then ends; in a second
/// runtime, checks that the guard was told, that another owner can take the
/// key only after that, and that the locker still keeps leases there.
fn check_locker_outliving_its_first_runtime(first: Runtime, builder: impl Fn() -> LockerBuilder) {
    let expiry = Duration::from_millis(600);
    let (locker, guard) = first.block_on(async {
        let locker = builder().expiry(expiry).build().await.unwrap();
        let guard = locker.lock("shared").acquire().await.unwrap();
        (locker, guard)
    });
    drop(first);

    let second = multi_thread();
    second.block_on(async {
        // The runtime that kept the lease is gone: the guard must say so at once.
        assert_eq!(
            guard.lost_reason(),
            Some(LostReason::RuntimeShutdown),
            "the guard's keeper is gone but the guard was not told"
        );
        // Another owner takes the key (after it expires, or once released):
        // by then the old guard has long said it is lost.
        let other = builder().build().await.unwrap();
        let taken = timeout(Duration::from_secs(5), other.lock("shared").acquire())
            .await
            .expect("another owner acquires within 5 s")
            .unwrap();
        assert!(guard.is_lost(), "two owners and no lost signal");
        drop(guard);
        taken.release().await.unwrap();

        // The first locker still works here: a lease renews past its expiry...
        let held = locker.lock("renewed").acquire().await.unwrap();
        tokio::time::sleep(expiry * 3).await;
        assert!(
            !held.is_lost(),
            "a lease taken in the second runtime was not renewed"
        );
        held.release().await.unwrap();
        // ... `max_hold` fires ...
        let limited = locker
            .lock("limited")
            .max_hold(Duration::from_millis(200))
            .acquire()
            .await
            .unwrap();
        let reason = timeout(Duration::from_secs(3), limited.lost())
            .await
            .expect("max_hold fires");
        assert_eq!(reason, LostReason::MaxHold);
        // ... and close() returns.
        timeout(Duration::from_secs(5), locker.close())
            .await
            .expect("close returns")
            .unwrap();
        other.close().await.unwrap();
    });
}

#[test]
fn a_memory_locker_outliving_its_first_current_thread_runtime_signals_and_carries_on() {
    let store = MemoryStore::new();
    check_locker_outliving_its_first_runtime(current_thread(), || {
        Locker::builder().memory_store(store.clone())
    });
}

#[test]
fn a_memory_locker_outliving_its_first_multi_thread_runtime_signals_and_carries_on() {
    let store = MemoryStore::new();
    check_locker_outliving_its_first_runtime(multi_thread(), || {
        Locker::builder().memory_store(store.clone())
    });
}

#[test]
fn a_redis_locker_outliving_its_first_runtime_signals_and_carries_on() {
    // The server outlives both runtimes: it is a child process, not a task.
    let server = current_thread().block_on(RedisServer::start());
    let url = server.url();
    check_locker_outliving_its_first_runtime(current_thread(), || {
        Locker::builder().url(url.clone())
    });
    drop(server);
}

#[test]
fn a_redis_locker_outliving_its_first_multi_thread_runtime_signals_and_carries_on() {
    let server = current_thread().block_on(RedisServer::start());
    let url = server.url();
    check_locker_outliving_its_first_runtime(multi_thread(), || Locker::builder().url(url.clone()));
    drop(server);
}

/// The pattern from the issue: one locker in a `static`, used by tests that
/// each run on a runtime of their own, one after the other.
#[test]
fn a_static_memory_locker_serves_one_runtime_after_another() {
    static LOCKER: std::sync::OnceLock<Locker> = std::sync::OnceLock::new();
    let locker = || LOCKER.get_or_init(Locker::memory).clone();
    for round in 0..3 {
        current_thread().block_on(async {
            let guard = locker()
                .lock("static")
                .acquire_timeout(Duration::from_secs(5))
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert!(!guard.is_lost());
            guard.release().await.unwrap();
            // Background work runs in this runtime too: `max_hold` fires.
            let limited = locker()
                .lock("static")
                .max_hold(Duration::from_millis(100))
                .acquire()
                .await
                .unwrap();
            let reason = timeout(Duration::from_secs(3), limited.lost())
                .await
                .unwrap_or_else(|_| panic!("round {round}: max_hold never fired"));
            assert_eq!(reason, LostReason::MaxHold);
        });
    }
}
