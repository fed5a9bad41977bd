//! Admin routes over the log and the consumers (admin role only).

use api_common::extract::{Path, Query};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use api_common::auth::Admin;
use api_common::error::ApiError;
use event_store::history::{self, At, HistoryError, StateAt};
use event_store::log::{self, Cursor, LogEvent};
use projections::rebuild::{self, RebuildError, RebuildLock};

use crate::{QueryState, Read};

/// Query of `GET /api/v1/admin/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    after: Option<String>,
    limit: Option<i64>,
}

/// A page of the global log.
#[derive(Debug, Serialize)]
pub struct EventsPage {
    events: Vec<LogEvent>,
    /// Pass as `after` for the next page (the same cursor again when the page was empty).
    next: String,
}

/// `GET /api/v1/admin/events?after=&limit=`: the global log in commit-safe order (see
/// `event_store::log`). `after` is the `next` of the previous page; absent, the log's start.
///
/// # Errors
/// 400 for a malformed cursor or limit; 401/403.
pub async fn events(
    State(state): State<QueryState>,
    _: Admin,
    Query(query): Query<EventsQuery>,
) -> Result<Read<EventsPage>, ApiError> {
    let after: Cursor = query
        .after
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e: String| ApiError::field("after", e))?
        .unwrap_or_default();
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::field("limit", "must be 1 to 1000"));
    }
    let mut conn = state.pool.acquire().await?;
    let events = log::read_page(&mut conn, after, limit).await?;
    let next = events.last().map_or(after, LogEvent::cursor);
    Ok(Read {
        position: next.position,
        body: EventsPage {
            events,
            next: next.to_string(),
        },
    })
}

/// One consumer's progress.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct ConsumerView {
    /// The consumer's name.
    pub name: String,
    /// Position of the last event applied.
    pub position: i64,
    /// Events in the log after it.
    pub lag: i64,
    /// Age of the oldest event not applied yet, in seconds (0 when caught up).
    pub lag_seconds: f64,
    /// `running` or `parked`.
    pub state: String,
    /// Events applied since the consumer began.
    pub events_applied: i64,
    last_error: Option<String>,
    last_error_at: Option<DateTime<Utc>>,
    parked_position: Option<i64>,
    /// While a rebuild runs: the position it has reached.
    rebuild_position: Option<i64>,
}

/// Every consumer's progress.
#[derive(Debug, Serialize)]
pub struct ConsumersPage {
    items: Vec<ConsumerView>,
}

/// `GET /api/v1/admin/projections`: position, lag (events and seconds), state and last error
/// of every consumer of the log.
///
/// # Errors
/// 401/403.
pub async fn projections(
    State(state): State<QueryState>,
    _: Admin,
) -> Result<Json<ConsumersPage>, ApiError> {
    let items = consumers(&state.pool).await?;
    Ok(Json(ConsumersPage { items }))
}

/// Lag up to this many events is counted exactly; beyond it, it is estimated from positions.
pub const EXACT_LAG_LIMIT: i64 = 10_000;

/// Every consumer's progress. Each subquery walks the `events_global_order` index from the
/// checkpoint and stops after [`EXACT_LAG_LIMIT`] events, so the cost is bounded whatever the
/// log's size: a consumer further behind reports `max(position) - its position` (positions
/// can have gaps, so that is an upper bound).
pub const CONSUMERS_SQL: &str = "SELECT c.consumer AS name, c.position, c.state,
        c.events_applied, c.last_error, c.last_error_at, c.parked_position, c.rebuild_position,
        CASE WHEN behind.n > $1
             THEN greatest((SELECT max(position) FROM events) - c.position, behind.n)
             ELSE behind.n END AS lag,
        coalesce(extract(epoch FROM now() - (
            SELECT e.recorded_at FROM events e
             WHERE (e.transaction_id, e.position) > (c.transaction_id, c.position)
             ORDER BY e.transaction_id, e.position LIMIT 1))::float8, 0) AS lag_seconds
   FROM checkpoints c
   CROSS JOIN LATERAL (
        SELECT count(*) AS n FROM (
            SELECT 1 FROM events e
             WHERE (e.transaction_id, e.position) > (c.transaction_id, c.position)
             ORDER BY e.transaction_id, e.position LIMIT $1 + 1) AS page) AS behind
  ORDER BY c.consumer";

/// Every log consumer's progress, by name (see [`CONSUMERS_SQL`] for how lag is bounded).
///
/// # Errors
/// The database error, if any.
pub async fn consumers(pool: &sqlx::PgPool) -> sqlx::Result<Vec<ConsumerView>> {
    sqlx::query_as(CONSUMERS_SQL)
        .bind(EXACT_LAG_LIMIT)
        .fetch_all(pool)
        .await
}

/// `POST /api/v1/admin/projections/{name}/rebuild`: 202 and the rebuild runs in the background;
/// the live table serves until the rebuilt one takes its place. Progress shows in
/// `GET /api/v1/admin/projections` as `rebuild_position`.
///
/// # Errors
/// 404 for an unknown projection; 409 while a rebuild of it runs; 401/403.
pub async fn rebuild(
    State(state): State<QueryState>,
    _: Admin,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let projection = projections::by_name(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no projection named {name}")))?;
    let lock = RebuildLock::acquire(&state.pool, projection.as_ref())
        .await
        .map_err(|e| match e {
            RebuildError::AlreadyRunning(_) => ApiError::Conflict(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        })?;
    let pool = state.pool.clone();
    tokio::spawn(async move {
        match rebuild::rebuild(&pool, projection.as_ref(), lock, &|_, _| {}).await {
            Ok(done) => tracing::info!(
                projection = projection.name(),
                events = done.events,
                "rebuild finished"
            ),
            Err(e) => tracing::error!(projection = projection.name(), error = %e, "rebuild failed"),
        }
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "name": name, "state": "rebuilding" })),
    ))
}

/// Query of `GET /api/v1/admin/streams/{type}/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    at: Option<String>,
    version: Option<i64>,
}

/// `GET /api/v1/admin/streams/{aggregate_type}/{id}?at=RFC3339 | ?version=N`: the aggregate as
/// it was then (now without either), folded from its events by the aggregate's own `apply`.
///
/// # Errors
/// 400 for an unknown type, both `at` and `version`, or a malformed value; 404 when the stream
/// had no event by then; 401/403.
pub async fn stream(
    State(state): State<QueryState>,
    _: Admin,
    Path((aggregate_type, id)): Path<(String, String)>,
    Query(query): Query<StreamQuery>,
) -> Result<Json<StateAt>, ApiError> {
    let at = match (query.at, query.version) {
        (Some(_), Some(_)) => {
            return Err(ApiError::field("at", "give either at or version, not both"))
        }
        (Some(raw), None) => At::Time(
            DateTime::parse_from_rfc3339(&raw)
                .map_err(|e| ApiError::field("at", format!("not an RFC 3339 time: {e}")))?
                .with_timezone(&Utc),
        ),
        (None, Some(n)) if n >= 1 => At::Version(n),
        (None, Some(_)) => return Err(ApiError::field("version", "must be 1 or more")),
        (None, None) => At::Latest,
    };
    match history::state_at(&state.pool, &aggregate_type, &id, at).await {
        Ok(Some(found)) => Ok(Json(found)),
        Ok(None) => Err(ApiError::NotFound(format!(
            "{aggregate_type}/{id} had no event by then"
        ))),
        Err(HistoryError::UnknownType(t)) => Err(ApiError::field(
            "aggregate_type",
            format!("unknown aggregate type {t:?}: use order, inventory or payment"),
        )),
        Err(HistoryError::Database(e)) => Err(e.into()),
        Err(other) => Err(ApiError::Internal(other.to_string())),
    }
}
