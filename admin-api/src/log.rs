//! `GET /api/v1/admin/events`: the global log, page by page.

use axum::extract::State;
use serde::{Deserialize, Serialize};

use api_common::auth::Admin;
use api_common::error::ApiError;
use api_common::extract::Query;
use api_common::position::Read;
use event_log::{Cursor, LogEvent};

use crate::AdminState;

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
/// `event_log::reader`). `after` is the `next` of the previous page; absent, the log's start.
///
/// # Errors
/// 400 for a malformed cursor or limit; 401/403.
pub async fn events(
    State(state): State<AdminState>,
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
    let events = event_log::read_page(&mut conn, after, limit).await?;
    let next = events.last().map_or(after, LogEvent::cursor);
    Ok(Read {
        position: next.position,
        body: EventsPage {
            events,
            next: next.to_string(),
        },
    })
}
