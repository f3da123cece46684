//! [`RedisServer`]: a real `redis-server` process on a free loopback port.

use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, FromRedisValue};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a start (or restart) may take before the harness gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How many fresh ports [`RedisServer::start`] tries when its port is taken.
const START_ATTEMPTS: u32 = 5;
/// Pause between two readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Connect and response timeout of the connections made by [`RedisServer::conn`].
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`RedisServer::stop`] waits for a graceful exit before killing.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The line redis-server logs (at level `notice`) once it serves clients.
const READY_LINE: &str = "Ready to accept connections";
/// How many lines of each log a start failure shows.
const LOG_TAIL_LINES: usize = 40;

/// A `redis-server` child process on `127.0.0.1`, with its own temporary
/// directory and no persistence, killed and cleaned up on drop.
///
/// Every start waits until the server answers `PING`; a server that cannot
/// start panics with the tail of its log.
///
/// ```no_run
/// # async fn demo() {
/// use distlock_tests::RedisServer;
///
/// let server = RedisServer::start().await;
/// server.set("k", "v").await;
/// assert_eq!(server.get("k").await.as_deref(), Some("v"));
/// # }
/// ```
#[derive(Debug)]
pub struct RedisServer {
    options: RedisServerBuilder,
    dir: TempDir,
    port: u16,
    /// How many times a process was spawned; names each start's log files.
    spawns: u32,
    child: Mutex<Option<Child>>,
    paused: AtomicBool,
}

/// Options for a [`RedisServer`], from [`RedisServer::builder`].
#[derive(Debug, Clone, Default)]
pub struct RedisServerBuilder {
    password: Option<String>,
    args: Vec<String>,
}

impl RedisServerBuilder {
    /// Requires this password (`requirepass`); [`RedisServer::url`] then
    /// carries it. It is put into the URL as is, so keep it URL-safe.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Adds one raw command-line argument, e.g. `.arg("--maxmemory").arg("1mb")`.
    ///
    /// The harness's own options (port, bind address, directory, log file,
    /// no persistence, password) come after these and win over them. The log
    /// level must stay `notice` or more verbose: readiness is read from the log.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds several raw command-line arguments, e.g.
    /// `.args(["--user", "alice", "on", ">secret", "~*", "+@all"])`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds one config directive, e.g. `.config("maxmemory-policy", "noeviction")`
    /// (the same as `.args(["--maxmemory-policy", "noeviction"])`).
    pub fn config(self, name: &str, value: impl Into<String>) -> Self {
        self.args([format!("--{name}"), value.into()])
    }

    /// Starts the server on a free port and waits until it answers `PING`.
    ///
    /// # Panics
    ///
    /// If `redis-server` cannot be run, exits, or is not ready within 10 s.
    pub async fn start(self) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("distlock-redis-")
            .tempdir()
            .unwrap_or_else(|e| panic!("creating a temporary directory for redis-server: {e}"));
        let mut server = RedisServer {
            options: self,
            dir,
            port: 0,
            spawns: 0,
            child: Mutex::new(None),
            paused: AtomicBool::new(false),
        };
        for _ in 0..START_ATTEMPTS {
            server.port = free_port();
            if server.boot().await.is_ok() {
                return server;
            }
        }
        panic!("redis-server: the port was taken on each of {START_ATTEMPTS} attempts");
    }
}

/// The port was in use when redis-server tried to listen on it.
#[derive(Debug)]
struct PortBusy;

impl RedisServer {
    /// Starts a server with default options; see [`RedisServerBuilder::start`].
    pub async fn start() -> RedisServer {
        Self::builder().start().await
    }

    /// Starts `n` independent servers (e.g. for Redlock).
    pub async fn start_many(n: usize) -> Vec<RedisServer> {
        let mut servers = Vec::with_capacity(n);
        for _ in 0..n {
            servers.push(Self::start().await);
        }
        servers
    }

    /// Options for a server: password, extra arguments.
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::default()
    }

    /// `redis://127.0.0.1:PORT`, or `redis://:PASSWORD@127.0.0.1:PORT` with a password.
    pub fn url(&self) -> String {
        match &self.options.password {
            Some(pw) => format!("redis://:{pw}@{}", self.addr()),
            None => format!("redis://{}", self.addr()),
        }
    }

    /// The port the server listens on; it stays the same across [`restart`](Self::restart).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The process id, or `None` once killed or stopped.
    pub fn pid(&self) -> Option<u32> {
        self.lock_child().as_ref().map(Child::id)
    }

    /// Whether the process is alive (a paused process is alive).
    pub fn is_running(&self) -> bool {
        let mut child = self.lock_child();
        match child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_)) | Err(_)) => {
                *child = None;
                false
            }
            None => false,
        }
    }

    /// Kills the server with `SIGKILL` and waits for it to exit. Does nothing
    /// if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self
            .child
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            // SIGKILL also ends a stopped process. Errors mean it already exited.
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Shuts the server down gracefully (`SIGTERM`, which exits without saving
    /// as nothing is configured to persist) and waits for it to exit; kills it
    /// if it has not exited within 10 s. Does nothing if it is not running.
    pub async fn stop(&mut self) {
        let Some(pid) = self.pid() else { return };
        self.resume_if_paused();
        let _ = signal(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.is_running() && Instant::now() < deadline {
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        self.kill();
    }

    /// Starts the server again on the same port, with an empty database, and
    /// waits until it answers `PING`. Kills the current process first if it
    /// is still running.
    ///
    /// # Panics
    ///
    /// If the port stays taken by another process, or the server cannot start,
    /// for 10 s.
    pub async fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + READY_TIMEOUT;
        while self.boot().await.is_err() {
            if Instant::now() >= deadline {
                panic!(
                    "redis-server: port {} stayed in use for {READY_TIMEOUT:?}; cannot restart",
                    self.port
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Freezes the server with `SIGSTOP`: connections stay open but nothing is
    /// answered until [`resume`](Self::resume). Returns once the process is stopped.
    ///
    /// # Panics
    ///
    /// If the server is not running.
    pub fn pause(&self) {
        let pid = self.running_pid("pause");
        signal(pid, Signal::SIGSTOP)
            .unwrap_or_else(|e| panic!("SIGSTOP to redis-server {pid}: {e}"));
        self.paused.store(true, Ordering::SeqCst);
        wait_for_process_state(pid, true);
    }

    /// Wakes a [`pause`](Self::pause)d server with `SIGCONT`.
    ///
    /// # Panics
    ///
    /// If the server is not running.
    pub fn resume(&self) {
        let pid = self.running_pid("resume");
        signal(pid, Signal::SIGCONT)
            .unwrap_or_else(|e| panic!("SIGCONT to redis-server {pid}: {e}"));
        self.paused.store(false, Ordering::SeqCst);
        wait_for_process_state(pid, false);
    }

    /// A client for this server's [`url`](Self::url); it connects lazily.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url())
            .unwrap_or_else(|e| panic!("invalid redis URL {}: {e}", self.url()))
    }

    /// A new connection, with 5 s connect and response timeouts.
    ///
    /// # Panics
    ///
    /// If it cannot connect (or authenticate).
    pub async fn conn(&self) -> MultiplexedConnection {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CLIENT_TIMEOUT))
            .set_response_timeout(Some(CLIENT_TIMEOUT));
        self.client()
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap_or_else(|e| panic!("connecting to redis-server at {}: {e}", self.addr()))
    }

    /// `KEYS pattern`, sorted.
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = self.query(redis::cmd("KEYS").arg(pattern)).await;
        keys.sort();
        keys
    }

    /// `GET key`.
    pub async fn get(&self, key: &str) -> Option<String> {
        self.query(redis::cmd("GET").arg(key)).await
    }

    /// `SET key value`.
    pub async fn set(&self, key: &str, value: &str) {
        self.query::<()>(redis::cmd("SET").arg(key).arg(value))
            .await;
    }

    /// `DEL key`; whether the key existed.
    pub async fn del(&self, key: &str) -> bool {
        self.query::<u64>(redis::cmd("DEL").arg(key)).await > 0
    }

    /// `PTTL key`: milliseconds to live, `-1` without expiry, `-2` if missing.
    pub async fn pttl(&self, key: &str) -> i64 {
        self.query(redis::cmd("PTTL").arg(key)).await
    }

    /// `EXISTS key`.
    pub async fn exists(&self, key: &str) -> bool {
        self.query::<u64>(redis::cmd("EXISTS").arg(key)).await > 0
    }

    /// `DBSIZE`: the number of keys.
    pub async fn dbsize(&self) -> u64 {
        self.query(&redis::cmd("DBSIZE")).await
    }

    /// Runs one command on a new connection, panicking on any error.
    async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        cmd.query_async(&mut self.conn().await)
            .await
            .unwrap_or_else(|e| panic!("redis-server at {}: {cmd:?} failed: {e}", self.addr()))
    }

    /// Spawns redis-server on `self.port` and waits until it is ready.
    ///
    /// Returns `Err` only if the port was taken; panics on any other failure.
    async fn boot(&mut self) -> Result<(), PortBusy> {
        self.spawns += 1;
        let log = self.path(&format!("redis-{}.log", self.spawns));
        let output = self.path(&format!("output-{}.log", self.spawns));
        let out =
            File::create(&output).unwrap_or_else(|e| panic!("creating {}: {e}", output.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("duplicating a handle to {}: {e}", output.display()));
        let mut cmd = Command::new("redis-server");
        cmd.args(["--loglevel", "notice"]).args(&self.options.args);
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--daemonize", "no", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log);
        if let Some(pw) = &self.options.password {
            cmd.args(["--requirepass", pw]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("running redis-server (is it on PATH?): {e}"));
        *self.child.get_mut().unwrap_or_else(PoisonError::into_inner) = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            // Our process logs READY_LINE only after it bound the port, so a
            // PONG then comes from it and not from whoever else took the port.
            let ready = ping(self.addr()).await && read_lossy(&log).contains(READY_LINE);
            let exited = match self.child.get_mut().unwrap_or_else(PoisonError::into_inner) {
                Some(child) => child.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = exited {
                self.kill();
                if read_lossy(&log).contains("Address already in use") {
                    return Err(PortBusy);
                }
                panic!(
                    "redis-server on port {} exited ({status}) before it was ready\n{}",
                    self.port,
                    tails(&[&log, &output])
                );
            }
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "redis-server on port {} was not ready within {READY_TIMEOUT:?}\n{}",
                    self.port,
                    tails(&[&log, &output])
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn lock_child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn running_pid(&self, action: &str) -> u32 {
        self.pid().unwrap_or_else(|| {
            panic!(
                "cannot {action} redis-server on port {}: not running",
                self.port
            )
        })
    }

    fn resume_if_paused(&self) {
        if self.paused.swap(false, Ordering::SeqCst) {
            if let Some(pid) = self.pid() {
                let _ = signal(pid, Signal::SIGCONT);
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.resume_if_paused();
        self.kill();
        // The TempDir field removes the directory afterwards, ignoring errors.
    }
}

/// A port that was free a moment ago (bind to port 0, read it, release it).
pub(crate) fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("finding a free port on 127.0.0.1: {e}"))
}

fn signal(pid: u32, signal: Signal) -> nix::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| nix::Error::ESRCH)?;
    kill(Pid::from_raw(pid), signal)
}

/// Sends a raw `PING` and reports whether the server answered; an error
/// reply such as `NOAUTH` counts (the server is up), `LOADING` does not.
async fn ping(addr: SocketAddr) -> bool {
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream.write_all(b"*1\r\n$4\r\nPING\r\n").await.ok()?;
        let mut reply = [0u8; 64];
        let n = stream.read(&mut reply).await.ok()?;
        let reply = &reply[..n];
        Some(
            reply.starts_with(b"+") || (reply.starts_with(b"-") && !reply.starts_with(b"-LOADING")),
        )
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), probe).await,
        Ok(Some(true))
    )
}

/// Waits (at most 1 s) until the process is stopped (`T`) or no longer stopped,
/// as `/proc/PID/stat` tells; returns at once where that cannot be read.
fn wait_for_process_state(pid: u32, stopped: bool) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return;
        };
        // "PID (COMM) STATE ...": COMM may contain spaces and parentheses.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        match state {
            Some(state) if (state == 'T') == stopped => return,
            Some(_) => std::thread::sleep(Duration::from_millis(1)),
            None => return,
        }
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// The last lines of each file, for panic messages.
fn tails(paths: &[&Path]) -> String {
    let mut out = String::new();
    for path in paths {
        let text = read_lossy(path);
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        out.push_str(&format!("--- {} ---\n", path.display()));
        for line in tail {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}
