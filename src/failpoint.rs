//! Failpoints: named places where a test build can make the process die, to
//! exercise crash windows (for example between an outbox publish and its mark).
//!
//! Compiled in only with the `failpoints` feature (off by default; MyEvents'
//! tests enable it). Armed through `HERALD_FAILPOINTS`, a comma-separated list
//! of names, read once per process. An armed point aborts the process
//! (SIGABRT): no destructors, no flush, no shutdown, as in a crash.

/// Aborts the process if the failpoint `name` is armed.
#[cfg(feature = "failpoints")]
pub(crate) fn hit(name: &str) {
    use std::sync::OnceLock;
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        std::env::var("HERALD_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|point| !point.is_empty())
            .map(str::to_owned)
            .collect()
    });
    if armed.iter().any(|point| point == name) {
        log::error!(target: "herald::failpoint", "failpoint={name} hit: aborting");
        log::logger().flush();
        std::process::abort();
    }
}

/// Without the `failpoints` feature a failpoint is nothing at all.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn hit(_name: &str) {}
