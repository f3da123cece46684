//! The in-memory backend: the same semantics as Redis, in process, on `tokio::time`
//! (so `tokio::time::pause()` drives expiry in users' tests).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::{Attempt, Renewal};
use crate::error::{Error, Result};
use crate::key::{Keys, Kind};
use crate::notify::Hub;

/// One holder: a token and when it expires.
#[derive(Debug, Clone)]
struct Holder {
    token: String,
    expires: Instant,
}

/// What a key holds: one owner (a mutex, a writer, an intent) or many (a
/// semaphore's permits, readers).
#[derive(Debug)]
enum Value {
    One(Holder),
    Many(Vec<Holder>),
}

#[derive(Debug)]
struct Entry {
    name: String,
    value: Value,
}

#[derive(Debug, Default)]
struct State {
    keys: HashMap<String, Entry>,
    sem_max: HashMap<String, u32>,
    fences: HashMap<String, u64>,
}

impl State {
    /// The live single holder of `key`, dropping it if expired.
    fn one(&mut self, key: &str, now: Instant) -> Option<&mut Holder> {
        let live = matches!(self.keys.get(key), Some(Entry { value: Value::One(h), .. }) if h.expires > now);
        if !live {
            if matches!(
                self.keys.get(key),
                Some(Entry {
                    value: Value::One(_),
                    ..
                })
            ) {
                self.keys.remove(key);
            }
            return None;
        }
        match self.keys.get_mut(key) {
            Some(Entry {
                value: Value::One(h),
                ..
            }) => Some(h),
            _ => None,
        }
    }

    /// The live holders of `key` (purged of expired ones).
    fn many(&mut self, key: &str, now: Instant) -> &[Holder] {
        if let Some(Entry {
            value: Value::Many(v),
            ..
        }) = self.keys.get_mut(key)
        {
            v.retain(|h| h.expires > now);
            if v.is_empty() {
                self.keys.remove(key);
            }
        }
        match self.keys.get(key) {
            Some(Entry {
                value: Value::Many(v),
                ..
            }) => v,
            _ => &[],
        }
    }

    fn fence(&mut self, keys: &Keys) -> u64 {
        let f = self.fences.entry(keys.fence.clone()).or_insert(0);
        *f += 1;
        *f
    }

    fn current_fence(&self, keys: &Keys) -> u64 {
        self.fences.get(&keys.fence).copied().unwrap_or(0)
    }

    fn set_one(&mut self, key: &str, name: &str, token: &str, expires: Instant) {
        self.keys.insert(
            key.to_owned(),
            Entry {
                name: name.to_owned(),
                value: Value::One(Holder {
                    token: token.to_owned(),
                    expires,
                }),
            },
        );
    }

    fn add_many(&mut self, key: &str, name: &str, token: &str, expires: Instant) {
        let entry = self.keys.entry(key.to_owned()).or_insert_with(|| Entry {
            name: name.to_owned(),
            value: Value::Many(Vec::new()),
        });
        if let Value::Many(v) = &mut entry.value {
            v.push(Holder {
                token: token.to_owned(),
                expires,
            });
        }
    }

    fn first_expiry(&mut self, key: &str, now: Instant) -> Option<Duration> {
        self.many(key, now)
            .iter()
            .map(|h| h.expires)
            .min()
            .map(|t| t - now)
    }
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

    pub(crate) fn acquire(
        &self,
        keys: &Keys,
        token: &str,
        expiry: Duration,
        intent: Duration,
    ) -> Result<Attempt> {
        self.with(|s, now| {
            let until = now + expiry;
            match keys.kind {
                Kind::Mutex | Kind::Write => {
                    if let Some(h) = s.one(&keys.lock, now) {
                        if h.token == token {
                            h.expires = until;
                            return Ok(Attempt::Acquired {
                                fence: s.current_fence(keys),
                            });
                        }
                        return Ok(Attempt::Held {
                            ttl: Some(h.expires - now),
                        });
                    }
                    if keys.kind == Kind::Write {
                        if let Some(ttl) = s.first_expiry(&keys.aux, now) {
                            s.set_one(&keys.intent, &keys.name, token, now + intent);
                            return Ok(Attempt::Held { ttl: Some(ttl) });
                        }
                        if s.one(&keys.intent, now).is_some_and(|h| h.token == token) {
                            s.keys.remove(&keys.intent);
                        }
                    }
                    s.set_one(&keys.lock, &keys.name, token, until);
                    Ok(Attempt::Acquired {
                        fence: s.fence(keys),
                    })
                }
                Kind::Semaphore { .. } | Kind::Read => {
                    let holders = s.many(&keys.lock, now);
                    if holders.iter().any(|h| h.token == token) {
                        if let Some(Entry {
                            value: Value::Many(v),
                            ..
                        }) = s.keys.get_mut(&keys.lock)
                        {
                            for h in v.iter_mut().filter(|h| h.token == token) {
                                h.expires = until;
                            }
                        }
                        return Ok(Attempt::Acquired {
                            fence: s.current_fence(keys),
                        });
                    }
                    let count = holders.len();
                    if let Kind::Semaphore { max } = keys.kind {
                        match s.sem_max.get(&keys.aux) {
                            Some(&stored) if count > 0 && stored != max => {
                                return Err(Error::config(format!(
                                    "semaphore `{}` exists with {stored} permits, not {max}",
                                    crate::error::shorten(&keys.name)
                                )));
                            }
                            _ => {}
                        }
                        if count >= max as usize {
                            return Ok(Attempt::Held {
                                ttl: s.first_expiry(&keys.lock, now),
                            });
                        }
                        s.sem_max.insert(keys.aux.clone(), max);
                    } else {
                        if let Some(w) = s.one(&keys.aux, now) {
                            return Ok(Attempt::Held {
                                ttl: Some(w.expires - now),
                            });
                        }
                        if let Some(i) = s.one(&keys.intent, now) {
                            return Ok(Attempt::Held {
                                ttl: Some(i.expires - now),
                            });
                        }
                    }
                    s.add_many(&keys.lock, &keys.name, token, until);
                    Ok(Attempt::Acquired {
                        fence: s.fence(keys),
                    })
                }
            }
        })
    }

    pub(crate) fn release(&self, keys: &Keys, token: &str) -> bool {
        let released = self.with(|s, now| remove_holder(s, &keys.lock, token, now));
        if released {
            self.hub.notify(&keys.channel);
        }
        released
    }

    pub(crate) fn count(&self, keys: &Keys) -> usize {
        self.with(|s, now| s.many(&keys.lock, now).len())
    }

    pub(crate) fn extend_many(&self, batch: &[Renewal]) -> Vec<bool> {
        self.with(|s, now| {
            batch
                .iter()
                .map(|r| match s.keys.get_mut(&r.key).map(|e| &mut e.value) {
                    Some(Value::One(h)) if h.token == r.token && h.expires > now => {
                        h.expires = now + r.ttl;
                        true
                    }
                    Some(Value::Many(v)) => {
                        match v.iter_mut().find(|h| h.token == r.token && h.expires > now) {
                            Some(h) => {
                                h.expires = now + r.ttl;
                                true
                            }
                            None => false,
                        }
                    }
                    _ => false,
                })
                .collect()
        })
    }

    /// Deletes every holder of the lock named `name` (whatever the prefix and
    /// kind), as an operator would, telling no keeper. Returns whether one was live.
    pub(crate) fn delete(&self, name: &str) -> bool {
        let mut channels = Vec::new();
        let live = self.with(|s, now| {
            let mut live = false;
            s.keys.retain(|key, e| {
                if e.name != name {
                    return true;
                }
                live |= match &e.value {
                    Value::One(h) => h.expires > now,
                    Value::Many(v) => v.iter().any(|h| h.expires > now),
                };
                if let Some(base) = key.find('}').map(|i| &key[..=i]) {
                    channels.push(format!("{base}:released"));
                }
                false
            });
            live
        });
        for c in channels {
            self.hub.notify(&c);
        }
        live
    }

    /// True if a live holder of the lock named `name` exists.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.with(|s, now| {
            s.keys.values().any(|e| {
                e.name == name
                    && match &e.value {
                        Value::One(h) => h.expires > now,
                        Value::Many(v) => v.iter().any(|h| h.expires > now),
                    }
            })
        })
    }

    pub(crate) fn force_unlock(&self, holders: &[String], channel: &str) -> bool {
        let existed = self.with(|s, now| {
            let mut live = false;
            for k in holders {
                if let Some(e) = s.keys.remove(k) {
                    live |= match e.value {
                        Value::One(h) => h.expires > now,
                        Value::Many(v) => v.iter().any(|h| h.expires > now),
                    };
                }
            }
            live
        });
        self.hub.notify(channel);
        existed
    }
}

/// Removes `token` from `key`; true if it was a live holder.
fn remove_holder(s: &mut State, key: &str, token: &str, now: Instant) -> bool {
    let (live, empty) = match s.keys.get_mut(key).map(|e| &mut e.value) {
        Some(Value::One(h)) if h.token == token => (h.expires > now, true),
        Some(Value::Many(v)) => {
            let live = v.iter().any(|h| h.token == token && h.expires > now);
            v.retain(|h| h.token != token);
            (live, v.is_empty())
        }
        _ => (false, false),
    };
    if empty {
        s.keys.remove(key);
    }
    live
}
