//! Fenced writes to data held in Redis: each is one script that checks the
//! token against the highest one the key has seen, writes, and records the
//! token, atomically.
//!
//! The highest token of a data key `K` lives in a key beside it, in the same
//! Redis Cluster slot:
//!
//! | data key `K` | its token key |
//! |---|---|
//! | `order:42` (no hash tag) | `{order:42}:fence` |
//! | `{user:7}:cart` (a hash tag) | `{user:7}:cart:fence` |
//!
//! The token key holds the decimal token and has no expiry: it must live as
//! long as the data (a fenced delete keeps it, so a late writer cannot
//! recreate the key).

use std::fmt;

use redis::aio::ConnectionLike;
use redis::{FromRedisValue, Script, ScriptInvocation, ToRedisArgs, Value};

use super::FencingToken;
use crate::error::{shorten, Error, Result};
use crate::key::MAX_KEY_LEN;

/// Lua that checks `ARGV[1]` (the offered token) against the highest token in
/// `KEYS[1]` and records it: returns `{0, seen}` from the script when the
/// offered token is older. Tokens are compared as decimal strings (length,
/// then digits), so the whole `u64` range compares exactly (Lua numbers are
/// doubles).
const CHECK: &str = r"
local offered = ARGV[1]
local seen = redis.call('get', KEYS[1])
if seen then
  if not (seen == '0' or string.match(seen, '^[1-9]%d*$')) then
    return redis.error_reply('ERR distlock fence key ' .. KEYS[1] .. ' does not hold a fencing token')
  end
  if #seen > #offered or (#seen == #offered and seen > offered) then
    return {0, seen}
  end
end
if seen ~= offered then
  redis.call('set', KEYS[1], offered)
end
";

/// KEYS: fence. ARGV: token.
const ADVANCE: &str = "return {1}";
/// KEYS: fence, data. ARGV: token, value.
const SET: &str = "return {1, redis.call('set', KEYS[2], ARGV[2])}";
/// KEYS: fence, data. ARGV: token, field, value.
const HSET: &str = "return {1, redis.call('hset', KEYS[2], ARGV[2], ARGV[3])}";
/// KEYS: fence, data. ARGV: token.
const DEL: &str = "return {1, redis.call('del', KEYS[2])}";

/// The fenced-write scripts, compiled once (their SHA1s are computed once).
struct Scripts {
    advance: Script,
    set: Script,
    hset: Script,
    del: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        advance: Script::new(&format!("{CHECK}{ADVANCE}")),
        set: Script::new(&format!("{CHECK}{SET}")),
        hset: Script::new(&format!("{CHECK}{HSET}")),
        del: Script::new(&format!("{CHECK}{DEL}")),
    })
}

/// A Redis key whose writes are fenced: each write carries a fencing token and
/// is refused, with [`Error::Stale`], if the key has seen a newer one.
///
/// The operations take any async redis-rs connection (`&mut` a
/// `MultiplexedConnection`, `ConnectionManager`, cluster connection, or a
/// pooled `deadpool_redis::Connection`): the data need not live on the lock's
/// Redis, and usually does not. The connection types are those of the
/// `redis` crate version 1, the one this crate uses.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(locker: distlock::Locker, mut con: redis::aio::MultiplexedConnection) -> Result<(), distlock::Error> {
/// use distlock::fence::FencedKey;
///
/// let cart = FencedKey::new("cart:7")?;
/// let guard = locker.lock("cart:7").acquire().await?;
/// cart.hset(&mut con, "apples", 3, &guard).await?;
/// cart.hset(&mut con, "pears", 1, &guard).await?; // the same token passes again
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct FencedKey {
    key: String,
    fence: String,
}

impl fmt::Debug for FencedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FencedKey")
            .field("key", &self.key)
            .field("fence_key", &self.fence)
            .finish()
    }
}

impl FencedKey {
    /// The data key `key`, with its token key beside it (see the
    /// [module docs](super) for the layout).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`] if `key` is empty, longer than
    /// [`MAX_KEY_LEN`](crate::MAX_KEY_LEN) bytes, or contains a `}` without
    /// a Redis Cluster hash tag (`{...}`) before it: its token key could then
    /// not share its slot.
    pub fn new(key: impl Into<String>) -> Result<Self> {
        let key = key.into();
        let fence = fence_key(&key)?;
        Ok(FencedKey { key, fence })
    }

    /// The data key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The key that holds the highest token this data key has seen.
    pub fn fence_key(&self) -> &str {
        &self.fence
    }

    /// `SET key value`, if `token` is not older than the highest seen.
    ///
    /// # Errors
    ///
    /// [`Error::Stale`] if the key has seen a newer token (nothing was
    /// written), or the connection's error ([`Error::Unavailable`],
    /// [`Error::Redis`], ...).
    ///
    /// # Cancel safety
    ///
    /// The script runs whole or not at all on the server; if this future is
    /// dropped after sending, the write may or may not have happened.
    pub async fn set<C, V>(
        &self,
        con: &mut C,
        value: V,
        token: impl Into<FencingToken>,
    ) -> Result<()>
    where
        C: ConnectionLike + Send,
        V: ToRedisArgs + Send + Sync,
    {
        let token = token.into();
        let mut inv = scripts().set.key(&self.fence);
        inv.key(&self.key).arg(token.get()).arg(value);
        self.invoke::<_, Value>(con, &inv, token, "fenced set")
            .await
            .map(drop)
    }

    /// `HSET key field value`, if `token` is not older than the highest seen.
    /// Returns whether the field is new.
    ///
    /// # Errors
    ///
    /// As [`set`](Self::set); also [`Error::Redis`] if the key holds another type.
    ///
    /// # Cancel safety
    ///
    /// As [`set`](Self::set).
    pub async fn hset<C, F, V>(
        &self,
        con: &mut C,
        field: F,
        value: V,
        token: impl Into<FencingToken>,
    ) -> Result<bool>
    where
        C: ConnectionLike + Send,
        F: ToRedisArgs + Send + Sync,
        V: ToRedisArgs + Send + Sync,
    {
        let token = token.into();
        let mut inv = scripts().hset.key(&self.fence);
        inv.key(&self.key).arg(token.get()).arg(field).arg(value);
        self.invoke::<_, i64>(con, &inv, token, "fenced hset")
            .await
            .map(|added| added > 0)
    }

    /// `DEL key`, if `token` is not older than the highest seen. Returns
    /// whether the key existed. The token key stays, so an older holder cannot
    /// write the key again.
    ///
    /// # Errors
    ///
    /// As [`set`](Self::set).
    ///
    /// # Cancel safety
    ///
    /// As [`set`](Self::set).
    pub async fn del<C>(&self, con: &mut C, token: impl Into<FencingToken>) -> Result<bool>
    where
        C: ConnectionLike + Send,
    {
        let token = token.into();
        let mut inv = scripts().del.key(&self.fence);
        inv.key(&self.key).arg(token.get());
        self.invoke::<_, i64>(con, &inv, token, "fenced del")
            .await
            .map(|n| n > 0)
    }

    /// Records `token` as the highest seen without writing the data, if it is
    /// not older than the highest seen: from then on, writes with older
    /// tokens are refused.
    ///
    /// A new holder calls it first, before it reads, so that a late write of an
    /// older holder cannot land between its read and its own first write.
    /// It does **not** make a later, separate write safe (an even newer holder
    /// can come in between): write with [`set`](Self::set), [`hset`](Self::hset),
    /// [`del`](Self::del) or a [`FencedScript`].
    ///
    /// # Errors
    ///
    /// As [`set`](Self::set).
    ///
    /// # Cancel safety
    ///
    /// As [`set`](Self::set).
    pub async fn advance<C>(&self, con: &mut C, token: impl Into<FencingToken>) -> Result<()>
    where
        C: ConnectionLike + Send,
    {
        let token = token.into();
        let mut inv = scripts().advance.key(&self.fence);
        inv.arg(token.get());
        self.invoke::<_, Value>(con, &inv, token, "fence advance")
            .await
            .map(drop)
    }

    /// The highest token this key has seen, if any (a plain `GET`).
    ///
    /// # Errors
    ///
    /// The connection's error; [`Error::Redis`] if the token key does not hold
    /// a token.
    ///
    /// # Cancel safety
    ///
    /// Read-only: dropping it leaves nothing behind.
    pub async fn highest<C>(&self, con: &mut C) -> Result<Option<FencingToken>>
    where
        C: ConnectionLike + Send,
    {
        let seen: Option<String> = redis::cmd("GET")
            .arg(&self.fence)
            .query_async(con)
            .await
            .map_err(|e| Error::from_redis("reading a fence", e))?;
        seen.map(|s| parse_token(&self.fence, s.as_bytes()))
            .transpose()
    }

    /// Runs a fenced invocation and decodes `{1, result}` or `{0, seen}`.
    async fn invoke<C, T>(
        &self,
        con: &mut C,
        inv: &ScriptInvocation<'_>,
        offered: FencingToken,
        what: &str,
    ) -> Result<T>
    where
        C: ConnectionLike + Send,
        T: FromRedisValue,
    {
        let reply: Value = inv
            .invoke_async(con)
            .await
            .map_err(|e| Error::from_redis(what, e))?;
        decode(&self.key, &self.fence, offered, reply)
    }
}

/// A Lua script of yours that runs only if the fencing token is current: the
/// token check, your script and the new highest token are one script.
///
/// Inside your Lua, `KEYS` and `ARGV` are the keys and arguments you add to
/// the invocation (the token key and the token are kept out of them); its
/// return value is the invocation's result. It runs after the check, so
/// nothing of it runs for a stale token. On Redis Cluster your keys must
/// share the fenced key's slot: give them its hash tag (for `order:42`, name
/// them `{order:42}:...`).
///
/// # Examples
///
/// ```no_run
/// # async fn demo(mut con: redis::aio::MultiplexedConnection, token: u64) -> Result<(), distlock::Error> {
/// use distlock::fence::{FencedKey, FencedScript};
///
/// // Append to the order's log and set its status, both or neither.
/// let script = FencedScript::new(r"
///     redis.call('rpush', KEYS[1], ARGV[1])
///     redis.call('set', KEYS[2], ARGV[1])
///     return redis.call('llen', KEYS[1])
/// ");
/// let order = FencedKey::new("order:42")?;
/// let entries: u64 = script
///     .prepare(&order, token)
///     .key("{order:42}:log")
///     .key("order:42")
///     .arg("paid")
///     .invoke(&mut con)
///     .await?;
/// # let _ = entries; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct FencedScript {
    script: Script,
}

impl FencedScript {
    /// Wraps the Lua `body` (a script as you would give to `EVAL`) in the
    /// token check.
    pub fn new(body: &str) -> Self {
        // The body becomes a function whose parameters shadow KEYS and ARGV,
        // after the check has returned for a stale token.
        let code = format!(
            "{CHECK}\
local keys, argv = {{}}, {{}}
for i = 2, #KEYS do keys[i - 1] = KEYS[i] end
for i = 2, #ARGV do argv[i - 1] = ARGV[i] end
local function body(KEYS, ARGV)
{body}
end
return {{1, body(keys, argv)}}
"
        );
        FencedScript {
            script: Script::new(&code),
        }
    }

    /// An invocation for the resource `fenced` with `token`; add your keys and
    /// arguments, then [`invoke`](FencedInvocation::invoke) it.
    pub fn prepare<'a>(
        &'a self,
        fenced: &'a FencedKey,
        token: impl Into<FencingToken>,
    ) -> FencedInvocation<'a> {
        let token = token.into();
        let mut inv = self.script.key(&fenced.fence);
        inv.arg(token.get());
        FencedInvocation { inv, fenced, token }
    }
}

/// A [`FencedScript`] with its keys and arguments, from
/// [`FencedScript::prepare`].
#[must_use = "an invocation does nothing until invoked"]
pub struct FencedInvocation<'a> {
    inv: ScriptInvocation<'a>,
    fenced: &'a FencedKey,
    token: FencingToken,
}

impl fmt::Debug for FencedInvocation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The arguments may be secrets: show only what is fenced.
        f.debug_struct("FencedInvocation")
            .field("key", &self.fenced.key)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl FencedInvocation<'_> {
    /// Adds a key: `KEYS[1]`, `KEYS[2]`, ... in your Lua, in this order.
    pub fn key<T: ToRedisArgs>(mut self, key: T) -> Self {
        self.inv.key(key);
        self
    }

    /// Adds an argument: `ARGV[1]`, `ARGV[2]`, ... in your Lua, in this order.
    pub fn arg<T: ToRedisArgs>(mut self, arg: T) -> Self {
        self.inv.arg(arg);
        self
    }

    /// Runs the script (`EVALSHA`, loading it on `NOSCRIPT`) and converts
    /// what your Lua returned (nil when it returned nothing).
    ///
    /// # Errors
    ///
    /// [`Error::Stale`] if the key has seen a newer token (your Lua did not
    /// run); an error your Lua raised, or a reply that does not convert to `T`,
    /// as [`Error::Redis`]; the connection's error.
    ///
    /// # Cancel safety
    ///
    /// The script runs whole or not at all on the server; if this future is
    /// dropped after sending, it may or may not have run.
    pub async fn invoke<T, C>(self, con: &mut C) -> Result<T>
    where
        T: FromRedisValue,
        C: ConnectionLike + Send,
    {
        self.fenced
            .invoke(con, &self.inv, self.token, "fenced script")
            .await
    }
}

/// Decodes a fenced script's reply: `{1, result}` (result absent for nil) or
/// `{0, seen}`.
fn decode<T: FromRedisValue>(
    key: &str,
    fence: &str,
    offered: FencingToken,
    reply: Value,
) -> Result<T> {
    let malformed = || Error::Redis {
        source: format!("unexpected reply from a fenced write to `{}`", shorten(key)).into(),
    };
    let Value::Array(mut parts) = reply else {
        return Err(malformed());
    };
    if parts.is_empty() || parts.len() > 2 {
        return Err(malformed());
    }
    let result = if parts.len() == 2 { parts.pop() } else { None };
    match parts.pop() {
        Some(Value::Int(1)) => {
            T::from_redis_value(result.unwrap_or(Value::Nil)).map_err(|e| Error::Redis {
                source: Box::new(redis::RedisError::from(e)),
            })
        }
        Some(Value::Int(0)) => {
            let seen = match result {
                Some(Value::BulkString(bytes)) => parse_token(fence, &bytes)?,
                Some(Value::SimpleString(s)) => parse_token(fence, s.as_bytes())?,
                _ => return Err(malformed()),
            };
            Err(Error::Stale {
                resource: shorten(key),
                offered: offered.get(),
                seen: Some(seen.get()),
            })
        }
        _ => Err(malformed()),
    }
}

/// Parses the decimal token stored in a token key.
fn parse_token(fence: &str, bytes: &[u8]) -> Result<FencingToken> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(FencingToken::new)
        .ok_or_else(|| Error::Redis {
            source: format!(
                "fence key `{}` does not hold a fencing token",
                shorten(fence)
            )
            .into(),
        })
}

/// The token key of the data key `key`, in its Redis Cluster slot.
fn fence_key(key: &str) -> Result<String> {
    if key.is_empty() {
        return Err(Error::invalid_key(key, "the key is empty"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Error::invalid_key(key, "the key is longer than 1024 bytes"));
    }
    // Redis hashes the part between the first `{` and the first `}` after it,
    // when that part is not empty; otherwise the whole key.
    let tagged = key
        .find('{')
        .and_then(|open| key[open + 1..].find('}'))
        .is_some_and(|len| len > 0);
    if tagged {
        // Appending keeps the first tag.
        Ok(format!("{key}:fence"))
    } else if key.contains('}') {
        Err(Error::invalid_key(
            key,
            "the key contains `}` but no Redis Cluster hash tag, so its fence key cannot share its slot",
        ))
    } else {
        // Hash tag = the whole key: the slot the key itself hashes to.
        Ok(format!("{{{key}}}:fence"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The part of a key Redis Cluster hashes (its `keyHashSlot`).
    fn hashed(key: &str) -> &str {
        if let Some(open) = key.find('{') {
            if let Some(len) = key[open + 1..].find('}') {
                if len > 0 {
                    return &key[open + 1..open + 1 + len];
                }
            }
        }
        key
    }

    #[test]
    fn the_fence_key_shares_the_data_keys_slot() {
        for (key, fence) in [
            ("order:42", "{order:42}:fence"),
            ("{user:7}:cart", "{user:7}:cart:fence"),
            ("a{b", "{a{b}:fence"),
        ] {
            let fenced = FencedKey::new(key).unwrap();
            assert_eq!(fenced.fence_key(), fence, "{key}");
            assert_eq!(hashed(key), hashed(fence), "{key}");
        }
    }

    #[test]
    fn keys_whose_fence_cannot_share_a_slot_are_refused() {
        for key in ["", "a}b", "x{}y", "x{}y{z}"] {
            let err = FencedKey::new(key).unwrap_err();
            assert!(err.is_invalid_input(), "{key:?}: {err}");
        }
        assert!(FencedKey::new("k".repeat(MAX_KEY_LEN + 1)).is_err());
    }

    #[test]
    fn replies_decode_to_results_and_stale_errors() {
        let t = FencingToken::new(5);
        let ok: Option<String> = decode("k", "f", t, Value::Array(vec![Value::Int(1)])).unwrap();
        assert_eq!(ok, None);
        let n: i64 = decode(
            "k",
            "f",
            t,
            Value::Array(vec![Value::Int(1), Value::Int(3)]),
        )
        .unwrap();
        assert_eq!(n, 3);
        let stale = decode::<Value>(
            "k",
            "f",
            t,
            Value::Array(vec![Value::Int(0), Value::BulkString(b"7".to_vec())]),
        )
        .unwrap_err();
        assert!(stale.is_stale(), "{stale}");
        assert!(
            matches!(
                stale,
                Error::Stale {
                    offered: 5,
                    seen: Some(7),
                    ..
                }
            ),
            "{stale:?}"
        );
        for bad in [
            Value::Nil,
            Value::Array(vec![]),
            Value::Array(vec![Value::Int(2)]),
        ] {
            assert!(matches!(
                decode::<Value>("k", "f", t, bad),
                Err(Error::Redis { .. })
            ));
        }
    }
}
