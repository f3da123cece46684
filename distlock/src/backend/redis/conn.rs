//! The connections the Redis backend works over: one server's multiplexed
//! connection, or a cluster connection that routes each script to the node
//! owning its keys' slot. Both come from deadpool-redis pools.

use deadpool_redis::cluster::{
    ClusterConnection, Connection as ClusterChecked, Pool as ClusterPool,
};
use deadpool_redis::sentinel::{Connection as SentinelChecked, Pool as SentinelPool};
use deadpool_redis::{Connection as SingleChecked, Pool as SinglePool, PoolError};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// A pool of either kind.
#[derive(Clone)]
pub(crate) enum AnyPool {
    Single(SinglePool),
    Cluster(ClusterPool),
    /// The master that Sentinel names, found again after a failover.
    Sentinel(SentinelPool),
}

/// A connection checked out of the pool (returned to it when dropped).
pub(crate) enum Checked {
    Single(SingleChecked),
    Cluster(ClusterChecked),
    Sentinel(SentinelChecked),
}

/// A cheap clone of a checked-out connection, to send requests on.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl AnyPool {
    pub(crate) async fn get(&self) -> Result<Checked, PoolError> {
        Ok(match self {
            AnyPool::Single(p) => Checked::Single(p.get().await?),
            AnyPool::Cluster(p) => Checked::Cluster(p.get().await?),
            AnyPool::Sentinel(p) => Checked::Sentinel(p.get().await?),
        })
    }

    pub(crate) fn close(&self) {
        match self {
            AnyPool::Single(p) => p.close(),
            AnyPool::Cluster(p) => p.close(),
            AnyPool::Sentinel(p) => p.close(),
        }
    }

    pub(crate) fn size(&self) -> usize {
        match self {
            AnyPool::Single(p) => p.status().size,
            AnyPool::Cluster(p) => p.status().size,
            AnyPool::Sentinel(p) => p.status().size,
        }
    }

    /// Drops every idle pooled connection (they may lead to a demoted master).
    pub(crate) fn drop_idle(&self) {
        match self {
            AnyPool::Single(p) => drop(p.retain(|_, _| false)),
            AnyPool::Cluster(p) => drop(p.retain(|_, _| false)),
            AnyPool::Sentinel(p) => drop(p.retain(|_, _| false)),
        }
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, AnyPool::Cluster(_))
    }
}

impl Checked {
    pub(crate) fn conn(&self) -> Conn {
        match self {
            Checked::Single(c) => Conn::Single((**c).clone()),
            Checked::Cluster(c) => Conn::Cluster((**c).clone()),
            Checked::Sentinel(c) => Conn::Single((**c).clone()),
        }
    }

    /// Drops the connection for good instead of returning it to the pool (whose
    /// recycling check, a PING, would hand a demoted master out again).
    pub(crate) fn discard(self) {
        match self {
            Checked::Single(c) => drop(SingleChecked::take(c)),
            Checked::Cluster(c) => drop(ClusterChecked::take(c)),
            Checked::Sentinel(c) => drop(SentinelChecked::take(c)),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
