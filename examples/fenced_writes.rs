//! Correctness mode: the resource checks the fencing token, so a lock holder
//! that was frozen past its lease cannot overwrite the newer holder's write.
//!
//! ```sh
//! cargo run --example fenced_writes                 # locks and data in Redis at $REDIS_URL or 127.0.0.1:6379
//! DATABASE_URL=postgres://user@localhost/db cargo run --example fenced_writes   # data in PostgreSQL
//! ```
//!
//! With `DATABASE_URL`, it creates the tables `distlock_fences` and
//! `distlock_example_orders` if missing. A process freeze is played by
//! detaching A's guard (its renewals stop, as a frozen process's would) and
//! waiting past the expiry; the tests do it with a real `SIGSTOP`
//! (`tests/tests/fence.rs`).

use std::time::Duration;

use distlock::fence::{sql, FencedKey, FencingToken};
use distlock::{Error, Locker};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const LOCK: &str = "fenced_writes:order:42";
const EXPIRY: Duration = Duration::from_millis(500);

/// Where the order lives.
enum Store {
    Redis(redis::aio::MultiplexedConnection, FencedKey),
    Postgres(sqlx::PgPool),
}

impl Store {
    /// Writes the order's status with `token`, fenced or not.
    async fn write(&self, status: &str, token: FencingToken, fenced: bool) -> Result<(), Error> {
        match self {
            Store::Redis(con, key) if fenced => key.set(&mut con.clone(), status, token).await,
            Store::Redis(con, key) => {
                let mut con = con.clone();
                redis::cmd("SET")
                    .arg(key.key())
                    .arg(status)
                    .query_async::<()>(&mut con)
                    .await
                    .map_err(Error::redis)
            }
            Store::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                if fenced {
                    // Err(Stale) here: `?` drops `tx`, which rolls back.
                    sql::advance(&mut tx, LOCK, token).await?;
                }
                sqlx::query("UPDATE distlock_example_orders SET status = $1 WHERE id = 42")
                    .bind(status)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }

    async fn status(&self) -> Result<String, BoxError> {
        Ok(match self {
            Store::Redis(con, key) => {
                let value: Option<String> = redis::cmd("GET")
                    .arg(key.key())
                    .query_async(&mut con.clone())
                    .await?;
                value.unwrap_or_default()
            }
            Store::Postgres(pool) => {
                sqlx::query_scalar("SELECT status FROM distlock_example_orders WHERE id = 42")
                    .fetch_one(pool)
                    .await?
            }
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let connect = || {
        Locker::builder()
            .url(&url)
            // Keys of this run's own: a lock left by an interrupted earlier run
            // (it expires by itself) delays nobody. Never force_unlock at
            // start-up instead: in a service, the "leftover" may be a live
            // replica's lock (the README says when force_unlock is right).
            .key_prefix(format!("fenced-writes-{}:", std::process::id()))
            .expiry(EXPIRY)
            .connect_timeout(Duration::from_secs(2))
            .build()
    };
    let (a, b) = match (connect().await, connect().await) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            println!("No Redis answered at {url}: {e}.");
            println!(
                "This example needs one (`redis-server`, or `docker run -p 6379:6379 redis`),"
            );
            println!("or REDIS_URL pointing at yours: fencing tokens come from the lock server.");
            return Ok(());
        }
    };
    let store = match std::env::var("DATABASE_URL") {
        Ok(db) => {
            let pool = sqlx::PgPool::connect(&db).await?;
            sql::create_table(&pool).await?;
            sqlx::query("CREATE TABLE IF NOT EXISTS distlock_example_orders (id BIGINT PRIMARY KEY, status TEXT NOT NULL)")
                .execute(&pool)
                .await?;
            sqlx::query("INSERT INTO distlock_example_orders VALUES (42, 'new') ON CONFLICT (id) DO UPDATE SET status = 'new'")
                .execute(&pool)
                .await?;
            println!("Locks in Redis at {url}; order 42 in PostgreSQL (table distlock_example_orders).\n");
            Store::Postgres(pool)
        }
        Err(_) => {
            let con = redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await?;
            println!("Locks and order 42 in Redis at {url} (set DATABASE_URL for PostgreSQL).\n");
            Store::Redis(con, FencedKey::new("fenced_writes:order:42:status")?)
        }
    };

    for fenced in [true, false] {
        println!(
            "{}",
            if fenced {
                "With the fence:"
            } else {
                "Without the fence (the same story):"
            }
        );
        // 1. A holds the lock and checks its lease: all good.
        let guard = a.lock(LOCK).acquire().await?;
        let a_token = FencingToken::from(&guard);
        println!("  A acquired the lock (token {a_token}) and checked its lease: held.");
        // 2. A freezes (GC pause, SIGSTOP, VM migration): no more renewals, and
        //    the lease expires while A still believes it holds it.
        let _frozen = guard.detach();
        tokio::time::sleep(EXPIRY + Duration::from_millis(200)).await;
        println!(
            "  A froze for {} ms; its lease expired meanwhile.",
            (EXPIRY + Duration::from_millis(200)).as_millis()
        );
        // 3. B takes the lock, with a higher token, and writes.
        let b_guard = b.lock(LOCK).acquire_timeout(Duration::from_secs(5)).await?;
        store
            .write("shipped by B", FencingToken::from(&b_guard), fenced)
            .await?;
        println!(
            "  B acquired the lock (token {}) and wrote \"shipped by B\".",
            b_guard.fencing_token()
        );
        // 4. A wakes up and writes with the token it checked before the freeze.
        match store.write("cancelled by A", a_token, fenced).await {
            Err(e) if e.is_stale() => {
                println!("  A woke up and wrote with token {a_token}: refused ({e}).")
            }
            Ok(()) => {
                println!("  A woke up and wrote \"cancelled by A\" with token {a_token}: accepted.")
            }
            Err(e) => return Err(e.into()),
        }
        println!("  The order now says: \"{}\".\n", store.status().await?);
        b_guard.release().await?;
    }
    println!("The fence kept B's write; without it, the frozen holder silently overwrote it.");
    a.close().await?;
    b.close().await?;
    Ok(())
}
