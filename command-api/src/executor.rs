//! Runs one command against one aggregate: load, decide, append and answer, with the
//! idempotency record in the same transaction as the events and a bounded, jittered retry when
//! another writer got to the aggregate first.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde_json::Value;

use event_store::{EventStore, Metadata, StoreError, StoredAggregate};

use crate::idempotency::{self, StoredAnswer};
use crate::CommandState;
use api_common::auth::Actor;
use api_common::error::ApiError;
use api_common::ids::RequestIds;

/// How many times a command is decided before contention is reported as 409. Each attempt
/// reloads the aggregate, so a retry decides on the state that won.
pub const MAX_ATTEMPTS: u32 = 8;

/// Number of lock stripes; aggregates hashing to the same stripe wait for each other.
const STRIPES: usize = 1024;

/// In-process write locks, one stripe per hash of `(aggregate type, id)`.
///
/// Writers to the same aggregate in this process queue here (fairly, first come first served)
/// instead of racing, failing the append and retrying: a hot SKU costs a wait, not wasted
/// transactions. Writers in other processes take turns on a Postgres advisory lock
/// ([`EventStore::begin_locked`]); optimistic concurrency remains the last guard. See `docs/adr/0001-event-store-writes.md`.
#[derive(Clone)]
pub struct WriteLocks(Arc<[tokio::sync::Mutex<()>]>);

impl Default for WriteLocks {
    fn default() -> Self {
        Self((0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect())
    }
}

impl WriteLocks {
    fn stripe(&self, aggregate_type: &str, id: &str) -> &tokio::sync::Mutex<()> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (aggregate_type, id).hash(&mut hasher);
        let index = usize::try_from(hasher.finish() % STRIPES as u64).unwrap_or(0);
        &self.0[index]
    }
}

/// A successful answer to a command.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// HTTP status.
    pub status: StatusCode,
    /// `Location` of the resource the command created, if any.
    pub location: Option<String>,
    /// JSON body; always includes `position`.
    pub body: Value,
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if let Some(location) = self.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        response
    }
}

/// Everything about a command that is not the command itself.
pub struct Envelope<'a> {
    /// Who sends it.
    pub actor: &'a Actor,
    /// Request and correlation ids.
    pub ids: &'a RequestIds,
    /// `Idempotency-Key`, if sent.
    pub idempotency_key: Option<&'a str>,
    /// Fingerprint of the request (see `JsonBody`).
    pub fingerprint: &'a [u8],
}

impl Envelope<'_> {
    fn metadata(&self) -> Metadata {
        Metadata {
            correlation_id: self.ids.correlation_id,
            // An HTTP command is caused by the request; the request id names it.
            causation_id: uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_OID,
                self.ids.request_id.as_bytes(),
            ),
            actor_sub: self.actor.sub.clone(),
            actor_role: self.actor.role.as_str().to_owned(),
            request_id: self.ids.request_id.clone(),
        }
    }

    /// The stored answer for this key, replayed if the request is the same one.
    fn replay(&self, stored: StoredAnswer) -> Result<Answer, ApiError> {
        if stored.request_hash != self.fingerprint {
            return Err(ApiError::Unprocessable {
                detail: "this Idempotency-Key was used for a different request".into(),
                errors: vec![],
            });
        }
        Ok(Answer {
            status: StatusCode::from_u16(stored.status_code)
                .map_err(|e| ApiError::Internal(e.to_string()))?,
            location: stored.location,
            body: stored.body,
        })
    }
}

/// Runs a command on aggregate `id`.
///
/// `command` turns the loaded state into the command to decide (it may refuse, e.g. when the
/// caller does not own the order); `answer` builds the success answer from the state after the
/// command and the global position of its last event (or of the aggregate's newest event when
/// the command changed nothing).
///
/// # Errors
/// The domain error mapped by [`ApiError`]'s policy; 409 when the aggregate stayed contended for
/// [`MAX_ATTEMPTS`] attempts or the same idempotency key is in flight; 422 when the key was used
/// for another request; 500 on database failure.
pub async fn execute<A, C, R>(
    state: &CommandState,
    envelope: &Envelope<'_>,
    id: &str,
    command: C,
    answer: R,
) -> Result<Answer, ApiError>
where
    A: StoredAggregate<Services = ()>,
    ApiError: From<A::Error>,
    C: Fn(&A) -> Result<A::Command, ApiError>,
    R: Fn(&A, i64) -> Answer,
{
    let store = &state.store;
    // Keys belong to the principal, not the bare subject: a replay only ever goes back to the
    // role and subject whose request stored it, who were allowed to see it then.
    let caller = &envelope.actor.principal();
    if let Some(key) = envelope.idempotency_key {
        // Cheap look-up first: a replay needs no load and no lock.
        let mut conn = store.pool().acquire().await?;
        if let Some(stored) = idempotency::find(&mut conn, caller, key).await? {
            return envelope.replay(stored);
        }
    }
    let metadata = envelope.metadata();
    let _turn = state.locks.stripe(A::TYPE, id).lock().await;
    for attempt in 1..=MAX_ATTEMPTS {
        // One connection, four round trips: BEGIN with the aggregate's write lock, the load
        // (snapshot and the events after it), the append, COMMIT. Writers in other processes
        // take turns on the lock, so the state decided on is current.
        let (mut tx, mut loaded) = store.begin_locked::<A>(id).await?;
        if let Some(key) = envelope.idempotency_key {
            if !idempotency::try_lock(&mut tx, caller, key).await? {
                return Err(ApiError::Conflict(
                    "a request with this Idempotency-Key is still running".into(),
                ));
            }
            if let Some(stored) = idempotency::find(&mut tx, caller, key).await? {
                return envelope.replay(stored);
            }
        }
        let command = command(&loaded.aggregate)?;
        let decided = match loaded
            .decide_and_append(&mut tx, id, command, &metadata)
            .await
        {
            Ok(decided) => decided.map_err(ApiError::from)?,
            Err(StoreError::Conflict) => {
                tx.rollback().await?;
                tracing::debug!(
                    aggregate = A::TYPE,
                    id,
                    attempt,
                    "append conflict, retrying"
                );
                tokio::time::sleep(backoff(attempt)).await;
                continue;
            }
            Err(other) => return Err(other.into()),
        };
        let position = match decided.appended {
            Some(appended) => appended.position,
            None => EventStore::stream_position::<A>(&mut tx, id).await?,
        };
        let after = &loaded.aggregate;
        let answer = answer(after, position);
        if let Some(key) = envelope.idempotency_key {
            let stored = StoredAnswer {
                request_hash: envelope.fingerprint.to_vec(),
                status_code: answer.status.as_u16(),
                location: answer.location.clone(),
                body: answer.body.clone(),
            };
            idempotency::save(&mut tx, caller, key, &stored).await?;
        }
        tx.commit().await?;
        return Ok(answer);
    }
    tracing::warn!(
        aggregate = A::TYPE,
        id,
        "gave up after {MAX_ATTEMPTS} conflicting attempts"
    );
    Err(ApiError::Conflict(
        "the resource is under heavy contention; retry later".into(),
    ))
}

/// Exponential back-off with full jitter: up to 2, 4, 8, ... ms, capped at 100 ms. Jitter keeps
/// writers that collided once from colliding again in lockstep.
fn backoff(attempt: u32) -> Duration {
    let cap_ms = (2u64 << attempt.min(6)).min(100);
    Duration::from_micros(rand::rng().random_range(0..=cap_ms * 1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_capped() {
        for attempt in 1..=MAX_ATTEMPTS {
            assert!(backoff(attempt) <= Duration::from_millis(100));
        }
        assert!((0..50).any(|_| backoff(1) > Duration::ZERO));
    }
}
