//! Correctness mode, end to end: Kleppmann's scenario with a really paused
//! client (a child process stopped with `SIGSTOP`), on Redis data and on a real
//! PostgreSQL, on one lock server, on Redlock and across an empty restart of
//! the lock server; and the fenced operations themselves on real servers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::process::Stdio;
use std::time::Duration;

use distlock::fence::{sql, FencedKey, FencedScript, FencingToken};
use distlock::{Error, Locker};
use distlock_tests::{report, PostgresServer, RedisServer};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::timeout;

/// The lease expiry of both clients: short, so B gets the lock soon after A stops.
const EXPIRY_MS: u64 = 500;
/// How long A waits between its lease check and its write: the driver stops it
/// in this window.
const CHECK_TO_WRITE_MS: u64 = 1000;
/// The bound on every answer from a client.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// A `fence_client` process.
struct Client {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Client {
    fn spawn(locks: &[String], data: &str, key: &str) -> Client {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fence_client"));
        for lock in locks {
            cmd.args(["--lock", lock]);
        }
        let mut child = cmd
            .args(["--data", data, "--key", key])
            .args(["--expiry-ms", &EXPIRY_MS.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawning fence_client");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Client {
            child,
            stdin,
            lines,
        }
    }

    async fn send(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
    }

    async fn answer(&mut self) -> String {
        timeout(ANSWER_TIMEOUT, self.lines.next_line())
            .await
            .expect("the client answered in time")
            .unwrap()
            .expect("the client is alive")
    }

    async fn acquire(&mut self) -> u64 {
        self.send("acquire").await;
        let answer = self.answer().await;
        let token = answer
            .strip_prefix("token ")
            .unwrap_or_else(|| panic!("{answer}"));
        token.parse().unwrap()
    }

    /// Starts a check-then-write; returns once the lease was checked.
    async fn check_then_write(&mut self, mode: &str, value: &str, delay_ms: u64) {
        self.send(&format!("checkwrite {mode} {value} {delay_ms}"))
            .await;
        assert_eq!(self.answer().await, "checked");
    }

    fn signal(&self, signal: Signal) {
        let pid = i32::try_from(self.child.id().unwrap()).unwrap();
        kill(Pid::from_raw(pid), signal).unwrap();
    }

    /// `SIGSTOP`, and wait (bounded) until the kernel reports it stopped.
    fn pause(&self) {
        self.signal(Signal::SIGSTOP);
        let pid = self.child.id().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let state = stat.rsplit_once(')').unwrap().1.trim_start().chars().next();
            if state == Some('T') {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "A did not stop");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn resume(&self) {
        self.signal(Signal::SIGCONT);
    }
}

/// What happened in one run of the scenario.
#[derive(Debug)]
struct Run {
    a_token: u64,
    b_token: u64,
    /// A's answer to its late write: `ok`, `stale OFFERED SEEN`, `error ...`.
    a_late_write: String,
}

/// Kleppmann's scenario: A acquires and checks its lease; A is stopped past
/// its expiry (and `restart` runs, if given); B acquires with a higher token
/// and writes; A is resumed and writes with its old token.
async fn scenario(
    locks: &[String],
    data: &str,
    key: &str,
    mode: &str,
    restart: Option<&mut RedisServer>,
) -> Run {
    let mut a = Client::spawn(locks, data, key);
    let a_token = a.acquire().await;
    a.check_then_write(mode, "A", CHECK_TO_WRITE_MS).await;
    a.pause();
    if let Some(server) = restart {
        server.restart().await;
    }
    // B is another process: it gets the lock once A's lease expires.
    let mut b = Client::spawn(locks, data, key);
    let b_token = b.acquire().await;
    assert!(
        b_token > a_token,
        "tokens increase: A {a_token}, B {b_token}"
    );
    b.check_then_write(mode, "B", 0).await;
    assert_eq!(b.answer().await, "ok", "B's write");
    a.resume();
    let a_late_write = a.answer().await;
    Run {
        a_token,
        b_token,
        a_late_write,
    }
}

fn assert_refused(run: &Run) {
    assert_eq!(
        run.a_late_write,
        format!("stale {} {}", run.a_token, run.b_token),
        "A's late write is refused with the stale-token error: {run:?}"
    );
}

fn assert_refused_without_seen(run: &Run) {
    assert_eq!(
        run.a_late_write,
        format!("stale {} -", run.a_token),
        "{run:?}"
    );
}

// --- Redis data --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_data_refuses_the_late_write_of_a_paused_holder() {
    let (lock, data) = (RedisServer::start().await, RedisServer::start().await);
    let run = scenario(&[lock.url()], &data.url(), "order:1", "fenced", None).await;
    assert_refused(&run);
    assert_eq!(
        data.get("order:1").await.as_deref(),
        Some("B"),
        "B's write stands"
    );
    assert_eq!(
        data.get("{order:1}:fence").await,
        Some(run.b_token.to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_fence_a_paused_holder_overwrites_redis_data() {
    let (lock, data) = (RedisServer::start().await, RedisServer::start().await);
    let run = scenario(&[lock.url()], &data.url(), "order:2", "plain", None).await;
    assert_eq!(run.a_late_write, "ok", "{run:?}");
    assert_eq!(
        data.get("order:2").await.as_deref(),
        Some("A"),
        "the stale holder overwrote B: what the fence prevents"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_tokens_fence_a_paused_holder() {
    let locks = RedisServer::start_many(3).await;
    let data = RedisServer::start().await;
    let urls: Vec<String> = locks.iter().map(RedisServer::url).collect();
    let run = scenario(&urls, &data.url(), "order:3", "fenced", None).await;
    assert_refused(&run);
    assert_eq!(data.get("order:3").await.as_deref(), Some("B"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_restart_of_the_lock_server_keeps_the_fence() {
    let mut lock = RedisServer::start().await;
    let data = RedisServer::start().await;
    let run = scenario(
        &[lock.url()],
        &data.url(),
        "order:4",
        "fenced",
        Some(&mut lock),
    )
    .await;
    // The counter was lost with the restart: B's token came from the server
    // clock, still above A's.
    assert_refused(&run);
    assert_eq!(data.get("order:4").await.as_deref(), Some("B"));
}

// --- PostgreSQL ---------------------------------------------------------------

async fn orders(db: &PostgresServer, keys: &[&str]) -> sqlx::PgPool {
    let pool = sqlx::PgPool::connect(&db.url()).await.unwrap();
    sql::create_table(&pool).await.unwrap();
    sqlx::query(
        "CREATE TABLE orders (key TEXT PRIMARY KEY, status TEXT NOT NULL, fence BIGINT NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    for key in keys {
        sqlx::query("INSERT INTO orders (key, status, fence) VALUES ($1, 'new', 0)")
            .bind(key)
            .execute(&pool)
            .await
            .unwrap();
    }
    pool
}

async fn status(pool: &sqlx::PgPool, key: &str) -> String {
    sqlx::query_scalar("SELECT status FROM orders WHERE key = $1")
        .bind(key)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refuses_the_late_write_of_a_paused_holder_and_without_the_fence_does_not() {
    let (lock, db) = (RedisServer::start().await, PostgresServer::start().await);
    let pool = orders(&db, &["order:5", "order:6", "order:7"]).await;
    let locks = [lock.url()];

    // The per-resource table, checked in the writing transaction.
    let run = scenario(&locks, &db.url(), "order:5", "fenced", None).await;
    assert_refused(&run);
    assert_eq!(status(&pool, "order:5").await, "B", "B's write stands");
    let highest = sql::highest(&pool, "order:5").await.unwrap();
    assert_eq!(highest, Some(FencingToken::new(run.b_token)));

    // The token column on the row.
    let run = scenario(&locks, &db.url(), "order:6", "column", None).await;
    assert_refused_without_seen(&run);
    assert_eq!(status(&pool, "order:6").await, "B");

    // No fence: the stale holder overwrites B.
    let run = scenario(&locks, &db.url(), "order:7", "plain", None).await;
    assert_eq!(run.a_late_write, "ok", "{run:?}");
    assert_eq!(
        status(&pool, "order:7").await,
        "A",
        "what the fence prevents"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_advance_orders_writers_and_refuses_misuse() {
    let db = PostgresServer::start().await;
    let pool = orders(&db, &["r"]).await;
    let t = 1_800_000_000_000_000_u64;

    // An equal token passes; a lower one is refused with the seen token.
    for token in [t, t, t + 1] {
        let mut tx = pool.begin().await.unwrap();
        sql::advance(&mut tx, "r", token).await.unwrap();
        tx.commit().await.unwrap();
    }
    let mut tx = pool.begin().await.unwrap();
    let err = sql::advance(&mut tx, "r", t).await.unwrap_err();
    assert!(
        matches!(err, Error::Stale { offered, seen: Some(seen), .. } if offered == t && seen == t + 1),
        "{err:?}"
    );
    drop(tx);

    // While a newer holder's transaction is open, an older one waits for it
    // and is then refused: the row lock orders them.
    let mut newer = pool.begin().await.unwrap();
    sql::advance(&mut newer, "r", t + 5).await.unwrap();
    let older = tokio::spawn({
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            sql::advance(&mut tx, "r", t + 2).await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !older.is_finished(),
        "the older writer waits for the newer one's transaction"
    );
    newer.commit().await.unwrap();
    let err = timeout(Duration::from_secs(5), older)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(err.is_stale(), "{err}");

    // Outside a transaction the check would cover nothing: refused.
    let mut conn = pool.acquire().await.unwrap();
    let err = sql::advance(&mut conn, "r", t + 9).await.unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    // A token that does not fit a BIGINT is an error, not a wrapped value.
    let mut tx = pool.begin().await.unwrap();
    let err = sql::advance(&mut tx, "r", u64::MAX).await.unwrap_err();
    assert!(err.to_string().contains("BIGINT"), "{err}");
    drop(tx);
    assert_eq!(
        sql::highest(&pool, "r").await.unwrap(),
        Some(FencingToken::new(t + 5))
    );

    // The insert-or-update form on a token column.
    let upsert = "INSERT INTO orders AS o (key, status, fence) VALUES ($1, $2, $3) \
        ON CONFLICT (key) DO UPDATE SET status = EXCLUDED.status, fence = EXCLUDED.fence \
        WHERE o.fence <= EXCLUDED.fence";
    for (token, value, written) in [
        (t + 1, "one", true),
        (t, "zero", false),
        (t + 1, "again", true),
    ] {
        let token = FencingToken::new(token);
        let done = sqlx::query(upsert)
            .bind("u")
            .bind(value)
            .bind(token.to_bigint().unwrap())
            .execute(&pool)
            .await
            .unwrap();
        let result = sql::require_written(&done, "u", token);
        assert_eq!(result.is_ok(), written, "{value}: {result:?}");
    }
    assert_eq!(status(&pool, "u").await, "again");
}

// --- The fenced operations on a real Redis ------------------------------------

#[tokio::test]
async fn fenced_redis_writes_pass_equal_tokens_and_refuse_older_ones() {
    let server = RedisServer::start().await;
    let mut con = server.conn().await;
    let key = FencedKey::new("cart:7").unwrap();
    let t = 1_800_000_000_000_000_u64;

    key.hset(&mut con, "apples", 3, t).await.unwrap();
    assert!(
        !key.hset(&mut con, "apples", 4, t).await.unwrap(),
        "same token, same field"
    );
    let err = key.hset(&mut con, "apples", 9, t - 1).await.unwrap_err();
    assert!(
        matches!(err, Error::Stale { offered, seen: Some(seen), ref resource, .. } if offered == t - 1 && seen == t && resource == "cart:7"),
        "{err:?}"
    );
    let apples: String = redis::cmd("HGET")
        .arg("cart:7")
        .arg("apples")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(apples, "4");

    // Tokens compare as numbers, not as strings or doubles: 10 > 9, and two
    // tokens one apart above 2^53 are told apart.
    let small = FencedKey::new("small").unwrap();
    small.set(&mut con, "x", 9_u64).await.unwrap();
    small.set(&mut con, "y", 10_u64).await.unwrap();
    assert!(small
        .set(&mut con, "z", 9_u64)
        .await
        .unwrap_err()
        .is_stale());
    let big = FencedKey::new("big").unwrap();
    let huge = u64::MAX - 1;
    big.set(&mut con, "x", huge).await.unwrap();
    assert!(big
        .set(&mut con, "y", huge - 1)
        .await
        .unwrap_err()
        .is_stale());
    big.set(&mut con, "z", u64::MAX).await.unwrap();
    assert_eq!(
        big.highest(&mut con).await.unwrap(),
        Some(FencingToken::new(u64::MAX))
    );

    // A fenced delete keeps the token key, so an older holder cannot recreate it.
    assert!(key.del(&mut con, t + 1).await.unwrap());
    assert!(key
        .hset(&mut con, "apples", 1, t)
        .await
        .unwrap_err()
        .is_stale());
    assert!(!server.exists("cart:7").await);
    assert_eq!(
        server.get("{cart:7}:fence").await,
        Some((t + 1).to_string())
    );

    // advance: announces a token without writing data.
    key.advance(&mut con, t + 2).await.unwrap();
    assert!(key.advance(&mut con, t + 1).await.unwrap_err().is_stale());

    // A token key that does not hold a token is an error, never a pass.
    server.set("{bad}:fence", "soon").await;
    let err = FencedKey::new("bad")
        .unwrap()
        .set(&mut con, "v", t)
        .await
        .unwrap_err();
    assert!(
        !err.is_stale() && report(&err).contains("fencing token"),
        "{err}"
    );
    assert!(!server.exists("bad").await);
}

#[tokio::test]
async fn a_fenced_script_runs_only_for_a_current_token() {
    let server = RedisServer::start().await;
    let mut con = server.conn().await;
    let order = FencedKey::new("order:9").unwrap();
    let script = FencedScript::new(
        "redis.call('rpush', KEYS[1], ARGV[1])\n\
         redis.call('set', KEYS[2], ARGV[1])\n\
         return redis.call('llen', KEYS[1]) -- a trailing comment",
    );
    let run = |token: u64, value: &'static str| {
        script
            .prepare(&order, token)
            .key("{order:9}:log")
            .key("order:9")
            .arg(value)
    };
    let n: u64 = run(5, "paid").invoke(&mut con).await.unwrap();
    assert_eq!(n, 1);
    let n: u64 = run(6, "shipped").invoke(&mut con).await.unwrap();
    assert_eq!(n, 2);
    let err = run(5, "refunded")
        .invoke::<u64, _>(&mut con)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Stale {
                offered: 5,
                seen: Some(6),
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        server.get("order:9").await.as_deref(),
        Some("shipped"),
        "the body did not run"
    );

    // A body that returns nothing gives nil; an error it raises is an error.
    let quiet = FencedScript::new("redis.call('set', KEYS[1], 'x')");
    let out: Option<String> = quiet
        .prepare(&order, 6_u64)
        .key("order:9")
        .invoke(&mut con)
        .await
        .unwrap();
    assert_eq!(out, None);
    let failing = FencedScript::new("return redis.error_reply('ERR nope')");
    let err = failing
        .prepare(&order, 7_u64)
        .invoke::<(), _>(&mut con)
        .await
        .unwrap_err();
    assert!(report(&err).contains("nope"), "{err}");

    // The token reaches it from a guard without conversion code.
    let locker = Locker::builder().url(server.url()).build().await.unwrap();
    let guard = locker.lock("order:9").acquire().await.unwrap();
    let n: u64 = script
        .prepare(&order, &guard)
        .key("{order:9}:log")
        .key("order:9")
        .arg("closed")
        .invoke(&mut con)
        .await
        .unwrap();
    assert_eq!(n, 3);
    guard.release().await.unwrap();
    locker.close().await.unwrap();
}

/// A fencing counter below the server's clock in microseconds (10^15, 2001)
/// never gives a token: the next holder starts from the clock. A counter
/// set to 1 by hand (or by a transaction's `INCR`, which runs even when its
/// `SET` was refused, as an experiment here once did) counted on from 1 with
/// the old rule, "start from the clock only when `INCR` gives exactly 1".
/// A refusal creates no counter; a corrupt one is an error that leaves no
/// lock behind, never a token repeated or read as it stands.
#[tokio::test]
async fn a_counter_below_the_clock_never_gives_a_token_that_goes_back() {
    let server = RedisServer::start().await;
    let a = Locker::connect(&server.url()).await.unwrap();
    let b = Locker::connect(&server.url()).await.unwrap();
    // Past each locker's first acquisition.
    for l in [&a, &b] {
        l.lock("warm")
            .acquire()
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }
    let held = a.lock("k").acquire().await.unwrap();
    let first = held.fencing_token();
    assert!(
        first >= 1_000_000_000_000_000,
        "{first} comes from the clock"
    );

    // The counter runs out; a refused attempt does not leave one behind.
    server.del("distlock:{k}:fence").await;
    assert!(b.lock("k").try_acquire().await.unwrap().is_none());
    assert!(!server.exists("distlock:{k}:fence").await);

    // A counter of 1: the next holder does not count on from it.
    server.set("distlock:{k}:fence", "1").await;
    held.release().await.unwrap();
    let next = b.lock("k").acquire().await.unwrap();
    assert!(
        next.fencing_token() > first,
        "{} after {first}",
        next.fencing_token()
    );
    next.release().await.unwrap();

    // A corrupt counter is an error that leaves no lock behind (at the top
    // of the range INCR overflows; "1e300" is not an integer, though Lua
    // reads it as a number).
    for corrupt in ["abc", "1e300", "9223372036854775807"] {
        server.set("distlock:{k}:fence", corrupt).await;
        let err = b.lock("k").try_acquire().await.unwrap_err();
        assert!(report(&err).contains("fencing counter"), "{corrupt}: {err}");
        assert!(!server.exists("distlock:{k}").await, "{corrupt}");
    }
}

/// An attempt refused, or cancelled at any point, never leaves a counter that
/// lives forever (a transaction whose `INCR` ran after a refused `SET` did,
/// in 7 and 9 of 400 cancelled attempts, before it was taken out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_refused_attempt_never_leaves_a_counter_without_a_ttl() {
    let server = RedisServer::start().await;
    let holder = Locker::connect(&server.url()).await.unwrap();
    let other = Locker::connect(&server.url()).await.unwrap();
    other
        .lock("warm")
        .acquire()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let held = holder.lock("k").acquire().await.unwrap();
    let mut cancelled = 0;
    for i in 0..300u64 {
        server.del("distlock:{k}:fence").await;
        let budget = Duration::from_micros(i * 37 % 1500);
        let attempt = tokio::time::timeout(budget, other.lock("k").try_acquire()).await;
        cancelled += u32::from(attempt.is_err());
        if server.exists("distlock:{k}:fence").await {
            let pttl = server.pttl("distlock:{k}:fence").await;
            assert!(pttl > 0, "round {i}: a counter with PTTL {pttl}");
        }
    }
    assert!(cancelled > 0, "no attempt was cancelled");
    held.release().await.unwrap();
}
