//! The lease keeper: one task per `Locker` renews every held lease, watches each
//! lease's local validity deadline, and releases what guards hand back on drop.
//!
//! Holding 100k leases costs 100k timer entries in one `BTreeSet`, not tasks;
//! leases due for renewal within a short window are renewed together, in batches of
//! up to a thousand per script call.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, Renewal};
use crate::error::{Error, LostReason, Result};
use crate::key::Keys;
use crate::obs;

/// Leases due for renewal within this window of each other are renewed together.
const COALESCE: Duration = Duration::from_millis(25);

/// The state of one held lease shared by its guard and the keeper.
#[derive(Debug)]
pub(crate) struct LeaseState {
    pub(crate) id: u64,
    pub(crate) keys: Keys,
    pub(crate) token: String,
    pub(crate) fence: u64,
    pub(crate) expiry: Duration,
    pub(crate) acquired_at: Instant,
    lost: CancellationToken,
    reason: OnceLock<LostReason>,
    /// Set when its guard started releasing it: a renewal that then finds the
    /// key gone is the release, not a theft.
    releasing: AtomicBool,
}

impl LeaseState {
    pub(crate) fn new(id: u64, keys: Keys, token: String, fence: u64, expiry: Duration) -> Self {
        LeaseState {
            id,
            keys,
            token,
            fence,
            expiry,
            acquired_at: Instant::now(),
            lost: CancellationToken::new(),
            reason: OnceLock::new(),
            releasing: AtomicBool::new(false),
        }
    }

    pub(crate) fn set_releasing(&self) {
        self.releasing.store(true, Ordering::Relaxed);
    }

    fn is_releasing(&self) -> bool {
        self.releasing.load(Ordering::Relaxed)
    }

    /// Records the loss (the first reason wins) and fires the lost signal.
    pub(crate) fn mark_lost(&self, reason: LostReason) {
        if self.reason.set(reason).is_ok() {
            obs::lost(&self.keys.name, reason);
            self.lost.cancel();
        }
    }

    pub(crate) fn lost_reason(&self) -> Option<LostReason> {
        self.reason.get().copied()
    }

    pub(crate) fn lost_token(&self) -> &CancellationToken {
        &self.lost
    }

    pub(crate) fn lost_error(&self, reason: LostReason) -> Error {
        Error::Lost {
            key: crate::error::shorten(&self.keys.name),
            reason,
        }
    }
}

/// What a guard or the locker asks of the keeper.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// Keep this lease alive. `valid_until` is its local validity deadline.
    Hold {
        lease: Arc<LeaseState>,
        valid_until: Instant,
        renew_every: Duration,
        validity: Duration,
        max_hold_at: Option<Instant>,
    },
    /// Stop renewing and release (or, with `keep_until`, let the key expire then).
    Release {
        lease: Arc<LeaseState>,
        keep_until: Option<Instant>,
        reply: Option<oneshot::Sender<Result<()>>>,
    },
    /// Stop renewing without releasing (detach).
    Forget { id: u64 },
    /// Renew every lease on this lock name now (after a force-unlock).
    Check { name: String },
    /// Release everything, fire `Closed`, stop the keeper, and answer when done.
    Close { reply: oneshot::Sender<()> },
}

/// How many deferred commands may wait before they wake the keeper anyway.
const MAX_DEFERRED: usize = 1024;

/// The handle a `Locker` keeps: the command queue, and the task, started on first
/// use (it needs a runtime).
///
/// Commands are served in the order sent, but not every command wakes the task.
/// A new lease (`Hold`) needs the keeper only by its first renewal, so it wakes
/// the task only if that comes before the task's next timer; forgetting a
/// released lease (`Forget`) never needs to. Both wait in the queue until the
/// task wakes for something else, or until [`MAX_DEFERRED`] commands wait. An
/// uncontended acquire and release then cost no task wake-up at all (each would
/// unpark a worker thread on a multi-threaded runtime).
#[derive(Debug)]
pub(crate) struct Keeper {
    queue: Arc<Queue>,
    start: Mutex<Option<Backend>>,
}

/// The commands waiting for the keeper task, and when it will wake by itself.
#[derive(Debug, Default)]
struct Queue {
    state: Mutex<QueueState>,
    wake: Notify,
}

#[derive(Debug, Default)]
struct QueueState {
    cmds: Vec<Cmd>,
    /// Asleep until this instant (`None`: awake, or asleep with no timer while
    /// `asleep` says so).
    armed: Option<Instant>,
    asleep: bool,
    /// Every `Locker` handle is gone: finish.
    orphaned: bool,
    /// The task finished (or its runtime dropped it): sends fail.
    gone: bool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the waiting commands; the task is awake until it arms again.
    fn take(&self) -> (Vec<Cmd>, bool) {
        let mut q = self.lock();
        q.asleep = false;
        q.armed = None;
        (std::mem::take(&mut q.cmds), q.orphaned)
    }

    /// Records that the task sleeps until `until` (or indefinitely), unless
    /// commands arrived meanwhile (`false`: take them first).
    fn arm(&self, until: Option<Instant>) -> bool {
        let mut q = self.lock();
        if !q.cmds.is_empty() || q.orphaned {
            return false;
        }
        q.asleep = true;
        q.armed = until;
        true
    }

    /// The task ends: later sends fail. Returns what was still queued.
    fn finish(&self) -> Vec<Cmd> {
        let mut q = self.lock();
        q.gone = true;
        std::mem::take(&mut q.cmds)
    }
}

/// Marks the queue gone when the task ends, also when its runtime drops it.
struct Finish(Arc<Queue>);

impl Drop for Finish {
    fn drop(&mut self) {
        self.0.lock().gone = true;
    }
}

impl Keeper {
    pub(crate) fn new(backend: Backend) -> Self {
        Keeper {
            queue: Arc::default(),
            start: Mutex::new(Some(backend)),
        }
    }

    /// Sends a command, starting the task if needed. `false` if the keeper is gone
    /// (its runtime shut down) or cannot start (no runtime).
    pub(crate) fn send(&self, cmd: Cmd) -> bool {
        {
            let mut start = self.start.lock().unwrap_or_else(PoisonError::into_inner);
            if start.is_some() {
                let Ok(rt) = tokio::runtime::Handle::try_current() else {
                    return false;
                };
                if let Some(backend) = start.take() {
                    let queue = Arc::clone(&self.queue);
                    rt.spawn(run(queue, backend));
                }
            }
        }
        // When the keeper must see this command: `None` for never on its own.
        let due = match &cmd {
            Cmd::Hold {
                valid_until,
                renew_every,
                validity,
                max_hold_at,
                ..
            } => {
                let first_renewal = *valid_until - *validity + *renew_every;
                let due = first_renewal.min(*valid_until);
                Some(max_hold_at.map_or(due, |m| due.min(m)))
            }
            Cmd::Forget { .. } => None,
            Cmd::Release { .. } | Cmd::Check { .. } | Cmd::Close { .. } => Some(Instant::now()),
        };
        let mut q = self.queue.lock();
        if q.gone {
            return false;
        }
        q.cmds.push(cmd);
        let wake = q.asleep
            && (q.cmds.len() >= MAX_DEFERRED
                || match (due, q.armed) {
                    (Some(due), Some(armed)) => due < armed,
                    (Some(_), None) => true,
                    (None, _) => false,
                });
        if wake {
            q.asleep = false;
            drop(q);
            self.queue.wake.notify_one();
        }
        true
    }

    /// True once the task was started.
    pub(crate) fn started(&self) -> bool {
        self.start
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.queue.lock().orphaned = true;
        self.queue.wake.notify_one();
    }
}

struct Entry {
    lease: Arc<LeaseState>,
    renew_at: Instant,
    valid_until: Instant,
    max_hold_at: Option<Instant>,
    renew_every: Duration,
    validity: Duration,
    in_flight: bool,
    wake: Instant,
}

impl Entry {
    fn next_wake(&self) -> Instant {
        let mut w = self.valid_until;
        if !self.in_flight {
            w = w.min(self.renew_at);
        }
        if let Some(m) = self.max_hold_at {
            w = w.min(m);
        }
        w
    }
}

type Batch = Pin<Box<dyn Future<Output = (Instant, Vec<u64>, Result<Vec<bool>>)> + Send>>;

struct State {
    backend: Backend,
    entries: HashMap<u64, Entry>,
    timers: BTreeSet<(Instant, u64)>,
    batches: FuturesUnordered<Batch>,
    releases: JoinSet<()>,
    closed: bool,
}

async fn run(queue: Arc<Queue>, backend: Backend) {
    let _finish = Finish(Arc::clone(&queue));
    let mut st = State {
        backend,
        entries: HashMap::new(),
        timers: BTreeSet::new(),
        batches: FuturesUnordered::new(),
        releases: JoinSet::new(),
        closed: false,
    };
    // Commands queued behind a `Close`, served as after a close.
    let mut after_close = Vec::new();
    let closed = 'serve: loop {
        let (cmds, orphaned) = queue.take();
        let mut cmds = cmds.into_iter();
        while let Some(cmd) = cmds.next() {
            match cmd {
                Cmd::Close { reply } => {
                    after_close.extend(cmds);
                    break 'serve Some(reply);
                }
                cmd => st.command(cmd),
            }
        }
        if orphaned {
            break None;
        }
        if st.timers.first().is_some_and(|(t, _)| *t <= Instant::now()) {
            st.due();
        }
        let next = st.timers.first().map(|(t, _)| *t);
        if !queue.arm(next) {
            continue;
        }
        tokio::select! {
            () = queue.wake.notified() => {}
            () = sleep_until(next) => {}
            Some((sent, ids, result)) = st.batches.next(), if !st.batches.is_empty() => {
                st.renewed(sent, ids, result);
            }
            Some(_) = st.releases.join_next(), if !st.releases.is_empty() => {}
        }
    };
    // Closed, or every Locker handle and guard is gone: release what is left and
    // finish. Commands already queued are served as after a close (a lease
    // registered concurrently is released); later sends fail, and their senders
    // release or fail by themselves.
    st.close_all();
    let mut closers = Vec::new();
    for cmd in after_close.into_iter().chain(queue.finish()) {
        match cmd {
            Cmd::Close { reply } => closers.push(reply),
            cmd => st.command(cmd),
        }
    }
    while st.releases.join_next().await.is_some() {}
    st.backend.shutdown();
    for reply in closed.into_iter().chain(closers) {
        let _ = reply.send(());
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl State {
    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Hold {
                lease,
                valid_until,
                renew_every,
                validity,
                max_hold_at,
            } => {
                if self.closed {
                    lease.mark_lost(LostReason::Closed);
                    self.spawn_release(lease, None, None);
                    return;
                }
                let sent = valid_until - validity;
                let mut e = Entry {
                    renew_at: sent + renew_every,
                    valid_until,
                    max_hold_at,
                    renew_every,
                    validity,
                    in_flight: false,
                    wake: valid_until,
                    lease,
                };
                e.wake = e.next_wake();
                self.timers.insert((e.wake, e.lease.id));
                self.entries.insert(e.lease.id, e);
            }
            Cmd::Release {
                lease,
                keep_until,
                reply,
            } => {
                let held = self.remove(lease.id).is_some();
                match lease.lost_reason() {
                    Some(reason) => {
                        if let Some(reply) = reply {
                            let _ = reply.send(Err(lease.lost_error(reason)));
                        }
                    }
                    None if held => self.spawn_release(lease, keep_until, reply),
                    // Not held and not lost: the keeper closed before it saw the lease.
                    None => {
                        lease.mark_lost(LostReason::Closed);
                        self.spawn_release(lease, None, reply);
                    }
                }
            }
            Cmd::Forget { id } => {
                self.remove(id);
            }
            Cmd::Check { name } => {
                let ids: Vec<u64> = self
                    .entries
                    .values()
                    .filter(|e| e.lease.keys.name == name && !e.in_flight)
                    .map(|e| e.lease.id)
                    .collect();
                self.renew(ids);
            }
            // Handled by `run`, which stops after it.
            Cmd::Close { reply } => drop(reply),
        }
    }

    fn close_all(&mut self) {
        self.closed = true;
        let ids: Vec<u64> = self.entries.keys().copied().collect();
        for id in ids {
            if let Some(e) = self.remove(id) {
                let live = e.lease.lost_reason().is_none();
                e.lease.mark_lost(LostReason::Closed);
                if live {
                    self.spawn_release(e.lease, None, None);
                }
            }
        }
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.entries.remove(&id)?;
        self.timers.remove(&(e.wake, id));
        Some(e)
    }

    fn reschedule(&mut self, id: u64) {
        if let Some(e) = self.entries.get_mut(&id) {
            self.timers.remove(&(e.wake, id));
            e.wake = e.next_wake();
            self.timers.insert((e.wake, id));
        }
    }

    /// Handles every timer that is due: losses first, then a batch of renewals.
    fn due(&mut self) {
        let now = Instant::now();
        let horizon = now + COALESCE;
        let mut due = Vec::new();
        while let Some(&(t, id)) = self.timers.first() {
            if t > horizon {
                break;
            }
            self.timers.pop_first();
            due.push(id);
        }
        let mut renew = Vec::new();
        for id in due {
            let Some(e) = self.entries.get(&id) else {
                continue;
            };
            let lost = if e.max_hold_at.is_some_and(|m| m <= now) {
                Some(LostReason::MaxHold)
            } else if e.valid_until <= now {
                Some(LostReason::DeadlineMissed)
            } else {
                None
            };
            if let Some(reason) = lost {
                // The timer was already popped: take the entry without touching it.
                if let Some(e) = self.entries.remove(&id) {
                    e.lease.mark_lost(reason);
                    self.spawn_release(e.lease, None, None);
                }
            } else if !e.in_flight && e.renew_at <= horizon {
                renew.push(id);
                // Re-inserted by `renew`.
            } else if let Some(e) = self.entries.get_mut(&id) {
                e.wake = e.next_wake();
                self.timers.insert((e.wake, id));
            }
        }
        self.renew(renew);
    }

    /// Sends one renewal batch for these leases.
    fn renew(&mut self, ids: Vec<u64>) {
        if ids.is_empty() {
            return;
        }
        let mut batch = Vec::with_capacity(ids.len());
        for &id in &ids {
            if let Some(e) = self.entries.get_mut(&id) {
                self.timers.remove(&(e.wake, id));
                e.in_flight = true;
                e.wake = e.next_wake();
                self.timers.insert((e.wake, id));
                batch.push(Renewal {
                    key: e.lease.keys.lock.clone(),
                    shared: e.lease.keys.kind.shared(),
                    token: e.lease.token.clone(),
                    ttl: e.lease.expiry,
                });
            }
        }
        let backend = self.backend.clone();
        self.batches.push(Box::pin(async move {
            let sent = Instant::now();
            let result = backend.extend_many(&batch).await;
            (sent, ids, result)
        }));
    }

    fn renewed(&mut self, sent: Instant, ids: Vec<u64>, result: Result<Vec<bool>>) {
        obs::renewed(ids.len(), result.is_ok());
        match result {
            Ok(flags) => {
                for (id, ok) in ids.into_iter().zip(flags) {
                    if ok {
                        if let Some(e) = self.entries.get_mut(&id) {
                            e.in_flight = false;
                            e.valid_until = e.valid_until.max(sent + e.validity);
                            e.renew_at = sent + e.renew_every;
                        }
                        self.reschedule(id);
                    } else if let Some(e) = self.remove(id) {
                        if !e.lease.is_releasing() {
                            e.lease.mark_lost(LostReason::Stolen);
                        }
                    }
                }
            }
            Err(err) => {
                tracing::debug!(error = %err, leases = ids.len(), "renewal failed; retrying until the validity deadline");
                let now = Instant::now();
                for id in ids {
                    if let Some(e) = self.entries.get_mut(&id) {
                        e.in_flight = false;
                        e.renew_at = now + (e.renew_every / 4).min(Duration::from_millis(500));
                    }
                    self.reschedule(id);
                }
            }
        }
    }

    fn spawn_release(
        &mut self,
        lease: Arc<LeaseState>,
        keep_until: Option<Instant>,
        reply: Option<oneshot::Sender<Result<()>>>,
    ) {
        let backend = self.backend.clone();
        self.releases.spawn(async move {
            let result = release(&backend, &lease, keep_until).await;
            if let Some(reply) = reply {
                let _ = reply.send(result);
            }
        });
    }
}

/// Releases a lease now, or lets its key expire at `keep_until`.
pub(crate) async fn release(
    backend: &Backend,
    lease: &LeaseState,
    keep_until: Option<Instant>,
) -> Result<()> {
    let now = Instant::now();
    let ours = match keep_until {
        Some(t) if t > now => {
            let batch = [Renewal {
                key: lease.keys.lock.clone(),
                shared: lease.keys.kind.shared(),
                token: lease.token.clone(),
                ttl: t - now,
            }];
            backend
                .extend_many(&batch)
                .await
                .map(|v| v.first().copied().unwrap_or(false))
        }
        _ => backend.release(&lease.keys, &lease.token).await,
    };
    obs::released(&lease.keys.name, lease.acquired_at.elapsed());
    match ours {
        Ok(true) => Ok(()),
        // Someone else holds the key, or it expired: the critical section may
        // have overlapped with another owner's.
        Ok(false) => match lease.lost_reason() {
            Some(reason) => Err(lease.lost_error(reason)),
            None => {
                lease.mark_lost(LostReason::Stolen);
                Err(lease.lost_error(LostReason::Stolen))
            }
        },
        Err(e) => Err(e),
    }
}
