//! Compile-time diagnostics of `#[distributed_lock]`: every misuse is an error at
//! the offending token, with a message that says what to write instead. The
//! `.stderr` snapshots in `tests/ui/macros/` are the expected compiler output.

#[test]
fn misuse_is_a_compile_error_at_the_offending_token() {
    let t = trybuild::TestCases::new();
    t.compile_fail("ui/macros/*.rs");
}

#[test]
fn stacks_below_tokio_main() {
    let t = trybuild::TestCases::new();
    t.pass("ui/macros/pass/*.rs");
}
