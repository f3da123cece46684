//! `#[distributed_lock]` against real Redis servers (each test starts its own):
//! mutual exclusion, timeouts and busy errors in the function's own error type,
//! job deduplication across replicas, lost leases, every kind of function the
//! attribute goes on, and an axum handler served over HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distlock::{distributed_lock, Locker};
use distlock_tests::RedisServer;
use tokio::sync::{Barrier, Notify};
use tokio::time::{sleep, timeout};

/// An application error type: lock errors arrive through `From`.
#[derive(Debug)]
enum AppError {
    Lock(distlock::Error),
}

impl From<distlock::Error> for AppError {
    fn from(e: distlock::Error) -> Self {
        AppError::Lock(e)
    }
}

impl AppError {
    fn lock(&self) -> &distlock::Error {
        let AppError::Lock(e) = self;
        e
    }
}

/// Where each call's body entered and left: proves bodies never overlap.
#[derive(Default)]
struct Trace {
    inside: AtomicUsize,
    max_inside: AtomicUsize,
    events: Mutex<Vec<String>>,
}

impl Trace {
    /// Enters, holds for `hold`, leaves.
    async fn visit(&self, who: &str, hold: Duration) {
        let now = self.inside.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_inside.fetch_max(now, Ordering::SeqCst);
        self.events.lock().unwrap().push(format!("enter {who}"));
        sleep(hold).await;
        self.events.lock().unwrap().push(format!("leave {who}"));
        self.inside.fetch_sub(1, Ordering::SeqCst);
    }

    fn max_inside(&self) -> usize {
        self.max_inside.load(Ordering::SeqCst)
    }

    /// True if every `enter` is followed by its own `leave`.
    fn strictly_one_at_a_time(&self) -> bool {
        let events = self.events.lock().unwrap();
        events.chunks(2).all(|pair| {
            pair.len() == 2
                && pair[0].strip_prefix("enter ") == pair[1].strip_prefix("leave ")
                && pair[0].starts_with("enter ")
        })
    }
}

async fn connect(server: &RedisServer) -> Locker {
    Locker::connect(&server.url()).await.unwrap()
}

/// Waits until `check` holds, failing after `limit`.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

fn assert_send<T: Send>(value: T) -> T {
    value
}

// ---------------------------------------------------------------------------
// Mutual exclusion

#[distributed_lock(key = "account:{account}", locker = locker)]
async fn debit(locker: &Locker, account: u64, who: &str, trace: &Trace) -> Result<u64, AppError> {
    trace.visit(who, Duration::from_millis(100)).await;
    Ok(account)
}

#[tokio::test]
async fn same_key_calls_run_one_at_a_time() {
    let server = RedisServer::start().await;
    let (a, b) = (connect(&server).await, connect(&server).await);
    let trace = Trace::default();
    let (x, y, z) = tokio::join!(
        debit(&a, 7, "a1", &trace),
        debit(&b, 7, "b", &trace),
        debit(&a, 7, "a2", &trace),
    );
    assert_eq!((x.unwrap(), y.unwrap(), z.unwrap()), (7, 7, 7));
    assert_eq!(trace.max_inside(), 1);
    assert!(trace.strictly_one_at_a_time(), "{:?}", trace.events);
}

#[distributed_lock(key = "account:{account}", locker = locker)]
async fn meet(locker: &Locker, account: u64, barrier: &Barrier) -> Result<(), AppError> {
    // Both calls must be inside at once for the barrier to open.
    barrier.wait().await;
    let _ = account;
    Ok(())
}

#[tokio::test]
async fn different_keys_run_in_parallel() {
    let server = RedisServer::start().await;
    let (a, b) = (connect(&server).await, connect(&server).await);
    let barrier = Barrier::new(2);
    let both = async { tokio::join!(meet(&a, 1, &barrier), meet(&b, 2, &barrier)) };
    let (x, y) = timeout(Duration::from_secs(5), both)
        .await
        .expect("the two keys did not run at the same time");
    x.unwrap();
    y.unwrap();
}

// ---------------------------------------------------------------------------
// Several keys: a transfer holds both accounts

#[distributed_lock(keys = ["account:{from}", "account:{to}"], locker = locker, timeout = "10s")]
async fn transfer(
    locker: &Locker,
    from: u64,
    to: u64,
    trace: &Trace,
) -> Result<(u64, u64), AppError> {
    trace
        .visit(&format!("{from}->{to}"), Duration::from_millis(30))
        .await;
    Ok((from, to))
}

#[tokio::test]
async fn keys_hold_every_account_of_a_transfer_and_opposite_transfers_do_not_deadlock() {
    let server = RedisServer::start().await;
    let (a, b) = (connect(&server).await, connect(&server).await);
    let trace = Trace::default();
    // 1 -> 2 and 2 -> 1 in opposite key orders, and a debit of account 2 alone.
    let both = async {
        tokio::join!(
            transfer(&a, 1, 2, &trace),
            transfer(&b, 2, 1, &trace),
            transfer(&a, 2, 1, &trace),
            debit(&b, 2, "debit", &trace),
        )
    };
    let (x, y, z, w) = timeout(Duration::from_secs(20), both)
        .await
        .expect("a deadlock between opposite transfers");
    assert_eq!(
        (x.unwrap(), y.unwrap(), z.unwrap()),
        ((1, 2), (2, 1), (2, 1))
    );
    assert_eq!(w.unwrap(), 2);
    assert_eq!(trace.max_inside(), 1, "{:?}", trace.events);

    // While one account is held elsewhere, the transfer waits and times out
    // into the function's error type, holding nothing.
    let held = b.lock("account:9").acquire().await.unwrap();
    let started = Instant::now();
    let out = transfer_quick(&a, 8, 9).await;
    assert!(
        matches!(out, Err(AppError::Lock(distlock::Error::Timeout { .. }))),
        "{out:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(b.lock("account:8").try_acquire().await.unwrap().is_some());
    held.release().await.unwrap();
}

#[distributed_lock(keys = ["account:{from}", "account:{to}"], locker = locker, timeout = "200ms")]
async fn transfer_quick(locker: &Locker, from: u64, to: u64) -> Result<(), AppError> {
    let _ = (from, to);
    Ok(())
}

#[distributed_lock(key = "encoder:{pool}", locker = locker, semaphore = 2)]
async fn encode(locker: &Locker, pool: u64, who: &str, trace: &Trace) -> Result<(), AppError> {
    trace.visit(who, Duration::from_millis(100)).await;
    let _ = pool;
    Ok(())
}

#[tokio::test]
async fn semaphore_option_lets_n_calls_run_at_once_and_no_more() {
    let server = RedisServer::start().await;
    let (a, b) = (connect(&server).await, connect(&server).await);
    let trace = Trace::default();
    let (w, x, y, z) = tokio::join!(
        encode(&a, 1, "a1", &trace),
        encode(&b, 1, "b1", &trace),
        encode(&a, 1, "a2", &trace),
        encode(&b, 1, "b2", &trace),
    );
    w.unwrap();
    x.unwrap();
    y.unwrap();
    z.unwrap();
    assert_eq!(trace.max_inside(), 2, "{:?}", trace.events);
    assert_eq!(
        a.semaphore("encoder:1", 2).current_count().await.unwrap(),
        0
    );
}

// ---------------------------------------------------------------------------
// Waiting and busy policies

#[distributed_lock(key = "report", locker = locker, timeout = "300ms")]
async fn report_with_timeout(locker: &Locker, ran: &AtomicBool) -> Result<(), AppError> {
    ran.store(true, Ordering::SeqCst);
    Ok(())
}

#[distributed_lock(key = "report", locker = locker, on_busy = "reject")]
async fn report_or_reject(locker: &Locker, ran: &AtomicBool) -> Result<(), AppError> {
    ran.store(true, Ordering::SeqCst);
    Ok(())
}

#[tokio::test]
async fn timeout_expires_into_the_function_error_type() {
    let server = RedisServer::start().await;
    let (holder, caller) = (connect(&server).await, connect(&server).await);
    let guard = holder.lock("report").acquire().await.unwrap();
    let ran = AtomicBool::new(false);
    let started = Instant::now();
    let err: AppError = report_with_timeout(&caller, &ran).await.unwrap_err();
    let waited = started.elapsed();
    assert!(err.lock().is_timeout(), "{err:?}");
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    assert!(!ran.load(Ordering::SeqCst), "the body ran without the lock");

    guard.release().await.unwrap();
    report_with_timeout(&caller, &ran).await.unwrap();
    assert!(ran.load(Ordering::SeqCst));
}

#[tokio::test]
async fn reject_returns_busy_at_once() {
    let server = RedisServer::start().await;
    let (holder, caller) = (connect(&server).await, connect(&server).await);
    let guard = holder.lock("report").acquire().await.unwrap();
    let ran = AtomicBool::new(false);
    let started = Instant::now();
    let err = report_or_reject(&caller, &ran).await.unwrap_err();
    assert!(err.lock().is_busy(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(!ran.load(Ordering::SeqCst));
    guard.release().await.unwrap();
    report_or_reject(&caller, &ran).await.unwrap();
    assert!(ran.load(Ordering::SeqCst));
}

// ---------------------------------------------------------------------------
// Job deduplication: N replicas fire the same job; one runs it.

/// One replica of a scheduler.
struct Replica {
    locker: Locker,
}

/// What a round of firings saw.
#[derive(Default)]
struct Round {
    ran: AtomicUsize,
    skipped: AtomicUsize,
    skipped_changed: Notify,
}

impl Replica {
    /// Runs the job unless another replica is running it. Returns whether this
    /// replica ran it (`false`, the default, when skipped). The body holds the
    /// lock until every other replica has been skipped, so a late replica
    /// cannot run the job a second time in the same round.
    #[distributed_lock(key = "job:nightly-report", locker = self.locker, on_busy = "skip")]
    async fn nightly_report(&self, round: &Round, others: usize) -> Result<bool, AppError> {
        round.ran.fetch_add(1, Ordering::SeqCst);
        let all_skipped = async {
            loop {
                let notified = round.skipped_changed.notified();
                if round.skipped.load(Ordering::SeqCst) >= others {
                    break;
                }
                notified.await;
            }
        };
        timeout(Duration::from_secs(5), all_skipped)
            .await
            .expect("the other replicas never reported");
        Ok(true)
    }

    /// Runs the job at most once a window: the lock is kept for `at_least`
    /// after the job, so replicas firing late (or again) skip it.
    #[distributed_lock(
        key = "job:hourly-sync",
        locker = self.locker,
        on_busy = "skip",
        at_least = "3s"
    )]
    async fn hourly_sync(&self, runs: &AtomicUsize) -> Result<Option<u32>, AppError> {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok(Some(1))
    }
}

async fn replicas(server: &RedisServer, n: usize) -> Vec<Arc<Replica>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Arc::new(Replica {
            locker: connect(server).await,
        }));
    }
    out
}

#[tokio::test]
async fn skip_job_runs_exactly_once_per_round_across_five_replicas() {
    let server = RedisServer::start().await;
    let replicas = replicas(&server, 5).await;
    for n in 0..20 {
        let round = Arc::new(Round::default());
        let start = Arc::new(Barrier::new(replicas.len()));
        let mut tasks = Vec::new();
        for replica in &replicas {
            let (replica, round, start) = (replica.clone(), round.clone(), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                let ran = replica.nightly_report(&round, 4).await.unwrap();
                if !ran {
                    round.skipped.fetch_add(1, Ordering::SeqCst);
                    round.skipped_changed.notify_waiters();
                }
                ran
            }));
        }
        let mut ran = 0;
        for task in tasks {
            ran += usize::from(
                timeout(Duration::from_secs(10), task)
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        assert_eq!(ran, 1, "round {n}: {ran} replicas ran the job");
        assert_eq!(round.ran.load(Ordering::SeqCst), 1, "round {n}");
        assert_eq!(round.skipped.load(Ordering::SeqCst), 4, "round {n}");
    }
}

#[tokio::test]
async fn at_least_keeps_skipping_a_second_firing_inside_the_window() {
    let server = RedisServer::start().await;
    let replicas = replicas(&server, 5).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let fire = || {
        let start = Arc::new(Barrier::new(replicas.len()));
        let tasks: Vec<_> = replicas
            .iter()
            .map(|replica| {
                let (replica, runs, start) = (replica.clone(), runs.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    replica.hourly_sync(&runs).await.unwrap()
                })
            })
            .collect();
        async move {
            let mut results = Vec::new();
            for task in tasks {
                results.push(task.await.unwrap());
            }
            results
        }
    };

    let first = fire().await;
    assert_eq!(first.iter().filter(|r| r.is_some()).count(), 1, "{first:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // The job finished at once, but the lock stays for the window.
    assert!(server.exists("distlock:{job:hourly-sync}").await);

    let second = fire().await;
    assert!(second.iter().all(Option::is_none), "{second:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "a replica ran inside the window"
    );

    // Once the window has passed, the next firing runs again (once).
    eventually("the window to end", Duration::from_secs(10), || async {
        !server.exists("distlock:{job:hourly-sync}").await
    })
    .await;
    let third = fire().await;
    assert_eq!(third.iter().filter(|r| r.is_some()).count(), 1, "{third:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

// ---------------------------------------------------------------------------
// Lost leases

/// Sets its flag when dropped: shows that the body's future was dropped.
struct DropGuard(Arc<AtomicBool>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[distributed_lock(key = "import:{batch}", locker = locker, expiry = "1s")]
async fn import(
    locker: &Locker,
    batch: u32,
    dropped: Arc<AtomicBool>,
    entered: &Notify,
    fence: &Mutex<Option<u64>>,
) -> Result<(), AppError> {
    let _guard = DropGuard(dropped);
    let lease = distlock::current().expect("the lease is visible in the body");
    assert_eq!(lease.key(), format!("import:{batch}"));
    *fence.lock().unwrap() = Some(lease.fencing_token());
    entered.notify_one();
    std::future::pending::<()>().await;
    Ok(())
}

#[tokio::test]
async fn lost_lease_drops_the_body_and_returns_the_lost_error() {
    let server = RedisServer::start().await;
    let locker = connect(&server).await;
    let dropped = Arc::new(AtomicBool::new(false));
    let entered = Notify::new();
    let fence = Mutex::new(None);
    let call = import(&locker, 3, dropped.clone(), &entered, &fence);
    let operator = async {
        entered.notified().await;
        assert!(!dropped.load(Ordering::SeqCst));
        // An operator deletes the key behind the holder's back.
        assert!(server.del("distlock:{import:3}").await);
    };
    let (result, ()) = timeout(Duration::from_secs(10), async {
        tokio::join!(call, operator)
    })
    .await
    .expect("the lost lease was not noticed");
    let err = result.unwrap_err();
    assert!(err.lock().is_lost(), "{err:?}");
    assert!(dropped.load(Ordering::SeqCst), "the body was not dropped");
    assert!(fence.lock().unwrap().is_some_and(|f| f > 0));
}

#[distributed_lock(key = "export", locker = locker, at_most = "300ms")]
async fn export(locker: &Locker, dropped: Arc<AtomicBool>) -> Result<(), AppError> {
    let _guard = DropGuard(dropped);
    std::future::pending::<()>().await;
    Ok(())
}

#[tokio::test]
async fn at_most_cancels_a_body_that_runs_too_long() {
    let server = RedisServer::start().await;
    let locker = connect(&server).await;
    let dropped = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let err = timeout(Duration::from_secs(5), export(&locker, dropped.clone()))
        .await
        .expect("at_most did not cancel the body")
        .unwrap_err();
    assert_eq!(
        err.lock().lost_reason(),
        Some(distlock::LostReason::MaxHold)
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(dropped.load(Ordering::SeqCst));
    // The lease is released (in the background) rather than left to expire.
    eventually("the key to be released", Duration::from_secs(2), || async {
        !server.exists("distlock:{export}").await
    })
    .await;
}

// ---------------------------------------------------------------------------
// Every kind of function

/// A service that owns its locker.
struct Shard {
    locker: Locker,
    id: u32,
    trace: Trace,
    writes: u32,
}

impl Shard {
    #[distributed_lock(key = "shard:{self.id}", locker = self.locker)]
    async fn read(&self, who: &str) -> Result<u32, AppError> {
        self.trace.visit(who, Duration::from_millis(50)).await;
        Ok(self.id)
    }

    #[distributed_lock(key = "shard:{self.id}", locker = self.locker)]
    async fn write(&mut self, n: u32) -> Result<u32, AppError> {
        self.writes += n;
        Ok(self.writes)
    }

    #[distributed_lock(key = "shard:{self.id}", locker = self.locker)]
    async fn shared(self: Arc<Self>, who: &str) -> Result<u32, AppError> {
        self.trace.visit(who, Duration::from_millis(50)).await;
        Ok(self.id)
    }
}

#[tokio::test]
async fn methods_lock_on_their_fields() {
    let server = RedisServer::start().await;
    let mut shard = Shard {
        locker: connect(&server).await,
        id: 9,
        trace: Trace::default(),
        writes: 0,
    };
    assert_eq!(shard.write(2).await.unwrap(), 2);
    assert_eq!(shard.write(3).await.unwrap(), 5);
    let (x, y) = tokio::join!(shard.read("r1"), shard.read("r2"));
    assert_eq!((x.unwrap(), y.unwrap()), (9, 9));
    let shard = Arc::new(shard);
    let (x, y) = tokio::join!(
        assert_send(shard.clone().shared("s1")),
        assert_send(shard.clone().shared("s2"))
    );
    assert_eq!((x.unwrap(), y.unwrap()), (9, 9));
    assert_eq!(shard.trace.max_inside(), 1);
    assert!(shard.trace.strictly_one_at_a_time());
}

/// Something a service settles.
trait Settle {
    async fn settle(&self, invoice: u64) -> Result<String, AppError>;
}

struct Billing {
    locker: Locker,
}

impl Settle for Billing {
    /// Settles the invoice (doc comments stay on the method).
    #[distributed_lock(key = "invoice:{invoice}", locker = self.locker, timeout = "5s")]
    async fn settle(&self, invoice: u64) -> Result<String, AppError> {
        let lease = distlock::current().unwrap();
        Ok(format!("{}#{}", lease.key(), lease.fencing_token() > 0))
    }
}

#[tokio::test]
async fn trait_impl_methods_take_the_lock() {
    let server = RedisServer::start().await;
    let billing = Billing {
        locker: connect(&server).await,
    };
    assert_eq!(billing.settle(5).await.unwrap(), "invoice:5#true");
}

struct Order {
    id: u64,
    customer: Customer,
}

struct Customer {
    region: &'static str,
}

#[distributed_lock(key = "order:{id}:{region}:{first}", locker = locker)]
async fn destructured(
    locker: &Locker,
    Order {
        id,
        customer: Customer { region },
    }: Order,
    (first, _second): (char, char),
) -> Result<String, AppError> {
    Ok(distlock::current().unwrap().key().to_owned())
}

#[distributed_lock(key = "order:{order.id}/{order.customer.region}/{pair.1}", locker = locker)]
async fn nested_fields(locker: &Locker, order: &Order, pair: (u8, u8)) -> Result<String, AppError> {
    Ok(distlock::current().unwrap().key().to_owned())
}

#[distributed_lock(key = "item:{item}", locker = locker)]
async fn generic<'a, T>(locker: &'a Locker, item: T) -> Result<String, AppError>
where
    T: Display + Send + 'a,
{
    Ok(format!("{item}@{}", distlock::current().unwrap().key()))
}

#[distributed_lock(key = "item:{item}", locker = locker)]
async fn impl_trait_arg(locker: &Locker, item: impl Display) -> Result<String, AppError> {
    Ok(distlock::current().unwrap().key().to_owned())
}

#[tokio::test]
async fn patterns_fields_generics_and_impl_trait_build_the_key() {
    let server = RedisServer::start().await;
    let locker = connect(&server).await;
    let order = || Order {
        id: 12,
        customer: Customer { region: "eu" },
    };
    assert_eq!(
        destructured(&locker, order(), ('a', 'b')).await.unwrap(),
        "order:12:eu:a"
    );
    assert_eq!(
        nested_fields(&locker, &order(), (1, 2)).await.unwrap(),
        "order:12/eu/2"
    );
    assert_eq!(
        assert_send(generic(&locker, 4.5)).await.unwrap(),
        "4.5@item:4.5"
    );
    assert_eq!(impl_trait_arg(&locker, "x").await.unwrap(), "item:x");
}

#[distributed_lock(key = "ledger:{id}", locker = locker)]
async fn outer(locker: &Locker, id: u32) -> Result<(u64, u64), AppError> {
    let fence = distlock::current().unwrap().fencing_token();
    let inner = inner(locker, id).await?;
    Ok((fence, inner))
}

#[distributed_lock(key = "ledger:{id}", locker = locker, timeout = "2s")]
async fn inner(locker: &Locker, id: u32) -> Result<u64, AppError> {
    Ok(distlock::current().unwrap().fencing_token())
}

#[tokio::test]
async fn nested_calls_on_the_same_key_are_reentrant() {
    let server = RedisServer::start().await;
    let locker = connect(&server).await;
    let (outer_fence, inner_fence) = timeout(Duration::from_secs(5), outer(&locker, 1))
        .await
        .expect("nested call deadlocked")
        .unwrap();
    // The inner call ran under the outer call's lease.
    assert_eq!(outer_fence, inner_fence);
}

// ---------------------------------------------------------------------------
// Stacking with other attributes, and the `crate` override

#[distributed_lock(key = "tokio-test", locker = Locker::memory())]
#[tokio::test]
async fn stacked_on_tokio_test() -> Result<(), AppError> {
    assert_eq!(distlock::current().unwrap().key(), "tokio-test");
    Ok(())
}

#[tokio::test]
#[distributed_lock(key = "tokio-test-first", locker = Locker::memory())]
async fn under_tokio_test() -> Result<(), AppError> {
    assert_eq!(distlock::current().unwrap().key(), "tokio-test-first");
    Ok(())
}

#[tracing::instrument(skip(locker))]
#[distributed_lock(key = "traced:{id}", locker = locker)]
async fn instrumented_outside(locker: &Locker, id: u32) -> Result<String, AppError> {
    Ok(distlock::current().unwrap().key().to_owned())
}

#[distributed_lock(key = "traced:{id}", locker = locker)]
#[tracing::instrument(skip(locker), err(Debug))]
async fn instrumented_inside(locker: &Locker, id: u32) -> Result<String, AppError> {
    Ok(distlock::current().unwrap().key().to_owned())
}

use distlock as renamed;

#[distributed_lock(key = "renamed", locker = locker, crate = "renamed")]
async fn through_renamed_crate(locker: &Locker) -> Result<bool, AppError> {
    Ok(renamed::current().is_some())
}

#[tokio::test]
async fn stacks_with_tracing_instrument_in_either_order_and_a_renamed_crate() {
    let server = RedisServer::start().await;
    let locker = connect(&server).await;
    let a = assert_send(instrumented_outside(&locker, 1)).await.unwrap();
    let b = assert_send(instrumented_inside(&locker, 2)).await.unwrap();
    assert_eq!((a.as_str(), b.as_str()), ("traced:1", "traced:2"));
    assert!(through_renamed_crate(&locker).await.unwrap());
}

#[tokio::test]
async fn invalid_key_values_fail_at_run_time_in_the_error_type() {
    // A placeholder value that makes an invalid key ("{" delimits hash tags).
    let server = RedisServer::start().await;
    let locker = connect(&server).await;
    let err = impl_trait_arg(&locker, "{x}").await.unwrap_err();
    assert!(
        matches!(err.lock(), distlock::Error::InvalidKey { .. }),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------
// An axum handler, served over HTTP

mod http {
    use std::sync::Arc;
    use std::time::Duration;

    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use axum::Router;
    use distlock::{distributed_lock, Locker};
    use distlock_tests::RedisServer;
    use tokio::net::TcpListener;

    use super::Trace;

    #[derive(Clone)]
    struct AppState {
        locker: Locker,
        trace: Arc<Trace>,
    }

    /// Lock errors become HTTP responses.
    struct ApiError(distlock::Error);

    impl From<distlock::Error> for ApiError {
        fn from(e: distlock::Error) -> Self {
            ApiError(e)
        }
    }

    impl IntoResponse for ApiError {
        fn into_response(self) -> Response {
            let status = if self.0.is_timeout() || self.0.is_busy() {
                StatusCode::CONFLICT
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, self.0.to_string()).into_response()
        }
    }

    /// Debits an account: one request per account at a time, across replicas.
    #[distributed_lock(key = "account:{id}", locker = locker, timeout = "10s")]
    async fn debit(
        State(AppState { locker, trace }): State<AppState>,
        Path((id, request)): Path<(u64, u32)>,
    ) -> Result<String, ApiError> {
        trace
            .visit(&request.to_string(), Duration::from_millis(50))
            .await;
        let fence = distlock::current().map(|c| c.fencing_token());
        Ok(format!("debited {id} (fence {fence:?})"))
    }

    #[tokio::test]
    async fn axum_handler_serves_same_key_requests_one_at_a_time() {
        let server = RedisServer::start().await;
        let trace = Arc::new(Trace::default());
        // Two replicas of the service, each with its own Locker, behind one port
        // each: same-key requests must serialize across both.
        let mut addrs = Vec::new();
        let mut serving = Vec::new();
        for _ in 0..2 {
            let state = AppState {
                locker: Locker::connect(&server.url()).await.unwrap(),
                trace: trace.clone(),
            };
            let app = Router::new()
                .route("/accounts/{id}/debit/{request}", post(debit))
                .with_state(state);
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(listener.local_addr().unwrap());
            serving.push(tokio::spawn(
                async move { axum::serve(listener, app).await },
            ));
        }

        let client = reqwest::Client::new();
        let requests = (0..6u32).map(|n| {
            let url = format!("http://{}/accounts/7/debit/{n}", addrs[n as usize % 2]);
            let client = client.clone();
            async move {
                let response = client.post(url).send().await.unwrap();
                (response.status(), response.text().await.unwrap())
            }
        });
        let responses = tokio::time::timeout(
            Duration::from_secs(20),
            futures_util::future::join_all(requests),
        )
        .await
        .expect("requests did not complete");
        for (status, body) in &responses {
            assert_eq!(*status, reqwest::StatusCode::OK, "{body}");
            assert!(body.starts_with("debited 7 (fence Some("), "{body}");
        }
        assert_eq!(trace.events.lock().unwrap().len(), 12);
        assert_eq!(trace.max_inside(), 1);
        assert!(trace.strictly_one_at_a_time(), "{:?}", trace.events);
        for task in serving {
            task.abort();
        }
    }
}
