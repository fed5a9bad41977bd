//! `GET /api/v1/payments/{order_id}` (owner, admin).

use api_common::extract::{OrderPath, Query};
use axum::extract::State;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use api_common::auth::{CustomerOrAdmin, Role};
use api_common::error::ApiError;
use projections::payments::{AttemptView, PaymentChange, Status};

use crate::{reached, Consistency, QueryState, Read};

/// A payment as the API shows it.
#[derive(Debug, Serialize)]
pub struct PaymentView {
    order_id: Uuid,
    status: Status,
    amount: Option<Value>,
    captured_minor: i64,
    refunded_minor: i64,
    attempts: Vec<AttemptView>,
    history: Vec<PaymentChange>,
}

/// The order's payment, with every attempt and status change.
///
/// # Errors
/// 401/403; 404 for an unknown order or another customer's.
pub async fn one(
    State(state): State<QueryState>,
    CustomerOrAdmin(actor): CustomerOrAdmin,
    OrderPath(id): OrderPath,
    Query(consistency): Query<Consistency>,
) -> Result<Read<PaymentView>, ApiError> {
    let not_found = || ApiError::NotFound("payment not found".into());
    let id = id.as_uuid();
    let cursor = reached(&state, "payments", &consistency).await?;
    let row = projections::payments::get(&state.pool, id)
        .await?
        .ok_or_else(not_found)?;
    if actor.role == Role::Customer && row.customer_id.as_deref() != Some(actor.sub.as_str()) {
        return Err(not_found());
    }
    Ok(Read {
        position: cursor.position,
        body: PaymentView {
            order_id: row.order_id,
            status: row.status,
            amount: row.amount,
            captured_minor: row.captured,
            refunded_minor: row.refunded,
            attempts: row.attempts,
            history: row.history,
        },
    })
}
