//! `LockerBuilder`: every option of a `Locker`, validated in `build()`.

use std::fmt;
use std::time::Duration;

use deadpool_redis::{Manager, Pool, Runtime};
use redis::{AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo};

use crate::backend::memory::MemoryBackend;
use crate::backend::redis::{RedisBackend, RedisSettings};
use crate::backend::redlock::RedlockBackend;
use crate::backend::Backend;
use crate::error::ServerError;
use crate::error::{Error, Result};
use crate::locker::Locker;
use crate::notify::Hub;
use crate::options::LeaseOptions;
use std::sync::Arc;

/// An in-memory lock store: what one Redis server is to several replicas, for
/// lockers in one process. Clones share the store.
///
/// Its methods are test hooks: they do what an operator with `redis-cli`
/// would.
///
/// # Examples
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
/// use distlock::{Locker, MemoryStore};
///
/// let store = MemoryStore::new();
/// let replica_a = Locker::builder().memory_store(store.clone()).build().await?;
/// let replica_b = Locker::builder().memory_store(store.clone()).build().await?;
/// let guard = replica_a.lock("job").acquire().await?;
/// assert!(replica_b.lock("job").try_acquire().await?.is_none());
/// assert!(store.contains("job"));
/// store.delete("job"); // behind the holder's back: it learns at its next renewal
/// # drop(guard);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryStore(MemoryBackend);

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore(MemoryBackend::new())
    }

    /// Deletes the lock on `key` whoever holds it, telling no holder (they learn
    /// at their next renewal, as with `DEL` on Redis). Returns whether it was held.
    pub fn delete(&self, key: &str) -> bool {
        self.0.delete(key)
    }

    /// True if the lock on `key` is held (and not expired).
    pub fn contains(&self, key: &str) -> bool {
        self.0.contains(key)
    }
}

/// The URL used when none is given.
pub(crate) const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// Builds a [`Locker`]. Required data goes in the setters you call; `build()`
/// validates everything and connects.
///
/// | option | default |
/// |---|---|
/// | `url` | `redis://127.0.0.1:6379` |
/// | `host` / `port` / `username` / `password` / `db` | from the URL |
/// | `pool_size` | 16 |
/// | `connections` (kept checked out, multiplexed) | 2 |
/// | `key_prefix` | `distlock:` |
/// | `owner_tag` | `host:pid:` |
/// | `expiry` | 30 s (≥ 100 ms, ≤ 24 h) |
/// | `renew_every` | expiry / 3 (must be shorter than expiry − drift) |
/// | `drift` | 1 % of expiry + 2 ms |
/// | `max_hold` | none |
/// | `retry_backoff` | 50 ms doubling to 1 s, ±25 % jitter |
/// | `op_timeout` (one request) | 2 s |
/// | `connect_timeout` | 3 s |
///
/// # Examples
///
/// ```no_run
/// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
/// use std::time::Duration;
///
/// let locker = distlock::Locker::builder()
///     .host("redis.internal")
///     .port(6380)
///     .username("locks")
///     .password("s3cret")
///     .key_prefix("billing:locks:")
///     .expiry(Duration::from_secs(10))
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[must_use]
pub struct LockerBuilder {
    url: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    username: Option<String>,
    password: Option<String>,
    db: Option<i64>,
    pool: Option<Pool>,
    servers: Vec<String>,
    cluster: Vec<String>,
    sentinel: Option<(Vec<String>, String)>,
    wait_replicas: Option<(u32, Duration)>,
    #[cfg(feature = "tls")]
    tls_root_cert: Option<Vec<u8>>,
    memory: Option<MemoryStore>,
    pool_size: usize,
    connections: usize,
    key_prefix: String,
    owner_tag: Option<String>,
    opts: LeaseOptions,
    op_timeout: Duration,
    connect_timeout: Duration,
}

impl fmt::Debug for LockerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockerBuilder")
            .field("url", &self.url.as_deref().map(redact))
            .field(
                "servers",
                &self.servers.iter().map(|u| redact(u)).collect::<Vec<_>>(),
            )
            .field(
                "cluster",
                &self.cluster.iter().map(|u| redact(u)).collect::<Vec<_>>(),
            )
            .field(
                "sentinel",
                &self
                    .sentinel
                    .as_ref()
                    .map(|(u, m)| (u.iter().map(|u| redact(u)).collect::<Vec<_>>(), m)),
            )
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("db", &self.db)
            .field("memory", &self.memory.is_some())
            .field("pool_size", &self.pool_size)
            .field("connections", &self.connections)
            .field("key_prefix", &self.key_prefix)
            .field("expiry", &self.opts.expiry)
            .finish_non_exhaustive()
    }
}

impl Default for LockerBuilder {
    fn default() -> Self {
        LockerBuilder::new()
    }
}

impl LockerBuilder {
    /// Defaults everywhere (see the table above).
    pub fn new() -> Self {
        LockerBuilder {
            url: None,
            host: None,
            port: None,
            username: None,
            password: None,
            db: None,
            pool: None,
            servers: Vec::new(),
            cluster: Vec::new(),
            sentinel: None,
            wait_replicas: None,
            #[cfg(feature = "tls")]
            tls_root_cert: None,
            memory: None,
            pool_size: 16,
            connections: 2,
            key_prefix: "distlock:".into(),
            owner_tag: None,
            opts: LeaseOptions::default(),
            op_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(3),
        }
    }

    /// The server's URL: `redis://[user:password@]host[:port][/db]`, `rediss://`
    /// for TLS (with the `tls` feature), `unix:///path` for a socket.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }
    /// Redlock: one lock over these independent servers (3 or 5). Every
    /// operation must succeed on a majority; a minority may be down. `username`,
    /// `password` and `db` apply to every server; `host`/`port` may not be used.
    pub fn servers<I, S>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.servers = urls.into_iter().map(Into::into).collect();
        self
    }
    /// Redis Cluster: these are seed nodes (any of its nodes will do; give a
    /// few). Every lock's keys share a hash tag, so each script runs on the one
    /// node owning the lock's slot. `username` and `password` apply to every node.
    pub fn cluster<I, S>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cluster = urls.into_iter().map(Into::into).collect();
        self
    }
    /// Redis Sentinel: `sentinels` are the Sentinels' URLs, `master` the name
    /// they monitor. Commands go to the current master, found again after a
    /// failover; `username`, `password` and `db` apply to the master.
    pub fn sentinel<I, S>(mut self, sentinels: I, master: impl Into<String>) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let urls = sentinels.into_iter().map(Into::into).collect();
        self.sentinel = Some((urls, master.into()));
        self
    }
    /// After every acquire and renewal, wait until `replicas` replicas have
    /// acknowledged the write (`WAIT replicas timeout`); if fewer do in time,
    /// the acquisition is given back and fails with [`Error::Unavailable`] (a
    /// renewal counts as failed). This narrows the window in which a failover
    /// to a replica that never received the lock lets a second owner in; it
    /// does not close it (`WAIT` does not make Redis strongly consistent: a
    /// replica that acknowledged can still lose the write, and a failover can
    /// pick one that did not). It also stalls the connection it runs on.
    pub fn wait_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait_replicas = Some((replicas, timeout));
        self
    }
    /// Trusts this CA certificate (PEM) for `rediss://` connections instead of
    /// the system's roots: for servers with a private CA.
    #[cfg(feature = "tls")]
    pub fn tls_root_cert(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_root_cert = Some(pem.into());
        self
    }
    /// The host (overrides the URL's).
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }
    /// The port (overrides the URL's; default 6379).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }
    /// The ACL user name (overrides the URL's).
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.username = Some(username.into());
        self
    }
    /// The password (overrides the URL's). Never shown by `Debug` or in errors.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }
    /// The database number (overrides the URL's).
    pub fn db(mut self, db: i64) -> Self {
        self.db = Some(db);
        self
    }
    /// Uses this pool for commands. A URL given as well serves the pub/sub
    /// wake-up connection; without one, waiters poll with backoff.
    pub fn pool(mut self, pool: Pool) -> Self {
        self.pool = Some(pool);
        self
    }
    /// Uses a new in-memory backend instead of Redis.
    pub fn memory(self) -> Self {
        self.memory_store(MemoryStore::new())
    }
    /// Uses this in-memory store instead of Redis. Lockers built on clones of one
    /// store contend like replicas sharing one Redis.
    pub fn memory_store(mut self, store: MemoryStore) -> Self {
        self.memory = Some(store);
        self
    }
    /// The pool's maximum size.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }
    /// How many multiplexed connections stay checked out of the pool for
    /// commands (round-robin).
    pub fn connections(mut self, n: usize) -> Self {
        self.connections = n;
        self
    }
    /// The prefix of every key (default `distlock:`).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }
    /// The tag that starts every owner token, so `GET` on a key shows who holds
    /// it (default `host:pid:`). At most 64 bytes.
    pub fn owner_tag(mut self, tag: impl Into<String>) -> Self {
        self.owner_tag = Some(tag.into());
        self
    }
    /// The default lease expiry.
    pub fn expiry(mut self, expiry: Duration) -> Self {
        self.opts.expiry = expiry;
        self
    }
    /// How often held leases are renewed (default: a third of the expiry).
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.opts.renew_every = Some(every);
        self
    }
    /// The clock drift margin: a lease is considered lost locally
    /// `expiry * factor + floor` before the server would expire it.
    pub fn drift(mut self, factor: f64, floor: Duration) -> Self {
        self.opts.drift_factor = factor;
        self.opts.drift_floor = floor;
        self
    }
    /// The default hard limit on holding one lock.
    pub fn max_hold(mut self, max_hold: Duration) -> Self {
        self.opts.max_hold = Some(max_hold);
        self
    }
    /// The retry backoff while waiting: from `min`, doubling, up to `max`.
    pub fn retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.opts.retry_min = min;
        self.opts.retry_max = max;
        self
    }
    /// The longest a single Redis request may take.
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }
    /// The longest connecting may take.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    fn validate(&self) -> Result<()> {
        self.opts.validate()?;
        crate::key::validate_prefix(&self.key_prefix)?;
        if let Some(tag) = &self.owner_tag {
            if tag.len() > 64 || tag.chars().any(char::is_control) {
                return Err(Error::config(
                    "owner_tag must be at most 64 bytes without control characters",
                ));
            }
        }
        if self.pool_size == 0 || self.pool_size > 1024 {
            return Err(Error::config("pool_size must be between 1 and 1024"));
        }
        if self.connections == 0 || self.connections > self.pool_size {
            return Err(Error::config("connections must be between 1 and pool_size"));
        }
        for (name, d) in [
            ("op_timeout", self.op_timeout),
            ("connect_timeout", self.connect_timeout),
        ] {
            if d.is_zero() || d > Duration::from_secs(300) {
                return Err(Error::config(format!("{name} must be between 1ms and 5m")));
            }
        }
        Ok(())
    }

    fn finish(self, backend: Backend, description: String) -> Locker {
        let owner_tag = self
            .owner_tag
            .unwrap_or_else(crate::token::default_owner_tag);
        Locker::from_parts(backend, self.opts, self.key_prefix, owner_tag, description)
    }

    /// Builds a memory locker without awaiting (for [`Locker::memory`]).
    pub(crate) fn build_now(mut self) -> Locker {
        let store = self.memory.take().unwrap_or_default();
        self.finish(Backend::Memory(store.0), "memory".into())
    }

    /// Validates the options, connects, and checks that the server answers
    /// (one connection is checked out and pinged).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid option or URL, [`Error::Unavailable`] if
    /// the server cannot be reached within the connect timeout, [`Error::Auth`]
    /// if it refuses the credentials.
    pub async fn build(self) -> Result<Locker> {
        self.validate()?;
        if self.memory.is_some() {
            return Ok(self.build_now());
        }
        let settings = RedisSettings {
            connections: self.connections,
            op_timeout: self.op_timeout,
            connect_timeout: self.connect_timeout,
            wait_replicas: self.wait_replicas,
            lease_expiry: self.opts.expiry,
            owns_pool: self.pool.is_none(),
        };
        if !self.servers.is_empty() && !self.cluster.is_empty() {
            return Err(Error::config(
                "servers(...) and cluster(...) cannot be combined",
            ));
        }
        if !self.servers.is_empty() {
            return self.build_redlock(settings).await;
        }
        if !self.cluster.is_empty() {
            return self.build_cluster(settings).await;
        }
        if self.sentinel.is_some() {
            return self.build_sentinel(settings).await;
        }
        let have_address = self.url.is_some() || self.host.is_some() || self.port.is_some();
        let (pool, pubsub, description) = match &self.pool {
            Some(pool) => {
                let pubsub = if have_address {
                    Some(
                        redis::Client::open(self.connection_info(self.url.as_deref())?)
                            .map_err(|e| Error::from_redis("client", e))?,
                    )
                } else {
                    None
                };
                (pool.clone(), pubsub, "redis (pool)".to_owned())
            }
            None => {
                let info = self.connection_info(self.url.as_deref())?;
                let description = format!("redis {}", describe(&info));
                let (pool, client) = self.pool_for(info)?;
                (pool, Some(client), description)
            }
        };
        let backend = RedisBackend::new(pool, pubsub, settings);
        if let Err(e) = backend.verify().await {
            backend.shutdown();
            return Err(e);
        }
        Ok(self.finish(Backend::Redis(backend), description))
    }

    /// The pool settings every topology shares: size, runtime, timeouts.
    fn configure_pool<M, W>(
        &self,
        builder: deadpool::managed::PoolBuilder<M, W>,
    ) -> Result<deadpool::managed::Pool<M, W>>
    where
        M: deadpool::managed::Manager,
        W: From<deadpool::managed::Object<M>>,
    {
        builder
            .max_size(self.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(self.connect_timeout))
            .create_timeout(Some(self.connect_timeout))
            .recycle_timeout(Some(self.op_timeout))
            .build()
            .map_err(|e| Error::config(format!("connection pool: {e}")))
    }

    /// A pool (and a client for pub/sub) for one server.
    fn pool_for(&self, info: ConnectionInfo) -> Result<(Pool, redis::Client)> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.op_timeout));
        let manager = Manager::new_with_config(info.clone(), config)
            .map_err(|e| Error::from_redis("client", e))?;
        let pool = self.configure_pool(Pool::builder(manager))?;
        let client = redis::Client::open(info).map_err(|e| Error::from_redis("client", e))?;
        Ok((pool, client))
    }

    /// The master that Sentinel names.
    async fn build_sentinel(mut self, settings: RedisSettings) -> Result<Locker> {
        let Some((urls, master)) = self.sentinel.take() else {
            return Err(Error::config("no sentinels given"));
        };
        if urls.is_empty() || master.is_empty() {
            return Err(Error::config(
                "sentinel(...) needs at least one URL and a master name",
            ));
        }
        if self.pool.is_some() || self.url.is_some() {
            return Err(Error::config(
                "sentinel(...) cannot be combined with url(...) or pool(...)",
            ));
        }
        let sentinels = urls
            .iter()
            .map(|u| parse_url(u))
            .collect::<Result<Vec<_>>>()?;
        let node = deadpool_redis::RedisConnectionInfo {
            db: self.db.unwrap_or(0),
            username: self.username.clone(),
            password: self.password.clone(),
            protocol: deadpool_redis::ProtocolVersion::RESP2,
        };
        let node_info = deadpool_redis::sentinel::SentinelNodeConnectionInfo {
            tls_mode: None,
            redis_connection_info: Some(node.clone()),
        };
        let manager = deadpool_redis::sentinel::Manager::new(
            sentinels.clone(),
            master.clone(),
            Some(node_info.clone()),
            deadpool_redis::sentinel::SentinelServerType::Master,
        )
        .map_err(|e| Error::from_redis("sentinel client", e))?;
        let pool = self.configure_pool(deadpool_redis::sentinel::Pool::builder(manager))?;
        let client = || {
            redis::sentinel::SentinelClient::build(
                sentinels.clone(),
                master.clone(),
                Some(node_info.clone().into()),
                redis::sentinel::SentinelServerType::Master,
            )
            .map_err(|e| Error::from_redis("sentinel client", e))
        };
        let backend = RedisBackend::sentinel(pool, client()?, client()?, master.clone(), settings);
        if let Err(e) = backend.verify().await {
            backend.shutdown();
            return Err(e);
        }
        let description = format!("redis via sentinel (master `{master}`)");
        Ok(self.finish(Backend::Redis(backend), description))
    }

    /// A cluster from its seed nodes.
    async fn build_cluster(self, settings: RedisSettings) -> Result<Locker> {
        if self.pool.is_some() || self.url.is_some() {
            return Err(Error::config(
                "cluster(...) cannot be combined with url(...) or pool(...)",
            ));
        }
        if self.db.is_some_and(|db| db != 0) {
            return Err(Error::config("Redis Cluster has only database 0"));
        }
        let infos = self
            .cluster
            .iter()
            .map(|u| self.connection_info(Some(u)))
            .collect::<Result<Vec<_>>>()?;
        let manager = deadpool_redis::cluster::Manager::new(infos.clone(), false)
            .map_err(|e| Error::from_redis("cluster client", e))?;
        let pool = self.configure_pool(deadpool_redis::cluster::Pool::builder(manager))?;
        let nodes = infos
            .into_iter()
            .map(|i| redis::Client::open(i).map_err(|e| Error::from_redis("client", e)))
            .collect::<Result<Vec<_>>>()?;
        let backend = RedisBackend::cluster(pool, nodes, settings);
        if let Err(e) = backend.verify().await {
            backend.shutdown();
            return Err(e);
        }
        let description = format!("redis cluster ({} seed nodes)", self.cluster.len());
        Ok(self.finish(Backend::Redis(backend), description))
    }

    /// Redlock over `servers`: a pool and a pub/sub connection per server, all
    /// feeding one hub. Up to a minority of servers may be down at start; two
    /// URLs that reach the same server (same `run_id`) are a configuration error.
    async fn build_redlock(self, settings: RedisSettings) -> Result<Locker> {
        let n = self.servers.len();
        if n < 2 {
            return Err(Error::config(
                "Redlock needs at least 2 servers (3 or 5 to survive failures)",
            ));
        }
        if self.pool.is_some() || self.url.is_some() {
            return Err(Error::config(
                "servers(...) cannot be combined with url(...) or pool(...)",
            ));
        }
        let quorum = n / 2 + 1;
        let (hub, feeds) = Hub::remote(n, quorum);
        let mut servers = Vec::with_capacity(n);
        for (url, feed) in self.servers.iter().zip(feeds) {
            let (pool, client) = self.pool_for(self.connection_info(Some(url))?)?;
            let backend =
                RedisBackend::member(pool, client, feed, Arc::clone(&hub), settings.clone());
            servers.push((redact(url), backend));
        }
        let checks = futures_util::future::join_all(servers.iter().map(|(_, b)| b.verify())).await;
        let shutdown = |servers: &[(String, RedisBackend)]| {
            for (_, b) in servers {
                b.shutdown();
            }
        };
        let mut seen: Vec<(String, &str)> = Vec::new();
        let mut causes = Vec::new();
        for ((name, _), check) in servers.iter().zip(checks) {
            match check {
                Ok(Some(run_id)) => {
                    if let Some((other, _)) = seen.iter().find(|(id, _)| *id == run_id) {
                        let msg = format!(
                            "`{other}` and `{name}` reach the same Redis server: Redlock needs independent servers"
                        );
                        shutdown(&servers);
                        return Err(Error::config(msg));
                    }
                    seen.push((run_id, name));
                }
                Ok(None) => {}
                Err(e @ (Error::Auth { .. } | Error::Config(_))) => {
                    shutdown(&servers);
                    return Err(e);
                }
                Err(error) => causes.push(ServerError {
                    server: name.clone(),
                    error,
                }),
            }
        }
        if causes.len() > n - quorum {
            shutdown(&servers);
            return Err(Error::Quorum {
                succeeded: n - causes.len(),
                needed: quorum,
                causes,
            });
        }
        for c in &causes {
            tracing::warn!(server = %c.server, error = %c.error, "redlock server unavailable at start");
        }
        let description = format!("redlock over {n} servers");
        Ok(self.finish(
            Backend::Redlock(RedlockBackend::new(servers, hub)),
            description,
        ))
    }

    /// The connection info from a URL (or the default) and the separate settings.
    fn connection_info(&self, url: Option<&str>) -> Result<ConnectionInfo> {
        let mut info = match url {
            Some(url) => parse_url(url)?,
            None => ConnectionAddr::Tcp(
                self.host.clone().unwrap_or_else(|| "127.0.0.1".into()),
                self.port.unwrap_or(6379),
            )
            .into_connection_info()
            .map_err(|e| Error::config(format!("invalid address: {e}")))?,
        };
        if url.is_some() && (self.host.is_some() || self.port.is_some()) {
            let (host, port) = match info.addr() {
                ConnectionAddr::Tcp(h, p) => (h.clone(), *p),
                ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port),
                _ => return Err(Error::config("host/port can only override a TCP URL")),
            };
            let host = self.host.clone().unwrap_or(host);
            let port = self.port.unwrap_or(port);
            let addr = match info.addr() {
                ConnectionAddr::TcpTls {
                    insecure,
                    tls_params,
                    ..
                } => ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: *insecure,
                    tls_params: tls_params.clone(),
                },
                _ => ConnectionAddr::Tcp(host, port),
            };
            info = info.set_addr(addr);
        }
        let mut redis = info.redis_settings().clone();
        if let Some(u) = &self.username {
            redis = redis.set_username(u);
        }
        if let Some(p) = &self.password {
            redis = redis.set_password(p);
        }
        if let Some(db) = self.db {
            if db < 0 {
                return Err(Error::config("db must not be negative"));
            }
            redis = redis.set_db(db);
        }
        let info = info.set_redis_settings(redis);
        #[cfg(feature = "tls")]
        if let Some(pem) = &self.tls_root_cert {
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            };
            let client = redis::Client::build_with_tls(info, certs)
                .map_err(|e| Error::config(format!("TLS root certificate: {e}")))?;
            return Ok(client.get_connection_info().clone());
        }
        Ok(info)
    }
}

/// Parses a URL without ever echoing its password.
fn parse_url(url: &str) -> Result<ConnectionInfo> {
    let scheme = url.split_once("://").map(|(s, _)| s);
    match scheme {
        Some("redis" | "rediss" | "unix" | "redis+unix" | "valkey" | "valkeys") => {}
        Some(other) => {
            return Err(Error::config(format!(
                "unsupported URL scheme `{other}` in `{}`: use redis://, rediss:// or unix://",
                redact(url)
            )))
        }
        None => {
            return Err(Error::config(format!(
                "malformed redis URL `{}`: expected redis://host:port",
                redact(url)
            )))
        }
    }
    url.into_connection_info().map_err(|e| {
        let detail =
            if e.kind() == redis::ErrorKind::InvalidClientConfig && scheme == Some("rediss") {
                "TLS support is not compiled in (enable the `tls` feature)".to_owned()
            } else {
                e.detail().unwrap_or("could not parse it").to_owned()
            };
        Error::config(format!("malformed redis URL `{}`: {detail}", redact(url)))
    })
}

/// A URL with its password replaced.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:<redacted>@{host}{path}")
        }
        None => url.to_owned(),
    }
}

fn describe(info: &ConnectionInfo) -> String {
    match info.addr() {
        ConnectionAddr::Tcp(h, p) => format!("{h}:{p}"),
        ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port} (tls)"),
        ConnectionAddr::Unix(path) => path.display().to_string(),
        _ => "redis".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://user:hunter2@host:1/0"),
            "redis://user:<redacted>@host:1/0"
        );
        assert_eq!(redact("redis://:hunter2@host"), "redis://:<redacted>@host");
        assert_eq!(redact("redis://host:1"), "redis://host:1");
        let b = LockerBuilder::new()
            .url("redis://u:hunter2@h:1")
            .password("hunter3");
        let dbg = format!("{b:?}");
        assert!(!dbg.contains("hunter"), "{dbg}");
    }

    #[test]
    fn malformed_urls_are_config_errors_without_the_password() {
        for url in ["not a url", "http://h:1", "redis://:hunter2@h:notaport"] {
            let e = parse_url(url).unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{url}: {e:?}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[tokio::test]
    async fn invalid_options_fail_at_build() {
        let cases = [
            LockerBuilder::new()
                .memory()
                .expiry(Duration::from_millis(50)),
            LockerBuilder::new()
                .memory()
                .expiry(Duration::from_secs(1))
                .renew_every(Duration::from_secs(1)),
            LockerBuilder::new().memory().key_prefix("a{b"),
            LockerBuilder::new().memory().pool_size(0),
            LockerBuilder::new().memory().connections(100),
            LockerBuilder::new().memory().op_timeout(Duration::ZERO),
        ];
        for b in cases {
            let dbg = format!("{b:?}");
            assert!(matches!(b.build().await, Err(Error::Config(_))), "{dbg}");
        }
    }
}
