//! The orderline query API: the read half of the HTTP contract (`../shared/API.md`, sections
//! Queries and Admin and tooling).
//!
//! Read models are eventually consistent. Every answer carries `X-Orderline-Position`, the
//! position of the last event its read model applied, and `?min_position=N` waits (up to
//! [`MAX_WAIT`]) until the read model has applied event N, else answers 503 with `Retry-After`.

pub mod catalog;
pub mod live;
pub mod orders;
pub mod payments;

use std::time::Duration;

use axum::extract::FromRef;
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use sqlx::PgPool;

use api_common::auth::TokenKeys;
use api_common::error::ApiError;
pub use api_common::position::{Read, POSITION_HEADER};
use event_log::checkpoints;
use event_log::Cursor;

/// Longest `min_position` wait before 503.
pub const MAX_WAIT: Duration = Duration::from_secs(5);

/// Most requests of one server that may wait for `min_position` at once; one more is
/// answered 503 at once, so waiting clients cannot pile up connections and tasks.
pub const MAX_WAITERS: usize = 256;

/// What the query handlers share.
#[derive(Clone)]
pub struct QueryState {
    /// The database with the read models.
    pub pool: PgPool,
    /// Token verification keys.
    pub keys: TokenKeys,
    /// The process's fan-out of read-model moves to long-lived streams.
    pub live: live::LiveUpdates,
    /// Places for requests waiting on `min_position` ([`MAX_WAITERS`]).
    pub waiters: std::sync::Arc<tokio::sync::Semaphore>,
}

impl FromRef<QueryState> for TokenKeys {
    fn from_ref(state: &QueryState) -> Self {
        state.keys.clone()
    }
}

/// The query routes, ready to be merged into the server's router.
pub fn router(state: QueryState) -> Router {
    Router::new()
        .route("/api/v1/orders", get(orders::list))
        .route("/api/v1/orders/{id}", get(orders::one))
        .route("/api/v1/orders/{id}/events", get(orders::events))
        .route("/api/v1/orders/{id}/updates", get(orders::updates))
        .route("/api/v1/products", get(catalog::products))
        .route("/api/v1/products/{sku}", get(catalog::product))
        .route("/api/v1/inventory", get(catalog::levels))
        .route("/api/v1/inventory/{sku}", get(catalog::level))
        .route("/api/v1/payments/{order_id}", get(payments::one))
        .with_state(state)
}

/// `?min_position=N`, accepted by every query; no other parameter is.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consistency {
    /// Wait until the read model has applied this position.
    pub min_position: Option<i64>,
}

/// The cursor `projection` has reached, once it has applied `min_position` (if given).
///
/// A position beyond the log's head names no event yet (positions come from committed
/// commands), so it is answered 503 at once instead of after [`MAX_WAIT`].
///
/// # Errors
/// 400 for a negative position; 503 (with `Retry-After`) when the read model has not applied it
/// within [`MAX_WAIT`], when it is beyond the log's head, or when [`MAX_WAITERS`] requests
/// already wait; 500 on database failure.
pub async fn reached(
    state: &QueryState,
    projection: &str,
    consistency: &Consistency,
) -> Result<Cursor, ApiError> {
    if consistency.min_position.is_some_and(|p| p < 0) {
        return Err(ApiError::field("min_position", "must not be negative"));
    }
    let deadline = tokio::time::Instant::now() + MAX_WAIT;
    let mut pause = Duration::from_millis(2);
    let not_yet = || {
        ApiError::Unavailable(format!(
            "the {projection} read model has not reached position {} yet; retry",
            consistency.min_position.unwrap_or_default()
        ))
    };
    let mut waiting = None;
    loop {
        let (cursor, applied, head) =
            checkpoints::reached(&state.pool, projection, consistency.min_position).await?;
        if applied {
            // Every event up to `min_position` is applied, so the read model has reached it
            // even when its lowest partition's own last event is older.
            let position = consistency
                .min_position
                .map_or(cursor.position, |p| p.max(cursor.position));
            return Ok(Cursor { position, ..cursor });
        }
        if consistency.min_position.is_some_and(|p| p > head) {
            return Err(ApiError::Unavailable(format!(
                "position {} is beyond the log's head ({head}); pass a position a command answered",
                consistency.min_position.unwrap_or_default()
            )));
        }
        if waiting.is_none() {
            waiting = Some(state.waiters.try_acquire().map_err(|_| {
                ApiError::Unavailable(format!(
                    "{MAX_WAITERS} requests already wait for read models here; retry"
                ))
            })?);
        }
        if tokio::time::Instant::now() + pause > deadline {
            return Err(not_yet());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}
