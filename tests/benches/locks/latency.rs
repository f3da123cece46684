//! P3: wake-up latency, from the holder's release call to the moment a waiter
//! in another replica holds the lock, against one Redis round trip (`PING`)
//! measured between the samples.

use std::time::Duration;

use serde_json::json;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::measure::{fmt_dur, percentile, us};
use crate::probe::ping;
use crate::report::{Row, Status};
use crate::Env;

/// How long the waiter is given to queue, attempt, subscribe and go to sleep.
const SETTLE: Duration = Duration::from_millis(5);

pub(crate) async fn p3(env: &Env) -> Vec<Row> {
    let mut conn = env.server_conn().await;
    let holder = env.locker().await;
    let waiter = env.locker().await;
    let (mut wake, mut rtt, mut release) = (Vec::new(), Vec::new(), Vec::new());
    let mut timer_wakes = 0;
    for i in 0..env.cfg.p3_samples + 20 {
        let held = holder.lock("p3").acquire().await.expect("holder acquire");
        let lock = waiter.lock("p3");
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let guard = lock.acquire().await.expect("waiter acquire");
            let at = Instant::now();
            let _ = tx.send(at);
            guard.release().await.expect("waiter release");
        });
        tokio::time::sleep(SETTLE).await;
        let released_at = Instant::now();
        held.release().await.expect("holder release");
        let release_took = released_at.elapsed();
        let acquired_at = rx.await.expect("waiter");
        task.await.expect("task");
        let ping = ping(&mut conn).await;
        if i >= 20 {
            // The first samples warm up connections and scripts.
            let d = acquired_at - released_at;
            if d > Duration::from_millis(30) {
                timer_wakes += 1;
            }
            wake.push(d);
            rtt.push(ping);
            release.push(release_took);
        }
    }
    holder.close().await.expect("close");
    waiter.close().await.expect("close");
    let (p50, p99) = (percentile(&wake, 50.0), percentile(&wake, 99.0));
    let rtt50 = percentile(&rtt, 50.0);
    let ratio = p50.as_secs_f64() / rtt50.as_secs_f64();
    let data = json!({
        "samples": wake.len(),
        "wake_us": { "p50": us(p50), "p90": us(percentile(&wake, 90.0)), "p99": us(p99),
                     "max": us(percentile(&wake, 100.0)) },
        "rtt_us": { "p50": us(rtt50), "p99": us(percentile(&rtt, 99.0)) },
        "p50_over_rtt": ratio,
        "holder_release_call_us": { "p50": us(percentile(&release, 50.0)) },
        "wakes_over_30ms": timer_wakes,
    });
    vec![
        Row {
            id: "P3",
            scenario: format!(
                "wake-up latency, release → other replica holds ({} samples)",
                wake.len()
            ),
            figure: format!("p50 {}", fmt_dur(p50)),
            baseline: format!("round trip (PING) p50 {}", fmt_dur(rtt50)),
            ratio: format!("{ratio:.2} × round trip"),
            target: "p50 ≤ 3 × round trip".into(),
            status: Status::of(ratio <= 3.0),
            data: data.clone(),
        },
        Row {
            id: "P3",
            scenario: "… tail".into(),
            figure: format!("p99 {}", fmt_dur(p99)),
            baseline: String::new(),
            ratio: String::new(),
            target: "p99 ≤ 5 ms".into(),
            status: Status::of(p99 <= Duration::from_millis(5)),
            data,
        },
    ]
}
