//! The lease keeper: one task per `Locker` renews every held lease, watches each
//! lease's local validity deadline, and releases what guards hand back on drop.
//!
//! Holding 100k leases costs 100k timer entries in one `BTreeSet`, not tasks;
//! leases due for renewal within a short window are renewed together, in batches of
//! up to a thousand per script call.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::backend::{Backend, Renewal};
use crate::error::{Chain, Error, LostReason, Result};
use crate::lease::LeaseState;
use crate::obs;

/// Leases due for renewal within this window of each other are renewed together.
const COALESCE: Duration = Duration::from_millis(25);

/// What a guard or the locker asks of the keeper.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// Keep this lease alive. `valid_until` is its local validity deadline.
    Hold {
        lease: Arc<LeaseState>,
        valid_until: Instant,
        /// When to renew first: `renew_every` after the request was sent,
        /// sooner for a lease a fair mutex's release handed over with its
        /// ticket's life.
        first_renewal: Instant,
        renew_every: Duration,
        max_hold_at: Option<Instant>,
    },
    /// Stop renewing and release (or, with `keep_until`, let the key expire then).
    Release {
        lease: Arc<LeaseState>,
        keep_until: Option<Instant>,
        reply: Option<oneshot::Sender<Result<()>>>,
    },
    /// Release a lease already marked lost (or about to be), whose keeper task
    /// its runtime dropped: left to the next task.
    Discard {
        lease: Arc<LeaseState>,
        keep_until: Option<Instant>,
    },
    /// Extend this lease now so that its key lives at least `by` from now on
    /// the server, and keep it at least that long through later renewals;
    /// answer when the server confirmed (see [`LockGuard::extend`]).
    ///
    /// [`LockGuard::extend`]: crate::LockGuard::extend
    Extend {
        lease: Arc<LeaseState>,
        by: Duration,
        reply: oneshot::Sender<Result<()>>,
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

/// The handle a `Locker` keeps: the command queue of its keeper task, started on
/// first use on the runtime of the caller.
///
/// Commands are served in the order sent, but not every command wakes the task.
/// A new lease (`Hold`) needs the keeper only by its first renewal, so it wakes
/// the task only if that comes before the task's next timer; forgetting a
/// released lease (`Forget`) never needs to. Both wait in the queue until the
/// task wakes for something else, or until [`MAX_DEFERRED`] commands wait. An
/// uncontended acquire and release then cost no task wake-up at all (each would
/// unpark a worker thread on a multi-threaded runtime).
///
/// A runtime that shuts down drops the task, even one it never polled. Every
/// lease the task was keeping (or had not seen yet) then has its lost signal
/// fired with [`LostReason::RuntimeShutdown`] at once, and is handed, with
/// every command left unserved, to the next task: the next command sent from
/// a live runtime starts it there. So a `Locker` works from one runtime after
/// another, and no guard is ever left unkept without being told.
#[derive(Debug)]
pub(crate) struct Keeper {
    backend: Backend,
    queue: Mutex<Arc<Queue>>,
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
    /// A task was spawned for this queue.
    spawned: bool,
    /// Every `Locker` handle is gone: finish.
    orphaned: bool,
    /// The task finished (closed or orphaned): sends fail.
    gone: bool,
    /// The task's runtime dropped it before it finished: `cmds` are left for a
    /// successor.
    abandoned: bool,
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

impl Keeper {
    pub(crate) fn new(backend: Backend) -> Self {
        Keeper {
            backend,
            queue: Mutex::new(Arc::default()),
        }
    }

    /// The queue of a running task, starting one on the caller's runtime if
    /// none runs yet or the last one's runtime dropped it. `None` if the keeper
    /// finished (closed) or no runtime is at hand.
    fn running(&self) -> Option<Arc<Queue>> {
        let mut current = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let (spawned, abandoned, gone) = {
            let q = current.lock();
            (q.spawned, q.abandoned, q.gone)
        };
        if spawned && !abandoned {
            return (!gone).then(|| Arc::clone(&current));
        }
        let rt = tokio::runtime::Handle::try_current().ok()?;
        if abandoned {
            // What the dropped task left, in order, goes to its successor.
            let next = Queue::default();
            {
                let mut old = current.lock();
                let mut q = next.lock();
                q.cmds = std::mem::take(&mut old.cmds);
                q.orphaned = old.orphaned;
            }
            *current = Arc::new(next);
        }
        current.lock().spawned = true;
        let task = Task::new(Arc::clone(&current), self.backend.clone());
        rt.spawn(task.run());
        Some(Arc::clone(&current))
    }

    /// Sends a command, starting the task if needed. `false` if the keeper has
    /// finished (closed) or cannot start (no runtime).
    pub(crate) fn send(&self, cmd: Cmd) -> bool {
        let Some(queue) = self.running() else {
            return false;
        };
        let due = cmd.due(Instant::now());
        let mut q = queue.lock();
        if q.gone {
            return false;
        }
        if q.abandoned {
            // The runtime dropped the task just now: leave the command to its
            // successor, as the task would have.
            q.cmds.push(cmd.abandon());
            return true;
        }
        q.cmds.push(cmd);
        let wake = must_wake(q.asleep, q.cmds.len(), due, q.armed);
        if wake {
            q.asleep = false;
            drop(q);
            queue.wake.notify_one();
        }
        true
    }

    /// True once a task was started (it shuts the backend down when it ends).
    pub(crate) fn started(&self) -> bool {
        let current = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let q = current.lock();
        q.spawned && !q.abandoned
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let current = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        current.lock().orphaned = true;
        current.wake.notify_one();
    }
}

/// The wake-deferral rule: whether sending a command due at `due` (`None`:
/// never on its own) must wake a keeper that is `asleep` with its timer
/// `armed` for that instant (`None`: no timer), `queued` commands waiting
/// now (this one included).
fn must_wake(asleep: bool, queued: usize, due: Option<Instant>, armed: Option<Instant>) -> bool {
    asleep
        && (queued >= MAX_DEFERRED
            || match (due, armed) {
                (Some(due), Some(armed)) => due < armed,
                (Some(_), None) => true,
                (None, _) => false,
            })
}

impl Cmd {
    /// When the keeper must see this command, sent at `now`: a new lease by
    /// its first renewal (or its hold limit), a forgotten one never on its own
    /// (`None`), anything else at once.
    fn due(&self, now: Instant) -> Option<Instant> {
        match self {
            Cmd::Hold {
                valid_until,
                first_renewal,
                max_hold_at,
                ..
            } => {
                let due = (*first_renewal).min(*valid_until);
                Some(max_hold_at.map_or(due, |m| due.min(m)))
            }
            Cmd::Forget { .. } => None,
            Cmd::Release { .. }
            | Cmd::Discard { .. }
            | Cmd::Check { .. }
            | Cmd::Extend { .. }
            | Cmd::Close { .. } => Some(now),
        }
    }

    /// This command as left to the next task when its runtime dropped the one
    /// it was sent to: a lease to keep is lost by then.
    fn abandon(self) -> Cmd {
        match self {
            Cmd::Hold { lease, .. } => {
                lease.mark_lost(LostReason::RuntimeShutdown);
                Cmd::Discard {
                    lease,
                    keep_until: None,
                }
            }
            cmd => cmd,
        }
    }
}

struct Entry {
    lease: Arc<LeaseState>,
    renew_at: Instant,
    valid_until: Instant,
    max_hold_at: Option<Instant>,
    renew_every: Duration,
    in_flight: bool,
    wake: Instant,
    /// The server TTL the renewal in flight asked for.
    ttl: Duration,
    /// The latest instant the user asked the key to live until
    /// ([`Cmd::Extend`]): renewals set the TTL to reach at least this far.
    floor: Option<Instant>,
    /// Extensions asked for since the renewal in flight was sent: the next
    /// renewal answers them.
    extends: Vec<oneshot::Sender<Result<()>>>,
    /// Extensions the renewal in flight answers.
    covered: Vec<oneshot::Sender<Result<()>>>,
}

/// A lease leaves the held-leases gauge when the keeper lets it go.
impl Drop for Entry {
    fn drop(&mut self) {
        self.lease.uncount_held();
    }
}

impl Entry {
    /// Publishes when the lost signal fires unless a renewal is confirmed
    /// first, for [`LockGuard::expires_in`](crate::LockGuard::expires_in).
    fn publish_deadline(&self) {
        let deadline = self
            .max_hold_at
            .map_or(self.valid_until, |m| m.min(self.valid_until));
        self.lease.set_deadline(deadline);
    }

    /// The TTL a renewal sent at `now` asks for: the lease's expiry, or more
    /// to reach the floor an extension set.
    fn ttl_at(&self, now: Instant) -> Duration {
        let expiry = self.lease.expiry;
        self.floor
            .map_or(expiry, |f| expiry.max(f.saturating_duration_since(now)))
    }

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
    releases: JoinSet<u64>,
    /// The leases whose release is in flight in `releases`, by id.
    releasing: HashMap<u64, (Arc<LeaseState>, Option<Instant>)>,
    closed: bool,
}

/// The keeper task: its queue and state. Dropped before it finished (its
/// runtime shut down, perhaps before ever polling it), it fires the lost signal
/// of every lease it kept and leaves their release, and every command it had
/// not served, to the next task (see [`Keeper`]).
struct Task {
    queue: Arc<Queue>,
    st: State,
    finished: bool,
}

impl Task {
    fn new(queue: Arc<Queue>, backend: Backend) -> Self {
        Task {
            queue,
            st: State {
                backend,
                entries: HashMap::new(),
                timers: BTreeSet::new(),
                batches: FuturesUnordered::new(),
                releases: JoinSet::new(),
                releasing: HashMap::new(),
                closed: false,
            },
            finished: false,
        }
    }

    async fn run(mut self) {
        let (queue, st) = (&self.queue, &mut self.st);
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
                Some(done) = st.releases.join_next(), if !st.releases.is_empty() => {
                    st.released(done);
                }
            }
        };
        // Closed, or every Locker handle and guard is gone: release what is left
        // and finish. Commands already queued are served as after a close (a
        // lease registered concurrently is released); later sends fail, and
        // their senders release or fail by themselves.
        st.close_all();
        let mut closers = Vec::new();
        for cmd in after_close.into_iter().chain(queue.finish()) {
            match cmd {
                Cmd::Close { reply } => closers.push(reply),
                cmd => st.command(cmd),
            }
        }
        while let Some(done) = st.releases.join_next().await {
            st.released(done);
        }
        // Those releases answered on a majority: the rest finish first.
        st.backend.settle(st.backend.attempt_bound()).await;
        st.backend.shutdown();
        for reply in closed.into_iter().chain(closers) {
            let _ = reply.send(());
        }
        self.finished = true;
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // The runtime dropped the task. Whatever it kept is unkept from now on:
        // say so, and leave the releases to the next task.
        let mut left = Vec::new();
        for (_, e) in self.st.entries.drain() {
            e.lease.mark_lost(LostReason::RuntimeShutdown);
            left.push(Cmd::Discard {
                lease: Arc::clone(&e.lease),
                keep_until: None,
            });
        }
        for (_, (lease, keep_until)) in self.st.releasing.drain() {
            left.push(Cmd::Discard { lease, keep_until });
        }
        let mut q = self.queue.lock();
        let queued = std::mem::take(&mut q.cmds);
        left.extend(queued.into_iter().map(Cmd::abandon));
        if q.gone {
            // It was closing: nothing more runs for this locker.
            return;
        }
        q.abandoned = true;
        q.cmds = left;
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
                first_renewal,
                renew_every,
                max_hold_at,
            } => {
                if self.closed {
                    lease.mark_lost(LostReason::Closed);
                    self.spawn_release(lease, None, None);
                    return;
                }
                let mut e = Entry {
                    renew_at: first_renewal,
                    valid_until,
                    max_hold_at,
                    renew_every,
                    in_flight: false,
                    wake: valid_until,
                    ttl: lease.expiry,
                    floor: None,
                    extends: Vec::new(),
                    covered: Vec::new(),
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
            Cmd::Discard { lease, keep_until } => {
                self.remove(lease.id);
                self.spawn_release(lease, keep_until, None);
            }
            Cmd::Extend { lease, by, reply } => {
                let Some(e) = self.entries.get_mut(&lease.id) else {
                    let err = match lease.lost_reason() {
                        Some(reason) => lease.lost_error(reason),
                        None if self.closed => crate::error::Error::Closed,
                        None => lease.lost_error(LostReason::Stolen),
                    };
                    let _ = reply.send(Err(err));
                    return;
                };
                let until = Instant::now() + by;
                e.floor = Some(e.floor.map_or(until, |f| f.max(until)));
                e.extends.push(reply);
                // A renewal in flight was sent before this request: the
                // next one, sent when it lands, answers it.
                if !e.in_flight {
                    self.renew(vec![lease.id]);
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
                    self.spawn_release(Arc::clone(&e.lease), None, None);
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
                    self.spawn_release(Arc::clone(&e.lease), None, None);
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
        // Taken before the request goes out, and used both for the TTL asked
        // for and for the deadline it confirms: the server's expiry is at
        // least `sent + ttl`, so the deadline stays earlier.
        let sent = Instant::now();
        let mut batch = Vec::with_capacity(ids.len());
        for &id in &ids {
            if let Some(e) = self.entries.get_mut(&id) {
                self.timers.remove(&(e.wake, id));
                e.in_flight = true;
                e.ttl = e.ttl_at(sent);
                let asked = std::mem::take(&mut e.extends);
                e.covered.extend(asked);
                e.wake = e.next_wake();
                self.timers.insert((e.wake, id));
                batch.push(Renewal {
                    keys: e.lease.keys.clone(),
                    token: e.lease.token.clone(),
                    ttl: e.ttl,
                });
            }
        }
        let backend = self.backend.clone();
        self.batches.push(Box::pin(async move {
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
                        let mut again = false;
                        if let Some(e) = self.entries.get_mut(&id) {
                            e.in_flight = false;
                            // Every renewal since this one was sent asked for
                            // at least as much (`ttl_at` never goes below an
                            // earlier floor): the latest deadline stands.
                            let validity = e.lease.validity_for(e.ttl);
                            e.valid_until = e.valid_until.max(sent + validity);
                            e.renew_at = sent + e.renew_every;
                            e.publish_deadline();
                            for reply in e.covered.drain(..) {
                                let _ = reply.send(Ok(()));
                            }
                            again = !e.extends.is_empty();
                        }
                        self.reschedule(id);
                        if again {
                            self.renew(vec![id]);
                        }
                    } else if let Some(mut e) = self.remove(id) {
                        if !e.lease.is_releasing() {
                            e.lease.mark_lost(LostReason::Stolen);
                        }
                        let reason = e.lease.lost_reason().unwrap_or(LostReason::Stolen);
                        for reply in e.covered.drain(..).chain(e.extends.drain(..)) {
                            let _ = reply.send(Err(e.lease.lost_error(reason)));
                        }
                    }
                }
            }
            Err(err) => {
                tracing::debug!(error = %Chain(&err), leases = ids.len(), "renewal failed; retrying until the validity deadline");
                let now = Instant::now();
                for id in ids {
                    if let Some(e) = self.entries.get_mut(&id) {
                        e.in_flight = false;
                        e.renew_at = now + (e.renew_every / 4).min(Duration::from_millis(500));
                        for reply in e.covered.drain(..) {
                            let _ = reply
                                .send(Err(Error::unavailable("extend", Chain(&err).to_string())));
                        }
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
        let id = lease.id;
        self.releasing.insert(id, (Arc::clone(&lease), keep_until));
        self.releases.spawn(async move {
            let result = release(&backend, &lease, keep_until).await;
            if let Some(reply) = reply {
                let _ = reply.send(result);
            }
            id
        });
    }

    /// A release task ended (or panicked, or was cancelled).
    fn released(&mut self, done: std::result::Result<u64, tokio::task::JoinError>) {
        if let Ok(id) = done {
            self.releasing.remove(&id);
        }
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
                keys: lease.keys.clone(),
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
    settle(lease, ours)
}

/// Releases the leases of one acquisition on several keys together: under
/// one token in one request where they were taken so (see
/// [`Backend::release_all`]), else each at once. One outcome per lease, or one
/// error for all when the backend could not be told.
pub(crate) async fn release_all(backend: &Backend, leases: &[&LeaseState]) -> Vec<Result<()>> {
    let Some(first) = leases.first() else {
        return Vec::new();
    };
    if leases.iter().any(|l| l.token != first.token) {
        // Taken one by one (a Cluster, Redlock): each under its own token.
        let each = leases.iter().map(|l| release(backend, l, None));
        return futures_util::future::join_all(each).await;
    }
    let locks: Vec<_> = leases.iter().map(|l| l.keys.clone()).collect();
    match backend.release_all(&locks, &first.token).await {
        Ok(ours) => leases
            .iter()
            .zip(ours)
            .map(|(lease, ours)| settle(lease, Ok(ours)))
            .collect(),
        Err(e) => vec![Err(e)],
    }
}

/// What a release's answer means for its lease.
fn settle(lease: &LeaseState, ours: Result<bool>) -> Result<()> {
    obs::released(&lease.keys.name, &lease.name, lease.acquired_at.elapsed());
    match ours {
        Ok(true) => Ok(()),
        // Someone else holds the key, or it expired: the critical section may
        // have overlapped with another owner's.
        Ok(false) => match lease.lost_reason() {
            Some(reason) => Err(lease.lost_error(reason)),
            // A release the guard started (in its caller's task) and handed
            // over when its future was dropped may have run before this one:
            // the key is gone because it was released, not taken. The work is
            // over either way, so no signal fires for it.
            None if lease.is_releasing() => Err(lease.lost_error(LostReason::Stolen)),
            None => {
                lease.mark_lost(LostReason::Stolen);
                Err(lease.lost_error(LostReason::Stolen))
            }
        },
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{Keys, LockKind};

    fn hold(now: Instant, max_hold: Option<Duration>) -> Cmd {
        let keys = Keys::new("t:", "k", LockKind::Mutex).unwrap_or_else(|e| panic!("{e}"));
        let opts = crate::options::LeaseOptions::default();
        let lease = Arc::new(LeaseState::new(1, keys, "tok".into(), 1, &opts, None));
        Cmd::Hold {
            lease,
            valid_until: now + Duration::from_millis(29_400),
            first_renewal: now + Duration::from_secs(10),
            renew_every: Duration::from_secs(10),
            max_hold_at: max_hold.map(|m| now + m),
        }
    }

    #[test]
    fn a_new_lease_is_due_at_its_first_renewal_or_its_hold_limit() {
        let now = Instant::now();
        assert_eq!(
            hold(now, None).due(now),
            Some(now + Duration::from_secs(10))
        );
        let limited = hold(now, Some(Duration::from_secs(2)));
        assert_eq!(limited.due(now), Some(now + Duration::from_secs(2)));
        assert_eq!(Cmd::Forget { id: 1 }.due(now), None);
        let check = Cmd::Check { name: "k".into() };
        assert_eq!(check.due(now), Some(now));
    }

    #[test]
    fn only_what_comes_before_the_armed_timer_wakes_a_sleeping_keeper() {
        let now = Instant::now();
        let armed = Some(now + Duration::from_secs(5));
        // A lease first renewed after the timer waits for it.
        assert!(!must_wake(
            true,
            1,
            Some(now + Duration::from_secs(10)),
            armed
        ));
        // One due earlier, or anything due at once, wakes the keeper.
        assert!(must_wake(
            true,
            1,
            Some(now + Duration::from_secs(1)),
            armed
        ));
        assert!(must_wake(true, 1, Some(now), armed));
        // Without a timer, anything with a due time wakes it.
        assert!(must_wake(
            true,
            1,
            Some(now + Duration::from_secs(10)),
            None
        ));
        // A forgotten lease never does, until too many commands wait.
        assert!(!must_wake(true, 1, None, armed));
        assert!(!must_wake(true, 1, None, None));
        assert!(must_wake(true, MAX_DEFERRED, None, armed));
        // A keeper that is awake is never woken.
        assert!(!must_wake(false, MAX_DEFERRED, Some(now), armed));
    }
}
