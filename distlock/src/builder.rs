//! `LockerBuilder`: every option of a `Locker`, validated in `build()`.

use std::fmt;
use std::time::Duration;

use deadpool_redis::Pool;

use crate::backend::connect::ConnectOptions;
use crate::backend::memory::MemoryStore;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::locker::Locker;
use crate::options::LeaseOptions;

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
/// | `name` (the `locker` label of the gauges, `metrics` feature) | `default` |
/// | `expiry` | 30 s (≥ 100 ms, ≤ 24 h) |
/// | `renew_every` | expiry / 3 (must be shorter than expiry − drift) |
/// | `drift` | 1 % of expiry + 2 ms (factor ≥ 0.1 %, floor ≥ 1 ms) |
/// | `max_hold` | none |
/// | `retry_backoff` | 50 ms doubling to 1 s, ±25 % jitter |
/// | `op_timeout` (one request) | 2 s |
/// | `connect_timeout` | 3 s |
/// | `require_noeviction` | false (a `maxmemory-policy` other than `noeviction` is only a warning) |
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
    conn: ConnectOptions,
    memory: Option<MemoryStore>,
    key_prefix: String,
    owner_tag: Option<String>,
    name: Option<String>,
    opts: LeaseOptions,
}

impl fmt::Debug for LockerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockerBuilder")
            .field("conn", &self.conn)
            .field("memory", &self.memory.is_some())
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
            conn: ConnectOptions::default(),
            memory: None,
            key_prefix: "distlock:".into(),
            owner_tag: None,
            name: None,
            opts: LeaseOptions::default(),
        }
    }

    /// The server's URL: `redis://[user:password@]host[:port][/db]`, `rediss://`
    /// for TLS (with the `tls` feature), `unix:///path[?db=N&user=U&pass=P]`
    /// for a socket (`valkey://`, `valkeys://`, `redis+unix://` and
    /// `valkey+unix://` too). Percent-encode `/`, `?`, `#`, `@` and `%` in a
    /// password. `build()` refuses credentials where redis-rs would ignore them
    /// (`?password=`, a password in a `redis://` query, a `user:password@` in a
    /// socket URL). `Debug` and errors show the URL without its password or
    /// any query value but `db` and `protocol`.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.conn.url = Some(url.into());
        self
    }
    /// Redlock: one lock over these independent servers (3 or 5). Every
    /// operation must succeed on a majority; a minority may be down. `username`,
    /// `password` and `db` apply to every server; `host`/`port` may not be used.
    /// [`Locker::redlock`] is this with default options.
    pub fn redlock<I, S>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.conn.servers = urls.into_iter().map(Into::into).collect();
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
        self.conn.cluster = urls.into_iter().map(Into::into).collect();
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
        self.conn.sentinel = Some((urls, master.into()));
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
        self.conn.wait_replicas = Some((replicas, timeout));
        self
    }
    /// Refuses to build unless every server it connects to has
    /// `maxmemory-policy noeviction` (default: false, which only warns).
    ///
    /// Under any other policy, a server that reaches `maxmemory` may evict a
    /// held lock key; another client can then acquire the lock while its
    /// holder learns only at its next renewal. `build()` reads the policy from
    /// `INFO memory` (or `CONFIG GET maxmemory-policy` where the ACL user may
    /// not run `INFO`) of the server, Sentinel's master, each cluster master,
    /// or each Redlock server that answers at build. Without this option a
    /// policy other than `noeviction` is logged as a warning, and a policy that
    /// cannot be read as a debug event; with it, both are an
    /// [`Error::Config`]. The policy is checked once, when connecting: a later
    /// `CONFIG SET`, a Sentinel failover to a differently configured replica,
    /// or a Redlock server that was down at build goes unchecked.
    pub fn require_noeviction(mut self, require: bool) -> Self {
        self.conn.require_noeviction = require;
        self
    }
    /// Trusts this CA certificate (PEM) for `rediss://` connections instead of
    /// the system's roots: for servers with a private CA.
    #[cfg(feature = "tls")]
    pub fn tls_root_cert(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.conn.tls_root_cert = Some(pem.into());
        self
    }
    /// The host (overrides the URL's).
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.conn.host = Some(host.into());
        self
    }
    /// The port (overrides the URL's; default 6379).
    pub fn port(mut self, port: u16) -> Self {
        self.conn.port = Some(port);
        self
    }
    /// The ACL user name (overrides the URL's).
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.conn.username = Some(username.into());
        self
    }
    /// The password (overrides the URL's). Never shown by `Debug` or in errors.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.conn.password = Some(password.into());
        self
    }
    /// The database number (overrides the URL's).
    pub fn db(mut self, db: i64) -> Self {
        self.conn.db = Some(db);
        self
    }
    /// Uses this pool for commands. A URL given as well serves the pub/sub
    /// wake-up connection; without one, waiters poll with backoff.
    pub fn pool(mut self, pool: Pool) -> Self {
        self.conn.pool = Some(pool);
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
        self.conn.pool_size = size;
        self
    }
    /// How many multiplexed connections stay checked out of the pool for
    /// commands (round-robin).
    pub fn connections(mut self, n: usize) -> Self {
        self.conn.connections = n;
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
    /// A name for this locker in metrics: the `locker` label of the
    /// `distlock_held_leases` and `distlock_waiting_tasks` gauges (default
    /// `default`). Lockers that share a name add up. At most 64 bytes.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
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
    ///
    /// `build()` refuses a factor below 0.001 or a floor below 1 ms: the
    /// local deadline must come strictly before the server's expiry, and NTP
    /// may slew the two clocks' rates up to 0.1 % apart, while Redis expires
    /// keys on millisecond boundaries.
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
        self.conn.op_timeout = timeout;
        self
    }
    /// The longest connecting may take.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.conn.connect_timeout = timeout;
        self
    }

    fn validate(&self) -> Result<()> {
        self.opts.validate()?;
        crate::key::validate_prefix(&self.key_prefix)?;
        if let Some(name) = &self.name {
            if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
                return Err(Error::config(
                    "name must be 1 to 64 bytes without control characters",
                ));
            }
        }
        if let Some(tag) = &self.owner_tag {
            if tag.len() > 64 || tag.chars().any(char::is_control) {
                return Err(Error::config(
                    "owner_tag must be at most 64 bytes without control characters",
                ));
            }
        }
        if self.conn.pool_size == 0 || self.conn.pool_size > 1024 {
            return Err(Error::config("pool_size must be between 1 and 1024"));
        }
        if self.conn.connections == 0 || self.conn.connections > self.conn.pool_size {
            return Err(Error::config("connections must be between 1 and pool_size"));
        }
        for (name, d) in [
            ("op_timeout", self.conn.op_timeout),
            ("connect_timeout", self.conn.connect_timeout),
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
        let name = self.name.unwrap_or_else(|| "default".to_owned());
        Locker::from_parts(
            backend,
            self.opts,
            self.key_prefix,
            owner_tag,
            name.into(),
            description,
        )
    }

    /// Builds a memory locker without awaiting (for [`Locker::memory`]).
    pub(crate) fn build_now(mut self) -> Locker {
        let store = self.memory.take().unwrap_or_default();
        self.finish(Backend::Memory(store.0), "memory".into())
    }

    /// Validates the options, connects, checks that the server answers (one
    /// connection is checked out and identified) and reads its eviction policy
    /// (see [`require_noeviction`](Self::require_noeviction)).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid option or URL, or (with
    /// `require_noeviction`) a server whose `maxmemory-policy` is not
    /// `noeviction`; [`Error::Unavailable`] if the server cannot be reached
    /// within the connect timeout; [`Error::Auth`] if it refuses the
    /// credentials.
    pub async fn build(self) -> Result<Locker> {
        self.validate()?;
        if self.memory.is_some() {
            return Ok(self.build_now());
        }
        let conn = self.conn.clone();
        let (backend, description) = conn.connect(&self.key_prefix, self.opts.expiry).await?;
        Ok(self.finish(backend, description))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_every_password() {
        let b = LockerBuilder::new()
            .url("redis://u:hunter2@h:1")
            .redlock(["redis://:hunter3@a", "redis://app:12/hunter4@b/0"])
            .cluster(["unix:///s?pass=hunter5"])
            .sentinel(["redis://:hunter6@s"], "m")
            .password("hunter7");
        let dbg = format!("{b:?}");
        assert!(!dbg.contains("hunter"), "{dbg}");
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
            assert!(
                matches!(b.build().await, Err(Error::Config { .. })),
                "{dbg}"
            );
        }
    }
}
