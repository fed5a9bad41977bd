//! Idempotency records: the first answer to a command sent with an `Idempotency-Key`, stored in
//! the same transaction as the events that command produced.
//!
//! Protocol, per attempt of a command (see [`crate::executor`]):
//! 1. [`try_lock`] takes a transaction-scoped advisory lock on `(caller, key)`; if another
//!    request holds it, the first one is still running (HTTP 409).
//! 2. [`find`] looks the key up; a stored answer is replayed if the request is the same
//!    (same hash) and refused otherwise (HTTP 422).
//! 3. Otherwise the command runs, and [`save`] stores its answer before the commit.
//!
//! Because the record and the events commit together, a client that retries after an ambiguous
//! failure (timeout, dropped connection) either finds the answer or finds nothing written.

use serde_json::Value;
use sqlx::PgConnection;

use event_store::locks;

/// A stored answer.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAnswer {
    /// SHA-256 of the request it answered (method, path and canonical body).
    pub request_hash: Vec<u8>,
    /// HTTP status code.
    pub status_code: u16,
    /// `Location` header, if the answer had one.
    pub location: Option<String>,
    /// The JSON body.
    pub body: Value,
}

/// Tries to take the transaction-scoped lock for `(caller, key)`; `false` if another
/// transaction holds it. Released at commit or rollback.
///
/// # Errors
/// The database error, if any.
pub async fn try_lock(conn: &mut PgConnection, caller: &str, key: &str) -> sqlx::Result<bool> {
    // The length prefix keeps ("ab", "c") and ("a", "bc") apart. A hash collision only costs
    // a spurious 409 that the client retries.
    sqlx::query_scalar(
        "SELECT pg_try_advisory_xact_lock($1, hashtext(length($2) || ':' || $2 || $3))",
    )
    .bind(locks::IDEMPOTENCY)
    .bind(caller)
    .bind(key)
    .fetch_one(conn)
    .await
}

/// The stored answer for `(caller, key)`, if any. `caller` is the principal, `role:sub`; a
/// record from before keys were scoped by role (stored as `?:sub`) still answers its subject.
///
/// # Errors
/// The database error, if any.
pub async fn find(
    conn: &mut PgConnection,
    caller: &str,
    key: &str,
) -> sqlx::Result<Option<StoredAnswer>> {
    let legacy = caller
        .split_once(':')
        .map(|(_, sub)| format!("?:{sub}"))
        .unwrap_or_default();
    let row: Option<(Vec<u8>, i16, Option<String>, Value)> = sqlx::query_as(
        "SELECT request_hash, status_code, location, response
           FROM idempotency_keys WHERE caller IN ($1, $3) AND key = $2
          ORDER BY caller = $1 DESC LIMIT 1",
    )
    .bind(caller)
    .bind(key)
    .bind(legacy)
    .fetch_optional(conn)
    .await?;
    Ok(
        row.map(|(request_hash, status, location, body)| StoredAnswer {
            request_hash,
            status_code: u16::try_from(status).unwrap_or(500),
            location,
            body,
        }),
    )
}

/// Stores the answer for `(caller, key)`. Call it in the transaction that holds [`try_lock`].
///
/// # Errors
/// The database error, if any (a duplicate means the lock protocol was not followed).
pub async fn save(
    conn: &mut PgConnection,
    caller: &str,
    key: &str,
    answer: &StoredAnswer,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO idempotency_keys (caller, key, request_hash, status_code, location, response)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(caller)
    .bind(key)
    .bind(&answer.request_hash)
    .bind(i16::try_from(answer.status_code).unwrap_or(500))
    .bind(&answer.location)
    .bind(&answer.body)
    .execute(conn)
    .await?;
    Ok(())
}
