//! P5 and P6: `distlock-tower`'s `LockLayer` in process (no HTTP), 32 concurrent
//! requests to a trivial handler, on one hot key (P5) or on distinct keys (P6).

use std::convert::Infallible;
use std::time::Duration;

use distlock_tower::{LockLayer, LockRequest};
use redis::aio::MultiplexedConnection;
use serde_json::json;
use tokio::time::Instant;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

use crate::measure::{fmt_rate, median, paired_ratios, rotation};
use crate::report::{Row, Status};
use crate::throughput::{distlock_sequential, floor_sequential};
use crate::{floor, Env};

/// How many requests are in flight at once.
const CONCURRENT: usize = 32;

/// A request: just the key it locks.
#[derive(Debug, Clone)]
struct Req(String);

impl LockRequest for Req {}

/// The trivial handler.
async fn handler(_: Req) -> Result<(), Infallible> {
    Ok(())
}

/// `CONCURRENT` tasks, task `i` sending requests for `key(i)` back to back to its
/// clone of `svc` for `d`: requests per second.
async fn drive<S>(svc: S, d: Duration, key: fn(usize) -> String) -> f64
where
    S: Service<Req, Response = ()> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    let deadline = start + d;
    let handles: Vec<_> = (0..CONCURRENT)
        .map(|i| {
            let svc = svc.clone();
            let key = key(i);
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    svc.clone()
                        .oneshot(Req(key.clone()))
                        .await
                        .expect("request");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h.await.expect("task");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// The handler behind `LockLayer`, locking each request on its key.
fn layered(
    locker: &distlock::Locker,
) -> impl Service<Req, Response = (), Error = distlock::BoxError, Future: Send> + Clone + Send + 'static
{
    ServiceBuilder::new()
        .layer(LockLayer::new(locker.clone(), |r: &Req| Some(r.0.clone())))
        .service(service_fn(handler))
}

/// The same handler with the floor's two round trips done by hand around it.
fn by_hand(
    conn: &MultiplexedConnection,
) -> impl Service<Req, Response = (), Error = Infallible, Future: Send> + Clone + Send + 'static {
    let conn = conn.clone();
    service_fn(move |req: Req| {
        let mut conn = conn.clone();
        async move {
            let token = floor::token(0, fastrand_u64());
            assert!(
                floor::acquire(&mut conn, &req.0, &token).await,
                "floor key held"
            );
            let out = handler(req.clone()).await;
            floor::release(&mut conn, &req.0, &token).await;
            out
        }
    })
}

/// A cheap unique-enough token suffix for the by-hand service.
fn fastrand_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn hot_key(_: usize) -> String {
    "p5:hot".into()
}

fn distinct_key(i: usize) -> String {
    format!("p6:{i}")
}

fn floor_key(i: usize) -> String {
    format!("p6:floor:{i}")
}

/// P5: one hot key through the layer, against the P1 pair rates.
pub(crate) async fn p5(env: &Env) -> Vec<Row> {
    let conn = env.server_conn().await;
    let locker = env.locker().await;
    let svc = layered(&locker);
    drive(svc.clone(), Duration::from_millis(200), hot_key).await;
    let (mut tw, mut fl, mut dl) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..env.cfg.long_rounds {
        for arm in rotation(3, round) {
            match arm {
                0 => tw.push(drive(svc.clone(), env.cfg.long_time, hot_key).await),
                1 => fl.push(floor_sequential(&conn, "p5:floor", env.cfg.p1_time).await),
                _ => dl.push(distlock_sequential(&locker, "p5:seq", env.cfg.p1_time).await),
            }
        }
    }
    locker.close().await.expect("close");
    let vs_floor = median(&paired_ratios(&tw, &fl));
    let vs_own = median(&paired_ratios(&tw, &dl));
    vec![Row {
        id: "P5",
        scenario: format!(
            "tower layer, {CONCURRENT} concurrent requests on one hot key, {} s",
            env.cfg.long_time.as_secs()
        ),
        figure: format!("{} requests/s", fmt_rate(median(&tw))),
        baseline: format!("floor P1 {} pairs/s", fmt_rate(median(&fl))),
        ratio: format!(
            "{:.0} % of floor pair rate ({:.0} % of distlock's own P1 rate)",
            vs_floor * 100.0,
            vs_own * 100.0
        ),
        target: "≥ 40 %".into(),
        status: Status::of(vs_floor >= 0.40),
        data: json!({
            "concurrent": CONCURRENT, "seconds": env.cfg.long_time.as_secs_f64(),
            "layer_requests_per_s": tw, "floor_p1_pairs_per_s": fl, "distlock_p1_pairs_per_s": dl,
            "over_floor_pair_rate": vs_floor, "over_distlock_p1_rate": vs_own,
        }),
    }]
}

/// P6: distinct keys through the layer, against the same handler with the
/// floor's round trips by hand.
pub(crate) async fn p6(env: &Env) -> Vec<Row> {
    let conn = env.server_conn().await;
    let locker = env.locker().await;
    let svc = layered(&locker);
    let hand = by_hand(&conn);
    drive(svc.clone(), Duration::from_millis(200), distinct_key).await;
    drive(hand.clone(), Duration::from_millis(200), floor_key).await;
    let (mut tw, mut fl) = (Vec::new(), Vec::new());
    for round in 0..env.cfg.long_rounds {
        for arm in rotation(2, round) {
            match arm {
                0 => tw.push(drive(svc.clone(), env.cfg.long_time, distinct_key).await),
                _ => fl.push(drive(hand.clone(), env.cfg.long_time, floor_key).await),
            }
        }
    }
    locker.close().await.expect("close");
    let ratio = median(&paired_ratios(&tw, &fl));
    vec![Row {
        id: "P6",
        scenario: format!(
            "tower layer, {CONCURRENT} concurrent requests on distinct keys, {} s",
            env.cfg.long_time.as_secs()
        ),
        figure: format!("{} requests/s", fmt_rate(median(&tw))),
        baseline: format!("floor by hand {} requests/s", fmt_rate(median(&fl))),
        ratio: format!("{:.0} % of by hand", ratio * 100.0),
        target: "≥ 70 %".into(),
        status: Status::of(ratio >= 0.70),
        data: json!({
            "concurrent": CONCURRENT, "seconds": env.cfg.long_time.as_secs_f64(),
            "layer_requests_per_s": tw, "by_hand_requests_per_s": fl, "ratio": ratio,
        }),
    }]
}
