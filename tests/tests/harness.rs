//! Tests of the harness itself: [`RedisServer`] and [`FaultProxy`].

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use distlock_tests::RedisServer;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisResult};
use tokio::time::timeout;

/// Connects to `url` with the given response timeout (`None`: wait forever).
async fn connect(
    url: &str,
    response_timeout: Option<Duration>,
) -> RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(response_timeout);
    redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

async fn ping(conn: &mut MultiplexedConnection) -> RedisResult<String> {
    redis::cmd("PING").query_async(conn).await
}

#[tokio::test]
async fn start_set_get_kill_restart() {
    let mut server = RedisServer::start().await;
    let port = server.port();
    assert_eq!(server.url(), format!("redis://127.0.0.1:{port}"));
    assert_eq!(server.addr().port(), port);
    assert!(server.is_running());
    assert!(server.pid().is_some());

    let mut conn = server.conn().await;
    let () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(server.get("k").await.as_deref(), Some("v"));
    assert!(server.exists("k").await);
    assert!((1..=60_000).contains(&server.pttl("k").await));
    assert_eq!(server.keys("*").await, ["k"]);
    assert_eq!(server.dbsize().await, 1);

    server.kill();
    assert!(!server.is_running());
    assert_eq!(server.pid(), None);
    let err = connect(&server.url(), None).await.unwrap_err();
    assert!(
        err.is_connection_refusal(),
        "expected a refused connection, got {err}"
    );

    server.restart().await;
    assert_eq!(server.port(), port, "restart must keep the port");
    assert!(server.is_running());
    assert_eq!(server.dbsize().await, 0, "a restarted server starts empty");
    assert_eq!(server.get("k").await, None);
    server.set("k", "v2").await;
    assert_eq!(server.get("k").await.as_deref(), Some("v2"));
    assert!(server.del("k").await);
    assert!(!server.del("k").await);
    assert_eq!(server.pttl("k").await, -2);
}

#[tokio::test]
async fn restart_while_running_replaces_the_process() {
    let mut server = RedisServer::start().await;
    let first = server.pid().unwrap();
    server.set("k", "v").await;
    server.restart().await;
    assert_ne!(server.pid(), Some(first));
    assert!(
        !Path::new(&format!("/proc/{first}")).exists(),
        "the old process is gone"
    );
    assert_eq!(server.dbsize().await, 0);
}

#[tokio::test]
async fn pause_and_resume() {
    let server = RedisServer::start().await;
    let mut conn = connect(&server.url(), None).await.unwrap();
    assert_eq!(ping(&mut conn).await.unwrap(), "PONG");

    server.pause();
    assert!(server.is_running(), "a paused server is still running");
    let started = Instant::now();
    assert!(
        timeout(Duration::from_millis(300), ping(&mut conn))
            .await
            .is_err(),
        "a paused server must not answer"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));

    server.resume();
    let pong = timeout(Duration::from_secs(5), ping(&mut conn))
        .await
        .unwrap();
    assert_eq!(pong.unwrap(), "PONG");
    assert_eq!(server.dbsize().await, 0);
}

#[tokio::test]
async fn stop_is_graceful_and_drop_kills_a_paused_server() {
    let mut server = RedisServer::start().await;
    server.stop().await;
    assert!(!server.is_running());
    assert!(connect(&server.url(), None).await.is_err());

    let server = RedisServer::start().await;
    let pid = server.pid().unwrap();
    server.pause();
    drop(server);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "drop must kill and reap the server"
    );
}

#[tokio::test]
async fn password_is_required() {
    let server = RedisServer::builder().password("s3cret").start().await;
    assert_eq!(
        server.url(),
        format!("redis://:s3cret@127.0.0.1:{}", server.port())
    );

    let anonymous = format!("redis://{}", server.addr());
    let result: RedisResult<Option<String>> =
        match connect(&anonymous, Some(Duration::from_secs(5))).await {
            Ok(mut conn) => redis::cmd("GET").arg("k").query_async(&mut conn).await,
            Err(e) => Err(e),
        };
    let err = result.unwrap_err();
    assert!(
        err.code() == Some("NOAUTH") || err.kind() == redis::ErrorKind::AuthenticationFailed,
        "expected an authentication error, got {err}"
    );

    server.set("k", "v").await;
    assert_eq!(server.get("k").await.as_deref(), Some("v"));
}

#[tokio::test]
async fn extra_args_reach_the_server() {
    let server = RedisServer::builder()
        .config("maxmemory", "1mb")
        .args(["--maxmemory-policy", "noeviction"])
        .args(["--user", "alice", "on", ">pw", "~*", "+@all"])
        .start()
        .await;
    let mut conn = server.conn().await;
    let maxmemory: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(maxmemory, ["maxmemory", "1048576"]);
    let mut alice = connect(&format!("redis://alice:pw@{}", server.addr()), None)
        .await
        .unwrap();
    let who: String = redis::cmd("ACL")
        .arg("WHOAMI")
        .query_async(&mut alice)
        .await
        .unwrap();
    assert_eq!(who, "alice");
}

#[tokio::test]
async fn start_many_gives_independent_servers() {
    let servers = RedisServer::start_many(3).await;
    let mut ports: Vec<u16> = servers.iter().map(RedisServer::port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 3);
    servers[0].set("only-on-0", "x").await;
    assert!(servers[0].exists("only-on-0").await);
    assert!(!servers[1].exists("only-on-0").await);
    assert!(!servers[2].exists("only-on-0").await);
}

#[tokio::test]
#[should_panic(expected = "Bad directive")]
async fn a_bad_config_panics_with_the_server_output() {
    RedisServer::builder()
        .config("no-such-directive", "1")
        .start()
        .await;
}

#[tokio::test]
async fn restart_waits_while_the_port_is_busy() {
    let mut server = RedisServer::start().await;
    server.kill();
    let blocker = std::net::TcpListener::bind(server.addr()).unwrap();
    let hold = Duration::from_millis(300);
    let release = tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        drop(blocker);
    });
    let started = Instant::now();
    server.restart().await;
    assert!(
        started.elapsed() >= hold,
        "restart cannot succeed while the port is held"
    );
    release.await.unwrap();
    server.set("k", "v").await;
    assert_eq!(server.get("k").await.as_deref(), Some("v"));
}
