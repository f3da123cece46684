//! `#[distributed_lock]` without `locker = ...` uses the process-wide default
//! locker. Its own test binary, since the default is global to the process.
//! On a private `redis-server`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use distlock::{distributed_lock, Locker};
use distlock_tests::RedisServer;

#[distributed_lock(key = "default:{n}", timeout = "5s")]
async fn with_default_locker(n: u32) -> Result<u32, distlock::Error> {
    assert_eq!(distlock::current().unwrap().key(), format!("default:{n}"));
    Ok(n)
}

#[tokio::test]
async fn default_locker_is_a_clear_error_until_set_then_used() {
    let err = with_default_locker(1).await.unwrap_err();
    assert!(matches!(err, distlock::Error::Config { .. }), "{err:?}");
    assert!(err.to_string().contains("set_default"), "{err}");

    let server = RedisServer::start().await;
    distlock::set_default(Locker::connect(&server.url()).await.unwrap());
    assert_eq!(with_default_locker(2).await.unwrap(), 2);
    // The key was taken in this server, and released.
    assert!(server.keys("distlock:{default:2}").await.is_empty());
    assert!(!server.keys("distlock:{default:2}:fence").await.is_empty());
}
