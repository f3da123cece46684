//! One replica in the multi-process election test (`tests/tests/election.rs`):
//! it runs `Election::lead` and, while leading, acts every few milliseconds:
//! a fenced write of its term to the Redis key `acts` (the work is dropped as
//! soon as the lost signal fires).
//!
//! ```text
//! election_member URL NAME VALUE EXPIRY_MS
//! ```
//!
//! Each line on stdout: `elected TERM T`, `act TERM T0 T1 ok|stale`,
//! `stopped TERM T` (the work was dropped: leadership lost), with times in
//! nanoseconds on `CLOCK_MONOTONIC`, which every process on the machine
//! shares.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test tool: failing loudly is the point

use std::io::Write;
use std::time::Duration;

use distlock::fence::FencedKey;
use distlock::Locker;
use distlock_tests::checker::monotonic_ns;
use tokio_util::sync::CancellationToken;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Says `stopped` when the work is dropped.
struct Stopped(u64);

impl Drop for Stopped {
    fn drop(&mut self) {
        say(&format!("stopped {} {}", self.0, monotonic_ns()));
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, name, value, expiry_ms] = args.as_slice() else {
        panic!("usage: election_member URL NAME VALUE EXPIRY_MS");
    };
    let expiry = Duration::from_millis(expiry_ms.parse().expect("EXPIRY_MS"));
    let locker = Locker::builder()
        .url(url.as_str())
        .expiry(expiry)
        .build()
        .await
        .expect("locker");
    let data = redis::Client::open(url.as_str()).expect("url");
    let acts = FencedKey::new("acts").expect("key");
    locker
        .election(name.as_str())
        .lead(value.as_str(), CancellationToken::new(), |leader| {
            let data = data.clone();
            let acts = acts.clone();
            async move {
                let term = leader.term();
                say(&format!("elected {term} {}", monotonic_ns()));
                let _stopped = Stopped(term);
                // A member paused (SIGSTOP) while connecting finds its
                // connection attempt timed out when it resumes: try again.
                let mut con = loop {
                    match data.get_multiplexed_async_connection().await {
                        Ok(con) => break con,
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                };
                loop {
                    let t0 = monotonic_ns();
                    let outcome = match acts.set(&mut con, term, &leader).await {
                        Ok(()) => "ok".to_owned(),
                        Err(e) if e.is_stale() => "stale".to_owned(),
                        Err(e) => format!("error {}", e.to_string().replace(' ', "_")),
                    };
                    say(&format!("act {term} {t0} {} {outcome}", monotonic_ns()));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
        .await
        .expect("lead");
}
