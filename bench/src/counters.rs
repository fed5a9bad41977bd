//! What Postgres counted for the bench's database between two moments, from
//! `pg_stat_statements` (when the server preloads it, as `scripts/ensure-postgres` sets up):
//! statements run, explicit transactions (`BEGIN`) and rollbacks. Statements are recorded as
//! they end, so the counts are exact. (`pg_stat_database.xact_commit` is not used: a live
//! backend publishes its counts only every 10 s or when it exits, which skews any window
//! shorter than a minute.)

use sqlx::PgPool;

/// Postgres's counters for the current database at one moment; all `None` without
/// `pg_stat_statements`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    /// Calls of every statement (top level; `BEGIN` and `COMMIT` included).
    pub statements: Option<i64>,
    /// Calls of `BEGIN`: explicit transactions. Every statement outside one is a transaction
    /// of its own.
    pub transactions: Option<i64>,
    /// Calls of `ROLLBACK`.
    pub rollbacks: Option<i64>,
}

impl Counters {
    /// Reads the counters now.
    pub async fn read(pool: &PgPool) -> anyhow::Result<Self> {
        let counted = sqlx::query_as::<_, (Option<i64>, Option<i64>, Option<i64>)>(
            "SELECT sum(calls)::int8,
                    sum(calls) FILTER (WHERE query ILIKE 'begin%')::int8,
                    sum(calls) FILTER (WHERE query ILIKE 'rollback%')::int8
               FROM pg_stat_statements
              WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(pool)
        .await;
        Ok(match counted {
            Ok((statements, transactions, rollbacks)) => Self {
                statements,
                transactions: transactions.or(Some(0)),
                rollbacks: rollbacks.or(Some(0)),
            },
            Err(_) => Self::default(),
        })
    }

    /// Creates the `pg_stat_statements` view in the bench's database when the server preloads
    /// the module; without it, the counters stay `None`.
    pub async fn enable_statements(pool: &PgPool) {
        if let Err(e) = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(pool)
            .await
        {
            tracing::warn!(error = %e, "pg_stat_statements is not available; statements are not counted");
        }
    }

    /// What happened between `self` (earlier) and `later`, less `own` statements the bench
    /// itself ran meanwhile (its polls, each outside a transaction).
    pub fn since(&self, later: &Counters, own: i64) -> Delta {
        let minus = |l: Option<i64>, e: Option<i64>| l.zip(e).map(|(l, e)| l - e);
        Delta {
            statements: minus(later.statements, self.statements).map(|n| n - own),
            transactions: minus(later.transactions, self.transactions),
            rollbacks: minus(later.rollbacks, self.rollbacks),
        }
    }
}

/// The difference between two [`Counters`].
#[derive(Debug, Clone, Copy)]
pub struct Delta {
    /// Statements run.
    pub statements: Option<i64>,
    /// Explicit transactions begun.
    pub transactions: Option<i64>,
    /// Transactions rolled back.
    pub rollbacks: Option<i64>,
}

/// The twelve statements run most often in this database, with their calls, for reading where
/// the round trips go; empty without `pg_stat_statements`.
pub async fn top_statements(pool: &PgPool) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 120), calls::int8
           FROM pg_stat_statements
          WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
          ORDER BY calls DESC LIMIT 12",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default()
}
