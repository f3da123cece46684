//! P1, P2, P4: acquire/release throughput, uncontended, contended on one key,
//! and across many keys; each against the floor and (P1, P2) rslock.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use distlock::Locker;
use redis::aio::MultiplexedConnection;
use serde_json::json;
use tokio::time::Instant;

use crate::measure::{fmt_rate, median, paired_ratios, range, rotation, sequential_rate};
use crate::probe::{server_cpu, CommandStats};
use crate::report::{Row, Status};
use crate::{floor, Env};

/// rslock's lease expiry in the bench.
const RSLOCK_TTL: Duration = Duration::from_secs(30);

/// The timeout of the README's `acquire_timeout` call.
const README_TIMEOUT: Duration = Duration::from_secs(5);

/// One sequential loop of floor pairs on `conn`, for `d`: pairs per second.
pub(crate) async fn floor_sequential(conn: &MultiplexedConnection, key: &str, d: Duration) -> f64 {
    let conn = conn.clone();
    let key = key.to_owned();
    sequential_rate(d, move |n| {
        let mut conn = conn.clone();
        let key = key.clone();
        async move {
            assert!(floor::pair(&mut conn, &key, &floor::token(0, n)).await);
        }
    })
    .await
}

/// One sequential loop of distlock acquire+release pairs in the README's
/// call pattern: a fresh `Lock` each time, `acquire_timeout`, `release`.
pub(crate) async fn distlock_sequential(locker: &Locker, key: &str, d: Duration) -> f64 {
    let locker = locker.clone();
    let key = key.to_owned();
    sequential_rate(d, move |_| {
        let locker = locker.clone();
        let key = key.clone();
        async move {
            let guard = locker
                .lock(key.as_str())
                .acquire_timeout(README_TIMEOUT)
                .await
                .expect("distlock acquire");
            guard.release().await.expect("distlock release");
        }
    })
    .await
}

/// The same with one `Lock` kept and reused (its Redis names built once).
async fn distlock_reused(locker: &Locker, key: &str, d: Duration) -> f64 {
    let lock = locker.lock(key);
    sequential_rate(d, move |_| {
        let lock = lock.clone();
        async move {
            let guard = lock.acquire().await.expect("distlock acquire");
            guard.release().await.expect("distlock release");
        }
    })
    .await
}

/// One sequential loop of rslock lock+unlock pairs, for `d`.
async fn rslock_sequential(manager: &rslock::LockManager, key: &str, d: Duration) -> f64 {
    let manager = manager.clone();
    let key = key.to_owned();
    sequential_rate(d, move |_| {
        let manager = manager.clone();
        let key = key.clone();
        async move {
            let lock = manager
                .lock(key.as_str(), RSLOCK_TTL)
                .await
                .expect("rslock lock (uncontended)");
            manager.unlock(&lock).await;
        }
    })
    .await
}

/// One P1 arm alone (for profiling).
pub(crate) async fn p1_arm(env: &Env, arm: &str, d: Duration) -> f64 {
    match arm {
        "p1:floor" => floor_sequential(&env.server_conn().await, "p1:floor", d).await,
        "p1:distlock" => distlock_sequential(&env.locker().await, "p1:distlock", d).await,
        "p1:reused" => distlock_reused(&env.locker().await, "p1:reused", d).await,
        "p1:rslock" => {
            let manager = rslock::LockManager::new(vec![env.url.clone()]);
            rslock_sequential(&manager, "p1:rslock", d).await
        }
        other => panic!("unknown arm {other}: p1:floor, p1:distlock, p1:reused or p1:rslock"),
    }
}

/// What one P1 arm cost in one round: pairs per second, and per pair the
/// server's time in the commands the client sent, and its CPU time.
#[derive(Default)]
struct Arm {
    rate: Vec<f64>,
    command_us: Vec<f64>,
    cpu_us: Vec<f64>,
}

impl Arm {
    /// Runs `arm` for `d`, reading the server's counters around it: `sent`
    /// names the commands the client itself sends (see
    /// [`CommandStats::usec_since`]).
    async fn run<F: Future<Output = f64>>(
        &mut self,
        conn: &mut MultiplexedConnection,
        d: Duration,
        sent: &[&str],
        arm: F,
    ) {
        let (s0, c0) = (CommandStats::read(conn).await, server_cpu(conn).await);
        let rate = arm.await;
        let (s1, c1) = (CommandStats::read(conn).await, server_cpu(conn).await);
        let pairs = (rate * d.as_secs_f64()).max(1.0);
        self.rate.push(rate);
        self.command_us
            .push(s1.usec_since(&s0, sent) as f64 / pairs);
        self.cpu_us.push((c1 - c0) * 1e6 / pairs);
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "pairs_per_s": self.rate, "command_us_per_pair": self.command_us,
            "server_cpu_us_per_pair": self.cpu_us,
            "median": { "pairs_per_s": median(&self.rate), "command_us_per_pair": median(&self.command_us),
                        "server_cpu_us_per_pair": median(&self.cpu_us) },
        })
    }
}

/// The median of per-round ratios and their range, as text.
fn spread(ratios: &[f64]) -> String {
    let (lo, hi) = range(ratios);
    format!("{:.3} (rounds {lo:.2}-{hi:.2})", median(ratios))
}

/// P1: one task, sequential uncontended pairs, interleaved: the floor,
/// distlock as the README calls it, rslock, and distlock with one `Lock`
/// reused. Also the server's side of each: time in commands and CPU.
pub(crate) async fn p1(env: &Env) -> Vec<Row> {
    let mut conn = env.server_conn().await;
    let locker = env.locker().await;
    let manager = rslock::LockManager::new(vec![env.url.clone()]);
    // Warm up: connections, scripts loaded, allocator.
    let warm = Duration::from_millis(200);
    floor_sequential(&conn, "p1:floor", warm).await;
    distlock_sequential(&locker, "p1:distlock", warm).await;
    distlock_reused(&locker, "p1:reused", warm).await;
    rslock_sequential(&manager, "p1:rslock", warm).await;

    // What each arm sends itself: the floor and rslock `SET` and `EVALSHA`;
    // distlock two `EVALSHA`s.
    const PLAIN: &[&str] = &["set", "evalsha"];
    const DISTLOCK: &[&str] = &["evalsha"];
    let (mut fl, mut dl, mut rs, mut re) = Default::default();
    let (fl, dl, rs, re): (&mut Arm, &mut Arm, &mut Arm, &mut Arm) =
        (&mut fl, &mut dl, &mut rs, &mut re);
    for round in 0..env.cfg.rounds {
        for arm in rotation(4, round) {
            let d = env.cfg.p1_time;
            let floor_conn = conn.clone();
            match arm {
                0 => {
                    fl.run(
                        &mut conn,
                        d,
                        PLAIN,
                        floor_sequential(&floor_conn, "p1:floor", d),
                    )
                    .await
                }
                1 => {
                    dl.run(
                        &mut conn,
                        d,
                        DISTLOCK,
                        distlock_sequential(&locker, "p1:distlock", d),
                    )
                    .await
                }
                2 => {
                    rs.run(
                        &mut conn,
                        d,
                        PLAIN,
                        rslock_sequential(&manager, "p1:rslock", d),
                    )
                    .await
                }
                _ => {
                    re.run(
                        &mut conn,
                        d,
                        DISTLOCK,
                        distlock_reused(&locker, "p1:reused", d),
                    )
                    .await
                }
            }
        }
    }
    locker.close().await.expect("close");
    // Time per pair relative to the floor's: floor rate / distlock rate.
    let vs_floor = paired_ratios(&fl.rate, &dl.rate);
    let vs_rslock = paired_ratios(&dl.rate, &rs.rate);
    let reused_vs_floor = paired_ratios(&fl.rate, &re.rate);
    let command = paired_ratios(&dl.command_us, &fl.command_us);
    let cpu = paired_ratios(&dl.cpu_us, &fl.cpu_us);
    let data = json!({
        "rounds": env.cfg.rounds,
        "seconds_per_arm": env.cfg.p1_time.as_secs_f64(),
        "call_pattern": "locker.lock(key).acquire_timeout(5 s), then release()",
        "floor": fl.json(), "distlock": dl.json(), "rslock": rs.json(), "distlock_lock_reused": re.json(),
        "distlock_time_over_floor": vs_floor,
        "distlock_rate_over_rslock": vs_rslock,
        "reused_time_over_floor": reused_vs_floor,
        "command_time_over_floor": command,
        "server_cpu_over_floor": cpu,
    });
    let row = |scenario: &str,
               figure: String,
               baseline: String,
               ratio: String,
               target: &str,
               met: bool| Row {
        id: "P1",
        scenario: scenario.into(),
        figure,
        baseline,
        ratio,
        target: target.into(),
        status: Status::of(met),
        data: data.clone(),
    };
    vec![
        row(
            "one task, sequential uncontended pairs as the README calls them",
            format!("{} pairs/s", fmt_rate(median(&dl.rate))),
            format!("floor {} pairs/s", fmt_rate(median(&fl.rate))),
            format!("{} × floor time", spread(&vs_floor)),
            "≤ 1.10 × floor",
            median(&vs_floor) <= 1.10,
        ),
        row(
            "… against rslock lock+unlock",
            format!("{} pairs/s", fmt_rate(median(&dl.rate))),
            format!("rslock {} pairs/s", fmt_rate(median(&rs.rate))),
            format!("{} × rslock rate", spread(&vs_rslock)),
            "faster than rslock (> 1)",
            median(&vs_rslock) > 1.0,
        ),
        row(
            "… Redis time in the commands sent, per pair (INFO commandstats)",
            format!("{:.2} µs", median(&dl.command_us)),
            format!("floor {:.2} µs", median(&fl.command_us)),
            format!("{} × floor", spread(&command)),
            "≤ 1.15 × floor",
            median(&command) <= 1.15,
        ),
        row(
            "… Redis process CPU per pair (INFO cpu; for information)",
            format!("{:.1} µs", median(&dl.cpu_us)),
            format!("floor {:.1} µs", median(&fl.cpu_us)),
            format!("{} × floor", spread(&cpu)),
            "none",
            true,
        ),
        row(
            "… one Lock kept and reused (for information)",
            format!("{} pairs/s", fmt_rate(median(&re.rate))),
            format!("floor {} pairs/s", fmt_rate(median(&fl.rate))),
            format!("{} × floor time", spread(&reused_vs_floor)),
            "none",
            true,
        ),
    ]
}

/// Counts the acquisitions and handoffs of a contended run, and checks exclusion.
/// A handoff is an acquisition by another task than the previous holder: a
/// task that takes the lock again right after releasing it hands nothing off.
#[derive(Default)]
struct Contention {
    acquisitions: AtomicU64,
    handoffs: AtomicU64,
    last_owner: AtomicUsize,
    inside: AtomicBool,
    overlaps: AtomicU64,
}

impl Contention {
    fn enter(&self, task: usize) {
        if self.inside.swap(true, Ordering::SeqCst) {
            self.overlaps.fetch_add(1, Ordering::Relaxed);
        }
        if self.last_owner.swap(task, Ordering::Relaxed) != task {
            self.handoffs.fetch_add(1, Ordering::Relaxed);
        }
        self.acquisitions.fetch_add(1, Ordering::Relaxed);
    }
    fn leave(&self) {
        self.inside.store(false, Ordering::SeqCst);
    }

    /// Handoffs and acquisitions per second over `d`.
    fn rates(&self, d: Duration) -> (f64, f64) {
        let s = d.as_secs_f64();
        (
            self.handoffs.load(Ordering::Relaxed) as f64 / s,
            self.acquisitions.load(Ordering::Relaxed) as f64 / s,
        )
    }
}

/// P2 with distlock: `replicas` lockers × `tasks` tasks on one key, for `d`.
/// Returns (handoffs/s, acquisitions/s), each replica's acquisitions, and overlaps seen.
async fn distlock_contended(
    lockers: &[Locker],
    tasks: usize,
    d: Duration,
) -> ((f64, f64), Vec<u64>, u64) {
    let shared = Arc::new(Contention::default());
    let start = Instant::now();
    let deadline = start + d;
    let mut handles = Vec::new();
    for locker in lockers {
        let per_replica = Arc::new(AtomicU64::new(0));
        for _ in 0..tasks {
            let id = handles.len() + 1;
            let lock = locker.lock("p2:distlock");
            let shared = Arc::clone(&shared);
            let mine = Arc::clone(&per_replica);
            handles.push(tokio::spawn(async move {
                while let Ok(r) = tokio::time::timeout_at(deadline, lock.acquire()).await {
                    let guard = r.expect("distlock acquire");
                    shared.enter(id);
                    shared.leave();
                    mine.fetch_add(1, Ordering::Relaxed);
                    guard.release().await.expect("distlock release");
                }
                mine
            }));
        }
    }
    let mut shares = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        let mine = h.await.expect("task");
        if i % tasks == 0 {
            shares.push(Arc::clone(&mine));
        }
    }
    let shares = shares.iter().map(|s| s.load(Ordering::Relaxed)).collect();
    (
        shared.rates(d),
        shares,
        shared.overlaps.load(Ordering::Relaxed),
    )
}

/// P2 with rslock: `managers` × `tasks` tasks on one key, each retrying with
/// rslock's own policy (`acquire_no_guard` loops `lock`, which retries with a
/// random delay) until it succeeds.
async fn rslock_contended(
    managers: &[rslock::LockManager],
    tasks: usize,
    d: Duration,
    cleanup: &mut MultiplexedConnection,
) -> ((f64, f64), u64) {
    let shared = Arc::new(Contention::default());
    let deadline = Instant::now() + d;
    let mut handles = Vec::new();
    for manager in managers {
        for _ in 0..tasks {
            let id = handles.len() + 1;
            let manager = manager.clone();
            let shared = Arc::clone(&shared);
            handles.push(tokio::spawn(async move {
                while let Ok(r) = tokio::time::timeout_at(
                    deadline,
                    manager.acquire_no_guard("p2:rslock", RSLOCK_TTL),
                )
                .await
                {
                    let lock = r.expect("rslock acquire");
                    shared.enter(id);
                    shared.leave();
                    manager.unlock(&lock).await;
                }
            }));
        }
    }
    for h in handles {
        h.await.expect("task");
    }
    // A lock cut off by the deadline mid-attempt would stay until its TTL.
    let _: i64 = redis::cmd("DEL")
        .arg("p2:rslock")
        .query_async(cleanup)
        .await
        .expect("DEL");
    (shared.rates(d), shared.overlaps.load(Ordering::Relaxed))
}

/// P2: one key, 2 lockers × 8 tasks; against the P1 floor pair rate and rslock.
pub(crate) async fn p2(env: &Env) -> Vec<Row> {
    const REPLICAS: usize = 2;
    const TASKS: usize = 8;
    let mut conn = env.server_conn().await;
    let mut lockers = Vec::new();
    let mut managers = Vec::new();
    for _ in 0..REPLICAS {
        lockers.push(env.locker().await);
        managers.push(rslock::LockManager::new(vec![env.url.clone()]));
    }
    distlock_contended(&lockers, TASKS, Duration::from_millis(200)).await;
    floor_sequential(&conn, "p2:floor", Duration::from_millis(200)).await;

    let (mut dl, mut rs, mut fl) = (Vec::new(), Vec::new(), Vec::new());
    let (mut dl_acq, mut rs_acq, mut dl_seq) = (Vec::new(), Vec::new(), Vec::new());
    let mut shares = Vec::new();
    let mut overlaps = 0;
    for round in 0..env.cfg.long_rounds {
        for arm in rotation(4, round) {
            match arm {
                0 => {
                    let ((rate, acq), share, o) =
                        distlock_contended(&lockers, TASKS, env.cfg.long_time).await;
                    dl.push(rate);
                    dl_acq.push(acq);
                    shares.push(share);
                    overlaps += o;
                }
                1 => {
                    let ((rate, acq), o) =
                        rslock_contended(&managers, TASKS, env.cfg.long_time, &mut conn).await;
                    rs.push(rate);
                    rs_acq.push(acq);
                    overlaps += o;
                }
                2 => fl.push(floor_sequential(&conn, "p2:floor", env.cfg.p1_time).await),
                _ => dl_seq.push(distlock_sequential(&lockers[0], "p2:seq", env.cfg.p1_time).await),
            }
        }
    }
    for l in &lockers {
        l.close().await.expect("close");
    }
    let vs_floor = median(&paired_ratios(&dl, &fl));
    let vs_rslock = median(&paired_ratios(&dl, &rs));
    let vs_own = median(&paired_ratios(&dl, &dl_seq));
    let data = json!({
        "distlock_p1_pairs_per_s": dl_seq,
        "handoffs_over_distlock_p1_rate": vs_own,
        "replicas": REPLICAS, "tasks_per_replica": TASKS,
        "seconds": env.cfg.long_time.as_secs_f64(), "rounds": env.cfg.long_rounds,
        "distlock_handoffs_per_s": dl, "rslock_handoffs_per_s": rs,
        "distlock_acquisitions_per_s": dl_acq, "rslock_acquisitions_per_s": rs_acq,
        "floor_p1_pairs_per_s": fl, "distlock_handoffs_per_replica": shares,
        "overlaps": overlaps,
        "handoffs_over_floor_pair_rate": vs_floor, "handoffs_over_rslock": vs_rslock,
    });
    let sharing: Vec<String> = shares
        .iter()
        .map(|s: &Vec<u64>| {
            let total: u64 = s.iter().sum();
            let first = s.first().copied().unwrap_or(0);
            format!("{:.0} %", 100.0 * first as f64 / total.max(1) as f64)
        })
        .collect();
    vec![
        Row {
            id: "P2",
            scenario: format!(
                "one key, 2 lockers × 8 tasks, {} s (replica A's share: {}; overlaps: {overlaps})",
                env.cfg.long_time.as_secs(),
                sharing.join(", ")
            ),
            figure: format!(
                "{} handoffs/s ({} acquisitions/s)",
                fmt_rate(median(&dl)),
                fmt_rate(median(&dl_acq))
            ),
            baseline: format!("floor P1 {} pairs/s", fmt_rate(median(&fl))),
            ratio: format!(
                "{:.0} % of floor pair rate ({:.0} % of distlock's own P1 rate)",
                vs_floor * 100.0,
                vs_own * 100.0
            ),
            target: "≥ 40 %".into(),
            status: Status::of(vs_floor >= 0.40 && overlaps == 0),
            data: data.clone(),
        },
        Row {
            id: "P2",
            scenario: "… against rslock retrying until success".into(),
            figure: format!("{} handoffs/s", fmt_rate(median(&dl))),
            baseline: format!(
                "rslock {} handoffs/s ({} acquisitions/s)",
                fmt_rate(median(&rs)),
                fmt_rate(median(&rs_acq))
            ),
            ratio: format!("{vs_rslock:.1} × rslock"),
            target: "≥ 10 × rslock".into(),
            status: Status::of(vs_rslock >= 10.0),
            data,
        },
    ]
}

/// `n` concurrent loops made by `make(i)`, each returning its count: total per second.
async fn concurrent<F, Fut>(n: usize, make: F) -> f64
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = u64> + Send + 'static,
{
    let start = Instant::now();
    let handles: Vec<_> = (0..n).map(|i| tokio::spawn(make(i))).collect();
    let mut total = 0;
    for h in handles {
        total += h.await.expect("task");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// P4: 64 tasks on 64 keys, distlock against 64 floor loops on one connection.
pub(crate) async fn p4(env: &Env) -> Vec<Row> {
    const TASKS: usize = 64;
    let conn = env.server_conn().await;
    let locker = env.locker().await;
    let floor_run = |d: Duration| {
        let conn = conn.clone();
        concurrent(TASKS, move |i| {
            let mut conn = conn.clone();
            let deadline = Instant::now() + d;
            async move {
                let key = format!("p4:floor:{i}");
                let mut n = 0;
                while Instant::now() < deadline {
                    assert!(floor::pair(&mut conn, &key, &floor::token(i, n)).await);
                    n += 1;
                }
                n
            }
        })
    };
    let distlock_run = |d: Duration| {
        let locker = locker.clone();
        concurrent(TASKS, move |i| {
            let lock = locker.lock(format!("p4:distlock:{i}"));
            let deadline = Instant::now() + d;
            async move {
                let mut n = 0;
                while Instant::now() < deadline {
                    let g = lock.acquire().await.expect("acquire");
                    g.release().await.expect("release");
                    n += 1;
                }
                n
            }
        })
    };
    floor_run(Duration::from_millis(200)).await;
    distlock_run(Duration::from_millis(200)).await;
    let (mut fl, mut dl) = (Vec::new(), Vec::new());
    for round in 0..env.cfg.long_rounds {
        for arm in rotation(2, round) {
            match arm {
                0 => fl.push(floor_run(env.cfg.long_time).await),
                _ => dl.push(distlock_run(env.cfg.long_time).await),
            }
        }
    }
    locker.close().await.expect("close");
    let ratio = median(&paired_ratios(&dl, &fl));
    vec![Row {
        id: "P4",
        scenario: format!(
            "64 tasks on 64 distinct keys, {} s",
            env.cfg.long_time.as_secs()
        ),
        figure: format!("{} pairs/s", fmt_rate(median(&dl))),
        baseline: format!("64 floor loops {} pairs/s", fmt_rate(median(&fl))),
        ratio: format!("{:.0} % of floor", ratio * 100.0),
        target: "≥ 60 %".into(),
        status: Status::of(ratio >= 0.60),
        data: json!({
            "tasks": TASKS, "seconds": env.cfg.long_time.as_secs_f64(),
            "distlock_pairs_per_s": dl, "floor_pairs_per_s": fl, "ratio": ratio,
        }),
    }]
}
