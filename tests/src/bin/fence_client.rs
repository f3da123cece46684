//! Process A of Kleppmann's scenario: a lock holder that can really be paused
//! (`SIGSTOP`) between checking its lease and writing.
//!
//! ```text
//! fence_client --lock redis://... [--lock ...] --data redis://...|postgres://... --key K --expiry-ms N
//! ```
//!
//! Commands, one per line on stdin; one answer line each on stdout:
//! - `acquire` → `token N`
//! - `checkwrite MODE VALUE DELAY_MS` → `checked` once the lease was found
//!   held, then, `DELAY_MS` later (the window in which the driver stops the
//!   process), the write's outcome: `ok`, `stale OFFERED SEEN` or `error ...`.
//!   MODE: `fenced` (`FencedKey::set` / `fence::sql::advance` in the
//!   transaction), `column` (PostgreSQL token-column `UPDATE`), `plain` (no
//!   fence).
//!
//! PostgreSQL data is the row `key = K` of `orders (key, status, fence)`;
//! Redis data is the key `K`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test tool: failing loudly is the point

use std::time::Duration;

use distlock::fence::{sql, FencedKey};
use distlock::{Error, LockGuard, Locker};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

enum Data {
    Redis(redis::aio::MultiplexedConnection),
    Postgres(sqlx::PgPool),
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut locks = Vec::new();
    let (mut data_url, mut key, mut expiry) = (String::new(), String::new(), 1000u64);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().expect("a value after each flag");
        match flag.as_str() {
            "--lock" => locks.push(value),
            "--data" => data_url = value,
            "--key" => key = value,
            "--expiry-ms" => expiry = value.parse().expect("--expiry-ms N"),
            other => panic!("unknown flag {other}"),
        }
    }
    let builder = match locks.as_slice() {
        [one] => Locker::builder().url(one),
        _ => Locker::builder().redlock(locks),
    };
    // Redlock wants requests well inside the lease: a quarter of it.
    let locker = builder
        .expiry(Duration::from_millis(expiry))
        .op_timeout(Duration::from_millis(expiry / 4))
        .build()
        .await
        .expect("locker");
    let data = if data_url.starts_with("postgres") {
        Data::Postgres(sqlx::PgPool::connect(&data_url).await.expect("postgres"))
    } else {
        let client = redis::Client::open(data_url).expect("redis url");
        Data::Redis(
            client
                .get_multiplexed_async_connection()
                .await
                .expect("redis"),
        )
    };

    let mut stdout = tokio::io::stdout();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut guard: Option<LockGuard> = None;
    while let Some(line) = lines.next_line().await.expect("stdin") {
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["acquire"] => {
                let g = locker.lock(&key).acquire().await.expect("acquire");
                let answer = format!("token {}", g.fencing_token());
                guard = Some(g);
                answer
            }
            ["checkwrite", mode, value, delay] => {
                let g = guard.as_ref().expect("acquire first");
                assert!(!g.is_lost(), "the lease was lost before the check");
                say(&mut stdout, "checked").await;
                // The pause lands here: after the check, before the write.
                tokio::time::sleep(Duration::from_millis(delay.parse().expect("delay"))).await;
                let token = g.fencing_token();
                match write(&data, &key, mode, value, token).await {
                    Ok(()) => "ok".to_owned(),
                    Err(Error::Stale { offered, seen, .. }) => format!(
                        "stale {offered} {}",
                        seen.map_or("-".to_owned(), |s| s.to_string())
                    ),
                    Err(e) => format!("error {e}"),
                }
            }
            _ => format!("error unknown command {line:?}"),
        };
        say(&mut stdout, &answer).await;
    }
    if let Some(g) = guard {
        let _ = g.release().await;
    }
}

async fn say(stdout: &mut tokio::io::Stdout, line: &str) {
    stdout
        .write_all(format!("{line}\n").as_bytes())
        .await
        .expect("stdout");
    stdout.flush().await.expect("stdout");
}

/// Writes `value` with `token` in `mode`.
async fn write(data: &Data, key: &str, mode: &str, value: &str, token: u64) -> Result<(), Error> {
    match (data, mode) {
        (Data::Redis(con), "fenced") => {
            FencedKey::new(key)?
                .set(&mut con.clone(), value, token)
                .await
        }
        (Data::Redis(con), "plain") => redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async::<()>(&mut con.clone())
            .await
            .map_err(Error::redis),
        (Data::Postgres(pool), "fenced") => {
            let mut tx = pool.begin().await?;
            sql::advance(&mut tx, key, token).await?;
            sqlx::query("UPDATE orders SET status = $1 WHERE key = $2")
                .bind(value)
                .bind(key)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        }
        (Data::Postgres(pool), "column") => {
            let token = distlock::fence::FencingToken::new(token);
            let done = sqlx::query(
                "UPDATE orders SET status = $1, fence = $2 WHERE key = $3 AND fence <= $2",
            )
            .bind(value)
            .bind(token.to_bigint()?)
            .bind(key)
            .execute(pool)
            .await?;
            sql::require_written(&done, key, token)
        }
        (Data::Postgres(pool), "plain") => {
            sqlx::query("UPDATE orders SET status = $1 WHERE key = $2")
                .bind(value)
                .bind(key)
                .execute(pool)
                .await?;
            Ok(())
        }
        (_, other) => panic!("unknown write mode {other}"),
    }
}
