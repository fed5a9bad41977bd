//! The log half of `orderline verify`: proves the log is whole and unedited, or names the first
//! event that is not ([`crate::report`] adds the read models).
//!
//! Streams are read in `(aggregate_type, aggregate_id, sequence)` order. For each event:
//! - its sequence follows the previous one in the stream (1 for the first): a deleted event
//!   leaves a gap;
//! - its payload, through the upcasters, deserializes into its aggregate's current event type;
//! - its hash equals the one recomputed from its content and the previous event's stored hash
//!   (`event_store::chain`): an edited event no longer matches.
//!
//! What this cannot see (ADR 9): the newest events of a stream deleted together, a whole stream
//! deleted, or an attacker who recomputes every later hash of a stream.

use futures::TryStreamExt;
use serde::Serialize;
use serde_json::Value;
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

use aggregates::inventory::ProductEvent;
use aggregates::operations::ConsumerEvent;
use aggregates::order::OrderEvent;
use aggregates::payment::PaymentEvent;

use event_store::chain::Hashed;
use event_store::replay::{self, Payload};

/// A log that checks out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Verified {
    /// Events checked.
    pub events: u64,
    /// Streams checked.
    pub streams: u64,
}

/// The first event that does not check out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Its global position.
    pub position: i64,
    /// Its event id.
    pub event_id: Uuid,
    /// Its stream.
    pub aggregate_type: String,
    /// Its stream.
    pub aggregate_id: String,
    /// Its sequence in the stream.
    pub sequence: i64,
    /// What is wrong.
    pub problem: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "event at position {} ({}/{} #{}, id {}): {}",
            self.position,
            self.aggregate_type,
            self.aggregate_id,
            self.sequence,
            self.event_id,
            self.problem
        )
    }
}

#[derive(FromRow)]
struct Row {
    position: i64,
    event_id: Uuid,
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    event_type: String,
    event_version: String,
    payload: Value,
    metadata: Value,
    hash: Option<Vec<u8>>,
}

/// Checks the whole log; `progress` is called with the number of events checked so far, every
/// 10,000 events.
///
/// # Errors
/// The database error, if the log cannot be read.
pub async fn verify(
    pool: &PgPool,
    progress: &(dyn Fn(u64) + Sync),
) -> sqlx::Result<Result<Verified, Finding>> {
    let mut rows = sqlx::query_as::<_, Row>(
        "SELECT position, event_id, aggregate_type, aggregate_id, sequence, event_type,
                event_version, payload, metadata, hash
           FROM events ORDER BY aggregate_type, aggregate_id, sequence",
    )
    .fetch(pool);
    let mut verified = Verified {
        events: 0,
        streams: 0,
    };
    let mut stream: Option<(String, String)> = None;
    let mut expected = 1i64;
    let mut previous: Option<Vec<u8>> = None;
    while let Some(row) = rows.try_next().await? {
        let key = (row.aggregate_type.clone(), row.aggregate_id.clone());
        if stream.as_ref() != Some(&key) {
            stream = Some(key);
            verified.streams += 1;
            expected = 1;
            previous = None;
        }
        if let Some(problem) = check(&row, expected, previous.as_deref()) {
            return Ok(Err(Finding {
                position: row.position,
                event_id: row.event_id,
                aggregate_type: row.aggregate_type,
                aggregate_id: row.aggregate_id,
                sequence: row.sequence,
                problem,
            }));
        }
        expected = row.sequence + 1;
        previous = row.hash;
        verified.events += 1;
        if verified.events.is_multiple_of(10_000) {
            progress(verified.events);
        }
    }
    progress(verified.events);
    Ok(Ok(verified))
}

fn check(row: &Row, expected: i64, previous: Option<&[u8]>) -> Option<String> {
    if row.sequence != expected {
        return Some(format!(
            "sequence {} follows {}: events before it are missing",
            row.sequence,
            expected - 1
        ));
    }
    // Read as every reader reads it: through the upcasters.
    let payload = Payload::Json(&row.payload);
    let (t, v) = (row.aggregate_type.as_str(), row.event_type.as_str());
    let version = row.event_version.as_str();
    let decoded = match t {
        "order" => replay::decode::<OrderEvent>(t, v, version, payload).map(drop),
        "inventory" => replay::decode::<ProductEvent>(t, v, version, payload).map(drop),
        "payment" => replay::decode::<PaymentEvent>(t, v, version, payload).map(drop),
        "consumer" => replay::decode::<ConsumerEvent>(t, v, version, payload).map(drop),
        other => return Some(format!("unknown aggregate type {other:?}")),
    };
    if let Err(e) = decoded {
        return Some(format!("the payload does not deserialize: {e}"));
    }
    let Some(stored) = &row.hash else {
        return Some("no hash: the event was not written by orderline".into());
    };
    let recomputed = Hashed {
        event_id: row.event_id,
        aggregate_type: &row.aggregate_type,
        aggregate_id: &row.aggregate_id,
        sequence: row.sequence,
        event_type: &row.event_type,
        event_version: &row.event_version,
        payload: &row.payload,
        metadata: &row.metadata,
    }
    .hash(previous);
    (&recomputed != stored)
        .then(|| "the hash does not match: the event was changed after it was written".into())
}
