//! The one way every command opens, migrates and closes the database, and the signals that
//! end a command. A private cluster (no `DATABASE_URL`) is left as it was found on every way
//! out: done, failed, interrupted (Ctrl-C, SIGTERM), or a panic (the cluster's `Drop`).

use anyhow::Context;
use sqlx::PgPool;

use crate::local_postgres::{self, LocalPostgres};
use crate::settings::{Database, Settings};

/// An open database: the pool, and the private cluster it runs on, if orderline started one.
pub struct Opened {
    /// The connection pool (`ORDERLINE_DB_POOL_SIZE` connections at most).
    pub pool: PgPool,
    local: Option<LocalPostgres>,
}

impl Opened {
    /// Connects to `DATABASE_URL`, or starts the private cluster and creates its database.
    /// Applies no migration ([`migrate`] does).
    ///
    /// # Errors
    /// When the database cannot be reached or the cluster cannot start.
    pub async fn open(settings: &Settings) -> anyhow::Result<Self> {
        match &settings.database {
            Database::Url(url) => {
                let pool = event_store::connect(url.expose(), settings.pool_size)
                    .await
                    .context("cannot connect to DATABASE_URL")?;
                Ok(Self { pool, local: None })
            }
            Database::Local(folder) => {
                let local = LocalPostgres::start(folder).await?;
                let admin = event_store::connect(&local.admin_url(), 1).await?;
                let exists: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
                )
                .bind(local_postgres::DATABASE)
                .fetch_one(&admin)
                .await?;
                if !exists {
                    sqlx::query(&format!("CREATE DATABASE {}", local_postgres::DATABASE))
                        .execute(&admin)
                        .await?;
                }
                admin.close().await;
                let pool = event_store::connect(&local.url(), settings.pool_size).await?;
                Ok(Self {
                    pool,
                    local: Some(local),
                })
            }
        }
    }

    /// Closes the pool, then stops the private cluster if this process was its last user.
    pub async fn close(self) {
        self.pool.close().await;
        if let Some(local) = self.local {
            local.stop().await;
        }
    }
}

/// Applies every pending migration.
///
/// # Errors
/// When a migration fails (the database is then as the failed migration's transaction left it:
/// unchanged).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    event_store::MIGRATOR
        .run(pool)
        .await
        .context("migration failed")?;
    Ok(())
}

/// What Ctrl-C or SIGTERM means for a command run by [`with_database`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The way to end it (`events --follow`): exit 0.
    Succeeds,
    /// It did not finish: [`Interrupted`], exit 130.
    Fails,
}

/// A command was interrupted (Ctrl-C or SIGTERM) before it finished.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// Opens the database (applying no migration), runs `work` until it ends or `signal` fires,
/// and closes the database either way.
///
/// # Errors
/// What opening or `work` failed with, or [`Interrupted`] (with [`Stop::Fails`]).
pub async fn with_database<F, Fut>(
    settings: &Settings,
    signal: Signal,
    stop: Stop,
    work: F,
) -> anyhow::Result<()>
where
    F: FnOnce(PgPool) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let opened = Opened::open(settings).await?;
    let result = tokio::select! {
        result = work(opened.pool.clone()) => result,
        () = signal => match stop {
            Stop::Succeeds => Ok(()),
            Stop::Fails => Err(Interrupted.into()),
        },
    };
    opened.close().await;
    result
}

/// Completes on the first Ctrl-C (SIGINT) or SIGTERM after [`shutdown_signal`] was called.
pub type Signal = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Installs the handlers for SIGINT and SIGTERM now (a signal from here on is caught, never
/// the default exit) and answers the future that completes on the first of them.
///
/// # Errors
/// When the handlers cannot be installed.
pub fn shutdown_signal() -> anyhow::Result<Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot catch Ctrl-C")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
    Ok(Box::pin(async move {
        tokio::select! {
            _ = interrupt.recv() => {},
            _ = terminate.recv() => {},
        }
    }))
}
