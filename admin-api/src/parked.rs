//! Keys a consumer parked on a poison event (`event_log::parked`): `GET /api/v1/admin/parked`,
//! and an operator's `retry` or `skip` of one. A skip is recorded in the log, in the same
//! transaction, as a `ParkedEventSkipped` event of the consumer's own stream, naming the
//! event and, in its metadata, who skipped it.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use aggregates::operations::{ConsumerCommand, LogConsumer, SkippedEvent};
use api_common::auth::Admin;
use api_common::error::ApiError;
use api_common::extract::{Path, Query};
use api_common::ids::RequestIds;
use event_log::parked::{self, Action, Parked, Requested};
use event_store::{locks, EventStore, Metadata};

use crate::AdminState;

/// Query of `GET /api/v1/admin/parked`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParkedQuery {
    consumer: Option<String>,
    limit: Option<i64>,
}

/// The parked keys, oldest first.
#[derive(Debug, Serialize)]
pub struct ParkedPage {
    items: Vec<Parked>,
}

/// `GET /api/v1/admin/parked?consumer=&limit=`: every key parked on a poison event (of one
/// consumer, if given): the event it is parked on, the error, the attempts, and any request
/// waiting for the runner.
///
/// # Errors
/// 400 for a bad limit; 401/403.
pub async fn list(
    State(state): State<AdminState>,
    _: Admin,
    Query(query): Query<ParkedQuery>,
) -> Result<Json<ParkedPage>, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::field("limit", "must be 1 to 1000"));
    }
    let items = parked::list(&state.pool, query.consumer.as_deref(), limit).await?;
    Ok(Json(ParkedPage { items }))
}

/// `POST /api/v1/admin/parked/{consumer}/{key}/retry`: 202; the partition's runner applies the
/// key's events again from the parked one within its polling interval, and frees the key, or
/// parks it again where an event still fails (`attempts` and `error` then show it).
///
/// # Errors
/// 404 when the key is not parked; 409 while a skip of it waits; 401/403.
pub async fn retry(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    Path((consumer, key)): Path<(String, String)>,
) -> Result<(StatusCode, Json<Parked>), ApiError> {
    let mut conn = state.pool.acquire().await?;
    let requested = parked::request(
        &mut conn,
        &consumer,
        &key,
        Action::Retry,
        &actor.principal(),
    )
    .await?;
    accepted(requested, &consumer, &key)
}

/// `POST /api/v1/admin/parked/{consumer}/{key}/skip`: 202; the parked event is passed over for
/// good and the key's later events are applied. The skip is appended to the log as
/// `ParkedEventSkipped` (stream `consumer/{consumer}`) in the same transaction as the request.
///
/// # Errors
/// 404 when the key is not parked; 409 while a skip of it waits already; 401/403.
pub async fn skip(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    ids: RequestIds,
    Path((consumer, key)): Path<(String, String)>,
) -> Result<(StatusCode, Json<Parked>), ApiError> {
    let mut tx = locks::begin_writer(&state.pool).await?;
    let requested =
        parked::request(&mut tx, &consumer, &key, Action::Skip, &actor.principal()).await?;
    if let Requested::Done(found) = &requested {
        let (Some(event_id), Some(aggregate_type), Some(event_type), Some(sequence)) = (
            found.event_id,
            found.aggregate_type.clone(),
            found.event_type.clone(),
            found.sequence,
        ) else {
            return Err(ApiError::Internal(format!(
                "the event {consumer}/{key} is parked on is not in the log"
            )));
        };
        let skipped = SkippedEvent {
            key: key.clone(),
            event_id,
            position: found.position,
            aggregate_type,
            event_type,
            sequence,
            error: found.error.clone(),
        };
        let metadata = Metadata {
            correlation_id: ids.correlation_id,
            causation_id: Uuid::new_v5(&Uuid::NAMESPACE_OID, ids.request_id.as_bytes()),
            actor_sub: actor.sub.clone(),
            actor_role: actor.role.as_str().to_owned(),
            request_id: ids.request_id.clone(),
        };
        let mut stream = EventStore::lock_and_load::<LogConsumer>(&mut tx, &consumer).await?;
        let decided = stream
            .decide_and_append(
                &mut tx,
                &consumer,
                ConsumerCommand::SkipParkedEvent(skipped),
                &metadata,
            )
            .await?;
        if let Err(refused) = decided {
            return Err(ApiError::Conflict(refused.to_string()));
        }
    }
    tx.commit().await?;
    accepted(requested, &consumer, &key)
}

fn accepted(
    requested: Requested,
    consumer: &str,
    key: &str,
) -> Result<(StatusCode, Json<Parked>), ApiError> {
    match requested {
        Requested::Done(parked) => Ok((StatusCode::ACCEPTED, Json(*parked))),
        Requested::NotParked => Err(ApiError::NotFound(format!(
            "{consumer} has no parked key {key}"
        ))),
        Requested::SkipPending => Err(ApiError::Conflict(format!(
            "a skip of {consumer}'s parked key {key} is waiting for its runner"
        ))),
    }
}
