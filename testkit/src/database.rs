//! The Postgres server the tests use and the fresh, uniquely named databases they create on it.

use sqlx::{Connection, PgConnection};
use uuid::Uuid;

/// The server on which tests create their databases: `ORDERLINE_TEST_DATABASE_URL`, or the
/// local default `scripts/ensure-postgres` sets up.
pub fn server_url() -> String {
    std::env::var("ORDERLINE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

/// The URL of database `name` on the server `server` names (any database URL on it), with the
/// same parameters (`?sslmode=...`).
pub fn url_on(server: &str, name: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (server, String::new()),
    };
    let host = base.rsplit_once('/').map_or(base, |(host, _)| host);
    format!("{host}/{name}{query}")
}

/// Creates an empty database named `{prefix}_{random}` on [`server_url`]'s server (the prefix
/// says who left it behind if a run is killed) and answers its name and URL.
///
/// # Errors
/// When the server is unreachable or refuses.
pub async fn create(prefix: &str) -> Result<(String, String), sqlx::Error> {
    create_on(&server_url(), prefix).await
}

/// [`create`] on the server that the database URL `server` points at.
///
/// # Errors
/// When the server is unreachable or refuses.
pub async fn create_on(server: &str, prefix: &str) -> Result<(String, String), sqlx::Error> {
    let name = format!("{prefix}_{}", Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(server).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    admin.close().await.ok();
    Ok((name.clone(), url_on(server, &name)))
}

/// Drops database `name` on [`server_url`]'s server, disconnecting whoever is still on it.
///
/// # Errors
/// When the server is unreachable or refuses.
pub async fn drop(name: &str) -> Result<(), sqlx::Error> {
    drop_on(&server_url(), name).await
}

/// [`drop`] on the server that the database URL `server` points at.
///
/// # Errors
/// When the server is unreachable or refuses.
pub async fn drop_on(server: &str, name: &str) -> Result<(), sqlx::Error> {
    let mut admin = PgConnection::connect(server).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    admin.close().await.ok();
    Ok(())
}

/// [`drop`] from synchronous code (a `Drop` impl), on a private runtime on its own thread so it
/// works inside or outside a runtime. A database left behind by a failure here is harmless and
/// named for cleanup.
pub fn drop_blocking(name: &str) {
    let name = name.to_owned();
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(drop(&name))?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })
    .join();
}
