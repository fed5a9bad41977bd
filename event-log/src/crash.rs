//! The crash-test hooks: with `ORDERLINE_CRASH_AT=POINT` the process aborts when it reaches
//! `POINT`, so a test can kill it at the worst moment for exactly-once and check that nothing
//! was lost or done twice after a restart; with `ORDERLINE_PAUSE_AT=POINT=SECONDS` the task
//! that first reaches `POINT` stops there that long, as a frozen process would, so a test can
//! let its lease move on and check that the stale page is refused: while it sleeps, the lease
//! manager of the consumer the point names renews nothing ([`frozen`]), as in a frozen process.
//! Never set in production.
//!
//! Points: `before_checkpoint_commit:CONSUMER` (a page and its checkpoint written, not
//! committed), `before_page_lock:CONSUMER` (a page read and delivered, its checkpoint not
//! locked yet), and the saga gateway worker's `before_gateway_call`, `after_gateway_call` and
//! `after_gateway_record`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The consumer a pause froze, and until when.
static FROZEN: Mutex<Option<(String, Instant)>> = Mutex::new(None);

/// Whether a pause point of `consumer` (`...:CONSUMER`) is sleeping now.
pub fn frozen(consumer: &str) -> bool {
    let frozen = FROZEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    frozen
        .as_ref()
        .is_some_and(|(who, until)| who == consumer && Instant::now() < *until)
}

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

/// The variable naming the point at which one task pauses, and for how long.
pub const PAUSE_AT_ENV: &str = "ORDERLINE_PAUSE_AT";

/// Sleeps for the given seconds, once per process, if [`PAUSE_AT_ENV`] is `point=SECONDS`.
pub async fn pause(point: &str) {
    static TARGET: OnceLock<Option<(String, Duration)>> = OnceLock::new();
    static PAUSED: AtomicBool = AtomicBool::new(false);
    let target = TARGET.get_or_init(|| {
        let raw = std::env::var(PAUSE_AT_ENV).ok()?;
        let (at, seconds) = raw.rsplit_once('=')?;
        Some((
            at.to_owned(),
            Duration::from_secs_f64(seconds.parse().ok()?),
        ))
    });
    if let Some((at, duration)) = target {
        if at == point && !PAUSED.swap(true, Ordering::SeqCst) {
            tracing::warn!(point, ?duration, "pause point reached: sleeping");
            if let Some((_, consumer)) = point.rsplit_once(':') {
                *FROZEN
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some((consumer.to_owned(), Instant::now() + *duration));
            }
            tokio::time::sleep(*duration).await;
        }
    }
}
