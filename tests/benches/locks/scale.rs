//! P7 (one locker holding many leases) and P8 (many local waiters on one key).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use distlock::{LockGuard, Locker};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::measure::fmt_rate;
use crate::probe::{rss_bytes, CommandStats};
use crate::report::{Row, Status};
use crate::Env;

/// The environment variable that makes the bench binary run P7's measurement
/// as a child process (so that resident memory is this scenario's alone).
pub(crate) const CHILD_ENV: &str = "DISTLOCK_BENCH_CHILD";
const CHILD_URL: &str = "DISTLOCK_BENCH_CHILD_URL";
const CHILD_LOCKS: &str = "DISTLOCK_BENCH_CHILD_LOCKS";

/// P7's lease expiry: renewals every second.
const P7_EXPIRY: Duration = Duration::from_secs(3);

/// Acquires `n` locks named `{prefix}{i}` with 64 tasks at a time.
async fn acquire_many(locker: &Locker, prefix: &str, n: usize) -> Vec<LockGuard> {
    const TASKS: usize = 64;
    let handles: Vec<_> = (0..TASKS)
        .map(|t| {
            let locker = locker.clone();
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                let mut mine = Vec::with_capacity(n / TASKS + 1);
                for i in (t..n).step_by(TASKS) {
                    let g = locker
                        .lock(format!("{prefix}{i}"))
                        .acquire()
                        .await
                        .expect("acquire");
                    mine.push(g);
                }
                mine
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    for h in handles {
        all.extend(h.await.expect("task"));
    }
    all
}

/// How many keys match a pattern, counted inside Redis.
async fn count_keys(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) -> i64 {
    redis::Script::new("return #redis.call('keys', ARGV[1])")
        .arg(pattern)
        .invoke_async(conn)
        .await
        .expect("count keys")
}

/// P7 in the child process: hold `n` leases for three renewal periods.
pub(crate) async fn p7_child() -> Value {
    let url = std::env::var(CHILD_URL).expect("child url");
    let n: usize = std::env::var(CHILD_LOCKS)
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("child lock count");
    let locker = Locker::builder()
        .url(&url)
        .expiry(P7_EXPIRY)
        .build()
        .await
        .expect("locker");
    let mut conn = redis::Client::open(url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    // Warm up the runtime, the connections and the allocator.
    for g in acquire_many(&locker, "p7w:", 2000).await {
        g.release().await.expect("release");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let rss_before = rss_bytes();
    let started = Instant::now();
    let guards = acquire_many(&locker, "p7:", n).await;
    let acquire_secs = started.elapsed().as_secs_f64();
    let rss_held = rss_bytes();

    let renew_every = P7_EXPIRY / 3;
    let s0 = CommandStats::read(&mut conn).await;
    let hold_start = Instant::now();
    tokio::time::sleep(renew_every * 3 + Duration::from_millis(100)).await;
    let s1 = CommandStats::read(&mut conn).await;
    let held_secs = hold_start.elapsed().as_secs_f64();
    let periods = held_secs / renew_every.as_secs_f64();

    let lost = guards.iter().filter(|g| g.is_lost()).count();
    let present = count_keys(&mut conn, "distlock:{p7:*}").await;
    let scripts = s1.since(&s0, "evalsha") + s1.since(&s0, "eval");
    let pexpires = s1.since(&s0, "pexpire");
    let rss_after_hold = rss_bytes();

    let started = Instant::now();
    drop(guards);
    locker.close().await.expect("close");
    let close_secs = started.elapsed().as_secs_f64();
    let left = count_keys(&mut conn, "distlock:{p7:*}").await;
    json!({
        "locks": n,
        "expiry_s": P7_EXPIRY.as_secs_f64(),
        "acquire_s": acquire_secs,
        "held_s": held_secs,
        "renewal_periods": periods,
        "lost_signals": lost,
        "keys_present_after_hold": present,
        "rss_before": rss_before,
        "rss_held": rss_held,
        "rss_after_hold": rss_after_hold,
        "bytes_per_lock": (rss_held.saturating_sub(rss_before)) as f64 / n as f64,
        "bytes_per_lock_after_hold": (rss_after_hold.saturating_sub(rss_before)) as f64 / n as f64,
        "renewal_script_calls": scripts,
        "renewal_script_calls_per_period": scripts as f64 / periods,
        "pexpire_per_period": pexpires as f64 / periods,
        "release_all_s": close_secs,
        "keys_left_after_release": left,
    })
}

/// P7: run the child, read its JSON line.
pub(crate) async fn p7(env: &Env) -> Vec<Row> {
    let exe = std::env::current_exe().expect("current exe");
    let out = tokio::process::Command::new(exe)
        .env(CHILD_ENV, "p7")
        .env(CHILD_URL, &env.url)
        .env(CHILD_LOCKS, env.cfg.p7_locks.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .expect("running the P7 child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let data: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "P7 child printed no result (status {}): {stdout}",
                out.status
            )
        });
    let f = |k: &str| data[k].as_f64().unwrap_or(f64::NAN);
    let n = f("locks");
    let missing = (n - f("keys_present_after_hold")).max(0.0);
    let lost = f("lost_signals").max(missing);
    let bytes = f("bytes_per_lock");
    let per_period = f("renewal_script_calls_per_period");
    let scenario = format!(
        "one locker holds {} locks for {:.1} renewal periods (expiry 3 s); acquired in {:.1} s",
        fmt_rate(n),
        f("renewal_periods"),
        f("acquire_s")
    );
    vec![
        Row {
            id: "P7",
            scenario: scenario.clone(),
            figure: format!(
                "{} lost signals, {} keys missing",
                f("lost_signals"),
                missing
            ),
            baseline: format!(
                "{} keys held in Redis after the hold",
                fmt_rate(f("keys_present_after_hold"))
            ),
            ratio: String::new(),
            target: "zero lost".into(),
            status: Status::of(lost == 0.0),
            data: data.clone(),
        },
        Row {
            id: "P7",
            scenario: "… client memory per held lock (RSS growth)".into(),
            figure: format!("{bytes:.0} B/lock"),
            baseline: format!(
                "RSS {:.0} MiB → {:.0} MiB",
                f("rss_before") / 1048576.0,
                f("rss_held") / 1048576.0
            ),
            ratio: format!("{:.2} KiB", bytes / 1024.0),
            target: "≤ 2 KiB".into(),
            status: Status::of(bytes <= 2048.0),
            data: data.clone(),
        },
        Row {
            id: "P7",
            scenario: "… renewal traffic".into(),
            figure: format!("{per_period:.0} script calls/period"),
            baseline: format!(
                "{} leases renewed/period",
                fmt_rate(f("pexpire_per_period"))
            ),
            ratio: format!(
                "1 call per {:.0} leases",
                f("pexpire_per_period") / per_period
            ),
            target: "≪ 100,000 round trips/period".into(),
            status: Status::of(per_period * 100.0 <= n),
            data,
        },
    ]
}

/// P8: `n` tasks of one locker wait on a key another locker holds; then they
/// take it in turn. For each release, Redis's counters tell how many acquire
/// attempts the waiting process made: `INCR` (the fencing counter) runs in a winning attempt,
/// `PTTL` in one that found the key held.
pub(crate) async fn p8(env: &Env) -> Vec<Row> {
    let n = env.cfg.p8_waiters;
    let mut conn = env.server_conn().await;
    let holder = env.locker().await;
    let waiters = env.locker().await;
    let held = holder.lock("p8").acquire().await.expect("holder acquire");

    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, oneshot::Sender<()>)>();
    let inside = Arc::new(AtomicBool::new(false));
    let overlaps = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let lock = waiters.lock("p8");
        let tx = tx.clone();
        let inside = Arc::clone(&inside);
        let overlaps = Arc::clone(&overlaps);
        tasks.push(tokio::spawn(async move {
            let guard = lock.acquire().await.expect("waiter acquire");
            if inside.swap(true, Ordering::SeqCst) {
                overlaps.fetch_add(1, Ordering::Relaxed);
            }
            let (permit_tx, permit) = oneshot::channel();
            let _ = tx.send((i, permit_tx));
            let _ = permit.await;
            inside.store(false, Ordering::SeqCst);
            guard.release().await.expect("waiter release");
        }));
        // Let the task join the line before the next one is spawned.
        tokio::task::yield_now().await;
    }
    drop(tx);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let before_all = CommandStats::read(&mut conn).await;
    let mut holder_guard = Some(held);
    let mut permit: Option<oneshot::Sender<()>> = None;
    let mut order = Vec::with_capacity(n);
    let (mut wins, mut probes) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let started = Instant::now();
    for _ in 0..n {
        let s0 = CommandStats::read(&mut conn).await;
        match holder_guard.take() {
            Some(g) => g.release().await.expect("holder release"),
            None => {
                if let Some(p) = permit.take() {
                    let _ = p.send(());
                }
            }
        }
        let (i, p) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a waiter acquires within 10 s")
            .expect("waiters alive");
        order.push(i);
        permit = Some(p);
        // Room for whatever else the release provokes.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let s1 = CommandStats::read(&mut conn).await;
        wins.push(s1.since(&s0, "incr"));
        probes.push(s1.since(&s0, "pttl"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(p) = permit.take() {
        let _ = p.send(());
    }
    for t in tasks {
        t.await.expect("waiter task");
    }
    let after_all = CommandStats::read(&mut conn).await;
    holder.close().await.expect("close");
    waiters.close().await.expect("close");

    let mut sorted = order.clone();
    sorted.sort_unstable();
    sorted.dedup();
    let all_once = sorted.len() == n && order.len() == n;
    let inversions = order.windows(2).filter(|w| w[1] < w[0]).count();
    let attempts: Vec<u64> = wins.iter().zip(&probes).map(|(w, p)| w + p).collect();
    let max_attempts = attempts.iter().copied().max().unwrap_or(0);
    let mean_attempts = attempts.iter().sum::<u64>() as f64 / n.max(1) as f64;
    let max_wins = wins.iter().copied().max().unwrap_or(0);
    let overlaps = overlaps.load(Ordering::Relaxed);
    let data = json!({
        "waiters": n,
        "all_acquired_once": all_once,
        "fifo_inversions": inversions,
        "overlaps": overlaps,
        "handoffs_per_s": n as f64 / elapsed,
        "attempts_per_release": { "max": max_attempts, "mean": mean_attempts },
        "wins_per_release_max": max_wins,
        "failed_attempts_per_release": { "max": probes.iter().max(), "mean": probes.iter().sum::<u64>() as f64 / n.max(1) as f64 },
        "attempt_histogram": histogram(&attempts),
        "total": { "wins": after_all.since(&before_all, "incr"), "failed": after_all.since(&before_all, "pttl"),
                   "releases": after_all.since(&before_all, "publish") },
    });
    vec![
        Row {
            id: "P8",
            scenario: format!("{n} tasks of one process wait on a key held by another locker"),
            figure: format!(
                "max {max_attempts} acquire attempts per release (mean {mean_attempts:.2})"
            ),
            baseline: format!("{n} waiters"),
            ratio: String::new(),
            target: "1 Redis contender per release".into(),
            status: Status::of(max_attempts == 1),
            data: data.clone(),
        },
        Row {
            id: "P8",
            scenario: "… all acquire in turn".into(),
            figure: format!(
                "{} of {n} acquired, {overlaps} overlaps, {inversions} FIFO inversions",
                sorted.len()
            ),
            baseline: String::new(),
            ratio: String::new(),
            target: "all acquire, one at a time".into(),
            status: Status::of(all_once && overlaps == 0 && max_wins == 1),
            data,
        },
    ]
}

fn histogram(v: &[u64]) -> Value {
    let mut map = std::collections::BTreeMap::new();
    for x in v {
        *map.entry(x.to_string()).or_insert(0u64) += 1;
    }
    json!(map)
}
