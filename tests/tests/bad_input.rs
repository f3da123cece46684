//! The bad-input matrix: every case feeds one bad (or borderline) input to
//! the public API against a real `redis-server`, and asserts the exact error
//! variant, that nothing panicked, and that nothing was left behind in Redis.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::time::Duration;

use distlock::{Error, Locker};
use distlock_tests::RedisServer;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_fencing_counter_leaves_no_lock_behind() {
    let server = RedisServer::start().await;
    let locker = Locker::connect(&server.url()).await.unwrap();
    // A counter beyond u64 (an operator's mistake): the acquire script takes the
    // lock, but its fencing token cannot be read back.
    server.set("distlock:{huge}:fence", "1e300").await;
    let err = locker.lock("huge").try_acquire().await.unwrap_err();
    assert!(matches!(err, Error::Redis { .. }), "{err:?}");
    let deadline = Instant::now() + Duration::from_secs(2);
    while server.exists("distlock:{huge}").await {
        assert!(Instant::now() < deadline, "the lock was left held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const PASSWORD: &str = "right-password";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_password_and_a_bad_database_are_not_plain_redis_errors() {
    let server = RedisServer::builder().password(PASSWORD).start().await;
    let err = Locker::connect(&format!("redis://127.0.0.1:{}", server.port()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err:?}");
    let err = Locker::builder()
        .url(server.url())
        .db(99_999)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(err.is_invalid_input());
}
