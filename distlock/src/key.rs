//! Lock key validation and the Redis key layout.
//!
//! Every lock named `K` under prefix `P` owns three Redis names that share one
//! Redis Cluster hash tag, so every script touches one slot:
//!
//! | name | what |
//! |---|---|
//! | `P{K}` | the lock itself (a string holding the owner's token, with a TTL) |
//! | `P{K}:fence` | the fencing counter (bounded TTL, refreshed on acquire) |
//! | `P{K}:released` | the pub/sub channel a release publishes to |

use crate::error::{Error, Result};

/// The longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// The Redis names of one lock.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Keys {
    /// The user's key.
    pub(crate) name: String,
    /// The lock key.
    pub(crate) lock: String,
    /// The fencing counter.
    pub(crate) fence: String,
    /// The release channel.
    pub(crate) channel: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str, name: &str) -> Result<Self> {
        validate_key(name)?;
        let lock = format!("{prefix}{{{name}}}");
        Ok(Keys {
            name: name.to_owned(),
            fence: format!("{lock}:fence"),
            channel: format!("{lock}:released"),
            lock,
        })
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
        let k = Keys::new("distlock:", "order:42").unwrap();
        assert_eq!(k.lock, "distlock:{order:42}");
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
            let err = Keys::new("p:", key).unwrap_err();
            assert!(matches!(err, Error::InvalidKey { .. }), "{key:?}");
            assert!(err.to_string().contains(reason), "{err}");
        }
        let long = "x".repeat(MAX_KEY_LEN + 1);
        assert!(Keys::new("p:", &long).is_err());
        assert!(Keys::new("p:", &"x".repeat(MAX_KEY_LEN)).is_ok());
    }
}
