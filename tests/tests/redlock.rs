//! Redlock over 3 and 5 real servers: a minority down changes nothing, a
//! majority down is a quorum error or a lost lease, and an empty restart of one
//! server does not let a second owner in. Cancelling an acquisition at any
//! await, a failed fencing write-back and a paused server (issue 11, holes 3
//! to 5) each have a regression test.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use distlock::{Error, Locker, LostReason, Policy};
use distlock_tests::{FaultProxy, RedisServer};
use tokio::time::{timeout, Instant};

async fn redlock(servers: &[RedisServer], expiry: Duration) -> Locker {
    Locker::builder()
        .redlock(servers.iter().map(RedisServer::url))
        .expiry(expiry)
        .op_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_three_down_changes_nothing() {
    let mut servers = RedisServer::start_many(3).await;
    let a = redlock(&servers, Duration::from_secs(1)).await;
    let b = redlock(&servers, Duration::from_secs(1)).await;
    servers[0].kill();

    let first = a
        .lock("k")
        .acquire_timeout(Duration::from_secs(2))
        .await
        .unwrap();
    assert!(
        b.lock("k").try_acquire().await.unwrap().is_none(),
        "a second owner"
    );
    // Renewal keeps it across three expiries with one server gone.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert!(!first.is_lost(), "{:?}", first.lost_reason());
    let token = first.fencing_token();

    // A waiter is woken by the release (pub/sub on the surviving majority).
    let waiter = tokio::spawn(async move {
        let g = b
            .lock("k")
            .acquire_timeout(Duration::from_secs(3))
            .await
            .unwrap();
        (g.fencing_token(), Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let released = Instant::now();
    first.release().await.unwrap();
    let (next, woke) = timeout(Duration::from_secs(4), waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(next > token);
    assert!(
        woke - released < Duration::from_millis(500),
        "{:?}",
        woke - released
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_servers_with_two_down_keep_mutual_exclusion() {
    let mut servers = RedisServer::start_many(5).await;
    let lockers = [
        redlock(&servers, Duration::from_secs(2)).await,
        redlock(&servers, Duration::from_secs(2)).await,
    ];
    servers[1].kill();
    servers[3].kill();
    let inside = Arc::new(AtomicUsize::new(0));
    let max_inside = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..10 {
        let lock = lockers[i % 2].lock("shared");
        let (inside, max_inside) = (inside.clone(), max_inside.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..3 {
                let g = lock.acquire_timeout(Duration::from_secs(20)).await.unwrap();
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max_inside.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                g.release().await.unwrap();
            }
        }));
    }
    for t in tasks {
        timeout(Duration::from_secs(60), t).await.unwrap().unwrap();
    }
    assert_eq!(max_inside.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_three_down_is_a_quorum_error_naming_each_server() {
    let mut servers = RedisServer::start_many(3).await;
    let a = redlock(&servers, Duration::from_secs(1)).await;
    servers[0].kill();
    servers[2].kill();
    let err = a.lock("k").try_acquire().await.unwrap_err();
    let Error::Quorum {
        succeeded,
        needed,
        causes,
        ..
    } = &err
    else {
        panic!("expected a quorum error, got {err}");
    };
    // The answer comes as soon as a majority is out of reach: the third
    // server may not have answered yet.
    assert!(*succeeded <= 1, "{succeeded}");
    assert_eq!(*needed, 2);
    assert_eq!(causes.len(), 2);
    // Each killed server is named once, in the order their errors arrived.
    for server in [&servers[0], &servers[2]] {
        let port = format!(":{}", server.port());
        assert_eq!(
            causes.iter().filter(|c| c.server.ends_with(&port)).count(),
            1,
            "{causes:?}"
        );
    }
    for cause in causes {
        assert!(cause.error.is_unavailable(), "{}", cause.error);
    }
    assert!(err.is_unavailable());
    // Nothing is left on the surviving server: the partial acquisition is
    // given back (in the background, at once).
    let survivor = &servers[1];
    let start = Instant::now();
    while survivor.exists("distlock:{k}").await {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "partial acquisition left behind"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Starting with a majority down fails too.
    let err = Locker::builder()
        .redlock(servers.iter().map(RedisServer::url))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Quorum { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lock_whose_majority_dies_is_lost() {
    let mut servers = RedisServer::start_many(3).await;
    let a = redlock(&servers, Duration::from_secs(1)).await;
    let g = a.lock("k").acquire().await.unwrap();
    let acquired = Instant::now();
    servers[0].kill();
    servers[1].kill();
    let reason = timeout(Duration::from_secs(3), g.lost())
        .await
        .expect("lost fired");
    assert_eq!(reason, LostReason::DeadlineMissed);
    assert!(acquired.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_restart_of_one_server_lets_no_second_owner_in() {
    let mut servers = RedisServer::start_many(3).await;
    let a = redlock(&servers, Duration::from_secs(1)).await;
    let b = redlock(&servers, Duration::from_secs(1)).await;
    let g = a.lock("k").acquire().await.unwrap();
    servers[0].restart().await;
    let deadline = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < deadline {
        match b.lock("k").try_acquire().await {
            Ok(None) | Err(_) => {}
            Ok(Some(_)) => panic!("a second owner after an empty restart"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The holder still has its majority (the two untouched servers).
    assert!(!g.is_lost(), "{:?}", g.lost_reason());
    g.release().await.unwrap();
    assert!(b
        .lock("k")
        .acquire_timeout(Duration::from_secs(3))
        .await
        .is_ok());
}

#[tokio::test]
async fn two_urls_for_one_server_are_a_configuration_error() {
    let servers = RedisServer::start_many(2).await;
    let same = format!("redis://localhost:{}", servers[0].port());
    let err = Locker::redlock([servers[0].url(), servers[1].url(), same])
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Config { message: ref m, .. } if m.contains("same Redis server")),
        "{err}"
    );
}

#[tokio::test]
async fn semaphores_over_redlock_are_allowed_only_where_the_bound_holds() {
    let servers = RedisServer::start_many(3).await;
    let a = redlock(&servers, Duration::from_secs(5)).await;
    let err = a.semaphore("s", 2).try_acquire().await.unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    let one = a.semaphore("s1", 1);
    let p = one.acquire().await.unwrap();
    assert!(one.try_acquire().await.unwrap().is_none());
    p.release().await.unwrap();
    // Reader-writer locks are safe over a majority: every two majorities meet.
    let rw = a.rw_lock("rw");
    let r = rw.read().await.unwrap();
    assert!(rw.try_write().await.unwrap().is_none());
    drop(r);
    let out = rw
        .writer()
        .run(&Policy::new().timeout(Duration::from_secs(2)), async { 1 })
        .await
        .unwrap();
    assert_eq!(out, Some(1));
}

#[tokio::test]
async fn fencing_tokens_increase_across_majorities() {
    let mut servers = RedisServer::start_many(3).await;
    let a = redlock(&servers, Duration::from_secs(5)).await;
    let mut last = 0;
    for round in 0..6 {
        // Change which majority answers: take one server down in turn.
        if round == 2 {
            servers[0].kill();
        }
        if round == 4 {
            servers[0].restart().await;
            servers[2].kill();
        }
        let g = a
            .lock("fence")
            .acquire_timeout(Duration::from_secs(10))
            .await
            .unwrap();
        assert!(
            g.fencing_token() > last,
            "{} after {last}",
            g.fencing_token()
        );
        last = g.fencing_token();
        g.release().await.unwrap();
    }
}

/// A Redlock locker over `urls` (servers or proxies in front of them).
async fn redlock_at(urls: Vec<String>, expiry: Duration, op_timeout: Duration) -> Locker {
    Locker::builder()
        .redlock(urls)
        .expiry(expiry)
        .op_timeout(op_timeout)
        .connect_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap()
}

/// Connections open, scripts loaded and the expiry register written on every
/// server, so that a test's latency only slows the operations it measures.
async fn warm_up(lockers: &[&Locker]) {
    for l in lockers {
        l.lock("warm-up")
            .acquire()
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }
}

/// Waits (bounded) until `key` exists on `server`.
async fn wait_for_key(server: &RedisServer, key: &str, within: Duration) {
    let start = Instant::now();
    while !server.exists(key).await {
        assert!(start.elapsed() < within, "{key} never appeared");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits (bounded) until `key` is gone from every server; panics with the
/// servers still holding it.
async fn wait_until_gone_everywhere(servers: &[RedisServer], key: &str, within: Duration) {
    let start = Instant::now();
    loop {
        let mut left = Vec::new();
        for (i, s) in servers.iter().enumerate() {
            if s.exists(key).await {
                left.push(i);
            }
        }
        if left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{key} still on servers {left:?} after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Dropping `acquire()` while the majority is still being gathered (one
/// server answered, two slow ones have not) gives back the grant already
/// received and the late grants when they land: nothing stays on any server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_dropped_during_the_fan_out_leaves_nothing_on_any_server() {
    let servers = RedisServer::start_many(3).await;
    let slow = [
        FaultProxy::start(servers[1].addr()).await,
        FaultProxy::start(servers[2].addr()).await,
    ];
    let expiry = Duration::from_secs(3);
    let urls = vec![servers[0].url(), slow[0].url(), slow[1].url()];
    let a = redlock_at(urls.clone(), expiry, Duration::from_millis(800)).await;
    let b = redlock_at(urls, expiry, Duration::from_millis(800)).await;
    warm_up(&[&a, &b]).await;
    for p in &slow {
        p.set_latency(Duration::from_millis(150));
    }
    let key = "distlock:{k}";
    // Dropped as soon as the fast server has granted: the slow ones have not
    // answered (their replies take 300 ms).
    let lock = a.lock("k");
    tokio::select! {
        r = lock.acquire() => panic!("acquired before the slow servers answered: {:?}", r.map(|g| g.fencing_token())),
        () = wait_for_key(&servers[0], key, Duration::from_secs(2)) => {}
    }
    let dropped = Instant::now();
    for p in &slow {
        p.set_latency(Duration::ZERO);
    }
    // Well under the expiry: the late grants land at ~300 ms and are given
    // back through the same slow path.
    wait_until_gone_everywhere(&servers, key, Duration::from_millis(1500)).await;
    let g = timeout(Duration::from_millis(1500), b.lock("k").acquire())
        .await
        .expect("the next acquirer waited for the dropped attempt's expiry")
        .unwrap();
    assert!(
        dropped.elapsed() < Duration::from_secs(2),
        "{:?}",
        dropped.elapsed()
    );
    g.release().await.unwrap();
}

/// Dropping `acquire()` after a majority granted, while the fencing token is
/// written back (and a slower server has still not answered), gives the lock
/// back at once: the next acquirer does not wait for the expiry, and no key
/// stays behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_dropped_during_the_write_back_lets_the_next_acquirer_in_at_once() {
    let servers = RedisServer::start_many(3).await;
    let proxies = [
        FaultProxy::start(servers[1].addr()).await,
        FaultProxy::start(servers[2].addr()).await,
    ];
    let expiry = Duration::from_secs(3);
    let urls = vec![servers[0].url(), proxies[0].url(), proxies[1].url()];
    let a = redlock_at(urls.clone(), expiry, Duration::from_millis(900)).await;
    let b = redlock_at(urls, expiry, Duration::from_millis(900)).await;
    // Server 1 grants at ~200 ms, its reply lands at ~400 ms, and the
    // write-back to it takes until ~800 ms. Server 2 answers at ~700 ms.
    warm_up(&[&a, &b]).await;
    proxies[0].set_latency(Duration::from_millis(200));
    proxies[1].set_latency(Duration::from_millis(350));
    let key = "distlock:{k}";
    let lock = a.lock("k");
    let mut acquire = Box::pin(lock.acquire());
    tokio::select! {
        r = &mut acquire => panic!("acquired before server 1 answered: {:?}", r.map(|g| g.fencing_token())),
        () = wait_for_key(&servers[1], key, Duration::from_secs(2)) => {}
    }
    // Server 1's grant reaches the client 200 ms after it was taken; cut in
    // the middle of the write-back that follows.
    tokio::select! {
        r = &mut acquire => panic!("acquired during the write-back: {:?}", r.map(|g| g.fencing_token())),
        () = tokio::time::sleep(Duration::from_millis(400)) => {}
    }
    drop(acquire);
    let dropped = Instant::now();
    for p in &proxies {
        p.set_latency(Duration::ZERO);
    }
    let g = timeout(Duration::from_millis(1200), b.lock("k").acquire())
        .await
        .expect("the next acquirer waited for the dropped attempt's expiry")
        .unwrap();
    assert!(dropped.elapsed() < Duration::from_millis(1200));
    g.release().await.unwrap();
    wait_until_gone_everywhere(&servers, key, Duration::from_millis(2000)).await;
}

/// When the fencing token cannot be written back to the granting majority,
/// the acquisition fails; if it ever succeeds, a later holder on another
/// majority still gets a larger token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fence_write_back_never_lets_tokens_go_backwards() {
    let mut servers = RedisServer::start_many(3).await;
    let proxies = [
        FaultProxy::start(servers[1].addr()).await,
        FaultProxy::start(servers[2].addr()).await,
    ];
    let expiry = Duration::from_secs(3);
    let urls = vec![servers[0].url(), proxies[0].url(), proxies[1].url()];
    let a = redlock_at(urls.clone(), expiry, Duration::from_millis(900)).await;
    let b = redlock_at(urls, expiry, Duration::from_millis(900)).await;
    // Server 0's counter is far ahead of the others' (which start from the
    // clock in microseconds): the acquisition's token comes from it.
    servers[0]
        .set("distlock:{k}:fence", "5000000000000000")
        .await;
    warm_up(&[&a, &b]).await;
    for p in &proxies {
        p.set_latency(Duration::from_millis(250));
    }
    let key = "distlock:{k}";
    let lock = a.lock("k");
    let mut acquire = Box::pin(lock.acquire());
    tokio::select! {
        r = &mut acquire => panic!("acquired before servers 1 and 2 answered: {:?}", r.map(|g| g.fencing_token())),
        () = async {
            wait_for_key(&servers[1], key, Duration::from_secs(2)).await;
            wait_for_key(&servers[2], key, Duration::from_secs(2)).await;
        } => {}
    }
    // Their grants reach the client ~250 ms after they were taken, and the
    // write-back reaches them ~250 ms after that: cut both links in between
    // (in-flight bytes dropped, nothing forwarded, reconnections hang).
    let outcome = tokio::select! {
        r = &mut acquire => Some(r),
        () = tokio::time::sleep(Duration::from_millis(375)) => None,
    };
    assert!(outcome.is_none(), "acquired before the write-back was cut");
    for p in &proxies {
        p.blackhole();
        p.reset_all();
    }
    let outcome = timeout(Duration::from_secs(3), acquire).await.unwrap();
    for p in &proxies {
        p.reset_all();
        p.restore();
    }
    let earlier = match outcome {
        Ok(g) => {
            let token = g.fencing_token();
            let _ = g.release().await;
            Some(token)
        }
        Err(e) => {
            assert!(e.is_unavailable(), "{e}");
            None
        }
    };
    // The next holder's majority is servers 1 and 2 (whose write-back failed).
    servers[0].kill();
    let g = b
        .lock("k")
        .acquire_timeout(Duration::from_secs(5))
        .await
        .unwrap();
    if let Some(earlier) = earlier {
        assert!(
            g.fencing_token() > earlier,
            "token went backwards: {} after {earlier}",
            g.fencing_token()
        );
    }
    g.release().await.unwrap();
}

/// One of three servers paused (SIGSTOP) changes nothing: acquire and
/// release answer on the other two without waiting for it, and a short lease
/// is renewed across several expiries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_paused_server_of_three_delays_nothing() {
    let servers = RedisServer::start_many(3).await;
    let expiry = Duration::from_millis(2000);
    let op_timeout = Duration::from_millis(600);
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let a = redlock_at(urls.clone(), expiry, op_timeout).await;
    let b = redlock_at(urls, expiry, op_timeout).await;
    servers[2].pause();
    // Well under op_timeout: nothing waits for the paused server.
    let bound = Duration::from_millis(300);

    let start = Instant::now();
    let g = a.lock("k").acquire().await.unwrap();
    let took = start.elapsed();
    assert!(took < bound, "acquire took {took:?}");

    // Held across three expiries: renewals answer on the majority.
    let held = Instant::now();
    while held.elapsed() < expiry * 3 {
        assert!(
            !g.is_lost(),
            "{:?} after {:?}",
            g.lost_reason(),
            held.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        b.lock("k").try_acquire().await.unwrap().is_none(),
        "a second owner"
    );

    let start = Instant::now();
    g.release().await.unwrap();
    let took = start.elapsed();
    assert!(took < bound, "release took {took:?}");

    let start = Instant::now();
    let g = b.lock("k").acquire().await.unwrap();
    let took = start.elapsed();
    assert!(took < bound, "the next acquire took {took:?}");
    g.release().await.unwrap();
    servers[2].resume();
}

/// What a Redlock operation leaves running in the background (a slow
/// server's late grant joining a released lease, the release still on its
/// way to it) is finished by `close()`: a program that closes its locker and
/// then ends its runtime leaves no lease behind to expire by itself.
#[test]
fn close_finishes_the_background_work_of_redlock_operations() {
    let outer = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (servers, proxy) = outer.block_on(async {
        let servers = RedisServer::start_many(3).await;
        let proxy = FaultProxy::start(servers[2].addr()).await;
        (servers, proxy)
    });
    let urls = vec![servers[0].url(), servers[1].url(), proxy.url()];
    let expiry = Duration::from_secs(3);
    // The locker lives on its own runtime, ended right after close().
    let inner = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    inner.block_on(async {
        let a = redlock_at(urls, expiry, Duration::from_millis(800)).await;
        warm_up(&[&a]).await;
        proxy.set_latency(Duration::from_millis(50));
        // The majority (servers 0 and 1) answers at once; server 2's grant
        // lands later, and its connection breaks before the reply: the
        // release has to reach server 2 on a new connection, after the
        // majority answered.
        let g = a.lock("k").acquire().await.unwrap();
        wait_for_key(&servers[2], "distlock:{k}", Duration::from_secs(2)).await;
        proxy.reset_all();
        g.release().await.unwrap();
        let b = a.lock("k2").acquire().await.unwrap();
        drop(b);
        a.close().await.unwrap();
    });
    drop(inner);
    outer.block_on(async {
        proxy.set_latency(Duration::ZERO);
        for key in ["distlock:{k}", "distlock:{k2}"] {
            wait_until_gone_everywhere(&servers, key, Duration::from_millis(500)).await;
        }
    });
}

/// Two URLs that reach one server are refused by name (the URLs as given,
/// never the server's `run_id`): Redlock needs independent servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_urls_reaching_one_server_are_refused_naming_the_urls() {
    let servers = RedisServer::start_many(2).await;
    // The same server, spelled with its database.
    let same = format!("{}/0", servers[0].url());
    let urls = [servers[0].url(), same.clone(), servers[1].url()];
    let err = Locker::builder()
        .redlock(urls.iter().cloned())
        .build()
        .await
        .expect_err("a server listed twice");
    let text = err.to_string();
    assert!(matches!(err, Error::Config { .. }), "{text}");
    assert!(text.contains("reach the same Redis server"), "{text}");
    assert!(text.contains(&same), "the second URL is named: {text}");
    assert!(!text.contains("run_id"), "{text}");
}
