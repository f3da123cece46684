//! Job deduplication with a real cron scheduler: three replicas each run a
//! `tokio-cron-scheduler` with the same schedule (every second, as N machines
//! would run the same crontab); on each tick exactly one of them runs the job
//! and the others skip it.
//!
//! ```sh
//! cargo run --example job_dedup                        # Redis at $REDIS_URL or 127.0.0.1:6379
//! REDIS_URL=redis://10.0.0.5:6379 cargo run --example job_dedup
//! ```
//!
//! Each replica has its own `Locker` and its own scheduler, as separate
//! processes would. Without a reachable Redis the replicas share an in-memory
//! locker instead. The example stops after five complete ticks, and fails if
//! any tick ran the job twice (or not at all).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use distlock::{distributed_lock, Error, Locker};
use tokio::sync::mpsc;
use tokio::time::sleep;
use tokio_cron_scheduler::{Job, JobScheduler};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const REPLICAS: usize = 3;
const TICKS: usize = 5;
/// Every second (cron with a seconds field). A real job would say `0 0 3 * * *`.
const SCHEDULE: &str = "*/1 * * * * *";

/// One replica of the service.
struct Replica {
    name: String,
    locker: Locker,
}

/// What one replica did on one tick: the fencing token if it ran the job.
struct Firing {
    replica: String,
    tick: u64,
    ran: Result<Option<u64>, Error>,
}

impl Replica {
    /// The job. `on_busy = "skip"`: a replica that finds the lock held returns
    /// `Ok(None)` (the `Default`) without running it. `at_least = "500ms"`: the
    /// lock is kept half a second after the job starts even if it ends sooner,
    /// so a replica whose scheduler fires a little late still skips this tick
    /// (ShedLock's "lock at least for"). `at_most = "30s"`: a job that hangs
    /// loses the lock (and is cancelled) rather than blocking later ticks.
    #[distributed_lock(
        key = "job:nightly-report",
        locker = self.locker,
        on_busy = "skip",
        at_least = "500ms",
        at_most = "30s"
    )]
    async fn nightly_report(&self) -> Result<Option<u64>, Error> {
        // The work. The fencing token tells a storage layer which writer is newest.
        sleep(Duration::from_millis(100)).await;
        Ok(Some(
            distlock::current().map_or(0, |lease| lease.fencing_token()),
        ))
    }
}

/// The tick a firing belongs to: the wall-clock second it fired in. Only a
/// label for this report; no lock timing depends on it.
fn this_second() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let lockers = match connect_all(&url).await {
        Ok(lockers) => {
            println!(
                "Connected to Redis at {url}: {REPLICAS} replicas, each with its own Locker and scheduler.\n"
            );
            lockers
        }
        Err(e) => {
            println!("No Redis answered at {url}: {e}.");
            println!(
                "Start one (`redis-server`) or set REDIS_URL to use it; running in memory now.\n"
            );
            vec![Locker::memory(); REPLICAS]
        }
    };

    let (report, mut firings) = mpsc::unbounded_channel::<Firing>();
    let mut schedulers = Vec::new();
    for (i, locker) in lockers.iter().enumerate() {
        let replica = Arc::new(Replica {
            name: format!("replica-{i}"),
            locker: locker.clone(),
        });
        let report = report.clone();
        let scheduler = JobScheduler::new().await?;
        scheduler
            .add(Job::new_async(SCHEDULE, move |_id, _scheduler| {
                let (replica, report) = (Arc::clone(&replica), report.clone());
                Box::pin(async move {
                    let tick = this_second();
                    let ran = replica.nightly_report().await;
                    let _ = report.send(Firing {
                        replica: replica.name.clone(),
                        tick,
                        ran,
                    });
                })
            })?)
            .await?;
        scheduler.start().await?;
        schedulers.push(scheduler);
    }
    drop(report);

    // Gather each tick's firings until TICKS ticks heard from every replica.
    // (The first tick may find a scheduler not started yet: it is incomplete.)
    let mut ticks: BTreeMap<u64, Vec<(String, Option<u64>)>> = BTreeMap::new();
    let gathered = tokio::time::timeout(Duration::from_secs(TICKS as u64 + 10), async {
        while let Some(f) = firings.recv().await {
            ticks.entry(f.tick).or_default().push((f.replica, f.ran?));
            let complete = ticks.values().filter(|v| v.len() == REPLICAS).count();
            if complete == TICKS {
                break;
            }
        }
        Ok::<_, Error>(())
    })
    .await;
    for scheduler in &mut schedulers {
        scheduler.shutdown().await?;
    }
    gathered.map_err(|_| "the schedulers stopped firing")??;

    let mut twice = Vec::new();
    for (tick, firings) in &ticks {
        let ran: Vec<_> = firings.iter().filter(|(_, f)| f.is_some()).collect();
        let skipped: Vec<_> = firings
            .iter()
            .filter(|(_, f)| f.is_none())
            .map(|(name, _)| name.as_str())
            .collect();
        match ran.as_slice() {
            [(name, Some(fence))] => println!(
                "tick {}: {name} ran the job (fencing token {fence}); skipped: {}",
                tick % 1000,
                skipped.join(", ")
            ),
            [] => println!(
                "tick {}: nobody ran the job (heard from {} replicas)",
                tick % 1000,
                firings.len()
            ),
            _ => twice.push(*tick),
        }
    }
    for locker in &lockers {
        locker.close().await?;
    }
    if !twice.is_empty() {
        return Err(format!("ticks {twice:?} ran the job more than once").into());
    }
    println!("\nDone: {TICKS} ticks on {REPLICAS} replicas, each run exactly once.");
    Ok(())
}

/// One Locker per replica, or the connection error within ~2 s.
async fn connect_all(url: &str) -> Result<Vec<Locker>, Error> {
    let mut lockers = Vec::new();
    for _ in 0..REPLICAS {
        let locker = Locker::builder()
            .url(url)
            // Keys of this run's own: a lock left by an interrupted earlier run
            // (it expires by itself) delays nobody. Never force_unlock at
            // start-up instead: in a service, the "leftover" may be a live
            // replica's lock (the README says when force_unlock is right).
            .key_prefix(format!("job-dedup-{}:", std::process::id()))
            .connect_timeout(Duration::from_secs(2))
            .build()
            .await?;
        lockers.push(locker);
    }
    Ok(lockers)
}
