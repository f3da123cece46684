//! The connections the backend keeps checked out (one per slot, filled from
//! the pool on demand), what it learns from each new one (the server's
//! identity, and with it the restart quarantine), and the one retry loop every
//! request goes through.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;
use std::time::Duration;

use deadpool_redis::PoolError;
use redis::RedisError;
use tokio::time::Instant;

use super::conn::{Checked, Conn};
use super::scripts::{preload, SCRIPTS};
use super::RedisBackend;
use crate::error::{Chain, Error, Result};

/// What the backend knows of the server it talks to. A new `run_id` on a new
/// connection means the server restarted, and may have lost every lock (no
/// persistence): acquisitions then wait until every lease granted before the
/// restart has expired, so that no old holder can still believe it holds a key
/// a new owner takes. (Its renewals fail at once, so it learns within one
/// renewal period; this closes the gap before that.)
///
/// "Every lease" includes those of other processes, whose expiries may be
/// longer than any this one uses: each locker records the longest expiry it
/// uses in a register on the server (`<prefix>~expiry-register`) before its
/// first acquisition with it, and reads the register back on every new
/// connection and in every acquire reply. The wait after a restart is the
/// longest of its own expiries and of the register as last read.
#[derive(Debug, Default)]
pub(super) struct Identity {
    pub(super) run_id: Option<String>,
    pub(super) quarantine_until: Option<Instant>,
}

impl RedisBackend {
    /// A connection from the round-robin slots, checking one out of the pool if
    /// the slot is empty.
    pub(super) async fn conn(&self) -> Result<(usize, Conn)> {
        let i = self.shared.next.fetch_add(1, Ordering::Relaxed) % self.shared.slots.len();
        self.conn_at(i).await
    }

    /// The connection in slot `i`, checking one out of the pool if it is empty.
    pub(super) async fn conn_at(&self, i: usize) -> Result<(usize, Conn)> {
        if self.shared.shutdown.is_cancelled() {
            return Err(Error::Closed);
        }
        if let Some(c) = self.filled(i) {
            return Ok((i, c));
        }
        // Boxed: checking out and identifying a connection takes futures of
        // several kilobytes, which would otherwise sit inside every operation's
        // future (and be copied with it) for a path taken once per connection.
        Box::pin(self.refill(i)).await
    }

    /// The connection in slot `i`, if the slot holds one.
    pub(super) fn filled(&self, i: usize) -> Option<Conn> {
        self.shared.slots[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(Checked::conn)
    }

    /// Fills the empty slot `i` from the pool.
    pub(super) async fn refill(&self, i: usize) -> Result<(usize, Conn)> {
        let s = &self.shared;
        let no_connection = || Error::Unavailable {
            context: format!(
                "no connection within {}",
                crate::options::fmt(s.settings.connect_timeout)
            ),
            source: None,
        };
        // After a fault every caller finds the slot empty at once: one checks a
        // connection out, the others wait for it (within the same bound).
        let deadline = tokio::time::Instant::now() + s.settings.connect_timeout;
        let _refill = tokio::time::timeout_at(deadline, s.refills[i].lock())
            .await
            .map_err(|_| no_connection())?;
        if let Some(c) = self.filled(i) {
            return Ok((i, c));
        }
        // A new connection may follow a runtime that ended and took the
        // Sentinel watcher with it: start it again here.
        self.start_watcher();
        let mut tries = 0;
        loop {
            tries += 1;
            let obj = match tokio::time::timeout_at(deadline, s.pool.get())
                .await
                .map_err(|_| no_connection())?
            {
                Ok(obj) => obj,
                // The new connection was reset as it was set up (the handshake
                // met a fault): one more, within the same deadline.
                Err(PoolError::Backend(e)) if tries < 2 && is_connection_error(&e) => {
                    tracing::debug!(error = %e, "a new connection failed as it was set up: one more");
                    continue;
                }
                Err(e) => return Err(pool_error(e)),
            };
            let mut conn = obj.conn();
            if !s.pool.is_cluster() {
                // A cluster answers INFO from any node: no single identity to track.
                match self.check_identity(&mut conn).await {
                    Ok(()) => {}
                    // The connection broke as it was set up (an idle one the
                    // server had dropped, a reset): one more, from the pool.
                    Err(Error::Unavailable {
                        source: Some(_), ..
                    }) if tries < 2 => {
                        obj.discard();
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            *s.slots[i].lock().unwrap_or_else(PoisonError::into_inner) = Some(obj);
            return Ok((i, conn));
        }
    }

    /// Learns the server's `run_id` on a new connection; a change starts the
    /// restart quarantine (see [`Identity`]).
    pub(super) async fn check_identity(&self, conn: &mut Conn) -> Result<()> {
        let s = &self.shared;
        let info = tokio::time::timeout(
            s.settings.op_timeout,
            redis::cmd("INFO").arg("server").query_async::<String>(conn),
        )
        .await
        .map_err(|_| self.timed_out("INFO"))?;
        let info = match info {
            Ok(info) => info,
            // An ACL user without INFO cannot detect restarts; everything else works.
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {
                tracing::debug!("INFO not permitted: server restarts cannot be detected");
                return Ok(());
            }
            Err(e) => return Err(Error::from_redis("INFO", e)),
        };
        let Some(run_id) = info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|r| r.trim().to_owned())
        else {
            return Ok(());
        };
        let new_run = {
            let mut id = s.identity.lock().unwrap_or_else(PoisonError::into_inner);
            let new_run = id.run_id.as_deref() != Some(run_id.as_str());
            if id.run_id.as_deref().is_some_and(|known| known != run_id) {
                let wait = Duration::from_millis(
                    s.longest_expiry_ms
                        .load(Ordering::Relaxed)
                        .max(s.register_seen_ms.load(Ordering::Relaxed)),
                );
                tracing::warn!(
                    wait_ms = wait.as_millis() as u64,
                    "redis restarted (new run_id): acquisitions wait until leases granted before the restart have expired"
                );
                id.quarantine_until = Some(Instant::now() + wait);
                // The register went with the restart: record ours again.
                s.registered_ms.store(0, Ordering::Relaxed);
            }
            id.run_id = Some(run_id);
            new_run
        };
        if new_run {
            // A server seen for the first time (or since it restarted) has
            // none of our scripts cached. A user without SCRIPT LOAD still
            // runs them, at two round trips for each one's first use.
            let loaded = tokio::time::timeout(s.settings.op_timeout, preload(conn)).await;
            if !matches!(loaded, Ok(Ok(()))) {
                tracing::debug!("loading the scripts ahead of use failed; they load on first use");
            }
        }
        match self
            .register(conn, s.longest_expiry_ms.load(Ordering::Relaxed))
            .await
        {
            // The connection itself failed: no use.
            Err(e @ Error::Unavailable { .. }) => Err(e),
            // Anything else (out of memory, say) must not cost renewals and
            // releases their connection: the next acquisition registers
            // first, and fails clearly if it still cannot.
            Err(e) => {
                tracing::debug!(error = %Chain(&e), "recording the expiry register failed");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Records `expiry_ms` in the server's expiry register (unless this
    /// backend recorded as much already) and learns the register's value.
    pub(super) async fn register(&self, conn: &mut Conn, expiry_ms: u64) -> Result<()> {
        let s = &self.shared;
        let Some(key) = s.settings.register_key.as_deref() else {
            return Ok(());
        };
        if s.registered_ms.load(Ordering::Relaxed) >= expiry_ms {
            return Ok(());
        }
        let reply = tokio::time::timeout(
            s.settings.op_timeout,
            SCRIPTS
                .register
                .key(key)
                .arg(expiry_ms)
                .invoke_async::<u64>(conn),
        )
        .await
        .map_err(|_| self.timed_out("register"))?;
        match reply {
            Ok(seen) => {
                s.registered_ms.fetch_max(expiry_ms, Ordering::Relaxed);
                s.register_seen_ms.fetch_max(seen, Ordering::Relaxed);
                Ok(())
            }
            // An ACL user without the register's key works without it.
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {
                tracing::debug!("the expiry register is not permitted: restart quarantines use this locker's own expiries");
                s.registered_ms.store(u64::MAX, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(Error::from_redis("register", e)),
        }
    }

    /// How long acquisitions must still wait after a server restart.
    pub(super) fn quarantine(&self) -> Option<Duration> {
        let id = self
            .shared
            .identity
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let until = id.quarantine_until?;
        let now = Instant::now();
        (until > now).then(|| until - now)
    }

    /// Returns a broken connection to the pool (which recycles or discards it).
    pub(super) fn invalidate(&self, i: usize) {
        let old = self.shared.slots[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(old);
    }

    /// Drops a connection to a server that is no longer the master for good.
    pub(super) fn discard(&self, i: usize) {
        let old = self.shared.slots[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(old) = old {
            old.discard();
        }
    }

    /// After an error on slot `i`: drop what cannot serve again.
    pub(super) fn after_error(&self, i: usize, e: &RedisError) {
        if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly) {
            self.discard(i);
        } else if is_connection_error(e) {
            self.invalidate(i);
        }
    }

    pub(super) fn timed_out(&self, what: &str) -> Error {
        Error::Unavailable {
            context: format!(
                "{what} got no reply within {}",
                crate::options::fmt(self.shared.settings.op_timeout)
            ),
            source: None,
        }
    }

    /// Runs an idempotent request on one of the connections, within the
    /// request timeout; when the connection itself failed (or led to a master
    /// since demoted), tries once more on a fresh connection in the same slot.
    pub(super) async fn call<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.try_call(None, what, |c| {
            let reply = f(c);
            async move { Ok(reply.await) }
        })
        .await
    }

    /// The one retry loop of the backend: [`call`](Self::call) for a request
    /// that may also fail on its own (`f` answers `Err`, never retried, or
    /// `Ok` with the server's reply), starting on slot `first` (any slot if
    /// `None`).
    pub(super) async fn try_call<T, F, Fut>(
        &self,
        first: Option<usize>,
        what: &'static str,
        f: F,
    ) -> Result<T>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<redis::RedisResult<T>>>,
    {
        let mut tries = 0;
        let mut slot = first;
        loop {
            tries += 1;
            let (i, conn) = match slot {
                // After a failure the slot was emptied: this checks out a fresh
                // connection. Another slot's connection may be just as stale
                // (after a server restart).
                Some(i) => self.conn_at(i).await?,
                None => self.conn().await?,
            };
            match tokio::time::timeout(self.shared.settings.op_timeout, f(conn)).await {
                Ok(Ok(Ok(v))) => return Ok(v),
                Ok(Ok(Err(e))) => {
                    self.after_error(i, &e);
                    if !retryable(&e) || tries >= 2 {
                        return Err(Error::from_redis(what, e));
                    }
                    slot = Some(i);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    self.invalidate(i);
                    return Err(self.timed_out(what));
                }
            }
        }
    }
}

/// Worth one more try on a fresh connection: the connection broke, or it led
/// to a master that has since been demoted.
pub(super) fn retryable(e: &RedisError) -> bool {
    is_connection_error(e) || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
}

pub(super) fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}

pub(super) fn pool_error(e: PoolError) -> Error {
    match e {
        PoolError::Backend(e) => Error::from_redis("connect", e),
        PoolError::Timeout(_) => Error::Unavailable {
            context: "timed out waiting for a pooled connection".into(),
            source: None,
        },
        PoolError::Closed => Error::Closed,
        other => Error::unavailable("connection pool", other.to_string()),
    }
}
