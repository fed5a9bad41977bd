//! Opening the database: the pool settings every orderline process uses, and the embedded
//! migrations.

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::StoreError;

/// The schema migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Opens a pool to `url`. Its sessions run with `jit = off`: every statement orderline sends is
/// short and index-bound, and compiling one with LLVM (which a large table's cost estimate
/// triggers) costs more than running it. Unless the URL names one, each session's
/// `application_name` is `orderline:PID`, so that `pg_stat_activity` (and the horizon holders
/// of the admin view) tell which process a connection belongs to, as lease owners
/// (`host:PID:run`) do. Connections are not pinged when taken from the pool.
///
/// # Errors
/// [`StoreError::Database`] if the URL is invalid or the server cannot be reached.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    let mut options: PgConnectOptions = url.parse::<PgConnectOptions>()?.options([("jit", "off")]);
    if options.get_application_name().is_none() {
        options = options.application_name(&format!("orderline:{}", std::process::id()));
    }
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(5))
        // sqlx pings a pooled connection each time it hands it out: a round trip more for
        // every command, page and query, for a check that a dead connection fails anyway on
        // its first statement (every caller retries or answers 500; nothing is acknowledged on
        // a failed transaction), after which the pool drops it.
        .test_before_acquire(false)
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Whether every migration this binary knows has been applied to the database.
///
/// # Errors
/// [`StoreError::Database`] if Postgres fails.
pub async fn migrations_applied(pool: &PgPool) -> Result<bool, StoreError> {
    let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let applied: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await
            .or_else(|e| match &e {
                // The bookkeeping table does not exist before the first migration.
                sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => Ok(None),
                _ => Err(e),
            })?;
    Ok(applied.unwrap_or(0) >= latest)
}
