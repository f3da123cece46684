//! A locker's life cycle against its leases: operations racing `close()`, and
//! detached leases adopted back. On a private `redis-server` (through a
//! `FaultProxy` where a request must be held in flight) and, where the
//! behaviour is the backend's, in memory too.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::time::Duration;

use distlock::{Error, Locker, LostReason, MemoryStore, Policy};
use distlock_tests::{FaultProxy, RedisServer};
use tokio::time::{timeout, Instant};

/// The Redis key of the lock on `key` under the default prefix.
fn lock_key(key: &str) -> String {
    format!("distlock:{{{key}}}")
}

/// `run` with `at_least` (ShedLock's "lock at least for", the macro's job
/// deduplication) whose future is dropped mid-work leaves the key held until
/// `at_least` is over, as it does when the work ends: a replica firing the
/// same job must not run it again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_dropped_mid_work_keeps_the_key_for_at_least() {
    let server = RedisServer::start().await;
    let locker = Locker::connect(&server.url()).await.unwrap();
    let at_least = Duration::from_millis(1500);
    let policy = Policy::new().at_least(at_least);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let lock = locker.lock("job");
    let acquired = Instant::now();
    let task = tokio::spawn(async move {
        lock.run(&policy, async move {
            let _ = started_tx.send(());
            std::future::pending::<()>().await;
        })
        .await
    });
    started_rx.await.unwrap();
    task.abort();
    let _ = task.await;
    // The dropped guard hands the key to the keeper, which either deletes it
    // (pttl -2) or lets it expire when `at_least` is over (pttl at most 1.5 s,
    // down from the 30 s expiry).
    let start = Instant::now();
    let pttl = loop {
        let pttl = server.pttl(&lock_key("job")).await;
        if pttl <= 1500 {
            break pttl;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the keeper never handled the drop"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        pttl > 0,
        "the key was deleted at once (pttl {pttl}), not kept for at_least"
    );
    while server.exists(&lock_key("job")).await {
        assert!(
            acquired.elapsed() < at_least + Duration::from_secs(2),
            "the key outlived at_least"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        acquired.elapsed() >= at_least - Duration::from_millis(50),
        "the key went after {:?}",
        acquired.elapsed()
    );
}

/// A `close()` dropped halfway (here while it waits for an attempt in
/// flight, as a shutdown with a timeout would drop it) still closes the
/// locker: its held leases are released (their lost signal fires with
/// `Closed`) and a later `close()` returns, instead of leaving a locker that
/// says it is closed while its keeper keeps renewing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_dropped_halfway_still_closes() {
    let server = RedisServer::start().await;
    let proxy = FaultProxy::start(server.addr()).await;
    let locker = Locker::connect(&proxy.url()).await.unwrap();
    let held = locker.lock("held").acquire().await.unwrap();
    proxy.set_latency(Duration::from_millis(150));
    let lock = locker.lock("in-flight");
    let attempt = tokio::spawn(async move { lock.try_acquire().await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut close = Box::pin(locker.close());
    assert!(
        futures_util::poll!(&mut close).is_pending(),
        "close() waits for the attempt in flight"
    );
    drop(close);
    let reason = timeout(Duration::from_secs(10), held.lost())
        .await
        .expect("the held lease is released although close() was dropped");
    assert_eq!(reason, LostReason::Closed);
    let _ = timeout(Duration::from_secs(10), attempt).await;
    proxy.set_latency(Duration::ZERO);
    let start = Instant::now();
    while server.exists(&lock_key("held")).await {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the key was left held"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    timeout(Duration::from_secs(5), locker.close())
        .await
        .expect("a later close() returns")
        .unwrap();
}

/// A `try_acquire` whose request is in flight while `close()` runs must not
/// leave its key in Redis for the whole expiry: either it fails with
/// `Error::Closed` and nothing is held, or it hands back a guard that `close()`
/// released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_acquire_racing_close_leaves_no_key() {
    let server = RedisServer::start().await;
    let proxy = FaultProxy::start(server.addr()).await;
    for (round, delay) in [0u64, 5, 20, 60, 120].into_iter().enumerate() {
        let key = format!("race-{round}");
        let locker = Locker::connect(&proxy.url()).await.unwrap();
        // Every request now takes 150 ms each way: the attempt is in flight
        // while close() runs.
        proxy.set_latency(Duration::from_millis(150));
        let lock = locker.lock(key.clone());
        let attempt = tokio::spawn(async move { lock.try_acquire().await });
        tokio::time::sleep(Duration::from_millis(delay)).await;
        timeout(Duration::from_secs(10), locker.close())
            .await
            .expect("close returns")
            .unwrap();
        let outcome = timeout(Duration::from_secs(10), attempt)
            .await
            .expect("the attempt ends")
            .unwrap();
        match outcome {
            Err(Error::Closed) => {}
            Ok(Some(guard)) => assert!(guard.is_lost(), "round {round}: a live guard after close"),
            other => panic!("round {round}: unexpected {other:?}"),
        }
        proxy.set_latency(Duration::ZERO);
        // Nothing may be left for the 30 s expiry: the key is gone within a
        // second of the attempt's end.
        let start = Instant::now();
        while server.exists(&lock_key(&key)).await {
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "round {round} (close after {delay} ms): the key was left held after close"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Regression: adopting the same detached lease twice gave two live guards
/// with one token. Adoption voids the lease's old token: the second fails.
async fn check_adopting_twice(a: Locker, b: Locker) {
    let lease = a.lock("adopted").acquire().await.unwrap().detach();
    let copy = lease.clone();
    let first = a.adopt(lease).await.unwrap();
    let err = b.adopt(copy.clone()).await.unwrap_err();
    assert!(err.is_lost(), "{err}");
    let err = a.adopt(copy.clone()).await.unwrap_err();
    assert!(err.is_lost(), "{err}");
    // The old token can neither extend nor release the lease any more.
    assert!(a.extend_lease(&copy).await.unwrap_err().is_lost());
    assert!(a.release_lease(&copy).await.unwrap_err().is_lost());
    assert!(!first.is_lost());
    assert_eq!(first.fencing_token(), copy.fencing_token());
    assert!(a.lock("adopted").try_acquire().await.unwrap().is_none());
    first.release().await.unwrap();
    assert!(b.lock("adopted").try_acquire().await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopting_a_lease_twice_gives_one_live_guard_on_redis() {
    let server = RedisServer::start().await;
    let a = Locker::connect(&server.url()).await.unwrap();
    let b = Locker::connect(&server.url()).await.unwrap();
    check_adopting_twice(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopting_a_lease_twice_gives_one_live_guard_in_memory() {
    let store = MemoryStore::new();
    let a = Locker::builder()
        .memory_store(store.clone())
        .build()
        .await
        .unwrap();
    let b = Locker::builder().memory_store(store).build().await.unwrap();
    check_adopting_twice(a, b).await;
}

/// An `adopt` whose answer is lost (here it times out while a black-holing
/// proxy holds the request, which then reaches the server and runs) must not
/// leave the key held by a token nobody knows for its whole expiry: the old
/// lease is void, so only the adopting locker can give the key back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopt_whose_answer_was_lost_does_not_strand_the_key() {
    let server = RedisServer::start().await;
    let proxy = FaultProxy::start(server.addr()).await;
    let locker = Locker::builder()
        .url(proxy.url())
        .op_timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let guard = locker
        .lock("adopted")
        .expiry(Duration::from_secs(20))
        .acquire()
        .await
        .unwrap();
    // One adoption first, so that the script is cached on the server (a
    // delayed EVALSHA would otherwise only answer NOSCRIPT to nobody).
    let guard = locker.adopt(guard.detach()).await.unwrap();
    let lease = guard.detach();
    let token_before = server.get(&lock_key("adopted")).await.unwrap();

    proxy.blackhole();
    let adopted = locker.adopt(lease).await;
    assert!(adopted.is_err(), "the adoption times out: {adopted:?}");
    proxy.restore();
    // The held request now reaches the server and replaces the token.
    let start = Instant::now();
    while server.get(&lock_key("adopted")).await.as_deref() == Some(token_before.as_str()) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the retoken never ran"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let start = Instant::now();
    while server.exists(&lock_key("adopted")).await {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "the key is held by nobody (pttl {} ms) after the adoption failed",
            server.pttl(&lock_key("adopted")).await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
