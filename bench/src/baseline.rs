//! Postgres alone: the shapes of orderline's HTTP scenarios done straight through sqlx on the same
//! tables, at the same concurrency, in the same run. Their throughput is the denominator of
//! every ratio the bench prints.

use std::sync::Arc;

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

use crate::load::{drive, Load, Measured, Outcome};

/// What a command costs Postgres, without orderline: in one transaction, read the stream (its
/// newest 20 events, what a snapshot every 20 events leaves the server to read) and insert one
/// event at the next sequence, with a payload, metadata and hash of the server's sizes. A
/// unique-key conflict is retried, as the server retries.
///
/// `sku(n)` names the stream of the `n`-th transaction. With `take_turns`, each transaction
/// first takes the stream's advisory write lock, as orderline's writers do: on one hot stream
/// the writers otherwise mostly collide and give up, and the figure would measure retries. On
/// spread streams it is left out, which only favours the baseline.
pub async fn commands(
    url: &str,
    load: Load,
    take_turns: bool,
    sku: impl Fn(u64) -> String + Send + Sync + 'static,
) -> anyhow::Result<Measured> {
    let pool = pool(url, load.connections).await?;
    let sku = Arc::new(sku);
    let measured = drive(load, move |n| {
        let (pool, id) = (pool.clone(), sku(n));
        async move {
            for _ in 0..16 {
                match append_one(&pool, &id, take_turns).await {
                    Ok(()) => return Outcome::Ok,
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {}
                    Err(e) => return Outcome::Failed(e.to_string()),
                }
            }
            Outcome::Failed("16 conflicts in a row".into())
        }
    })
    .await;
    Ok(measured)
}

/// Writes the first event of streams `P0` to `P{products-1}`, as registering them would.
pub async fn seed(pool: &PgPool, products: usize) -> anyhow::Result<()> {
    let mut tx = event_store::locks::begin_writer(pool).await?;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, hash)
         SELECT 'inventory', 'P' || i, 1, 'ProductRegistered', '2',
                jsonb_build_object('ProductRegistered', jsonb_build_object(
                    'sku', 'P' || i, 'name', 'Product ' || i, 'low_stock_threshold', 0,
                    'price', jsonb_build_object('amount_minor', 100, 'currency', 'EUR'),
                    'initial_stock', 1000000000)),
                '{}'::jsonb, sha256(i::text::bytea)
           FROM generate_series(0, $1 - 1) AS i",
    )
    .bind(i64::try_from(products)?)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

async fn append_one(pool: &PgPool, sku: &str, take_turns: bool) -> Result<(), sqlx::Error> {
    // Announced like every writer of the events table (its trigger refuses others).
    let mut tx = event_store::locks::begin_writer(pool).await?;
    if take_turns {
        // The very lock orderline's writers take on the SKU's stream.
        sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
            .bind(event_store::locks::WRITE)
            .bind(event_store::locks::write_lock_key("inventory", sku))
            .execute(&mut *tx)
            .await?;
    }
    let stream: Vec<(i64, String)> = sqlx::query_as(
        "SELECT sequence, payload::text FROM events
          WHERE aggregate_type = 'inventory' AND aggregate_id = $1
          ORDER BY sequence DESC LIMIT 20",
    )
    .bind(sku)
    .fetch_all(&mut *tx)
    .await?;
    let next = stream.first().map_or(1, |(sequence, _)| sequence + 1);
    let metadata = serde_json::json!({
        "request_id": Uuid::new_v4(), "correlation_id": Uuid::new_v4(),
        "causation_id": Uuid::new_v4(), "actor": "bench", "role": "admin",
    });
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, hash)
         VALUES ('inventory', $1, $2, 'Restocked', '1', $3, $4, $5)",
    )
    .bind(sku)
    .bind(next)
    .bind(serde_json::json!({"Restocked": {"quantity": 1, "note": null}}))
    .bind(metadata)
    .bind(&[7u8; 32][..])
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// What a query costs Postgres, without orderline: one order's read-model row as JSON, by id.
pub async fn order_reads(url: &str, load: Load, ids: Arc<Vec<Uuid>>) -> anyhow::Result<Measured> {
    let pool = pool(url, load.connections).await?;
    Ok(drive(load, move |n| {
        let (pool, ids) = (pool.clone(), ids.clone());
        async move {
            let id = ids[n as usize % ids.len()];
            let row: Result<Option<String>, _> =
                sqlx::query_scalar("SELECT to_jsonb(o)::text FROM rm_orders o WHERE order_id = $1")
                    .bind(id)
                    .fetch_optional(&pool)
                    .await;
            match row {
                Ok(Some(_)) => Outcome::Ok,
                Ok(None) => Outcome::Failed(format!("order {id} not found")),
                Err(e) => Outcome::Failed(e.to_string()),
            }
        }
    })
    .await)
}

async fn pool(url: &str, connections: usize) -> anyhow::Result<PgPool> {
    let connections = u32::try_from(connections)?;
    Ok(PgPoolOptions::new()
        .max_connections(connections)
        .min_connections(connections)
        .connect(url)
        .await?)
}
