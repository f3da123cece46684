//! Fault tests: each injects one fault with the harness (a private
//! `redis-server` that can be killed, restarted empty and paused, and a
//! `FaultProxy` that adds latency, black-holes traffic and resets
//! connections) and proves how the lockers behave through it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::future::Future;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use distlock::{Error, Locker, LockerBuilder, LostReason};
use distlock_tests::process::alive_tasks;
use distlock_tests::{report, FaultProxy, RedisServer};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

/// Polls `cond` every 5 ms until it holds, failing after `limit`.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The Redis key of the lock on `key` under the default prefix.
fn lock_key(key: &str) -> String {
    format!("distlock:{{{key}}}")
}

/// A deadpool pool on `url` with at most `size` connections and no timeouts
/// of its own (the locker's bound every wait).
fn pool(url: &str, size: usize) -> deadpool_redis::Pool {
    deadpool_redis::Config::from_url(url)
        .builder()
        .unwrap()
        .max_size(size)
        .runtime(deadpool_redis::Runtime::Tokio1)
        .build()
        .unwrap()
}

/// A task that resolves, with the reason and the instant, when `guard` is lost.
fn watch_lost(guard: &distlock::LockGuard) -> JoinHandle<(LostReason, Instant)> {
    let lost = guard.lost();
    tokio::spawn(async move {
        let reason = lost.await;
        (reason, Instant::now())
    })
}

/// A builder for `url` with a one-second expiry and short timeouts, so that
/// faults show within a second or two.
fn quick(url: &str) -> LockerBuilder {
    Locker::builder()
        .url(url)
        .expiry(Duration::from_secs(1))
        .op_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(500))
        .retry_backoff(Duration::from_millis(20), Duration::from_millis(200))
}

/// Acquires `key`, retrying while the server is unreachable, for at most `limit`.
async fn acquire_through_outage(
    locker: &Locker,
    key: &str,
    limit: Duration,
) -> (distlock::LockGuard, Instant) {
    let start = Instant::now();
    loop {
        let left = limit.saturating_sub(start.elapsed());
        assert!(!left.is_zero(), "`{key}` not acquired within {limit:?}");
        match locker.lock(key).acquire_timeout(left).await {
            Ok(g) => return (g, Instant::now()),
            Err(e) if e.is_unavailable() => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => panic!("acquiring `{key}`: {e}"),
        }
    }
}

// ----- Redis restarted empty -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_restart_grants_no_lock_before_the_old_holder_is_told() {
    let mut server = RedisServer::start().await;
    let a = quick(&server.url()).build().await.unwrap();
    // B connected before the restart but has not acquired anything yet.
    let b = quick(&server.url()).build().await.unwrap();
    let guard = a.lock("restarted").acquire().await.unwrap();
    let lost = watch_lost(&guard);
    server.kill();
    server.restart().await;
    let restarted = Instant::now();
    assert!(
        !server.exists(&lock_key("restarted")).await,
        "the restart kept data"
    );
    let (_g, acquired) = acquire_through_outage(&b, "restarted", Duration::from_secs(5)).await;
    let (reason, lost_at) = timeout(Duration::from_secs(1), lost)
        .await
        .expect("the old holder was told")
        .unwrap();
    assert!(
        lost_at <= acquired,
        "the old holder learned of the loss ({reason:?}) {:?} after another owner acquired",
        lost_at - acquired
    );
    // The quarantine lasts one expiry; then one backoff.
    assert!(
        acquired <= restarted + Duration::from_millis(1000 + 300),
        "acquired {:?} after the restart",
        acquired - restarted
    );
}

// ----- Redis killed while a lease is held -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_fires_when_redis_is_killed_and_the_restarted_server_is_usable_at_once() {
    let mut server = RedisServer::start().await;
    let a = quick(&server.url()).build().await.unwrap();
    let guard = a.lock("killed").acquire().await.unwrap();
    let acquired = Instant::now();
    let lost = watch_lost(&guard);
    server.kill();
    let (reason, lost_at) = timeout(Duration::from_secs(3), lost)
        .await
        .expect("lost fired")
        .unwrap();
    assert_eq!(reason, LostReason::DeadlineMissed);
    assert!(
        lost_at - acquired < Duration::from_secs(1),
        "fired {:?} after the acquisition, after the key's expiry",
        lost_at - acquired
    );
    assert!(guard.release().await.unwrap_err().is_lost());
    server.restart().await;
    // The restarted server forgot every lease: the locker waits out the
    // restart quarantine (one expiry, so that holders elsewhere are told
    // first), then acquires within one backoff (200 ms).
    let restarted = Instant::now();
    let g = a
        .lock("killed")
        .acquire_timeout(Duration::from_millis(1300))
        .await
        .unwrap();
    assert!(
        restarted.elapsed() >= Duration::from_millis(950),
        "{:?}",
        restarted.elapsed()
    );
    g.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_acquire_after_a_restart_succeeds_on_stale_connections() {
    let mut server = RedisServer::start().await;
    // An idle locker: no renewal notices the restart, so both of its
    // connections are stale when it acquires again.
    let idle = quick(&server.url()).connections(2).build().await.unwrap();
    for _ in 0..4 {
        idle.lock("warm")
            .acquire()
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }
    let other = quick(&server.url()).connections(2).build().await.unwrap();
    for _ in 0..4 {
        other.force_unlock("warm").await.unwrap();
    }
    server.kill();
    server.restart().await;
    // Held back by the restart quarantine, but not failed.
    let attempt = idle.lock("after-restart").try_acquire().await;
    assert!(
        matches!(attempt, Ok(None)),
        "the first attempt after the restart failed: {attempt:?}"
    );
    let unlocked = other.force_unlock("after-restart").await;
    assert!(
        matches!(unlocked, Ok(false)),
        "the first request after the restart failed: {unlocked:?}"
    );
}

// ----- Redis paused (SIGSTOP) -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_beyond_the_expiry_fires_lost_before_the_deadline_and_nothing_is_held_twice() {
    let server = RedisServer::start().await;
    let a = quick(&server.url()).build().await.unwrap();
    let b = quick(&server.url()).build().await.unwrap();
    let c = quick(&server.url()).build().await.unwrap();
    let guard = a.lock("paused").acquire().await.unwrap();
    let fence = guard.fencing_token();
    let lost = watch_lost(&guard);
    // Let a renewal or two go through first.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let paused_at = Instant::now();
    server.pause();
    let contender = tokio::spawn({
        let b = b.clone();
        async move { acquire_through_outage(&b, "paused", Duration::from_secs(6)).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.resume();
    let (reason, lost_at) = timeout(Duration::from_secs(1), lost)
        .await
        .expect("lost fired")
        .unwrap();
    assert_eq!(reason, LostReason::DeadlineMissed);
    // The last renewal confirmed before the pause was sent before it: the
    // local deadline (validity 988 ms) came before the server's expiry.
    assert!(
        lost_at - paused_at <= Duration::from_millis(988 + 30),
        "lost fired {:?} into the pause, after the deadline",
        lost_at - paused_at
    );
    let (b_guard, b_acquired) = timeout(Duration::from_secs(7), contender)
        .await
        .unwrap()
        .unwrap();
    assert!(lost_at <= b_acquired, "B acquired before A was told");
    assert!(b_guard.fencing_token() > fence);
    assert!(c.lock("paused").try_acquire().await.unwrap().is_none());
    b_guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pauses_shorter_than_the_renewal_slack_lose_nothing() {
    let server = RedisServer::start().await;
    // Expiry 1.5 s: renewals every 500 ms, validity 1.483 s, slack 983 ms.
    let a = Locker::builder()
        .url(server.url())
        .expiry(Duration::from_millis(1500))
        .build()
        .await
        .unwrap();
    let b = Locker::connect(&server.url()).await.unwrap();
    let guard = a.lock("steady").acquire().await.unwrap();
    for _ in 0..3 {
        server.pause();
        tokio::time::sleep(Duration::from_millis(700)).await;
        server.resume();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!guard.is_lost(), "lost: {:?}", guard.lost_reason());
    }
    assert!(b.lock("steady").try_acquire().await.unwrap().is_none());
    guard.release().await.unwrap();
}

// ----- the network black-holed -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_server_fails_acquires_with_a_clear_error_and_loses_leases_at_the_deadline() {
    let server = RedisServer::start().await;
    let proxy = FaultProxy::start(server.addr()).await;
    let a = quick(&proxy.url()).build().await.unwrap();
    let b = quick(&proxy.url()).build().await.unwrap();
    let guard = a.lock("held").acquire().await.unwrap();
    let lost = watch_lost(&guard);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let cut = Instant::now();
    proxy.blackhole();

    // No hang: each kind of acquisition ends with an error naming the cause.
    for wait in [None, Some(Duration::from_secs(10))] {
        let started = Instant::now();
        let lock = b.lock("free");
        let result = match wait {
            None => timeout(Duration::from_secs(5), lock.acquire()).await,
            Some(w) => timeout(Duration::from_secs(5), lock.acquire_timeout(w)).await,
        };
        let err = result.expect("the acquisition hung").unwrap_err();
        // "acquire got no reply within 300ms" on an open connection, "no
        // connection within 500ms" or "connect: timed out" for a new one.
        assert!(matches!(err, Error::Unavailable { .. }), "{err}");
        let message = report(&err);
        assert!(
            [
                "no reply within 300ms",
                "no connection within 500ms",
                "connect: timed out"
            ]
            .iter()
            .any(|m| message.contains(m)),
            "{message}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    let err = b.lock("free").try_acquire().await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");

    let (reason, lost_at) = timeout(Duration::from_secs(2), lost)
        .await
        .expect("lost fired")
        .unwrap();
    assert_eq!(reason, LostReason::DeadlineMissed);
    // The last confirmed renewal was sent at most one cadence (333 ms) plus
    // a round trip before the cut; the deadline is 988 ms after it.
    let after = lost_at - cut;
    assert!(
        after >= Duration::from_millis(988 - 340) && after <= Duration::from_millis(988 + 30),
        "lost {after:?} after the cut"
    );
    proxy.restore();
    assert!(guard.release().await.unwrap_err().is_lost());
    // The delayed requests were delivered on restore; nothing stays held.
    eventually("no lock left", Duration::from_secs(3), || async {
        server.keys("distlock:{*}").await.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_timeout_returns_within_its_timeout_when_redis_is_blackholed() {
    let server = RedisServer::start().await;
    let proxy = FaultProxy::start(server.addr()).await;
    // A request may take 2 s (the default op_timeout); the caller allows 200 ms.
    let b = Locker::connect(&proxy.url()).await.unwrap();
    proxy.blackhole();
    let started = Instant::now();
    let result = timeout(
        Duration::from_secs(5),
        b.lock("k").acquire_timeout(Duration::from_millis(200)),
    )
    .await
    .expect("hung");
    let took = started.elapsed();
    let err = result.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(took < Duration::from_millis(400), "returned after {took:?}");
    proxy.restore();
    // A zero timeout still makes its one attempt and waits for the answer.
    let g = b.lock("z").acquire_timeout(Duration::ZERO).await.unwrap();
    let err = b
        .lock("z")
        .acquire_timeout(Duration::ZERO)
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    g.release().await.unwrap();
}

// ----- connections reset -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resets_reconnect_keep_leases_and_leak_no_waiters() {
    let server = RedisServer::start().await;
    let proxy = FaultProxy::start(server.addr()).await;
    let a = quick(&proxy.url()).build().await.unwrap();
    let b = quick(&proxy.url()).build().await.unwrap();
    let guard = a.lock("reset").acquire().await.unwrap();
    let waiters: Vec<_> = (0..5)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move {
                let g = b
                    .lock("reset")
                    .acquire_timeout(Duration::from_secs(10))
                    .await?;
                g.release().await
            })
        })
        .collect();
    eventually("the waiters queue", Duration::from_secs(2), || async {
        b.__waiting_lines() == 1
    })
    .await;
    // Let the head subscribe: every connection is then open.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let open = proxy.connections();
    for _ in 0..3 {
        proxy.reset_all();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(!guard.is_lost(), "lost: {:?}", guard.lost_reason());
    guard.release().await.unwrap();
    for w in waiters {
        timeout(Duration::from_secs(5), w)
            .await
            .expect("a waiter stalled after the resets")
            .unwrap()
            .unwrap();
    }
    assert_eq!(b.__waiting_lines(), 0, "a waiting line leaked");
    assert!(
        proxy.connections() <= open,
        "{} connections open after the resets, {open} before",
        proxy.connections()
    );
    assert!(server.keys("distlock:{*}").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_reset_as_it_is_set_up_is_tried_once_more() {
    let server = RedisServer::start().await;
    let proxy = FaultProxy::start(server.addr()).await;
    let locker = quick(&proxy.url()).connections(1).build().await.unwrap();
    for round in 0..3 {
        // The open connection breaks, and so does the first new one, during
        // its handshake: the request still goes through on a second one.
        proxy.reset_all();
        proxy.reset_next(1);
        let guard = locker
            .lock(format!("setup-reset-{round}"))
            .try_acquire()
            .await
            .unwrap_or_else(|e| panic!("round {round}: {}", distlock_tests::report(&e)))
            .unwrap_or_else(|| panic!("round {round}: the free key was busy"));
        guard.release().await.unwrap();
    }
    assert!(server.keys("distlock:{*}").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_opens_one_connection_per_slot_not_one_per_caller() {
    let server = RedisServer::start().await;
    let proxy = FaultProxy::start(server.addr()).await;
    let locker = quick(&proxy.url())
        .connections(2)
        .pool_size(16)
        .build()
        .await
        .unwrap();
    let burst = || {
        let calls: Vec<_> = (0..64)
            .map(|i| {
                let locker = locker.clone();
                tokio::spawn(async move { locker.force_unlock(&format!("k{i}")).await })
            })
            .collect();
        async move {
            for c in calls {
                let _ = c.await.unwrap();
            }
        }
    };
    burst().await;
    for _ in 0..3 {
        proxy.reset_all();
        eventually(
            "the resets close every connection",
            Duration::from_secs(2),
            || async { proxy.connections() == 0 },
        )
        .await;
        // Every caller finds its slot empty at once.
        burst().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            proxy.connections() <= 2,
            "{} connections for 2 slots after a reconnect",
            proxy.connections()
        );
    }
}

// ----- pool exhausted -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_gives_an_unavailable_error_not_a_hang() {
    let server = RedisServer::start().await;
    let shared = pool(&server.url(), 2);
    let locker = Locker::builder()
        .pool(shared.clone())
        .connections(2)
        .connect_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    // The locker keeps one connection (checked when building); the
    // application takes the other one and keeps it. The locker's requests
    // alternate between its two slots: those routed to the empty one fail.
    let hog = shared.get().await.unwrap();
    let mut failures = 0;
    let mut held = Vec::new();
    for i in 0..2 {
        let started = Instant::now();
        match timeout(
            Duration::from_secs(3),
            locker.lock(format!("k{i}")).try_acquire(),
        )
        .await
        .expect("hung on the exhausted pool")
        {
            Ok(g) => held.push(g.expect("free")),
            Err(e) => {
                failures += 1;
                assert!(matches!(e, Error::Unavailable { .. }), "{e}");
                assert!(e.to_string().contains("no connection within 300ms"), "{e}");
                assert!(started.elapsed() < Duration::from_millis(800));
            }
        }
    }
    assert_eq!(
        failures, 1,
        "the locker's second connection should be missing"
    );
    drop(hog);
    for g in held {
        g.release().await.unwrap();
    }
    for _ in 0..4 {
        let g = locker.lock("k").try_acquire().await.unwrap().unwrap();
        g.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_locker_leaves_the_applications_pool_open() {
    let server = RedisServer::start().await;
    let shared = pool(&server.url(), 4);
    let locker = Locker::from_pool(shared.clone()).await.unwrap();
    let g = locker.lock("k").acquire().await.unwrap();
    g.release().await.unwrap();
    locker.close().await.unwrap();
    let dropped = Locker::from_pool(shared.clone()).await.unwrap();
    drop(dropped);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The application's own use of its pool goes on.
    let mut conn = timeout(Duration::from_secs(2), shared.get())
        .await
        .expect("pool hung")
        .expect("the pool was closed by the locker");
    let pong: String = redis::cmd("PING").query_async(&mut *conn).await.unwrap();
    assert_eq!(pong, "PONG");
}

// ----- the pub/sub connection cut -----

/// A locker whose commands go straight to Redis while its pub/sub connection
/// crosses `proxy`, and a holder on the server directly.
async fn split_pubsub(server: &RedisServer, proxy: &FaultProxy) -> (Locker, Locker) {
    let holder = Locker::connect(&server.url()).await.unwrap();
    let waiter = Locker::builder()
        .pool(pool(&server.url(), 4))
        .url(proxy.url())
        .retry_backoff(Duration::from_millis(50), Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    (holder, waiter)
}

/// Acquires `key` in a task; resolves with the guard and the instant.
fn acquire_in_task(locker: &Locker, key: &str) -> JoinHandle<(distlock::LockGuard, Instant)> {
    let lock = locker.lock(key);
    tokio::spawn(async move {
        let g = lock.acquire().await.unwrap();
        (g, Instant::now())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribed_waiter_falls_back_to_timers_when_the_pubsub_connection_is_cut() {
    let server = RedisServer::start().await;
    let proxy = FaultProxy::start(server.addr()).await;
    let (a, b) = split_pubsub(&server, &proxy).await;
    let held = a.lock("first").acquire().await.unwrap();
    let waiting = acquire_in_task(&b, "first");
    eventually("the pub/sub connection", Duration::from_secs(2), || async {
        proxy.connections() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Cut it, and keep it from reconnecting: no release message will come.
    proxy.blackhole();
    proxy.reset_all();
    let released = Instant::now();
    held.release().await.unwrap();
    let (_g, acquired) = timeout(Duration::from_secs(3), waiting)
        .await
        .unwrap()
        .unwrap();
    // Within one backoff (at most 300 ms + 25 %) and a round trip.
    assert!(
        acquired - released < Duration::from_millis(600),
        "acquired {:?} after the release",
        acquired - released
    );
    proxy.restore();
}

/// A release by this locker wakes its own next waiter at once, without the
/// pub/sub message: here there is no pub/sub connection at all (a pool without
/// a URL) and the backoff is 5 s, so only the local wake-up can hand the lock
/// over within 2 s, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_wakes_the_same_lockers_waiter_without_pubsub() {
    let server = RedisServer::start().await;
    let locker = Locker::builder()
        .pool(pool(&server.url(), 4))
        .retry_backoff(Duration::from_secs(5), Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    let mut held = locker.lock("local").acquire().await.unwrap();
    for round in 0..8 {
        let waiting = acquire_in_task(&locker, "local");
        // The waiter made its attempt and sleeps on its 5 s timer.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished());
        held.release().await.unwrap();
        let (g, _) = timeout(Duration::from_secs(2), waiting)
            .await
            .unwrap_or_else(|_| panic!("round {round}: the local waiter was not woken"))
            .unwrap();
        held = g;
    }
    held.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_starts_while_pubsub_is_unreachable_acquires_by_timer() {
    let server = RedisServer::start().await;
    let proxy = FaultProxy::start(server.addr()).await;
    let (a, b) = split_pubsub(&server, &proxy).await;
    // Bring the pub/sub connection up, then cut it for good.
    let held = a.lock("warm").acquire().await.unwrap();
    let warm = acquire_in_task(&b, "warm");
    eventually("the pub/sub connection", Duration::from_secs(2), || async {
        proxy.connections() == 1
    })
    .await;
    held.release().await.unwrap();
    drop(
        timeout(Duration::from_secs(2), warm)
            .await
            .unwrap()
            .unwrap(),
    );
    proxy.blackhole();
    proxy.reset_all();

    let held = a.lock("second").acquire().await.unwrap();
    let late = acquire_in_task(&b, "second");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let released = Instant::now();
    held.release().await.unwrap();
    let (_g, acquired) = timeout(Duration::from_secs(5), late)
        .await
        .unwrap()
        .unwrap();
    assert!(
        acquired - released < Duration::from_millis(600),
        "acquired {:?} after the release",
        acquired - released
    );
    proxy.restore();
}

// ----- Redis out of memory -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_fails_new_acquires_clearly_and_spares_held_leases() {
    let server = RedisServer::builder()
        .config("maxmemory-policy", "noeviction")
        .start()
        .await;
    let a = quick(&server.url()).build().await.unwrap();
    let guard = a.lock("held").acquire().await.unwrap();
    let mut conn = server.conn().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = a.lock("new").try_acquire().await.unwrap_err();
    assert!(matches!(err, Error::Redis { .. }), "{err:?}");
    assert!(report(&err).contains("OOM"), "{err}");
    let err = a
        .lock("new")
        .acquire_timeout(Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Redis { .. }), "{err:?}");
    assert!(!server.exists(&lock_key("new")).await);
    // Renewals (PEXPIRE) and releases (DEL) need no memory.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!guard.is_lost(), "lost: {:?}", guard.lost_reason());
    guard.release().await.unwrap();
    assert!(!server.exists(&lock_key("held")).await);
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let g = a.lock("new").try_acquire().await.unwrap().unwrap();
    g.release().await.unwrap();
}

// ----- eviction (issue 11, hole 12) -----

/// Every warning of this test binary, from every thread. (A per-thread
/// subscriber misses events: tracing caches each call site's interest across
/// threads, and the other tests run without one.)
fn warnings() -> String {
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    static LOGS: LazyLock<Sink> = LazyLock::new(|| {
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        sink
    });
    String::from_utf8_lossy(&LOGS.0.lock().unwrap()).into_owned()
}

/// The eviction warnings whose `server` field ends with `server` (an address,
/// a URL) and that name `policy`.
fn eviction_warnings(server: &str, policy: &str) -> Vec<String> {
    let field_end = format!("{server}\"");
    warnings()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("may evict lock keys"))
        .filter(|l| l.contains(&field_end) && l.contains(policy))
        .map(str::to_owned)
        .collect()
}

/// A server that evicts any key at 10 MB, lock keys included.
async fn evicting_server() -> RedisServer {
    RedisServer::builder()
        .config("maxmemory", "10mb")
        .config("maxmemory-policy", "allkeys-lru")
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_may_evict_lock_keys_is_warned_about_at_connect() {
    warnings();
    let server = evicting_server().await;
    let port = format!("127.0.0.1:{}", server.port());
    assert!(eviction_warnings(&port, "allkeys-lru").is_empty());
    let locker = quick(&server.url()).build().await.unwrap();
    let found = eviction_warnings(&port, "allkeys-lru");
    assert_eq!(found.len(), 1, "{}", warnings());
    assert!(found[0].contains("noeviction"), "{}", found[0]);
    locker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_noeviction_refuses_a_server_that_may_evict_lock_keys() {
    let server = evicting_server().await;
    let err = quick(&server.url())
        .require_noeviction(true)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    assert!(err.to_string().contains("allkeys-lru"), "{err}");
    // A volatile-* policy evicts keys with a TTL: every lock key has one.
    let mut conn = server.conn().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("volatile-ttl")
        .query_async(&mut conn)
        .await
        .unwrap();
    let config: distlock::Config = serde_json::from_value(serde_json::json!({
        "url": server.url(),
        "require_noeviction": true,
    }))
    .unwrap();
    let err = config.into_builder().build().await.unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    assert!(err.to_string().contains("volatile-ttl"), "{err}");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut conn)
        .await
        .unwrap();
    let locker = quick(&server.url())
        .require_noeviction(true)
        .build()
        .await
        .unwrap();
    locker
        .lock("k")
        .acquire()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    locker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_without_info_or_config_still_connects_and_config_get_is_the_fallback() {
    let server = RedisServer::builder()
        .config("maxmemory", "10mb")
        .config("maxmemory-policy", "allkeys-lru")
        .args([
            "--user",
            "locks",
            "on",
            ">pw",
            "~distlock:*",
            "&distlock:*",
            "+@all",
        ])
        .args(["-info", "-config"])
        .args([
            "--user",
            "reader",
            "on",
            ">pw",
            "~distlock:*",
            "&distlock:*",
            "+@all",
        ])
        .args(["-info", "-config", "+config|get"])
        .start()
        .await;
    let url = |user: &str| format!("redis://{user}:pw@127.0.0.1:{}", server.port());
    // Neither INFO nor CONFIG: the policy cannot be read, and that is no error.
    let locker = quick(&url("locks")).build().await.unwrap();
    locker
        .lock("k")
        .acquire()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    locker.close().await.unwrap();
    // ... unless it is required.
    let err = quick(&url("locks"))
        .require_noeviction(true)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    assert!(err.to_string().contains("neither INFO nor CONFIG"), "{err}");
    // CONFIG GET alone reads it.
    let err = quick(&url("reader"))
        .require_noeviction(true)
        .build()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("allkeys-lru"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_checks_the_eviction_policy_of_every_server() {
    warnings();
    let mut servers = RedisServer::start_many(2).await;
    servers.push(evicting_server().await);
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let redlock = || {
        Locker::builder()
            .redlock(urls.clone())
            .expiry(Duration::from_secs(2))
            .op_timeout(Duration::from_millis(300))
            .connect_timeout(Duration::from_millis(500))
    };
    let err = redlock()
        .require_noeviction(true)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    assert!(err.to_string().contains(&urls[2]), "{err}");
    let locker = redlock().build().await.unwrap();
    assert_eq!(
        eviction_warnings(&urls[2], "allkeys-lru").len(),
        1,
        "{}",
        warnings()
    );
    assert!(eviction_warnings(&urls[0], "").is_empty());
    locker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_checks_the_eviction_policy_of_every_master() {
    warnings();
    let cluster = distlock_tests::RedisCluster::start().await;
    let evicting = &cluster.nodes()[1];
    let mut conn = evicting.conn().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("volatile-lru")
        .query_async(&mut conn)
        .await
        .unwrap();
    let builder = || {
        Locker::builder()
            .cluster([cluster.urls()[0].clone()])
            .connect_timeout(Duration::from_secs(2))
    };
    let err = builder()
        .require_noeviction(true)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    let addr = evicting.addr().to_string();
    assert!(err.to_string().contains(&addr), "{err}");
    let locker = builder().build().await.unwrap();
    assert_eq!(
        eviction_warnings(&addr, "volatile-lru").len(),
        1,
        "{}",
        warnings()
    );
    locker.close().await.unwrap();
}

// ----- close() -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_fails_every_waiter_releases_every_lease_and_stops_every_task() {
    let server = RedisServer::start().await;
    let before_any = alive_tasks();
    let other = Locker::connect(&server.url()).await.unwrap();
    let mut theirs = Vec::new();
    for i in 0..5 {
        theirs.push(other.lock(format!("theirs-{i}")).acquire().await.unwrap());
    }
    let baseline = alive_tasks();

    let a = Locker::connect(&server.url()).await.unwrap();
    let mut mine = Vec::new();
    for i in 0..10 {
        mine.push(a.lock(format!("mine-{i}")).acquire().await.unwrap());
    }
    let waiters: Vec<_> = (0..10)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(async move { a.lock(format!("theirs-{}", i % 5)).acquire().await })
        })
        .collect();
    eventually("every waiter queues", Duration::from_secs(2), || async {
        a.__waiting_lines() == 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(alive_tasks() > baseline + 10);

    timeout(Duration::from_secs(5), a.close())
        .await
        .expect("close hung")
        .unwrap();
    for w in waiters {
        let err = timeout(Duration::from_secs(2), w)
            .await
            .expect("a waiter outlived close")
            .unwrap()
            .unwrap_err();
        assert!(err.is_closed(), "{err}");
    }
    for g in &mine {
        assert_eq!(g.lost_reason(), Some(LostReason::Closed));
    }
    assert!(
        server.keys("distlock:{mine-*}").await.is_empty(),
        "a lease survived close"
    );
    // The handles (locker, guards) are still alive; the tasks are not.
    eventually(
        "every task of the closed locker ends",
        Duration::from_secs(3),
        || async { alive_tasks() == baseline },
    )
    .await;
    assert!(a.lock("x").try_acquire().await.unwrap_err().is_closed());
    drop(mine);
    drop(a);

    drop(theirs);
    other.close().await.unwrap();
    eventually("every task ends", Duration::from_secs(3), || async {
        alive_tasks() == before_any
    })
    .await;
}
