//! Lock key validation and the Redis key layout.
//!
//! Every lock named `K` under prefix `P` uses Redis names that share one Redis
//! Cluster hash tag, `{K}`, so every script touches one slot:
//!
//! | name | what |
//! |---|---|
//! | `P{K}` | a mutex: a string holding the owner's token, with a TTL |
//! | `P{K}:sem` | a semaphore: a sorted set of tokens scored by expiry (server ms) |
//! | `P{K}:sem:max` | the semaphore's permit count, checked on acquire |
//! | `P{K}:rw:w` | a reader-writer lock's writer (a string, like a mutex) |
//! | `P{K}:rw:r` | its readers (a sorted set, like a semaphore) |
//! | `P{K}:rw:i` | a waiting writer's intent: new readers wait while it lives |
//! | `P{K}:fence` | the fencing counter (created from the server's clock, 7-day TTL) |
//! | `P{K}:released` | the pub/sub channel a release publishes to |
//! | `P{K}:line` | a fair mutex's waiters in arrival order (a list of `expiry:token`) |
//! | `P{K}:tickets` | each waiting token's ticket deadline (a sorted set, server ms) |

use std::sync::Arc;

use crate::error::{Error, Result};

/// The longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// What kind of lock a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub(crate) enum LockKind {
    Mutex,
    Semaphore { max: u32 },
    Read,
    Write,
}

impl LockKind {
    /// True when holders are members of a sorted set (many at once).
    pub(crate) fn shared(self) -> bool {
        matches!(self, LockKind::Semaphore { .. } | LockKind::Read)
    }
}

/// The Redis names of one lock, shared: built once per [`Lock`](crate::Lock)
/// and cloned by reference count into each lease and attempt.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Keys(Arc<KeyNames>);

impl std::ops::Deref for Keys {
    type Target = KeyNames;

    fn deref(&self) -> &KeyNames {
        &self.0
    }
}

/// The names behind [`Keys`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct KeyNames {
    /// The user's key.
    pub(crate) name: String,
    pub(crate) kind: LockKind,
    /// Where the holder's token lives (a string, or a sorted-set member).
    pub(crate) lock: String,
    /// Semaphore: the permit count. Reader-writer lock: the other side (the
    /// writer for a reader, the readers for a writer).
    pub(crate) aux: String,
    /// Reader-writer lock: the waiting writer's intent.
    pub(crate) intent: String,
    /// The fencing counter.
    pub(crate) fence: String,
    /// The release channel.
    pub(crate) channel: String,
    /// A mutex with a line on the server ([`Keys::in_line`]): the waiters'
    /// tickets in arrival order (a list), and each live ticket's deadline (a
    /// sorted set). Empty for every other lock.
    pub(crate) line: String,
    pub(crate) tickets: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str, name: &str, kind: LockKind) -> Result<Self> {
        validate_key(name)?;
        let base = format!("{prefix}{{{name}}}");
        let (lock, aux) = match kind {
            LockKind::Mutex => (base.clone(), String::new()),
            LockKind::Semaphore { .. } => (format!("{base}:sem"), format!("{base}:sem:max")),
            LockKind::Read => (format!("{base}:rw:r"), format!("{base}:rw:w")),
            LockKind::Write => (format!("{base}:rw:w"), format!("{base}:rw:r")),
        };
        Ok(Keys(Arc::new(KeyNames {
            name: name.to_owned(),
            kind,
            lock,
            aux,
            intent: match kind {
                LockKind::Read | LockKind::Write => format!("{base}:rw:i"),
                LockKind::Mutex | LockKind::Semaphore { .. } => String::new(),
            },
            fence: format!("{base}:fence"),
            channel: format!("{base}:released"),
            line: String::new(),
            tickets: String::new(),
        })))
    }

    /// A mutex whose waiters queue on the server, where a release hands the
    /// lock to the first live ticket (see `Lock::fair`).
    pub(crate) fn in_line(prefix: &str, name: &str) -> Result<Self> {
        let keys = Keys::new(prefix, name, LockKind::Mutex)?;
        let base = format!("{prefix}{{{name}}}");
        let mut names = Arc::unwrap_or_clone(keys.0);
        names.line = format!("{base}:line");
        names.tickets = format!("{base}:tickets");
        Ok(Keys(Arc::new(names)))
    }

    /// True for a mutex with a line on the server.
    pub(crate) fn fair(&self) -> bool {
        !self.line.is_empty()
    }

    /// Every key a force-unlock deletes: the holders of every kind.
    pub(crate) fn all_holders(prefix: &str, name: &str) -> Result<[String; 5]> {
        let k = InspectKeys::new(prefix, name)?;
        Ok([k.sem, k.writer, k.readers, k.intent, k.mutex])
    }
}

/// The Redis names inspection reads for one lock name, of every kind at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InspectKeys {
    /// The mutex.
    pub(crate) mutex: String,
    /// The semaphore's holders and its permit count.
    pub(crate) sem: String,
    pub(crate) sem_max: String,
    /// The reader-writer lock's writer, readers and waiting writer's intent.
    pub(crate) writer: String,
    pub(crate) readers: String,
    pub(crate) intent: String,
    /// The fencing counter.
    pub(crate) fence: String,
}

impl InspectKeys {
    pub(crate) fn new(prefix: &str, name: &str) -> Result<Self> {
        validate_key(name)?;
        let base = format!("{prefix}{{{name}}}");
        Ok(InspectKeys {
            sem: format!("{base}:sem"),
            sem_max: format!("{base}:sem:max"),
            writer: format!("{base}:rw:w"),
            readers: format!("{base}:rw:r"),
            intent: format!("{base}:rw:i"),
            fence: format!("{base}:fence"),
            mutex: base,
        })
    }
}

/// The user key that a Redis key under `prefix` holds a lock for: the name
/// inside the hash tag, when the key is one of the holder keys (a mutex, a
/// semaphore, a writer, readers, a writer's intent). `None` for anything else
/// (fencing counters, permit counts, other applications' keys).
pub(crate) fn holder_name<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
    let rest = key.strip_prefix(prefix)?.strip_prefix('{')?;
    let close = rest.find('}')?;
    let (name, suffix) = (&rest[..close], &rest[close + 1..]);
    let holder = matches!(suffix, "" | ":sem" | ":rw:w" | ":rw:r" | ":rw:i");
    (holder && validate_key(name).is_ok()).then_some(name)
}

/// Checks a user-supplied lock key.
pub(crate) fn validate_key(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid_key(name, "the key is empty"));
    }
    if name.len() > MAX_KEY_LEN {
        return Err(Error::invalid_key(
            name,
            "the key is longer than 1024 bytes",
        ));
    }
    if name.contains(['{', '}']) {
        return Err(Error::invalid_key(
            name,
            "the key contains `{` or `}`, which delimit Redis Cluster hash tags",
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::invalid_key(
            name,
            "the key contains a control character",
        ));
    }
    Ok(())
}

/// Checks the key prefix given in the configuration.
pub(crate) fn validate_prefix(prefix: &str) -> Result<()> {
    if prefix.len() > 256 {
        return Err(Error::config("key_prefix is longer than 256 bytes"));
    }
    if prefix.contains(['{', '}']) || prefix.chars().any(char::is_control) {
        return Err(Error::config(
            "key_prefix may not contain `{`, `}` or control characters",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_names_of_a_lock_share_one_hash_tag() {
        let k = Keys::new("distlock:", "order:42", LockKind::Mutex).unwrap();
        assert_eq!(k.lock, "distlock:{order:42}");
        let s = Keys::new("distlock:", "order:42", LockKind::Semaphore { max: 2 }).unwrap();
        assert_eq!(s.lock, "distlock:{order:42}:sem");
        assert_eq!(s.fence, k.fence);
        assert_eq!(k.fence, "distlock:{order:42}:fence");
        assert_eq!(k.channel, "distlock:{order:42}:released");
    }

    #[test]
    fn holder_keys_name_their_lock_and_nothing_else_does() {
        let k = InspectKeys::new("p:", "a:b").unwrap();
        for key in [&k.mutex, &k.sem, &k.writer, &k.readers, &k.intent] {
            assert_eq!(holder_name("p:", key), Some("a:b"), "{key}");
        }
        for key in [
            &k.fence,
            &k.sem_max,
            "p:{a:b}:released",
            "q:{a:b}",
            "p:a",
            "p:{}",
            "p:~expiry-register",
        ] {
            assert_eq!(holder_name("p:", key), None, "{key}");
        }
    }

    #[test]
    fn bad_keys_are_rejected_with_their_reason() {
        for (key, reason) in [
            ("", "empty"),
            ("a{b", "hash tags"),
            ("a}b", "hash tags"),
            ("a\nb", "control"),
        ] {
            let err = Keys::new("p:", key, LockKind::Mutex).unwrap_err();
            assert!(matches!(err, Error::InvalidKey { .. }), "{key:?}");
            assert!(err.to_string().contains(reason), "{err}");
        }
        let long = "x".repeat(MAX_KEY_LEN + 1);
        assert!(Keys::new("p:", &long, LockKind::Read).is_err());
        assert!(Keys::new("p:", &"x".repeat(MAX_KEY_LEN), LockKind::Write).is_ok());
    }
}
