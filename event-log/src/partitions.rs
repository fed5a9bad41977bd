//! How many partitions the log has: one number per database (`log_partitions`), a power of two,
//! 16 unless a process asks for more. Each consumer has a checkpoint row and a lease per
//! partition; an event's partition is the low bits of its `key_hash` (a hash of its aggregate
//! id, stored with it), and an index per partition count lets each partition read only its own
//! events. See `docs/adr/0011-partitioned-log.md`.
//!
//! The count can grow, never shrink: growing splits each partition `p` of `n` into
//! `p, p + n, p + 2n, ...`, whose keys all were in `p`, so each new partition starts exactly
//! where `p` was and nothing is applied twice or skipped. Shrinking would merge partitions at
//! different cursors, which this does not do.

use sqlx::{Acquire, PgConnection, PgPool};

/// Partitions of a new database (the migration creates them).
pub const DEFAULT_PARTITIONS: u32 = 16;

/// Most partitions a log can have.
pub const MAX_PARTITIONS: u32 = 256;

/// Why the partition count could not be what a process asked for.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// Not a power of two between 1 and [`MAX_PARTITIONS`].
    #[error("{0} partitions: the count must be a power of two from 1 to 256")]
    Invalid(u32),
    /// Fewer than the database has.
    #[error("the log has {current} partitions and cannot go down to {wanted}; set ORDERLINE_LOG_PARTITIONS={current} or more")]
    CannotShrink {
        /// What the database has.
        current: u32,
        /// What was asked for.
        wanted: u32,
    },
    /// Postgres failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Whether `n` can be a partition count.
pub fn valid(n: u32) -> bool {
    n.is_power_of_two() && n <= MAX_PARTITIONS
}

/// The database's partition count.
///
/// # Errors
/// The database error, if any.
pub async fn current(conn: &mut PgConnection) -> sqlx::Result<u32> {
    let n: i32 = sqlx::query_scalar("SELECT partitions FROM log_partitions")
        .fetch_one(conn)
        .await?;
    Ok(u32::try_from(n).unwrap_or(DEFAULT_PARTITIONS))
}

fn index_sql(partitions: u32) -> String {
    format!(
        "CREATE INDEX IF NOT EXISTS events_partition_{partitions}
             ON events ((key_hash & {}), transaction_id, position)",
        partitions - 1
    )
}

/// Makes the log have `wanted` partitions, splitting every consumer's partitions when the
/// database has fewer, and answers the count. Splitting builds the new partition index first
/// (writes wait while it is built), then in one transaction copies each checkpoint to the
/// partitions it splits into and ends every lease (a higher token), so processes still running
/// with the old count commit nothing more and take no lease again until they restart.
///
/// # Errors
/// [`PartitionError::Invalid`], [`PartitionError::CannotShrink`], or the database error.
pub async fn ensure(pool: &PgPool, wanted: u32) -> Result<u32, PartitionError> {
    if !valid(wanted) {
        return Err(PartitionError::Invalid(wanted));
    }
    let mut conn = pool.acquire().await?;
    let now = current(&mut conn).await?;
    if wanted < now {
        return Err(PartitionError::CannotShrink {
            current: now,
            wanted,
        });
    }
    sqlx::query(&index_sql(wanted)).execute(&mut *conn).await?;
    if wanted == now {
        return Ok(now);
    }
    let mut tx = conn.begin().await?;
    let now: i32 = sqlx::query_scalar("SELECT partitions FROM log_partitions FOR UPDATE")
        .fetch_one(&mut *tx)
        .await?;
    let now = u32::try_from(now).unwrap_or(DEFAULT_PARTITIONS);
    if wanted <= now {
        // Another process split meanwhile.
        return Ok(now);
    }
    // Waits for every page in flight; none starts until the commit.
    sqlx::query("SELECT 1 FROM checkpoints FOR UPDATE")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO checkpoints (consumer, partition, transaction_id, position, last_error,
                                  last_error_at, parked_version, fencing_token)
         SELECT c.consumer, c.partition + k * $1, c.transaction_id, c.position, c.last_error,
                c.last_error_at, c.parked_version, c.fencing_token
           FROM checkpoints c CROSS JOIN generate_series(1, $2 / $1 - 1) AS k
          WHERE c.partition < $1
         ON CONFLICT (consumer, partition) DO NOTHING",
    )
    .bind(i32::try_from(now).unwrap_or(1))
    .bind(i32::try_from(wanted).unwrap_or(1))
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE checkpoints SET owner = NULL, lease_until = NULL, fencing_token = fencing_token + 1",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE log_partitions SET partitions = $1")
        .bind(i32::try_from(wanted).unwrap_or(1))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(from = now, to = wanted, "split the log's partitions");
    sqlx::query(&format!("DROP INDEX IF EXISTS events_partition_{now}"))
        .execute(&mut *conn)
        .await?;
    Ok(wanted)
}
