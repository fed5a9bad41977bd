//! The `checkpoints` table, one row per log consumer: where it is in the log, who holds its
//! lease (owner, expiry, fencing token), whether it is parked, its last error, and a rebuild's
//! progress. This module is the table's only owner:
//! the runner, the rebuilds, the read-your-writes wait and the admin view all come here.
//!
//! A checkpoint moves only in the transaction that applies the events before it (see
//! [`advance`]), so what a consumer wrote and where it is can never disagree.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::Cursor;

/// The channel `NOTIFY`ed, with the consumer's name as payload, in every transaction that moves
/// a checkpoint: a read model has advanced once the notification arrives.
pub const CHECKPOINT_CHANNEL: &str = "orderline_checkpoints";

/// Lag up to this many events is counted exactly; beyond it, it is estimated from positions.
pub const EXACT_LAG_LIMIT: i64 = 10_000;

fn cursor((transaction_id, position): (i64, i64)) -> Cursor {
    Cursor {
        transaction_id,
        position,
    }
}

/// Makes sure a checkpoint row exists for `consumer` (at the start of the log).
///
/// # Errors
/// The database error, if any.
pub async fn ensure(conn: &mut PgConnection, consumer: &str) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO checkpoints (consumer) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(consumer)
        .execute(conn)
        .await?;
    Ok(())
}

/// Where `consumer` is and whether it is parked. The row must exist ([`ensure`]).
///
/// # Errors
/// The database error, if any.
pub async fn read(conn: &mut PgConnection, consumer: &str) -> sqlx::Result<(Cursor, bool)> {
    let (transaction_id, position, state): (i64, i64, String) = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position, state FROM checkpoints WHERE consumer = $1",
    )
    .bind(consumer)
    .fetch_one(conn)
    .await?;
    Ok((cursor((transaction_id, position)), state == "parked"))
}

/// The lease a runner holds on a consumer: the fencing token it got when it took it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Grows on every takeover; a page commits only while the row still carries it.
    pub token: i64,
}

/// Takes `consumer`'s lease for `owner` for `ttl` if nobody holds it or its holder let it
/// expire, and answers it with a fencing token one higher than any before; `None` while
/// another owner's lease runs, or while a transaction has the row locked (a page in flight, a
/// rebuild's swap). The row must exist ([`ensure`]).
///
/// # Errors
/// The database error, if any.
pub async fn acquire(
    conn: &mut PgConnection,
    consumer: &str,
    owner: &str,
    ttl: std::time::Duration,
) -> sqlx::Result<Option<Lease>> {
    let token: Option<i64> = sqlx::query_scalar(
        "UPDATE checkpoints
            SET owner = $2, fencing_token = fencing_token + 1,
                lease_until = clock_timestamp() + make_interval(secs => $3)
          WHERE consumer = (SELECT consumer FROM checkpoints
                             WHERE consumer = $1
                               AND (owner IS NULL OR lease_until < clock_timestamp())
                               FOR UPDATE SKIP LOCKED)
      RETURNING fencing_token",
    )
    .bind(consumer)
    .bind(owner)
    .bind(ttl.as_secs_f64())
    .fetch_optional(conn)
    .await?;
    Ok(token.map(|token| Lease { token }))
}

/// Extends `lease` by `ttl` from now; `false` when it was taken over (the holder must stop).
/// A lease that expired but was not taken is still the holder's: no one else applied a page.
///
/// # Errors
/// The database error, if any.
pub async fn renew(
    conn: &mut PgConnection,
    consumer: &str,
    lease: Lease,
    ttl: std::time::Duration,
) -> sqlx::Result<bool> {
    let renewed = sqlx::query(
        "UPDATE checkpoints SET lease_until = clock_timestamp() + make_interval(secs => $3)
          WHERE consumer = $1 AND fencing_token = $2",
    )
    .bind(consumer)
    .bind(lease.token)
    .bind(ttl.as_secs_f64())
    .execute(conn)
    .await?;
    Ok(renewed.rows_affected() == 1)
}

/// Gives `lease` up (at shutdown), so another process takes over at once rather than after it
/// expires; nothing happens if it was taken over already.
///
/// # Errors
/// The database error, if any.
pub async fn release(conn: &mut PgConnection, consumer: &str, lease: Lease) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE checkpoints SET owner = NULL, lease_until = NULL
          WHERE consumer = $1 AND fencing_token = $2",
    )
    .bind(consumer)
    .bind(lease.token)
    .execute(conn)
    .await?;
    Ok(())
}

/// What [`lock_if_at`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// The row is locked for this transaction, at the expected cursor, under this lease.
    Ours,
    /// Another page moved the checkpoint meanwhile: throw the page away and read again.
    Moved,
    /// The lease was taken over (fenced off): commit nothing and stop.
    Fenced,
}

/// Locks `consumer`'s row for the rest of the transaction if `lease` still holds it and it is
/// still at `at`. The fencing check and the row lock are one statement, and a takeover must
/// lock the row too, so a lease cannot move between this check and the commit.
///
/// # Errors
/// The database error, if any.
pub async fn lock_if_at(
    conn: &mut PgConnection,
    consumer: &str,
    at: Cursor,
    lease: Lease,
) -> sqlx::Result<Held> {
    let row: Option<(i64, i64, i64)> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position, fencing_token FROM checkpoints
          WHERE consumer = $1 FOR UPDATE",
    )
    .bind(consumer)
    .fetch_optional(conn)
    .await?;
    Ok(match row {
        Some((_, _, token)) if token != lease.token => Held::Fenced,
        Some((transaction_id, position, _)) if cursor((transaction_id, position)) == at => {
            Held::Ours
        }
        Some(_) => Held::Moved,
        None => Held::Fenced,
    })
}

/// Locks `consumer`'s row for the rest of the transaction, whatever its position, and answers
/// it (`None` when there is no row): the live runner then waits before its next page. Rebuilds
/// and comparisons stop the live consumer this way.
///
/// # Errors
/// The database error, if any.
pub async fn lock(conn: &mut PgConnection, consumer: &str) -> sqlx::Result<Option<Cursor>> {
    let at: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position FROM checkpoints
          WHERE consumer = $1 FOR UPDATE",
    )
    .bind(consumer)
    .fetch_optional(conn)
    .await?;
    Ok(at.map(cursor))
}

/// Moves `consumer` to `next` after applying `applied` events, clears its last error, and
/// notifies [`CHECKPOINT_CHANNEL`] at commit (listeners learn that the read model moved once
/// it really has). Run it in the transaction that applied the events.
///
/// # Errors
/// The database error, if any.
pub async fn advance(
    conn: &mut PgConnection,
    consumer: &str,
    next: Cursor,
    applied: usize,
) -> sqlx::Result<()> {
    sqlx::query(
        "WITH moved AS (
            UPDATE checkpoints
               SET transaction_id = $2::text::xid8, position = $3,
                   events_applied = events_applied + $4, last_error = NULL, updated_at = now()
             WHERE consumer = $1
         RETURNING consumer)
         SELECT pg_notify($5, consumer) FROM moved",
    )
    .bind(consumer)
    .bind(next.transaction_id.to_string())
    .bind(next.position)
    .bind(i64::try_from(applied).unwrap_or(i64::MAX))
    .bind(CHECKPOINT_CHANNEL)
    .execute(conn)
    .await?;
    Ok(())
}

/// Puts a rebuilt projection's consumer at `at`, with `events` applied, running and without
/// error: the swap of a rebuild, in its transaction.
///
/// # Errors
/// The database error, if any.
pub async fn reset(
    conn: &mut PgConnection,
    consumer: &str,
    at: Cursor,
    events: u64,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE checkpoints
            SET transaction_id = $2::text::xid8, position = $3, events_applied = $4,
                state = 'running', last_error = NULL, parked_position = NULL,
                rebuild_position = NULL, updated_at = now()
          WHERE consumer = $1",
    )
    .bind(consumer)
    .bind(at.transaction_id.to_string())
    .bind(at.position)
    .bind(i64::try_from(events).unwrap_or(i64::MAX))
    .execute(conn)
    .await?;
    Ok(())
}

/// Records how far a rebuild of `consumer`'s projection got (`None` once it ended).
///
/// # Errors
/// The database error, if any.
pub async fn set_rebuild_position(
    conn: &mut PgConnection,
    consumer: &str,
    position: Option<i64>,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE checkpoints SET rebuild_position = $2 WHERE consumer = $1")
        .bind(consumer)
        .bind(position)
        .execute(conn)
        .await?;
    Ok(())
}

/// Gives a parked consumer another try (its new leader does this on taking the lease).
///
/// # Errors
/// The database error, if any.
pub async fn unpark(conn: &mut PgConnection, consumer: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE checkpoints SET state = 'running', parked_position = NULL, updated_at = now()
          WHERE consumer = $1 AND state = 'parked'",
    )
    .bind(consumer)
    .execute(conn)
    .await?;
    Ok(())
}

/// Shows a transient error on `consumer`'s row (cleared by the next [`advance`]).
///
/// # Errors
/// The database error, if any.
pub async fn note_error(pool: &PgPool, consumer: &str, error: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE checkpoints SET last_error = $2, last_error_at = now() WHERE consumer = $1",
    )
    .bind(consumer)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// Parks `consumer` on the event at `position` with `error`: it applies nothing until its next
/// leader unparks it.
///
/// # Errors
/// The database error, if any.
pub async fn park(
    pool: &PgPool,
    consumer: &str,
    error: &str,
    position: Option<i64>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE checkpoints SET state = 'parked', last_error = $2, last_error_at = now(),
                parked_position = $3, updated_at = now()
          WHERE consumer = $1",
    )
    .bind(consumer)
    .bind(error)
    .bind(position)
    .execute(pool)
    .await?;
    Ok(())
}

/// Where `consumer` is, whether it has applied the event at `min_position` (always `true`
/// without one), and the log's head, in one statement: the read-your-writes check of every
/// query.
///
/// # Errors
/// The database error, if any.
pub async fn reached(
    pool: &PgPool,
    consumer: &str,
    min_position: Option<i64>,
) -> sqlx::Result<(Cursor, bool, i64)> {
    let (transaction_id, position, applied, head): (i64, i64, bool, i64) = sqlx::query_as(
        "SELECT coalesce(c.transaction_id::text::bigint, 0), coalesce(c.position, 0),
                $2::bigint IS NULL OR EXISTS (
                    SELECT 1 FROM events e WHERE e.position = $2
                       AND (e.transaction_id, e.position) <= (c.transaction_id, c.position)),
                coalesce((SELECT max(position) FROM events), 0)
           FROM (SELECT 1) AS one LEFT JOIN checkpoints c ON c.consumer = $1",
    )
    .bind(consumer)
    .bind(min_position)
    .fetch_one(pool)
    .await?;
    Ok((cursor((transaction_id, position)), applied, head))
}

/// `consumer`'s cursor alongside one more value read in the same statement (one snapshot, one
/// round trip): `also` is a scalar `SELECT` of one text value whose only parameter is `$2`
/// (given as text; cast it), such as a read model's row as JSON. The hottest query, one order
/// by id, reads this way.
///
/// # Errors
/// The database error, if any.
pub async fn cursor_with(
    pool: &PgPool,
    consumer: &str,
    also: &'static str,
    parameter: &str,
) -> sqlx::Result<(Cursor, Option<String>)> {
    let sql = format!(
        "SELECT coalesce(c.transaction_id::text::bigint, 0), coalesce(c.position, 0), ({also})
           FROM (SELECT 1) AS one LEFT JOIN checkpoints c ON c.consumer = $1"
    );
    let (transaction_id, position, row): (i64, i64, Option<String>) = sqlx::query_as(&sql)
        .bind(consumer)
        .bind(parameter)
        .fetch_one(pool)
        .await?;
    Ok((cursor((transaction_id, position)), row))
}

/// One consumer's progress, as the admin API and `/metrics` show it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Progress {
    /// The consumer's name.
    pub name: String,
    /// Position of the last event applied.
    pub position: i64,
    /// Events in the log after it (exact up to [`EXACT_LAG_LIMIT`], an upper bound beyond).
    pub lag: i64,
    /// Age of the oldest event not applied yet, in seconds (0 when caught up).
    pub lag_seconds: f64,
    /// `running` or `parked`.
    pub state: String,
    /// Events applied since the consumer began (or since its last rebuild).
    pub events_applied: i64,
    /// The last error of a page, until a page succeeds.
    pub last_error: Option<String>,
    /// When that error happened.
    pub last_error_at: Option<DateTime<Utc>>,
    /// While parked: the position of the event it is parked on.
    pub parked_position: Option<i64>,
    /// While a rebuild runs: the position it has reached.
    pub rebuild_position: Option<i64>,
    /// Who holds the lease (`host:pid:runner`), if anyone.
    pub owner: Option<String>,
    /// The lease's fencing token: one more on every takeover.
    pub fencing_token: i64,
    /// Until when the lease runs unless renewed.
    pub lease_until: Option<DateTime<Utc>>,
}

/// The statement behind [`progress`]: each subquery walks the `events_global_order` index from
/// the checkpoint and stops after [`EXACT_LAG_LIMIT`] events, so the cost is bounded whatever
/// the log's size; a consumer further behind reports `max(position) - its position`
/// (positions can have gaps, so that is an upper bound). Public so that tests can check its
/// plan on a large log.
pub const PROGRESS_SQL: &str = "SELECT c.consumer AS name, c.position, c.state,
        c.events_applied, c.last_error, c.last_error_at, c.parked_position, c.rebuild_position,
        c.owner, c.fencing_token, c.lease_until,
        CASE WHEN behind.n > $1
             THEN greatest((SELECT max(position) FROM events) - c.position, behind.n)
             ELSE behind.n END AS lag,
        coalesce(extract(epoch FROM now() - (
            SELECT e.recorded_at FROM events e
             WHERE (e.transaction_id, e.position) > (c.transaction_id, c.position)
             ORDER BY e.transaction_id, e.position LIMIT 1))::float8, 0) AS lag_seconds
   FROM checkpoints c
   CROSS JOIN LATERAL (
        SELECT count(*) AS n FROM (
            SELECT 1 FROM events e
             WHERE (e.transaction_id, e.position) > (c.transaction_id, c.position)
             ORDER BY e.transaction_id, e.position LIMIT $1 + 1) AS page) AS behind
  ORDER BY c.consumer";

/// Every consumer's progress, by name.
///
/// # Errors
/// The database error, if any.
pub async fn progress(pool: &PgPool) -> sqlx::Result<Vec<Progress>> {
    sqlx::query_as(PROGRESS_SQL)
        .bind(EXACT_LAG_LIMIT)
        .fetch_all(pool)
        .await
}
