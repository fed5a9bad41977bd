//! Reading and writing whole rows as JSON: `to_jsonb(t)` turns a row into an object whose keys
//! are the column names, and `jsonb_populate_recordset(NULL::t, …)` turns objects back into
//! rows. A projection therefore declares its row once, as a serde struct, and needs no column
//! lists beyond its upsert.

use std::collections::{BTreeSet, HashMap};

use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::PgConnection;

use event_log::subscription::ConsumerError;
use event_log::LogEvent;

/// How a projection's table is keyed and which columns an event can change.
pub(crate) struct TableShape {
    /// The key column; rows are keyed by the events' `aggregate_id`.
    pub(crate) key: &'static str,
    /// The key column's SQL type.
    pub(crate) key_type: &'static str,
    /// Columns overwritten when an existing row changes.
    pub(crate) mutable: &'static [&'static str],
}

/// Applies a page to `table`: loads the rows the `events` touch (keyed by `aggregate_id`) once,
/// lets `fold` change them event by event (it returns whether the row changed), and writes the
/// changed rows back with one upsert.
pub(crate) async fn fold_page<'e, R, F>(
    tx: &mut PgConnection,
    table: &str,
    shape: &TableShape,
    events: impl IntoIterator<Item = &'e LogEvent>,
    key_of: impl Fn(&R) -> String,
    mut fold: F,
) -> Result<(), ConsumerError>
where
    R: Serialize + DeserializeOwned,
    F: FnMut(&mut HashMap<String, R>, &LogEvent) -> Result<bool, ConsumerError>,
{
    let events: Vec<&LogEvent> = events.into_iter().collect();
    let keys: BTreeSet<String> = events.iter().map(|e| e.aggregate_id.clone()).collect();
    let mut rows: HashMap<String, R> = load(
        tx,
        table,
        (shape.key, shape.key_type),
        keys.into_iter().collect(),
        key_of,
    )
    .await?;
    let mut changed = BTreeSet::new();
    // Events stored in an old shape are folded as their current ones (event_store::upcast).
    LogEvent::for_each_current(events, |event| -> Result<(), ConsumerError> {
        if fold(&mut rows, event)? {
            changed.insert(event.aggregate_id.clone());
        }
        Ok(())
    })?;
    let changed: Vec<&R> = changed.iter().filter_map(|k| rows.get(k)).collect();
    upsert(tx, table, shape.key, shape.mutable, &changed).await
}

/// Loads the rows of `table` whose key column (`key_column`, of SQL type `key_type`) is one of
/// `keys`, keyed by `key_of`.
async fn load<R: DeserializeOwned>(
    tx: &mut PgConnection,
    table: &str,
    (key_column, key_type): (&str, &str),
    keys: Vec<String>,
    key_of: impl Fn(&R) -> String,
) -> Result<HashMap<String, R>, ConsumerError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let sql = format!(
        "SELECT to_jsonb(t)::text FROM {table} t WHERE {key_column} = ANY($1::text[]::{key_type}[])"
    );
    let rows: Vec<String> = sqlx::query_scalar(&sql)
        .bind(keys)
        .fetch_all(&mut *tx)
        .await?;
    let mut loaded = HashMap::with_capacity(rows.len());
    for row in rows {
        let row: R = serde_json::from_str(&row)?;
        loaded.insert(key_of(&row), row);
    }
    Ok(loaded)
}

/// Upserts `rows` into `table` in one statement. `conflict` names the key column and `columns`
/// the columns to overwrite on conflict.
async fn upsert<R: Serialize>(
    tx: &mut PgConnection,
    table: &str,
    conflict: &str,
    columns: &[&str],
    rows: &[&R],
) -> Result<(), ConsumerError> {
    if rows.is_empty() {
        return Ok(());
    }
    let set = columns
        .iter()
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "INSERT INTO {table} SELECT * FROM jsonb_populate_recordset(NULL::{table}, $1)
         ON CONFLICT ({conflict}) DO UPDATE SET {set}"
    );
    sqlx::query(&sql)
        .bind(sqlx::types::Json(rows))
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// A broken invariant of the log seen by a projection (an event for a row that was never
/// created). Parks the projection: the log needs a look.
#[derive(Debug, thiserror::Error)]
#[error("{event_type} at position {position} for {key}, which has no row")]
pub(crate) struct Orphan {
    pub(crate) event_type: String,
    pub(crate) position: i64,
    pub(crate) key: String,
}
