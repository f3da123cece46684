//! Inspection (who holds a lock, which locks are held) and the guard's own
//! view of its lease (`expires_in`, `extend`), on Redis, a cluster, memory
//! and Redlock.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::time::Duration;

use distlock::{Error, LockGuard, LockStatus, LockType, Locker, Role};
use distlock_tests::RedisServer;
use tokio::time::Instant;

mod common;
use common::{eventually, Fixture};

suite! {
    a_mutex_shows_its_holder_token_and_time_left => check_mutex;
    a_semaphore_shows_every_permit_holder => check_semaphore;
    a_rw_lock_shows_readers_a_waiting_writer_then_the_writer => check_rw;
    locks_lists_thousands_of_locks_over_several_scan_pages => check_list;
    extend_lengthens_the_server_ttl_and_renewals_keep_it => check_extend;
    extend_of_a_lost_lease_fails_with_lost => check_extend_lost;
    no_output_shows_the_random_part_of_a_token => check_secret;
}

/// A locker on `fx` whose tokens start with `tag`.
async fn tagged(fx: &Fixture, tag: &str) -> Locker {
    fx.builder().owner_tag(tag).build().await.unwrap()
}

async fn inspect(locker: &Locker, key: &str) -> LockStatus {
    locker.inspect(key).await.unwrap().expect("held")
}

/// The server's view is never earlier than the guard's: read the server
/// first, then the guard (whose deadline can only be nearer by then).
fn assert_local_view_is_earlier(guard: &LockGuard, server_left: Duration) {
    let local = guard.expires_in();
    assert!(
        local < server_left,
        "local deadline {local:?} is not earlier than the server's {server_left:?}"
    );
}

async fn check_mutex(fx: Fixture) {
    let a = tagged(&fx, "host-a:101:").await;
    let b = tagged(&fx, "host-b:202:").await;
    assert!(b.inspect("job").await.unwrap().is_none());

    let expiry = Duration::from_secs(10);
    let taken = Instant::now();
    let guard = a.lock("job").expiry(expiry).acquire().await.unwrap();
    let info = inspect(&b, "job").await;
    let elapsed = taken.elapsed();

    assert_eq!(info.key(), "job");
    assert_eq!(info.kind(), LockType::Mutex);
    assert_eq!(info.holders().len(), 1);
    let holder = &info.holders()[0];
    assert_eq!(holder.owner(), "host-a:101:");
    assert_eq!(holder.role(), Role::Mutex);
    assert_eq!(info.fencing_token(), Some(guard.fencing_token()));
    assert!(info.waiting_writer().is_none());
    assert_eq!(info.permits(), None);
    let left = holder.expires_in().expect("a TTL");
    // Redis keeps whole milliseconds: allow one for rounding.
    assert!(left <= expiry, "{left:?}");
    assert!(
        left + elapsed + Duration::from_millis(1) >= expiry,
        "{left:?} left {elapsed:?} after acquiring"
    );
    assert_local_view_is_earlier(&guard, left);

    // The next holder's token is the next fencing token, and its owner shows.
    let first = guard.fencing_token();
    guard.release().await.unwrap();
    assert!(b.inspect("job").await.unwrap().is_none());
    let second = b.lock("job").acquire().await.unwrap();
    let info = inspect(&a, "job").await;
    assert_eq!(info.holders()[0].owner(), "host-b:202:");
    assert_eq!(info.fencing_token(), Some(second.fencing_token()));
    assert!(second.fencing_token() > first);
    second.release().await.unwrap();
}

async fn check_semaphore(fx: Fixture) {
    let a = tagged(&fx, "a:1:").await;
    let b = tagged(&fx, "b:2:").await;
    let p1 = a.semaphore("gpus", 5).acquire().await.unwrap();
    let p2 = b.semaphore("gpus", 5).acquire().await.unwrap();
    let p3 = b
        .semaphore("gpus", 5)
        .expiry(Duration::from_secs(3))
        .acquire()
        .await
        .unwrap();
    let info = inspect(&a, "gpus").await;
    assert_eq!(info.kind(), LockType::Semaphore);
    assert_eq!(info.permits(), Some(5));
    let mut owners: Vec<&str> = info.holders().iter().map(|h| h.owner()).collect();
    owners.sort_unstable();
    assert_eq!(owners, ["a:1:", "b:2:", "b:2:"]);
    assert!(info.holders().iter().all(|h| h.role() == Role::Permit));
    // The newest permit's token is the latest granted.
    assert_eq!(info.fencing_token(), Some(p3.fencing_token()));
    // Each permit's own time left: the short one has at most 3 s.
    let mut lefts: Vec<Duration> = info
        .holders()
        .iter()
        .map(|h| h.expires_in().unwrap())
        .collect();
    lefts.sort_unstable();
    assert!(lefts[0] <= Duration::from_secs(3), "{lefts:?}");
    assert!(lefts[0] > Duration::from_secs(2), "{lefts:?}");
    assert!(lefts[1] > Duration::from_secs(20), "{lefts:?}");
    assert_local_view_is_earlier(&p3, lefts[0]);

    p2.release().await.unwrap();
    let info = inspect(&a, "gpus").await;
    assert_eq!(info.holders().len(), 2);
    drop((p1, p3));
}

async fn check_rw(fx: Fixture) {
    let readers = tagged(&fx, "reader:").await;
    let writers = tagged(&fx, "writer:").await;
    let r1 = readers.rw_lock("doc").read().await.unwrap();
    let r2 = readers.rw_lock("doc").read().await.unwrap();
    let info = inspect(&writers, "doc").await;
    assert_eq!(info.kind(), LockType::RwLock);
    assert_eq!(info.holders().len(), 2);
    assert!(info
        .holders()
        .iter()
        .all(|h| h.role() == Role::Reader && h.owner() == "reader:"));
    assert!(info.waiting_writer().is_none());

    // A writer waits: its intent shows.
    let rw = writers.rw_lock("doc");
    let waiting = tokio::spawn(async move { rw.write().await });
    eventually(Duration::from_secs(5), || async {
        let info = readers.inspect("doc").await.unwrap().expect("held");
        info.waiting_writer()
            .is_some_and(|w| w.owner() == "writer:" && w.role() == Role::Writer)
    })
    .await;

    // The readers leave, the writer holds it, alone.
    r1.release().await.unwrap();
    r2.release().await.unwrap();
    let w = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the writer got in")
        .unwrap()
        .unwrap();
    let info = inspect(&readers, "doc").await;
    assert_eq!(info.kind(), LockType::RwLock);
    assert_eq!(info.holders().len(), 1);
    assert_eq!(info.holders()[0].role(), Role::Writer);
    assert_eq!(info.holders()[0].owner(), "writer:");
    assert!(info.waiting_writer().is_none());
    assert_eq!(info.fencing_token(), Some(w.fencing_token()));
    w.release().await.unwrap();
}

/// Far more keys than one `SCAN` page looks at (1000): every lock has a holder
/// key and a fencing counter, so the walk takes several pages per server.
const MANY: usize = 2500;

async fn check_list(fx: Fixture) {
    let locker = tagged(&fx, "lister:").await;
    let mut guards = Vec::with_capacity(MANY + 3);
    for chunk in (0..MANY).collect::<Vec<_>>().chunks(250) {
        let taken = futures_util::future::join_all(chunk.iter().map(|i| {
            let lock = locker.lock(format!("bulk:{i:04}"));
            async move { lock.acquire().await }
        }))
        .await;
        guards.extend(taken.into_iter().map(Result::unwrap));
    }
    guards.push(locker.semaphore("other:sem", 2).acquire().await.unwrap());
    guards.push(locker.rw_lock("other:rw").read().await.unwrap());
    guards.push(locker.lock("other:mutex").acquire().await.unwrap());
    // Released: not listed.
    locker
        .lock("bulk:gone")
        .acquire()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();

    let bulk = locker.locks("bulk:*").await.unwrap();
    assert_eq!(bulk.len(), MANY);
    for (i, info) in bulk.iter().enumerate() {
        assert_eq!(info.key(), format!("bulk:{i:04}"), "sorted, each once");
        assert_eq!(info.kind(), LockType::Mutex);
        assert_eq!(info.holders().len(), 1);
        assert_eq!(info.holders()[0].owner(), "lister:");
        assert!(info.holders()[0].expires_in().is_some());
        assert_eq!(info.fencing_token(), Some(guards[i].fencing_token()));
    }

    let others = locker.locks("other:*").await.unwrap();
    let kinds: Vec<(&str, LockType, Option<Role>)> = others
        .iter()
        .map(|i| (i.key(), i.kind(), i.holders().first().map(|h| h.role())))
        .collect();
    assert_eq!(
        kinds,
        [
            ("other:mutex", LockType::Mutex, Some(Role::Mutex)),
            ("other:rw", LockType::RwLock, Some(Role::Reader)),
            ("other:sem", LockType::Semaphore, Some(Role::Permit)),
        ]
    );
    assert_eq!(locker.locks("*").await.unwrap().len(), MANY + 3);
    assert_eq!(locker.locks("bulk:000?").await.unwrap().len(), 10);
    assert!(locker.locks("nothing:*").await.unwrap().is_empty());
    assert!(locker.locks("").await.unwrap_err().is_invalid_input());
    assert!(locker.locks("a{b").await.unwrap_err().is_invalid_input());

    // Another prefix sees none of them.
    let elsewhere = fx.builder().key_prefix("elsewhere:").build().await.unwrap();
    assert!(elsewhere.locks("*").await.unwrap().is_empty());
    drop(guards);
}

async fn check_extend(fx: Fixture) {
    let locker = fx.locker().await;
    let expiry = Duration::from_millis(900);
    let guard = locker
        .lock("long-step")
        .expiry(expiry)
        .acquire()
        .await
        .unwrap();
    assert!(guard.expires_in() < expiry);

    let by = Duration::from_secs(10);
    guard.extend(by).await.unwrap();
    let left = inspect(&locker, "long-step").await.holders()[0]
        .expires_in()
        .unwrap();
    assert!(
        left > Duration::from_secs(9),
        "server TTL {left:?} after extend"
    );
    assert!(left <= by);
    assert_local_view_is_earlier(&guard, left);
    assert!(guard.expires_in() > Duration::from_secs(9));

    // Several renewal periods (300 ms) later, the renewals have not cut the
    // key back to the lease's expiry: it still lives out the extension.
    tokio::time::sleep(expiry * 2).await;
    assert!(!guard.is_lost());
    let left = inspect(&locker, "long-step").await.holders()[0]
        .expires_in()
        .unwrap();
    assert!(
        left > Duration::from_secs(7),
        "server TTL {left:?} after renewals"
    );
    assert_local_view_is_earlier(&guard, left);

    // A shorter extension never shortens the lease.
    guard.extend(Duration::from_secs(1)).await.unwrap();
    let left = inspect(&locker, "long-step").await.holders()[0]
        .expires_in()
        .unwrap();
    assert!(left > Duration::from_secs(7), "{left:?}");

    // Too long is a configuration error, before any round trip.
    let err = guard
        .extend(Duration::from_secs(25 * 3600))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    guard.release().await.unwrap();
}

async fn check_extend_lost(fx: Fixture) {
    let locker = fx.locker().await;
    let guard = locker.lock("gone").acquire().await.unwrap();
    fx.delete("gone").await;
    let err = guard.extend(Duration::from_secs(5)).await.unwrap_err();
    assert!(err.is_lost(), "{err:?}");
    assert!(guard.is_lost());
    assert_eq!(guard.expires_in(), Duration::ZERO);
    // And again, from the lost state.
    assert!(guard
        .extend(Duration::from_secs(5))
        .await
        .unwrap_err()
        .is_lost());
}

/// The random part of the token behind `guard`, read from its detached lease.
fn random_part(lease: &distlock::Lease) -> String {
    let json = serde_json::to_value(lease).unwrap();
    let token = json["token"].as_str().unwrap().to_owned();
    token[token.len() - 32..].to_owned()
}

async fn check_secret(fx: Fixture) {
    let locker = tagged(&fx, "tag:").await;
    let mut secrets = Vec::new();
    let mut leases = Vec::new();
    for guard in [
        locker.lock("s:mutex").acquire().await.unwrap(),
        locker.semaphore("s:sem", 3).acquire().await.unwrap(),
        locker.rw_lock("s:rw").read().await.unwrap(),
    ] {
        // A guard's own Debug never shows it either.
        let shown = format!("{guard:?}");
        let lease = guard.detach();
        let secret = random_part(&lease);
        assert!(!shown.contains(&secret));
        secrets.push(secret);
        leases.push(lease);
    }
    let writer = locker.rw_lock("s:w").write().await.unwrap();
    let writer_lease = writer.detach();
    secrets.push(random_part(&writer_lease));

    let listed = locker.locks("s:*").await.unwrap();
    assert_eq!(listed.len(), 4);
    let mut shown = format!("{listed:?} {listed:#?}");
    for info in &listed {
        assert_eq!(info.holders()[0].owner(), "tag:");
        for h in info.holders() {
            shown.push_str(&format!("{} {} {:?}", h.owner(), h.role(), h.expires_in()));
        }
        let one = locker.inspect(info.key()).await.unwrap().unwrap();
        shown.push_str(&format!("{one:?} {}", one.kind()));
    }
    for secret in &secrets {
        assert!(!shown.contains(secret.as_str()), "a token leaked");
    }
    for lease in leases.iter().chain([&writer_lease]) {
        locker.release_lease(lease).await.unwrap();
    }
}

/// Redlock: inspection reports what a majority of the servers hold, and
/// still answers with one server down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_reports_what_a_majority_holds() {
    let mut servers = RedisServer::start_many(3).await;
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let locker = Locker::builder()
        .redlock(urls)
        .owner_tag("quorum:")
        .build()
        .await
        .unwrap();
    let guard = locker.lock("rl").acquire().await.unwrap();
    let info = inspect(&locker, "rl").await;
    assert_eq!(info.holders().len(), 1);
    assert_eq!(info.holders()[0].owner(), "quorum:");
    assert_eq!(info.fencing_token(), Some(guard.fencing_token()));
    let left = info.holders()[0].expires_in().unwrap();
    assert_local_view_is_earlier(&guard, left);

    // A holder on one server only (a minority) is not reported.
    servers[0]
        .set("distlock:{minority}", &format!("x:{}", "0".repeat(32)))
        .await;
    assert!(locker.inspect("minority").await.unwrap().is_none());

    // One server down: a majority still answers.
    servers[1].kill();
    let info = inspect(&locker, "rl").await;
    assert_eq!(info.holders()[0].owner(), "quorum:");
    assert_eq!(locker.locks("*").await.unwrap().len(), 1);
    servers[2].kill();
    let err = locker.inspect("rl").await.unwrap_err();
    assert!(matches!(err, Error::Quorum { .. }), "{err:?}");
    drop(guard);
}

/// An extension asked for while a renewal is on its way (a slow link makes
/// each renewal take most of a renewal period) is answered by a renewal that
/// covers it: the key lives out the extension, and the renewal in flight,
/// which asked for the old TTL, never cuts it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_while_a_renewal_is_in_flight_is_kept() {
    let server = RedisServer::start().await;
    let proxy = distlock_tests::FaultProxy::start(server.addr()).await;
    let locker = Locker::builder()
        .url(proxy.url())
        .expiry(Duration::from_millis(1200))
        .op_timeout(Duration::from_millis(400))
        .build()
        .await
        .unwrap();
    let guard = locker.lock("slow-link").acquire().await.unwrap();
    // Renewals every 400 ms, each a round trip of at least 200 ms: half the
    // time one is in flight.
    proxy.set_latency(Duration::from_millis(100));
    let key = "distlock:{slow-link}";
    for round in 0..6u32 {
        // A different moment of the renewal cycle each round.
        tokio::time::sleep(Duration::from_millis(70 * u64::from(round) % 400)).await;
        let by = Duration::from_secs(5 + u64::from(round));
        guard.extend(by).await.unwrap();
        let after = server.pttl(key).await;
        assert!(
            after > i64::try_from(by.as_millis()).unwrap() - 1000,
            "round {round}: PTTL {after} ms right after extend({by:?})"
        );
        // The renewals that follow (two periods) keep at least the extension.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let later = server.pttl(key).await;
        assert!(
            later > i64::try_from(by.as_millis()).unwrap() - 2000,
            "round {round}: PTTL {later} ms 800 ms after extend({by:?})"
        );
        assert!(!guard.is_lost(), "round {round}: {:?}", guard.lost_reason());
    }
    proxy.restore();
    guard.release().await.unwrap();
    assert!(server.keys("distlock:{*}").await.is_empty());
}

/// A script's first use on a server costs one round trip, not two
/// (`EVALSHA` refused, then the script): the locker loads its scripts when
/// it meets a server. Over a link where two round trips exceed `op_timeout`,
/// the first renewal (here asked for by `extend`) used to time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_renewal_over_a_slow_link_takes_one_round_trip() {
    let server = RedisServer::start().await;
    let proxy = distlock_tests::FaultProxy::start(server.addr()).await;
    let locker = Locker::builder()
        .url(proxy.url())
        .expiry(Duration::from_secs(3))
        .op_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let guard = locker.lock("first-renewal").acquire().await.unwrap();
    // A 300 ms round trip: one fits in op_timeout, two do not.
    proxy.set_latency(Duration::from_millis(150));
    let started = Instant::now();
    guard.extend(Duration::from_secs(5)).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(500));
    proxy.restore();
    guard.release().await.unwrap();
}
