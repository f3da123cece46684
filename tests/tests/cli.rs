//! The `distlock` operator binary (`distlock --features cli`), run as a
//! process against a real `redis-server`, its output and exit codes checked.
//!
//! The binary under test is built from the CLI's own sources
//! (`distlock/src/bin/distlock/`) as this package's `distlock-cli` bin, so that
//! cargo builds it beside the tests and hands its path over
//! (`CARGO_BIN_EXE_distlock-cli`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::process::{Output, Stdio};
use std::time::Duration;

use distlock::Locker;
use distlock_tests::RedisServer;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_distlock-cli");
const BOUND: Duration = Duration::from_secs(30);

/// Runs the binary with `args`, `stdin` as its input, and waits (bounded).
async fn cli(url: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .arg("--url")
        .arg(url)
        .args(args)
        .env_remove("REDIS_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    tokio::time::timeout(BOUND, child.wait_with_output())
        .await
        .expect("the binary answers in time")
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

async fn tagged(server: &RedisServer, tag: &str) -> Locker {
    Locker::builder()
        .url(server.url())
        .owner_tag(tag)
        .build()
        .await
        .unwrap()
}

/// The table's row for `key` and `owner`, split on whitespace.
fn row<'a>(table: &'a str, key: &str, owner: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&key) && cells.contains(&owner))
        .unwrap_or_else(|| panic!("no row for {key} held by {owner} in:\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_lists_every_holder_with_kind_token_and_time_left() {
    let server = RedisServer::start().await;
    let a = tagged(&server, "host-a:101:").await;
    let b = tagged(&server, "host-b:202:").await;
    let job = a
        .lock("job:1")
        .expiry(Duration::from_secs(20))
        .acquire()
        .await
        .unwrap();
    let _p1 = a.semaphore("pool", 3).acquire().await.unwrap();
    let _p2 = b.semaphore("pool", 3).acquire().await.unwrap();
    let _r = b.rw_lock("doc").read().await.unwrap();

    let out = cli(&server.url(), &["ls"], "").await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.starts_with("KEY"), "a header first:\n{table}");
    let cells = row(&table, "job:1", "host-a:101:");
    assert_eq!(cells[1], "mutex");
    assert!(
        cells.contains(&job.fencing_token().to_string().as_str()),
        "{table}"
    );
    let left: f64 = cells.last().unwrap().trim_end_matches('s').parse().unwrap();
    assert!(
        left > 10.0 && left <= 20.0,
        "time left {left} of a 20 s lease"
    );
    row(&table, "pool", "host-a:101:");
    row(&table, "pool", "host-b:202:");
    assert!(table.contains("(2 of 3)"), "permits taken of max:\n{table}");
    assert_eq!(row(&table, "doc", "host-b:202:")[3], "reader");

    let only_jobs = stdout(&cli(&server.url(), &["ls", "job:*"], "").await);
    assert!(
        only_jobs.contains("job:1") && !only_jobs.contains("pool"),
        "{only_jobs}"
    );
    let none = cli(&server.url(), &["ls", "nothing:*"], "").await;
    assert_eq!(
        (code(&none), stdout(&none)),
        (0, "no lock is held\n".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_says_what_inspect_says() {
    let server = RedisServer::start().await;
    let a = tagged(&server, "host-a:101:").await;
    let guard = a.lock("invoice:42").acquire().await.unwrap();

    let out = cli(&server.url(), &["--json", "ls"], "").await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let all: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let lock = &all[0];
    assert_eq!(lock["key"], "invoice:42");
    assert_eq!(lock["kind"], "mutex");
    assert_eq!(lock["fencing_token"], guard.fencing_token());
    assert_eq!(lock["holders"][0]["owner"], "host-a:101:");
    let left = lock["holders"][0]["expires_in_ms"].as_u64().unwrap();
    assert!(left > 0 && left <= 30_000, "{left}");

    let shown: serde_json::Value = serde_json::from_str(&stdout(
        &cli(&server.url(), &["show", "invoice:42", "--json"], "").await,
    ))
    .unwrap();
    assert_eq!(shown["key"], "invoice:42");
    assert_eq!(shown["holders"][0]["owner"], "host-a:101:");
    assert_eq!(shown["fencing_token"], guard.fencing_token());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_details_a_held_lock_and_exits_3_for_a_free_one() {
    let server = RedisServer::start().await;
    let a = tagged(&server, "host-a:101:").await;
    let guard = a.lock("report").acquire().await.unwrap();

    let out = cli(&server.url(), &["show", "report"], "").await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("kind:          mutex"), "{text}");
    assert!(
        text.contains(&format!("fencing token: {}", guard.fencing_token())),
        "{text}"
    );
    assert!(text.contains("host-a:101:  mutex"), "{text}");

    let free = cli(&server.url(), &["show", "other"], "").await;
    assert_eq!(code(&free), 3);
    assert_eq!(stdout(&free), "`other` is not held\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlock_with_yes_releases_says_who_held_it_and_the_holder_is_told() {
    let server = RedisServer::start().await;
    let a = Locker::builder()
        .url(server.url())
        .owner_tag("host-a:101:")
        .expiry(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let guard = a.lock("stuck").acquire().await.unwrap();

    let out = cli(&server.url(), &["unlock", "stuck", "--yes"], "").await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("released `stuck`, held by host-a:101:"),
        "{text}"
    );
    assert!(text.contains(&guard.fencing_token().to_string()), "{text}");
    assert!(
        text.contains("lost signal fires at its next renewal"),
        "{text}"
    );
    assert!(a.inspect("stuck").await.unwrap().is_none());
    // As the output says: the holder learns at its next renewal (a third of
    // its 2 s expiry by default), well within the bound.
    tokio::time::timeout(Duration::from_secs(5), guard.lost())
        .await
        .expect("the holder's lost signal fires");

    let again = cli(&server.url(), &["unlock", "stuck", "--yes"], "").await;
    assert_eq!(code(&again), 3, "nothing left to release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlock_asks_first_and_a_no_keeps_the_lock() {
    let server = RedisServer::start().await;
    let a = tagged(&server, "host-a:101:").await;
    let guard = a.lock("payroll").acquire().await.unwrap();

    for answer in ["n\n", "\n", "maybe\n", ""] {
        let out = cli(&server.url(), &["unlock", "payroll"], answer).await;
        assert_eq!(code(&out), 4, "declined with {answer:?}: {}", stdout(&out));
        assert!(
            stderr(&out).contains("release `payroll`, held by host-a:101:"),
            "{}",
            stderr(&out)
        );
        assert!(stdout(&out).contains("left `payroll` as it is"));
        assert!(!guard.is_lost());
        assert!(a.inspect("payroll").await.unwrap().is_some(), "still held");
    }
    let out = cli(&server.url(), &["unlock", "payroll"], "yes\n").await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(a.inspect("payroll").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_again_when_what_is_held_changes() {
    let server = RedisServer::start().await;
    let a = tagged(&server, "host-a:101:").await;
    let _first = a.lock("first").acquire().await.unwrap();

    let mut child = Command::new(BIN)
        .args([
            "--url",
            &server.url(),
            "watch",
            "--interval",
            "50ms",
            "--count",
            "2",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    // The first table, then nothing new while nothing changes.
    tokio::time::timeout(BOUND, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.starts_with("first");
            seen.push(line);
            if done {
                break;
            }
        }
    })
    .await
    .expect("the first table");
    assert!(seen[0].ends_with("(1 held)"), "{seen:?}");
    let _second = a.lock("second").acquire().await.unwrap();
    tokio::time::timeout(BOUND, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push(line);
        }
    })
    .await
    .expect("the second table, then the end (--count 2)");
    let status = tokio::time::timeout(BOUND, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let text = seen.join("\n");
    assert_eq!(text.matches("KEY").count(), 2, "two tables:\n{text}");
    assert!(
        text.contains("(2 held)") && text.contains("second"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_prefix_option_sees_the_services_locks() {
    let server = RedisServer::start().await;
    let svc = Locker::builder()
        .url(server.url())
        .key_prefix("billing:")
        .build()
        .await
        .unwrap();
    let _g = svc.lock("run").acquire().await.unwrap();

    let default = stdout(&cli(&server.url(), &["ls"], "").await);
    assert_eq!(
        default, "no lock is held\n",
        "another prefix is another namespace"
    );
    let out = cli(&server.url(), &["--key-prefix", "billing:", "ls"], "").await;
    assert!(stdout(&out).contains("run"), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_servers_are_read_as_one() {
    let servers = RedisServer::start_many(3).await;
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let locker = Locker::builder()
        .redlock(urls.clone())
        .owner_tag("host-r:7:")
        .build()
        .await
        .unwrap();
    let guard = locker.lock("ledger").acquire().await.unwrap();

    let mut args = Vec::new();
    for u in &urls {
        args.extend(["--redlock", u.as_str()]);
    }
    args.extend(["show", "ledger"]);
    let out = cli(&urls[0], &args, "").await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("fencing token: {}", guard.fencing_token())));
    assert!(stdout(&out).contains("host-r:7:"), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_exit_1_with_a_clear_message_and_never_a_password() {
    // Nobody listens on a port just freed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for url in [
        format!("redis://app:Zm9v%2FYmFy@127.0.0.1:{port}/0"),
        format!("redis://:hunter2secret@127.0.0.1:{port}"),
    ] {
        let out = cli(&url, &["ls"], "").await;
        assert_eq!(code(&out), 1);
        let err = stderr(&out);
        assert!(err.starts_with("error: redis is unavailable"), "{err}");
        for secret in ["Zm9v", "YmFy", "hunter2secret"] {
            assert!(
                !err.contains(secret) && !stdout(&out).contains(secret),
                "{err}"
            );
        }
    }
    let out = cli(
        "redis://127.0.0.1:6379",
        &["--tls-root-cert", "/nonexistent/ca.pem", "ls"],
        "",
    )
    .await;
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("cannot read --tls-root-cert /nonexistent/ca.pem"),
        "{}",
        stderr(&out)
    );

    let usage = cli("redis://127.0.0.1:6379", &["ls", "--bogus"], "").await;
    assert_eq!(code(&usage), 2, "usage errors are clap's 2");
    let usage = cli("redis://127.0.0.1:6379", &["watch", "--interval", "0s"], "").await;
    assert_eq!(code(&usage), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_shows_who_leads_an_election_and_its_term() {
    let server = RedisServer::start().await;
    let out = cli(&server.url(), &["leader", "scheduler"], "").await;
    assert_eq!(
        (code(&out), stdout(&out)),
        (3, "nobody leads `scheduler`\n".to_owned())
    );

    let locker = Locker::connect(&server.url()).await.unwrap();
    let leadership = locker
        .election("scheduler")
        .campaign("10.0.0.7:8080")
        .await
        .unwrap();
    let out = cli(&server.url(), &["leader", "scheduler"], "").await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "`scheduler` is led by 10.0.0.7:8080 (term {})\n",
            leadership.term()
        )
    );
    let json: serde_json::Value = serde_json::from_str(&stdout(
        &cli(&server.url(), &["--json", "leader", "scheduler"], "").await,
    ))
    .unwrap();
    assert_eq!(json["leader"], "10.0.0.7:8080");
    assert_eq!(json["term"], leadership.term());
}
