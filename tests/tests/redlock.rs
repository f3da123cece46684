//! Redlock over 3 and 5 real servers: a minority down changes nothing, a
//! majority down is a quorum error or a lost lease, and an empty restart of one
//! server does not let a second owner in.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use distlock::{Error, Locker, LostReason, Policy};
use distlock_tests::RedisServer;
use tokio::time::{timeout, Instant};

async fn redlock(servers: &[RedisServer], expiry: Duration) -> Locker {
    Locker::builder()
        .servers(servers.iter().map(RedisServer::url))
        .expiry(expiry)
        .op_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_three_down_changes_nothing() {
    let mut servers = RedisServer::start_many(3).await;
    let a = redlock(&servers, Duration::from_secs(1)).await;
    let b = redlock(&servers, Duration::from_secs(1)).await;
    servers[0].kill();

    let first = a
        .lock("k")
        .acquire_timeout(Duration::from_secs(2))
        .await
        .unwrap();
    assert!(
        b.lock("k").try_acquire().await.unwrap().is_none(),
        "a second owner"
    );
    // Renewal keeps it across three expiries with one server gone.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert!(!first.is_lost(), "{:?}", first.lost_reason());
    let token = first.fencing_token();

    // A waiter is woken by the release (pub/sub on the surviving majority).
    let waiter = tokio::spawn(async move {
        let g = b
            .lock("k")
            .acquire_timeout(Duration::from_secs(3))
            .await
            .unwrap();
        (g.fencing_token(), Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let released = Instant::now();
    first.release().await.unwrap();
    let (next, woke) = timeout(Duration::from_secs(4), waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(next > token);
    assert!(
        woke - released < Duration::from_millis(500),
        "{:?}",
        woke - released
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_servers_with_two_down_keep_mutual_exclusion() {
    let mut servers = RedisServer::start_many(5).await;
    let lockers = [
        redlock(&servers, Duration::from_secs(2)).await,
        redlock(&servers, Duration::from_secs(2)).await,
    ];
    servers[1].kill();
    servers[3].kill();
    let inside = Arc::new(AtomicUsize::new(0));
    let max_inside = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..10 {
        let lock = lockers[i % 2].lock("shared");
        let (inside, max_inside) = (inside.clone(), max_inside.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..3 {
                let g = lock.acquire_timeout(Duration::from_secs(20)).await.unwrap();
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max_inside.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                g.release().await.unwrap();
            }
        }));
    }
    for t in tasks {
        timeout(Duration::from_secs(60), t).await.unwrap().unwrap();
    }
    assert_eq!(max_inside.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_three_down_is_a_quorum_error_naming_each_server() {
    let mut servers = RedisServer::start_many(3).await;
    let a = redlock(&servers, Duration::from_secs(1)).await;
    servers[0].kill();
    servers[2].kill();
    let err = a.lock("k").try_acquire().await.unwrap_err();
    let Error::Quorum {
        succeeded,
        needed,
        causes,
    } = &err
    else {
        panic!("expected a quorum error, got {err}");
    };
    assert_eq!((*succeeded, *needed), (1, 2));
    assert_eq!(causes.len(), 2);
    for (cause, server) in causes.iter().zip([&servers[0], &servers[2]]) {
        assert!(
            cause.server.contains(&server.port().to_string()),
            "{}",
            cause.server
        );
        assert!(cause.error.is_unavailable(), "{}", cause.error);
    }
    assert!(err.is_unavailable());
    // Nothing is left on the surviving server: the partial acquisition is
    // given back (in the background, at once).
    let survivor = &servers[1];
    let start = Instant::now();
    while survivor.exists("distlock:{k}").await {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "partial acquisition left behind"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Starting with a majority down fails too.
    let err = Locker::builder()
        .servers(servers.iter().map(RedisServer::url))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Quorum { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lock_whose_majority_dies_is_lost() {
    let mut servers = RedisServer::start_many(3).await;
    let a = redlock(&servers, Duration::from_secs(1)).await;
    let g = a.lock("k").acquire().await.unwrap();
    let acquired = Instant::now();
    servers[0].kill();
    servers[1].kill();
    let reason = timeout(Duration::from_secs(3), g.lost())
        .await
        .expect("lost fired");
    assert_eq!(reason, LostReason::DeadlineMissed);
    assert!(acquired.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_restart_of_one_server_lets_no_second_owner_in() {
    let mut servers = RedisServer::start_many(3).await;
    let a = redlock(&servers, Duration::from_secs(1)).await;
    let b = redlock(&servers, Duration::from_secs(1)).await;
    let g = a.lock("k").acquire().await.unwrap();
    servers[0].restart().await;
    let deadline = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < deadline {
        match b.lock("k").try_acquire().await {
            Ok(None) | Err(_) => {}
            Ok(Some(_)) => panic!("a second owner after an empty restart"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The holder still has its majority (the two untouched servers).
    assert!(!g.is_lost(), "{:?}", g.lost_reason());
    g.release().await.unwrap();
    assert!(b
        .lock("k")
        .acquire_timeout(Duration::from_secs(3))
        .await
        .is_ok());
}

#[tokio::test]
async fn two_urls_for_one_server_are_a_configuration_error() {
    let servers = RedisServer::start_many(2).await;
    let same = format!("redis://localhost:{}", servers[0].port());
    let err = Locker::redlock([servers[0].url(), servers[1].url(), same])
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Config(ref m) if m.contains("same Redis server")),
        "{err}"
    );
}

#[tokio::test]
async fn semaphores_over_redlock_are_allowed_only_where_the_bound_holds() {
    let servers = RedisServer::start_many(3).await;
    let a = redlock(&servers, Duration::from_secs(5)).await;
    let err = a.semaphore("s", 2).try_acquire().await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    let one = a.semaphore("s1", 1);
    let p = one.acquire().await.unwrap();
    assert!(one.try_acquire().await.unwrap().is_none());
    p.release().await.unwrap();
    // Reader-writer locks are safe over a majority: every two majorities meet.
    let rw = a.rw_lock("rw");
    let r = rw.read().await.unwrap();
    assert!(rw.try_write().await.unwrap().is_none());
    drop(r);
    let out = rw
        .writer()
        .run(&Policy::new().timeout(Duration::from_secs(2)), async { 1 })
        .await
        .unwrap();
    assert_eq!(out, Some(1));
}

#[tokio::test]
async fn fencing_tokens_increase_across_majorities() {
    let mut servers = RedisServer::start_many(3).await;
    let a = redlock(&servers, Duration::from_secs(5)).await;
    let mut last = 0;
    for round in 0..6 {
        // Change which majority answers: take one server down in turn.
        if round == 2 {
            servers[0].kill();
        }
        if round == 4 {
            servers[0].restart().await;
            servers[2].kill();
        }
        let g = a
            .lock("fence")
            .acquire_timeout(Duration::from_secs(10))
            .await
            .unwrap();
        assert!(
            g.fencing_token() > last,
            "{} after {last}",
            g.fencing_token()
        );
        last = g.fencing_token();
        g.release().await.unwrap();
    }
}
