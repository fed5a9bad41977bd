//! The `parked_keys` table: keys (aggregate ids) that a consumer parked on a poison event, and
//! the operator's requests to retry or skip them. This module is the table's only owner.
//!
//! A key is parked by the runner of its partition when one of its events keeps failing: the
//! row holds that event's cursor, and the partition's checkpoint moves on past it, so every
//! other key flows. The key's later events are passed over by the runner (they wait behind
//! the parked one, in log order) until an operator asks for a `retry` (from the parked event)
//! or a `skip` (from the one after it); the runner then applies the key's held events up to
//! its checkpoint and removes the row, or parks the key again at the event that failed.
//!
//! Only the runner adds or removes a key, under its partition's row lock and fencing token,
//! bumping `checkpoints.parked_version` each time, so a page filtered with an outdated set of
//! keys is never committed. Operators only set `action` on an existing row.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::{Cursor, LogEvent};

/// What an operator asked the runner to do with a parked key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Apply the key's events again from the parked one.
    Retry,
    /// Pass over the parked event and apply the key's events after it.
    Skip,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::Skip => "skip",
        }
    }

    fn parse(raw: Option<&str>) -> Option<Self> {
        match raw {
            Some("retry") => Some(Self::Retry),
            Some("skip") => Some(Self::Skip),
            _ => None,
        }
    }
}

/// One parked key as its partition's runner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParkedKey {
    /// The key's first event not applied: the parked event.
    pub cursor: Cursor,
    /// What an operator asked for, if anything yet.
    pub action: Option<Action>,
}

/// A partition's parked keys, by key.
pub type ParkedSet = HashMap<String, ParkedKey>;

fn cursor((transaction_id, position): (i64, i64)) -> Cursor {
    Cursor {
        transaction_id,
        position,
    }
}

fn int(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

/// The parked keys of one partition (of `partitions`) of `consumer`.
///
/// # Errors
/// The database error, if any.
pub async fn of_partition(
    conn: &mut PgConnection,
    consumer: &str,
    partitions: u32,
    partition: u32,
) -> sqlx::Result<ParkedSet> {
    let rows: Vec<(String, i64, i64, Option<String>)> = sqlx::query_as(
        "SELECT key, transaction_id::text::bigint, position, action FROM parked_keys
          WHERE consumer = $1 AND (key_hash & ($2 - 1)) = $3",
    )
    .bind(consumer)
    .bind(int(partitions.max(1)))
    .bind(int(partition))
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(key, tx, pos, action)| {
            let parked = ParkedKey {
                cursor: cursor((tx, pos)),
                action: Action::parse(action.as_deref()),
            };
            (key, parked)
        })
        .collect())
}

/// Parks `event`'s key for `consumer` with `error` after `attempts` failures, in the page's
/// transaction (which holds `partition`'s row lock), and answers the partition's new
/// `parked_version`.
///
/// # Errors
/// The database error, if any.
pub async fn park(
    conn: &mut PgConnection,
    consumer: &str,
    partition: u32,
    event: &LogEvent,
    error: &str,
    attempts: u32,
) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "WITH parked AS (
            INSERT INTO parked_keys (consumer, key, key_hash, transaction_id, position, error, attempts)
            VALUES ($1, $3, $4, $5::text::xid8, $6, $7, $8)
            ON CONFLICT (consumer, key) DO NOTHING)
         UPDATE checkpoints SET parked_version = parked_version + 1
          WHERE consumer = $1 AND partition = $2
      RETURNING parked_version",
    )
    .bind(consumer)
    .bind(int(partition))
    .bind(&event.aggregate_id)
    .bind(event.key_hash)
    .bind(event.transaction_id.to_string())
    .bind(event.position)
    .bind(error)
    .bind(int(attempts))
    .fetch_one(conn)
    .await
}

/// After the runner applied a parked key's held events through some event, in that page's
/// transaction: `next` is the key's next held event (the key stays parked with a retry pending
/// from there), or `None` when none is left (the key is free again, and the partition's
/// `parked_version` is bumped). Answers the partition's `parked_version`, or `None` when the
/// row is not as `expected` any more (an operator asked for something else meanwhile): roll
/// back and read the row again.
///
/// # Errors
/// The database error, if any.
pub async fn resume(
    conn: &mut PgConnection,
    consumer: &str,
    partition: u32,
    key: &str,
    expected: ParkedKey,
    next: Option<Cursor>,
) -> sqlx::Result<Option<i64>> {
    let matches = "consumer = $1 AND key = $3
                   AND (transaction_id, position) = ($4::text::xid8, $5)
                   AND action IS NOT DISTINCT FROM $6";
    let sql = match next {
        Some(_) => format!(
            "WITH moved AS (
                UPDATE parked_keys SET transaction_id = $7::text::xid8, position = $8,
                       action = 'retry'
                 WHERE {matches} RETURNING 1)
             SELECT parked_version FROM checkpoints
              WHERE consumer = $1 AND partition = $2 AND EXISTS (SELECT 1 FROM moved)"
        ),
        None => format!(
            "WITH freed AS (DELETE FROM parked_keys WHERE {matches} RETURNING 1)
             UPDATE checkpoints SET parked_version = parked_version + 1
              WHERE consumer = $1 AND partition = $2 AND EXISTS (SELECT 1 FROM freed)
          RETURNING parked_version"
        ),
    };
    let next = next.unwrap_or_default();
    sqlx::query_scalar(&sql)
        .bind(consumer)
        .bind(int(partition))
        .bind(key)
        .bind(expected.cursor.transaction_id.to_string())
        .bind(expected.cursor.position)
        .bind(expected.action.map(Action::as_str))
        .bind(next.transaction_id.to_string())
        .bind(next.position)
        .fetch_optional(conn)
        .await
}

/// A retry of a parked key failed at the event at `at`: the key stays parked there with
/// `error`, one more attempt counted, and no request pending. `false` when the row is not as
/// `expected` any more (read it again).
///
/// # Errors
/// The database error, if any.
pub async fn failed(
    pool: &PgPool,
    consumer: &str,
    key: &str,
    expected: ParkedKey,
    at: Cursor,
    error: &str,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE parked_keys
            SET transaction_id = $5::text::xid8, position = $6, error = $7,
                attempts = attempts + 1, action = NULL, parked_at = now()
          WHERE consumer = $1 AND key = $2
            AND (transaction_id, position) = ($3::text::xid8, $4)
            AND action IS NOT DISTINCT FROM $8",
    )
    .bind(consumer)
    .bind(key)
    .bind(expected.cursor.transaction_id.to_string())
    .bind(expected.cursor.position)
    .bind(at.transaction_id.to_string())
    .bind(at.position)
    .bind(error)
    .bind(expected.action.map(Action::as_str))
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A parked key as operators see it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Parked {
    /// The consumer that parked it.
    pub consumer: String,
    /// The key: the aggregate id.
    pub key: String,
    /// Its partition.
    pub partition: i32,
    /// The parked event's global position; every later event of the key waits behind it.
    pub position: i64,
    /// The parked event's cursor, `TRANSACTION-POSITION`.
    pub cursor: String,
    /// The parked event's id.
    pub event_id: Option<uuid::Uuid>,
    /// The parked event's aggregate type.
    pub aggregate_type: Option<String>,
    /// The parked event's type.
    pub event_type: Option<String>,
    /// The parked event's sequence in its stream.
    pub sequence: Option<i64>,
    /// Why it failed, the last time it was tried.
    pub error: String,
    /// Failed attempts at it.
    pub attempts: i32,
    /// When it was parked (or failed again).
    pub parked_at: DateTime<Utc>,
    /// `retry` or `skip` while an operator's request waits for the runner.
    pub action: Option<String>,
    /// Who asked (`role:sub`).
    pub requested_by: Option<String>,
    /// When.
    pub requested_at: Option<DateTime<Utc>>,
}

const PARKED_COLUMNS: &str = "p.consumer, p.key, (p.key_hash & (lp.partitions - 1)) AS partition,
       p.position, p.transaction_id::text || '-' || p.position AS cursor,
       e.event_id, e.aggregate_type, e.event_type, e.sequence, p.error, p.attempts, p.parked_at, p.action,
       p.requested_by, p.requested_at";

/// Every parked key (of `consumer`, if given), oldest first, at most `limit`.
///
/// # Errors
/// The database error, if any.
pub async fn list(pool: &PgPool, consumer: Option<&str>, limit: i64) -> sqlx::Result<Vec<Parked>> {
    sqlx::query_as(&format!(
        "SELECT {PARKED_COLUMNS}
           FROM parked_keys p
          CROSS JOIN log_partitions lp
           LEFT JOIN events e ON e.position = p.position
          WHERE $1::text IS NULL OR p.consumer = $1
          ORDER BY p.parked_at, p.consumer, p.key
          LIMIT $2"
    ))
    .bind(consumer)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// How many keys each consumer has parked, and the lowest position among them.
///
/// # Errors
/// The database error, if any.
pub async fn counts(pool: &PgPool) -> sqlx::Result<Vec<(String, i64, i64)>> {
    sqlx::query_as(
        "SELECT consumer, count(*), min(position) FROM parked_keys GROUP BY consumer ORDER BY consumer",
    )
    .fetch_all(pool)
    .await
}

/// What became of an operator's request.
#[derive(Debug, Clone)]
pub enum Requested {
    /// Recorded; the partition's runner acts on it within its polling interval.
    Done(Box<Parked>),
    /// The key is not parked (never was, or was freed meanwhile).
    NotParked,
    /// A skip of the parked event is waiting already; it cannot be turned into a retry or
    /// asked for twice.
    SkipPending,
}

/// Asks for `action` on `consumer`'s parked `key` on behalf of `by` (`role:sub`). A skip locks
/// the row and answers it before the request is recorded, so the caller can record who
/// skipped which event in the same transaction (`conn`). The runner's own updates check the
/// row they read, so a request made while it retries the key makes that retry start over.
///
/// # Errors
/// The database error, if any.
pub async fn request(
    conn: &mut PgConnection,
    consumer: &str,
    key: &str,
    action: Action,
    by: &str,
) -> sqlx::Result<Requested> {
    let found: Option<Parked> = sqlx::query_as(&format!(
        "SELECT {PARKED_COLUMNS}
           FROM parked_keys p
          CROSS JOIN log_partitions lp
           LEFT JOIN events e ON e.position = p.position
          WHERE p.consumer = $1 AND p.key = $2
            FOR UPDATE OF p"
    ))
    .bind(consumer)
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(mut parked) = found else {
        return Ok(Requested::NotParked);
    };
    if parked.action.as_deref() == Some("skip") {
        return Ok(Requested::SkipPending);
    }
    let (at,): (DateTime<Utc>,) = sqlx::query_as(
        "UPDATE parked_keys SET action = $3, requested_by = $4, requested_at = now()
          WHERE consumer = $1 AND key = $2 RETURNING requested_at",
    )
    .bind(consumer)
    .bind(key)
    .bind(action.as_str())
    .bind(by)
    .fetch_one(&mut *conn)
    .await?;
    parked.action = Some(action.as_str().to_owned());
    parked.requested_by = Some(by.to_owned());
    parked.requested_at = Some(at);
    Ok(Requested::Done(Box::new(parked)))
}

/// Frees every parked key of `consumer`: a rebuild of its projection, in its swap transaction
/// (with [`crate::checkpoints::reset`], which tells the runners), applied their events.
///
/// # Errors
/// The database error, if any.
pub async fn clear(conn: &mut PgConnection, consumer: &str) -> sqlx::Result<u64> {
    let freed = sqlx::query("DELETE FROM parked_keys WHERE consumer = $1")
        .bind(consumer)
        .execute(conn)
        .await?;
    Ok(freed.rows_affected())
}
