//! Job deduplication: three replicas of a scheduler fire the same job every
//! second; on each tick exactly one of them runs it, the others skip.
//!
//! ```sh
//! cargo run --example job_dedup                        # Redis at $REDIS_URL or 127.0.0.1:6379
//! REDIS_URL=redis://10.0.0.5:6379 cargo run --example job_dedup
//! ```
//!
//! Each replica has its own `Locker`, as separate processes would. Without a
//! reachable Redis the replicas share an in-memory locker instead. The example
//! stops after five ticks.

use std::sync::Arc;
use std::time::Duration;

use distlock::{distributed_lock, Error, Locker};
use tokio::time::{interval, sleep, MissedTickBehavior};

const REPLICAS: usize = 3;
const TICKS: u32 = 5;

/// One replica of the scheduler.
struct Scheduler {
    name: String,
    locker: Locker,
}

impl Scheduler {
    /// The job. `on_busy = "skip"`: a replica that finds the lock held returns
    /// `Ok(None)` (the `Default`) without running it. `at_least = "500ms"`: the
    /// lock is kept half a second after the job starts even if it ends sooner,
    /// so a replica whose timer fires a little late still skips this tick.
    #[distributed_lock(
        key = "job:nightly-report",
        locker = self.locker,
        on_busy = "skip",
        at_least = "500ms",
        at_most = "30s"
    )]
    async fn nightly_report(&self, tick: u32) -> Result<Option<u64>, Error> {
        // The work. The fencing token tells a storage layer which writer is newest.
        sleep(Duration::from_millis(100)).await;
        let fence = distlock::current().map_or(0, |lease| lease.fencing_token());
        println!(
            "  {} runs report #{tick} (fencing token {fence})",
            self.name
        );
        Ok(Some(fence))
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let lockers = match connect_all(&url).await {
        Ok(lockers) => {
            println!(
                "Connected to Redis at {url}: {REPLICAS} replicas, each with its own Locker.\n"
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
    // A leftover from an interrupted earlier run would only skip the first tick.
    lockers[0].force_unlock("job:nightly-report").await?;

    let replicas: Vec<Arc<Scheduler>> = lockers
        .iter()
        .enumerate()
        .map(|(i, locker)| {
            Arc::new(Scheduler {
                name: format!("replica-{i}"),
                locker: locker.clone(),
            })
        })
        .collect();

    let mut ticks = interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    for tick in 1..=TICKS {
        ticks.tick().await;
        println!("tick {tick}: every replica fires the job");
        // Every replica's timer fires, as on N machines with the same cron, a few
        // milliseconds apart as clocks and schedulers drift.
        let firings: Vec<_> = replicas
            .iter()
            .enumerate()
            .map(|(i, replica)| {
                let replica = Arc::clone(replica);
                let drift = Duration::from_millis((u64::from(tick) * 7 + i as u64 * 13) % 5 * 10);
                tokio::spawn(async move {
                    sleep(drift).await;
                    let ran = replica.nightly_report(tick).await;
                    (replica.name.clone(), ran)
                })
            })
            .collect();
        let mut skipped = Vec::new();
        for firing in firings {
            let (name, ran) = firing.await.map_err(|e| Error::Config(e.to_string()))?;
            if ran?.is_none() {
                skipped.push(name);
            }
        }
        println!("  skipped: {}", skipped.join(", "));
    }

    for locker in &lockers {
        locker.close().await?;
    }
    println!("\nDone: {TICKS} ticks, one run each.");
    Ok(())
}

/// One Locker per replica, or the connection error within ~2 s.
async fn connect_all(url: &str) -> Result<Vec<Locker>, Error> {
    let mut lockers = Vec::new();
    for _ in 0..REPLICAS {
        let locker = Locker::builder()
            .url(url)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .await?;
        lockers.push(locker);
    }
    Ok(lockers)
}
