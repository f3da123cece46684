//! What the `metrics` feature records: acquisitions, waits, holds and losses
//! labelled by a low-cardinality name (a lock's `name`, the macro's key
//! template, a tower layer's name), never by key; and the per-locker gauges
//! of held leases and waiting tasks. On one Redis and in memory.
//!
//! One recorder serves the whole binary (a process has one), so each test
//! uses names of its own and reads only those.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use distlock::Locker;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};

mod common;
use common::{eventually, Fixture};

/// Each check on one Redis and in memory; the second argument makes its
/// names unique.
macro_rules! on_redis_and_memory {
    ($($name:ident => $check:ident;)*) => {
        mod on_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$check(
                        $crate::common::Fixture::redis().await,
                        concat!(stringify!($name), "-redis"),
                    )
                    .await;
                }
            )*
        }
        mod on_memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$check(
                        $crate::common::Fixture::memory(),
                        concat!(stringify!($name), "-memory"),
                    )
                    .await;
                }
            )*
        }
    };
}

on_redis_and_memory! {
    acquisitions_waits_holds_and_losses_carry_the_lock_name => check_named;
    the_macro_names_its_lock_after_the_key_template => check_macro;
    a_tower_layer_names_its_locks => check_layer;
    held_leases_are_a_gauge_per_locker => check_held;
    waiting_tasks_are_a_gauge_per_locker_and_leave_it_when_cancelled => check_waiting;
}

/// A recorder whose values can be read without resetting them (tests of
/// this binary run at once), on metrics-util's registry.
struct Reading(Arc<Registry<Key, AtomicStorage>>);

impl Recorder for Reading {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0
            .get_or_create_counter(key, |c| Counter::from_arc(Arc::clone(c)))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.0
            .get_or_create_gauge(key, |g| Gauge::from_arc(Arc::clone(g)))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.0
            .get_or_create_histogram(key, |h| Histogram::from_arc(Arc::clone(h)))
    }
}

fn registry() -> &'static Registry<Key, AtomicStorage> {
    static REGISTRY: OnceLock<Arc<Registry<Key, AtomicStorage>>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let registry = Arc::new(Registry::atomic());
        metrics::set_global_recorder(Reading(Arc::clone(&registry)))
            .expect("the only recorder of this binary");
        registry
    })
}

fn has_label(key: &Key, label: &str, value: &str) -> bool {
    key.labels().any(|l| l.key() == label && l.value() == value)
}

/// The counter `metric{name}`, summed over its other labels.
fn counter(metric: &str, name: &str) -> u64 {
    registry()
        .get_counter_handles()
        .into_iter()
        .filter(|(k, _)| k.name() == metric && has_label(k, "name", name))
        .map(|(_, c)| c.load(Ordering::SeqCst))
        .sum()
}

/// The label sets of the counter `metric{name}`.
fn counter_labels(metric: &str, name: &str) -> Vec<Vec<(String, String)>> {
    registry()
        .get_counter_handles()
        .into_keys()
        .filter(|k| k.name() == metric && has_label(k, "name", name))
        .map(|k| {
            k.labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect()
        })
        .collect()
}

/// How many values the histogram `metric{name}` holds.
fn histogram_len(metric: &str, name: &str) -> usize {
    registry()
        .get_histogram_handles()
        .into_iter()
        .filter(|(k, _)| k.name() == metric && has_label(k, "name", name))
        .map(|(_, h)| h.data().len())
        .sum()
}

/// The gauge `metric{locker}`, 0 if never set.
fn gauge(metric: &str, locker: &str) -> f64 {
    registry()
        .get_gauge_handles()
        .into_iter()
        .filter(|(k, _)| k.name() == metric && has_label(k, "locker", locker))
        .map(|(_, g)| f64::from_bits(g.load(Ordering::SeqCst)))
        .sum()
}

/// No series of any metric carries `text` in a label value.
fn no_label_contains(text: &str) {
    let r = registry();
    let keys = r
        .get_counter_handles()
        .into_keys()
        .chain(r.get_gauge_handles().into_keys())
        .chain(r.get_histogram_handles().into_keys());
    for key in keys {
        for l in key.labels() {
            assert!(
                !l.value().contains(text),
                "{} has the label {}={}",
                key.name(),
                l.key(),
                l.value()
            );
        }
    }
}

async fn check_named(fx: Fixture, tag: &str) {
    registry();
    let locker = fx
        .builder()
        .name(tag)
        .expiry(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let key = format!("{tag}:42");
    let lock = locker.lock(key.clone()).name(tag);
    let guard = lock.acquire().await.unwrap();
    // A try that finds it held, and a waiter that gets it after the release.
    assert!(lock.try_acquire().await.unwrap().is_none());
    let waiter = tokio::spawn({
        let lock = lock.clone();
        async move { lock.acquire_timeout(Duration::from_secs(5)).await }
    });
    eventually(Duration::from_secs(2), || async {
        gauge("distlock_waiting_tasks", tag) == 1.0
    })
    .await;
    guard.release().await.unwrap();
    let second = waiter.await.unwrap().unwrap();
    assert_eq!(counter("distlock_acquired_total", tag), 2);
    assert_eq!(counter("distlock_acquire_failed_total", tag), 1);
    assert_eq!(histogram_len("distlock_wait_seconds", tag), 2);
    assert_eq!(histogram_len("distlock_hold_seconds", tag), 1);
    let failed = counter_labels("distlock_acquire_failed_total", tag);
    assert!(
        failed[0].contains(&("reason".into(), "busy".into())),
        "{failed:?}"
    );
    // An operator removes the key: the loss is counted under the name.
    assert!(locker.force_unlock(&key).await.unwrap());
    tokio::time::timeout(Duration::from_secs(3), second.lost())
        .await
        .expect("the lost signal");
    eventually(Duration::from_secs(2), || async {
        counter("distlock_lost_total", tag) == 1
    })
    .await;
    // A lock without a name counts as `unnamed`, never under its key.
    let before = counter("distlock_acquired_total", "unnamed");
    let g = locker.lock(format!("{tag}:7")).acquire().await.unwrap();
    g.release().await.unwrap();
    assert!(counter("distlock_acquired_total", "unnamed") > before);
    no_label_contains(&format!("{tag}:"));
}

async fn check_macro(fx: Fixture, tag: &str) {
    registry();
    let locker = fx.locker().await;

    #[distlock::distributed_lock(key = "report:{id}", locker = locker, timeout = "5s")]
    async fn rebuild(locker: &Locker, id: u32) -> Result<u32, distlock::Error> {
        let _ = locker;
        Ok(id)
    }

    // Other tests of this binary may run the same function: count the change.
    let before = counter("distlock_acquired_total", "report:{id}");
    for id in 0..3 {
        assert_eq!(rebuild(&locker, id).await.unwrap(), id);
    }
    assert!(counter("distlock_acquired_total", "report:{id}") >= before + 3);
    no_label_contains("report:1");
    let _ = tag;
}

async fn check_layer(fx: Fixture, tag: &str) {
    use tower::{service_fn, Layer, ServiceExt};

    registry();
    let locker = fx.locker().await;
    let route = format!("POST /accounts/:id/transfer ({tag})");
    let layer = distlock_tower::LockLayer::new(locker, |req: &http::Request<()>| {
        Some(format!(
            "account:{}",
            req.uri().path().trim_start_matches('/')
        ))
    })
    .name(route.clone());
    let service = layer.layer(service_fn(|_req: http::Request<()>| async {
        Ok::<_, std::convert::Infallible>("done")
    }));
    for id in ["a1", "a2"] {
        let req = http::Request::builder()
            .uri(format!("/{id}"))
            .body(())
            .unwrap();
        assert_eq!(service.clone().oneshot(req).await.unwrap(), "done");
    }
    assert_eq!(counter("distlock_acquired_total", &route), 2);
    assert_eq!(histogram_len("distlock_hold_seconds", &route), 2);
    no_label_contains("account:a1");
}

async fn check_held(fx: Fixture, tag: &str) {
    registry();
    let a = fx
        .builder()
        .name(format!("{tag}-a"))
        .expiry(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let b = fx.builder().name(format!("{tag}-b")).build().await.unwrap();
    let held_a = || gauge("distlock_held_leases", &format!("{tag}-a"));
    let held_b = || gauge("distlock_held_leases", &format!("{tag}-b"));
    let mut guards = Vec::new();
    for i in 0..3 {
        guards.push(a.lock(format!("{tag}:{i}")).acquire().await.unwrap());
    }
    let other = b
        .semaphore(format!("{tag}:sem"), 2)
        .acquire()
        .await
        .unwrap();
    assert_eq!(held_a(), 3.0);
    assert_eq!(held_b(), 1.0);
    guards.pop().unwrap().release().await.unwrap();
    assert_eq!(held_a(), 2.0);
    // A dropped guard is released in the background; a lost lease leaves too.
    drop(guards.pop());
    assert!(a.force_unlock(&format!("{tag}:0")).await.unwrap());
    eventually(Duration::from_secs(3), || async { held_a() == 0.0 }).await;
    assert!(guards.pop().unwrap().is_lost());
    other.release().await.unwrap();
    assert_eq!(held_b(), 0.0);
    // Closing releases the rest.
    let _kept = a.lock(format!("{tag}:3")).acquire().await.unwrap();
    assert_eq!(held_a(), 1.0);
    a.close().await.unwrap();
    assert_eq!(held_a(), 0.0);
}

async fn check_waiting(fx: Fixture, tag: &str) {
    registry();
    // Names are at most 64 bytes: the backend is enough here.
    let name = format!("waiting-{}", tag.rsplit('-').next().unwrap());
    let locker = fx.builder().name(name.clone()).build().await.unwrap();
    let waiting = || gauge("distlock_waiting_tasks", &name);
    let key = format!("{tag}:hot");
    let guard = locker.lock(key.clone()).acquire().await.unwrap();
    let waiters: Vec<_> = (0..4)
        .map(|_| {
            let lock = locker.lock(key.clone());
            tokio::spawn(async move {
                let g = lock.acquire_timeout(Duration::from_secs(10)).await?;
                g.release().await
            })
        })
        .collect();
    eventually(Duration::from_secs(2), || async { waiting() == 4.0 }).await;
    // A waiter cancelled where it stands leaves the gauge at once.
    waiters[3].abort();
    eventually(Duration::from_secs(2), || async { waiting() == 3.0 }).await;
    guard.release().await.unwrap();
    for w in waiters.into_iter().take(3) {
        w.await.unwrap().unwrap();
    }
    assert_eq!(waiting(), 0.0);
}
