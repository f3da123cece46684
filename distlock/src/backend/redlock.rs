//! Redlock: one lease over N independent Redis servers. Every operation runs on
//! all of them at once and counts as done when a majority (N/2 + 1) agrees, so a
//! minority of servers down changes nothing for the caller.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use super::redis::RedisBackend;
use super::{Attempt, Renewal};
use crate::error::{Error, Result, ServerError};
use crate::key::{Keys, Kind};
use crate::notify::{Hub, Subscription};

/// The servers of a Redlock, with their names for error messages.
#[derive(Debug, Clone)]
pub(crate) struct RedlockBackend {
    servers: Arc<[(String, RedisBackend)]>,
    hub: Arc<Hub>,
}

impl RedlockBackend {
    /// The hub every server's pub/sub connection feeds.
    pub(crate) fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// `hub` is the hub every server's pub/sub connection feeds.
    pub(crate) fn new(servers: Vec<(String, RedisBackend)>, hub: Arc<Hub>) -> Self {
        RedlockBackend {
            servers: servers.into(),
            hub,
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
        self.servers.len() / 2 + 1
    }

    pub(crate) fn servers(&self) -> impl Iterator<Item = &RedisBackend> {
        self.servers.iter().map(|(_, s)| s)
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
    pub(crate) fn check_kind(&self, kind: Kind) -> Result<()> {
        if let Kind::Semaphore { max } = kind {
            let (n, q, m) = (
                self.servers.len() as u64,
                self.quorum() as u64,
                u64::from(max),
            );
            if (m + 1) * q <= n * m {
                return Err(Error::config(format!(
                    "a semaphore of {max} permits cannot be enforced over {n} Redlock servers \
                     (holders on different majorities could exceed it); use one server"
                )));
            }
        }
        Ok(())
    }

    pub(crate) async fn acquire(
        &self,
        keys: &Keys,
        token: &str,
        expiry: Duration,
        intent: Duration,
    ) -> Result<Attempt> {
        self.check_kind(keys.kind)?;
        let results = join_all(
            self.servers()
                .map(|s| s.acquire(keys, token, expiry, intent)),
        )
        .await;
        let mut fences = Vec::new();
        let mut ttls = Vec::new();
        let mut causes = Vec::new();
        for ((name, _), r) in self.servers.iter().zip(results) {
            match r {
                Ok(Attempt::Acquired { fence }) => fences.push(fence),
                Ok(Attempt::Held { ttl }) => ttls.push(ttl),
                Err(error) => causes.push(ServerError {
                    server: name.clone(),
                    error,
                }),
            }
        }
        if fences.len() >= self.quorum() {
            // The token is the largest of the majority's, written back to the
            // majority: the next holder's majority shares a server with ours, so
            // its token will be larger still, whatever the servers' clocks say.
            let fence = fences.iter().copied().max().unwrap_or(0);
            self.raise_fence(keys, fence).await;
            return Ok(Attempt::Acquired { fence });
        }
        // Not a majority: give back what we took, everywhere.
        if !fences.is_empty() || !causes.is_empty() {
            self.release_in_background(keys, token);
        }
        if causes.len() > self.servers.len() - self.quorum() {
            return Err(self.quorum_error(fences.len(), causes));
        }
        if let Some(cause) = causes.iter().find(|c| c.error.is_invalid_input()) {
            return Err(Error::config(format!("{}: {}", cause.server, cause.error)));
        }
        let ttl = ttls.into_iter().flatten().min();
        Ok(Attempt::Held { ttl })
    }

    async fn raise_fence(&self, keys: &Keys, fence: u64) {
        join_all(self.servers().map(|s| s.raise_fence(keys, fence))).await;
    }

    fn release_in_background(&self, keys: &Keys, token: &str) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (this, keys, token) = (self.clone(), keys.clone(), token.to_owned());
        rt.spawn(async move {
            let _ = this.release(&keys, &token).await;
        });
    }

    pub(crate) async fn release(&self, keys: &Keys, token: &str) -> Result<bool> {
        let results = join_all(self.servers().map(|s| s.release(keys, token))).await;
        self.majority(results.into_iter().map(|r| r.map(|ok| vec![ok])), 1)
            .map(|v| v.first().copied().unwrap_or(false))
    }

    pub(crate) async fn extend_many(&self, batch: &[Renewal]) -> Result<Vec<bool>> {
        let results = join_all(self.servers().map(|s| s.extend_many(batch))).await;
        self.majority(results.into_iter(), batch.len())
    }

    /// Per item, true when a majority of servers said true; an error when too
    /// many servers failed to answer.
    fn majority(
        &self,
        results: impl Iterator<Item = Result<Vec<bool>>>,
        items: usize,
    ) -> Result<Vec<bool>> {
        let mut votes = vec![0usize; items];
        let mut answered = 0;
        let mut causes = Vec::new();
        for ((name, _), r) in self.servers.iter().zip(results) {
            match r {
                Ok(flags) => {
                    answered += 1;
                    for (v, ok) in votes.iter_mut().zip(flags) {
                        *v += usize::from(ok);
                    }
                }
                Err(error) => causes.push(ServerError {
                    server: name.clone(),
                    error,
                }),
            }
        }
        if answered < self.quorum() {
            return Err(self.quorum_error(answered, causes));
        }
        Ok(votes.into_iter().map(|v| v >= self.quorum()).collect())
    }

    /// Live holders: the largest count a majority agrees on is at least this.
    pub(crate) async fn count(&self, keys: &Keys) -> Result<usize> {
        let results = join_all(self.servers().map(|s| s.count(keys))).await;
        let mut counts = Vec::new();
        let mut causes = Vec::new();
        for ((name, _), r) in self.servers.iter().zip(results) {
            match r {
                Ok(n) => counts.push(n),
                Err(error) => causes.push(ServerError {
                    server: name.clone(),
                    error,
                }),
            }
        }
        if counts.len() < self.quorum() {
            return Err(self.quorum_error(counts.len(), causes));
        }
        counts.sort_unstable();
        Ok(counts[counts.len() - self.quorum()])
    }

    pub(crate) async fn force_unlock(&self, holders: &[String], channel: &str) -> Result<bool> {
        let results = join_all(self.servers().map(|s| s.force_unlock(holders, channel))).await;
        let any = results.iter().any(|r| matches!(r, Ok(true)));
        self.majority(results.into_iter().map(|r| r.map(|_| Vec::new())), 0)?;
        Ok(any)
    }

    pub(crate) fn shutdown(&self) {
        for s in self.servers() {
            s.shutdown();
        }
    }
}
