//! The physical floor: the least work Redis needs for a lock, done by hand on
//! one already-open multiplexed connection. `SET key token NX PX ttl`, then an
//! `EVALSHA` compare-and-delete: two round trips per acquire/release pair.

use std::sync::LazyLock;

use redis::aio::MultiplexedConnection;
use redis::Script;

/// The compare-and-delete every correct Redis lock needs for its release.
static CAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0",
    )
});

/// Lease expiry the floor sets, in milliseconds (distlock's default).
const TTL_MS: u64 = 30_000;

/// One acquire/release pair by hand: `SET NX PX` then `EVALSHA` compare-and-delete.
/// Returns whether the `SET` took the key.
pub(crate) async fn pair(conn: &mut MultiplexedConnection, key: &str, token: &str) -> bool {
    if !acquire(conn, key, token).await {
        return false;
    }
    release(conn, key, token).await;
    true
}

/// `SET key token NX PX ttl`: whether it took the key.
pub(crate) async fn acquire(conn: &mut MultiplexedConnection, key: &str, token: &str) -> bool {
    let set: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(token)
        .arg("NX")
        .arg("PX")
        .arg(TTL_MS)
        .query_async(conn)
        .await
        .expect("floor SET");
    set.is_some()
}

/// Compare-and-delete by `EVALSHA`.
pub(crate) async fn release(conn: &mut MultiplexedConnection, key: &str, token: &str) {
    let _: i64 = CAD
        .key(key)
        .arg(token)
        .invoke_async(conn)
        .await
        .expect("floor compare-and-delete");
}

/// A token for the `n`th pair of loop `loop_id` (cheap and unique).
pub(crate) fn token(loop_id: usize, n: u64) -> String {
    format!("floor:{loop_id}:{n}")
}
