//! `GET /api/v1/admin/projections` (every consumer's progress) and
//! `POST /api/v1/admin/projections/{name}/rebuild`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};

use api_common::auth::Admin;
use api_common::error::ApiError;
use api_common::extract::Path;
use event_log::checkpoints::{self, Progress};
use projections::rebuild::{self, RebuildError, RebuildLock};

use crate::AdminState;

/// Every consumer's progress, the processes that share the partitions, and what holds the
/// log's horizon back.
#[derive(Debug, Serialize)]
pub struct ConsumersPage {
    items: Vec<Progress>,
    /// The live processes following the log (`owner` as partitions name it).
    processes: Vec<event_log::processes::Process>,
    /// Writers of the log whose transactions are open, oldest first: consumers read nothing
    /// written after the oldest of them began until it ends.
    horizon_holders: Vec<event_log::reader::HorizonHolder>,
}

/// `GET /api/v1/admin/projections`: kind, position, lag (events and seconds), state and last
/// error of every consumer of the log, and per partition its owner, fencing token, position
/// and lag; the live processes; the open writers that hold the horizon back.
///
/// # Errors
/// 401/403.
pub async fn list(
    State(state): State<AdminState>,
    _: Admin,
) -> Result<Json<ConsumersPage>, ApiError> {
    let items = checkpoints::progress(&state.pool).await?;
    let processes = event_log::processes::live(&state.pool).await?;
    let horizon_holders = event_log::reader::horizon_holders(&state.pool).await?;
    Ok(Json(ConsumersPage {
        items,
        processes,
        horizon_holders,
    }))
}

/// `POST /api/v1/admin/projections/{name}/rebuild`: 202 and the rebuild runs in the background;
/// the live table serves until the rebuilt one takes its place. Progress shows in
/// `GET /api/v1/admin/projections` as `rebuild_position`.
///
/// # Errors
/// 404 for an unknown projection; 409 while a rebuild of it runs; 401/403.
pub async fn rebuild(
    State(state): State<AdminState>,
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
