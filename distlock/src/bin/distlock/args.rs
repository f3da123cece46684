//! The command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};

/// See and steer distributed locks held in Redis by distlock.
#[derive(Debug, Parser)]
#[command(name = "distlock", version, about)]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) connection: Connection,

    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub(crate) json: bool,

    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Where the locks are: the same options as the library's builder.
#[derive(Debug, ClapArgs)]
pub(crate) struct Connection {
    /// The Redis URL (`redis://`, `rediss://`, `unix://`; ACL user and password
    /// in it).
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true,
        global = true
    )]
    pub(crate) url: String,

    /// A Redis Cluster: seed node URLs (repeat the option).
    #[arg(long, value_name = "URL", global = true)]
    pub(crate) cluster: Vec<String>,

    /// Sentinel URLs (repeat the option); the master is `--master`.
    #[arg(long, value_name = "URL", global = true)]
    pub(crate) sentinel: Vec<String>,

    /// The master's name under Sentinel.
    #[arg(long, value_name = "NAME", global = true)]
    pub(crate) master: Option<String>,

    /// Redlock: the independent servers' URLs (repeat the option).
    #[arg(long, value_name = "URL", global = true)]
    pub(crate) redlock: Vec<String>,

    /// The key prefix the services use (the library's default if not given).
    #[arg(long, value_name = "PREFIX", global = true)]
    pub(crate) key_prefix: Option<String>,

    /// A CA certificate (PEM) to trust for `rediss://`.
    #[arg(long, value_name = "PATH", global = true)]
    pub(crate) tls_root_cert: Option<PathBuf>,

    /// How long connecting may take.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration, global = true)]
    pub(crate) connect_timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// List held locks: key, kind, holder, fencing token, time left.
    Ls {
        /// A Redis glob over lock keys (`order:*`).
        #[arg(default_value = "*")]
        pattern: String,
    },
    /// Show one lock in detail; exits with 3 when nobody holds it.
    Show {
        /// The lock key, without the prefix.
        key: String,
    },
    /// Print the table of held locks, and again whenever it changes.
    Watch {
        /// A Redis glob over lock keys.
        #[arg(default_value = "*")]
        pattern: String,
        /// How often to look.
        #[arg(long, default_value = "1s", value_parser = duration)]
        interval: Duration,
        /// Stop after printing this many times.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Show who leads an election (`Locker::election`); exits with 3 when
    /// nobody does.
    Leader {
        /// The election's name.
        name: String,
    },
    /// Release a lock whoever holds it; asks first unless `--yes`.
    Unlock {
        /// The lock key, without the prefix.
        key: String,
        /// Do not ask.
        #[arg(long, short)]
        yes: bool,
    },
}

fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(d)
}
