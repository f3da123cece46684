//! What the behavioural suites share: a backend fixture, bounded polling, and
//! the `both!` macro that runs one check on Redis and in memory.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)] // each suite uses a part

use std::time::Duration;

use distlock::{Locker, LockerBuilder, MemoryStore};
use distlock_tests::RedisServer;
use tokio::time::Instant;

/// A backend under test and what an operator can do to it.
pub enum Fixture {
    Redis(RedisServer),
    Memory(MemoryStore),
}

impl Fixture {
    pub async fn redis() -> Self {
        Fixture::Redis(RedisServer::start().await)
    }

    pub fn memory() -> Self {
        Fixture::Memory(MemoryStore::new())
    }

    /// A builder pointed at this backend: one per replica.
    pub fn builder(&self) -> LockerBuilder {
        match self {
            Fixture::Redis(s) => Locker::builder().url(s.url()),
            Fixture::Memory(m) => Locker::builder().memory_store(m.clone()),
        }
    }

    pub async fn locker(&self) -> Locker {
        self.builder().build().await.expect("locker")
    }

    /// Deletes the lock behind its holder's back, as `redis-cli DEL` would.
    pub async fn delete(&self, key: &str) {
        match self {
            Fixture::Redis(s) => {
                assert!(
                    s.del(&format!("distlock:{{{key}}}")).await,
                    "key was not there"
                );
            }
            Fixture::Memory(m) => assert!(m.delete(key), "key was not there"),
        }
    }

    /// Deletes every holder of `key`, of any kind (mutex, semaphore, reader,
    /// writer), behind their backs.
    pub async fn delete_all(&self, key: &str) {
        match self {
            Fixture::Redis(s) => {
                let base = format!("distlock:{{{key}}}");
                let mut any = false;
                for k in [
                    base.clone(),
                    format!("{base}:sem"),
                    format!("{base}:rw:r"),
                    format!("{base}:rw:w"),
                ] {
                    any |= s.del(&k).await;
                }
                assert!(any, "no holder was there");
            }
            Fixture::Memory(m) => assert!(m.delete(key), "no holder was there"),
        }
    }

    /// True if any holder of `key`, of any kind, is live.
    pub async fn is_held_any(&self, key: &str) -> bool {
        match self {
            Fixture::Redis(s) => !s
                .keys(&format!("distlock:{{{key}}}*"))
                .await
                .iter()
                .all(|k| k.ends_with(":fence")),
            Fixture::Memory(m) => m.contains(key),
        }
    }

    pub async fn is_held(&self, key: &str) -> bool {
        match self {
            Fixture::Redis(s) => s.exists(&format!("distlock:{{{key}}}")).await,
            Fixture::Memory(m) => m.contains(key),
        }
    }
}

/// Polls `cond` every millisecond until it holds or `limit` passes; returns the
/// time it took.
pub async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Makes one test per backend for each `name => check;` line.
#[macro_export]
macro_rules! both {
    ($($name:ident => $check:ident;)*) => {
        mod on_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$check($crate::common::Fixture::redis().await).await;
                }
            )*
        }
        mod on_memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$check($crate::common::Fixture::memory()).await;
                }
            )*
        }
    };
}
