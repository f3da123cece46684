//! Fault tests: each injects one fault with the harness (a private
//! `redis-server` that can be killed, restarted empty and paused, and a
//! `FaultProxy` that adds latency, black-holes traffic and resets
//! connections) and proves how the lockers behave through it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::time::Duration;

use distlock::{Locker, LockerBuilder, LostReason};
use distlock_tests::RedisServer;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

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
    let quarantine = Duration::from_secs(1);
    let a = quick(&server.url())
        .restart_quarantine(quarantine)
        .build()
        .await
        .unwrap();
    let b = quick(&server.url())
        .restart_quarantine(quarantine)
        .build()
        .await
        .unwrap();
    // The quarantine delays the first acquisitions on the fresh server too.
    let (guard, _) = acquire_through_outage(&a, "restarted", Duration::from_secs(3)).await;
    let lost = watch_lost(&guard);
    let restart_began = Instant::now();
    server.kill();
    server.restart().await;
    let restarted = Instant::now();
    assert_eq!(server.dbsize().await, 0, "the restart kept data");
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
    assert!(
        acquired >= restart_began + quarantine,
        "acquired {:?} after the restart began, inside the quarantine",
        acquired - restart_began
    );
    assert!(
        acquired <= restarted + quarantine + Duration::from_millis(2300),
        "acquired {:?} after the restart: more than the quarantine, its rounding \
         to whole seconds, and one backoff",
        acquired - restarted
    );
}
