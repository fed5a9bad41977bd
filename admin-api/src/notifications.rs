//! Admin routes over the notifications integrator's queue: what was sent, what waits, and what
//! is parked after failing again and again.

use api_common::extract::{Path, Query};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use api_common::auth::Admin;
use api_common::error::ApiError;
use integrations::notifications::{self, Retried};

use crate::AdminState;

/// Query of `GET /api/v1/admin/notifications`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationsQuery {
    state: Option<String>,
    limit: Option<i64>,
}

/// `GET /api/v1/admin/notifications?state=pending|sent|parked&limit=`: newest first.
///
/// # Errors
/// 400 for an unknown state or a bad limit; 401/403.
pub async fn list(
    State(state): State<AdminState>,
    _: Admin,
    Query(query): Query<NotificationsQuery>,
) -> Result<Json<Value>, ApiError> {
    if let Some(s) = &query.state {
        if !["pending", "sent", "parked"].contains(&s.as_str()) {
            return Err(ApiError::field("state", "must be pending, sent or parked"));
        }
    }
    if !(1..=500).contains(&query.limit.unwrap_or(50)) {
        return Err(ApiError::field("limit", "must be 1 to 500"));
    }
    let items = notifications::list(
        &state.pool,
        query.state.as_deref(),
        query.limit.unwrap_or(50),
    )
    .await?;
    Ok(Json(json!({ "items": items })))
}

/// `POST /api/v1/admin/notifications/{event_id}/retry`: a parked notification is sent again.
///
/// # Errors
/// 409 when it is not parked (404 when it does not exist); 401/403.
pub async fn retry(
    State(state): State<AdminState>,
    _: Admin,
    Path(event_id): Path<Uuid>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    match notifications::retry(&state.pool, event_id).await? {
        Retried::Yes => Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "event_id": event_id, "state": "pending" })),
        )),
        Retried::NotParked => Err(ApiError::Conflict(format!(
            "notification {event_id} is not parked"
        ))),
        Retried::NotFound => Err(ApiError::NotFound(format!(
            "no notification for event {event_id}"
        ))),
    }
}
