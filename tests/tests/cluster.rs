//! Redis Cluster specifics: many lock names spread over many slots and every
//! node, with each primitive; and wake-ups through sharded pub/sub (SPUBLISH),
//! which stays on the node that owns the lock's slot instead of being broadcast
//! to every node. On a private three-node Redis Cluster the harness starts.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::collections::HashSet;
use std::time::Duration;

use distlock::Locker;
use distlock_tests::RedisCluster;
use futures_util::StreamExt;
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

/// A release wakes waiters through the shard that owns the lock's slot
/// (SPUBLISH). Plain PUBLISH, which a cluster forwards over its bus to every
/// node, reaches a classic subscriber on each node: none of them may hear a
/// release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_is_published_on_its_shard_not_broadcast_to_every_node() {
    let cluster = RedisCluster::start().await;
    let locker = Locker::builder()
        .cluster(cluster.urls())
        .build()
        .await
        .unwrap();
    let name = "shard:1";
    let channel = format!("distlock:{{{name}}}:released");
    let mut classic = Vec::new();
    for node in cluster.nodes() {
        let client = redis::Client::open(node.url()).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub.subscribe(&channel).await.unwrap();
        classic.push(pubsub);
    }
    for _ in 0..5 {
        let guard = locker.lock(name).acquire().await.unwrap();
        guard.release().await.unwrap();
    }
    // A marker published with PUBLISH from the node that owns the slot (a
    // script with the channel as its key runs there): each node hears it
    // after whatever that node's releases were forwarded before it.
    let mut conn = cluster.conn().await;
    let _: () = redis::Script::new("redis.call('publish', KEYS[1], 'marker')")
        .key(&channel)
        .invoke_async(&mut conn)
        .await
        .unwrap();
    for (i, pubsub) in classic.iter_mut().enumerate() {
        let mut stream = pubsub.on_message();
        let mut heard = Vec::new();
        loop {
            let msg = timeout(Duration::from_secs(5), stream.next())
                .await
                .expect("the marker within 5 s")
                .expect("the subscription stays open");
            let payload: String = msg.get_payload().unwrap();
            if payload == "marker" {
                break;
            }
            heard.push(payload);
        }
        assert!(
            heard.is_empty(),
            "node {i} heard {} of 5 releases through classic pub/sub",
            heard.len()
        );
    }
    locker.close().await.unwrap();
}

/// Where the cluster will not run SPUBLISH for the user (Redis before 7, or,
/// as here, an ACL without it), releases fall back to PUBLISH: every node's
/// classic subscribers hear them, and a waiter in another locker still wakes
/// at once instead of on its 5 s timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_spublish_a_cluster_falls_back_to_publish_and_still_wakes_waiters() {
    let cluster = RedisCluster::start().await;
    for node in cluster.nodes() {
        let mut conn = node.conn().await;
        let _: () = redis::cmd("ACL")
            .arg(
                &[
                    "SETUSER",
                    "app",
                    "on",
                    ">s3cret",
                    "~*",
                    "&*",
                    "+@all",
                    "-spublish",
                ][..],
            )
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let urls: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| format!("redis://app:s3cret@127.0.0.1:{}", n.port()))
        .collect();
    let a = Locker::builder()
        .cluster(urls.clone())
        .build()
        .await
        .unwrap();
    let b = Locker::builder()
        .cluster(urls)
        .retry_backoff(Duration::from_secs(5), Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    let name = "fallback:1";
    let channel = format!("distlock:{{{name}}}:released");
    let client = redis::Client::open(cluster.nodes()[0].url()).unwrap();
    let mut classic = client.get_async_pubsub().await.unwrap();
    classic.subscribe(&channel).await.unwrap();

    let held = a.lock(name).acquire().await.unwrap();
    let before = script_calls(&cluster).await;
    let waiter = tokio::spawn({
        let lock = b.lock(name);
        async move { lock.acquire().await.map(|g| (g, Instant::now())) }
    });
    // The waiter has tried once and waits (its next timed attempt is 5 s away).
    let deadline = Instant::now() + Duration::from_secs(5);
    while script_calls(&cluster).await == before {
        assert!(Instant::now() < deadline, "the waiter never tried");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let released = Instant::now();
    held.release().await.unwrap();
    let (guard, at) = timeout(Duration::from_secs(3), waiter)
        .await
        .expect("woken by the release, not by its 5 s timer")
        .unwrap()
        .unwrap();
    assert!(
        at - released < Duration::from_secs(1),
        "{:?}",
        at - released
    );
    let msg = timeout(Duration::from_secs(5), classic.on_message().next())
        .await
        .expect("the release, through PUBLISH")
        .unwrap();
    assert_eq!(msg.get_channel_name(), channel);
    guard.release().await.unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Scripts the cluster's nodes have run so far (`INFO commandstats`).
async fn script_calls(cluster: &RedisCluster) -> u64 {
    let mut total = 0;
    for node in cluster.nodes() {
        let mut conn = node.conn().await;
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap();
        total += stats
            .lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .filter_map(|l| l.split(['=', ',']).nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    total
}
