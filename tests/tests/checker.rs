//! Short runs of the randomized `checker` binary: three rounds that between
//! them cover a semaphore on one server, a mutex on Redlock and a
//! reader-writer lock, each through faults, must find no violation; and
//! with workers that ignore the lost signal it must find some (so a clean
//! run means something). Each run prints its seed and, for a failed round,
//! the command that replays it.

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
    let output = Command::new(env!("CARGO_BIN_EXE_checker"))
        .args(args)
        .output()
        .expect("running checker");
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

/// Safety: no overlap, no late lost signal, no bound exceeded, fencing in
/// order, no stranded lease (a token in Redis that no section accounts for),
/// nothing left after close, and the run itself succeeded.
fn assert_clean(ok: bool, s: &serde_json::Value) {
    let seed = &s["seed"];
    assert_eq!(
        s["violations_total"], 0,
        "seed {seed}: violations {}, keys left {}, stranded leases {}; failed rounds: {}",
        s["violations"], s["leftover_keys"], s["stranded_leases"], s["failed_rounds"]
    );
    assert_eq!(s["leftover_keys"], 0, "seed {seed}: keys left after close");
    assert!(
        ok,
        "seed {seed}: the checker failed: {}",
        s["worker_failures"]
    );
}

#[test]
fn no_guarantee_breaks_in_randomized_configurations_through_faults() {
    let (ok, s) = run_checker(
        &[
            "--duration",
            "30s",
            "--round",
            "10s",
            "--max-expiry",
            "800ms",
            "--rotate",
        ],
        Duration::from_secs(60),
    );
    assert_clean(ok, &s);
    let seed = &s["seed"];
    // The run proves something only if it covered every primitive, both
    // topologies, and the faults bit.
    for primitive in ["mutex", "semaphore", "rwlock"] {
        assert!(
            s["rounds_by_primitive"][primitive].as_u64().unwrap_or(0) >= 1,
            "seed {seed}: no {primitive} round: {}",
            s["rounds_by_primitive"]
        );
    }
    assert!(
        s["rounds_by_topology"]["single"].as_u64().unwrap_or(0) >= 1,
        "seed {seed}: {}",
        s["rounds_by_topology"]
    );
    let redlock = s["rounds_by_topology"]["redlock3"].as_u64().unwrap_or(0)
        + s["rounds_by_topology"]["redlock5"].as_u64().unwrap_or(0);
    assert!(redlock >= 1, "seed {seed}: {}", s["rounds_by_topology"]);
    assert!(
        s["faults_total"].as_u64().unwrap() >= 6,
        "seed {seed}: {}",
        s["faults"]
    );
    for access in ["mutex", "semaphore", "read", "write"] {
        assert!(
            s["acquisitions_by_access"][access].as_u64().unwrap_or(0) >= 5,
            "seed {seed}: {}",
            s["acquisitions_by_access"]
        );
    }
}

#[test]
fn sets_of_keys_keep_every_guarantee_through_faults() {
    // Round 0 on one server (one script for the set), round 1 on Redlock
    // (the keys one by one), mixed with single-key acquisitions.
    let (ok, s) = run_checker(
        &[
            "--duration",
            "20s",
            "--round",
            "10s",
            "--max-expiry",
            "800ms",
            "--primitive",
            "multi",
            "--rotate",
        ],
        Duration::from_secs(45),
    );
    assert_clean(ok, &s);
    let seed = &s["seed"];
    assert_eq!(s["rounds_by_primitive"]["multi"], 2, "seed {seed}");
    assert!(
        s["acquisitions_by_access"]["mutex"].as_u64().unwrap_or(0) >= 20,
        "seed {seed}: {}",
        s["acquisitions_by_access"]
    );
}

#[test]
fn the_checker_catches_workers_that_ignore_the_lost_signal() {
    let (ok, s) = run_checker(
        &[
            "--duration",
            "10s",
            "--round",
            "10s",
            "--max-expiry",
            "600ms",
            "--primitive",
            "mutex",
            "--topology",
            "single",
            "--faults",
            "pause-beyond-expiry",
            "--sabotage",
        ],
        Duration::from_secs(30),
    );
    assert!(
        !ok,
        "seed {}: the checker passed a run that ignored lost signals",
        s["seed"]
    );
    assert!(
        s["violations"]["late_loss_signal"].as_u64().unwrap_or(0) >= 1,
        "seed {}: {}",
        s["seed"],
        s["violations"]
    );
}
