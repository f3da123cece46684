//! Resource readings for leak checks: resident memory and live tokio tasks.

use std::fs;

/// The resident set size of this process in bytes, from the `VmRSS` line
/// of `/proc/self/status` (`None` where that cannot be read).
pub fn rss_bytes() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The number of tasks alive on the current tokio runtime.
///
/// # Panics
///
/// Outside a tokio runtime.
pub fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_readable_and_plausible() {
        let rss = rss_bytes().unwrap();
        assert!(rss > 100 * 1024, "{rss}");
        assert!(rss < 1 << 40, "{rss}");
    }

    #[tokio::test]
    async fn spawned_tasks_are_counted() {
        let before = alive_tasks();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = rx.await;
        });
        assert_eq!(alive_tasks(), before + 1);
        drop(tx);
        task.await.unwrap();
        assert_eq!(alive_tasks(), before);
    }
}
