//! Redlock: one lease over N independent Redis servers. Every operation runs on
//! all of them at once and answers as soon as a majority (N/2 + 1) has decided
//! it, so a minority of servers down, slow or paused changes nothing for the
//! caller. The calls still running then finish in the background ([`Fanout`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::redis::RedisBackend;
use super::{Attempt, Renewal, Request, Retoken};
use crate::error::{Error, Result, ServerError};
use crate::key::{Keys, LockKind};
use crate::notify::{Hub, Subscription};

/// Redlock bounds every call by the lease's validity: `op_timeout` must leave
/// most of the expiry to the holder. A third keeps an acquisition that waited a
/// full `op_timeout` for its majority with two thirds of its lease, and lets a
/// renewal that timed out on a majority be retried before the lease runs out.
pub(crate) fn check_timing(op_timeout: Duration, expiry: Duration) -> Result<()> {
    if op_timeout.saturating_mul(3) > expiry {
        return Err(Error::config(format!(
            "over Redlock, op_timeout ({}) must be at most a third of the lease expiry ({}): \
             a server that answers that late leaves too little of the lease",
            crate::options::fmt(op_timeout),
            crate::options::fmt(expiry)
        )));
    }
    Ok(())
}

/// The background work of a backend's operations (the calls still running
/// when an operation answered, the releases of an abandoned acquisition),
/// counted so that closing the locker can wait for it: ended with the
/// runtime instead, it would leave grants on servers to expire by themselves.
#[derive(Debug, Default)]
struct Tails {
    running: AtomicUsize,
    idle: Notify,
}

/// One running tail; counted until dropped (when it ends, or when the runtime
/// drops it).
struct Tail(Arc<Tails>);

impl Drop for Tail {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Tails {
    /// Runs `work` in the background on `rt`, counted until it ends.
    fn spawn(
        self: &Arc<Self>,
        rt: &tokio::runtime::Handle,
        work: impl Future<Output = ()> + Send + 'static,
    ) {
        self.running.fetch_add(1, Ordering::AcqRel);
        let tail = Tail(Arc::clone(self));
        rt.spawn(async move {
            work.await;
            drop(tail);
        });
    }

    /// Until no tail is running.
    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.running.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

type Call<T> = Pin<Box<dyn Future<Output = (usize, Result<T>)> + Send>>;

/// One operation's calls, one per server, started at once. The caller reads
/// answers (in the order they arrive) until it can decide; whatever is still
/// running then, or when the caller's future is dropped, finishes in a
/// background task: a call is never cut off between sending its command and
/// reading the answer, so a slow server still gets (and answers) it, within the
/// call's own `op_timeout`.
struct Fanout<T: Send + 'static> {
    pending: FuturesUnordered<Call<T>>,
    tails: Arc<Tails>,
}

impl<T: Send + 'static> Fanout<T> {
    /// Starts `call(i, server)` for each server index in `which`.
    fn start<F, Fut>(
        backend: &RedlockBackend,
        which: impl IntoIterator<Item = usize>,
        call: F,
    ) -> Self
    where
        F: Fn(usize, RedisBackend) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let pending = which
            .into_iter()
            .filter_map(|i| {
                let (_, server) = backend.servers.get(i)?;
                let fut = call(i, server.clone());
                Some(Box::pin(async move { (i, fut.await) }) as Call<T>)
            })
            .collect();
        Fanout {
            pending,
            tails: Arc::clone(&backend.tails),
        }
    }

    /// The next answer, or `None` when every call has answered.
    async fn next(&mut self) -> Option<(usize, Result<T>)> {
        self.pending.next().await
    }
}

impl<T: Send + 'static> Drop for Fanout<T> {
    fn drop(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        // Without a runtime the calls are dropped: each single-server acquire
        // then releases what it may have taken by itself (its own guard).
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut rest = std::mem::take(&mut self.pending);
        self.tails
            .spawn(&rt, async move { while rest.next().await.is_some() {} });
    }
}

/// Which servers an acquisition took, shared with its calls still running.
#[derive(Debug, Default)]
struct Claim {
    /// The acquisition failed or its future was dropped, or the lease was
    /// released since: a call that takes the lock from now on gives it back
    /// at once.
    abandoned: bool,
    /// Servers whose acquire answered "acquired" before it was abandoned.
    held: Vec<usize>,
}

/// The claims of acquisitions with calls still running, by token.
type Claims = HashMap<Arc<str>, Weak<Mutex<Claim>>>;

/// An acquisition that is not yet handed to the caller. Dropped while armed (the
/// caller's future was dropped at any await, or the acquisition failed), it
/// releases the token on every server that took it, and every call still
/// running releases it when it lands.
struct Abandon {
    backend: RedlockBackend,
    claim: Arc<Mutex<Claim>>,
    keys: Keys,
    token: Arc<str>,
    armed: bool,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let held = {
            let mut claim = self.claim.lock().unwrap_or_else(PoisonError::into_inner);
            claim.abandoned = true;
            std::mem::take(&mut claim.held)
        };
        if held.is_empty() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for i in held {
            let Some((_, server)) = self.backend.servers.get(i) else {
                continue;
            };
            let (server, keys, token) = (server.clone(), self.keys.clone(), self.token.clone());
            self.backend.tails.spawn(&rt, async move {
                let _ = server.release(&keys, &token).await;
            });
        }
    }
}

/// The servers of a Redlock, with their names for error messages.
#[derive(Debug, Clone)]
pub(crate) struct RedlockBackend {
    servers: Arc<[(String, RedisBackend)]>,
    hub: Arc<Hub>,
    /// Every server's `op_timeout` (see [`check_timing`]).
    op_timeout: Duration,
    /// Operations' background work, which [`settle`](Self::settle) waits for.
    tails: Arc<Tails>,
    /// The claims of acquisitions whose calls may still be running, by token:
    /// releasing the token marks its claim, so that a grant landing after the
    /// release (on a server reached late) is given back too.
    claims: Arc<Mutex<Claims>>,
}

impl RedlockBackend {
    /// The hub every server's pub/sub connection feeds.
    pub(crate) fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// `hub` is the hub every server's pub/sub connection feeds; `op_timeout`
    /// is the servers' request timeout.
    pub(crate) fn new(
        servers: Vec<(String, RedisBackend)>,
        hub: Arc<Hub>,
        op_timeout: Duration,
    ) -> Self {
        RedlockBackend {
            servers: servers.into(),
            hub,
            op_timeout,
            tails: Arc::default(),
            claims: Arc::default(),
        }
    }

    pub(crate) async fn subscribe(
        &self,
        channel: &str,
        ack_wait: Duration,
    ) -> (Subscription, bool) {
        for s in self.servers() {
            s.start_pubsub();
        }
        self.hub.subscribe(channel, ack_wait).await
    }

    /// How many servers make a majority.
    pub(crate) fn quorum(&self) -> usize {
        quorum_of(self.servers.len())
    }

    /// The longest one request to one server may take.
    pub(crate) fn op_timeout(&self) -> Duration {
        self.op_timeout
    }

    pub(crate) fn servers(&self) -> impl Iterator<Item = &RedisBackend> {
        self.servers.iter().map(|(_, s)| s)
    }

    /// How many servers may fail (or refuse) with a majority still possible.
    fn spare(&self) -> usize {
        self.servers.len() - self.quorum()
    }

    fn cause(&self, i: usize, error: Error) -> ServerError {
        ServerError {
            server: self
                .servers
                .get(i)
                .map_or_else(String::new, |(name, _)| name.clone()),
            error,
        }
    }

    /// The error when too few servers answered.
    fn quorum_error(&self, succeeded: usize, causes: Vec<ServerError>) -> Error {
        Error::Quorum {
            succeeded,
            needed: self.quorum(),
            causes,
        }
    }

    /// A semaphore of `max` permits is enforced over N servers only if `max + 1`
    /// holders, each on a majority, cannot fit without some server holding more
    /// than `max`: `(max + 1) * quorum > N * max`.
    pub(crate) fn check_kind(&self, kind: LockKind) -> Result<()> {
        if let LockKind::Semaphore { max } = kind {
            let n = self.servers.len();
            if !semaphore_holds(n, max) {
                return Err(Error::config(format!(
                    "a semaphore of {max} permits cannot be enforced over {n} Redlock servers \
                     (holders on different majorities could exceed it); use one server"
                )));
            }
        }
        Ok(())
    }

    /// Takes the lock on a majority, then writes the fencing token back to that
    /// majority; all within the lease's expiry.
    ///
    /// Cancel safe as a whole: until `Acquired` is returned, a drop at any await
    /// (or a failure) releases the token on every server that took it, and
    /// calls still in flight release it when they land ([`Abandon`]). Servers
    /// that had not answered when the majority was reached keep running in the
    /// background: a late "acquired" joins the lease (renewals and the release
    /// go to every server), unless the acquisition was abandoned meanwhile.
    pub(crate) async fn acquire(&self, req: Request<'_>) -> Result<Attempt> {
        let (keys, token, expiry, intent) = req.parts();
        self.check_kind(keys.kind)?;
        check_timing(self.op_timeout, expiry)?;
        let deadline = Instant::now() + expiry;
        let token: Arc<str> = token.into();
        let claim = Arc::new(Mutex::new(Claim::default()));
        {
            let mut claims = self.claims.lock().unwrap_or_else(PoisonError::into_inner);
            claims.retain(|_, c| c.strong_count() > 0);
            claims.insert(Arc::clone(&token), Arc::downgrade(&claim));
        }
        let mut abandon = Abandon {
            backend: self.clone(),
            claim: Arc::clone(&claim),
            keys: keys.clone(),
            token: Arc::clone(&token),
            armed: true,
        };
        let mut calls = Fanout::start(self, 0..self.servers.len(), |i, server| {
            let (keys, token, claim) = (keys.clone(), Arc::clone(&token), Arc::clone(&claim));
            async move {
                let req = Request {
                    keys: &keys,
                    token: &token,
                    expiry,
                    intent,
                    ticket: Duration::ZERO,
                };
                let r = server.acquire(req).await;
                if let Ok(Attempt::Acquired { .. }) = r {
                    let abandoned = {
                        let mut c = claim.lock().unwrap_or_else(PoisonError::into_inner);
                        if !c.abandoned {
                            c.held.push(i);
                        }
                        c.abandoned
                    };
                    if abandoned {
                        let _ = server.release(&keys, &token).await;
                    }
                }
                r
            }
        });
        let taken = async {
            let fences = match self.take_majority(&mut calls).await {
                Ok(fences) => fences,
                Err(outcome) => return outcome,
            };
            let fence = fences.iter().map(|&(_, f)| f).max().unwrap_or(0);
            self.write_back(keys, &fences, fence).await?;
            Ok(Attempt::Acquired { fence })
        };
        let outcome = tokio::time::timeout_at(deadline, taken)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Unavailable {
                    context: format!(
                        "redlock acquire: no majority within the lease expiry ({})",
                        crate::options::fmt(expiry)
                    ),
                    source: None,
                })
            });
        // Only a lease handed back whole disarms the guard: from here to the
        // caller there is no await.
        if let Ok(Attempt::Acquired { .. }) = outcome {
            abandon.armed = false;
        }
        outcome
    }

    /// Reads acquire answers until a majority took the lock (`Ok`, each
    /// server's index and fencing token) or it no longer can (`Err`, the
    /// outcome to return).
    async fn take_majority(
        &self,
        calls: &mut Fanout<Attempt>,
    ) -> std::result::Result<Vec<(usize, u64)>, Result<Attempt>> {
        let mut fences = Vec::new();
        let mut ttls = Vec::new();
        let mut causes = Vec::new();
        while let Some((i, r)) = calls.next().await {
            match r {
                Ok(Attempt::Acquired { fence }) => fences.push((i, fence)),
                Ok(Attempt::Held { ttl }) => ttls.push(ttl),
                Err(error) => causes.push(self.cause(i, error)),
            }
            if fences.len() >= self.quorum() {
                return Ok(fences);
            }
            if ttls.len() + causes.len() > self.spare() {
                break;
            }
        }
        if causes.len() > self.spare() {
            return Err(Err(self.quorum_error(fences.len(), causes)));
        }
        if let Some(cause) = causes.iter().find(|c| c.error.is_invalid_input()) {
            return Err(Err(Error::config(format!(
                "{}: {}",
                cause.server, cause.error
            ))));
        }
        Err(Ok(Attempt::Held {
            ttl: ttls.into_iter().flatten().min(),
        }))
    }

    /// Raises the fencing counter to `fence` on every server of the majority
    /// that granted the lease; each must confirm, or the acquisition fails.
    ///
    /// Why that is enough: a later holder takes the lock on a majority of its
    /// own, which shares a server S with ours. On S it mints its token after
    /// our key there is gone (released, or expired, which is after this
    /// write-back was confirmed: the acquisition is refused when it ends past
    /// the lease's validity), so from a counter already at `fence` or above:
    /// its token, the largest of its majority's, is larger than ours.
    async fn write_back(&self, keys: &Keys, granted: &[(usize, u64)], fence: u64) -> Result<()> {
        let mut raises = Fanout::start(self, granted.iter().map(|&(i, _)| i), |_, server| {
            let keys = keys.clone();
            async move { server.raise_fence(&keys, fence).await }
        });
        let mut confirmed = 0;
        while let Some((i, r)) = raises.next().await {
            match r {
                Ok(()) => confirmed += 1,
                Err(error) => {
                    return Err(self.quorum_error(confirmed, vec![self.cause(i, error)]));
                }
            }
        }
        Ok(())
    }

    pub(crate) async fn release(&self, keys: &Keys, token: &str) -> Result<bool> {
        let claim = self
            .claims
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(token)
            .and_then(|c| c.upgrade());
        if let Some(claim) = claim {
            // Acquire calls still running give back what they take.
            claim
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .abandoned = true;
        }
        let token: Arc<str> = token.into();
        let mut calls = Fanout::start(self, 0..self.servers.len(), |_, server| {
            let (keys, token) = (keys.clone(), Arc::clone(&token));
            async move { server.release(&keys, &token).await.map(|ok| vec![ok]) }
        });
        self.majority(&mut calls, 1)
            .await
            .map(|v| v.first().copied().unwrap_or(false))
    }

    pub(crate) async fn extend_many(&self, batch: &[Renewal]) -> Result<Vec<bool>> {
        let shared: Arc<[Renewal]> = batch.into();
        let mut calls = Fanout::start(self, 0..self.servers.len(), |_, server| {
            let batch = Arc::clone(&shared);
            async move { server.extend_many(&batch).await }
        });
        self.majority(&mut calls, batch.len()).await
    }

    /// Per item, true when a majority of servers said true; an error when too
    /// many servers failed to answer. Answers as soon as every item is decided
    /// by the servers that answered (and they are a majority).
    async fn majority(&self, calls: &mut Fanout<Vec<bool>>, items: usize) -> Result<Vec<bool>> {
        let (n, q) = (self.servers.len(), self.quorum());
        let mut votes = vec![0usize; items];
        let mut answered = 0;
        let mut causes = Vec::new();
        while let Some((i, r)) = calls.next().await {
            match r {
                Ok(flags) => {
                    answered += 1;
                    for (v, ok) in votes.iter_mut().zip(flags) {
                        *v += usize::from(ok);
                    }
                }
                Err(error) => causes.push(self.cause(i, error)),
            }
            if causes.len() > self.spare() {
                break;
            }
            let unanswered = n - answered - causes.len();
            if answered >= q && votes.iter().all(|&v| v >= q || v + unanswered < q) {
                break;
            }
        }
        if answered < q {
            return Err(self.quorum_error(answered, causes));
        }
        Ok(votes.into_iter().map(|v| v >= q).collect())
    }

    /// The answers of `calls`: as soon as a majority answered when `early`,
    /// else every server's (each within its request timeout). Fewer than a
    /// majority of answers is a quorum error naming each failed server.
    async fn answers<T: Send + 'static>(
        &self,
        mut calls: Fanout<T>,
        early: bool,
    ) -> Result<Vec<T>> {
        let (mut answers, mut causes) = (Vec::new(), Vec::new());
        while let Some((i, r)) = calls.next().await {
            match r {
                Ok(answer) => answers.push(answer),
                Err(error) => causes.push(self.cause(i, error)),
            }
            if early && (answers.len() >= self.quorum() || causes.len() > self.spare()) {
                break;
            }
        }
        if answers.len() < self.quorum() {
            return Err(self.quorum_error(answers.len(), causes));
        }
        Ok(answers)
    }

    /// Live holders: at least this many on a majority of servers (the
    /// smallest count among the first majority to answer).
    pub(crate) async fn count(&self, keys: &Keys) -> Result<usize> {
        let calls = Fanout::start(self, 0..self.servers.len(), |_, server| {
            let keys = keys.clone();
            async move { server.count(&keys).await }
        });
        let mut counts = self.answers(calls, true).await?;
        counts.sort_unstable();
        Ok(counts[counts.len() - self.quorum()])
    }

    /// Deletes the holders on every server; answers once a majority has done
    /// it (the rest finish in the background). `true` when one of those found
    /// something to delete.
    pub(crate) async fn force_unlock(&self, holders: &[String], channel: &str) -> Result<bool> {
        let holders: Arc<[String]> = holders.into();
        let channel: Arc<str> = channel.into();
        let calls = Fanout::start(self, 0..self.servers.len(), |_, server| {
            let (holders, channel) = (Arc::clone(&holders), Arc::clone(&channel));
            async move { server.force_unlock(&holders, &channel).await }
        });
        let deleted = self.answers(calls, true).await?;
        Ok(deleted.contains(&true))
    }

    /// Gives a held lease a new token on a majority; see
    /// [`RedisBackend::retoken`].
    pub(crate) async fn retoken(&self, keys: &Keys, change: &Retoken<'_>) -> Result<bool> {
        let ttl = change.ttl;
        let (old, new): (Arc<str>, Arc<str>) = (change.old.into(), change.new.into());
        let mut calls = Fanout::start(self, 0..self.servers.len(), |_, server| {
            let (keys, old, new) = (keys.clone(), Arc::clone(&old), Arc::clone(&new));
            async move {
                let change = Retoken {
                    old: &old,
                    new: &new,
                    ttl,
                };
                server.retoken(&keys, &change).await.map(|ok| vec![ok])
            }
        });
        self.majority(&mut calls, 1)
            .await
            .map(|v| v.first().copied().unwrap_or(false))
    }

    /// Waits, at most `bound`, for the background work of the operations
    /// made so far: the calls to servers that had not answered when their
    /// operation did (a late grant joining a lease that was released since, a
    /// release on its way), and the releases of abandoned acquisitions.
    /// Closing the locker does this before it shuts the connections down, so
    /// that nothing taken is left to expire by itself.
    pub(crate) async fn settle(&self, bound: Duration) {
        let _ = tokio::time::timeout(bound, self.tails.idle()).await;
    }

    pub(crate) fn shutdown(&self) {
        for s in self.servers() {
            s.shutdown();
        }
    }

    /// Every server's view of a lock name, merged into what a majority holds
    /// (see [`majority_view`](super::majority_view)). Waits for every server
    /// (each within its request timeout); needs a majority of answers.
    pub(crate) async fn inspect(&self, keys: &crate::key::InspectKeys) -> Result<super::Snapshot> {
        let calls = Fanout::start(self, 0..self.servers.len(), |_, server| {
            let keys = keys.clone();
            async move { server.inspect(&keys).await }
        });
        let views = self.answers(calls, false).await?;
        Ok(super::majority_view(&views, self.quorum()))
    }

    /// The names held on any server that answered (a majority must answer).
    pub(crate) async fn held_names(&self, prefix: &str, pattern: &str) -> Result<Vec<String>> {
        let (prefix, pattern): (Arc<str>, Arc<str>) = (prefix.into(), pattern.into());
        let calls = Fanout::start(self, 0..self.servers.len(), |_, server| {
            let (prefix, pattern) = (Arc::clone(&prefix), Arc::clone(&pattern));
            async move { server.held_names(&prefix, &pattern).await }
        });
        Ok(self.answers(calls, false).await?.concat())
    }
}

/// How many of `n` servers make a majority.
pub(crate) fn quorum_of(n: usize) -> usize {
    n / 2 + 1
}

/// Whether a semaphore of `max` permits is enforced over `n` servers: each
/// holder has its permit on a majority, so `max + 1` holders need
/// `(max + 1) × quorum` permits in all, which `n` servers of `max` each must
/// not be able to give.
fn semaphore_holds(n: usize, max: u32) -> bool {
    let (n, q, m) = (n as u64, quorum_of(n) as u64, u64::from(max));
    (m + 1) * q > n * m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_majority_is_more_than_half() {
        let majorities: Vec<usize> = (1..=7).map(quorum_of).collect();
        assert_eq!(majorities, [1, 2, 2, 3, 3, 4, 4]);
    }

    #[test]
    fn a_semaphore_is_allowed_only_where_no_max_plus_one_holders_fit() {
        // 3 servers: 2 holders of a 1-permit semaphore need 4 permits of 3.
        assert!(semaphore_holds(3, 1));
        // 3 holders of 2 permits need 6 of 6: possible, so refused.
        assert!(!semaphore_holds(3, 2));
        assert!(semaphore_holds(5, 1));
        assert!(!semaphore_holds(5, 2));
        // Any count on one server.
        assert!(semaphore_holds(1, 1000));
    }

    #[test]
    fn op_timeout_may_be_at_most_a_third_of_the_expiry() {
        let expiry = Duration::from_millis(900);
        assert!(check_timing(Duration::from_millis(300), expiry).is_ok());
        assert!(matches!(
            check_timing(Duration::from_millis(301), expiry),
            Err(Error::Config { .. })
        ));
    }
}
