//! Short runs of the `mutex_checker` binary: with every kind of fault it
//! must find no violation, and with workers that ignore the lost signal it
//! must find some (so a clean run means something).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The runs spawn a dozen processes each: one at a time on a small machine.
static ONE_RUN_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs the checker with `args`; returns whether it succeeded and its
/// `summary:` line, parsed.
fn run_checker(args: &[&str], limit: Duration) -> (bool, serde_json::Value) {
    let _one = ONE_RUN_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_mutex_checker"))
        .args(args)
        .output()
        .expect("running mutex_checker");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        started.elapsed() < limit,
        "the run took {:?}, more than {limit:?}",
        started.elapsed()
    );
    let summary = stdout
        .lines()
        .find_map(|l| l.strip_prefix("summary: "))
        .expect("a summary line");
    (
        output.status.success(),
        serde_json::from_str(summary).expect("summary JSON"),
    )
}

#[test]
fn no_two_owners_overlap_through_every_kind_of_fault() {
    let (ok, s) = run_checker(&["--duration", "35s"], Duration::from_secs(60));
    assert_eq!(s["violations_total"], 0, "violations: {}", s["violations"]);
    assert!(ok, "the checker failed: {}", s["worker_failures"]);
    // The run proves something only if the faults bit.
    for kind in [
        "kill_restart_empty",
        "pause_beyond_expiry",
        "pause_within_slack",
        "blackhole",
        "reset_connections",
        "latency_spike",
    ] {
        assert!(
            s["faults"][kind].as_u64().unwrap_or(0) >= 1,
            "no {kind} fault was injected: {}",
            s["faults"]
        );
    }
    assert!(
        s["acquisitions"].as_u64().unwrap() >= 100,
        "{}",
        s["acquisitions"]
    );
    assert!(
        s["losses_total"].as_u64().unwrap() >= 1,
        "no lease was lost"
    );
}

#[test]
fn the_checker_catches_workers_that_ignore_the_lost_signal() {
    let (ok, s) = run_checker(
        &[
            "--duration",
            "15s",
            "--faults",
            "pause-beyond-expiry",
            "--sabotage",
        ],
        Duration::from_secs(40),
    );
    assert!(!ok, "the checker passed a run that ignored lost signals");
    assert!(
        s["violations"]["late_loss_signal"].as_u64().unwrap_or(0) >= 1,
        "{}",
        s["violations"]
    );
}
