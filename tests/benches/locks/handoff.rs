//! P10: one hot lock, handed over between replicas. Two lockers (replicas)
//! of 8 tasks each take one key, hold it 1 ms and think 2 ms, as users write
//! it (`locker.lock(key).acquire()` on a fresh `Lock`, then `release()`), with
//! and without `Lock::fair`, interleaved round by round. Per arm: how much of
//! the time the lock is held (utilization), how long a handover from one
//! replica to the other takes (release sent → the other replica holds), in
//! round trips of a `PING` measured in the same round, and how evenly the 16
//! tasks share the lock (Jain's index). The same through `distlock-tower`'s
//! layer (two layers, one per replica, 8 clients each, the handler holding
//! 1 ms). Then one task uncontended, fair against not, as the README calls it
//! (`acquire_timeout` on a fresh `Lock`).

use std::time::Duration;

use distlock::Locker;
use serde_json::json;
use tokio::time::Instant;

use crate::measure::{
    fmt_rate, median, paired_ratios, percentile, range, rotation, sequential_rate,
};
use crate::probe;
use crate::report::{Row, Status};
use crate::Env;

const TASKS: usize = 8;
const HOLD: Duration = Duration::from_millis(1);
const THINK: Duration = Duration::from_millis(2);
const KEY: &str = "p10:hot";

/// One critical section: which replica, when it began, when its release was sent.
struct Section {
    replica: usize,
    held: Instant,
    released: Instant,
}

/// What one arm measured in one round.
struct Round {
    utilization: f64,
    handovers: Vec<Duration>,
    jain: f64,
    rtt: Duration,
}

async fn contended(lockers: &[Locker; 2], fair: bool, d: Duration) -> Round {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (replica, locker) in lockers.iter().enumerate() {
        for _ in 0..TASKS {
            let locker = locker.clone();
            tasks.push(tokio::spawn(async move {
                let mut sections = Vec::new();
                while start.elapsed() < d {
                    let guard = locker
                        .lock(KEY)
                        .fair(fair)
                        .acquire()
                        .await
                        .expect("acquire");
                    let held = Instant::now();
                    tokio::time::sleep(HOLD).await;
                    let released = Instant::now();
                    guard.release().await.expect("release");
                    sections.push(Section {
                        replica,
                        held,
                        released,
                    });
                    tokio::time::sleep(THINK).await;
                }
                sections
            }));
        }
    }
    let mut all = Vec::new();
    let mut counts = Vec::new();
    for t in tasks {
        let sections = t.await.expect("task");
        counts.push(sections.len() as f64);
        all.extend(sections);
    }
    let wall = start.elapsed();
    all.sort_by_key(|s| s.held);
    let busy: Duration = all.iter().map(|s| s.released - s.held).sum();
    let handovers = all
        .windows(2)
        .filter(|w| w[0].replica != w[1].replica)
        .map(|w| w[1].held.saturating_duration_since(w[0].released))
        .collect();
    let sum: f64 = counts.iter().sum();
    let squares: f64 = counts.iter().map(|c| c * c).sum();
    Round {
        utilization: busy.as_secs_f64() / wall.as_secs_f64(),
        handovers,
        jain: if squares > 0.0 {
            sum * sum / (counts.len() as f64 * squares)
        } else {
            0.0
        },
        rtt: Duration::ZERO,
    }
}

/// A request of the tower arm (all lock the one hot key).
#[derive(Clone)]
struct Req;

impl distlock_tower::LockRequest for Req {}

/// The same workload through `LockLayer` (one per replica), the handler
/// recording when it ran: how much of the time the lock is held.
async fn through_tower(lockers: &[Locker; 2], fair: bool, d: Duration) -> f64 {
    use tower::{service_fn, Layer, ServiceExt};

    let sections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for locker in lockers {
        let sections = sections.clone();
        let handler = service_fn(move |_: Req| {
            let sections = sections.clone();
            async move {
                let held = Instant::now();
                tokio::time::sleep(HOLD).await;
                sections
                    .lock()
                    .expect("sections")
                    .push(Instant::now() - held);
                Ok::<_, distlock::Error>(())
            }
        });
        let key = |_: &Req| Some(KEY.to_owned());
        let svc = distlock_tower::LockLayer::new(locker.clone(), key)
            .fair(fair)
            .layer(handler);
        for _ in 0..TASKS {
            let svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                while start.elapsed() < d {
                    svc.clone().oneshot(Req).await.expect("request");
                    tokio::time::sleep(THINK).await;
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("task");
    }
    let wall = start.elapsed();
    let busy: Duration = sections.lock().expect("sections").iter().sum();
    busy.as_secs_f64() / wall.as_secs_f64()
}

/// The median of 200 `PING`s.
async fn rtt(env: &Env) -> Duration {
    let mut conn = env.server_conn().await;
    let mut samples = Vec::new();
    for _ in 0..200 {
        samples.push(probe::ping(&mut conn).await);
    }
    percentile(&samples, 50.0)
}

/// Pairs per second of one task, uncontended, as the README calls it.
async fn sequential(locker: &Locker, fair: bool, d: Duration) -> f64 {
    let locker = locker.clone();
    sequential_rate(d, move |n| {
        let locker = locker.clone();
        async move {
            let g = locker
                .lock(format!("p10:solo:{}", n % 64))
                .fair(fair)
                .acquire_timeout(Duration::from_secs(5))
                .await
                .expect("acquire");
            g.release().await.expect("release");
        }
    })
    .await
}

/// P10: the hot lock with and without `fair`, interleaved.
pub(crate) async fn p10(env: &Env) -> Vec<Row> {
    let lockers = [env.locker().await, env.locker().await];
    let d = env.cfg.p1_time * 3;
    let rounds = env.cfg.long_rounds.max(3);
    let mut arms: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
    contended(&lockers, true, Duration::from_millis(300)).await;
    contended(&lockers, false, Duration::from_millis(300)).await;
    for round in 0..rounds {
        for arm in rotation(2, round) {
            let rtt = rtt(env).await;
            let mut r = contended(&lockers, arm == 1, d).await;
            r.rtt = rtt;
            arms[arm].push(r);
        }
    }
    let mut rows = Vec::new();
    let mut summary = Vec::new();
    for (arm, name) in [(0, "default"), (1, "fair")] {
        let rs = &arms[arm];
        let util: Vec<f64> = rs.iter().map(|r| r.utilization * 100.0).collect();
        let jain: Vec<f64> = rs.iter().map(|r| r.jain).collect();
        let p50_rtts: Vec<f64> = rs
            .iter()
            .map(|r| percentile(&r.handovers, 50.0).as_secs_f64() / r.rtt.as_secs_f64().max(1e-9))
            .collect();
        let p99: Vec<f64> = rs
            .iter()
            .map(|r| percentile(&r.handovers, 99.0).as_secs_f64() * 1000.0)
            .collect();
        let spread = |v: &[f64]| {
            let (min, max) = range(v);
            format!("{min:.2}–{max:.2}")
        };
        summary.push((
            median(&util),
            median(&p50_rtts),
            median(&p99),
            median(&jain),
        ));
        rows.push(Row {
            id: "P10",
            scenario: format!(
                "one hot key, 2 lockers × {TASKS} tasks, hold 1 ms, think 2 ms ({name})"
            ),
            figure: format!(
                "held {:.0} % of the time; handover p50 {:.2} RTT, p99 {:.2} ms; Jain {:.3}",
                median(&util),
                median(&p50_rtts),
                median(&p99),
                median(&jain)
            ),
            baseline: format!(
                "PING p50 {:.0} µs",
                median(
                    &rs.iter()
                        .map(|r| r.rtt.as_secs_f64() * 1e6)
                        .collect::<Vec<_>>()
                )
            ),
            ratio: format!(
                "rounds: held {} %, p50 {} RTT, Jain {}",
                spread(&util),
                spread(&p50_rtts),
                spread(&jain)
            ),
            target: "held ≥ 85 %; p50 ≤ 2 RTT; p99 ≤ 5 ms; Jain ≥ 0.95".into(),
            status: Status::of(
                median(&util) >= 85.0
                    && median(&p50_rtts) <= 2.0
                    && median(&p99) <= 5.0
                    && median(&jain) >= 0.95,
            ),
            data: json!({
                "arm": name,
                "rounds": rounds,
                "seconds_per_arm": d.as_secs_f64(),
                "utilization_pct": util,
                "handover_p50_rtt": p50_rtts,
                "handover_p99_ms": p99,
                "jain": jain,
            }),
        });
    }

    // Through the tower layer, interleaved.
    let mut tower: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for arm in rotation(2, round) {
            tower[arm].push(through_tower(&lockers, arm == 1, d).await * 100.0);
        }
    }
    for (arm, name) in [(0, "default"), (1, "fair")] {
        let util = &tower[arm];
        let (min, max) = range(util);
        rows.push(Row {
            id: "P10",
            scenario: format!(
                "tower layer, one hot key, 2 layers × {TASKS} clients, handler 1 ms, think 2 ms ({name})"
            ),
            figure: format!("held {:.0} % of the time", median(util)),
            baseline: "wall time of the round".into(),
            ratio: format!("rounds {min:.1}–{max:.1} %"),
            target: "held ≥ 75 %".into(),
            status: Status::of(median(util) >= 75.0),
            data: json!({ "arm": name, "rounds": rounds, "utilization_pct": util }),
        });
    }

    // Uncontended, fair against default, interleaved.
    let (mut plain, mut fair) = (Vec::new(), Vec::new());
    sequential(&lockers[0], true, Duration::from_millis(200)).await;
    for round in 0..env.cfg.rounds {
        for arm in rotation(2, round) {
            let rate = sequential(&lockers[0], arm == 1, env.cfg.p1_time).await;
            if arm == 1 {
                fair.push(rate);
            } else {
                plain.push(rate);
            }
        }
    }
    let ratios = paired_ratios(&plain, &fair);
    let ratio = median(&ratios);
    let (min, max) = range(&ratios);
    rows.push(Row {
        id: "P10",
        scenario: "one task, uncontended acquire_timeout + release on a fresh Lock (fair)".into(),
        figure: format!("{} pairs/s", fmt_rate(median(&fair))),
        baseline: format!("default {} pairs/s", fmt_rate(median(&plain))),
        ratio: format!("{ratio:.3} × default time (rounds {min:.3}–{max:.3})"),
        target: "≤ 1.10 × default".into(),
        status: Status::of(ratio <= 1.10),
        data: json!({
            "rounds": env.cfg.rounds,
            "default_per_s": plain,
            "fair_per_s": fair,
            "fair_time_over_default": ratios,
        }),
    });
    for l in lockers {
        l.close().await.expect("close");
    }
    rows
}
