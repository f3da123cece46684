//! The reader-writer lock's behavioural suite, on three backends (one test per backend,
//! made by `suite!`): a private `redis-server`, a three-node Redis Cluster, and
//! the in-memory store.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use distlock::{LostReason, Policy};
use tokio::time::{timeout, Instant};

mod common;
use common::{eventually, Fixture};

suite! {
    readers_share_the_lock => check_readers_share;
    a_writer_excludes_readers_and_writers => check_writer_excludes;
    a_writer_gets_in_while_readers_keep_arriving => check_writer_not_starved;
    readers_get_in_while_writers_keep_arriving => check_readers_not_starved;
    a_lost_reader_or_writer_is_signalled => check_lost;
    readers_and_writers_run_through_the_runner => check_run;
}

async fn check_readers_share(fx: Fixture) {
    let a = fx.locker().await;
    let b = fx.locker().await;
    let r1 = a.rw_lock("doc").read().await.unwrap();
    let r2 = timeout(Duration::from_secs(1), b.rw_lock("doc").read())
        .await
        .expect("shared")
        .unwrap();
    assert!(b.rw_lock("doc").try_write().await.unwrap().is_none());
    r1.release().await.unwrap();
    r2.release().await.unwrap();
    assert!(b.rw_lock("doc").try_write().await.unwrap().is_some());
}

async fn check_writer_excludes(fx: Fixture) {
    let a = fx.locker().await;
    let b = fx.locker().await;
    let w = a.rw_lock("doc").write().await.unwrap();
    assert!(b.rw_lock("doc").try_read().await.unwrap().is_none());
    assert!(b.rw_lock("doc").try_write().await.unwrap().is_none());
    let waiting =
        tokio::spawn(async move { b.rw_lock("doc").read_timeout(Duration::from_secs(3)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished());
    w.release().await.unwrap();
    let _reader = timeout(Duration::from_secs(2), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

async fn check_writer_not_starved(fx: Fixture) {
    let lockers = [fx.locker().await, fx.locker().await];
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    // Four readers, each re-reading at once, so the lock is never free of readers.
    for i in 0..4 {
        let rw = lockers[i % 2].rw_lock("hot");
        let (stop, reads) = (stop.clone(), reads.clone());
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(g) = rw.read_timeout(Duration::from_millis(200)).await {
                    reads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    drop(g);
                }
            }
        }));
    }
    eventually(Duration::from_secs(5), || async {
        reads.load(Ordering::SeqCst) >= 8
    })
    .await;
    let started = Instant::now();
    let w = timeout(Duration::from_secs(10), lockers[1].rw_lock("hot").write())
        .await
        .expect("the writer got in despite the stream of readers")
        .unwrap();
    let reads_at_write = reads.load(Ordering::SeqCst);
    assert!(lockers[0]
        .rw_lock("hot")
        .try_read()
        .await
        .unwrap()
        .is_none());
    println!("writer waited {:?}", started.elapsed());
    w.release().await.unwrap();
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.await.unwrap();
    }
    assert!(reads.load(Ordering::SeqCst) >= reads_at_write);
}

/// Writers in two lockers re-acquire back to back, each holding briefly,
/// while readers come and go: the readers must still get a fair share. A
/// writer's intent asks readers to drain so that *a* writer gets in; once one
/// has, the intent has done its job, whichever writer left it.
async fn check_readers_not_starved(fx: Fixture) {
    let lockers = [fx.locker().await, fx.locker().await];
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, writes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut tasks = Vec::new();
    for i in 0..6 {
        let rw = lockers[i % 2].rw_lock("busy");
        let (stop, reads, writes) = (stop.clone(), reads.clone(), writes.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let wait = Duration::from_millis(300);
                if i < 4 {
                    if let Ok(g) = rw.write_timeout(wait).await {
                        writes.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        g.release().await.unwrap();
                    }
                } else if let Ok(g) = rw.read_timeout(wait).await {
                    reads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    g.release().await.unwrap();
                }
            }
        }));
    }
    // Before a writer cleared any intent it found, the readers got about one
    // acquisition in 200 here.
    let took = eventually(Duration::from_secs(10), || async {
        reads.load(Ordering::SeqCst) >= 20 && writes.load(Ordering::SeqCst) >= 20
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "{} reads, {} writes; 20 reads took {took:?}",
        reads.load(Ordering::SeqCst),
        writes.load(Ordering::SeqCst)
    );
}

async fn check_lost(fx: Fixture) {
    let a = fx
        .builder()
        .expiry(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let r = a.rw_lock("lost-r").read().await.unwrap();
    let w = a.rw_lock("lost-w").write().await.unwrap();
    fx.delete_all("lost-r").await;
    fx.delete_all("lost-w").await;
    assert_eq!(
        timeout(Duration::from_secs(2), r.lost()).await.unwrap(),
        LostReason::Stolen
    );
    assert_eq!(
        timeout(Duration::from_secs(2), w.lost()).await.unwrap(),
        LostReason::Stolen
    );
}

async fn check_run(fx: Fixture) {
    let a = fx.locker().await;
    let rw = a.rw_lock("runner");
    let policy = Policy::new().timeout(Duration::from_secs(1));
    let (r1, r2) = tokio::join!(
        rw.reader().run(&policy, async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            1
        }),
        rw.reader().run(&policy, async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            2
        }),
    );
    assert_eq!((r1.unwrap(), r2.unwrap()), (Some(1), Some(2)));
    let w = rw.writer().run(&policy, async { 3 }).await.unwrap();
    assert_eq!(w, Some(3));
    assert!(!fx.is_held_any("runner").await);
}
