//! Connecting: the wiring of the four topologies (one server, Sentinel,
//! Cluster, Redlock) from plain connection options, URL parsing and
//! credentials, and the checks a new backend passes before it serves (the
//! server answers, the credentials work, the eviction policy); a backend that
//! fails them, or whose `build()` is dropped, is shut down ([`Starting`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::{Manager, Pool, Runtime};
use redis::{AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo};

use super::redis::{RedisBackend, RedisSettings};
use super::redlock::RedlockBackend;
use super::Backend;
use crate::error::{Chain, Error, Result, ServerError};
use crate::notify::Hub;
use crate::redis_url::{parse as parse_url, redact};

/// Where and how to connect: the connection options of a
/// [`LockerBuilder`](crate::LockerBuilder), validated there.
#[derive(Clone)]
pub(crate) struct ConnectOptions {
    pub(crate) url: Option<String>,
    pub(crate) host: Option<String>,
    pub(crate) port: Option<u16>,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) db: Option<i64>,
    pub(crate) pool: Option<Pool>,
    pub(crate) servers: Vec<String>,
    pub(crate) cluster: Vec<String>,
    pub(crate) sentinel: Option<(Vec<String>, String)>,
    pub(crate) wait_replicas: Option<(u32, Duration)>,
    pub(crate) require_noeviction: bool,
    #[cfg(feature = "tls")]
    pub(crate) tls_root_cert: Option<Vec<u8>>,
    pub(crate) pool_size: usize,
    pub(crate) connections: usize,
    pub(crate) op_timeout: Duration,
    pub(crate) connect_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
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
            require_noeviction: false,
            #[cfg(feature = "tls")]
            tls_root_cert: None,
            pool_size: 16,
            connections: 2,
            op_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

impl fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |urls: &[String]| urls.iter().map(|u| redact(u)).collect::<Vec<_>>();
        f.debug_struct("ConnectOptions")
            .field("url", &self.url.as_deref().map(redact))
            .field("servers", &redacted(&self.servers))
            .field("cluster", &redacted(&self.cluster))
            .field(
                "sentinel",
                &self.sentinel.as_ref().map(|(u, m)| (redacted(u), m)),
            )
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("db", &self.db)
            .field("require_noeviction", &self.require_noeviction)
            .field("pool_size", &self.pool_size)
            .field("connections", &self.connections)
            .finish_non_exhaustive()
    }
}

impl ConnectOptions {
    /// Connects to the topology these options name and checks it (see
    /// [`verified`](Self::verified)). Returns the backend and a description
    /// of it without credentials.
    pub(crate) async fn connect(
        self,
        key_prefix: &str,
        lease_expiry: Duration,
    ) -> Result<(Backend, String)> {
        let settings = RedisSettings {
            connections: self.connections,
            op_timeout: self.op_timeout,
            connect_timeout: self.connect_timeout,
            wait_replicas: self.wait_replicas,
            lease_expiry,
            // A cluster's nodes restart one by one and are not tracked.
            register_key: self
                .cluster
                .is_empty()
                .then(|| format!("{key_prefix}~expiry-register")),
            owns_pool: self.pool.is_none(),
        };
        if !self.servers.is_empty() && !self.cluster.is_empty() {
            return Err(Error::config(
                "redlock(...) and cluster(...) cannot be combined",
            ));
        }
        if !self.servers.is_empty() {
            return self.redlock(settings, lease_expiry).await;
        }
        if !self.cluster.is_empty() {
            return self.cluster(settings).await;
        }
        if self.sentinel.is_some() {
            return self.sentinel(settings).await;
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
        self.verified(backend, description).await
    }

    /// Checks that the server answers, then its eviction policy; a backend
    /// that fails is shut down before the error is returned.
    async fn verified(
        &self,
        backend: RedisBackend,
        description: String,
    ) -> Result<(Backend, String)> {
        let starting = Starting(vec![backend.clone()]);
        backend.verify().await?;
        self.check_eviction(&description, &backend).await?;
        starting.keep();
        Ok((Backend::Redis(backend), description))
    }

    /// Warns about (or with `require_noeviction` refuses) a `maxmemory-policy`
    /// under which Redis may evict lock keys.
    async fn check_eviction(&self, server: &str, backend: &RedisBackend) -> Result<()> {
        let found = backend.eviction().await?;
        crate::eviction::check(server, found, self.require_noeviction)
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
    async fn sentinel(mut self, settings: RedisSettings) -> Result<(Backend, String)> {
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
        let description = format!("redis via sentinel (master `{master}`)");
        self.verified(backend, description).await
    }

    /// A cluster from its seed nodes.
    async fn cluster(self, settings: RedisSettings) -> Result<(Backend, String)> {
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
        let description = format!("redis cluster ({} seed nodes)", self.cluster.len());
        self.verified(backend, description).await
    }

    /// Redlock over `servers` (the builder's `redlock(...)`): a pool and a pub/sub connection per server, all
    /// feeding one hub. Up to a minority of servers may be down at start; two
    /// URLs that reach the same server (same `run_id`) are a configuration error.
    async fn redlock(
        self,
        settings: RedisSettings,
        lease_expiry: Duration,
    ) -> Result<(Backend, String)> {
        let n = self.servers.len();
        if n < 2 {
            return Err(Error::config(
                "Redlock needs at least 2 servers (3 or 5 to survive failures)",
            ));
        }
        if self.pool.is_some() || self.url.is_some() {
            return Err(Error::config(
                "redlock(...) cannot be combined with url(...) or pool(...)",
            ));
        }
        crate::backend::redlock::check_timing(self.op_timeout, lease_expiry)?;
        let quorum = crate::backend::redlock::quorum_of(n);
        let (hub, feeds) = Hub::remote(n, quorum);
        let mut servers = Vec::with_capacity(n);
        for (url, feed) in self.servers.iter().zip(feeds) {
            let (pool, client) = self.pool_for(self.connection_info(Some(url))?)?;
            let backend =
                RedisBackend::member(pool, client, feed, Arc::clone(&hub), settings.clone());
            servers.push((redact(url), backend));
        }
        let starting = Starting(servers.iter().map(|(_, b)| b.clone()).collect());
        let causes = self.check_redlock(&servers, quorum).await?;
        starting.keep();
        for c in &causes {
            tracing::warn!(server = %c.server, error = %Chain(&c.error), "redlock server unavailable at start");
        }
        let description = format!("redlock over {n} servers");
        Ok((
            Backend::Redlock(RedlockBackend::new(servers, hub, settings.op_timeout)),
            description,
        ))
    }

    /// Redlock's checks at start: no two URLs reach one server, a majority
    /// answers, and the eviction policy of each server that answered. Returns
    /// the servers that did not answer.
    async fn check_redlock(
        &self,
        servers: &[(String, RedisBackend)],
        quorum: usize,
    ) -> Result<Vec<ServerError>> {
        let n = servers.len();
        let checks = futures_util::future::join_all(servers.iter().map(|(_, b)| b.verify())).await;
        let mut seen: Vec<(String, &str)> = Vec::new();
        let mut causes = Vec::new();
        for ((name, _), check) in servers.iter().zip(checks) {
            match check {
                Ok(Some(run_id)) => {
                    if let Some((_, other)) = seen.iter().find(|(id, _)| *id == run_id) {
                        let msg = format!(
                            "`{other}` and `{name}` reach the same Redis server: Redlock needs independent servers"
                        );
                        return Err(Error::config(msg));
                    }
                    seen.push((run_id, name));
                }
                Ok(None) => {}
                Err(e @ (Error::Auth { .. } | Error::Config { .. })) => {
                    return Err(e);
                }
                Err(error) => causes.push(ServerError {
                    server: name.clone(),
                    error,
                }),
            }
        }
        if causes.len() > n - quorum {
            return Err(Error::Quorum {
                succeeded: n - causes.len(),
                needed: quorum,
                causes,
            });
        }
        // The eviction policy of each server that answered (one that did not
        // is not checked when it comes back).
        let answered = servers
            .iter()
            .filter(|(name, _)| !causes.iter().any(|c| c.server == *name));
        let this = self;
        let evictions = futures_util::future::join_all(
            answered.map(|(name, b)| async move { (name, this.check_eviction(name, b).await) }),
        )
        .await;
        for (name, checked) in evictions {
            match checked {
                Ok(()) => {}
                Err(e @ Error::Config { .. }) => {
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(server = %name, error = %Chain(&e), "maxmemory-policy not checked");
                }
            }
        }
        Ok(causes)
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

/// Backends under their checks at start. Dropped before [`keep`] (a check
/// failed, or the caller dropped `build()`), it shuts them down: their pools
/// and background tasks (the Sentinel watcher, pub/sub) would otherwise run
/// on with nobody to close them.
///
/// [`keep`]: Starting::keep
struct Starting(Vec<RedisBackend>);

impl Starting {
    /// The checks passed: the backends serve.
    fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        for b in &self.0 {
            b.shutdown();
        }
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
