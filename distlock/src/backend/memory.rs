//! The in-memory backend: the same semantics as Redis, in process, on `tokio::time`
//! (so `tokio::time::pause()` drives expiry in users' tests).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::{Attempt, Renewal};
use crate::error::Result;
use crate::key::Keys;
use crate::notify::Hub;

#[derive(Debug)]
struct Entry {
    token: String,
    expires: Instant,
}

#[derive(Debug, Default)]
struct State {
    locks: HashMap<String, Entry>,
    fences: HashMap<String, u64>,
}

/// Leases in a process-local table.
#[derive(Debug, Clone)]
pub(crate) struct MemoryBackend {
    state: Arc<Mutex<State>>,
    hub: Arc<Hub>,
}

impl MemoryBackend {
    pub(crate) fn new() -> Self {
        MemoryBackend {
            state: Arc::default(),
            hub: Hub::local(),
        }
    }

    pub(crate) fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    fn with<T>(&self, f: impl FnOnce(&mut State, Instant) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut state, Instant::now())
    }

    pub(crate) fn acquire(&self, keys: &Keys, token: &str, expiry: Duration) -> Result<Attempt> {
        Ok(self.with(|s, now| {
            if let Some(e) = s.locks.get_mut(&keys.lock) {
                if e.expires > now {
                    if e.token == token {
                        e.expires = now + expiry;
                        let fence = s.fences.get(&keys.fence).copied().unwrap_or(0);
                        return Attempt::Acquired { fence };
                    }
                    return Attempt::Held {
                        ttl: Some(e.expires - now),
                    };
                }
            }
            s.locks.insert(
                keys.lock.clone(),
                Entry {
                    token: token.to_owned(),
                    expires: now + expiry,
                },
            );
            let fence = s.fences.entry(keys.fence.clone()).or_insert(0);
            *fence += 1;
            Attempt::Acquired { fence: *fence }
        }))
    }

    pub(crate) fn release(&self, keys: &Keys, token: &str) -> bool {
        let released = self.with(|s, now| match s.locks.get(&keys.lock) {
            Some(e) if e.token == token => {
                let live = e.expires > now;
                s.locks.remove(&keys.lock);
                live
            }
            _ => false,
        });
        if released {
            self.hub.notify(&keys.channel);
        }
        released
    }

    pub(crate) fn extend_many(&self, batch: &[Renewal]) -> Vec<bool> {
        self.with(|s, now| {
            batch
                .iter()
                .map(|r| match s.locks.get_mut(&r.key) {
                    Some(e) if e.token == r.token && e.expires > now => {
                        e.expires = now + r.ttl;
                        true
                    }
                    _ => false,
                })
                .collect()
        })
    }

    pub(crate) fn force_unlock(&self, keys: &Keys) -> bool {
        let existed =
            self.with(|s, now| s.locks.remove(&keys.lock).is_some_and(|e| e.expires > now));
        self.hub.notify(&keys.channel);
        existed
    }
}
