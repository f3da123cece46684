//! [`PostgresServer`]: a real PostgreSQL server on a free loopback port, in a
//! temporary cluster made by `initdb`.

use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{getuid, Pid};
use tempfile::TempDir;

use crate::server::free_port;

/// How long `initdb` may take.
const INITDB_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a start may take before the harness gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How many fresh ports a start tries when its port is taken.
const START_ATTEMPTS: u32 = 5;
/// How long a drop waits for the fast shutdown before killing.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// What the server logs once it accepts connections.
const READY_LINE: &str = "database system is ready to accept connections";
/// How many log lines a failure shows.
const LOG_TAIL_LINES: usize = 40;

/// A PostgreSQL server on `127.0.0.1` with a fresh, throw-away cluster
/// (`initdb` into a temporary directory, trust authentication, no fsync),
/// stopped and deleted on drop.
///
/// PostgreSQL refuses to run as root: when the tests run as root, `initdb`
/// and `postgres` run as the `postgres` user (which the Debian package
/// creates) and the directory is handed to it. The binaries are taken from
/// `PATH`, else from the newest `/usr/lib/postgresql/*/bin`.
///
/// ```no_run
/// # async fn demo() {
/// use distlock_tests::PostgresServer;
///
/// let db = PostgresServer::start().await;
/// let url = db.url(); // postgres://postgres@127.0.0.1:PORT/postgres
/// # let _ = url;
/// # }
/// ```
#[derive(Debug)]
pub struct PostgresServer {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl PostgresServer {
    /// Runs `initdb`, starts the server on a free port and waits until it
    /// accepts connections.
    ///
    /// # Panics
    ///
    /// If the binaries are missing, `initdb` fails, or the server is not ready
    /// within 20 s (with the tail of its log).
    pub async fn start() -> PostgresServer {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("distlock-postgres-")
            .tempdir()
            .unwrap_or_else(|e| panic!("creating a temporary directory for PostgreSQL: {e}"));
        let user = run_as();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap_or_else(|e| {
                panic!("handing {} to the postgres user: {e}", dir.path().display())
            });
        }
        let data = dir.path().join("data");
        let log = dir.path().join("initdb.log");
        let mut initdb = command(&bin.join("initdb"), user, dir.path());
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync");
        let status = run_bounded(initdb, &log, INITDB_TIMEOUT);
        if !status {
            panic!("initdb failed\n{}", tail(&log));
        }
        let mut server = PostgresServer {
            dir,
            port: 0,
            child: None,
        };
        for attempt in 1..=START_ATTEMPTS {
            server.port = free_port();
            if server.boot(&bin, user, attempt).await {
                return server;
            }
        }
        panic!("postgres: the port was taken on each of {START_ATTEMPTS} attempts");
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`: user `postgres`, no password.
    pub fn url(&self) -> String {
        format!("postgres://postgres@{}/postgres", self.addr())
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Starts `postgres`; `false` if the port was taken, panics on any other
    /// failure.
    async fn boot(&mut self, bin: &Path, user: Option<(u32, u32)>, attempt: u32) -> bool {
        let log = self.log(attempt);
        let out = File::create(&log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("duplicating a handle to {}: {e}", log.display()));
        let mut cmd = command(&bin.join("postgres"), user, self.dir.path());
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=50"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", bin.join("postgres").display()));
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let text = read_lossy(&log);
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                if text.contains("Address already in use") {
                    return false;
                }
                panic!(
                    "postgres on port {} exited ({status}) before it was ready\n{}",
                    self.port,
                    tail(&log)
                );
            }
            if text.contains(READY_LINE)
                && tokio::net::TcpStream::connect(self.addr()).await.is_ok()
            {
                return true;
            }
            if Instant::now() >= deadline {
                self.stop();
                panic!(
                    "postgres on port {} was not ready within {READY_TIMEOUT:?}\n{}",
                    self.port,
                    tail(&log)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self, attempt: u32) -> PathBuf {
        self.dir.path().join(format!("postgres-{attempt}.log"))
    }

    /// Fast shutdown (`SIGINT`: backends are told to exit), then `SIGKILL`
    /// after 5 s.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
        // The TempDir field removes the directory afterwards, ignoring errors.
    }
}

/// Where `initdb` and `postgres` are: the directory of `initdb` on `PATH`,
/// else the newest `/usr/lib/postgresql/*/bin`.
fn bin_dir() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).find(|dir| dir.join("initdb").is_file()));
    if let Some(dir) = on_path {
        // Debian links only some tools into PATH: resolve to the real directory.
        let real = fs::canonicalize(dir.join("initdb"))
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        return real.unwrap_or(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "PostgreSQL not found: no initdb on PATH or in /usr/lib/postgresql/*/bin \
             (apt-get install postgresql)"
        )
    })
}

/// The `postgres` user's uid and gid when running as root (PostgreSQL refuses
/// root), else `None` (run as ourselves).
fn run_as() -> Option<(u32, u32)> {
    if !getuid().is_root() {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd")
        .unwrap_or_else(|e| panic!("reading /etc/passwd to find the postgres user: {e}"));
    let ids = passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields.as_slice() {
            ["postgres", _, uid, gid, ..] => Some((uid.parse().ok()?, gid.parse().ok()?)),
            _ => None,
        }
    });
    Some(ids.unwrap_or_else(|| {
        panic!(
            "running as root, and PostgreSQL refuses root, but there is no `postgres` user \
             (apt-get install postgresql creates it)"
        )
    }))
}

fn command(program: &Path, user: Option<(u32, u32)>, cwd: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(cwd);
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Runs `cmd` with its output into `log`, for at most `limit`; its success.
fn run_bounded(mut cmd: Command, log: &Path, limit: Duration) -> bool {
    let out = File::create(log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
    let err = out
        .try_clone()
        .unwrap_or_else(|e| panic!("duplicating a handle to {}: {e}", log.display()));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

fn tail(path: &Path) -> String {
    let text = read_lossy(path);
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    format!("--- {} ---\n{}\n", path.display(), tail.join("\n"))
}
