//! Time travel: an aggregate as it was at a version or at a moment, folded from its events with
//! the same `apply` the write side uses. `GET /api/v1/admin/streams/...` and `orderline state`
//! both come here.

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

use aggregates::inventory::Product;
use aggregates::operations::LogConsumer;
use aggregates::order::Order;
use aggregates::payment::Payment;

use event_store::replay;

/// Which point in a stream's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// After its event number N (1-based).
    Version(i64),
    /// After every event recorded at or before this moment.
    Time(DateTime<Utc>),
    /// After every event recorded so far.
    Latest,
}

/// An aggregate as it was.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StateAt {
    /// `order`, `inventory` or `payment`.
    pub aggregate_type: String,
    /// Its id.
    pub aggregate_id: String,
    /// The number of the last event folded in.
    pub version: i64,
    /// When that event was recorded.
    pub recorded_at: DateTime<Utc>,
    /// The state, as the aggregate serializes it.
    pub state: Value,
}

/// Why a state could not be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// Not one of `order`, `inventory`, `payment`: a client error.
    #[error("unknown aggregate type {0:?}: use order, inventory or payment")]
    UnknownType(String),
    /// A stored event does not deserialize: run `orderline verify`.
    #[error("event {sequence} of {aggregate_type}/{aggregate_id} does not deserialize: {source}")]
    Corrupt {
        /// The stream's aggregate type (`order`, `inventory`, `payment`).
        aggregate_type: String,
        /// The stream's aggregate id.
        aggregate_id: String,
        /// Event number.
        sequence: i64,
        /// What the decoder said.
        source: serde_json::Error,
    },
    /// Postgres failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// The aggregate `aggregate_type/id` at `at`; `None` if it had no event by then.
///
/// # Errors
/// [`HistoryError`].
pub async fn state_at(
    pool: &PgPool,
    aggregate_type: &str,
    id: &str,
    at: At,
) -> Result<Option<StateAt>, HistoryError> {
    match aggregate_type {
        "order" => fold::<Order>(pool, id, at).await,
        "inventory" => fold::<Product>(pool, id, at).await,
        "payment" => fold::<Payment>(pool, id, at).await,
        "consumer" => fold::<LogConsumer>(pool, id, at).await,
        other => Err(HistoryError::UnknownType(other.to_owned())),
    }
}

async fn fold<A: Aggregate + Serialize>(
    pool: &PgPool,
    id: &str,
    at: At,
) -> Result<Option<StateAt>, HistoryError> {
    let (version, time) = match at {
        At::Version(n) => (Some(n), None),
        At::Time(t) => (None, Some(t)),
        At::Latest => (None, None),
    };
    let events: Vec<(i64, DateTime<Utc>, String, String, Value)> = sqlx::query_as(
        "SELECT sequence, recorded_at, event_type, event_version, payload FROM events
          WHERE aggregate_type = $1 AND aggregate_id = $2
            AND ($3::bigint IS NULL OR sequence <= $3)
            AND ($4::timestamptz IS NULL OR recorded_at <= $4)
          ORDER BY sequence",
    )
    .bind(A::TYPE)
    .bind(id)
    .bind(version)
    .bind(time)
    .fetch_all(pool)
    .await?;
    let Some(&(last, recorded_at, ..)) = events.last() else {
        return Ok(None);
    };
    let mut aggregate = A::default();
    for (sequence, _, event_type, event_version, payload) in events {
        let payload = replay::Payload::Json(&payload);
        replay::apply(&mut aggregate, &event_type, &event_version, payload).map_err(|source| {
            HistoryError::Corrupt {
                aggregate_type: A::TYPE.to_owned(),
                aggregate_id: id.to_owned(),
                sequence,
                source,
            }
        })?;
    }
    let state = serde_json::to_value(&aggregate).map_err(|source| HistoryError::Corrupt {
        aggregate_type: A::TYPE.to_owned(),
        aggregate_id: id.to_owned(),
        sequence: last,
        source,
    })?;
    Ok(Some(StateAt {
        aggregate_type: A::TYPE.to_owned(),
        aggregate_id: id.to_owned(),
        version: last,
        recorded_at,
        state,
    }))
}
