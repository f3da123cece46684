//! `distlock`: see and steer who holds what, from a shell.
//!
//! ```text
//! distlock ls [PATTERN]        held locks: key, kind, holder, token, time left
//! distlock show KEY            one lock in detail (exit 3 when nobody holds it)
//! distlock watch [PATTERN]     the same table, printed again whenever it changes
//! distlock leader NAME         who leads an election, and its term
//! distlock unlock KEY [--yes]  force release, after a confirmation
//! ```
//!
//! Install with `cargo install distlock --features cli`. It connects as the
//! library does (`--url`, or `REDIS_URL`; `--cluster`, `--sentinel`; ACL users
//! and passwords in the URL; `rediss://` with `--tls-root-cert`), never prints a
//! password, and exits with 0 on success, 1 on an error, 2 on a usage error, 3
//! when the lock is not held and 4 when a confirmation was declined.

mod args;
mod render;

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use distlock::{LockStatus, Locker};

use crate::args::{Args, Command, Connection};

/// Exit codes beyond success and clap's usage error (2).
const ERROR: u8 = 1;
const NOT_HELD: u8 = 3;
const DECLINED: u8 = 4;

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(ERROR);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", render::error_chain(&e));
            ExitCode::from(ERROR)
        }
    }
}

async fn run(args: Args) -> Result<u8, distlock::Error> {
    let locker = connect(&args.connection).await?;
    let result = command(&locker, &args).await;
    let _ = locker.close().await;
    result
}

async fn connect(c: &Connection) -> Result<Locker, distlock::Error> {
    let mut builder = Locker::builder();
    builder = if !c.cluster.is_empty() {
        builder.cluster(c.cluster.iter().cloned())
    } else if !c.sentinel.is_empty() {
        let master = c.master.clone().unwrap_or_else(|| "mymaster".to_owned());
        builder.sentinel(c.sentinel.iter().cloned(), master)
    } else if !c.redlock.is_empty() {
        builder.redlock(c.redlock.iter().cloned())
    } else {
        builder.url(c.url.clone())
    };
    if let Some(prefix) = &c.key_prefix {
        builder = builder.key_prefix(prefix.clone());
    }
    if let Some(path) = &c.tls_root_cert {
        let pem = std::fs::read(path).map_err(|e| {
            distlock::Error::config(format!(
                "cannot read --tls-root-cert {}: {e}",
                path.display()
            ))
        })?;
        builder = builder.tls_root_cert(pem);
    }
    builder.connect_timeout(c.connect_timeout).build().await
}

async fn command(locker: &Locker, args: &Args) -> Result<u8, distlock::Error> {
    let json = args.json;
    match &args.command {
        Command::Ls { pattern } => {
            let locks = locker.locks(pattern).await?;
            print!("{}", render::table(&locks, json));
            Ok(0)
        }
        Command::Show { key } => {
            let status = locker.inspect(key).await?;
            print!("{}", render::show(key, status.as_ref(), json));
            Ok(if status.is_some() { 0 } else { NOT_HELD })
        }
        Command::Watch {
            pattern,
            interval,
            count,
        } => watch(locker, pattern, *interval, *count, json).await,
        Command::Leader { name } => {
            let leader = locker.election(name.as_str()).leader().await?;
            print!("{}", render::leader(name, leader.as_ref(), json));
            Ok(if leader.is_some() { 0 } else { NOT_HELD })
        }
        Command::Unlock { key, yes } => unlock(locker, key, *yes, json).await,
    }
}

/// Prints the table, then again each time what it shows changes (holders,
/// tokens; not the time left, which changes all the time).
async fn watch(
    locker: &Locker,
    pattern: &str,
    interval: Duration,
    count: Option<u64>,
    json: bool,
) -> Result<u8, distlock::Error> {
    let mut shown: Option<Vec<render::Shape>> = None;
    let mut printed = 0u64;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let locks = locker.locks(pattern).await?;
        let shape = render::shape(&locks);
        if shown.as_ref() == Some(&shape) {
            continue;
        }
        shown = Some(shape);
        if json {
            println!("{}", render::table(&locks, true).trim_end());
        } else {
            println!("{} ({} held)", render::now(), locks.len());
            print!("{}", render::table(&locks, false));
            println!();
        }
        let _ = std::io::stdout().flush();
        printed += 1;
        if count.is_some_and(|c| printed >= c) {
            return Ok(0);
        }
    }
}

async fn unlock(locker: &Locker, key: &str, yes: bool, json: bool) -> Result<u8, distlock::Error> {
    let Some(status) = locker.inspect(key).await? else {
        print!("{}", render::show(key, None, json));
        return Ok(NOT_HELD);
    };
    let holders = render::holders_line(&status);
    if !yes && !confirm(key, &holders)? {
        if json {
            println!("{}", render::unlock_json(key, &status, false));
        } else {
            println!("left `{key}` as it is");
        }
        return Ok(DECLINED);
    }
    let released = locker.force_unlock(key).await?;
    if json {
        println!("{}", render::unlock_json(key, &status, released));
    } else if released {
        println!("released `{key}`, held by {holders}");
        println!(
            "the holder's lost signal fires at its next renewal (within its renewal interval); \
             until then it may still believe it holds the lock: {}",
            fencing_advice(&status)
        );
    } else {
        println!("`{key}` was released before this could release it");
    }
    Ok(if released { 0 } else { NOT_HELD })
}

fn fencing_advice(status: &LockStatus) -> String {
    match status.fencing_token() {
        Some(t) => format!("resources that check fencing tokens refuse its writes once a newer holder (token > {t}) has written"),
        None => "only resources that check fencing tokens are protected meanwhile".to_owned(),
    }
}

/// Asks on the terminal; anything but `y` or `yes` declines.
fn confirm(key: &str, holders: &str) -> Result<bool, distlock::Error> {
    eprint!("release `{key}`, held by {holders}? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| distlock::Error::config(format!("cannot read the answer: {e}")))?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}
