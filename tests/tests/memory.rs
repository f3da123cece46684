//! The in-memory backend's footprint: its operations give the runtime a turn
//! as network operations would, and it keeps nothing for keys nobody holds.
//! In-memory backend only (what is measured is that backend's own state).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::time::Duration;

use distlock::{Locker, LostReason};
use distlock_tests::process::rss_bytes;
use tokio::runtime::Builder;

/// Regression: memory operations never yielded, so on a current-thread runtime
/// a loop of acquisitions starved the keeper (no renewal, no `max_hold`, and
/// its queue of commands grew without bound: 6 MB to 85 MB of RSS).
#[test]
fn a_loop_of_memory_acquisitions_on_a_current_thread_runtime_lets_the_keeper_run() {
    let rt = Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let locker = Locker::memory();
        let limited = locker
            .lock("limited")
            .max_hold(Duration::from_millis(5))
            .acquire()
            .await
            .unwrap();
        let lock = locker.lock("busy");
        let mut rounds = 0u32;
        while !limited.is_lost() && rounds < 200_000 {
            let guard = lock.try_acquire().await.unwrap().expect("free");
            guard.release().await.unwrap();
            rounds += 1;
        }
        assert_eq!(
            limited.lost_reason(),
            Some(LostReason::MaxHold),
            "the keeper never ran during {rounds} acquisitions"
        );
    });
}

/// Regression: the memory backend kept a fencing counter for every key ever
/// locked (+37 MB per 300,000 keys). Nothing may stay for released keys.
#[test]
fn the_memory_backend_keeps_nothing_for_released_keys() {
    let rt = Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let locker = Locker::memory();
        let mut last = 0;
        // Warm up the allocator and the keeper before measuring.
        for i in 0..20_000 {
            let guard = locker.lock(format!("warm:{i}")).acquire().await.unwrap();
            guard.release().await.unwrap();
        }
        let before = rss_bytes().expect("RSS readable on Linux");
        for i in 0..300_000 {
            let guard = locker.lock(format!("key:{i}")).acquire().await.unwrap();
            assert!(guard.fencing_token() > last, "fencing tokens increase");
            last = guard.fencing_token();
            guard.release().await.unwrap();
        }
        let grown = rss_bytes().unwrap().saturating_sub(before);
        assert!(
            grown < 12 << 20,
            "300,000 released keys grew RSS by {} MB",
            grown >> 20
        );
        locker.close().await.unwrap();
    });
}
