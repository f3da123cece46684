//! distlock's benchmark: each scenario against the physical floor (the least
//! work Redis needs for a lock, done by hand) and against rslock, interleaved
//! in one run on one machine, so that every figure is a ratio to a baseline
//! measured alongside it.
//!
//! ```sh
//! cargo bench -p distlock-tests --bench locks
//! DISTLOCK_BENCH_QUICK=1 cargo bench -p distlock-tests --bench locks   # shorter
//! DISTLOCK_BENCH_ONLY=P1,P3 cargo bench -p distlock-tests --bench locks # some scenarios
//! ```
//!
//! It starts its own `redis-server` on a free port (or uses
//! `DISTLOCK_BENCH_REDIS_URL`), prints one Markdown table and writes JSON to
//! `DISTLOCK_BENCH_JSON` (default `target/distlock-bench.json`). See
//! BENCHMARKS.md at the repository root.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed run

mod floor;
mod handoff;
mod latency;
mod measure;
mod probe;
mod report;
mod scale;
mod throughput;
mod tower;
mod transfer;

use std::path::PathBuf;
use std::time::Duration;

use distlock::Locker;
use distlock_tests::RedisServer;
use redis::aio::MultiplexedConnection;
use serde_json::json;

use report::Row;

/// Durations and sizes of a run.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    quick: bool,
    /// Rounds of the short scenarios (P1), each arm once per round.
    pub(crate) rounds: usize,
    /// How long one arm of P1 runs per round.
    pub(crate) p1_time: Duration,
    /// Rounds of the long scenarios (P2, P4).
    pub(crate) long_rounds: usize,
    /// How long one arm of P2 or P4 runs per round.
    pub(crate) long_time: Duration,
    pub(crate) p3_samples: usize,
    pub(crate) p7_locks: usize,
    pub(crate) p8_waiters: usize,
    only: Option<Vec<String>>,
}

impl Config {
    fn from_env() -> Config {
        let quick = std::env::var("DISTLOCK_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let only = std::env::var("DISTLOCK_BENCH_ONLY").ok().map(|v| {
            v.split(',')
                .map(|s| s.trim().to_uppercase())
                .filter(|s| !s.is_empty())
                .collect()
        });
        if quick {
            Config {
                quick,
                rounds: 3,
                p1_time: Duration::from_millis(300),
                long_rounds: 1,
                long_time: Duration::from_secs(1),
                p3_samples: 200,
                p7_locks: 20_000,
                p8_waiters: 200,
                only,
            }
        } else {
            Config {
                quick,
                rounds: 9,
                p1_time: Duration::from_secs(1),
                long_rounds: 3,
                long_time: Duration::from_secs(5),
                p3_samples: 1000,
                p7_locks: 100_000,
                p8_waiters: 1000,
                only,
            }
        }
    }

    fn wants(&self, id: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|o| o == id))
    }
}

/// What every scenario needs: the server and the run's configuration.
pub(crate) struct Env {
    pub(crate) url: String,
    pub(crate) cfg: Config,
}

impl Env {
    /// A plain multiplexed connection to the server (for the floor and probes).
    pub(crate) async fn server_conn(&self) -> MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connecting to redis")
    }

    /// A distlock `Locker` with default options: one replica.
    pub(crate) async fn locker(&self) -> Locker {
        Locker::builder()
            .url(&self.url)
            .build()
            .await
            .expect("distlock locker")
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if std::env::var(scale::CHILD_ENV).is_ok() {
        let out = rt.block_on(scale::p7_child());
        println!("{out}");
        return;
    }
    if let Ok(arm) = std::env::var("DISTLOCK_BENCH_PROFILE") {
        rt.block_on(profile(&arm));
        return;
    }
    rt.block_on(run(Config::from_env()));
}

/// Runs one arm alone, for a profiler (`perf record`, `valgrind --tool=callgrind`):
/// `DISTLOCK_BENCH_PROFILE=p1:floor|p1:distlock|p1:rslock`, for
/// `DISTLOCK_BENCH_PROFILE_SECS` (default 5) against a private server.
async fn profile(arm: &str) {
    let server = RedisServer::start().await;
    let secs: f64 = std::env::var("DISTLOCK_BENCH_PROFILE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5.0);
    let env = Env {
        url: server.url(),
        cfg: Config::from_env(),
    };
    let rate = throughput::p1_arm(&env, arm, Duration::from_secs_f64(secs)).await;
    println!("{arm}: {rate:.0} pairs/s");
    // The server's side of it: time per command (scripts include their calls).
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut env.server_conn().await)
        .await
        .unwrap_or_default();
    for line in info.lines().filter(|l| l.starts_with("cmdstat_")) {
        println!("  {line}");
    }
}

async fn run(cfg: Config) {
    let (_server, url) = match std::env::var("DISTLOCK_BENCH_REDIS_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let server = RedisServer::start().await;
            let url = server.url();
            (Some(server), url)
        }
    };
    let env = Env { url, cfg };
    let mut conn = env.server_conn().await;
    let machine = probe::machine(&mut conn).await;
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    eprintln!(
        "distlock bench: {machine}; {}",
        if env.cfg.quick {
            "quick run"
        } else {
            "full run"
        }
    );

    type Scenario = fn(&Env) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Row>> + '_>>;
    let scenarios: [(&str, Scenario); 10] = [
        ("P1", |e| Box::pin(throughput::p1(e))),
        ("P2", |e| Box::pin(throughput::p2(e))),
        ("P3", |e| Box::pin(latency::p3(e))),
        ("P4", |e| Box::pin(throughput::p4(e))),
        ("P5", |e| Box::pin(tower::p5(e))),
        ("P6", |e| Box::pin(tower::p6(e))),
        ("P7", |e| Box::pin(scale::p7(e))),
        ("P8", |e| Box::pin(scale::p8(e))),
        ("P9", |e| Box::pin(transfer::p9(e))),
        ("P10", |e| Box::pin(handoff::p10(e))),
    ];
    let mut rows = Vec::new();
    for (id, scenario) in scenarios {
        if !env.cfg.wants(id) {
            continue;
        }
        eprintln!("running {id} ...");
        let started = std::time::Instant::now();
        let new = scenario(&env).await;
        eprintln!("{}", report::table(&new));
        eprintln!("{id} took {:.1} s", started.elapsed().as_secs_f64());
        rows.extend(new);
    }

    let command = if env.cfg.quick {
        "DISTLOCK_BENCH_QUICK=1 cargo bench -p distlock-tests --bench locks"
    } else {
        "cargo bench -p distlock-tests --bench locks"
    };
    println!("\nMachine: {machine}\nDate: {date}\nCommand: `{command}`\n");
    println!("{}", report::table(&rows));
    let header = json!({
        "machine": machine, "date": date, "command": command, "quick": env.cfg.quick,
        "rounds": env.cfg.rounds, "long_rounds": env.cfg.long_rounds,
        "p1_seconds": env.cfg.p1_time.as_secs_f64(), "long_seconds": env.cfg.long_time.as_secs_f64(),
    });
    let path = json_path();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let doc = report::to_json(header, &rows);
    match std::fs::write(&path, serde_json::to_string_pretty(&doc).expect("json")) {
        Ok(()) => println!("JSON written to {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
}

/// `DISTLOCK_BENCH_JSON`, else `distlock-bench.json` in the cargo target directory.
fn json_path() -> PathBuf {
    if let Ok(p) = std::env::var("DISTLOCK_BENCH_JSON") {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("distlock-bench.json")
}
