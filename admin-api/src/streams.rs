//! `GET /api/v1/admin/streams/{aggregate_type}/{id}`: time travel over one stream.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use api_common::auth::Admin;
use api_common::error::ApiError;
use api_common::extract::{Path, Query};
use audit::history::{self, At, HistoryError, StateAt};

use crate::AdminState;

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
    State(state): State<AdminState>,
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
