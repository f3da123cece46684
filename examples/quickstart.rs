//! Two replicas contend for one lock: acquire, fencing tokens, a waiter woken by
//! the release, and a lost lease cancelling work.
//!
//! ```sh
//! cargo run --example quickstart                       # Redis at $REDIS_URL or 127.0.0.1:6379
//! REDIS_URL=redis://10.0.0.5:6379 cargo run --example quickstart
//! ```
//!
//! Without a reachable Redis it says so and tells the same story on the
//! in-memory backend.

use std::time::Duration;

use distlock::{Error, Locker, Policy};
use tokio::time::{sleep, Instant};

const KEY: &str = "quickstart:invoice-42";

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let (a, b) = match replicas(&url).await {
        Ok(pair) => {
            println!("Connected to Redis at {url}: replicas A and B each have their own Locker.\n");
            pair
        }
        Err(e) => {
            println!("No Redis answered at {url}: {e}.");
            println!(
                "To use Redis, start one (`redis-server`, or `docker run -p 6379:6379 redis`)"
            );
            println!("or point REDIS_URL at yours. Now telling the same story in memory.\n");
            let memory = Locker::memory();
            (memory.clone(), memory)
        }
    };
    // 1. A takes the lock; B cannot.
    let held = a.lock(KEY).acquire().await?;
    println!(
        "A acquired `{KEY}` with fencing token {}.",
        held.fencing_token()
    );
    let attempt = b.lock(KEY).try_acquire().await?;
    println!(
        "B tried too: {}.",
        if attempt.is_some() {
            "acquired?!"
        } else {
            "held by A"
        }
    );

    // 2. B waits; A releases; the release message wakes B at once.
    let waiter = tokio::spawn({
        let b = b.clone();
        async move {
            let guard = b.lock(KEY).acquire_timeout(Duration::from_secs(10)).await?;
            Ok::<_, Error>((guard, Instant::now()))
        }
    });
    sleep(Duration::from_millis(300)).await;
    let released_at = Instant::now();
    held.release().await?;
    println!("A released after 300 ms of work.");
    let (guard, woke_at) = waiter.await.map_err(|e| Error::config(e.to_string()))??;
    println!(
        "B was woken and holds the lock {:.1} ms after the release, with fencing token {} (greater: writes from A's turn can be refused).",
        (woke_at - released_at).as_secs_f64() * 1e3,
        guard.fencing_token()
    );
    guard.release().await?;

    // 3. B runs a long job; an operator deletes the key behind its back. B learns
    //    at its next renewal, its work is cancelled, and the run says so.
    let lock = b.lock(KEY).expiry(Duration::from_secs(3));
    let job = lock.run(&Policy::new(), async {
        println!("B started a job that would take 60 s (lease renewed every second).");
        sleep(Duration::from_secs(60)).await;
        println!("B finished the job (this line must not appear).");
    });
    let operator = async {
        sleep(Duration::from_millis(500)).await;
        a.force_unlock(KEY).await?;
        println!("An operator deleted the key while B was working.");
        Ok::<_, Error>(())
    };
    let started = Instant::now();
    let (outcome, deleted) = tokio::join!(job, operator);
    deleted?;
    match outcome {
        Err(e @ Error::Lost { .. }) => println!(
            "B's job was cancelled {:.1} s in: {e}.",
            started.elapsed().as_secs_f64()
        ),
        other => println!("unexpected outcome: {other:?}"),
    }

    a.close().await?;
    b.close().await?;
    println!("\nDone: both replicas closed; no lock is left behind (only the fencing counter, which expires).");
    Ok(())
}

/// Two Lockers, as two replicas would have, or the connection error within ~3 s.
async fn replicas(url: &str) -> Result<(Locker, Locker), Error> {
    let connect = || {
        Locker::builder()
            .url(url)
            // Keys of this run's own: a lock left by an interrupted earlier run
            // (it expires by itself) delays nobody. Never force_unlock at
            // start-up instead: in a service, the "leftover" may be a live
            // replica's lock (the README says when force_unlock is right).
            .key_prefix(format!("quickstart-{}:", std::process::id()))
            .connect_timeout(Duration::from_secs(2))
            .build()
    };
    Ok((connect().await?, connect().await?))
}
