//! Measuring on a noisy machine: rates over a fixed time, arms interleaved
//! round by round, medians, percentiles.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// The median of some samples (the mean of the middle two for an even count);
/// NaN for none.
pub(crate) fn median(samples: &[f64]) -> f64 {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `p`-th percentile (0..=100) of some durations, nearest rank.
pub(crate) fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut v = samples.to_vec();
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// The smallest and largest of `samples` (the spread across rounds).
pub(crate) fn range(samples: &[f64]) -> (f64, f64) {
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

/// Per-round ratios `a[i] / b[i]` (paired: both arms ran in the same round).
pub(crate) fn paired_ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

/// The order in which `n` arms run in round `round`: rotated each round so
/// that no arm always runs first (A B C, B C A, C A B, ...).
pub(crate) fn rotation(n: usize, round: usize) -> Vec<usize> {
    (0..n).map(|i| (i + round) % n).collect()
}

/// Runs `op` back to back for `d`, on a task of the runtime (as a request
/// handler would), and returns operations per second.
pub(crate) async fn sequential_rate<F, Fut>(d: Duration, mut op: F) -> f64
where
    F: FnMut(u64) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let task = tokio::spawn(async move {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < d {
            op(n).await;
            n += 1;
        }
        n as f64 / start.elapsed().as_secs_f64()
    });
    task.await.unwrap_or(f64::NAN)
}

/// Formats a rate with thousands separators.
pub(crate) fn fmt_rate(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Formats a duration in microseconds (or milliseconds above 10 ms).
pub(crate) fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// Duration in microseconds, for JSON.
pub(crate) fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
