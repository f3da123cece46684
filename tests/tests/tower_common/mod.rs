//! What the tower layer's suites (`tower_layer.rs`, `tower_http.rs`,
//! `tower_grpc.rs`) share: the backends each behaviour runs on, bounded waits,
//! and the `on_both_backends!` macro that makes one test per backend.
//!
//! Every behaviour runs on a private `redis-server` and in memory. In memory an
//! acquire or a release completes within one poll; on Redis each takes a round
//! trip, so a test never relies on a single poll to get somewhere: it hands the
//! future to the runtime and waits for a condition, with a bound.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)] // each suite uses a part

use std::future::Future;
use std::time::Duration;

use distlock::Locker;
use distlock_tests::RedisServer;

/// The backend a behaviour runs on. The server lives as long as the value.
pub enum Backend {
    Redis(RedisServer),
    Memory,
}

impl Backend {
    pub async fn redis() -> Self {
        Backend::Redis(RedisServer::start().await)
    }

    pub fn memory() -> Self {
        Backend::Memory
    }

    /// A locker on this backend (each call a separate one, as a separate
    /// replica would have; on memory, a separate store).
    pub async fn locker(&self) -> Locker {
        match self {
            Backend::Redis(server) => Locker::connect(&server.url()).await.expect("locker"),
            Backend::Memory => Locker::memory(),
        }
    }

    pub fn is_memory(&self) -> bool {
        matches!(self, Backend::Memory)
    }
}

/// How long any single step of a test may take.
pub const STEP: Duration = Duration::from_secs(5);

/// Awaits `fut`, failing the test after [`STEP`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("not within {STEP:?}: {what}"))
}

/// Polls `cond` every millisecond until it holds, failing the test after [`STEP`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
}

/// Whether `key` is held: tries to take it, and gives it back at once if it
/// was free.
pub async fn is_held(locker: &Locker, key: &str) -> bool {
    match locker.lock(key).try_acquire().await.unwrap() {
        Some(guard) => {
            guard.release().await.unwrap();
            false
        }
        None => true,
    }
}

/// Waits (at most [`STEP`]) until `key` can be taken, and gives it back.
pub async fn eventually_free(locker: &Locker, key: &str) {
    within(&format!("`{key}` is released"), async {
        while is_held(locker, key).await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Makes two tests of each listed behaviour, `on_redis::NAME` and
/// `on_memory::NAME`, each calling `NAME(backend)` (an `async fn` of the
/// suite) on a current-thread runtime.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident,)*) => {
        mod on_redis {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::tower_common::Backend::redis().await).await;
                }
            )*
        }
        mod on_memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::tower_common::Backend::memory()).await;
                }
            )*
        }
    };
}
