//! The distlock test harness: real `redis-server` processes on free ports.
//!
//! - [`RedisServer`] starts, kills, restarts, pauses and resumes a server,
//!   and has a few async helpers for assertions (`get`, `pttl`, `keys`, ...).
//!
//! Every wait in the harness is bounded; setup failures panic with a message
//! (and, for a server, the tail of its log).

mod server;

pub use server::{RedisServer, RedisServerBuilder};
