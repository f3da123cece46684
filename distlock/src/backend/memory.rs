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
    name: String,
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

impl Default for MemoryBackend {
    fn default() -> Self {
        MemoryBackend::new()
    }
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
                    name: keys.name.clone(),
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

    /// Deletes every lock named `name` (whatever the prefix), as an operator
    /// would, without telling any keeper. Returns whether one was live.
    pub(crate) fn delete(&self, name: &str) -> bool {
        let mut channels = Vec::new();
        let live = self.with(|s, now| {
            let mut live = false;
            s.locks.retain(|key, e| {
                if e.name != name {
                    return true;
                }
                live |= e.expires > now;
                channels.push(format!("{key}:released"));
                false
            });
            live
        });
        for c in channels {
            self.hub.notify(&c);
        }
        live
    }

    /// True if a live lock named `name` exists.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.with(|s, now| s.locks.values().any(|e| e.name == name && e.expires > now))
    }

    pub(crate) fn force_unlock(&self, keys: &Keys) -> bool {
        let existed =
            self.with(|s, now| s.locks.remove(&keys.lock).is_some_and(|e| e.expires > now));
        self.hub.notify(&keys.channel);
        existed
    }
}
