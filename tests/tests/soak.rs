//! A short run (35 s) of the `soak` binary: continuous acquire / renew / release
//! over 1,000 keys with a fault every few seconds must leave no task, no
//! waiting line and no lock behind, and RSS must not grow past noise. On a
//! private `redis-server` behind a `FaultProxy`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn a_short_soak_with_faults_leaks_neither_tasks_nor_memory() {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_soak"))
        .args(["--duration", "35s", "--keys", "1000", "--fault-every", "2s"])
        .output()
        .expect("running soak");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    let summary: serde_json::Value = serde_json::from_str(
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("summary: "))
            .expect("a summary line"),
    )
    .unwrap();
    assert!(output.status.success(), "failures: {}", summary["failures"]);
    assert_eq!(summary["tasks_idle_end"], summary["tasks_idle_start"]);
    // The run proves something only if it worked the lockers and the faults bit.
    assert!(
        summary["faults"].as_u64().unwrap() >= 4,
        "{}",
        summary["faults"]
    );
    assert!(
        summary["acquisitions"].as_u64().unwrap() >= 1000,
        "{}",
        summary["acquisitions"]
    );
    assert!(summary["held_past_a_renewal"].as_u64().unwrap() >= 100);
}
