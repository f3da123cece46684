//! Local FIFO queues: waiters on one key in one process line up here, and only the
//! head of the line contends in Redis. N local waiters cost one contender.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::notify::Subscription;

/// The line for one key. Its mutex is fair (FIFO); whoever holds it is the head.
#[derive(Debug, Default)]
pub(crate) struct Line {
    head: Arc<AsyncMutex<HeadState>>,
}

/// What each head of a line hands to the next.
#[derive(Debug, Default)]
pub(crate) struct HeadState {
    /// The line's release subscription, kept while the line has waiters.
    pub(crate) sub: Option<Subscription>,
    /// The previous head left the line holding the lock: until it releases
    /// (a message on `sub`), an attempt could only find the key held.
    pub(crate) predecessor_holds: bool,
}

/// Every line of one `Locker`, by Redis key.
#[derive(Debug, Default)]
pub(crate) struct Queues {
    lines: Mutex<HashMap<String, Arc<Line>>>,
}

impl Queues {
    /// Joins the line for `key`. Dropping the ticket leaves the line.
    pub(crate) fn join(self: &Arc<Self>, key: &str) -> Ticket {
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        let line = Arc::clone(lines.entry(key.to_owned()).or_default());
        Ticket {
            queues: Arc::clone(self),
            key: key.to_owned(),
            line: Some(line),
        }
    }

    /// How many keys have a line (for tests and leak checks).
    pub(crate) fn len(&self) -> usize {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// A place in the line for one key.
#[derive(Debug)]
pub(crate) struct Ticket {
    queues: Arc<Queues>,
    key: String,
    line: Option<Arc<Line>>,
}

/// Being at the head of the line: the right to contend in Redis. It carries the
/// line's release subscription, kept while the line has waiters.
pub(crate) type Head = OwnedMutexGuard<HeadState>;

impl Ticket {
    /// Waits (FIFO, cancel safe) until this ticket is at the head of its line.
    pub(crate) async fn head(&self) -> Option<Head> {
        let line = self.line.as_ref()?;
        Some(Arc::clone(&line.head).lock_owned().await)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut lines = self
            .queues
            .lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(line) = self.line.take() {
            // The map's reference and ours: nobody else is in the line.
            if Arc::strong_count(&line) == 2 {
                lines.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_disappear_when_empty() {
        let q = Arc::new(Queues::default());
        let a = q.join("k");
        let b = q.join("k");
        assert_eq!(q.len(), 1);
        drop(a);
        assert_eq!(q.len(), 1);
        drop(b);
        assert_eq!(q.len(), 0);
    }

    #[tokio::test]
    async fn heads_are_served_in_arrival_order() {
        let q = Arc::new(Queues::default());
        let first = q.join("k");
        let h1 = first.head().await.unwrap();
        let second = q.join("k");
        let mut fut = Box::pin(second.head());
        assert!(futures_util::poll!(&mut fut).is_pending());
        drop(h1);
        assert!(futures_util::poll!(&mut fut).is_ready());
    }
}
