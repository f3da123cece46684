// The core's limits, which the attribute checks at compile time: copies of
// `distlock::MIN_EXPIRY`, `MAX_EXPIRY`, `MAX_HOLD` and `MAX_KEY_LEN` (a
// proc-macro crate cannot depend on the crate it expands for). The `tests`
// crate includes this file and fails when the copies drift apart.
// (No `use` items here: the file is included elsewhere.)

/// `distlock::MIN_EXPIRY`.
pub(crate) const MIN_EXPIRY: std::time::Duration = std::time::Duration::from_millis(100);
/// `distlock::MAX_EXPIRY`.
pub(crate) const MAX_EXPIRY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// `distlock::MAX_HOLD`: the longest `at_most` or `at_least`.
pub(crate) const MAX_HOLD: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);
/// `distlock::MAX_KEY_LEN`, in bytes.
pub(crate) const MAX_KEY_LEN: usize = 1024;
