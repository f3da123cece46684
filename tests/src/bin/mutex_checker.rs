//! The mutual-exclusion checker.
//!
//! The coordinator starts a private `redis-server` behind a [`FaultProxy`],
//! re-executes itself as `--workers` worker processes (each with its own
//! `Locker` and `--tasks` tasks contending on `--keys` keys through the
//! proxy), and runs a random fault schedule for `--duration`: Redis killed
//! and restarted empty, paused longer than the expiry and shorter than the
//! renewal slack, the proxy black-holed, its connections reset, latency
//! spikes. Workers print every critical section as a JSON line; the
//! coordinator checks them (see `distlock_tests::checker`), prints the
//! counts and exits non-zero on any violation.
//!
//! ```text
//! mutex_checker [--duration 60s] [--workers 4] [--tasks 4] [--keys 3]
//!               [--expiry 1s] [--seed N] [--faults all|none|KIND,...]
//!               [--sabotage] [--records FILE]
//! ```
//!
//! - `--faults` picks the kinds of fault: `kill-restart-empty`,
//!   `pause-beyond-expiry`, `pause-within-slack`, `blackhole`,
//!   `reset-connections`, `latency-spike` (default: all).
//! - `--sabotage` makes the workers ignore the lost signal (they keep
//!   working until their planned end): the checker must then fail.
//! - `--records FILE` writes every section as a JSON line, for a post-mortem.
//!
//! The last line of the output is `summary: {json}`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test tool: a failed step fails the run

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distlock::{Error, Locker};
use distlock_tests::checker::{analyze, monotonic_ns, Analysis, Release, Section, ViolationKind};
use distlock_tests::{FaultProxy, RedisServer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

/// The coordinator's options.
#[derive(Debug, Clone)]
struct Options {
    duration: Duration,
    workers: u32,
    tasks: u32,
    keys: u32,
    expiry: Duration,
    seed: u64,
    faults: Vec<FaultKind>,
    sabotage: bool,
    records: Option<PathBuf>,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Self, String> {
        let mut o = Options {
            duration: Duration::from_secs(60),
            workers: 4,
            tasks: 4,
            keys: 3,
            expiry: Duration::from_secs(1),
            seed: fastrand::u64(..),
            faults: FAULT_KINDS.to_vec(),
            sabotage: false,
            records: None,
        };
        while let Some(arg) = args.next() {
            let mut value = || args.next().ok_or(format!("{arg} needs a value"));
            match arg.as_str() {
                "--duration" => o.duration = duration(&value()?)?,
                "--expiry" => o.expiry = duration(&value()?)?,
                "--workers" => o.workers = number(&value()?)?,
                "--tasks" => o.tasks = number(&value()?)?,
                "--keys" => o.keys = number(&value()?)?,
                "--seed" => o.seed = number(&value()?)?,
                "--records" => o.records = Some(value()?.into()),
                "--faults" => o.faults = fault_kinds(&value()?)?,
                "--sabotage" => o.sabotage = true,
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        if o.workers == 0 || o.tasks == 0 || o.keys == 0 {
            return Err("--workers, --tasks and --keys must be at least 1".into());
        }
        Ok(o)
    }
}

fn fault_kinds(s: &str) -> Result<Vec<FaultKind>, String> {
    match s {
        "all" => Ok(FAULT_KINDS.to_vec()),
        "none" => Ok(Vec::new()),
        _ => s
            .split(',')
            .map(|name| {
                FAULT_KINDS
                    .iter()
                    .copied()
                    .find(|k| k.name() == name)
                    .ok_or(format!("unknown fault kind `{name}`"))
            })
            .collect(),
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("bad duration `{s}`: {e}"))
}

fn number<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("bad number `{s}`"))
}

/// What a worker process is told (as one JSON argument).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WorkerOptions {
    url: String,
    id: u32,
    tasks: u32,
    keys: u32,
    expiry_ms: u64,
    /// `monotonic_ns()` at which to stop acquiring.
    until: u64,
    seed: u64,
    sabotage: bool,
}

/// One line of a worker's output.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line {
    Section(Section),
    Summary(WorkerSummary),
}

/// A worker's own counts, printed last.
#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkerSummary {
    worker: u32,
    sections: u64,
    acquire_errors: BTreeMap<String, u64>,
    close_error: Option<String>,
}

/// The kinds of fault the schedule injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
enum FaultKind {
    KillRestartEmpty,
    PauseBeyondExpiry,
    PauseWithinSlack,
    Blackhole,
    ResetConnections,
    LatencySpike,
}

impl FaultKind {
    fn name(self) -> &'static str {
        match self {
            FaultKind::KillRestartEmpty => "kill-restart-empty",
            FaultKind::PauseBeyondExpiry => "pause-beyond-expiry",
            FaultKind::PauseWithinSlack => "pause-within-slack",
            FaultKind::Blackhole => "blackhole",
            FaultKind::ResetConnections => "reset-connections",
            FaultKind::LatencySpike => "latency-spike",
        }
    }
}

const FAULT_KINDS: [FaultKind; 6] = [
    FaultKind::KillRestartEmpty,
    FaultKind::PauseBeyondExpiry,
    FaultKind::PauseWithinSlack,
    FaultKind::Blackhole,
    FaultKind::ResetConnections,
    FaultKind::LatencySpike,
];

#[derive(Debug, Clone, Serialize)]
struct Fault {
    kind: FaultKind,
    start: u64,
    end: u64,
    detail: String,
}

/// The machine-readable result, printed as the last line.
#[derive(Debug, Serialize)]
struct RunSummary {
    seed: u64,
    workers: u32,
    tasks: u32,
    keys: u32,
    expiry_ms: u64,
    duration_ms: u64,
    sabotage: bool,
    faults: BTreeMap<FaultKind, u64>,
    faults_total: u64,
    acquisitions: u64,
    losses_signalled: BTreeMap<String, u64>,
    losses_total: u64,
    lost_at_release: u64,
    release_errors: u64,
    acquire_errors: BTreeMap<String, u64>,
    violations: BTreeMap<ViolationKind, u64>,
    violations_total: u64,
    max_overlap_ms: f64,
    worker_failures: Vec<String>,
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if args.peek().map(String::as_str) == Some("worker") {
        let json = args.nth(1).expect("worker options");
        let options: WorkerOptions = serde_json::from_str(&json).expect("worker options JSON");
        return runtime.block_on(worker(options));
    }
    match Options::parse(args) {
        Ok(options) => runtime.block_on(coordinate(options)),
        Err(e) => {
            eprintln!("mutex_checker: {e}");
            ExitCode::from(2)
        }
    }
}

// ----- the coordinator -----

async fn coordinate(o: Options) -> ExitCode {
    println!(
        "mutex checker: {} workers x {} tasks on {} keys, expiry {}, {} with {}, seed {}{}",
        o.workers,
        o.tasks,
        o.keys,
        humantime::format_duration(o.expiry),
        humantime::format_duration(o.duration),
        if o.faults.is_empty() {
            "no faults".to_owned()
        } else {
            let names: Vec<&str> = o.faults.iter().map(|k| k.name()).collect();
            format!("faults ({})", names.join(", "))
        },
        o.seed,
        if o.sabotage {
            ", SABOTAGE: workers ignore the lost signal"
        } else {
            ""
        },
    );
    let mut server = RedisServer::start().await;
    let proxy = FaultProxy::start(server.addr()).await;
    let start = monotonic_ns();
    let until = start + nanos(o.duration);
    let exe = std::env::current_exe().expect("own executable");

    let sections = Arc::new(Mutex::new(Vec::<Section>::new()));
    let summaries = Arc::new(Mutex::new(Vec::<WorkerSummary>::new()));
    let mut children = Vec::new();
    let mut readers = Vec::new();
    for id in 0..o.workers {
        let wo = WorkerOptions {
            url: proxy.url(),
            id,
            tasks: o.tasks,
            keys: o.keys,
            expiry_ms: u64::try_from(o.expiry.as_millis()).unwrap_or(u64::MAX),
            until,
            seed: o.seed.wrapping_add(u64::from(id) * 0x9E37_79B9),
            sabotage: o.sabotage,
        };
        let mut child = Command::new(&exe)
            .arg("worker")
            .arg(serde_json::to_string(&wo).expect("worker options"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawning a worker");
        let stdout = child.stdout.take().expect("worker stdout");
        let (sections, summaries) = (Arc::clone(&sections), Arc::clone(&summaries));
        readers.push(tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut bad = 0u64;
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Line>(&line) {
                    Ok(Line::Section(s)) => sections.lock().unwrap().push(s),
                    Ok(Line::Summary(s)) => summaries.lock().unwrap().push(s),
                    Err(_) => bad += 1,
                }
            }
            bad
        }));
        children.push(child);
    }

    let mut rng = fastrand::Rng::with_seed(o.seed);
    let faults = if !o.faults.is_empty() {
        run_faults(&mut server, &proxy, &o, until, &mut rng).await
    } else {
        sleep_until_ns(until).await;
        Vec::new()
    };
    proxy.restore();

    let mut failures = Vec::new();
    let deadline = Duration::from_secs(30) + o.expiry * 5;
    for (id, mut child) in children.into_iter().enumerate() {
        match tokio::time::timeout(deadline, child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => failures.push(format!("worker {id} exited with {status}")),
            Ok(Err(e)) => failures.push(format!("worker {id}: {e}")),
            Err(_) => {
                failures.push(format!("worker {id} did not exit within {deadline:?}"));
                let _ = child.kill().await;
            }
        }
    }
    for (id, reader) in readers.into_iter().enumerate() {
        let bad = reader.await.unwrap_or(1);
        if bad > 0 {
            failures.push(format!("worker {id} printed {bad} unreadable lines"));
        }
    }
    let sections = std::mem::take(&mut *sections.lock().unwrap());
    let summaries = std::mem::take(&mut *summaries.lock().unwrap());
    if summaries.len() != o.workers as usize {
        failures.push(format!(
            "{} of {} workers reported a summary",
            summaries.len(),
            o.workers
        ));
    }
    let mut acquire_errors = BTreeMap::new();
    for s in &summaries {
        for (k, v) in &s.acquire_errors {
            *acquire_errors.entry(k.clone()).or_default() += v;
        }
        let seen = sections.iter().filter(|x| x.worker == s.worker).count() as u64;
        if seen != s.sections {
            failures.push(format!(
                "worker {} ran {} sections but {seen} reached the checker",
                s.worker, s.sections
            ));
        }
        if let Some(e) = &s.close_error {
            failures.push(format!("worker {}: close failed: {e}", s.worker));
        }
    }
    if sections.is_empty() {
        failures.push("no section was run at all".into());
    }
    if let Some(path) = &o.records {
        write_records(path, &sections);
    }

    let analysis = analyze(&sections);
    let summary = summarize(&o, &faults, &analysis, acquire_errors, failures);
    report(start, &faults, &analysis, &summary);
    println!(
        "summary: {}",
        serde_json::to_string(&summary).expect("summary")
    );
    drop(server);
    if summary.violations_total == 0 && summary.worker_failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Injects one fault at a time (each chosen kind once per round, in a random
/// order), with calm periods between them, until shortly before `until`.
async fn run_faults(
    server: &mut RedisServer,
    proxy: &FaultProxy,
    o: &Options,
    until: u64,
    rng: &mut fastrand::Rng,
) -> Vec<Fault> {
    let e = o.expiry;
    let between = |rng: &mut fastrand::Rng, lo: f64, hi: f64| e.mul_f64(lo + rng.f64() * (hi - lo));
    let mut faults = Vec::new();
    let mut deck: Vec<FaultKind> = Vec::new();
    // Let every worker connect and contend before the first fault.
    tokio::time::sleep(e * 2).await;
    // The longest fault lasts under 3 expiries; stop so that the last one
    // ends, and the workers recover, before they stop.
    while monotonic_ns() + nanos(e * 6) < until {
        tokio::time::sleep(between(rng, 0.5, 2.0)).await;
        // Every kind once per round, in a random order.
        if deck.is_empty() {
            deck = o.faults.clone();
            rng.shuffle(&mut deck);
        }
        let Some(kind) = deck.pop() else { break };
        let start = monotonic_ns();
        let detail = match kind {
            FaultKind::KillRestartEmpty => {
                let down = between(rng, 0.0, 1.5);
                server.kill();
                tokio::time::sleep(down).await;
                server.restart().await;
                format!("down {}", ms(down))
            }
            FaultKind::PauseBeyondExpiry => {
                let paused = between(rng, 1.2, 2.5);
                server.pause();
                tokio::time::sleep(paused).await;
                server.resume();
                format!("paused {}", ms(paused))
            }
            FaultKind::PauseWithinSlack => {
                // The renewal slack is validity - cadence, about 2/3 of the expiry.
                let paused = between(rng, 0.05, 0.3);
                server.pause();
                tokio::time::sleep(paused).await;
                server.resume();
                format!("paused {}", ms(paused))
            }
            FaultKind::Blackhole => {
                let cut = between(rng, 0.2, 2.0);
                proxy.blackhole();
                tokio::time::sleep(cut).await;
                proxy.restore();
                format!("black-holed {}", ms(cut))
            }
            FaultKind::ResetConnections => {
                let open = proxy.connections();
                proxy.reset_all();
                format!("{open} connections reset")
            }
            FaultKind::LatencySpike => {
                let latency = between(rng, 0.005, 0.2);
                let lasting = between(rng, 1.0, 2.5);
                proxy.set_latency(latency);
                tokio::time::sleep(lasting).await;
                proxy.restore();
                format!("+{} each way for {}", ms(latency), ms(lasting))
            }
        };
        faults.push(Fault {
            kind,
            start,
            end: monotonic_ns(),
            detail,
        });
    }
    sleep_until_ns(until).await;
    faults
}

fn summarize(
    o: &Options,
    faults: &[Fault],
    a: &Analysis,
    acquire_errors: BTreeMap<String, u64>,
    worker_failures: Vec<String>,
) -> RunSummary {
    let mut by_kind = BTreeMap::new();
    for f in faults {
        *by_kind.entry(f.kind).or_default() += 1;
    }
    let mut violations = BTreeMap::new();
    for v in &a.violations {
        *violations.entry(v.kind).or_default() += 1;
    }
    let max_overlap = a
        .violations
        .iter()
        .map(|v| v.overlap_ns())
        .max()
        .unwrap_or(0);
    RunSummary {
        seed: o.seed,
        workers: o.workers,
        tasks: o.tasks,
        keys: o.keys,
        expiry_ms: u64::try_from(o.expiry.as_millis()).unwrap_or(u64::MAX),
        duration_ms: u64::try_from(o.duration.as_millis()).unwrap_or(u64::MAX),
        sabotage: o.sabotage,
        faults_total: faults.len() as u64,
        faults: by_kind,
        acquisitions: a.sections,
        losses_total: a.losses.values().sum(),
        losses_signalled: a.losses.clone(),
        lost_at_release: a.lost_at_release,
        release_errors: a.release_errors,
        acquire_errors,
        violations_total: a.violations.len() as u64,
        violations,
        max_overlap_ms: max_overlap as f64 / 1e6,
        worker_failures,
    }
}

fn report(start: u64, faults: &[Fault], a: &Analysis, s: &RunSummary) {
    let rel = |t: u64| t.saturating_sub(start) as f64 / 1e9;
    let list = |m: &BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let kinds: Vec<String> = s.faults.iter().map(|(k, v)| format!("{k:?} {v}")).collect();
    println!("faults injected: {} ({})", s.faults_total, kinds.join(", "));
    println!("acquisitions: {} ({})", s.acquisitions, list(&a.per_key));
    println!(
        "losses signalled: {} ({}); found lost at release: {}; release errors: {}",
        s.losses_total,
        list(&s.losses_signalled),
        s.lost_at_release,
        s.release_errors
    );
    println!("acquire errors: {}", list(&s.acquire_errors));
    let kinds: Vec<String> = s
        .violations
        .iter()
        .map(|(k, v)| format!("{k:?} {v}"))
        .collect();
    println!(
        "violations: {}{}",
        s.violations_total,
        if kinds.is_empty() {
            String::new()
        } else {
            format!(" ({})", kinds.join(", "))
        }
    );
    for v in a.violations.iter().take(20) {
        let near: Vec<String> = faults
            .iter()
            .filter(|f| {
                f.start <= v.second.acquired + 5_000_000_000
                    && f.end + 5_000_000_000 >= v.first.acquired
            })
            .map(|f| {
                format!(
                    "{:?} {:.3}s..{:.3}s ({})",
                    f.kind,
                    rel(f.start),
                    rel(f.end),
                    f.detail
                )
            })
            .collect();
        println!(
            "  {:?} on {}: w{}t{} fence {} held {:.3}s..{:.3}s (lost {:?} {:?}, release {:?}); \
             w{}t{} fence {} acquired {:.3}s; overlap {:.3} ms; faults near: [{}]",
            v.kind,
            v.first.key,
            v.first.worker,
            v.first.task,
            v.first.fence,
            rel(v.first.acquired),
            rel(v.first.end),
            v.first.lost.map(rel),
            v.first.reason,
            v.first.release,
            v.second.worker,
            v.second.task,
            v.second.fence,
            rel(v.second.acquired),
            v.overlap_ns() as f64 / 1e6,
            near.join("; ")
        );
    }
    for f in &s.worker_failures {
        println!("worker failure: {f}");
    }
}

fn write_records(path: &PathBuf, sections: &[Section]) {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("records file"));
    for s in sections {
        serde_json::to_writer(&mut file, s).expect("record");
        file.write_all(b"\n").expect("record");
    }
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

async fn sleep_until_ns(t: u64) {
    let now = monotonic_ns();
    if t > now {
        tokio::time::sleep(Duration::from_nanos(t - now)).await;
    }
}

// ----- a worker process -----

async fn worker(o: WorkerOptions) -> ExitCode {
    let expiry = Duration::from_millis(o.expiry_ms);
    let builder = Locker::builder()
        .url(&o.url)
        .expiry(expiry)
        .op_timeout(expiry / 2)
        .connect_timeout(expiry)
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(200))
        .owner_tag(format!("w{}:", o.id));
    let locker = loop {
        match builder.clone().build().await {
            Ok(l) => break l,
            Err(e) if monotonic_ns() < o.until => {
                eprintln!("worker {}: connecting: {e}; retrying", o.id);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                eprintln!("worker {}: could not connect: {e}", o.id);
                return ExitCode::FAILURE;
            }
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Section>();
    let errors = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let mut tasks = Vec::new();
    for task in 0..o.tasks {
        tasks.push(tokio::spawn(contend(
            locker.clone(),
            o.clone(),
            task,
            tx.clone(),
            Arc::clone(&errors),
        )));
    }
    drop(tx);
    let printer = tokio::task::spawn_blocking(move || {
        let stdout = std::io::stdout();
        let mut count = 0u64;
        while let Some(s) = rx.blocking_recv() {
            let mut out = stdout.lock();
            serde_json::to_writer(&mut out, &Line::Section(s)).expect("stdout");
            out.write_all(b"\n").expect("stdout");
            count += 1;
        }
        count
    });
    for t in tasks {
        t.await.expect("task");
    }
    let sections = printer.await.expect("printer");
    let close_error = match tokio::time::timeout(expiry * 10, locker.close()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("close did not finish".into()),
    };
    let summary = WorkerSummary {
        worker: o.id,
        sections,
        acquire_errors: std::mem::take(&mut *errors.lock().unwrap()),
        close_error,
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &Line::Summary(summary)).expect("stdout");
    out.write_all(b"\n").expect("stdout");
    out.flush().expect("stdout");
    ExitCode::SUCCESS
}

/// One task: acquire a random key, hold it for a random time while watching
/// the lost signal, release, record, repeat until `until`.
async fn contend(
    locker: Locker,
    o: WorkerOptions,
    task: u32,
    tx: mpsc::UnboundedSender<Section>,
    errors: Arc<Mutex<BTreeMap<String, u64>>>,
) {
    let mut rng = fastrand::Rng::with_seed(o.seed ^ (u64::from(task) << 40));
    let expiry = Duration::from_millis(o.expiry_ms);
    loop {
        let now = monotonic_ns();
        if now >= o.until {
            return;
        }
        let key = format!("key-{}", rng.u32(..o.keys));
        let wait =
            Duration::from_millis(rng.u64(100..=2000)).min(Duration::from_nanos(o.until - now));
        match locker.lock(key.as_str()).acquire_timeout(wait).await {
            Ok(guard) => {
                let acquired = monotonic_ns();
                let hold = match rng.u32(..100) {
                    // A sabotaged worker holds long, so faults catch it holding.
                    _ if o.sabotage => expiry.mul_f64(3.0 + rng.f64() * 2.0),
                    0..75 => Duration::from_micros(rng.u64(0..20_000)),
                    75..92 => expiry.mul_f64(0.02 + rng.f64() * 0.98),
                    _ => expiry.mul_f64(1.0 + rng.f64() * 1.5),
                };
                let (end, lost, reason) = if o.sabotage {
                    // Keep "working" whatever happens to the lease.
                    tokio::time::sleep(hold).await;
                    (monotonic_ns(), None, None)
                } else {
                    tokio::select! {
                        biased;
                        reason = guard.lost() => {
                            let t = monotonic_ns();
                            (t, Some(t), Some(format!("{reason:?}")))
                        }
                        () = tokio::time::sleep(hold) => (monotonic_ns(), None, None),
                    }
                };
                let fence = guard.fencing_token();
                let release = match guard.release().await {
                    Ok(()) => Release::Ok,
                    Err(e) if e.is_lost() => Release::Lost,
                    Err(_) => Release::Error,
                };
                let _ = tx.send(Section {
                    key,
                    worker: o.id,
                    task,
                    fence,
                    acquired,
                    end,
                    lost,
                    reason,
                    release,
                });
            }
            Err(e) => {
                *errors.lock().unwrap().entry(kind(&e).into()).or_default() += 1;
                if !e.is_timeout() {
                    tokio::time::sleep(Duration::from_millis(rng.u64(10..100))).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_micros(rng.u64(0..3000))).await;
    }
}

fn kind(e: &Error) -> &'static str {
    match e {
        Error::Timeout { .. } => "timeout",
        Error::Unavailable { .. } => "unavailable",
        Error::Redis { .. } => "redis",
        Error::Closed => "closed",
        Error::Lost { .. } => "lost",
        Error::Auth { .. } => "auth",
        _ => "other",
    }
}
