//! The soak: continuous acquire / renew / release over many keys through a
//! fault proxy, with a fault every few seconds, reporting memory (RSS) and
//! the lockers' task count at the start and at the end.
//!
//! ```text
//! soak [--duration 10m] [--keys 1000] [--tasks 200] [--expiry 2s]
//!      [--fault-every 15s] [--seed N]
//! ```
//!
//! Two lockers (two replicas) share one runtime, measured alone: the Redis
//! server and the proxy run on a runtime of their own. Tasks hold leases from
//! a few milliseconds to a few expiries (so thousands of renewals go out),
//! release them in every way the API offers (release, drop, detach and
//! `release_lease`, `run`), and wait with timeouts. Faults rotate through
//! connection resets, latency spikes, short black-holes, pauses within the
//! renewal slack, and Redis killed and restarted empty.
//!
//! It fails (exit 1) when, after the load stops, a task, a waiting line or a
//! lock key is left, or when RSS grew between the end of the warm-up and the
//! end of the load by more than 10 % + 4 MiB. The last line of the output is
//! `summary: {json}`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test tool: a failed step fails the run

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distlock::{Error, Locker, Policy};
use distlock_tests::process::{alive_tasks, rss_bytes};
use distlock_tests::{FaultProxy, RedisServer};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Clone)]
struct Options {
    duration: Duration,
    keys: u32,
    tasks: u32,
    expiry: Duration,
    fault_every: Duration,
    seed: u64,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Self, String> {
        let mut o = Options {
            duration: Duration::from_secs(600),
            keys: 1000,
            tasks: 200,
            expiry: Duration::from_secs(2),
            fault_every: Duration::from_secs(15),
            seed: fastrand::u64(..),
        };
        while let Some(arg) = args.next() {
            let mut value = || args.next().ok_or(format!("{arg} needs a value"));
            match arg.as_str() {
                "--duration" => o.duration = duration(&value()?)?,
                "--expiry" => o.expiry = duration(&value()?)?,
                "--fault-every" => o.fault_every = duration(&value()?)?,
                "--keys" => o.keys = number(&value()?)?,
                "--tasks" => o.tasks = number(&value()?)?,
                "--seed" => o.seed = number(&value()?)?,
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        if o.keys == 0 || o.tasks == 0 {
            return Err("--keys and --tasks must be at least 1".into());
        }
        Ok(o)
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("bad duration `{s}`: {e}"))
}

fn number<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("bad number `{s}`"))
}

/// What the harness runtime is asked to do.
#[derive(Debug)]
enum Fault {
    Reset,
    Latency(Duration, Duration),
    Blackhole(Duration),
    Pause(Duration),
    KillRestart(Duration),
    /// Nothing: answers how many connections cross the proxy.
    CountConnections,
}

/// The harness (server and proxy) on a runtime of its own, so that the
/// measured runtime runs nothing but the lockers and the load.
struct Harness {
    url: String,
    faults: mpsc::UnboundedSender<(Fault, oneshot::Sender<usize>)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Harness {
    fn start() -> Harness {
        let (url_tx, url_rx) = std::sync::mpsc::channel();
        let (faults, mut rx) = mpsc::unbounded_channel::<(Fault, oneshot::Sender<usize>)>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("harness runtime");
            rt.block_on(async move {
                let mut server = RedisServer::start().await;
                let proxy = FaultProxy::start(server.addr()).await;
                url_tx.send(proxy.url()).expect("url");
                while let Some((fault, done)) = rx.recv().await {
                    match fault {
                        Fault::Reset => proxy.reset_all(),
                        Fault::Latency(latency, lasting) => {
                            proxy.set_latency(latency);
                            tokio::time::sleep(lasting).await;
                            proxy.restore();
                        }
                        Fault::Blackhole(d) => {
                            proxy.blackhole();
                            tokio::time::sleep(d).await;
                            proxy.restore();
                        }
                        Fault::Pause(d) => {
                            server.pause();
                            tokio::time::sleep(d).await;
                            server.resume();
                        }
                        Fault::KillRestart(d) => {
                            server.kill();
                            tokio::time::sleep(d).await;
                            server.restart().await;
                        }
                        Fault::CountConnections => {}
                    }
                    let _ = done.send(proxy.connections());
                }
                let keys = server.keys("distlock:*").await;
                // Fencing counters and the expiry register stay by design.
                let locks: Vec<&String> = keys
                    .iter()
                    .filter(|k| !k.ends_with(":fence") && !k.ends_with("~expiry-register"))
                    .collect();
                if !locks.is_empty() {
                    eprintln!("soak: lock keys left in Redis: {locks:?}");
                    std::process::exit(1);
                }
            });
        });
        let url = url_rx.recv().expect("the harness started");
        Harness {
            url,
            faults,
            thread: Some(thread),
        }
    }

    /// Injects `fault`; answers how many connections cross the proxy then.
    async fn inject(&self, fault: Fault) -> usize {
        let (tx, rx) = oneshot::channel();
        self.faults.send((fault, tx)).expect("harness alive");
        rx.await.unwrap_or(0)
    }

    /// Stops the harness after checking that no lock key is left.
    fn finish(mut self) {
        drop(self.faults);
        if let Some(t) = self.thread.take() {
            t.join().expect("harness thread");
        }
    }
}

/// Each locker's pool size (the default).
const POOL_SIZE: usize = 16;

#[derive(Debug, Default)]
struct Counts {
    acquired: AtomicU64,
    held_past_renewal: AtomicU64,
    lost: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl Counts {
    fn error(&self, e: &Error) {
        let kind = match e {
            Error::Timeout { .. } => "timeout",
            Error::Unavailable { .. } => "unavailable",
            Error::Lost { .. } => "lost",
            Error::Busy { .. } => "busy",
            Error::Redis { .. } => "redis",
            Error::Closed => "closed",
            _ => "other",
        };
        *self.errors.lock().unwrap().entry(kind).or_default() += 1;
    }
}

#[derive(Debug, Serialize)]
struct Sample {
    at_s: u64,
    rss_mib: f64,
    tasks: usize,
    acquired: u64,
}

#[derive(Debug, Serialize)]
struct Summary {
    seed: u64,
    duration_s: u64,
    keys: u32,
    tasks: u32,
    faults: u64,
    acquisitions: u64,
    held_past_a_renewal: u64,
    losses: u64,
    errors: BTreeMap<&'static str, u64>,
    rss_start_mib: f64,
    rss_end_mib: f64,
    tasks_idle_start: usize,
    tasks_idle_end: usize,
    connections_idle_start: usize,
    connections_idle_end: usize,
    tasks_loaded_start: usize,
    tasks_loaded_end: usize,
    failures: Vec<String>,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn main() -> ExitCode {
    let o = match Options::parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::from(2);
        }
    };
    let harness = Harness::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let summary = rt.block_on(soak(&o, &harness));
    drop(rt);
    harness.finish();
    println!(
        "summary: {}",
        serde_json::to_string(&summary).expect("summary")
    );
    if summary.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn soak(o: &Options, harness: &Harness) -> Summary {
    println!(
        "soak: {} over {} keys with {} tasks, expiry {}, a fault every {}, seed {}",
        humantime::format_duration(o.duration),
        o.keys,
        o.tasks,
        humantime::format_duration(o.expiry),
        humantime::format_duration(o.fault_every),
        o.seed
    );
    let builder = || {
        Locker::builder()
            .url(&harness.url)
            .expiry(o.expiry)
            .op_timeout(o.expiry / 4)
            .connect_timeout(o.expiry / 2)
            .retry_backoff(Duration::from_millis(20), Duration::from_millis(500))
            .pool_size(POOL_SIZE)
    };
    let lockers = [
        builder().build().await.unwrap(),
        builder().build().await.unwrap(),
    ];
    // Start every background task once (keeper, pub/sub), then count.
    for l in &lockers {
        let g = l.lock("warm-up").acquire().await.unwrap();
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.lock("warm-up").acquire().await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        g.release().await.unwrap();
        waiter.await.unwrap().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let tasks_idle_start = alive_tasks();
    let conns_idle_start = harness.inject(Fault::CountConnections).await;

    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut load = Vec::new();
    for t in 0..o.tasks {
        load.push(tokio::spawn(contend(
            lockers[t as usize % 2].clone(),
            o.clone(),
            t,
            Arc::clone(&counts),
            Arc::clone(&stop),
        )));
    }

    let warm_up = (o.duration / 3).min(Duration::from_secs(60));
    let mut rng = fastrand::Rng::with_seed(o.seed);
    let mut faults = 0u64;
    let mut samples = Vec::new();
    let mut next_fault = started + o.fault_every;
    let mut next_sample = started;
    let mut start_mark: Option<(u64, usize)> = None;
    let e = o.expiry;
    while started.elapsed() < o.duration {
        let now = Instant::now();
        if start_mark.is_none() && now - started >= warm_up {
            start_mark = Some((rss_bytes().unwrap_or(0), alive_tasks()));
        }
        if now >= next_sample {
            let s = Sample {
                at_s: (now - started).as_secs(),
                rss_mib: mib(rss_bytes().unwrap_or(0)),
                tasks: alive_tasks(),
                acquired: counts.acquired.load(Ordering::Relaxed),
            };
            println!(
                "  {:>4}s  rss {:>7.1} MiB  tasks {:>5}  acquisitions {:>8}",
                s.at_s, s.rss_mib, s.tasks, s.acquired
            );
            samples.push(s);
            next_sample = now + (o.duration / 10).max(Duration::from_secs(1));
        }
        if now >= next_fault && now + e * 4 < started + o.duration {
            let fault = match faults % 5 {
                0 => Fault::Reset,
                1 => Fault::Latency(
                    e.mul_f64(0.01 + rng.f64() * 0.04),
                    e.mul_f64(1.0 + rng.f64()),
                ),
                2 => Fault::Blackhole(e.mul_f64(0.1 + rng.f64() * 0.2)),
                3 => Fault::Pause(e.mul_f64(0.1 + rng.f64() * 0.2)),
                _ => Fault::KillRestart(e.mul_f64(rng.f64() * 0.5)),
            };
            harness.inject(fault).await;
            faults += 1;
            next_fault = Instant::now() + o.fault_every;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (rss_start, tasks_loaded_start) = start_mark.unwrap_or((0, 0));
    let rss_end = rss_bytes().unwrap_or(0);
    let tasks_loaded_end = alive_tasks();
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }

    let mut failures = Vec::new();
    // Background releases finish; then only the lockers' own tasks remain:
    // the keeper, the pub/sub task, and one driver task per open connection.
    // Connections checked out concurrently after a fault may stay idle in the
    // pools (bounded by pool_size): each extra task must be one of those.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (tasks_idle_end, conns_idle_end) = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let tasks = alive_tasks();
        let conns = harness.inject(Fault::CountConnections).await;
        let settled = tasks + conns_idle_start == tasks_idle_start + conns;
        if settled || Instant::now() >= deadline {
            break (tasks, conns);
        }
    };
    if tasks_idle_end + conns_idle_start != tasks_idle_start + conns_idle_end {
        failures.push(format!(
            "{tasks_idle_end} tasks and {conns_idle_end} connections after the load, \
             {tasks_idle_start} and {conns_idle_start} before it: tasks leaked"
        ));
    }
    if conns_idle_end > 2 * (POOL_SIZE + 1) {
        failures.push(format!("{conns_idle_end} connections open after the load"));
    }
    for (i, l) in lockers.iter().enumerate() {
        if l.__waiting_lines() != 0 {
            failures.push(format!(
                "locker {i}: {} waiting lines left",
                l.__waiting_lines()
            ));
        }
    }
    let allowed = rss_start / 10 + 4 * 1024 * 1024;
    if rss_end > rss_start + allowed {
        failures.push(format!(
            "RSS grew from {:.1} MiB to {:.1} MiB",
            mib(rss_start),
            mib(rss_end)
        ));
    }
    for l in &lockers {
        l.close().await.unwrap();
    }
    let summary = Summary {
        seed: o.seed,
        duration_s: o.duration.as_secs(),
        keys: o.keys,
        tasks: o.tasks,
        faults,
        acquisitions: counts.acquired.load(Ordering::Relaxed),
        held_past_a_renewal: counts.held_past_renewal.load(Ordering::Relaxed),
        losses: counts.lost.load(Ordering::Relaxed),
        errors: counts.errors.lock().unwrap().clone(),
        rss_start_mib: mib(rss_start),
        rss_end_mib: mib(rss_end),
        tasks_idle_start,
        tasks_idle_end,
        connections_idle_start: conns_idle_start,
        connections_idle_end: conns_idle_end,
        tasks_loaded_start,
        tasks_loaded_end,
        failures,
    };
    println!(
        "acquisitions {} (held past a renewal {}), losses {}, faults {}, errors {:?}",
        summary.acquisitions,
        summary.held_past_a_renewal,
        summary.losses,
        summary.faults,
        summary.errors
    );
    println!(
        "RSS {:.1} MiB after the warm-up, {:.1} MiB at the end; tasks under load {} -> {}, \
         idle {} -> {} (open connections {} -> {})",
        summary.rss_start_mib,
        summary.rss_end_mib,
        summary.tasks_loaded_start,
        summary.tasks_loaded_end,
        summary.tasks_idle_start,
        summary.tasks_idle_end,
        summary.connections_idle_start,
        summary.connections_idle_end
    );
    for f in &summary.failures {
        println!("FAILED: {f}");
    }
    summary
}

/// One task of the load: acquire a random key and let it go in one of the
/// ways the API offers, until told to stop.
async fn contend(
    locker: Locker,
    o: Options,
    task: u32,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = fastrand::Rng::with_seed(o.seed ^ (u64::from(task) << 32));
    let renew_every = o.expiry / 3;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("soak:{}", rng.u32(..o.keys));
        let hold = match rng.u32(..10) {
            0..6 => Duration::from_millis(rng.u64(0..20)),
            6..9 => o.expiry.mul_f64(rng.f64()),
            _ => o.expiry.mul_f64(1.0 + rng.f64() * 2.0),
        };
        let wait = Duration::from_millis(rng.u64(0..500));
        let lock = locker.lock(key.as_str());
        if rng.u32(..8) == 0 {
            // The shared runner: acquire, run, cancel on loss, release.
            let policy = Policy::new().timeout(wait);
            match lock.run(&policy, tokio::time::sleep(hold)).await {
                Ok(_) => note_held(&counts, hold, renew_every),
                Err(e) if e.is_lost() => {
                    counts.acquired.fetch_add(1, Ordering::Relaxed);
                    counts.lost.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => counts.error(&e),
            }
            continue;
        }
        let guard = match lock.acquire_timeout(wait).await {
            Ok(g) => g,
            Err(e) => {
                counts.error(&e);
                if e.is_unavailable() {
                    tokio::time::sleep(Duration::from_millis(rng.u64(10..100))).await;
                }
                continue;
            }
        };
        let lost = tokio::select! {
            _ = guard.lost() => true,
            () = tokio::time::sleep(hold) => false,
        };
        if lost {
            counts.acquired.fetch_add(1, Ordering::Relaxed);
            counts.lost.fetch_add(1, Ordering::Relaxed);
        } else {
            note_held(&counts, hold, renew_every);
        }
        match rng.u32(..4) {
            0 => drop(guard),
            1 => {
                let lease = guard.detach();
                if let Err(e) = locker.release_lease(&lease).await {
                    counts.error(&e);
                }
            }
            _ => {
                if let Err(e) = guard.release().await {
                    if !e.is_lost() {
                        counts.error(&e);
                    }
                }
            }
        }
    }
}

fn note_held(counts: &Counts, hold: Duration, renew_every: Duration) {
    counts.acquired.fetch_add(1, Ordering::Relaxed);
    if hold > renew_every {
        counts.held_past_renewal.fetch_add(1, Ordering::Relaxed);
    }
}
