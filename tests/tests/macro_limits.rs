//! The attribute checks the core's limits at compile time with copies of them
//! (a proc-macro crate cannot use the crate it expands for): this fails when
//! a copy drifts from `distlock`'s own.

/// The macro crate's copies, as it compiles them.
mod copies {
    #![allow(dead_code, unreachable_pub)]
    include!("../../distlock-macros/src/limits.rs");
}

#[test]
fn the_macro_checks_the_cores_limits() {
    assert_eq!(copies::MIN_EXPIRY, distlock::MIN_EXPIRY);
    assert_eq!(copies::MAX_EXPIRY, distlock::MAX_EXPIRY);
    assert_eq!(copies::MAX_HOLD, distlock::MAX_HOLD);
    assert_eq!(copies::MAX_KEY_LEN, distlock::MAX_KEY_LEN);
}
