//! The processes following the log (`log_processes`): each keeps a row per consumer it runs
//! alive, so that every process can count the live ones of a consumer and take its even share
//! of that consumer's partitions. A process that dies or freezes stops renewing; once its rows
//! expire the others take its share.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

/// Keeps `owner`'s row for `consumer` alive for `ttl` from now and answers how many processes
/// run `consumer` now (this one included).
///
/// # Errors
/// The database error, if any.
pub async fn heartbeat(
    conn: &mut sqlx::PgConnection,
    owner: &str,
    consumer: &str,
    ttl: Duration,
) -> sqlx::Result<u32> {
    sqlx::query(
        "INSERT INTO log_processes (owner, consumer, alive_until)
         VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))
         ON CONFLICT (consumer, owner) DO UPDATE SET alive_until = EXCLUDED.alive_until",
    )
    .bind(owner)
    .bind(consumer)
    .bind(ttl.as_secs_f64())
    .execute(&mut *conn)
    .await?;
    // Rows of processes gone for an hour are of no use to anyone.
    let live: i64 = sqlx::query_scalar(
        "WITH gone AS (DELETE FROM log_processes
                        WHERE consumer = $1
                          AND alive_until < clock_timestamp() - interval '1 hour')
         SELECT count(*) FROM log_processes
          WHERE consumer = $1 AND alive_until >= clock_timestamp()",
    )
    .bind(consumer)
    .fetch_one(&mut *conn)
    .await?;
    Ok(u32::try_from(live).unwrap_or(1).max(1))
}

/// Removes `owner`'s row for `consumer` (at shutdown), so the others take its share at once.
///
/// # Errors
/// The database error, if any.
pub async fn leave(pool: &PgPool, owner: &str, consumer: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM log_processes WHERE owner = $1 AND consumer = $2")
        .bind(owner)
        .bind(consumer)
        .execute(pool)
        .await?;
    Ok(())
}

/// A process following the log.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Process {
    /// `host:pid:runner`, the name its leases are held under.
    pub owner: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Until when it counts as alive unless it renews.
    pub alive_until: DateTime<Utc>,
}

/// The live processes, oldest first.
///
/// # Errors
/// The database error, if any.
pub async fn live(pool: &PgPool) -> sqlx::Result<Vec<Process>> {
    sqlx::query_as(
        "SELECT owner, min(started_at) AS started_at, max(alive_until) AS alive_until
           FROM log_processes WHERE alive_until >= clock_timestamp()
          GROUP BY owner ORDER BY 2",
    )
    .fetch_all(pool)
    .await
}

/// A process's share of `partitions` when `live` processes share them: as even as can be,
/// rounded up so that every partition has somewhere to go.
pub fn share(partitions: u32, live: u32) -> u32 {
    partitions.div_ceil(live.max(1))
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn shares_cover_every_partition() {
        assert_eq!(share(16, 1), 16);
        assert_eq!(share(16, 3), 6);
        assert_eq!(share(16, 0), 16);
        for live in 1..40 {
            assert!(share(16, live) * live >= 16);
        }
    }
}
