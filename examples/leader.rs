//! Leader election: three replicas campaign for one role, one leads and works
//! (its writes carry its term), it steps down, the next takes over at once,
//! and an observer sees each change.
//!
//! ```sh
//! cargo run --example leader        # Redis at $REDIS_URL or 127.0.0.1:6379, else in memory
//! ```

use std::time::Duration;

use distlock::CancellationToken;
use distlock::{Error, Locker};
use futures_util::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let replicas = match connect(&url).await {
        Ok(r) => {
            println!("Connected to Redis at {url}: three replicas, each with its own Locker.");
            r
        }
        Err(e) => {
            println!("No Redis answered at {url} ({e}); the same story in memory.");
            let memory = Locker::memory();
            vec![memory.clone(), memory.clone(), memory]
        }
    };

    // An observer (a dashboard, a follower that forwards to the leader).
    let mut changes = Box::pin(replicas[0].election("compactor").observe());
    let observer = tokio::spawn(async move {
        while let Some(change) = changes.next().await {
            match change {
                Ok(Some(l)) => println!("  observer: {} leads (term {})", l.value(), l.term()),
                Ok(None) => println!("  observer: nobody leads"),
                Err(e) => println!("  observer: {e}"),
            }
        }
    });

    // Each replica runs the same loop: work only while leading. Each leader
    // compacts for a while and steps down, so that all three take a turn.
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    for (i, locker) in replicas.iter().enumerate() {
        let election = locker.election("compactor").expiry(Duration::from_secs(3));
        let shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            election
                .lead(format!("replica-{i}"), shutdown, |leader| async move {
                    println!(
                        "{} leads in term {}: compacting (writes fenced with the term)",
                        leader.value(),
                        leader.term()
                    );
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    println!("{} is done and steps down", leader.value());
                })
                .await
        }));
    }
    for task in tasks {
        task.await.map_err(|e| Error::config(e.to_string()))??;
    }
    // Give the observer a moment to report the last step-down.
    tokio::time::sleep(Duration::from_millis(600)).await;
    observer.abort();
    for locker in &replicas {
        locker.close().await?;
    }
    println!("Each replica led once, one at a time, in increasing terms.");
    Ok(())
}

async fn connect(url: &str) -> Result<Vec<Locker>, Error> {
    let mut out = Vec::new();
    for _ in 0..3 {
        out.push(
            Locker::builder()
                .url(url)
                // Keys of this run's own, as in the quickstart.
                .key_prefix(format!("leader-{}:", std::process::id()))
                .connect_timeout(Duration::from_secs(2))
                .build()
                .await?,
        );
    }
    Ok(out)
}
