//! The distlock test harness: real `redis-server` processes on free ports,
//! and a TCP proxy that injects faults between a client and a server.
//!
//! - [`RedisServer`] starts, kills, restarts, pauses and resumes a server,
//!   and has a few async helpers for assertions (`get`, `pttl`, `keys`, ...).
//! - [`PostgresServer`] runs a throw-away PostgreSQL (for fenced SQL writes).
//! - [`FaultProxy`] forwards to a server and adds latency, blackholes
//!   traffic or resets connections on command.
//! - [`checker`] holds the safety checker's records and analysis
//!   (the `checker` binary runs the workers and the faults).
//! - [`process`] reads a process's memory and counts a runtime's tasks, for
//!   leak checks (the `soak` binary).
//!
//! Every wait in the harness is bounded; setup failures panic with a message
//! (and, for a server, the tail of its log).

pub mod checker;
mod cluster;
mod postgres;
pub mod process;
mod proxy;
mod sentinel;
mod server;

pub use cluster::RedisCluster;
pub use postgres::PostgresServer;
pub use proxy::FaultProxy;
pub use sentinel::{RedisSentinel, MASTER_NAME};
pub use server::{RedisServer, RedisServerBuilder};

/// The workspace README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;

/// An error with its sources, `error: source: source's source`, as an error
/// reporter prints it (`distlock::Error`'s `Display` leaves the source to
/// `source()`).
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
