//! The randomized safety checker.
//!
//! A run is a series of rounds; each round draws a fresh configuration from
//! its seed: the primitive (mutex; semaphore of 2 or 3 permits, where one
//! process may disagree on `max`; reader-writer lock with a random mix of
//! readers and writers), the topology (one server, or Redlock over 3 or 5),
//! and for each worker process its own lease expiry (300 ms to
//! `--max-expiry`), renewal cadence, request timeout, `max_hold`, how often
//! it cancels an acquire at a random point, drops a guard instead of
//! releasing it or cancels the release, and its runtimes (a multi-thread or
//! a current-thread runtime, or a first runtime that is shut down halfway,
//! gracefully or with guards held, after which the same `Locker` goes on
//! from a second runtime).
//!
//! The coordinator starts the servers, each behind a [`FaultProxy`],
//! re-executes itself as the worker processes, and injects faults: on one
//! server any fault, on Redlock only on a random minority of the servers at
//! once. Faults are Redis killed and restarted empty, paused longer than the
//! longest expiry or shorter than the renewal slack, the proxy black-holed,
//! its connections reset, latency spikes. Workers print every critical
//! section as a JSON line; the coordinator checks them (see
//! `distlock_tests::checker`): no two owners without the lost signal first
//! (for a semaphore, never more than `max`; for a reader-writer lock, no
//! writer beside anyone), fencing tokens increasing, and, once every worker
//! has closed its `Locker`, nothing left in Redis but fencing counters.
//!
//! ```text
//! checker [--duration 60s] [--round 30s] [--seed N] [--max-expiry 2s]
//!         [--primitive any|mutex|semaphore|rwlock|multi] [--topology any|single|redlock3|redlock5]
//!         [--rotate] [--workers N] [--faults all|none|KIND,...] [--sabotage]
//!         [--records FILE] [--dry-run]
//! ```
//!
//! - `--round` is the length of one configuration; `--seed` reproduces a run
//!   (each round prints its own seed and the command that replays it).
//! - `--rotate` makes round `i` cover a fixed pair in turn (semaphore on one
//!   server, mutex on Redlock, reader-writer lock anywhere), for short runs
//!   that must cover every primitive: the three rounds run even if set-up
//!   and checks make the run longer than `--duration`.
//! - `--primitive multi` runs mutexes of which half are taken several keys at
//!   once (`Locker::lock_many`, two or three keys in any order, against the
//!   single-key acquisitions of the other half); never drawn at random.
//! - `--faults` picks the kinds of fault: `kill-restart-empty`,
//!   `pause-beyond-expiry`, `pause-within-slack`, `blackhole`,
//!   `reset-connections`, `latency-spike` (default: all).
//! - `--dry-run` prints the first round's configuration and exits.
//! - `--sabotage` makes the workers ignore the lost signal (they keep
//!   working until their planned end): the checker must then fail.
//! - `--records FILE`: for each round that fails, every section as a JSON
//!   line, in `FILE` with the round's seed as its extension.
//!
//! The last line of the output is `summary: {json}`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test tool: a failed step fails the run

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distlock::{Error, LockGuard, Locker, Lost, MultiGuard};
use distlock_tests::checker::{
    analyze, find_stranded, monotonic_ns, Access, Analysis, Held, Release, Section, Stranded,
    ViolationKind,
};
use distlock_tests::{FaultProxy, RedisServer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

const PREFIX: &str = "distlock:";

/// How often the coordinator looks at the lock keys in Redis.
const SAMPLE_EVERY: Duration = Duration::from_millis(25);
/// A lease seen in Redis this long ([`SAMPLE_EVERY`] apart) with nobody
/// believing they hold it is stranded...
const STRANDED_MIN: u64 = 250_000_000;
/// ... unless its section ended less than this before it was last seen (the
/// release is on its way).
const STRANDED_GRACE: u64 = 150_000_000;

// ----- options -----

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Primitive {
    Mutex,
    Semaphore,
    Rwlock,
    /// Mutexes, half of them taken several keys at once (`lock_many`).
    Multi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Topology {
    Single,
    Redlock3,
    Redlock5,
}

impl Topology {
    fn servers(self) -> usize {
        match self {
            Topology::Single => 1,
            Topology::Redlock3 => 3,
            Topology::Redlock5 => 5,
        }
    }
}

/// The coordinator's options.
#[derive(Debug, Clone)]
struct Options {
    duration: Duration,
    round: Duration,
    seed: u64,
    max_expiry: Duration,
    primitive: Option<Primitive>,
    topology: Option<Topology>,
    rotate: bool,
    workers: Option<u32>,
    faults: Vec<FaultKind>,
    sabotage: bool,
    records: Option<PathBuf>,
    dry_run: bool,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Self, String> {
        let mut o = Options {
            duration: Duration::from_secs(60),
            round: Duration::from_secs(30),
            seed: fastrand::u64(..),
            max_expiry: Duration::from_secs(2),
            primitive: None,
            topology: None,
            rotate: false,
            workers: None,
            faults: FAULT_KINDS.to_vec(),
            sabotage: false,
            records: None,
            dry_run: false,
        };
        while let Some(arg) = args.next() {
            let mut value = || args.next().ok_or(format!("{arg} needs a value"));
            match arg.as_str() {
                "--duration" => o.duration = duration(&value()?)?,
                "--round" => o.round = duration(&value()?)?,
                "--seed" => o.seed = number(&value()?)?,
                "--max-expiry" => o.max_expiry = duration(&value()?)?,
                "--primitive" => {
                    o.primitive = match value()?.as_str() {
                        "any" => None,
                        "mutex" => Some(Primitive::Mutex),
                        "semaphore" => Some(Primitive::Semaphore),
                        "rwlock" => Some(Primitive::Rwlock),
                        "multi" => Some(Primitive::Multi),
                        other => return Err(format!("unknown primitive `{other}`")),
                    }
                }
                "--topology" => {
                    o.topology = match value()?.as_str() {
                        "any" => None,
                        "single" => Some(Topology::Single),
                        "redlock3" => Some(Topology::Redlock3),
                        "redlock5" => Some(Topology::Redlock5),
                        other => return Err(format!("unknown topology `{other}`")),
                    }
                }
                "--rotate" => o.rotate = true,
                "--workers" => o.workers = Some(number(&value()?)?),
                "--records" => o.records = Some(value()?.into()),
                "--faults" => o.faults = fault_kinds(&value()?)?,
                "--sabotage" => o.sabotage = true,
                "--dry-run" => o.dry_run = true,
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        if o.workers == Some(0) {
            return Err("--workers must be at least 1".into());
        }
        if o.max_expiry < Duration::from_millis(300) {
            return Err("--max-expiry must be at least 300ms".into());
        }
        if o.round < Duration::from_secs(5) || o.duration < o.round {
            return Err("--round must be at least 5s, and --duration at least --round".into());
        }
        Ok(o)
    }
}

fn fault_kinds(s: &str) -> Result<Vec<FaultKind>, String> {
    match s {
        "all" => Ok(FAULT_KINDS.to_vec()),
        "none" => Ok(Vec::new()),
        list => list
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

// ----- a round's configuration -----

/// How a worker uses runtimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Runtimes {
    /// One multi-thread runtime throughout.
    MultiThread,
    /// One current-thread runtime throughout.
    CurrentThread,
    /// The `Locker` is built and used on a first (current-thread) runtime,
    /// which is shut down at `switch_at`; the same `Locker` then goes on
    /// from a second (multi-thread) runtime. `abrupt`: the first runtime is
    /// dropped with its tasks holding guards, instead of after they stop.
    Switch { abrupt: bool },
}

/// One worker process's settings, drawn by the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WorkerPlan {
    expiry_ms: u64,
    renew_every_ms: Option<u64>,
    op_timeout_ms: u64,
    max_hold_ms: Option<u64>,
    tasks: u32,
    /// Semaphore permits this worker asks for.
    max: u32,
    /// Reader-writer lock: percentage of acquisitions that read.
    read_percent: u32,
    /// Percentage of acquisitions cancelled at a random point.
    cancel_percent: u32,
    /// Percentage of guards dropped instead of released.
    drop_percent: u32,
    /// Percentage of releases cancelled at a random point.
    cancel_release_percent: u32,
    /// Percentage of single `try_acquire` attempts (the others wait).
    try_percent: u32,
    runtimes: Runtimes,
    /// Mutexes taken with `Lock::fair` (a line on the server, handovers).
    #[serde(default)]
    fair: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RoundConfig {
    seed: u64,
    duration_ms: u64,
    primitive: Primitive,
    topology: Topology,
    keys: u32,
    workers: Vec<WorkerPlan>,
}

impl RoundConfig {
    fn draw(o: &Options, index: u32, seed: u64, duration: Duration) -> RoundConfig {
        let mut rng = fastrand::Rng::with_seed(seed);
        // Every draw is made whatever the options force, so that a round
        // replayed with its primitive and topology given is the same round.
        let drawn = *rng
            .choice(&[Primitive::Mutex, Primitive::Semaphore, Primitive::Rwlock])
            .unwrap();
        let any = *rng
            .choice(&[Topology::Single, Topology::Redlock3, Topology::Redlock5])
            .unwrap();
        let redlock = *rng
            .choice(&[Topology::Redlock3, Topology::Redlock5])
            .unwrap();
        let rotation = o.rotate.then_some(index % 3);
        let primitive = o.primitive.unwrap_or(match rotation {
            Some(0) => Primitive::Semaphore,
            Some(1) => Primitive::Mutex,
            Some(_) => Primitive::Rwlock,
            None => drawn,
        });
        let topology = o.topology.unwrap_or(match rotation {
            Some(0) => Topology::Single,
            Some(1) => redlock,
            _ => any,
        });
        // Redlock enforces a semaphore only for one permit (see `check_kind`).
        let max = if topology == Topology::Single {
            rng.u32(2..=3)
        } else {
            1
        };
        let workers = rng.u32(3..=5);
        let workers = o.workers.unwrap_or(workers);
        // In one round in two, a worker disagrees on `max` (where it may).
        let disagree = rng.bool();
        // Drawn apart, so that the other draws of a seed stay what they were.
        let mut fair = fastrand::Rng::with_seed(seed ^ 0xfa1e);
        let max_expiry = u64::try_from(o.max_expiry.as_millis()).unwrap_or(2000);
        let plans = (0..workers)
            .map(|id| {
                // Log-uniform: as many short expiries as long ones.
                let expiry_ms = (300.0 * (max_expiry as f64 / 300.0).powf(rng.f64())) as u64;
                let renew_every_ms = match rng.u32(..3) {
                    0 => None,
                    _ => Some(expiry_ms * rng.u64(20..=45) / 100),
                };
                // Redlock needs its requests well inside the lease (a worker
                // halves a timeout the library refuses).
                let op_timeout_ms = match topology {
                    Topology::Single => expiry_ms / 2,
                    _ => expiry_ms / rng.u64(2..=5),
                };
                let max_hold_ms = (rng.u32(..5) == 0).then(|| expiry_ms * rng.u64(15..=40) / 10);
                let runtimes = match rng.u32(..10) {
                    0..5 => Runtimes::MultiThread,
                    5..7 => Runtimes::CurrentThread,
                    _ => Runtimes::Switch { abrupt: rng.bool() },
                };
                WorkerPlan {
                    expiry_ms,
                    renew_every_ms,
                    op_timeout_ms,
                    max_hold_ms,
                    tasks: rng.u32(2..=4),
                    max: if disagree && id == 0 && topology == Topology::Single {
                        max + 1
                    } else {
                        max
                    },
                    read_percent: rng.u32(30..=90),
                    cancel_percent: *rng.choice(&[0, 5, 15, 30]).unwrap(),
                    drop_percent: *rng.choice(&[0, 10, 30]).unwrap(),
                    cancel_release_percent: *rng.choice(&[0, 5, 15]).unwrap(),
                    try_percent: *rng.choice(&[0, 20, 50]).unwrap(),
                    runtimes,
                    fair: fair.bool(),
                }
            })
            .collect();
        RoundConfig {
            seed,
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            primitive,
            topology,
            // Sets of keys need keys to overlap on.
            keys: rng
                .u32(1..=3)
                .max(if primitive == Primitive::Multi { 3 } else { 1 }),
            workers: plans,
        }
    }

    fn max_expiry(&self) -> Duration {
        Duration::from_millis(
            self.workers
                .iter()
                .map(|w| w.expiry_ms)
                .max()
                .unwrap_or(1000),
        )
    }

    fn min_expiry(&self) -> Duration {
        Duration::from_millis(
            self.workers
                .iter()
                .map(|w| w.expiry_ms)
                .min()
                .unwrap_or(1000),
        )
    }

    fn describe(&self) -> String {
        let workers: Vec<String> = self
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                format!(
                    "w{i}: expiry {}ms{}{} op {}ms, {} tasks{}, cancel {}%, drop {}%, \
                     cancel-release {}%, try {}%, {:?}",
                    w.expiry_ms,
                    w.renew_every_ms
                        .map_or(String::new(), |r| format!(" renew {r}ms")),
                    w.max_hold_ms
                        .map_or(String::new(), |m| format!(" max_hold {m}ms")),
                    w.op_timeout_ms,
                    w.tasks,
                    match self.primitive {
                        Primitive::Mutex if w.fair => ", fair".to_owned(),
                        Primitive::Mutex | Primitive::Multi => String::new(),
                        Primitive::Semaphore => format!(", max {}", w.max),
                        Primitive::Rwlock => format!(", {}% reads", w.read_percent),
                    },
                    w.cancel_percent,
                    w.drop_percent,
                    w.cancel_release_percent,
                    w.try_percent,
                    w.runtimes,
                )
            })
            .collect();
        format!(
            "{:?} on {:?}, {} keys, {} workers\n    {}",
            self.primitive,
            self.topology,
            self.keys,
            self.workers.len(),
            workers.join("\n    ")
        )
    }
}

/// What a worker process is told (as one JSON argument).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WorkerOptions {
    urls: Vec<String>,
    id: u32,
    primitive: Primitive,
    keys: u32,
    plan: WorkerPlan,
    /// `monotonic_ns()` at which the first runtime is shut down (for
    /// [`Runtimes::Switch`]).
    switch_at: u64,
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
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct WorkerSummary {
    worker: u32,
    sections: u64,
    acquire_errors: BTreeMap<String, u64>,
    cancelled_acquires: u64,
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
    servers: Vec<usize>,
    start: u64,
    end: u64,
    detail: String,
}

/// A key found in Redis after every worker closed its `Locker`.
#[derive(Debug, Clone, Serialize)]
struct Leftover {
    server: usize,
    key: String,
    kind: String,
    pttl_ms: i64,
    /// Found right after the workers closed (a holder's key), or still there
    /// after the longest expiry (anything but a fencing counter).
    when: &'static str,
}

/// One round's result.
#[derive(Debug, Serialize)]
struct RoundSummary {
    round: u32,
    seed: u64,
    primitive: Primitive,
    topology: Topology,
    workers: usize,
    acquisitions: u64,
    faults: u64,
    violations: u64,
    leftovers: u64,
    stranded: u64,
    worker_failures: Vec<String>,
    replay: String,
}

/// The machine-readable result, printed as the last line.
#[derive(Debug, Serialize)]
struct RunSummary {
    seed: u64,
    duration_ms: u64,
    sabotage: bool,
    rounds: u64,
    rounds_by_primitive: BTreeMap<Primitive, u64>,
    rounds_by_topology: BTreeMap<Topology, u64>,
    runtime_switches: u64,
    faults: BTreeMap<FaultKind, u64>,
    faults_total: u64,
    acquisitions: u64,
    acquisitions_by_access: BTreeMap<Access, u64>,
    endings: BTreeMap<Release, u64>,
    cancelled_acquires: u64,
    max_concurrent_permits: u64,
    max_concurrent_readers: u64,
    losses_signalled: BTreeMap<String, u64>,
    losses_total: u64,
    lost_at_release: u64,
    release_errors: u64,
    acquire_errors: BTreeMap<String, u64>,
    violations: BTreeMap<ViolationKind, u64>,
    leftover_keys: u64,
    stranded_leases: u64,
    violations_total: u64,
    max_overlap_ms: f64,
    worker_failures: Vec<String>,
    failed_rounds: Vec<RoundSummary>,
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("worker") {
        let json = args.nth(1).expect("worker options");
        let options: WorkerOptions = serde_json::from_str(&json).expect("worker options JSON");
        return worker(options);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match Options::parse(args) {
        Ok(options) => runtime.block_on(coordinate(options)),
        Err(e) => {
            eprintln!("checker: {e}");
            ExitCode::from(2)
        }
    }
}

// ----- the coordinator -----

/// The seed of round `i` of a run seeded with `seed` (round 0 uses `seed`).
fn round_seed(seed: u64, i: u32) -> u64 {
    if i == 0 {
        return seed;
    }
    // splitmix64
    let mut z = seed.wrapping_add(u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct RoundResult {
    analysis: Analysis,
    faults: Vec<Fault>,
    leftovers: Vec<Leftover>,
    stranded: Vec<Stranded>,
    summaries: Vec<WorkerSummary>,
    failures: Vec<String>,
    switches: u64,
}

async fn coordinate(o: Options) -> ExitCode {
    println!(
        "checker: {} in rounds of {}, expiries up to {}, {}, seed {}{}",
        humantime::format_duration(o.duration),
        humantime::format_duration(o.round),
        humantime::format_duration(o.max_expiry),
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
    let started = monotonic_ns();
    let end = started + nanos(o.duration);
    let mut total = Analysis::default();
    let mut all_faults = Vec::new();
    let mut leftovers = 0u64;
    let mut stranded = 0u64;
    let mut acquire_errors = BTreeMap::<String, u64>::new();
    let mut cancelled = 0u64;
    let mut failures = Vec::new();
    let mut failed_rounds = Vec::new();
    let mut by_primitive = BTreeMap::new();
    let mut by_topology = BTreeMap::new();
    let mut switches = 0;
    let mut index = 0u32;
    loop {
        let left = end.saturating_sub(monotonic_ns());
        // The last round takes what is left, if a round's worth is not.
        let length = if left < nanos(o.round) * 3 / 2 {
            Duration::from_nanos(left)
        } else {
            o.round
        };
        // With `--rotate`, every pair gets its round even if the earlier
        // rounds' set-up and checks ate into the duration.
        let owed = o.rotate && index < 3;
        if length < Duration::from_secs(5) && index > 0 && !owed {
            break;
        }
        let length = length.max(Duration::from_secs(5));
        let seed = round_seed(o.seed, index);
        let config = RoundConfig::draw(&o, index, seed, length);
        let replay = format!(
            "checker --seed {seed} --duration {}ms --round {}ms --max-expiry {}ms{}{}{}{}",
            config.duration_ms,
            config.duration_ms,
            o.max_expiry.as_millis(),
            o.workers
                .map_or(String::new(), |w| format!(" --workers {w}")),
            if o.faults == FAULT_KINDS {
                String::new()
            } else if o.faults.is_empty() {
                " --faults none".to_owned()
            } else {
                let names: Vec<&str> = o.faults.iter().map(|k| k.name()).collect();
                format!(" --faults {}", names.join(","))
            },
            if o.rotate || o.primitive.is_some() || o.topology.is_some() {
                format!(
                    " --primitive {} --topology {}",
                    serde_json::to_value(config.primitive)
                        .unwrap()
                        .as_str()
                        .unwrap(),
                    serde_json::to_value(config.topology)
                        .unwrap()
                        .as_str()
                        .unwrap()
                )
            } else {
                String::new()
            },
            if o.sabotage { " --sabotage" } else { "" },
        );
        println!("round {index}: seed {seed}: {}", config.describe());
        if o.dry_run {
            return ExitCode::SUCCESS;
        }
        let r = run_round(&o, &config).await;
        let violations = r.analysis.violations.len() as u64;
        report_round(started, &r);
        *by_primitive.entry(config.primitive).or_default() += 1;
        *by_topology.entry(config.topology).or_default() += 1;
        switches += r.switches;
        for s in &r.summaries {
            for (k, v) in &s.acquire_errors {
                *acquire_errors.entry(k.clone()).or_default() += v;
            }
            cancelled += s.cancelled_acquires;
        }
        leftovers += r.leftovers.len() as u64;
        stranded += r.stranded.len() as u64;
        if violations > 0
            || !r.leftovers.is_empty()
            || !r.stranded.is_empty()
            || !r.failures.is_empty()
        {
            println!("round {index} FAILED; replay it with: {replay}");
            failed_rounds.push(RoundSummary {
                round: index,
                seed,
                primitive: config.primitive,
                topology: config.topology,
                workers: config.workers.len(),
                acquisitions: r.analysis.sections,
                faults: r.faults.len() as u64,
                violations,
                leftovers: r.leftovers.len() as u64,
                stranded: r.stranded.len() as u64,
                worker_failures: r.failures.clone(),
                replay,
            });
        }
        failures.extend(r.failures.iter().map(|f| format!("round {index}: {f}")));
        all_faults.extend(r.faults);
        total.merge(r.analysis);
        index += 1;
        if monotonic_ns() + nanos(Duration::from_secs(5)) >= end {
            break;
        }
    }
    let summary = summarize(
        &o,
        index,
        &all_faults,
        &total,
        leftovers,
        stranded,
        acquire_errors,
        cancelled,
        switches,
        by_primitive,
        by_topology,
        failures,
        failed_rounds,
    );
    println!(
        "total: {} rounds, {} acquisitions ({}), {} faults, {} losses signalled, {} violations \
         ({} keys left in Redis, {} stranded leases)",
        summary.rounds,
        summary.acquisitions,
        summary
            .acquisitions_by_access
            .iter()
            .map(|(k, v)| format!("{k:?} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        summary.faults_total,
        summary.losses_total,
        summary.violations_total,
        summary.leftover_keys,
        summary.stranded_leases,
    );
    println!(
        "summary: {}",
        serde_json::to_string(&summary).expect("summary")
    );
    if summary.violations_total == 0 && summary.worker_failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn run_round(o: &Options, config: &RoundConfig) -> RoundResult {
    let n = config.topology.servers();
    let mut servers = RedisServer::start_many(n).await;
    let mut proxies = Vec::with_capacity(n);
    for s in &servers {
        proxies.push(FaultProxy::start(s.addr()).await);
    }
    let start = monotonic_ns();
    let until = start + config.duration_ms * 1_000_000;
    let exe = std::env::current_exe().expect("own executable");

    let sections = Arc::new(Mutex::new(Vec::<Section>::new()));
    let summaries = Arc::new(Mutex::new(Vec::<WorkerSummary>::new()));
    let mut children = Vec::new();
    let mut readers = Vec::new();
    let mut switches = 0;
    for (id, plan) in config.workers.iter().enumerate() {
        let id = u32::try_from(id).unwrap();
        if matches!(plan.runtimes, Runtimes::Switch { .. }) {
            switches += 1;
        }
        let wo = WorkerOptions {
            urls: proxies.iter().map(FaultProxy::url).collect(),
            id,
            primitive: config.primitive,
            keys: config.keys,
            plan: plan.clone(),
            switch_at: start + (until - start) * 2 / 5,
            until,
            seed: config.seed.wrapping_add(u64::from(id + 1) * 0x9E37_79B9),
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

    let stop_sampling = CancellationToken::new();
    let sampler = tokio::spawn(sample(
        servers.iter().map(RedisServer::url).collect(),
        config.primitive,
        config.keys,
        stop_sampling.clone(),
    ));
    let mut rng = fastrand::Rng::with_seed(config.seed ^ 0xFA17);
    let faults = if o.faults.is_empty() {
        sleep_until_ns(until).await;
        Vec::new()
    } else {
        run_faults(&mut servers, &proxies, o, config, until, &mut rng).await
    };
    for p in &proxies {
        p.restore();
    }

    let mut failures = Vec::new();
    let deadline = Duration::from_secs(30) + config.max_expiry() * 10;
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
    stop_sampling.cancel();
    let held = sampler.await.expect("sampler");
    let leftovers = leftovers(&servers, config.max_expiry()).await;
    let sections = std::mem::take(&mut *sections.lock().unwrap());
    let max_expiry = nanos(config.max_expiry());
    let excused: Vec<(u64, u64)> = faults
        .iter()
        .map(|f| {
            (
                f.start.saturating_sub(100_000_000),
                f.end + max_expiry + 500_000_000,
            )
        })
        .collect();
    let stranded = find_stranded(
        &held,
        &sections,
        &excused,
        STRANDED_MIN,
        STRANDED_GRACE,
        |w| {
            config
                .workers
                .get(w as usize)
                .map_or(max_expiry, |p| p.expiry_ms * 1_000_000)
        },
    );
    let summaries = std::mem::take(&mut *summaries.lock().unwrap());
    if summaries.len() != config.workers.len() {
        failures.push(format!(
            "{} of {} workers reported a summary",
            summaries.len(),
            config.workers.len()
        ));
    }
    for s in &summaries {
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
    let analysis = analyze(&sections);
    if let Some(path) = &o.records {
        if !analysis.violations.is_empty()
            || !failures.is_empty()
            || !stranded.is_empty()
            || !leftovers.is_empty()
        {
            write_records(path, config.seed, &sections);
        }
    }
    drop(proxies);
    drop(servers);
    RoundResult {
        analysis,
        faults,
        leftovers,
        stranded,
        summaries,
        failures,
        switches,
    }
}

/// Samples every lock key's holders on every server (directly, not through
/// the proxies) until `stop`; a server that does not answer in 50 ms is
/// skipped for that round.
async fn sample(
    urls: Vec<String>,
    primitive: Primitive,
    keys: u32,
    stop: CancellationToken,
) -> Vec<Held> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(100)))
        .set_response_timeout(Some(Duration::from_millis(50)));
    let mut conns: Vec<Option<redis::aio::MultiplexedConnection>> = vec![None; urls.len()];
    let mut seen: BTreeMap<(usize, String, String), Held> = BTreeMap::new();
    while !stop.is_cancelled() {
        for (server, url) in urls.iter().enumerate() {
            if conns[server].is_none() {
                let client = redis::Client::open(url.as_str()).expect("server URL");
                conns[server] = tokio::time::timeout(
                    Duration::from_millis(150),
                    client.get_multiplexed_async_connection_with_config(&config),
                )
                .await
                .ok()
                .and_then(Result::ok);
            }
            let Some(conn) = conns[server].as_mut() else {
                continue;
            };
            let mut pipe = redis::pipe();
            pipe.cmd("TIME");
            let mut names = Vec::new();
            for k in 0..keys {
                let key = format!("key-{k}");
                let base = format!("{PREFIX}{{{key}}}");
                match primitive {
                    Primitive::Mutex | Primitive::Multi => {
                        pipe.cmd("GET").arg(&base);
                        names.push((key, false));
                    }
                    Primitive::Semaphore => {
                        pipe.cmd("ZRANGE")
                            .arg(format!("{base}:sem"))
                            .arg(0)
                            .arg(-1)
                            .arg("WITHSCORES");
                        names.push((key, true));
                    }
                    Primitive::Rwlock => {
                        pipe.cmd("GET").arg(format!("{base}:rw:w"));
                        pipe.cmd("ZRANGE")
                            .arg(format!("{base}:rw:r"))
                            .arg(0)
                            .arg(-1)
                            .arg("WITHSCORES");
                        names.push((key.clone(), false));
                        names.push((key, true));
                    }
                }
            }
            let t = monotonic_ns();
            let reply: Result<Vec<redis::Value>, _> =
                tokio::time::timeout(Duration::from_millis(60), pipe.query_async(conn))
                    .await
                    .unwrap_or_else(|_| {
                        Err(redis::RedisError::from((
                            redis::ErrorKind::Io,
                            "sample timed out",
                        )))
                    });
            let Ok(mut values) = reply else {
                conns[server] = None;
                continue;
            };
            if values.len() != names.len() + 1 {
                continue;
            }
            let time: Vec<u64> = redis::from_redis_value(values.remove(0)).unwrap_or_default();
            let now_ms = time.first().copied().unwrap_or(0) * 1000
                + time.get(1).copied().unwrap_or(0) / 1000;
            for ((key, sorted), value) in names.into_iter().zip(values) {
                let tokens: Vec<String> = if sorted {
                    let members: Vec<(String, f64)> =
                        redis::from_redis_value(value).unwrap_or_default();
                    members
                        .into_iter()
                        .filter(|(_, score)| *score > now_ms as f64)
                        .map(|(m, _)| m)
                        .collect()
                } else {
                    let v: Option<String> = redis::from_redis_value(value).unwrap_or_default();
                    v.into_iter().collect()
                };
                for token in tokens {
                    seen.entry((server, key.clone(), token.clone()))
                        .and_modify(|h| h.last = t)
                        .or_insert(Held {
                            server,
                            key: key.clone(),
                            token,
                            first: t,
                            last: t,
                        });
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
    }
    seen.into_values().collect()
}

/// The workers' longest retry backoff.
const RETRY_MAX: Duration = Duration::from_millis(200);

/// How long a waiting writer's intent lives after its last refresh (the
/// library's rule: three times the longest backoff, at least 1 s). A writer
/// waiting when its worker closed leaves one that lives this long.
fn intent_lifetime() -> Duration {
    (RETRY_MAX * 3).max(Duration::from_secs(1))
}

/// Keys under the prefix on every server: holders right after the workers
/// closed, then anything but fencing counters after the longest expiry (and
/// the longest intent).
async fn leftovers(servers: &[RedisServer], max_expiry: Duration) -> Vec<Leftover> {
    let mut out = Vec::new();
    for (when, holders_only) in [("after close", true), ("after the longest expiry", false)] {
        if !holders_only {
            let settle = max_expiry.max(intent_lifetime());
            tokio::time::sleep(settle + Duration::from_millis(200)).await;
        }
        for (i, s) in servers.iter().enumerate() {
            let mut conn = s.conn().await;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{PREFIX}*"))
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            for key in keys {
                // Fencing counters and the restart quarantine's expiry
                // register stay by design.
                if key.ends_with(":fence") || key.ends_with("~expiry-register") {
                    continue;
                }
                // A fair mutex's line outlives its last ticket by half a
                // ticket's life, under an expiry.
                let aux = key.ends_with(":sem:max")
                    || key.ends_with(":rw:i")
                    || key.ends_with(":line")
                    || key.ends_with(":tickets");
                if holders_only && aux {
                    continue;
                }
                if out.iter().any(|l: &Leftover| l.server == i && l.key == key) {
                    continue;
                }
                let kind: String = redis::cmd("TYPE")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                let pttl: i64 = redis::cmd("PTTL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or(-3);
                if kind == "none" {
                    continue;
                }
                out.push(Leftover {
                    server: i,
                    key,
                    kind,
                    pttl_ms: pttl,
                    when,
                });
            }
        }
    }
    out
}

/// Injects one fault at a time (each chosen kind once per deck, in a random
/// order), with calm periods between them, until shortly before `until`. On
/// Redlock a fault hits a random minority of the servers at once.
async fn run_faults(
    servers: &mut [RedisServer],
    proxies: &[FaultProxy],
    o: &Options,
    config: &RoundConfig,
    until: u64,
    rng: &mut fastrand::Rng,
) -> Vec<Fault> {
    let (lo_e, hi_e) = (config.min_expiry(), config.max_expiry());
    let between = |rng: &mut fastrand::Rng, e: Duration, lo: f64, hi: f64| {
        e.mul_f64(lo + rng.f64() * (hi - lo))
    };
    let n = servers.len();
    let minority = n - (n / 2 + 1);
    let mut faults = Vec::new();
    let mut deck: Vec<FaultKind> = Vec::new();
    // Let every worker connect and contend before the first fault.
    tokio::time::sleep(hi_e).await;
    // The longest fault lasts 2.5 expiries; stop so that the last one ends,
    // and the workers recover, before they stop.
    while monotonic_ns() + nanos(hi_e * 4) < until {
        tokio::time::sleep(between(rng, lo_e, 0.3, 1.5)).await;
        if deck.is_empty() {
            deck = o.faults.clone();
            rng.shuffle(&mut deck);
        }
        let Some(kind) = deck.pop() else { break };
        let mut hit: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut hit);
        hit.truncate(if n == 1 { 1 } else { rng.usize(1..=minority) });
        hit.sort_unstable();
        let start = monotonic_ns();
        let detail = match kind {
            FaultKind::KillRestartEmpty => {
                // Often back before anyone's renewal noticed; else long down.
                let down = if rng.bool() {
                    between(rng, lo_e, 0.0, 0.2)
                } else {
                    between(rng, hi_e, 0.0, 1.5)
                };
                for &i in &hit {
                    servers[i].kill();
                }
                tokio::time::sleep(down).await;
                for &i in &hit {
                    servers[i].restart().await;
                }
                format!("down {}", ms(down))
            }
            FaultKind::PauseBeyondExpiry => {
                let paused = between(rng, hi_e, 1.2, 2.5);
                for &i in &hit {
                    servers[i].pause();
                }
                tokio::time::sleep(paused).await;
                for &i in &hit {
                    servers[i].resume();
                }
                format!("paused {}", ms(paused))
            }
            FaultKind::PauseWithinSlack => {
                // The renewal slack is validity - cadence, above half the expiry.
                let paused = between(rng, lo_e, 0.05, 0.3);
                for &i in &hit {
                    servers[i].pause();
                }
                tokio::time::sleep(paused).await;
                for &i in &hit {
                    servers[i].resume();
                }
                format!("paused {}", ms(paused))
            }
            FaultKind::Blackhole => {
                let cut = between(rng, hi_e, 0.2, 2.0);
                for &i in &hit {
                    proxies[i].blackhole();
                }
                tokio::time::sleep(cut).await;
                for &i in &hit {
                    proxies[i].restore();
                }
                format!("black-holed {}", ms(cut))
            }
            FaultKind::ResetConnections => {
                let mut open = 0;
                for &i in &hit {
                    open += proxies[i].connections();
                    proxies[i].reset_all();
                }
                format!("{open} connections reset")
            }
            FaultKind::LatencySpike => {
                let latency = between(rng, lo_e, 0.005, 0.2);
                let lasting = between(rng, hi_e, 1.0, 2.5);
                for &i in &hit {
                    proxies[i].set_latency(latency);
                }
                tokio::time::sleep(lasting).await;
                for &i in &hit {
                    proxies[i].restore();
                }
                format!("+{} each way for {}", ms(latency), ms(lasting))
            }
        };
        faults.push(Fault {
            kind,
            servers: hit,
            start,
            end: monotonic_ns(),
            detail,
        });
    }
    sleep_until_ns(until).await;
    faults
}

fn report_round(start: u64, r: &RoundResult) {
    let rel = |t: u64| t.saturating_sub(start) as f64 / 1e9;
    let a = &r.analysis;
    let mut kinds = BTreeMap::new();
    for f in &r.faults {
        *kinds.entry(f.kind).or_insert(0u64) += 1;
    }
    let mut errors = BTreeMap::<String, u64>::new();
    let mut cancelled = 0;
    for s in &r.summaries {
        for (k, v) in &s.acquire_errors {
            *errors.entry(k.clone()).or_default() += v;
        }
        cancelled += s.cancelled_acquires;
    }
    println!(
        "  {} acquisitions ({:?}), endings {:?}, {cancelled} acquires cancelled, \
         faults {:?}, losses {:?}, lost at release {}, acquire errors {:?}, \
         most permits at once {}, most readers at once {}",
        a.sections,
        a.per_access,
        a.endings,
        kinds,
        a.losses,
        a.lost_at_release,
        errors,
        a.max_concurrent_permits,
        a.max_concurrent_readers,
    );
    let mut counts = BTreeMap::new();
    for v in &a.violations {
        *counts.entry(v.kind).or_insert(0u64) += 1;
    }
    if !counts.is_empty() {
        println!("  violations: {counts:?}");
    }
    for v in a.violations.iter().take(20) {
        let near: Vec<String> = r
            .faults
            .iter()
            .filter(|f| {
                f.start <= v.second.acquired + 5_000_000_000
                    && f.end + 5_000_000_000 >= v.first.acquired
            })
            .map(|f| {
                format!(
                    "{:?} on {:?} {:.3}s..{:.3}s ({})",
                    f.kind,
                    f.servers,
                    rel(f.start),
                    rel(f.end),
                    f.detail
                )
            })
            .collect();
        println!(
            "  {:?} on {}: w{}t{} {:?}{} fence {} held {:.3}s..{:.3}s (lost {:?} {:?}, {:?}); \
             w{}t{} {:?}{} fence {} requested {:.3}s acquired {:.3}s; overlap {:.3} ms; \
             faults near: [{}]",
            v.kind,
            v.first.key,
            v.first.worker,
            v.first.task,
            v.first.access,
            v.first.max.map_or(String::new(), |m| format!(" (max {m})")),
            v.first.fence,
            rel(v.first.acquired),
            rel(v.first.end),
            v.first.lost.map(rel),
            v.first.reason,
            v.first.release,
            v.second.worker,
            v.second.task,
            v.second.access,
            v.second
                .max
                .map_or(String::new(), |m| format!(" (max {m})")),
            v.second.fence,
            rel(v.second.requested),
            rel(v.second.acquired),
            v.overlap_ns() as f64 / 1e6,
            near.join("; ")
        );
    }
    for x in r.stranded.iter().take(20) {
        println!(
            "  stranded on server {}: `{}` held by {} (w{:?}) from {:.3}s to {:.3}s; \
             its worker's last section there: {}",
            x.held.server,
            x.held.key,
            x.held.token.split(':').next().unwrap_or(""),
            x.held.worker(),
            rel(x.held.first),
            rel(x.held.last),
            x.nearest.as_ref().map_or("none".to_owned(), |s| format!(
                "t{} {:?} fence {} requested {:.3}s acquired {:.3}s end {:.3}s ({:?})",
                s.task,
                s.access,
                s.fence,
                rel(s.requested),
                rel(s.acquired),
                rel(s.end),
                s.release
            )),
        );
    }
    for l in &r.leftovers {
        println!(
            "  left in Redis {}: server {} `{}` ({}, pttl {} ms)",
            l.when, l.server, l.key, l.kind, l.pttl_ms
        );
    }
    for f in &r.failures {
        println!("  worker failure: {f}");
    }
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    o: &Options,
    rounds: u32,
    faults: &[Fault],
    a: &Analysis,
    leftover_keys: u64,
    stranded_leases: u64,
    acquire_errors: BTreeMap<String, u64>,
    cancelled_acquires: u64,
    runtime_switches: u64,
    rounds_by_primitive: BTreeMap<Primitive, u64>,
    rounds_by_topology: BTreeMap<Topology, u64>,
    worker_failures: Vec<String>,
    failed_rounds: Vec<RoundSummary>,
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
        duration_ms: u64::try_from(o.duration.as_millis()).unwrap_or(u64::MAX),
        sabotage: o.sabotage,
        rounds: u64::from(rounds),
        rounds_by_primitive,
        rounds_by_topology,
        runtime_switches,
        faults_total: faults.len() as u64,
        faults: by_kind,
        acquisitions: a.sections,
        acquisitions_by_access: a.per_access.clone(),
        endings: a.endings.clone(),
        cancelled_acquires,
        max_concurrent_permits: a.max_concurrent_permits,
        max_concurrent_readers: a.max_concurrent_readers,
        losses_total: a.losses.values().sum(),
        losses_signalled: a.losses.clone(),
        lost_at_release: a.lost_at_release,
        release_errors: a.release_errors,
        acquire_errors,
        leftover_keys,
        stranded_leases,
        violations_total: a.violations.len() as u64 + leftover_keys + stranded_leases,
        violations,
        max_overlap_ms: max_overlap as f64 / 1e6,
        worker_failures,
        failed_rounds,
    }
}

fn write_records(path: &std::path::Path, seed: u64, sections: &[Section]) {
    let path = path.with_extension(format!("{seed}.jsonl"));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).expect("records file"));
    for s in sections {
        serde_json::to_writer(&mut file, s).expect("record");
        file.write_all(b"\n").expect("record");
    }
    println!("  records written to {}", path.display());
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

/// What the tasks of a worker share.
#[derive(Clone)]
struct Shared {
    o: Arc<WorkerOptions>,
    out: std::sync::mpsc::Sender<Section>,
    errors: Arc<Mutex<BTreeMap<String, u64>>>,
    cancelled: Arc<Mutex<u64>>,
}

fn worker(o: WorkerOptions) -> ExitCode {
    let (tx, rx) = std::sync::mpsc::channel::<Section>();
    let printer = std::thread::spawn(move || {
        let stdout = std::io::stdout();
        let mut count = 0u64;
        while let Ok(s) = rx.recv() {
            let mut out = stdout.lock();
            serde_json::to_writer(&mut out, &Line::Section(s)).expect("stdout");
            out.write_all(b"\n").expect("stdout");
            count += 1;
        }
        count
    });
    let shared = Shared {
        o: Arc::new(o.clone()),
        out: tx,
        errors: Arc::default(),
        cancelled: Arc::default(),
    };
    let multi = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    };
    let current = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    };
    let first = match o.plan.runtimes {
        Runtimes::MultiThread => multi(),
        Runtimes::CurrentThread | Runtimes::Switch { .. } => current(),
    };
    let Some(locker) = first.block_on(connect(&o)) else {
        return ExitCode::FAILURE;
    };
    let expiry = Duration::from_millis(o.plan.expiry_ms);
    let last = match o.plan.runtimes {
        Runtimes::Switch { abrupt } => {
            if abrupt {
                // Tasks still holding guards when the runtime goes.
                first.block_on(async {
                    for task in 0..o.plan.tasks {
                        tokio::spawn(contend(locker.clone(), shared.clone(), task, o.until));
                    }
                    sleep_until_ns(o.switch_at).await;
                });
            } else {
                first.block_on(run_tasks(&locker, &shared, o.switch_at));
            }
            drop(first);
            let second = multi();
            second.block_on(run_tasks(&locker, &shared, o.until));
            second
        }
        _ => {
            first.block_on(run_tasks(&locker, &shared, o.until));
            first
        }
    };
    let close_error = last.block_on(async {
        match tokio::time::timeout(expiry * 10, locker.close()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("close did not finish".into()),
        }
    });
    drop(last);
    let Shared {
        out,
        errors,
        cancelled,
        ..
    } = shared;
    drop(out);
    let sections = printer.join().expect("printer");
    let summary = WorkerSummary {
        worker: o.id,
        sections,
        acquire_errors: std::mem::take(&mut *errors.lock().unwrap()),
        cancelled_acquires: *cancelled.lock().unwrap(),
        close_error,
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &Line::Summary(summary)).expect("stdout");
    out.write_all(b"\n").expect("stdout");
    out.flush().expect("stdout");
    ExitCode::SUCCESS
}

async fn connect(o: &WorkerOptions) -> Option<Locker> {
    let p = &o.plan;
    let expiry = Duration::from_millis(p.expiry_ms);
    let mut op_timeout = Duration::from_millis(p.op_timeout_ms);
    let mut builder = Locker::builder()
        .expiry(expiry)
        .connect_timeout(expiry)
        .retry_backoff(Duration::from_millis(10), RETRY_MAX)
        .owner_tag(format!("w{}:", o.id));
    builder = if o.urls.len() == 1 {
        builder.url(&o.urls[0])
    } else {
        builder.redlock(o.urls.clone())
    };
    if let Some(r) = p.renew_every_ms {
        builder = builder.renew_every(Duration::from_millis(r));
    }
    if let Some(m) = p.max_hold_ms {
        builder = builder.max_hold(Duration::from_millis(m));
    }
    loop {
        match builder.clone().op_timeout(op_timeout).build().await {
            Ok(l) => return Some(l),
            Err(Error::Config { message: e, .. }) if op_timeout > Duration::from_millis(20) => {
                eprintln!(
                    "worker {}: op_timeout {op_timeout:?} refused ({e}); halving it",
                    o.id
                );
                op_timeout /= 2;
            }
            Err(e) if monotonic_ns() < o.until => {
                eprintln!("worker {}: connecting: {e}; retrying", o.id);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                eprintln!("worker {}: could not connect: {e}", o.id);
                return None;
            }
        }
    }
}

async fn run_tasks(locker: &Locker, shared: &Shared, until: u64) {
    let tasks: Vec<_> = (0..shared.o.plan.tasks)
        .map(|task| tokio::spawn(contend(locker.clone(), shared.clone(), task, until)))
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
}

/// A section being run: sent when finished, or, if the task is dropped
/// while holding (its runtime shut down), when dropped.
struct Open {
    /// One per key held (several for `lock_many`).
    sections: Vec<Section>,
    out: std::sync::mpsc::Sender<Section>,
}

impl Open {
    /// The work is over (or the lease was lost): the belief ends at `end`.
    fn ended(&mut self, end: u64, lost: Option<u64>, reason: Option<String>) {
        for s in &mut self.sections {
            s.end = end;
            s.lost = lost;
            s.reason.clone_from(&reason);
        }
    }

    fn finish(mut self, release: Release) {
        for mut s in self.sections.drain(..) {
            s.release = release;
            let _ = self.out.send(s);
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        for mut s in self.sections.drain(..) {
            if s.end == 0 {
                s.end = monotonic_ns();
            }
            s.release = Release::Abandoned;
            let _ = self.out.send(s);
        }
    }
}

/// A guard of one key or of several.
enum Guard {
    One(LockGuard),
    Many(MultiGuard),
}

impl Guard {
    /// Each key held, with its fencing token.
    fn fences(&self) -> Vec<(String, u64)> {
        match self {
            Guard::One(g) => vec![(g.key().to_owned(), g.fencing_token())],
            Guard::Many(g) => g
                .guards()
                .iter()
                .map(|g| (g.key().to_owned(), g.fencing_token()))
                .collect(),
        }
    }

    fn lost(&self) -> Lost {
        match self {
            Guard::One(g) => g.lost(),
            Guard::Many(g) => g.lost(),
        }
    }

    async fn release(self) -> Result<(), Error> {
        match self {
            Guard::One(g) => g.release().await,
            Guard::Many(g) => g.release().await,
        }
    }
}

/// One acquisition as the worker's plan says: waiting or one attempt,
/// perhaps cancelled at a random point (`Ok(None)` then, or when busy).
async fn attempt(
    locker: &Locker,
    o: &WorkerOptions,
    rng: &mut fastrand::Rng,
    access: Access,
    key: &str,
    wait: Duration,
) -> Result<Option<Guard>, Error> {
    if o.primitive == Primitive::Multi && rng.bool() {
        // This key and one or two others, in any order.
        let mut keys = vec![key.to_owned()];
        for _ in 0..rng.u32(1..=2) {
            keys.push(format!("key-{}", rng.u32(..o.keys)));
        }
        let lock = locker.lock_many(keys);
        let got = if rng.u32(..100) < o.plan.try_percent {
            lock.try_acquire().await
        } else {
            lock.acquire_timeout(wait).await.map(Some)
        };
        return got.map(|g| g.map(Guard::Many));
    }
    let lock = match access {
        Access::Mutex => locker.lock(key).fair(o.plan.fair),
        Access::Semaphore => {
            let sem = locker.semaphore(key, o.plan.max);
            let try_it = rng.u32(..100) < o.plan.try_percent;
            let got = if try_it {
                sem.try_acquire().await
            } else {
                sem.acquire_timeout(wait).await.map(Some)
            };
            return got.map(|g| g.map(Guard::One));
        }
        Access::Read => locker.rw_lock(key).reader(),
        Access::Write => locker.rw_lock(key).writer(),
    };
    let got = if rng.u32(..100) < o.plan.try_percent {
        lock.try_acquire().await
    } else {
        lock.acquire_timeout(wait).await.map(Some)
    };
    got.map(|g| g.map(Guard::One))
}

/// One task: acquire a random key, hold it for a random time while watching
/// the lost signal, end the section in one of the planned ways, record,
/// repeat until `until`.
async fn contend(locker: Locker, shared: Shared, task: u32, until: u64) {
    let o = Arc::clone(&shared.o);
    let mut rng = fastrand::Rng::with_seed(o.seed ^ (u64::from(task) << 40) ^ until);
    let expiry = Duration::from_millis(o.plan.expiry_ms);
    loop {
        let now = monotonic_ns();
        if now >= until {
            return;
        }
        let key = format!("key-{}", rng.u32(..o.keys));
        let access = match o.primitive {
            Primitive::Mutex | Primitive::Multi => Access::Mutex,
            Primitive::Semaphore => Access::Semaphore,
            Primitive::Rwlock if rng.u32(..100) < o.plan.read_percent => Access::Read,
            Primitive::Rwlock => Access::Write,
        };
        let wait =
            Duration::from_millis(rng.u64(100..=2000)).min(Duration::from_nanos(until - now));
        let requested = monotonic_ns();
        let result = if rng.u32(..100) < o.plan.cancel_percent {
            // Cancel at a random point: after the first poll, or a little later.
            let after = Duration::from_micros(rng.u64(0..30_000));
            let mut r2 = fastrand::Rng::with_seed(rng.u64(..));
            tokio::select! {
                biased;
                r = attempt(&locker, &o, &mut r2, access, &key, wait) => r,
                () = tokio::time::sleep(after) => {
                    *shared.cancelled.lock().unwrap() += 1;
                    Ok(None)
                }
            }
        } else {
            attempt(&locker, &o, &mut rng, access, &key, wait).await
        };
        match result {
            Ok(Some(guard)) => {
                let acquired = monotonic_ns();
                // Dropped before the guard if the task is dropped.
                let sections = guard
                    .fences()
                    .into_iter()
                    .map(|(key, fence)| Section {
                        key,
                        worker: o.id,
                        task,
                        access,
                        max: (access == Access::Semaphore).then_some(o.plan.max),
                        fence,
                        requested,
                        acquired,
                        end: 0,
                        lost: None,
                        reason: None,
                        release: Release::Ok,
                    })
                    .collect();
                let mut open = Open {
                    sections,
                    out: shared.out.clone(),
                };
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
                open.ended(end, lost, reason);
                let release = if rng.u32(..100) < o.plan.drop_percent {
                    drop(guard);
                    Release::Dropped
                } else if rng.u32(..100) < o.plan.cancel_release_percent {
                    let after = Duration::from_micros(rng.u64(0..5_000));
                    tokio::select! {
                        biased;
                        r = guard.release() => release_outcome(r),
                        () = tokio::time::sleep(after) => Release::Cancelled,
                    }
                } else {
                    release_outcome(guard.release().await)
                };
                open.finish(release);
            }
            Ok(None) => {}
            Err(e) => {
                *shared.errors.lock().unwrap().entry(kind(&e)).or_default() += 1;
                if !e.is_timeout() {
                    tokio::time::sleep(Duration::from_millis(rng.u64(10..100))).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_micros(rng.u64(0..3000))).await;
    }
}

fn release_outcome(r: Result<(), Error>) -> Release {
    match r {
        Ok(()) => Release::Ok,
        Err(e) if e.is_lost() => Release::Lost,
        Err(_) => Release::Error,
    }
}

fn kind(e: &Error) -> String {
    match e {
        Error::Timeout { .. } => "timeout".into(),
        Error::Unavailable { .. } => "unavailable".into(),
        Error::Redis { .. } => "redis".into(),
        Error::Closed => "closed".into(),
        Error::Lost { .. } => "lost".into(),
        Error::Auth { .. } => "auth".into(),
        Error::Quorum { .. } => "quorum".into(),
        Error::Config { message: msg, .. } => {
            format!("config: {}", msg.chars().take(60).collect::<String>())
        }
        other => format!("other: {other}"),
    }
}
