//! The replay scenario: rebuild speed of each projection against Postgres streaming the log.

use std::time::Instant;

use futures::TryStreamExt;
use serde_json::{json, Value};
use sqlx::PgPool;

use event_log::Cursor;
use projections::rebuild::{self, RebuildLock};

use crate::{generate, round, seconds};

/// Generates the log, then measures. One result per measurement.
pub async fn run(pool: &PgPool, events: u64) -> anyhow::Result<Vec<Value>> {
    let started = Instant::now();
    let written = generate::log(pool, events).await?;
    tracing::warn!(
        events = written,
        seconds = seconds(started),
        "log generated"
    );
    let mut results = Vec::new();

    // Baseline: Postgres alone streaming every row, in log order, to this client in one query
    // (the same columns, in the same form, as the log reader asks for).
    let started = Instant::now();
    let sql = format!(
        "SELECT {} FROM events ORDER BY events.transaction_id, events.position",
        event_log::LOG_EVENT_COLUMNS
    );
    let rows = sqlx::query(&sql)
        .fetch(pool)
        .try_fold(0u64, |n, _| async move { Ok(n + 1) })
        .await?;
    let baseline = rows as f64 / seconds(started);
    results.push(json!({
        "scenario": "replay", "subject": "postgres-stream", "events": rows,
        "seconds": round(seconds(started)), "events_per_second": baseline.round(),
    }));

    // The log reader alone: pages below the snapshot's xmin, decoded into LogEvents.
    let started = Instant::now();
    let mut conn = pool.acquire().await?;
    let (mut cursor, mut read) = (Cursor::default(), 0u64);
    loop {
        let page = event_log::read_page(&mut conn, cursor, rebuild::PAGE).await?;
        let Some(last) = page.last() else { break };
        cursor = last.cursor();
        read += page.len() as u64;
    }
    drop(conn);
    let reader = read as f64 / seconds(started);
    results.push(json!({
        "scenario": "replay", "subject": "log-reader", "events": read,
        "seconds": round(seconds(started)), "events_per_second": reader.round(),
        "ratio_to_postgres": round(reader / baseline * 100.0),
    }));

    for projection in projections::all() {
        let lock = RebuildLock::acquire(pool, projection.as_ref()).await?;
        let done = rebuild::rebuild(pool, projection.as_ref(), lock, &|_, _| {}).await?;
        results.push(json!({
            "scenario": "replay", "subject": format!("rebuild-{}", projection.name()),
            "events": done.events, "seconds": round(done.events as f64 / done.events_per_second),
            "events_per_second": done.events_per_second.round(),
            "ratio_to_postgres_percent": round(done.events_per_second / baseline * 100.0),
        }));
    }
    Ok(results)
}
