//! Admin routes over the fulfillment sagas. They read the saga rows themselves, not a read
//! model: what operators see is the state the saga runs on, with no lag.

use api_common::extract::{Path, Query};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use api_common::auth::Admin;
use api_common::error::ApiError;
use sagas::fulfillment::SagaState;
use sagas::store::{self, Retried, SagaPage, SagaView};

use crate::AdminState;

/// Query of `GET /api/v1/admin/sagas`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SagasQuery {
    state: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

/// `GET /api/v1/admin/sagas?state=&limit=&cursor=`: sagas newest first, each with its steps,
/// state, deadline, last error and history. `state` is one of `running`, `compensating`,
/// `confirmed`, `settling`, `completed`, `stuck`.
///
/// # Errors
/// 400 for an unknown state, a bad limit or cursor; 401/403.
pub async fn list(
    State(state): State<AdminState>,
    _: Admin,
    Query(query): Query<SagasQuery>,
) -> Result<Json<SagaPage>, ApiError> {
    let wanted = query
        .state
        .as_deref()
        .map(|raw| {
            SagaState::parse(raw).ok_or_else(|| {
                ApiError::field(
                    "state",
                    "must be running, compensating, confirmed, settling, completed or stuck",
                )
            })
        })
        .transpose()?;
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::field("limit", "must be 1 to 500"));
    }
    let cursor = query
        .cursor
        .as_deref()
        .map(|raw| {
            store::parse_cursor(raw)
                .ok_or_else(|| ApiError::field("cursor", "not a cursor this API gave out"))
        })
        .transpose()?;
    Ok(Json(store::list(&state.pool, wanted, limit, cursor).await?))
}

/// `GET /api/v1/admin/sagas/{order_id}`: one saga.
///
/// # Errors
/// 404 when the order has no saga; 400 for a malformed id; 401/403.
pub async fn one(
    State(state): State<AdminState>,
    _: Admin,
    Path(order_id): Path<String>,
) -> Result<Json<SagaView>, ApiError> {
    let id = parse_id(&order_id)?;
    store::get(&state.pool, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no saga for order {order_id}")))
}

/// `POST /api/v1/admin/sagas/{order_id}/retry`: a stuck saga runs its pending step again now.
/// 202 when it was stuck.
///
/// # Errors
/// 404 when the order has no saga; 409 when the saga is not stuck; 401/403.
pub async fn retry(
    State(state): State<AdminState>,
    _: Admin,
    Path(order_id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = parse_id(&order_id)?;
    match store::retry(&state.pool, id).await? {
        Retried::Yes => Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "order_id": id, "state": "retrying" })),
        )),
        Retried::NotStuck => Err(ApiError::Conflict(format!(
            "the saga of order {order_id} is not stuck"
        ))),
        Retried::NotFound => Err(ApiError::NotFound(format!("no saga for order {order_id}"))),
    }
}

fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::field("order_id", "must be a UUID"))
}
