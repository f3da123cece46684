//! Redis restarted empty (no persistence) under lockers whose settings differ,
//! as services sharing one Redis do. On private `redis-server` processes
//! started by the harness (Redis only: an empty restart is a server's fault).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::time::Duration;

use distlock::{Locker, LockerBuilder, LostReason};
use distlock_tests::RedisServer;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

fn quick(url: &str, expiry: Duration) -> LockerBuilder {
    Locker::builder()
        .url(url)
        .expiry(expiry)
        .op_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(500))
        .retry_backoff(Duration::from_millis(20), Duration::from_millis(200))
}

/// When the guard's lost signal fires, and why.
fn watch_lost(guard: &distlock::LockGuard) -> JoinHandle<(LostReason, Instant)> {
    let lost = guard.lost();
    tokio::spawn(async move {
        let reason = lost.await;
        (reason, Instant::now())
    })
}

/// Acquires `key`, retrying while the server is unreachable, for at most `limit`.
async fn acquire_through_outage(locker: &Locker, key: &str, limit: Duration) -> Instant {
    let lock = locker.lock(key);
    through_outage(&format!("`{key}`"), limit, |left| {
        lock.acquire_timeout(left)
    })
    .await
}

/// Runs `acquire` with the time left, retrying while the server is
/// unreachable, for at most `limit`; drops what it took and says when.
async fn through_outage<G, Fut>(
    what: &str,
    limit: Duration,
    acquire: impl Fn(Duration) -> Fut,
) -> Instant
where
    Fut: std::future::Future<Output = Result<G, distlock::Error>>,
{
    let start = Instant::now();
    loop {
        let left = limit.saturating_sub(start.elapsed());
        assert!(!left.is_zero(), "{what} not acquired within {limit:?}");
        match acquire(left).await {
            Ok(g) => {
                let at = Instant::now();
                drop(g);
                return at;
            }
            Err(e) if e.is_unavailable() => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => panic!("acquiring {what}: {e}"),
        }
    }
}

/// Two services on one server: one with a 3 s expiry, one with 300 ms that
/// has been connected for a while (it acquired and released), as services are.
async fn long_and_short(server: &RedisServer) -> (Locker, Locker) {
    let long = quick(&server.url(), Duration::from_secs(3))
        .build()
        .await
        .unwrap();
    let short = quick(&server.url(), Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    short
        .lock("warm-up")
        .acquire()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    (long, short)
}

/// Regression: the restart quarantine covered only the acquiring locker's own
/// longest expiry. A locker with a 300 ms expiry took the key 300 ms after the
/// restart, while its holder in another service (3 s expiry, renewing every
/// second) had not yet learned that the restart had erased its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_empty_restart_a_short_expiry_locker_waits_for_a_long_expiry_holder() {
    let mut server = RedisServer::start().await;
    let (holder, short) = long_and_short(&server).await;
    let guard = holder.lock("shared").acquire().await.unwrap();
    let lost = watch_lost(&guard);
    server.kill();
    server.restart().await;
    assert!(
        !server.exists("distlock:{shared}").await,
        "the restart kept data"
    );
    let acquired = acquire_through_outage(&short, "shared", Duration::from_secs(10)).await;
    let (reason, lost_at) = timeout(Duration::from_secs(5), lost)
        .await
        .expect("the holder was told")
        .unwrap();
    assert!(
        lost_at <= acquired,
        "two owners: the holder learned of the loss ({reason:?}) {:?} after another \
         service acquired",
        lost_at - acquired
    );
}

/// The same with a longer expiry used only by one lock (not the locker's
/// default): it is registered before its first acquisition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_longer_per_lock_expiry_is_covered_by_the_quarantine_too() {
    let mut server = RedisServer::start().await;
    let holder = quick(&server.url(), Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let short = quick(&server.url(), Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let guard = holder
        .lock("shared")
        .expiry(Duration::from_secs(3))
        .acquire()
        .await
        .unwrap();
    // The other service opens a connection after that (as on any reconnect).
    short
        .lock("warm-up")
        .acquire()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let lost = watch_lost(&guard);
    server.kill();
    server.restart().await;
    let acquired = acquire_through_outage(&short, "shared", Duration::from_secs(10)).await;
    let (reason, lost_at) = timeout(Duration::from_secs(5), lost)
        .await
        .expect("the holder was told")
        .unwrap();
    assert!(
        lost_at <= acquired,
        "two owners: the holder learned of the loss ({reason:?}) {:?} after another \
         service acquired",
        lost_at - acquired
    );
}

/// New connections record the expiry register, which takes memory: a server
/// out of memory must still give renewals and releases their connections
/// after a reconnect (the register is recorded by the next acquisition).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_to_a_server_out_of_memory_keeps_held_leases() {
    let server = RedisServer::builder()
        .config("maxmemory-policy", "noeviction")
        .start()
        .await;
    let proxy = distlock_tests::FaultProxy::start(server.addr()).await;
    let a = quick(&proxy.url(), Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let guard = a.lock("held").acquire().await.unwrap();
    let mut conn = server.conn().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    // The register key goes, so that recording it needs memory again.
    let _: () = redis::cmd("DEL")
        .arg("distlock:~expiry-register")
        .query_async(&mut conn)
        .await
        .unwrap();
    // Every connection is cut: renewals need new ones.
    proxy.reset_all();
    let err = a
        .lock("longer")
        .expiry(Duration::from_secs(2))
        .try_acquire()
        .await;
    assert!(err.is_err(), "acquired out of memory: {err:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!guard.is_lost(), "lost: {:?}", guard.lost_reason());
    guard.release().await.unwrap();
    assert!(!server.exists("distlock:{held}").await);
}

/// The same for a set of keys (`lock_many`, one script on one server): after
/// an empty restart, a short-expiry service takes the set only after the
/// long-expiry holder of the set was told it lost it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_empty_restart_a_set_of_keys_is_not_taken_before_its_holder_is_told() {
    let mut server = RedisServer::start().await;
    let (holder, short) = long_and_short(&server).await;
    let guard = holder
        .lock_many(["acct:1", "acct:2"])
        .acquire()
        .await
        .unwrap();
    let lost = {
        let lost = guard.lost();
        tokio::spawn(async move { (lost.await, Instant::now()) })
    };
    server.kill();
    server.restart().await;
    let set = short.lock_many(["acct:2", "acct:1"]);
    let acquired = through_outage("the set", Duration::from_secs(10), |left| {
        set.acquire_timeout(left)
    })
    .await;
    let (reason, lost_at) = timeout(Duration::from_secs(5), lost)
        .await
        .expect("the holder was told")
        .unwrap();
    assert!(
        lost_at <= acquired,
        "two owners of a set: the holder learned of the loss ({reason:?}) {:?} after \
         another service acquired",
        lost_at - acquired
    );
}
