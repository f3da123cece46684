//! The connect-time check of Redis's `maxmemory-policy`: under any policy but
//! `noeviction`, a server at `maxmemory` may evict a held lock key, and
//! another client can then acquire the lock while the holder learns of it
//! only at its next renewal.

use redis::Value;

use crate::error::{Error, Result};

/// The only policy under which Redis never evicts a lock key.
const SAFE: &str = "noeviction";

/// What one server does when it reaches `maxmemory`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Eviction {
    /// The node that answered, when a cluster's masters answered together.
    pub(crate) node: Option<String>,
    /// `maxmemory-policy`: `noeviction`, `allkeys-lru`, `volatile-ttl`, ...
    pub(crate) policy: String,
    /// `maxmemory` in bytes (0: no limit), when known.
    pub(crate) maxmemory: Option<u64>,
}

impl Eviction {
    /// From an `INFO memory` reply: one text, or (from a cluster) a map of
    /// each master's address to its text (or to its error).
    pub(crate) fn from_info(reply: &Value) -> Vec<Eviction> {
        let parse = |node: Option<String>, info: &str| {
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                    .map(str::trim)
            };
            Some(Eviction {
                node,
                policy: field("maxmemory_policy")?.to_owned(),
                maxmemory: field("maxmemory").and_then(|m| m.parse().ok()),
            })
        };
        match reply {
            Value::Map(nodes) => nodes
                .iter()
                .filter_map(|(node, info)| parse(text(node), &text(info)?))
                .collect(),
            other => text(other)
                .and_then(|info| parse(None, &info))
                .into_iter()
                .collect(),
        }
    }

    /// From a `CONFIG GET maxmemory-policy` reply (an array, or with RESP3 a
    /// map, of names and values).
    pub(crate) fn from_config(reply: &Value) -> Option<Eviction> {
        let flat: Vec<String> = match reply {
            Value::Array(items) => items.iter().filter_map(text).collect(),
            Value::Map(pairs) => pairs
                .iter()
                .flat_map(|(k, v)| [text(k), text(v)])
                .flatten()
                .collect(),
            _ => Vec::new(),
        };
        let at = flat.iter().position(|s| s == "maxmemory-policy")?;
        Some(Eviction {
            node: None,
            policy: flat.get(at + 1)?.clone(),
            maxmemory: None,
        })
    }
}

/// The text of a string reply.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) | Value::VerbatimString { text: s, .. } => Some(s.clone()),
        _ => None,
    }
}

/// Judges what `server` reported (`None`: the ACL user may read neither
/// `INFO` nor `CONFIG`): a warning for each node whose policy may evict lock
/// keys, or with `require` an [`Error::Config`] for the first such node and
/// for a policy that cannot be read.
pub(crate) fn check(server: &str, found: Option<Vec<Eviction>>, require: bool) -> Result<()> {
    let Some(found) = found else {
        if require {
            return Err(Error::config(format!(
                "require_noeviction: cannot read the maxmemory-policy of {server}: the user \
                 may run neither INFO nor CONFIG GET (grant it +info)"
            )));
        }
        tracing::debug!(
            server,
            "maxmemory-policy not checked: INFO and CONFIG GET are not permitted"
        );
        return Ok(());
    };
    for e in found.iter().filter(|e| e.policy != SAFE) {
        let node = e.node.as_deref().unwrap_or(server);
        if require {
            return Err(Error::config(format!(
                "require_noeviction: {node} has maxmemory-policy `{}`, under which Redis may \
                 evict a held lock and let a second owner in (set `maxmemory-policy \
                 noeviction` there)",
                e.policy
            )));
        }
        tracing::warn!(
            server = node,
            policy = %e.policy,
            maxmemory = e.maxmemory,
            "redis may evict lock keys: maxmemory-policy is `{}`, not `noeviction`; at \
             maxmemory a held lock can be evicted and taken by another owner before its \
             holder learns at its next renewal (set `maxmemory-policy noeviction`, or \
             refuse such servers with `require_noeviction(true)`)",
            e.policy
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn info_and_config_replies_are_read() {
        let info = "# Memory\r\nused_memory:1\r\nmaxmemory:10485760\r\nmaxmemory_human:10.00M\r\n\
                    maxmemory_policy:allkeys-lru\r\n";
        let want = Eviction {
            node: None,
            policy: "allkeys-lru".into(),
            maxmemory: Some(10_485_760),
        };
        assert_eq!(Eviction::from_info(&bulk(info)), vec![want.clone()]);
        let cluster = Value::Map(vec![
            (bulk("10.0.0.1:7000"), bulk(info)),
            (bulk("10.0.0.2:7000"), Value::Nil),
        ]);
        let node = Eviction {
            node: Some("10.0.0.1:7000".into()),
            ..want
        };
        assert_eq!(Eviction::from_info(&cluster), vec![node]);
        assert!(Eviction::from_info(&bulk("# Memory\r\n")).is_empty());
        let config = Value::Array(vec![bulk("maxmemory-policy"), bulk("noeviction")]);
        assert_eq!(
            Eviction::from_config(&config).map(|e| e.policy),
            Some("noeviction".into())
        );
        assert_eq!(Eviction::from_config(&Value::Array(vec![])), None);
    }

    #[test]
    fn only_noeviction_passes_when_required() {
        let policy = |p: &str| {
            Some(vec![Eviction {
                node: None,
                policy: p.into(),
                maxmemory: Some(0),
            }])
        };
        check("s", policy("noeviction"), true).unwrap();
        check("s", policy("volatile-lru"), false).unwrap();
        check("s", None, false).unwrap();
        for found in [policy("volatile-lru"), policy("allkeys-random"), None] {
            let e = check("s", found, true).unwrap_err();
            assert!(matches!(e, Error::Config { .. }), "{e}");
        }
    }
}
