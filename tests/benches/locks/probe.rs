//! What the bench reads from outside the library: Redis's own command counters
//! (`INFO commandstats`), this process's resident memory, and one round trip.
//!
//! Redis counts the commands a Lua script runs as well as the script call, so
//! the scripts' inner commands tell them apart without any counter in distlock:
//! an acquire attempt that finds the key held ends with `PTTL`, one that takes
//! it `INCR`s the fencing counter, a release `PUBLISH`es, a renewal `PEXPIRE`s.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

/// Calls per command since the server started (or since `CONFIG RESETSTAT`),
/// and the microseconds Redis spent in each.
#[derive(Debug, Clone, Default)]
pub(crate) struct CommandStats(HashMap<String, (u64, u64)>);

impl CommandStats {
    pub(crate) async fn read(conn: &mut MultiplexedConnection) -> CommandStats {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(conn)
            .await
            .expect("INFO commandstats");
        let mut map = HashMap::new();
        for line in info.lines() {
            let Some(rest) = line.strip_prefix("cmdstat_") else {
                continue;
            };
            let Some((name, fields)) = rest.split_once(':') else {
                continue;
            };
            let field = |name: &str| {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix(name))
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0)
            };
            map.insert(name.to_owned(), (field("calls="), field("usec=")));
        }
        CommandStats(map)
    }

    /// Calls of `cmd` (lower case) since `earlier`.
    pub(crate) fn since(&self, earlier: &CommandStats, cmd: &str) -> u64 {
        let now = self.0.get(cmd).map_or(0, |c| c.0);
        let then = earlier.0.get(cmd).map_or(0, |c| c.0);
        now.saturating_sub(then)
    }

    /// Microseconds Redis spent in `cmds` (lower case) since `earlier`.
    /// Redis counts a command run inside a script or a transaction twice: on
    /// its own line and in the `EVALSHA` or `EXEC` that ran it. So `cmds`
    /// names only what the client sent itself.
    pub(crate) fn usec_since(&self, earlier: &CommandStats, cmds: &[&str]) -> u64 {
        cmds.iter()
            .map(|cmd| {
                let now = self.0.get(*cmd).map_or(0, |c| c.1);
                let then = earlier.0.get(*cmd).map_or(0, |c| c.1);
                now.saturating_sub(then)
            })
            .sum()
    }
}

/// The server process's CPU time so far, user and system, in seconds (`INFO
/// cpu`): the commands and everything around them (reading requests,
/// writing replies).
pub(crate) async fn server_cpu(conn: &mut MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(conn)
        .await
        .expect("INFO cpu");
    info.lines()
        .filter_map(|l| {
            l.strip_prefix("used_cpu_user:")
                .or_else(|| l.strip_prefix("used_cpu_sys:"))
        })
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

/// Resident memory of this process, in bytes (`VmRSS` of `/proc/self/status`).
pub(crate) fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// One `PING` round trip on an open connection.
pub(crate) async fn ping(conn: &mut MultiplexedConnection) -> Duration {
    let t = Instant::now();
    let _: String = redis::cmd("PING").query_async(conn).await.expect("PING");
    t.elapsed()
}

/// A one-line description of the machine and the server.
pub(crate) async fn machine(conn: &mut MultiplexedConnection) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .unwrap_or_default();
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_owned();
    format!("{model}, {cores} cores, Linux {kernel}, redis-server {version} on loopback")
}
