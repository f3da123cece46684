//! The mutex's behavioural suite, on three backends: a private
//! `redis-server` started by the harness, a three-node Redis Cluster, and the
//! in-memory store.
//!
//! Each behaviour is written once as a `check_*` function over a [`Fixture`];
//! the `suite!` macro makes one test per backend (`on_redis::…`,
//! `on_cluster::…`, `on_memory::…`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use distlock::{Error, Locker, LostReason, MemoryStore, OnBusy, Policy};
use distlock_tests::{report, RedisServer};
use tokio::time::{timeout, Instant};

mod common;
use common::{eventually, Fixture};

suite! {
    fifty_tasks_on_two_lockers_never_overlap => check_mutual_exclusion;
    renewal_keeps_a_one_second_lock_for_three_seconds => check_renewal;
    lost_fires_when_an_operator_deletes_the_key => check_lost_on_delete;
    fencing_tokens_strictly_increase => check_fencing;
    a_dropped_guard_releases_within_100ms => check_drop_releases;
    a_thousand_dropped_acquire_futures_leave_no_key => check_cancel_safety;
    a_waiter_wakes_within_milliseconds_of_a_release => check_wake_latency;
    a_waiter_wakes_when_the_key_merely_expires => check_wake_on_expiry;
    run_cancels_the_body_on_loss_and_returns_lost => check_run_cancels;
    at_least_keeps_the_key_after_the_work => check_at_least;
    skip_and_reject_do_not_wait => check_skip_reject;
    a_nested_run_on_the_same_key_is_reentrant => check_reentrancy;
    release_after_loss_reports_lost => check_release_after_loss;
    close_fails_waiters_and_releases_leases => check_close;
    detached_leases_can_be_extended_released_and_adopted => check_detach;
    bad_keys_and_options_give_their_own_errors => check_bad_input;
    max_hold_ends_the_lease => check_max_hold;
    a_dropped_release_future_still_releases => check_release_cancel_safety;
    a_short_lease_taken_beside_a_long_one_is_renewed => check_short_beside_long;
}

async fn check_mutual_exclusion(fx: Fixture) {
    let lockers = [fx.locker().await, fx.locker().await];
    let inside = Arc::new(AtomicUsize::new(0));
    let max_inside = Arc::new(AtomicUsize::new(0));
    let entries = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..50 {
        let locker = lockers[i % 2].clone();
        let (inside, max_inside, entries) = (inside.clone(), max_inside.clone(), entries.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..3 {
                let guard = locker.lock("counter").acquire().await.expect("acquire");
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max_inside.fetch_max(now, Ordering::SeqCst);
                entries.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_micros(200)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                guard.release().await.expect("release");
            }
        }));
    }
    for t in tasks {
        timeout(Duration::from_secs(60), t)
            .await
            .expect("tasks finish")
            .expect("task");
    }
    assert_eq!(entries.load(Ordering::SeqCst), 150);
    assert_eq!(max_inside.load(Ordering::SeqCst), 1, "two holders at once");
}

async fn check_renewal(fx: Fixture) {
    let a = fx
        .builder()
        .expiry(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let b = fx.locker().await;
    let guard = a.lock("renewed").acquire().await.unwrap();
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert!(!guard.is_lost(), "lost: {:?}", guard.lost_reason());
    assert!(
        b.lock("renewed").try_acquire().await.unwrap().is_none(),
        "expired despite renewal"
    );
    guard.release().await.unwrap();
}

async fn check_lost_on_delete(fx: Fixture) {
    let a = fx
        .builder()
        .expiry(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let guard = a.lock("deleted").acquire().await.unwrap();
    fx.delete("deleted").await;
    let reason = timeout(Duration::from_secs(2), guard.lost())
        .await
        .expect("lost fired");
    assert_eq!(reason, LostReason::Stolen);
    assert!(guard.is_lost());
    assert!(guard.cancellation_token().is_cancelled());
}

async fn check_fencing(fx: Fixture) {
    let lockers = [fx.locker().await, fx.locker().await];
    let mut last = 0;
    for i in 0..20 {
        let g = lockers[i % 2].lock("fenced").acquire().await.unwrap();
        assert!(
            g.fencing_token() > last,
            "{} after {last}",
            g.fencing_token()
        );
        last = g.fencing_token();
        g.release().await.unwrap();
    }
}

async fn check_drop_releases(fx: Fixture) {
    let a = fx.locker().await;
    let b = fx.locker().await;
    let guard = a.lock("dropped").acquire().await.unwrap();
    assert!(fx.is_held("dropped").await);
    drop(guard);
    let took = eventually(Duration::from_secs(5), || async {
        !fx.is_held("dropped").await
    })
    .await;
    assert!(took < Duration::from_millis(100), "released after {took:?}");
    assert!(b.lock("dropped").try_acquire().await.unwrap().is_some());
}

async fn check_cancel_safety(fx: Fixture) {
    let a = fx.locker().await;
    let b = fx.locker().await;
    let lock = a.lock("cancelled");
    for i in 0..1000u32 {
        // Every fourth round another replica holds the key, so futures are also
        // dropped while queued, subscribed or sleeping.
        let holder = if i % 4 == 0 {
            b.lock("cancelled").try_acquire().await.unwrap()
        } else {
            None
        };
        let cut = Duration::from_micros(u64::from(fastrand_u32(i) % 1500));
        if let Ok(result) = timeout(cut, lock.acquire()).await {
            drop(result.unwrap());
        }
        drop(holder);
    }
    eventually(Duration::from_secs(5), || async {
        !fx.is_held("cancelled").await
    })
    .await;
    eventually(Duration::from_secs(5), || async {
        a.__waiting_lines() == 0
    })
    .await;
    assert!(b.lock("cancelled").try_acquire().await.unwrap().is_some());
}

/// A cheap deterministic spread of cut points.
fn fastrand_u32(i: u32) -> u32 {
    i.wrapping_mul(2_654_435_761).rotate_left(13)
}

async fn check_wake_latency(fx: Fixture) {
    let a = fx.locker().await;
    // Timers alone would take at least 3.75 s: a quick wake proves the release
    // message woke the waiter.
    let b = fx
        .builder()
        .retry_backoff(Duration::from_secs(5), Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    let mut latencies = Vec::new();
    for _ in 0..5 {
        let held = a.lock("wake").acquire().await.unwrap();
        let waiter = tokio::spawn({
            let b = b.clone();
            async move {
                let g = b.lock("wake").acquire().await.unwrap();
                (g, Instant::now())
            }
        });
        // Let the waiter subscribe and park.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let released = Instant::now();
        held.release().await.unwrap();
        let (g, acquired) = timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap();
        latencies.push(acquired - released);
        g.release().await.unwrap();
    }
    latencies.sort();
    println!("wake-up latencies: {latencies:?}");
    assert!(
        latencies[2] < Duration::from_millis(50),
        "median wake {:?}",
        latencies[2]
    );
}

async fn check_wake_on_expiry(fx: Fixture) {
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
    // A detached lease is neither renewed nor released: no message will come.
    let lease = a.lock("expiring").acquire().await.unwrap().detach();
    let start = Instant::now();
    let g = timeout(Duration::from_secs(3), b.lock("expiring").acquire())
        .await
        .expect("woken by the TTL timer")
        .unwrap();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(800),
        "acquired early: {waited:?}"
    );
    assert!(g.fencing_token() > lease.fencing_token());
}

async fn check_run_cancels(fx: Fixture) {
    let a = fx
        .builder()
        .expiry(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let dropped = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    struct OnDrop(Arc<AtomicBool>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let run = a.lock("cancel-me").run(&Policy::new(), {
        let (dropped, finished) = (dropped.clone(), finished.clone());
        async move {
            let _guard = OnDrop(dropped);
            assert!(distlock::current().is_some());
            tokio::time::sleep(Duration::from_secs(30)).await;
            finished.store(true, Ordering::SeqCst);
        }
    });
    let operator = async {
        eventually(Duration::from_secs(2), || fx.is_held("cancel-me")).await;
        fx.delete("cancel-me").await;
    };
    let (result, ()) = timeout(Duration::from_secs(5), async {
        tokio::join!(run, operator)
    })
    .await
    .expect("run ended");
    let err = result.unwrap_err();
    assert_eq!(err.lost_reason(), Some(LostReason::Stolen), "{err}");
    assert!(dropped.load(Ordering::SeqCst), "body not dropped");
    assert!(!finished.load(Ordering::SeqCst));
}

async fn check_at_least(fx: Fixture) {
    let a = fx.locker().await;
    let b = fx.locker().await;
    let policy = Policy::new().at_least(Duration::from_millis(1500));
    let started = Instant::now();
    let out = a.lock("job").run(&policy, async { 7 }).await.unwrap();
    assert_eq!(out, Some(7));
    assert!(
        b.lock("job").try_acquire().await.unwrap().is_none(),
        "released too early"
    );
    let skipped = b
        .lock("job")
        .run(&Policy::new().on_busy(OnBusy::Skip), async {
            unreachable!()
        })
        .await
        .unwrap();
    assert!(skipped.is_none());
    eventually(Duration::from_secs(5), || async {
        b.lock("job").try_acquire().await.unwrap().is_some()
    })
    .await;
    assert!(started.elapsed() >= Duration::from_millis(1400));
}

async fn check_skip_reject(fx: Fixture) {
    let a = fx.locker().await;
    let b = fx.locker().await;
    let _held = a.lock("busy").acquire().await.unwrap();
    let ran = AtomicBool::new(false);
    let skip = b
        .lock("busy")
        .run(&Policy::new().on_busy(OnBusy::Skip), async {
            ran.store(true, Ordering::SeqCst)
        });
    assert!(timeout(Duration::from_secs(1), skip)
        .await
        .unwrap()
        .unwrap()
        .is_none());
    let reject = b
        .lock("busy")
        .run(&Policy::new().on_busy(OnBusy::Reject), async {
            ran.store(true, Ordering::SeqCst)
        });
    let err = timeout(Duration::from_secs(1), reject)
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.is_busy(), "{err}");
    let waited = b
        .lock("busy")
        .run(&Policy::new().timeout(Duration::from_millis(200)), async {
            ran.store(true, Ordering::SeqCst)
        })
        .await
        .unwrap_err();
    assert!(waited.is_timeout(), "{waited}");
    assert!(!ran.load(Ordering::SeqCst));
}

async fn check_reentrancy(fx: Fixture) {
    let a = fx.locker().await;
    let policy = Policy::new().timeout(Duration::from_secs(1));
    let lock = a.lock("reentrant");
    let out = timeout(
        Duration::from_secs(5),
        lock.run(&policy, async {
            let outer = distlock::current().unwrap().fencing_token();
            let inner = lock
                .run(&policy, async {
                    distlock::current().unwrap().fencing_token()
                })
                .await
                .unwrap()
                .unwrap();
            (outer, inner)
        }),
    )
    .await
    .expect("no deadlock")
    .unwrap()
    .unwrap();
    assert_eq!(out.0, out.1);
    // A spawned task is another task: it must wait, not re-enter.
    let nested_spawn = lock
        .run(&policy, async {
            let other = a.lock("reentrant");
            tokio::spawn(async move { other.try_acquire().await.unwrap().is_some() })
                .await
                .unwrap()
        })
        .await
        .unwrap();
    assert_eq!(nested_spawn, Some(false));
}

async fn check_release_after_loss(fx: Fixture) {
    let a = fx
        .builder()
        .expiry(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let guard = a.lock("gone").acquire().await.unwrap();
    fx.delete("gone").await;
    let _ = timeout(Duration::from_secs(2), guard.lost())
        .await
        .expect("lost");
    let err = guard.release().await.unwrap_err();
    assert!(err.is_lost(), "{err}");
}

async fn check_close(fx: Fixture) {
    let a = fx.locker().await;
    let b = fx.locker().await;
    let held = b.lock("closing").acquire().await.unwrap();
    let mine = a.lock("mine").acquire().await.unwrap();
    let waiter = tokio::spawn({
        let a = a.clone();
        async move { a.lock("closing").acquire().await }
    });
    eventually(Duration::from_secs(2), || async {
        a.__waiting_lines() == 1
    })
    .await;
    a.close().await.unwrap();
    let err = timeout(Duration::from_secs(2), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(err.is_closed(), "{err}");
    assert_eq!(mine.lost_reason(), Some(LostReason::Closed));
    assert!(!fx.is_held("mine").await, "close left a lease behind");
    assert!(a.lock("x").try_acquire().await.unwrap_err().is_closed());
    drop(held);
}

async fn check_detach(fx: Fixture) {
    let a = fx
        .builder()
        .expiry(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let b = fx.locker().await;
    let lease = a.lock("detached").acquire().await.unwrap().detach();
    tokio::time::sleep(Duration::from_millis(600)).await;
    b.extend_lease(&lease).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        fx.is_held("detached").await,
        "extension did not keep the key"
    );
    let adopted = b.adopt(lease.clone()).await.unwrap();
    assert_eq!(adopted.fencing_token(), lease.fencing_token());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!adopted.is_lost(), "adopted lease not renewed");
    let again = adopted.detach();
    a.release_lease(&again).await.unwrap();
    assert!(!fx.is_held("detached").await);
    assert!(a.release_lease(&again).await.unwrap_err().is_lost());
}

async fn check_bad_input(fx: Fixture) {
    let a = fx.locker().await;
    for key in [
        String::new(),
        "x".repeat(distlock::MAX_KEY_LEN + 1),
        "a{b}".into(),
        "a\nb".into(),
    ] {
        let err = a.lock(key.clone()).try_acquire().await.unwrap_err();
        assert!(matches!(err, Error::InvalidKey { .. }), "{key:?}: {err}");
    }
    let err = a
        .lock("k")
        .expiry(Duration::from_millis(50))
        .acquire()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    let err = fx
        .builder()
        .expiry(Duration::from_secs(1))
        .renew_every(Duration::from_secs(1))
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("renew_every"), "{err}");
}

async fn check_max_hold(fx: Fixture) {
    let a = fx.locker().await;
    let guard = a
        .lock("bounded")
        .max_hold(Duration::from_millis(300))
        .acquire()
        .await
        .unwrap();
    let reason = timeout(Duration::from_secs(2), guard.lost())
        .await
        .expect("max hold");
    assert_eq!(reason, LostReason::MaxHold);
    eventually(Duration::from_secs(2), || async {
        !fx.is_held("bounded").await
    })
    .await;
}

// ----- Redis only: faults that have no in-memory counterpart -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_fires_when_redis_is_killed() {
    let mut server = RedisServer::start().await;
    let a = Locker::builder()
        .url(server.url())
        .expiry(Duration::from_secs(1))
        .op_timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let guard = a.lock("killed").acquire().await.unwrap();
    let acquired = Instant::now();
    server.kill();
    let reason = timeout(Duration::from_secs(3), guard.lost())
        .await
        .expect("lost fired");
    assert_eq!(reason, LostReason::DeadlineMissed);
    assert!(
        acquired.elapsed() < Duration::from_secs(1),
        "fired after the server-side expiry"
    );
    assert!(guard.release().await.unwrap_err().is_lost());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_fires_before_another_replica_acquires_a_paused_server() {
    let server = RedisServer::start().await;
    let builder = || {
        Locker::builder()
            .url(server.url())
            .expiry(Duration::from_secs(1))
            .op_timeout(Duration::from_millis(300))
    };
    let a = builder().build().await.unwrap();
    let b = builder().build().await.unwrap();
    let guard = a.lock("paused").acquire().await.unwrap();
    let lost = tokio::spawn({
        let lost = guard.lost();
        async move {
            let reason = lost.await;
            (reason, Instant::now())
        }
    });
    server.pause();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.resume();
    let acquired_by_b = loop {
        match b
            .lock("paused")
            .acquire_timeout(Duration::from_secs(3))
            .await
        {
            Ok(g) => break (g, Instant::now()),
            Err(e) if e.is_unavailable() => continue,
            Err(e) => panic!("{e}"),
        }
    };
    let (reason, lost_at) = timeout(Duration::from_secs(1), lost)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reason, LostReason::DeadlineMissed);
    assert!(
        lost_at <= acquired_by_b.1,
        "A learned of the loss after B acquired"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_increase_across_a_restart_without_persistence() {
    let mut server = RedisServer::start().await;
    let a = Locker::builder()
        .url(server.url())
        .expiry(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let first = a.lock("fence").acquire().await.unwrap();
    let before = first.fencing_token();
    first.release().await.unwrap();
    server.restart().await;
    assert!(
        !server.exists("distlock:{fence}:fence").await,
        "restart kept data"
    );
    let after = loop {
        match a
            .lock("fence")
            .acquire_timeout(Duration::from_secs(5))
            .await
        {
            Ok(g) => break g.fencing_token(),
            Err(e) if e.is_unavailable() => continue,
            Err(e) => panic!("{e}"),
        }
    };
    assert!(after > before, "{after} after {before}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_empty_restart_nobody_acquires_before_the_old_holder_learns() {
    let mut server = RedisServer::start().await;
    let builder = || {
        Locker::builder()
            .url(server.url())
            .expiry(Duration::from_secs(2))
            .op_timeout(Duration::from_millis(300))
    };
    let a = builder().build().await.unwrap();
    let b = builder().build().await.unwrap();
    // B has talked to this server before: it knows its run_id.
    drop(b.lock("warm-up").acquire().await.unwrap());
    let held = a.lock("restarted").acquire().await.unwrap();
    let lost = tokio::spawn({
        let lost = held.lost();
        async move {
            lost.await;
            Instant::now()
        }
    });
    server.kill();
    server.restart().await;
    let started = Instant::now();
    let acquired_at = loop {
        match b
            .lock("restarted")
            .acquire_timeout(Duration::from_secs(6))
            .await
        {
            Ok(_g) => break Instant::now(),
            Err(e) if e.is_unavailable() => continue,
            Err(e) => panic!("{e}"),
        }
    };
    let lost_at = timeout(Duration::from_secs(1), lost)
        .await
        .unwrap()
        .unwrap();
    assert!(
        lost_at <= acquired_at,
        "the old holder learned after the new one acquired"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "quarantine too long: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn each_bad_connection_setting_has_its_own_error() {
    let err = Locker::connect("not a url").await.unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    let err = Locker::connect("http://127.0.0.1:6379").await.unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");

    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let started = Instant::now();
    let err = Locker::connect(&format!("redis://127.0.0.1:{closed_port}"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));

    let secured = RedisServer::builder()
        .password("right-password")
        .start()
        .await;
    let url = format!("redis://:wrong-password@127.0.0.1:{}", secured.port());
    let err = Locker::connect(&url).await.unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err}");
    assert!(!report(&err).contains("wrong-password"), "{err}");
    let ok = Locker::builder()
        .url(format!("redis://127.0.0.1:{}", secured.port()))
        .password("right-password")
        .build()
        .await;
    assert!(ok.is_ok(), "{ok:?}");
}

#[tokio::test]
async fn a_key_holding_a_list_is_a_wrong_type_error() {
    let server = RedisServer::start().await;
    let mut conn = server.conn().await;
    let _: i64 = redis::cmd("RPUSH")
        .arg("distlock:{queue}")
        .arg("item")
        .query_async(&mut conn)
        .await
        .unwrap();
    let a = Locker::connect(&server.url()).await.unwrap();
    let err = a.lock("queue").try_acquire().await.unwrap_err();
    assert!(
        matches!(err, Error::WrongType { ref found, .. } if found == "list"),
        "{err}"
    );
    let err = a
        .lock("queue")
        .acquire_timeout(Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::WrongType { .. }), "{err}");
    // Nothing was lost: the list is intact.
    let len: i64 = redis::cmd("LLEN")
        .arg("distlock:{queue}")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 1);
}

#[tokio::test(start_paused = true)]
async fn memory_backend_follows_a_paused_tokio_clock() {
    let store = MemoryStore::new();
    let a = Locker::builder()
        .memory_store(store.clone())
        .build()
        .await
        .unwrap();
    let b = Locker::builder()
        .memory_store(store.clone())
        .build()
        .await
        .unwrap();
    let lease = a.lock("paused-clock").acquire().await.unwrap().detach();
    assert!(b
        .lock("paused-clock")
        .try_acquire()
        .await
        .unwrap()
        .is_none());
    tokio::time::advance(lease.expiry() + Duration::from_millis(1)).await;
    assert!(b
        .lock("paused-clock")
        .try_acquire()
        .await
        .unwrap()
        .is_some());
}

async fn check_release_cancel_safety(fx: Fixture) {
    let a = fx.locker().await;
    let b = fx.locker().await;
    let lock = a.lock("release-cut");
    let mut signals = Vec::new();
    for i in 0..300u32 {
        let guard = lock.acquire().await.unwrap();
        signals.push(guard.cancellation_token());
        // Cut the release before, during or after its round trip.
        let cut = Duration::from_micros(u64::from(fastrand_u32(i) % 400));
        if let Ok(result) = timeout(cut, guard.release()).await {
            result.unwrap();
        }
    }
    eventually(Duration::from_secs(2), || async {
        !fx.is_held("release-cut").await
    })
    .await;
    assert!(b.lock("release-cut").try_acquire().await.unwrap().is_some());
    // Regression: the handed-over release found the key already released by
    // the cut one, and fired a false lost signal. `close()` waits for every
    // release in flight.
    a.close().await.unwrap();
    let false_alarms = signals.iter().filter(|s| s.is_cancelled()).count();
    assert_eq!(
        false_alarms, 0,
        "lost signals fired after successful releases"
    );
}

async fn check_short_beside_long(fx: Fixture) {
    let a = fx.locker().await;
    let b = fx.locker().await;
    // Many short-lived leases, then one long lease: the keeper sleeps until
    // the long one's renewal, ten seconds away.
    for _ in 0..3000 {
        a.lock("churn")
            .acquire()
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }
    let long = a.lock("long").acquire().await.unwrap();
    // A one-second lease is due for renewal long before that.
    let short = a
        .lock("short")
        .expiry(Duration::from_secs(1))
        .acquire()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert!(!short.is_lost(), "lost: {:?}", short.lost_reason());
    assert!(
        b.lock("short").try_acquire().await.unwrap().is_none(),
        "expired despite renewal"
    );
    short.release().await.unwrap();
    long.release().await.unwrap();
}

/// Calls of `cmd` on the server so far (`INFO commandstats`). Scripts count the
/// commands they run: an acquire attempt that finds the key held runs `PTTL`,
/// one that takes it runs `INCR` (the fencing counter).
async fn command_calls(server: &RedisServer, cmd: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut server.conn().await)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_waiters_make_one_attempt_per_release() {
    const WAITERS: usize = 20;
    let server = RedisServer::start().await;
    let holder = Locker::connect(&server.url()).await.unwrap();
    let waiters = Locker::connect(&server.url()).await.unwrap();
    let held = holder.lock("line").acquire().await.unwrap();
    let tasks: Vec<_> = (0..WAITERS)
        .map(|_| {
            let lock = waiters.lock("line");
            tokio::spawn(async move { lock.acquire().await.unwrap().release().await.unwrap() })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (won, held_attempts) = (
        command_calls(&server, "incr").await,
        command_calls(&server, "pttl").await,
    );
    held.release().await.unwrap();
    for t in tasks {
        timeout(Duration::from_secs(10), t).await.unwrap().unwrap();
    }
    let won = command_calls(&server, "incr").await - won;
    let failed = command_calls(&server, "pttl").await - held_attempts;
    assert_eq!(won, WAITERS as u64);
    // Each new head of the line waits for its predecessor's release message
    // instead of first finding the key held (which made WAITERS - 1 failed
    // attempts). A few may come from backoff timers on a loaded machine.
    assert!(
        failed <= 3,
        "{failed} failed attempts for {WAITERS} handoffs"
    );
}
