//! How long the saga waits: the authorization deadline and the retry back-off of gateway calls.

use chrono::Duration;

use aggregates::values::OrderId;

/// Timing rules of the saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long authorization may take, retries included, before the order is rejected with
    /// `payment_failed`.
    pub authorization_deadline: Duration,
    /// First retry delay after a gateway failure; doubles per failure.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_cap: Duration,
    /// Failed gateway calls in a row after which a compensation or settlement (void, refund,
    /// capture) stops and the saga is parked as stuck for an operator.
    pub settlement_attempts: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            authorization_deadline: Duration::seconds(60),
            retry_base: Duration::milliseconds(200),
            retry_cap: Duration::seconds(10),
            settlement_attempts: 8,
        }
    }
}

/// Exponential back-off with jitter: `base * 2^(failures-1)`, capped, then scaled into
/// [50 %, 100 %] by a hash of the order and the failure count. The jitter is deterministic so
/// the saga stays a pure function of its inputs, yet different orders spread out.
pub(super) fn backoff(timing: &Timing, failures: u32, order_id: OrderId) -> Duration {
    let exponent = failures.saturating_sub(1).min(20);
    let raw = timing
        .retry_base
        .checked_mul(1 << exponent)
        .unwrap_or(timing.retry_cap)
        .min(timing.retry_cap);
    let spread = (order_id.as_uuid().as_u128() as u64).wrapping_add(u64::from(failures));
    let percent =
        50 + i32::try_from(spread.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58).unwrap_or(0) * 50 / 63;
    raw * percent / 100
}
