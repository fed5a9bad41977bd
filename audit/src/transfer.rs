//! `orderline export` and `orderline import`: the log as NDJSON, one event per line, exactly as
//! stored, so a round trip reproduces the same streams, positions and hash chains.
//!
//! Events are exported in log order with their original transaction id. Import replays each
//! original transaction as one transaction of its own, in the same order, so the imported log
//! has the same order as the original (ADR 2) and every consumer folds it the same way. Events
//! are exported as stored, not upcast: the hash chain covers the stored form, and readers
//! upcast on the way in.

use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

/// One exported event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, FromRow)]
pub struct Exported {
    /// Global position (kept on import).
    pub position: i64,
    /// The original writing transaction (import groups by it).
    pub transaction_id: i64,
    /// Event id.
    pub event_id: Uuid,
    /// The stream's aggregate type (`order`, `inventory`, `payment`).
    pub aggregate_type: String,
    /// The stream's aggregate id.
    pub aggregate_id: String,
    /// Sequence in the stream.
    pub sequence: i64,
    /// Event type.
    pub event_type: String,
    /// Schema version as stored.
    pub event_version: String,
    /// When it was recorded.
    pub recorded_at: chrono::DateTime<chrono::Utc>,
    /// Metadata as stored.
    pub metadata: Value,
    /// Payload as stored.
    pub payload: Value,
    /// The hash chain link, hex; `None` for events without one.
    pub hash: Option<String>,
}

/// Why an import stopped.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Import only fills an empty log.
    #[error("the database already holds {0} events; import needs an empty one")]
    NotEmpty(i64),
    /// A line is not an exported event.
    #[error("line {line}: {message}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Postgres failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Streams every event after `since` (a position; 0 for all), in log order, to `write`.
/// Returns how many were written.
///
/// # Errors
/// The database error, or the error `write` returned.
pub async fn export<E: From<sqlx::Error>>(
    pool: &PgPool,
    since: i64,
    mut write: impl FnMut(&Exported) -> Result<(), E>,
) -> Result<u64, E> {
    let mut rows = sqlx::query_as::<_, Exported>(
        "SELECT position, transaction_id::text::bigint AS transaction_id, event_id,
                aggregate_type, aggregate_id, sequence, event_type, event_version, recorded_at,
                metadata, payload, encode(hash, 'hex') AS hash
           FROM events WHERE position > $1
          ORDER BY events.transaction_id, events.position",
    )
    .bind(since)
    .fetch(pool);
    let mut written = 0;
    while let Some(event) = rows.try_next().await? {
        write(&event)?;
        written += 1;
    }
    Ok(written)
}

/// Imports `lines` (an export) into an empty log. Returns how many events were imported.
///
/// # Errors
/// [`ImportError`]; nothing of a failed original transaction is kept, earlier ones are.
pub async fn import(
    pool: &PgPool,
    lines: impl IntoIterator<Item = std::io::Result<String>>,
) -> Result<u64, ImportError> {
    let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?;
    if existing > 0 {
        return Err(ImportError::NotEmpty(existing));
    }
    let mut group: Vec<(usize, Exported)> = Vec::new();
    let mut imported = 0u64;
    for (index, line) in lines.into_iter().enumerate() {
        let bad = |message: String| ImportError::BadLine {
            line: index + 1,
            message,
        };
        let line = line.map_err(|e| bad(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let event: Exported = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        if group
            .last()
            .is_some_and(|(_, last)| last.transaction_id != event.transaction_id)
        {
            imported += write_transaction(pool, &std::mem::take(&mut group)).await?;
        }
        group.push((index + 1, event));
    }
    imported += write_transaction(pool, &group).await?;
    // New appends continue after the imported positions.
    sqlx::query(
        "SELECT setval(pg_get_serial_sequence('events', 'position'),
                       greatest((SELECT max(position) FROM events), 1))",
    )
    .execute(pool)
    .await?;
    Ok(imported)
}

/// Writes one original transaction's events in one transaction.
async fn write_transaction(
    pool: &PgPool,
    events: &[(usize, Exported)],
) -> Result<u64, ImportError> {
    if events.is_empty() {
        return Ok(0);
    }
    let mut tx = pool.begin().await?;
    event_store::locks::announce_writer(&mut tx).await?;
    for (line, event) in events {
        let hash = event
            .hash
            .as_deref()
            .map(hex::decode)
            .transpose()
            .map_err(|e| ImportError::BadLine {
                line: *line,
                message: format!("the hash is not hex: {e}"),
            })?;
        sqlx::query(
            "INSERT INTO events (position, event_id, aggregate_type, aggregate_id, sequence,
                                 event_type, event_version, recorded_at, metadata, payload, hash)
             OVERRIDING SYSTEM VALUE
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(event.position)
        .bind(event.event_id)
        .bind(&event.aggregate_type)
        .bind(&event.aggregate_id)
        .bind(event.sequence)
        .bind(&event.event_type)
        .bind(&event.event_version)
        .bind(event.recorded_at)
        .bind(&event.metadata)
        .bind(&event.payload)
        .bind(hash)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(events.len() as u64)
}
