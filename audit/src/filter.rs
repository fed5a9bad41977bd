//! The operators' and auditors' view of the log, behind `orderline events` and `orderline
//! audit`: which events, who did what, when, and in which flow.

use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use event_log::{Cursor, LogEvent, LOG_EVENT_COLUMNS};

/// Which events to show.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// One stream: `(aggregate_type, aggregate_id)`.
    pub aggregate: Option<(String, String)>,
    /// One flow: every event with this correlation id.
    pub correlation: Option<Uuid>,
    /// Only events whose global position is above this one (whether or not an event with
    /// this position exists yet): the positions commands answer with.
    pub after: Option<i64>,
}

impl EventFilter {
    fn matches(&self, event: &LogEvent) -> bool {
        if self.after.is_some_and(|after| event.position <= after) {
            return false;
        }
        let stream = self
            .aggregate
            .as_ref()
            .is_none_or(|(t, id)| &event.aggregate_type == t && &event.aggregate_id == id);
        let flow = self
            .correlation
            .is_none_or(|c| correlation_of(event) == Some(c));
        stream && flow
    }
}

/// Parses `TYPE/ID` (the id may contain `/`).
///
/// # Errors
/// A message when there is no `/`.
pub fn parse_stream(raw: &str) -> Result<(String, String), String> {
    match raw.split_once('/') {
        Some((t, id)) if !t.is_empty() && !id.is_empty() => Ok((t.to_owned(), id.to_owned())),
        _ => Err(format!(
            "{raw:?}: expected TYPE/ID, e.g. order/3f2c… or inventory/MUG-1"
        )),
    }
}

fn correlation_of(event: &LogEvent) -> Option<Uuid> {
    let metadata: Value = serde_json::from_str(event.metadata.get()).ok()?;
    metadata["correlation_id"].as_str()?.parse().ok()
}

/// The events matching `filter`, in log order.
///
/// # Errors
/// The database error, if any.
pub async fn events(pool: &PgPool, filter: &EventFilter) -> sqlx::Result<Vec<LogEvent>> {
    let (aggregate_type, aggregate_id) = filter.aggregate.clone().unzip();
    sqlx::query_as(&format!(
        "SELECT {LOG_EVENT_COLUMNS} FROM events
          WHERE ($1::text IS NULL OR (aggregate_type = $1 AND aggregate_id = $2))
            AND ($3::text IS NULL OR metadata ->> 'correlation_id' = $3)
            AND ($4::bigint IS NULL OR position > $4)
          ORDER BY events.transaction_id, events.position"
    ))
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(filter.correlation.map(|c| c.to_string()))
    .bind(filter.after)
    .fetch_all(pool)
    .await
}

/// Calls `show` for each new event matching `filter` as it commits, until `show` answers
/// `false`. Reads the log as every consumer does (gap-safe, below the snapshot's xmin), so an
/// event that commits late is never skipped.
///
/// # Errors
/// The database error, if any.
pub async fn follow(
    pool: &PgPool,
    filter: &EventFilter,
    mut show: impl FnMut(&LogEvent) -> bool,
) -> sqlx::Result<()> {
    // Start just before the oldest transaction that wrote a position above `after`, or that
    // may still commit one (a transaction still running): nothing before it can match, and
    // nothing from it on is skipped. The filter then keeps exactly the positions above
    // `after`, as `events` lists them.
    let mut cursor = match filter.after {
        Some(position) => {
            let before: i64 = sqlx::query_scalar(
                "SELECT least(
                        (SELECT min(transaction_id) FROM events WHERE position > $1),
                        pg_snapshot_xmin(pg_current_snapshot()))::text::bigint - 1",
            )
            .bind(position)
            .fetch_one(pool)
            .await?;
            Cursor {
                transaction_id: before.max(0),
                position: i64::MAX,
            }
        }
        None => Cursor::default(),
    };
    loop {
        let mut conn = pool.acquire().await?;
        let page = event_log::read_page(&mut conn, cursor, 500).await?;
        drop(conn);
        for event in &page {
            cursor = event.cursor();
            if filter.matches(event) && !show(event) {
                return Ok(());
            }
        }
        if page.is_empty() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// An order's whole story: its own and its payment's streams, and every event of its flow
/// (the saga's reservations and releases carry the order's correlation id), in log order.
/// Empty when the order does not exist.
///
/// # Errors
/// The database error, if any.
pub async fn order_story(pool: &PgPool, order_id: Uuid) -> sqlx::Result<Vec<LogEvent>> {
    let id = order_id.to_string();
    sqlx::query_as(&format!(
        "SELECT {LOG_EVENT_COLUMNS} FROM events
          WHERE (aggregate_type IN ('order', 'payment') AND aggregate_id = $1)
             OR metadata ->> 'correlation_id' = (
                    SELECT metadata ->> 'correlation_id' FROM events
                     WHERE aggregate_type = 'order' AND aggregate_id = $1 AND sequence = 1)
          ORDER BY events.transaction_id, events.position"
    ))
    .bind(id)
    .fetch_all(pool)
    .await
}

/// One event on one line, for people: position, time, stream and version, type, actor, payload.
pub fn line(event: &LogEvent) -> String {
    let metadata: Value = serde_json::from_str(event.metadata.get()).unwrap_or(Value::Null);
    let actor = match (
        metadata["actor_sub"].as_str(),
        metadata["actor_role"].as_str(),
    ) {
        (Some(sub), Some(role)) => format!("{sub} ({role})"),
        _ => "unknown".to_owned(),
    };
    format!(
        "#{:<7} {}  {}/{} v{}  {}  by {}  {}",
        event.position,
        event.recorded_at.format("%Y-%m-%d %H:%M:%S%.3f"),
        event.aggregate_type,
        event.aggregate_id,
        event.sequence,
        event.event_type,
        actor,
        event.payload.get()
    )
}
