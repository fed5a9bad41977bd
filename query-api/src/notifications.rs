//! Admin routes over the notifications integrator's queue: what was sent, what waits, and what
//! is parked after failing again and again.

use api_common::extract::{Path, Query};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use api_common::auth::Admin;
use api_common::error::ApiError;

use crate::QueryState;

/// Query of `GET /api/v1/admin/notifications`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationsQuery {
    state: Option<String>,
    limit: Option<i64>,
}

/// One notification.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct NotificationView {
    event_id: Uuid,
    kind: String,
    recipient: String,
    subject: String,
    state: String,
    attempts: i32,
    last_error: Option<String>,
    next_attempt_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    sent_at: Option<DateTime<Utc>>,
}

/// `GET /api/v1/admin/notifications?state=pending|sent|parked&limit=`: newest first.
///
/// # Errors
/// 400 for an unknown state or a bad limit; 401/403.
pub async fn list(
    State(state): State<QueryState>,
    _: Admin,
    Query(query): Query<NotificationsQuery>,
) -> Result<Json<Value>, ApiError> {
    if let Some(s) = &query.state {
        if !["pending", "sent", "parked"].contains(&s.as_str()) {
            return Err(ApiError::field("state", "must be pending, sent or parked"));
        }
    }
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::field("limit", "must be 1 to 500"));
    }
    let items: Vec<NotificationView> = sqlx::query_as(
        "SELECT event_id, kind, recipient, subject, state, attempts, last_error, next_attempt_at,
                created_at, sent_at
           FROM notifications WHERE ($1::text IS NULL OR state = $1)
          ORDER BY created_at DESC LIMIT $2",
    )
    .bind(query.state)
    .bind(limit)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(json!({ "items": items })))
}

/// `POST /api/v1/admin/notifications/{event_id}/retry`: a parked notification is sent again.
///
/// # Errors
/// 409 when it is not parked (404 when it does not exist); 401/403.
pub async fn retry(
    State(state): State<QueryState>,
    _: Admin,
    Path(event_id): Path<Uuid>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if integrations::notifications::retry(&state.pool, event_id).await? {
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "event_id": event_id, "state": "pending" })),
        ));
    }
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM notifications WHERE event_id = $1)")
            .bind(event_id)
            .fetch_one(&state.pool)
            .await?;
    Err(match exists {
        true => ApiError::Conflict(format!("notification {event_id} is not parked")),
        false => ApiError::NotFound(format!("no notification for event {event_id}")),
    })
}
