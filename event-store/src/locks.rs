//! Every advisory lock orderline takes, by class. Postgres's two-key advisory locks
//! `(class, key)` keep each kind of lock in a key space of its own, so an aggregate's write lock
//! can never collide with a rebuild's. A new kind of lock gets a class here, nowhere else.
//! (Class 8102 was the log consumers' lease until leases became rows of `checkpoints` with a
//! fencing token, ADR 10, and 8105 a saga's gateway call in flight until calls were claimed by
//! rows of `sagas`, ADR 7; both stay unused so old and new processes never mistake each other.)
//!
//! | class | what | scope | key |
//! |---|---|---|---|
//! | [`IDEMPOTENCY`] | one HTTP command per `(principal, Idempotency-Key)` | transaction | `hashtext` |
//! | [`REBUILD`] | one rebuild or comparison of a projection | session | `hashtext(projection)` |
//! | [`WRITE`] | appending to one aggregate | transaction | [`write_lock_key`] |
//! | [`WRITER`] | this transaction appends events (shared; readers wait only for these) | transaction | `0` |

use sqlx::PgConnection;

/// Class of the lock held while an HTTP command with an `Idempotency-Key` runs.
pub const IDEMPOTENCY: i32 = 8101;
/// Class of a projection's rebuild lock.
pub const REBUILD: i32 = 8103;
/// Class of aggregate write locks.
pub const WRITE: i32 = 8104;
/// Class of the shared lock every transaction that appends events holds from before it has a
/// transaction id ([`announce_writer`]); the log's horizon waits only for its holders.
pub const WRITER: i32 = 8106;

/// The statement that announces a writer, for callers that send it with other statements (a
/// simple-query `BEGIN; ...`) at the start of a transaction.
pub const ANNOUNCE_WRITER_SQL: &str = "SELECT pg_advisory_xact_lock_shared(8106, 0)";

/// Starts a transaction on `pool` that may append events: `BEGIN` and [`announce_writer`] in one
/// round trip. For writers outside the store's own paths (imports, tests, benchmarks).
///
/// # Errors
/// The database error, if any.
pub async fn begin_writer(
    pool: &sqlx::PgPool,
) -> sqlx::Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    pool.begin_with(format!("BEGIN; {ANNOUNCE_WRITER_SQL}"))
        .await
}

/// Marks the caller's transaction as one that appends events (a shared transaction-scoped
/// lock of class [`WRITER`]); the `events_require_writer` trigger refuses inserts without it.
/// Must come before the transaction writes anything: readers of the log ignore running
/// transactions that are not writers, so one that got its transaction id first could commit
/// events below a horizon that has already passed it.
///
/// # Errors
/// A database error with the message "announced too late" when the transaction already has a
/// transaction id (a bug in the caller); the database error otherwise.
pub async fn announce_writer(conn: &mut PgConnection) -> sqlx::Result<()> {
    let late: bool = sqlx::query_scalar(
        "SELECT pg_current_xact_id_if_assigned() IS NOT NULL
           FROM (SELECT pg_advisory_xact_lock_shared(8106, 0)) AS announced",
    )
    .fetch_one(conn)
    .await?;
    if late {
        return Err(sqlx::Error::Protocol(
            "announced too late: a writer of events must announce itself before its first write"
                .into(),
        ));
    }
    Ok(())
}

/// The advisory lock key of one aggregate: FNV-1a of `type:id`, folded to 32 bits. Every writer
/// computes it here, so all of them lock the same key; two aggregates that collide only take
/// turns.
pub fn write_lock_key(aggregate_type: &str, id: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in aggregate_type
        .bytes()
        .chain(std::iter::once(b':'))
        .chain(id.bytes())
    {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    i32::from_ne_bytes(hash.to_ne_bytes())
}

/// Tries to take the session lock `(class, hashtext(name))` on `conn`, without waiting. It is
/// held until [`unlock_session`] or until the connection closes (so a dead process's locks go
/// with it); `false` when another session holds it.
///
/// # Errors
/// The database error, if any.
pub async fn try_session(conn: &mut PgConnection, class: i32, name: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
        .bind(class)
        .bind(name)
        .fetch_one(conn)
        .await
}

/// Releases a lock taken with [`try_session`]; `false` when this session did not hold it.
///
/// # Errors
/// The database error, if any.
pub async fn unlock_session(conn: &mut PgConnection, class: i32, name: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT pg_advisory_unlock($1, hashtext($2))")
        .bind(class)
        .bind(name)
        .fetch_one(conn)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classes_are_distinct() {
        let mut classes = [IDEMPOTENCY, REBUILD, WRITE, WRITER];
        classes.sort_unstable();
        assert!(classes.windows(2).all(|w| w[0] != w[1]));
    }

    #[test]
    fn write_lock_keys_tell_type_and_id_apart() {
        assert_ne!(write_lock_key("order", "a"), write_lock_key("payment", "a"));
        assert_eq!(write_lock_key("order", "a"), write_lock_key("order", "a"));
    }
}
