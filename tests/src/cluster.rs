//! A real Redis Cluster of three masters, made with `redis-cli --cluster create`.

use std::time::Duration;

use tokio::time::Instant;

use crate::RedisServer;

/// Three `redis-server --cluster-enabled yes` nodes on free ports, joined into
/// one cluster with every slot covered. Dropping it kills the nodes.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three masters, creates the cluster, and waits (bounded) until every
    /// node reports `cluster_state:ok`.
    pub async fn start() -> RedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let node = RedisServer::builder()
                .config("cluster-enabled", "yes")
                .config("cluster-config-file", "nodes.conf")
                .config("cluster-node-timeout", "2000")
                .start()
                .await;
            nodes.push(node);
        }
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr().to_string()).collect();
        let out = tokio::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .await
            .unwrap_or_else(|e| panic!("running redis-cli --cluster create: {e}"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_ok(Duration::from_secs(20)).await;
        cluster
    }

    /// Waits until every node says `cluster_state:ok`.
    async fn wait_ok(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            let mut ok = true;
            for n in &self.nodes {
                let mut c = n.conn().await;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut c)
                    .await
                    .unwrap_or_default();
                ok &= info.contains("cluster_state:ok");
            }
            if ok {
                return;
            }
            assert!(start.elapsed() < limit, "cluster not ok within {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The nodes' URLs (any is a valid seed).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// A cluster-aware client connection, for assertions.
    pub async fn conn(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(self.urls())
            .unwrap_or_else(|e| panic!("cluster client: {e}"))
            .get_async_connection()
            .await
            .unwrap_or_else(|e| panic!("cluster connection: {e}"))
    }
}
