//! Sentinel: locks follow the master through a failover; `wait_replicas` makes
//! acquisitions wait for replicas to acknowledge them; a `build()` dropped
//! halfway leaves no watcher behind. On a master, one replica and one
//! Sentinel, private processes the harness starts.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::time::Duration;

use distlock::{Error, Locker};
use distlock_tests::{RedisSentinel, MASTER_NAME};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_acquisitions_work_after_a_forced_failover() {
    let topology = RedisSentinel::start().await;
    let locker = Locker::builder()
        .sentinel([topology.url()], MASTER_NAME)
        .expiry(Duration::from_secs(1))
        .op_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let before = locker.lock("k").acquire().await.unwrap();
    let token = before.fencing_token();
    before.release().await.unwrap();
    assert!(topology.master().exists("distlock:{k}:fence").await);

    topology.failover().await;

    // The locker hears `+switch-master` from the Sentinel and moves to the new
    // master; until it has, writes may still reach the old one (which accepts
    // them until the Sentinel demotes it). Bounded: within a few seconds every
    // acquisition lands on the new master.
    let started = tokio::time::Instant::now();
    let after = loop {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never reached the new master"
        );
        match locker
            .lock("k")
            .acquire_timeout(Duration::from_secs(5))
            .await
        {
            Ok(g) if topology.replica().exists("distlock:{k}").await => break g,
            Ok(g) => drop(g),
            Err(e) if e.is_unavailable() => {}
            Err(e) => panic!("{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(after.fencing_token() > token);
    // It renews there: held across three expiries.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert!(!after.is_lost(), "{:?}", after.lost_reason());
    assert!(topology.replica().exists("distlock:{k}").await);
    after.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_replicas_gives_back_an_acquisition_too_few_replicas_acknowledged() {
    let topology = RedisSentinel::start().await;
    let enough = Locker::builder()
        .url(topology.master().url())
        .wait_replicas(1, Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let g = enough.lock("k").acquire().await.unwrap();
    assert!(
        topology.replica().exists("distlock:{k}").await,
        "not replicated before returning"
    );
    g.release().await.unwrap();

    let too_many = Locker::builder()
        .url(topology.master().url())
        .wait_replicas(2, Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let err = too_many.lock("k2").try_acquire().await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("only 1 of 2 replicas"), "{err}");
    let start = tokio::time::Instant::now();
    while topology.master().exists("distlock:{k2}").await {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the failed acquisition was left behind"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Clients subscribed to something on the Sentinel (a locker's watcher is one).
async fn sentinel_subscribers(url: &str) -> usize {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut con)
        .await
        .unwrap();
    list.lines()
        .filter(|l| {
            l.split_whitespace()
                .any(|f| f.starts_with("sub=") && f != "sub=0")
        })
        .count()
}

/// Waits (bounded) until `cond` holds for the Sentinel's subscriber count.
async fn until_subscribers(url: &str, what: &str, cond: impl Fn(usize) -> bool) {
    let start = Instant::now();
    loop {
        let n = sentinel_subscribers(url).await;
        if cond(n) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{what} ({n} subscribed)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `build()` dropped while it checks the master (here the master is paused,
/// so the check hangs; the Sentinel watcher has already subscribed) shuts down
/// what it started: no watcher stays subscribed for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_dropped_halfway_leaves_no_watcher_behind() {
    let topology = RedisSentinel::start().await;
    let url = topology.url();
    until_subscribers(&url, "nobody subscribed at first", |n| n == 0).await;
    topology.master().pause();
    let build = tokio::spawn(
        Locker::builder()
            .sentinel([url.clone()], MASTER_NAME)
            .connect_timeout(Duration::from_secs(30))
            .op_timeout(Duration::from_secs(30))
            .build(),
    );
    until_subscribers(&url, "the watcher subscribes while build() waits", |n| {
        n > 0
    })
    .await;
    build.abort();
    let _ = build.await;
    topology.master().resume();
    until_subscribers(&url, "the watcher is gone after build() was dropped", |n| {
        n == 0
    })
    .await;
}
