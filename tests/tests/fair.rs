//! Fair mutexes (`Lock::fair`): waiters queue on the server, a release hands
//! the lock to the first live ticket in the same script, and nobody overtakes
//! the line. On real `redis-server` processes; in memory and on Redlock the
//! option changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use distlock::{LockGuard, Locker};
use distlock_tests::RedisServer;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

const BOUND: Duration = Duration::from_secs(10);

async fn locker(server: &RedisServer) -> Locker {
    Locker::builder()
        .url(server.url())
        .expiry(Duration::from_secs(10))
        .build()
        .await
        .unwrap()
}

/// Waits (bounded) until the key's line on the server holds `n` tickets.
async fn line_holds(server: &RedisServer, key: &str, n: usize) {
    let tickets = format!("distlock:{{{key}}}:tickets");
    let deadline = Instant::now() + BOUND;
    loop {
        let mut conn = server.conn().await;
        let len: usize = redis::cmd("ZCARD")
            .arg(&tickets)
            .query_async(&mut conn)
            .await
            .unwrap();
        if len == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the line of {key} holds {len} tickets, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn wait_for(locker: &Locker, key: &str) -> JoinHandle<LockGuard> {
    let lock = locker.lock(key).fair(true);
    tokio::spawn(async move { lock.acquire_timeout(BOUND).await.unwrap() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_hands_the_lock_to_the_first_in_line_in_arrival_order() {
    let server = RedisServer::start().await;
    let (a, b, c) = (
        locker(&server).await,
        locker(&server).await,
        locker(&server).await,
    );
    let key = "fair:order";
    let held = a.lock(key).fair(true).acquire().await.unwrap();
    let first = wait_for(&b, key);
    line_holds(&server, key, 1).await;
    let second = wait_for(&c, key);
    line_holds(&server, key, 2).await;

    let fence = held.fencing_token();
    held.release().await.unwrap();
    let b_guard = timeout(BOUND, first).await.unwrap().unwrap();
    assert!(b_guard.fencing_token() > fence);
    // The lock went to b's token in the release itself: c is still in line.
    line_holds(&server, key, 1).await;
    assert!(!second.is_finished(), "c overtook b");
    let pttl = server.pttl(&format!("distlock:{{{key}}}")).await;
    let local = b_guard.expires_in();
    assert!(
        local <= Duration::from_millis(u64::try_from(pttl).unwrap()),
        "local deadline {local:?} after the server's {pttl} ms"
    );

    let b_fence = b_guard.fencing_token();
    b_guard.release().await.unwrap();
    let c_guard = timeout(BOUND, second).await.unwrap().unwrap();
    assert!(c_guard.fencing_token() > b_fence);
    c_guard.release().await.unwrap();
    assert!(!server.exists(&format!("distlock:{{{key}}}")).await);
    for l in [a, b, c] {
        l.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_try_acquire_never_overtakes_a_waiter() {
    let server = RedisServer::start().await;
    let (a, b, c) = (
        locker(&server).await,
        locker(&server).await,
        locker(&server).await,
    );
    let key = "fair:flood";
    let held = a.lock(key).fair(true).acquire().await.unwrap();
    // A single attempt does not join the line (it had a 1 ms ticket, which a
    // release in that millisecond handed the lock to, with nobody to take it).
    assert!(c
        .lock(key)
        .fair(true)
        .try_acquire()
        .await
        .unwrap()
        .is_none());
    line_holds(&server, key, 0).await;
    let waiter = wait_for(&b, key);
    line_holds(&server, key, 1).await;
    let stop = Arc::new(AtomicBool::new(false));
    let won = Arc::new(AtomicUsize::new(0));
    let flood = tokio::spawn({
        let (lock, stop, won) = (c.lock(key).fair(true), stop.clone(), won.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                if let Some(g) = lock.try_acquire().await.unwrap() {
                    won.fetch_add(1, Ordering::Relaxed);
                    g.release().await.unwrap();
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    held.release().await.unwrap();
    let guard = timeout(BOUND, waiter).await.unwrap().unwrap();
    stop.store(true, Ordering::Relaxed);
    flood.await.unwrap();
    assert_eq!(
        won.load(Ordering::Relaxed),
        0,
        "try_acquire took the lock ahead of the waiter"
    );
    guard.release().await.unwrap();
    // With nobody in line, a single attempt takes a free lock.
    let single = c.lock(key).fair(true).try_acquire().await.unwrap();
    if single.is_none() {
        let mut conn = server.conn().await;
        let line: Vec<String> = redis::cmd("LRANGE")
            .arg(format!("distlock:{{{key}}}:line"))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        let tickets: Vec<String> = redis::cmd("ZRANGE")
            .arg(format!("distlock:{{{key}}}:tickets"))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .unwrap();
        let holder = server.get(&format!("distlock:{{{key}}}")).await;
        panic!("refused: holder {holder:?}, line {line:?}, tickets {tickets:?}");
    }
    single.unwrap().release().await.unwrap();
    for l in [a, b, c] {
        l.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_gives_up_leaves_the_line_and_is_handed_nothing() {
    let server = RedisServer::start().await;
    let (a, b) = (locker(&server).await, locker(&server).await);
    let key = "fair:cancel";
    let held = a.lock(key).fair(true).acquire().await.unwrap();
    let waiter = wait_for(&b, key);
    line_holds(&server, key, 1).await;
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    line_holds(&server, key, 0).await;
    held.release().await.unwrap();
    assert!(
        !server.exists(&format!("distlock:{{{key}}}")).await,
        "the lock was handed to a waiter that had gone"
    );
    // A timed-out waiter leaves too.
    let held = a.lock(key).fair(true).acquire().await.unwrap();
    let gave_up = b
        .lock(key)
        .fair(true)
        .acquire_timeout(Duration::from_millis(200))
        .await;
    assert!(gave_up.is_err());
    line_holds(&server, key, 0).await;
    held.release().await.unwrap();
    assert!(!server.exists(&format!("distlock:{{{key}}}")).await);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_waiters_ticket_is_skipped() {
    let server = RedisServer::start().await;
    let (a, b) = (locker(&server).await, locker(&server).await);
    let key = "fair:dead";
    let held = a.lock(key).fair(true).acquire().await.unwrap();
    // A waiter that died: first in line, its ticket's deadline passed.
    let mut conn = server.conn().await;
    let _: () = redis::pipe()
        .cmd("RPUSH")
        .arg(format!("distlock:{{{key}}}:line"))
        .arg("10000:gone:1:dead")
        .cmd("ZADD")
        .arg(format!("distlock:{{{key}}}:tickets"))
        .arg(1)
        .arg("gone:1:dead")
        .query_async(&mut conn)
        .await
        .unwrap();
    let waiter = wait_for(&b, key);
    line_holds(&server, key, 2).await;
    held.release().await.unwrap();
    let guard = timeout(BOUND, waiter).await.unwrap().unwrap();
    guard.release().await.unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Without pub/sub (a pool handed in), a waiter never hears the handover: its
/// next ticket refresh finds the lock holding its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_whose_message_is_lost_is_found_by_the_next_refresh() {
    let server = RedisServer::start().await;
    let a = locker(&server).await;
    let pool = deadpool_redis::Config::from_url(server.url())
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .unwrap();
    let b = Locker::builder()
        .pool(pool)
        .expiry(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let key = "fair:deaf";
    let held = a.lock(key).fair(true).acquire().await.unwrap();
    let first = held.fencing_token();
    let waiter = wait_for(&b, key);
    line_holds(&server, key, 1).await;
    held.release().await.unwrap();
    let released = Instant::now();
    // The counter is lost after the handover (its TTL ran out, say): the
    // refresh that finds the lock mints anew, from the clock; it returned
    // the counter as it stood, "0", before.
    server.del(&format!("distlock:{{{key}}}:fence")).await;
    let guard = timeout(BOUND, waiter).await.unwrap().unwrap();
    // Refreshes come every 400 ms (a fifth of the 2 s expiry).
    assert!(released.elapsed() < Duration::from_secs(2));
    assert!(!guard.is_lost());
    assert!(
        guard.fencing_token() > first,
        "{} after {first}",
        guard.fencing_token()
    );
    guard.release().await.unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Two lockers of eight tasks each on one fair key: never two holders, and
/// every task gets about the same share (Jain's index over the tasks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_tasks_on_two_lockers_share_a_fair_lock_evenly_and_never_overlap() {
    let server = RedisServer::start().await;
    let lockers = [locker(&server).await, locker(&server).await];
    let key = "fair:share";
    let inside = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for l in &lockers {
        for _ in 0..8 {
            let lock = l.lock(key).fair(true);
            let (inside, overlaps) = (inside.clone(), overlaps.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u32;
                while Instant::now() < until {
                    let g = lock.acquire_timeout(BOUND).await.unwrap();
                    if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                        overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    g.release().await.unwrap();
                    n += 1;
                }
                n
            }));
        }
    }
    let mut shares = Vec::new();
    for t in tasks {
        shares.push(f64::from(t.await.unwrap()));
    }
    assert_eq!(overlaps.load(Ordering::SeqCst), 0);
    let sum: f64 = shares.iter().sum();
    let squares: f64 = shares.iter().map(|x| x * x).sum();
    let jain = sum * sum / (shares.len() as f64 * squares);
    println!("fair shares {shares:?}, Jain index {jain:.3}");
    assert!(
        shares.iter().all(|&n| n > 0.0),
        "a task starved: {shares:?}"
    );
    assert!(jain >= 0.9, "Jain index {jain:.3}: {shares:?}");
    for l in lockers {
        l.close().await.unwrap();
    }
}

#[tokio::test]
async fn in_memory_a_fair_lock_is_an_ordinary_lock() {
    let locker = Locker::memory();
    let lock = locker.lock("fair:memory").fair(true);
    let g = lock.acquire_timeout(BOUND).await.unwrap();
    assert!(lock.try_acquire().await.unwrap().is_none());
    g.release().await.unwrap();
    assert!(lock.try_acquire().await.unwrap().is_some());
}

#[distlock::distributed_lock(key = "fair:macro:{id}", fair = true, timeout = "10s", locker = locker)]
async fn withdraw(locker: &Locker, id: u32, hold: Duration) -> Result<(), distlock::Error> {
    let _ = (locker, id);
    tokio::time::sleep(hold).await;
    Ok(())
}

/// `#[distributed_lock(fair = true)]` waits in the line on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_macro_waits_in_the_line_with_fair() {
    let server = RedisServer::start().await;
    let (a, b) = (locker(&server).await, locker(&server).await);
    let first = tokio::spawn({
        let a = a.clone();
        async move { withdraw(&a, 7, Duration::from_millis(500)).await }
    });
    let deadline = Instant::now() + BOUND;
    while !server.exists("distlock:{fair:macro:7}").await {
        assert!(
            Instant::now() < deadline,
            "the first call never took the lock"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = tokio::spawn({
        let b = b.clone();
        async move { withdraw(&b, 7, Duration::ZERO).await }
    });
    line_holds(&server, "fair:macro:7", 1).await;
    timeout(BOUND, first).await.unwrap().unwrap().unwrap();
    timeout(BOUND, second).await.unwrap().unwrap().unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// `LockLayer::fair(true)`: requests on one key wait in the line on the
/// server, across replicas (two layers with their own lockers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tower_layer_queues_requests_in_the_line_with_fair() {
    use tower::{service_fn, Layer, ServiceExt};

    let server = RedisServer::start().await;
    let (a, b) = (locker(&server).await, locker(&server).await);
    let layer = |l: &Locker| {
        distlock_tower::LockLayer::new(l.clone(), tower_key as fn(&Job) -> Option<String>)
            .fair(true)
    };
    let handler = service_fn(|job: Job| async move {
        tokio::time::sleep(job.hold).await;
        Ok::<_, distlock::Error>(())
    });
    let svc_a = layer(&a).layer(handler);
    let svc_b = layer(&b).layer(handler);
    let first = tokio::spawn(svc_a.oneshot(Job {
        account: 3,
        hold: Duration::from_millis(500),
    }));
    let deadline = Instant::now() + BOUND;
    while !server.exists("distlock:{fair:tower:3}").await {
        assert!(
            Instant::now() < deadline,
            "the first request never took the lock"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = tokio::spawn(svc_b.oneshot(Job {
        account: 3,
        hold: Duration::ZERO,
    }));
    line_holds(&server, "fair:tower:3", 1).await;
    timeout(BOUND, first).await.unwrap().unwrap().unwrap();
    timeout(BOUND, second).await.unwrap().unwrap().unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// A request of the tower test: an account, and how long its handler takes.
struct Job {
    account: u32,
    hold: Duration,
}

impl distlock_tower::LockRequest for Job {}

fn tower_key(job: &Job) -> Option<String> {
    Some(format!("fair:tower:{}", job.account))
}

/// `close()` waits for its waiters to leave the line: a release right after
/// it is not handed to a closed locker's token (before, the waiter's leaving
/// ran after the connections were gone, and the lock stayed held by the closed
/// locker for its whole expiry in 18 rounds of 20 of an adversarial run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_locker_takes_its_waiters_out_of_the_line_first() {
    let server = RedisServer::start().await;
    let a = locker(&server).await;
    let key = "fair:close";
    for _ in 0..5 {
        let b = locker(&server).await;
        let held = a.lock(key).fair(true).acquire().await.unwrap();
        let lock = b.lock(key).fair(true);
        let waiter = tokio::spawn(async move { lock.acquire().await });
        line_holds(&server, key, 1).await;
        b.close().await.unwrap();
        assert!(matches!(
            waiter.await.unwrap(),
            Err(distlock::Error::Closed)
        ));
        let mut conn = server.conn().await;
        let left: usize = redis::cmd("ZCARD")
            .arg(format!("distlock:{{{key}}}:tickets"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(left, 0, "a closed locker's waiter is still in line");
        held.release().await.unwrap();
        assert!(!server.exists(&format!("distlock:{{{key}}}")).await);
    }
    a.close().await.unwrap();
}

/// A zero timeout makes one attempt, on a fair lock too: it neither joins the
/// line nor subscribes (it made four script calls and a SUBSCRIBE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_timeout_makes_one_attempt_and_does_not_join_the_line() {
    let server = RedisServer::start().await;
    let (a, b) = (locker(&server).await, locker(&server).await);
    let key = "fair:zero";
    let held = a.lock(key).fair(true).acquire().await.unwrap();
    let lock = b.lock(key).fair(true);
    // Warm b's connection (it loads the scripts on first use).
    assert!(lock.try_acquire().await.unwrap().is_none());
    let before = calls(&server).await;
    let got = lock.acquire_timeout(Duration::ZERO).await;
    assert!(
        matches!(got, Err(distlock::Error::Timeout { .. })),
        "{got:?}"
    );
    let after = calls(&server).await;
    assert_eq!(after.0 - before.0, 1, "script calls");
    assert_eq!(after.1 - before.1, 0, "subscriptions");
    held.release().await.unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Script calls and SUBSCRIBEs the server has run (`INFO commandstats`).
async fn calls(server: &RedisServer) -> (u64, u64) {
    let mut conn = server.conn().await;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let count = |prefixes: &[&str]| {
        stats
            .lines()
            .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
            .filter_map(|l| l.split(['=', ',']).nth(1)?.parse::<u64>().ok())
            .sum::<u64>()
    };
    (
        count(&["cmdstat_evalsha:", "cmdstat_eval:"]),
        count(&["cmdstat_subscribe:"]),
    )
}

/// A waiter that dies first in line (its process gone: here its runtime is
/// dropped while it waits, so it never leaves the line) can still be handed
/// the lock while its ticket lives. The handover sets the lock for the
/// ticket's life (three refreshes, 1.5 s with a 10 s expiry), not for the
/// waiter's expiry, so the next waiter gets the lock after that, not after
/// 10 s; a live heir extends it at its first renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_dies_first_in_line_holds_a_handover_only_for_its_tickets_life() {
    let server = RedisServer::start().await;
    let (a, c) = (locker(&server).await, locker(&server).await);
    let key = "fair:dies";
    let held = a.lock(key).fair(true).acquire().await.unwrap();

    let (die_tx, die_rx) = std::sync::mpsc::channel::<()>();
    let url = server.url();
    let dying = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let b = rt.block_on(
            Locker::builder()
                .url(url)
                .expiry(Duration::from_secs(10))
                .build(),
        );
        let lock = b.unwrap().lock(key).fair(true);
        rt.spawn(async move { lock.acquire().await });
        // Let it join the line, then drop the runtime with the waiter in it.
        rt.block_on(async {
            while die_rx.try_recv().is_err() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        drop(rt);
    });
    line_holds(&server, key, 1).await;
    die_tx.send(()).unwrap();
    dying.join().unwrap();

    // A live waiter behind the dead one.
    let waiter = wait_for(&c, key);
    line_holds(&server, key, 2).await;
    held.release().await.unwrap();
    let mut conn = server.conn().await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg(format!("distlock:{{{key}}}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (0..=1500).contains(&pttl),
        "handed to the dead waiter for {pttl} ms, not its ticket's 1500"
    );
    let started = Instant::now();
    let guard = timeout(BOUND, waiter).await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the next waiter waited {:?}",
        started.elapsed()
    );
    // A live heir keeps what it was handed past the ticket's life: its
    // first renewal extends the lock to its expiry.
    let heir = wait_for(&a, key);
    line_holds(&server, key, 1).await;
    guard.release().await.unwrap();
    let heir = timeout(BOUND, heir).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(!heir.is_lost());
    let pttl: i64 = redis::cmd("PTTL")
        .arg(format!("distlock:{{{key}}}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(pttl > 1500, "the heir's lock has {pttl} ms left");
    heir.release().await.unwrap();
    a.close().await.unwrap();
    c.close().await.unwrap();
}
