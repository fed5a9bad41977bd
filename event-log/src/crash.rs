//! The crash-test hook: with `ORDERLINE_CRASH_AT=POINT` the process aborts when it reaches
//! `POINT`, so a test can kill it at the worst moment for exactly-once and check that nothing
//! was lost or done twice after a restart. Never set in production.
//!
//! Points: `before_checkpoint_commit:CONSUMER` (a page and its checkpoint written, not
//! committed), and the saga gateway worker's `before_gateway_call`, `after_gateway_call` and
//! `after_gateway_record`.

use std::sync::OnceLock;

/// The variable naming the point at which the process aborts.
pub const CRASH_AT_ENV: &str = "ORDERLINE_CRASH_AT";

/// Aborts the process (no unwinding, no cleanup: as a `kill -9` would) if [`CRASH_AT_ENV`]
/// names `point`. The variable is read once per process.
pub fn point(point: &str) {
    static TARGET: OnceLock<Option<String>> = OnceLock::new();
    let target = TARGET.get_or_init(|| std::env::var(CRASH_AT_ENV).ok());
    if target.as_deref() == Some(point) {
        tracing::error!(point, "crash point reached: aborting");
        std::process::abort();
    }
}
