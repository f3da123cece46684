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

use std::sync::Arc;

use crate::error::{Error, Result};

/// The longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// What kind of lock a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub(crate) enum Kind {
    Mutex,
    Semaphore { max: u32 },
    Read,
    Write,
}

impl Kind {
    /// True when holders are members of a sorted set (many at once).
    pub(crate) fn shared(self) -> bool {
        matches!(self, Kind::Semaphore { .. } | Kind::Read)
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
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct KeyNames {
    /// The user's key.
    pub(crate) name: String,
    pub(crate) kind: Kind,
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
}

impl Keys {
    pub(crate) fn new(prefix: &str, name: &str, kind: Kind) -> Result<Self> {
        validate_key(name)?;
        let base = format!("{prefix}{{{name}}}");
        let (lock, aux) = match kind {
            Kind::Mutex => (base.clone(), String::new()),
            Kind::Semaphore { .. } => (format!("{base}:sem"), format!("{base}:sem:max")),
            Kind::Read => (format!("{base}:rw:r"), format!("{base}:rw:w")),
            Kind::Write => (format!("{base}:rw:w"), format!("{base}:rw:r")),
        };
        Ok(Keys(Arc::new(KeyNames {
            name: name.to_owned(),
            kind,
            lock,
            aux,
            intent: match kind {
                Kind::Read | Kind::Write => format!("{base}:rw:i"),
                Kind::Mutex | Kind::Semaphore { .. } => String::new(),
            },
            fence: format!("{base}:fence"),
            channel: format!("{base}:released"),
        })))
    }

    /// Every key a force-unlock deletes: the holders of every kind.
    pub(crate) fn all_holders(prefix: &str, name: &str) -> Result<[String; 5]> {
        validate_key(name)?;
        let base = format!("{prefix}{{{name}}}");
        Ok([
            format!("{base}:sem"),
            format!("{base}:rw:w"),
            format!("{base}:rw:r"),
            format!("{base}:rw:i"),
            base,
        ])
    }
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
        let k = Keys::new("distlock:", "order:42", Kind::Mutex).unwrap();
        assert_eq!(k.lock, "distlock:{order:42}");
        let s = Keys::new("distlock:", "order:42", Kind::Semaphore { max: 2 }).unwrap();
        assert_eq!(s.lock, "distlock:{order:42}:sem");
        assert_eq!(s.fence, k.fence);
        assert_eq!(k.fence, "distlock:{order:42}:fence");
        assert_eq!(k.channel, "distlock:{order:42}:released");
    }

    #[test]
    fn bad_keys_are_rejected_with_their_reason() {
        for (key, reason) in [
            ("", "empty"),
            ("a{b", "hash tags"),
            ("a}b", "hash tags"),
            ("a\nb", "control"),
        ] {
            let err = Keys::new("p:", key, Kind::Mutex).unwrap_err();
            assert!(matches!(err, Error::InvalidKey { .. }), "{key:?}");
            assert!(err.to_string().contains(reason), "{err}");
        }
        let long = "x".repeat(MAX_KEY_LEN + 1);
        assert!(Keys::new("p:", &long, Kind::Read).is_err());
        assert!(Keys::new("p:", &"x".repeat(MAX_KEY_LEN), Kind::Write).is_ok());
    }
}
