//! A master, one replica and one Sentinel watching them, for failover tests.

use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::server::free_port;
use crate::RedisServer;

/// The name the Sentinel monitors.
pub const MASTER_NAME: &str = "distlock-master";

/// A master, a replica of it, and a Sentinel (quorum 1) watching them.
/// Dropping it kills all three.
#[derive(Debug)]
pub struct RedisSentinel {
    master: RedisServer,
    replica: RedisServer,
    sentinel: Child,
    port: u16,
    _dir: TempDir,
}

impl RedisSentinel {
    /// Starts the three and waits (bounded) until the replica is in sync and the
    /// Sentinel knows both.
    pub async fn start() -> RedisSentinel {
        let master = RedisServer::start().await;
        let replica = RedisServer::builder()
            .arg("--replicaof")
            .arg("127.0.0.1")
            .arg(master.port().to_string())
            .start()
            .await;
        wait_until(Duration::from_secs(20), "the replica to sync", || async {
            info(&replica, "replication")
                .await
                .contains("master_link_status:up")
        })
        .await;
        let dir = tempfile::Builder::new()
            .prefix("distlock-sentinel-")
            .tempdir()
            .unwrap_or_else(|e| panic!("temp dir for the sentinel: {e}"));
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor {MASTER_NAME} 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 3000\n",
                master.port()
            ),
        )
        .unwrap_or_else(|e| panic!("writing sentinel.conf: {e}"));
        let port = free_port();
        let sentinel = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(dir.path().join("sentinel.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting redis-server --sentinel: {e}"));
        let s = RedisSentinel {
            master,
            replica,
            sentinel,
            port,
            _dir: dir,
        };
        wait_until(
            Duration::from_secs(20),
            "the sentinel to see the replica",
            || async {
                s.sentinel_query(&["SENTINEL", "REPLICAS", MASTER_NAME])
                    .await
                    .is_some_and(|v| v.contains(&s.replica.port().to_string()))
            },
        )
        .await;
        s
    }

    /// The Sentinel's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The first master.
    pub fn master(&self) -> &RedisServer {
        &self.master
    }

    /// The first replica (the master after a failover).
    pub fn replica(&self) -> &RedisServer {
        &self.replica
    }

    /// Forces a failover and waits until the replica is the master and the
    /// Sentinel names it. (The old master may go on accepting writes until the
    /// Sentinel demotes it, which can take seconds.)
    pub async fn failover(&self) {
        // A Sentinel that has not yet seen the replica healthy answers
        // NOGOODSLAVE: ask again until it accepts.
        wait_until(
            Duration::from_secs(20),
            "SENTINEL FAILOVER to be accepted",
            || async {
                self.sentinel_query(&["SENTINEL", "FAILOVER", MASTER_NAME])
                    .await
                    .is_some()
            },
        )
        .await;
        let port = self.replica.port().to_string();
        wait_until(Duration::from_secs(30), "the failover", || async {
            let named = self
                .sentinel_query(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME])
                .await
                .is_some_and(|v| v.contains(&port));
            named
                && info(&self.replica, "replication")
                    .await
                    .contains("role:master")
        })
        .await;
    }

    /// Sends a command to the Sentinel; its reply as debug text, or `None` on error.
    async fn sentinel_query(&self, args: &[&str]) -> Option<String> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let v: redis::Value = cmd.query_async(&mut conn).await.ok()?;
        Some(format!("{v:?}"))
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        let _ = self.sentinel.start_kill();
    }
}

async fn info(server: &RedisServer, section: &str) -> String {
    let mut conn = server.conn().await;
    redis::cmd("INFO")
        .arg(section)
        .query_async(&mut conn)
        .await
        .unwrap_or_default()
}

async fn wait_until<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
