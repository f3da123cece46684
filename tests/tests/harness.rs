//! Tests of the harness itself: [`RedisServer`] and [`FaultProxy`], on the
//! private `redis-server` processes they start.
//!
//! [`RedisServer`]: distlock_tests::RedisServer
//! [`FaultProxy`]: distlock_tests::FaultProxy

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use distlock_tests::{FaultProxy, RedisServer};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisResult};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Polls `check` until it holds, panicking after `limit`.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

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

/// Writes raw RESP and reads until `expected` arrived (at most 5 s).
async fn roundtrip(stream: &mut TcpStream, request: &[u8], expected: &[u8]) {
    stream.write_all(request).await.unwrap();
    let mut reply = vec![0; expected.len()];
    timeout(Duration::from_secs(5), stream.read_exact(&mut reply))
        .await
        .expect("no reply within 5 s")
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&reply),
        String::from_utf8_lossy(expected)
    );
}

const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";
const PONG: &[u8] = b"+PONG\r\n";

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

#[tokio::test]
async fn proxy_forwards_large_values_intact() {
    let server = RedisServer::start().await;
    let proxy = FaultProxy::start(server.addr()).await;
    assert_eq!(
        proxy.url(),
        format!("redis://127.0.0.1:{}", proxy.addr().port())
    );
    assert_eq!(proxy.connections(), 0);

    let mut conn = connect(&proxy.url(), Some(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(ping(&mut conn).await.unwrap(), "PONG");
    assert_eq!(proxy.connections(), 1);

    // Far more than one chunk each way: a lost or swapped chunk changes it.
    let value = (0..200_000)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let () = redis::cmd("SET")
        .arg("big")
        .arg(&value)
        .query_async(&mut conn)
        .await
        .unwrap();
    let back: String = redis::cmd("GET")
        .arg("big")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        back == value,
        "the value came back altered through the proxy"
    );
    assert!(server.get("big").await.as_deref() == Some(value.as_str()));

    drop(conn);
    let proxy = &proxy;
    eventually(
        "the proxy sees the connection close",
        Duration::from_secs(5),
        || async move { proxy.connections() == 0 },
    )
    .await;
}

#[tokio::test]
async fn latency_delays_both_directions_without_reordering() {
    let server = RedisServer::start().await;
    let proxy = FaultProxy::start(server.addr()).await;
    let mut conn = connect(&proxy.url(), Some(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(ping(&mut conn).await.unwrap(), "PONG");

    proxy.set_latency(Duration::from_millis(200));
    let started = Instant::now();
    assert_eq!(ping(&mut conn).await.unwrap(), "PONG");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "200 ms each way, yet PING took {took:?}"
    );

    // Many small writes while the latency flips between 50 ms and none:
    // the replies must come back complete and in order.
    let mut raw = TcpStream::connect(proxy.addr()).await.unwrap();
    raw.set_nodelay(true).unwrap();
    let count = 200;
    for i in 0..count {
        if i % 20 == 0 {
            let ms = if (i / 20) % 2 == 0 { 50 } else { 0 };
            proxy.set_latency(Duration::from_millis(ms));
        }
        raw.write_all(b"*2\r\n$4\r\nINCR\r\n$3\r\nctr\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await; // Spread over many chunks.
    }
    let expected: String = (1..=count).map(|n| format!(":{n}\r\n")).collect();
    let mut replies = vec![0; expected.len()];
    timeout(Duration::from_secs(10), raw.read_exact(&mut replies))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&replies), expected);

    proxy.restore();
    assert_eq!(ping(&mut conn).await.unwrap(), "PONG");
}

#[tokio::test]
async fn blackhole_holds_traffic_until_restore() {
    let server = RedisServer::start().await;
    let proxy = FaultProxy::start(server.addr()).await;
    let mut conn = connect(&proxy.url(), None).await.unwrap();
    assert_eq!(ping(&mut conn).await.unwrap(), "PONG");
    let mut raw = TcpStream::connect(proxy.addr()).await.unwrap();
    roundtrip(&mut raw, PING, PONG).await;

    proxy.blackhole();
    assert!(
        timeout(Duration::from_millis(300), ping(&mut conn))
            .await
            .is_err(),
        "a request through a blackhole must not be answered"
    );
    assert!(
        timeout(Duration::from_millis(300), connect(&proxy.url(), None))
            .await
            .is_err(),
        "a new connection must not complete its handshake through a blackhole"
    );
    raw.write_all(b"*3\r\n$3\r\nSET\r\n$4\r\nheld\r\n$1\r\nx\r\n")
        .await
        .unwrap();
    let mut byte = [0; 1];
    assert!(timeout(Duration::from_millis(300), raw.read(&mut byte))
        .await
        .is_err());
    assert!(
        !server.exists("held").await,
        "the blackhole let the SET through"
    );
    assert_eq!(proxy.connections(), 3, "a blackhole keeps connections open");

    proxy.restore();
    let pong = timeout(Duration::from_secs(5), ping(&mut conn))
        .await
        .unwrap();
    assert_eq!(pong.unwrap(), "PONG");
    let mut reply = [0; 5];
    timeout(Duration::from_secs(5), raw.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&reply, b"+OK\r\n", "held bytes are delivered after restore");
    assert!(server.exists("held").await);
    let mut fresh = connect(&proxy.url(), Some(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(ping(&mut fresh).await.unwrap(), "PONG");
}

#[tokio::test]
async fn reset_all_breaks_open_connections_only() {
    let server = RedisServer::start().await;
    let proxy = FaultProxy::start(server.addr()).await;
    let mut conn = connect(&proxy.url(), Some(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(ping(&mut conn).await.unwrap(), "PONG");
    let mut raw = TcpStream::connect(proxy.addr()).await.unwrap();
    roundtrip(&mut raw, PING, PONG).await;
    assert_eq!(proxy.connections(), 2);

    proxy.reset_all();
    let err = ping(&mut conn).await.unwrap_err();
    assert!(
        err.is_io_error() || err.is_connection_dropped(),
        "expected a connection error, got {err}"
    );
    let mut byte = [0; 1];
    let read = timeout(Duration::from_secs(5), raw.read(&mut byte))
        .await
        .unwrap();
    let err = read.unwrap_err();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset,
        "expected RST, got {err}"
    );
    let proxy = &proxy;
    eventually(
        "reset connections are closed",
        Duration::from_secs(5),
        || async move { proxy.connections() == 0 },
    )
    .await;

    let mut fresh = connect(&proxy.url(), Some(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(ping(&mut fresh).await.unwrap(), "PONG");
    assert_eq!(proxy.connections(), 1);
}

#[tokio::test]
async fn proxy_to_a_dead_target_refuses_and_drop_closes_everything() {
    let mut server = RedisServer::start().await;
    let proxy = FaultProxy::start(server.addr()).await;
    let mut raw = TcpStream::connect(proxy.addr()).await.unwrap();
    roundtrip(&mut raw, PING, PONG).await;

    let addr = proxy.addr();
    drop(proxy);
    let mut byte = [0; 1];
    let read = timeout(Duration::from_secs(5), raw.read(&mut byte))
        .await
        .unwrap();
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the connection must close, read {read:?}"
    );
    eventually(
        "the listener closes",
        Duration::from_secs(5),
        || async move { TcpStream::connect(addr).await.is_err() },
    )
    .await;

    let proxy = FaultProxy::start(server.addr()).await;
    server.kill();
    assert!(connect(&proxy.url(), Some(Duration::from_secs(5)))
        .await
        .is_err());
    let proxy = &proxy;
    eventually(
        "the failed connection is closed",
        Duration::from_secs(5),
        || async move { proxy.connections() == 0 },
    )
    .await;
}
