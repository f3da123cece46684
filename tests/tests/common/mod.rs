//! What the behavioural suites share: a backend fixture, bounded polling, and
//! the `suite!` macro that runs one check on one Redis, on a Redis Cluster and
//! in memory.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)] // each suite uses a part

use std::time::Duration;

use distlock::{Locker, LockerBuilder, MemoryStore};
use distlock_tests::{RedisCluster, RedisServer};
use tokio::time::Instant;

/// A backend under test and what an operator can do to it.
pub enum Fixture {
    Redis(RedisServer),
    Cluster(RedisCluster),
    Memory(MemoryStore),
}

/// The Redis keys that can hold a lock named `key`, of any kind.
fn holder_keys(key: &str) -> [String; 4] {
    let base = format!("distlock:{{{key}}}");
    [
        format!("{base}:sem"),
        format!("{base}:rw:r"),
        format!("{base}:rw:w"),
        base,
    ]
}

impl Fixture {
    pub async fn redis() -> Self {
        Fixture::Redis(RedisServer::start().await)
    }

    pub async fn cluster() -> Self {
        Fixture::Cluster(RedisCluster::start().await)
    }

    pub fn memory() -> Self {
        Fixture::Memory(MemoryStore::new())
    }

    /// A builder pointed at this backend: one per replica.
    pub fn builder(&self) -> LockerBuilder {
        match self {
            Fixture::Redis(s) => Locker::builder().url(s.url()),
            Fixture::Cluster(c) => Locker::builder().cluster(c.urls()),
            Fixture::Memory(m) => Locker::builder().memory_store(m.clone()),
        }
    }

    pub async fn locker(&self) -> Locker {
        self.builder().build().await.expect("locker")
    }

    /// Runs `cmd` on the Redis (routed by key on a cluster).
    async fn query<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> T {
        match self {
            Fixture::Redis(s) => cmd.query_async(&mut s.conn().await).await.unwrap(),
            Fixture::Cluster(c) => cmd.query_async(&mut c.conn().await).await.unwrap(),
            Fixture::Memory(_) => unreachable!("no Redis in memory"),
        }
    }

    async fn del(&self, key: &str) -> bool {
        self.query::<i64>(redis::cmd("DEL").arg(key).clone()).await == 1
    }

    async fn exists(&self, key: &str) -> bool {
        self.query::<i64>(redis::cmd("EXISTS").arg(key).clone())
            .await
            == 1
    }

    /// Deletes the mutex behind its holder's back, as `redis-cli DEL` would.
    pub async fn delete(&self, key: &str) {
        let gone = match self {
            Fixture::Memory(m) => m.delete(key),
            _ => self.del(&format!("distlock:{{{key}}}")).await,
        };
        assert!(gone, "key was not there");
    }

    /// Deletes every holder of `key`, of any kind (mutex, semaphore, reader,
    /// writer), behind their backs.
    pub async fn delete_all(&self, key: &str) {
        let gone = match self {
            Fixture::Memory(m) => m.delete(key),
            _ => {
                let mut any = false;
                for k in holder_keys(key) {
                    any |= self.del(&k).await;
                }
                any
            }
        };
        assert!(gone, "no holder was there");
    }

    /// True if any holder of `key`, of any kind, is live.
    pub async fn is_held_any(&self, key: &str) -> bool {
        match self {
            Fixture::Memory(m) => m.contains(key),
            _ => {
                for k in holder_keys(key) {
                    if self.exists(&k).await {
                        return true;
                    }
                }
                false
            }
        }
    }

    /// True if the mutex on `key` is held.
    pub async fn is_held(&self, key: &str) -> bool {
        match self {
            Fixture::Memory(m) => m.contains(key),
            _ => self.exists(&format!("distlock:{{{key}}}")).await,
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

/// Makes one test per backend (one Redis, a three-node cluster, memory) for
/// each `name => check;` line.
#[macro_export]
macro_rules! suite {
    ($($name:ident => $check:ident;)*) => {
        mod on_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$check($crate::common::Fixture::redis().await).await;
                }
            )*
        }
        mod on_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$check($crate::common::Fixture::cluster().await).await;
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
