//! P9: a two-key transfer, `lock_many` against two nested single-key
//! acquisitions (what users write without it, in sorted order so that it
//! cannot deadlock): one task uncontended, and 8 tasks moving money between
//! 4 accounts.

use std::time::Duration;

use distlock::Locker;
use serde_json::json;
use tokio::time::Instant;

use crate::measure::{fmt_rate, median, paired_ratios, range, rotation, sequential_rate};
use crate::report::{Row, Status};
use crate::Env;

/// How many tasks and accounts the contended arm uses.
const TASKS: u64 = 8;
const ACCOUNTS: u64 = 4;

/// The two accounts of transfer `n` of task `task`, distinct.
fn accounts(task: u64, n: u64) -> (String, String) {
    let from = (task + n) % ACCOUNTS;
    let to = (from + 1 + (n * 7 + task) % (ACCOUNTS - 1)) % ACCOUNTS;
    (format!("p9:acct:{from}"), format!("p9:acct:{to}"))
}

/// One transfer: both accounts held, then released.
async fn transfer(locker: &Locker, nested: bool, from: &str, to: &str) {
    if nested {
        let (first, second) = if from < to { (from, to) } else { (to, from) };
        let a = locker.lock(first).acquire().await.expect("acquire");
        let b = locker.lock(second).acquire().await.expect("acquire");
        b.release().await.expect("release");
        a.release().await.expect("release");
    } else {
        let both = locker
            .lock_many([from, to])
            .acquire()
            .await
            .expect("acquire");
        both.release().await.expect("release");
    }
}

/// Transfers per second of one task, uncontended.
async fn sequential(locker: &Locker, nested: bool, d: Duration) -> f64 {
    let locker = locker.clone();
    sequential_rate(d, move |n| {
        let locker = locker.clone();
        async move {
            let (from, to) = accounts(0, n);
            transfer(&locker, nested, &from, &to).await;
        }
    })
    .await
}

/// Transfers per second of [`TASKS`] tasks over [`ACCOUNTS`] accounts.
async fn contended(locker: &Locker, nested: bool, d: Duration) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let locker = locker.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while start.elapsed() < d {
                    let (from, to) = accounts(task, n);
                    transfer(&locker, nested, &from, &to).await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// The spread of per-round ratios, "min–max".
fn spread(ratios: &[f64]) -> String {
    let (min, max) = range(ratios);
    format!("{min:.2}–{max:.2}")
}

/// P9: `lock_many` and nested pairs interleaved, uncontended then contended.
pub(crate) async fn p9(env: &Env) -> Vec<Row> {
    let locker = env.locker().await;
    let warm = Duration::from_millis(200);
    sequential(&locker, false, warm).await;
    sequential(&locker, true, warm).await;

    let mut rows = Vec::new();
    for (contend, rounds, d) in [
        (false, env.cfg.rounds, env.cfg.p1_time),
        (true, env.cfg.long_rounds.max(3), env.cfg.p1_time * 2),
    ] {
        let (mut many, mut nested) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            for arm in rotation(2, round) {
                let is_nested = arm == 1;
                let rate = if contend {
                    contended(&locker, is_nested, d).await
                } else {
                    sequential(&locker, is_nested, d).await
                };
                if is_nested {
                    nested.push(rate);
                } else {
                    many.push(rate);
                }
            }
        }
        let ratios = paired_ratios(&many, &nested);
        let ratio = median(&ratios);
        let scenario = if contend {
            format!("two-key transfers, {TASKS} tasks over {ACCOUNTS} accounts (lock_many)")
        } else {
            "one task, sequential uncontended two-key transfers (lock_many)".into()
        };
        rows.push(Row {
            id: "P9",
            scenario,
            figure: format!("{} transfers/s", fmt_rate(median(&many))),
            baseline: format!(
                "two nested acquisitions {} transfers/s",
                fmt_rate(median(&nested))
            ),
            ratio: format!("{ratio:.2} × nested (rounds {})", spread(&ratios)),
            target: "faster than nested (> 1)".into(),
            status: Status::of(ratio > 1.0),
            data: json!({
                "contended": contend,
                "rounds": rounds,
                "seconds_per_arm": d.as_secs_f64(),
                "lock_many_per_s": many,
                "nested_per_s": nested,
                "ratio_per_round": ratios,
            }),
        });
    }
    locker.close().await.expect("close");
    rows
}
