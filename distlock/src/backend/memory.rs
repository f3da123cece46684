//! The in-memory backend: the same semantics as Redis, in process, on `tokio::time`
//! (so `tokio::time::pause()` drives expiry in users' tests).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::{Attempt, AttemptAll, RawHolder, Renewal, Request, Retoken, Snapshot};
use crate::error::{Error, Result};
use crate::inspect::Role;
use crate::key::{holder_name, InspectKeys, Keys, LockKind};
use crate::notify::Hub;

/// One holder: a token and when it expires.
#[derive(Debug, Clone)]
struct Holder {
    token: String,
    expires: Instant,
    fence: u64,
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
    /// A semaphore's permit count: it lives as long as its permits.
    max: Option<u32>,
}

/// The store. Memory is bounded by what is held: an entry goes with its last
/// holder, and fencing tokens come from one counter for the whole store
/// (strictly increasing per key, as they must be, and across keys too).
#[derive(Debug, Default)]
struct State {
    keys: HashMap<String, Entry>,
    last_fence: u64,
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

    fn fence(&mut self) -> u64 {
        self.last_fence += 1;
        self.last_fence
    }

    /// Sets the single holder of `key`; returns its fencing token.
    fn set_one(&mut self, key: &str, name: &str, token: &str, expires: Instant) -> u64 {
        let fence = self.fence();
        self.keys.insert(
            key.to_owned(),
            Entry {
                name: name.to_owned(),
                value: Value::One(Holder {
                    token: token.to_owned(),
                    expires,
                    fence,
                }),
                max: None,
            },
        );
        fence
    }

    /// Adds a holder to `key`; returns its fencing token.
    fn add_many(
        &mut self,
        key: &str,
        name: &str,
        token: &str,
        expires: Instant,
        max: Option<u32>,
    ) -> u64 {
        let fence = self.fence();
        let entry = self.keys.entry(key.to_owned()).or_insert_with(|| Entry {
            name: name.to_owned(),
            value: Value::Many(Vec::new()),
            max: None,
        });
        entry.max = max;
        if let Value::Many(v) = &mut entry.value {
            v.push(Holder {
                token: token.to_owned(),
                expires,
                fence,
            });
        }
        fence
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

    pub(crate) fn acquire(&self, req: Request<'_>) -> Result<Attempt> {
        let (keys, token, expiry, intent) = req.parts();
        self.with(|s, now| {
            let until = now + expiry;
            match keys.kind {
                LockKind::Mutex | LockKind::Write => {
                    if let Some(h) = s.one(&keys.lock, now) {
                        if h.token == token {
                            h.expires = until;
                            return Ok(Attempt::Acquired { fence: h.fence });
                        }
                        return Ok(Attempt::Held {
                            ttl: Some(h.expires - now),
                        });
                    }
                    if keys.kind == LockKind::Write {
                        if let Some(ttl) = s.first_expiry(&keys.aux, now) {
                            s.set_one(&keys.intent, &keys.name, token, now + intent);
                            return Ok(Attempt::Held { ttl: Some(ttl) });
                        }
                        s.keys.remove(&keys.intent);
                    }
                    let fence = s.set_one(&keys.lock, &keys.name, token, until);
                    Ok(Attempt::Acquired { fence })
                }
                LockKind::Semaphore { .. } | LockKind::Read => {
                    let holders = s.many(&keys.lock, now);
                    if let Some(fence) = holders.iter().find(|h| h.token == token).map(|h| h.fence)
                    {
                        if let Some(Entry {
                            value: Value::Many(v),
                            ..
                        }) = s.keys.get_mut(&keys.lock)
                        {
                            for h in v.iter_mut().filter(|h| h.token == token) {
                                h.expires = until;
                            }
                        }
                        return Ok(Attempt::Acquired { fence });
                    }
                    let count = holders.len();
                    let mut max = None;
                    if let LockKind::Semaphore { max: wanted } = keys.kind {
                        let stored = s.keys.get(&keys.lock).and_then(|e| e.max);
                        match stored {
                            Some(stored) if count > 0 && stored != wanted => {
                                return Err(Error::config(format!(
                                    "semaphore `{}` exists with {stored} permits, not {wanted}",
                                    crate::error::shorten(&keys.name)
                                )));
                            }
                            _ => {}
                        }
                        if count >= wanted as usize {
                            return Ok(Attempt::Held {
                                ttl: s.first_expiry(&keys.lock, now),
                            });
                        }
                        max = Some(wanted);
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
                    let fence = s.add_many(&keys.lock, &keys.name, token, until, max);
                    Ok(Attempt::Acquired { fence })
                }
            }
        })
    }

    /// Takes every one of these mutexes under `token`, or none of them.
    pub(crate) fn acquire_all(&self, locks: &[Keys], token: &str, expiry: Duration) -> AttemptAll {
        self.with(|s, now| {
            for (index, keys) in locks.iter().enumerate() {
                if let Some(h) = s.one(&keys.lock, now) {
                    if h.token != token {
                        let ttl = Some(h.expires - now);
                        return AttemptAll::Held { index, ttl };
                    }
                }
            }
            let until = now + expiry;
            let fences = locks
                .iter()
                .map(|keys| match s.one(&keys.lock, now) {
                    Some(h) => {
                        h.expires = until;
                        h.fence
                    }
                    None => s.set_one(&keys.lock, &keys.name, token, until),
                })
                .collect();
            AttemptAll::Acquired { fences }
        })
    }

    pub(crate) fn release(&self, keys: &Keys, token: &str) -> bool {
        let released = self.with(|s, now| remove_holder(s, &keys.lock, token, now));
        if released {
            self.hub.notify(&keys.channel);
        }
        released
    }

    /// Releases several mutexes at once; one `bool` per lock.
    pub(crate) fn release_all(&self, locks: &[Keys], token: &str) -> Vec<bool> {
        let released: Vec<bool> = self.with(|s, now| {
            locks
                .iter()
                .map(|keys| remove_holder(s, &keys.lock, token, now))
                .collect()
        });
        for (keys, _) in locks.iter().zip(&released).filter(|(_, r)| **r) {
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
                .map(
                    |r| match s.keys.get_mut(&r.keys.lock).map(|e| &mut e.value) {
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
                    },
                )
                .collect()
        })
    }

    /// Gives a live holder a new token and extends it; `false` if no live
    /// holder has the old token.
    pub(crate) fn retoken(&self, keys: &Keys, change: &Retoken<'_>) -> bool {
        let Retoken { old, new, ttl } = *change;
        self.with(|s, now| {
            let holder = match s.keys.get_mut(&keys.lock).map(|e| &mut e.value) {
                Some(Value::One(h)) if h.token == old && h.expires > now => Some(h),
                Some(Value::Many(v)) => v.iter_mut().find(|h| h.token == old && h.expires > now),
                _ => None,
            };
            match holder {
                Some(h) => {
                    new.clone_into(&mut h.token);
                    h.expires = now + ttl;
                    true
                }
                None => false,
            }
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

    /// Every live holder of a lock name, as Redis's inspection script reads
    /// them. The fencing token is the newest among the live holders' (the
    /// store keeps no counter per name).
    pub(crate) fn inspect(&self, keys: &InspectKeys) -> Snapshot {
        self.with(|s, now| {
            let mut snapshot = Snapshot::default();
            let mut newest = None;
            let live = |h: &Holder, role| {
                (h.expires > now).then(|| RawHolder {
                    role,
                    token: h.token.clone(),
                    ttl: Some(h.expires - now),
                })
            };
            for (key, role) in [
                (&keys.mutex, Role::Mutex),
                (&keys.sem, Role::Permit),
                (&keys.writer, Role::Writer),
                (&keys.readers, Role::Reader),
            ] {
                let Some(entry) = s.keys.get(key) else {
                    continue;
                };
                let holders = match &entry.value {
                    Value::One(h) => std::slice::from_ref(h),
                    Value::Many(v) => v.as_slice(),
                };
                for h in holders {
                    if let Some(raw) = live(h, role) {
                        newest = newest.max(Some(h.fence));
                        snapshot.holders.push(raw);
                    }
                }
                if role == Role::Permit && holders.iter().any(|h| h.expires > now) {
                    snapshot.permits = entry.max;
                }
            }
            if let Some(Entry {
                value: Value::One(h),
                ..
            }) = s.keys.get(&keys.intent)
            {
                snapshot.intent = live(h, Role::Writer);
            }
            snapshot.fence = newest;
            snapshot
        })
    }

    /// The names with a live holder under `prefix` matching `pattern`.
    pub(crate) fn held_names(&self, prefix: &str, pattern: &str) -> Vec<String> {
        self.with(|s, now| {
            s.keys
                .iter()
                .filter(|(_, e)| match &e.value {
                    Value::One(h) => h.expires > now,
                    Value::Many(v) => v.iter().any(|h| h.expires > now),
                })
                .filter_map(|(key, _)| holder_name(prefix, key))
                .filter(|name| crate::inspect::glob_match(pattern, name))
                .map(str::to_owned)
                .collect()
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

/// An in-memory lock store: what one Redis server is to several replicas, for
/// lockers in one process. Clones share the store.
///
/// Its methods are test hooks: they do what an operator with `redis-cli`
/// would.
///
/// # Examples
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
/// use distlock::{Locker, MemoryStore};
///
/// let store = MemoryStore::new();
/// let replica_a = Locker::builder().memory_store(store.clone()).build().await?;
/// let replica_b = Locker::builder().memory_store(store.clone()).build().await?;
/// let guard = replica_a.lock("job").acquire().await?;
/// assert!(replica_b.lock("job").try_acquire().await?.is_none());
/// assert!(store.contains("job"));
/// store.delete("job"); // behind the holder's back: it learns at its next renewal
/// # drop(guard);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryStore(pub(crate) MemoryBackend);

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore(MemoryBackend::new())
    }

    /// Deletes the lock on `key` whoever holds it, telling no holder (they learn
    /// at their next renewal, as with `DEL` on Redis). Returns whether it was held.
    pub fn delete(&self, key: &str) -> bool {
        self.0.delete(key)
    }

    /// True if the lock on `key` is held (and not expired).
    pub fn contains(&self, key: &str) -> bool {
        self.0.contains(key)
    }
}
