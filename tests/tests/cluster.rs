//! Redis Cluster specifics: many lock names spread over many slots and every
//! node, with each primitive; and wake-ups through plain PUBLISH, which the
//! cluster broadcasts to subscribers on every node. On a private three-node
//! Redis Cluster the harness starts.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::collections::HashSet;
use std::time::Duration;

use distlock::Locker;
use distlock_tests::RedisCluster;
use tokio::time::{timeout, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_primitive_works_on_names_spread_over_many_slots_and_nodes() {
    let cluster = RedisCluster::start().await;
    let a = Locker::builder()
        .cluster(cluster.urls())
        .build()
        .await
        .unwrap();
    let b = Locker::builder()
        .cluster(cluster.urls())
        .build()
        .await
        .unwrap();
    let mut conn = cluster.conn().await;
    let mut slots = HashSet::new();
    for i in 0..150 {
        let name = format!("order:{i}");
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(format!("distlock:{{{name}}}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        slots.insert(slot);

        let g = a.lock(name.clone()).acquire().await.unwrap();
        assert!(b.lock(name.clone()).try_acquire().await.unwrap().is_none());
        g.release().await.unwrap();

        let sem = a.semaphore(name.clone(), 2);
        let (p1, p2) = (sem.acquire().await.unwrap(), sem.acquire().await.unwrap());
        assert!(b
            .semaphore(name.clone(), 2)
            .try_acquire()
            .await
            .unwrap()
            .is_none());
        assert_eq!(sem.current_count().await.unwrap(), 2);
        drop((p1, p2));

        let w = a.rw_lock(name.clone()).write().await.unwrap();
        assert!(b.rw_lock(name.clone()).try_read().await.unwrap().is_none());
        w.release().await.unwrap();
        let r = b.rw_lock(name.clone()).read().await.unwrap();
        r.release().await.unwrap();
    }
    assert!(slots.len() >= 140, "only {} slots", slots.len());
    // The fencing counters stay behind: every node holds some.
    for node in cluster.nodes() {
        assert!(node.dbsize().await > 0, "node {} got no lock", node.port());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_on_one_node_wakes_a_waiter_subscribed_through_another() {
    let cluster = RedisCluster::start().await;
    let urls = cluster.urls();
    // Each locker's pub/sub connection goes to a different first seed.
    let a = Locker::builder()
        .cluster([urls[0].clone()])
        .build()
        .await
        .unwrap();
    let b = Locker::builder()
        .cluster([urls[2].clone()])
        .retry_backoff(Duration::from_secs(5), Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    let mut latencies = Vec::new();
    for i in 0..10 {
        let name = format!("wake:{i}");
        let held = a.lock(name.clone()).acquire().await.unwrap();
        let waiter = tokio::spawn({
            let lock = b.lock(name);
            async move {
                let g = lock.acquire().await.unwrap();
                (g, Instant::now())
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let released = Instant::now();
        held.release().await.unwrap();
        let (_g, at) = timeout(Duration::from_secs(3), waiter)
            .await
            .unwrap()
            .unwrap();
        latencies.push(at - released);
    }
    latencies.sort();
    println!("cluster wake-up latencies: {latencies:?}");
    assert!(
        latencies[5] < Duration::from_millis(50),
        "median {:?}",
        latencies[5]
    );
}
