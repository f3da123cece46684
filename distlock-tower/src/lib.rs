//! Tower middleware for [distlock](https://docs.rs/distlock).
//!
//! The per-key `LockLayer` is being built in its own issue; this crate exports
//! nothing yet.
