//! What Postgres counted for the bench's database between two moments: committed and rolled
//! back transactions (`pg_stat_database`) and statements (`pg_stat_statements`, when the server
//! preloads it, as `scripts/ensure-postgres` sets up), so a scenario can report them per unit of
//! work.

use sqlx::PgPool;

/// Postgres's counters for the current database at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Counters {
    /// `pg_stat_database.xact_commit`.
    pub commits: i64,
    /// `pg_stat_database.xact_rollback`.
    pub rollbacks: i64,
    /// Calls of every statement in this database (`pg_stat_statements`, top level, utility
    /// statements such as `BEGIN` and `COMMIT` included); `None` when it is not loaded.
    pub statements: Option<i64>,
}

impl Counters {
    /// Reads the counters now. Backends publish their counts at the end of a transaction, at
    /// most once a second while busy, and when they exit: read after the processes measured
    /// have stopped, or a second after they went idle.
    pub async fn read(pool: &PgPool) -> anyhow::Result<Self> {
        // A fresh snapshot of the statistics, not the one this transaction may have cached.
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(pool)
            .await?;
        let (commits, rollbacks): (i64, i64) = sqlx::query_as(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database
              WHERE datname = current_database()",
        )
        .fetch_one(pool)
        .await?;
        let statements = sqlx::query_scalar::<_, Option<i64>>(
            "SELECT sum(calls)::int8 FROM pg_stat_statements
              WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(pool)
        .await
        .ok()
        .flatten();
        Ok(Self {
            commits,
            rollbacks,
            statements,
        })
    }

    /// Creates the `pg_stat_statements` view in the bench's database when the server preloads
    /// the module; without it, [`Counters::statements`] stays `None`.
    pub async fn enable_statements(pool: &PgPool) {
        if let Err(e) = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(pool)
            .await
        {
            tracing::warn!(error = %e, "pg_stat_statements is not available; statements are not counted");
        }
    }

    /// What happened between `self` (earlier) and `later`, less `own` transactions and
    /// statements the bench itself ran meanwhile (its polls).
    pub fn since(&self, later: &Counters, own: i64) -> Delta {
        Delta {
            commits: later.commits - self.commits - own,
            rollbacks: later.rollbacks - self.rollbacks,
            statements: later
                .statements
                .zip(self.statements)
                .map(|(l, e)| l - e - own),
        }
    }
}

/// The difference between two [`Counters`].
#[derive(Debug, Clone, Copy)]
pub struct Delta {
    /// Transactions committed.
    pub commits: i64,
    /// Transactions rolled back.
    pub rollbacks: i64,
    /// Statements run, if counted.
    pub statements: Option<i64>,
}

/// The ten statements run most often in this database, with their calls, for reading where the
/// round trips go; empty without `pg_stat_statements`.
pub async fn top_statements(pool: &PgPool) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 120), calls::int8
           FROM pg_stat_statements
          WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
          ORDER BY calls DESC LIMIT 10",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default()
}
