//! Procedural macros for [distlock](https://docs.rs/distlock).
//!
//! The `#[distributed_lock]` attribute is being built in its own issue; this crate
//! exports nothing yet.
