//! The payments read model: one row per order's payment with every attempt and status change.
//! The row is opened by `OrderPlaced` (so the owner is known before any payment event) and
//! follows the payment stream from then on; a payment requested for an order not seen here
//! gets a row without an owner.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use aggregates::order::OrderEvent;
use aggregates::payment::{AttemptOutcome, PaymentEvent, PaymentStatus};
use event_log::subscription::ConsumerError;
use event_log::LogEvent;

use crate::rows::{self, Orphan, TableShape};
use crate::Projection;

/// The payments projection (`rm_payments`).
pub struct Payments;

/// A payment's status in the read model: the aggregate's statuses, plus `pending` before the
/// payment is requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The order is placed; no payment requested yet.
    Pending,
    /// As the payment aggregate says.
    #[serde(untagged)]
    Payment(PaymentStatus),
}

/// One status change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentChange {
    /// The new status.
    pub status: Status,
    /// When the payment reached it (its event's `recorded_at`).
    pub at: DateTime<Utc>,
}

/// One authorization attempt as shown to clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptView {
    /// 1, 2, 3, ...
    pub number: u32,
    /// When it was recorded.
    pub at: DateTime<Utc>,
    /// Its outcome.
    #[serde(flatten)]
    pub outcome: AttemptOutcome,
}

/// A row of `rm_payments`; field names are column names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentRow {
    /// The order paid for.
    pub order_id: Uuid,
    /// The order's customer (for ownership checks).
    pub customer_id: Option<String>,
    /// Current status.
    pub status: Status,
    /// The amount to pay (money).
    pub amount: Option<Value>,
    /// Minor units captured.
    pub captured: i64,
    /// Minor units refunded.
    pub refunded: i64,
    /// Every authorization attempt.
    pub attempts: Vec<AttemptView>,
    /// Every status change.
    pub history: Vec<PaymentChange>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

impl PaymentRow {
    /// A payment nobody has requested yet, owner and amount unknown until `OrderPlaced` or
    /// `PaymentRequested` fill them in.
    fn pending(order_id: Uuid, at: DateTime<Utc>) -> Self {
        Self {
            order_id,
            customer_id: None,
            status: Status::Pending,
            amount: None,
            captured: 0,
            refunded: 0,
            attempts: vec![],
            history: vec![PaymentChange {
                status: Status::Pending,
                at,
            }],
            updated_at: at,
        }
    }
}

const SHAPE: TableShape = TableShape {
    key: "order_id",
    key_type: "uuid",
    mutable: &[
        "customer_id",
        "status",
        "amount",
        "captured",
        "refunded",
        "attempts",
        "history",
        "updated_at",
    ],
};

#[async_trait::async_trait]
impl Projection for Payments {
    fn name(&self) -> &'static str {
        "payments"
    }

    fn table(&self) -> &'static str {
        "rm_payments"
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        table: &str,
        events: &[LogEvent],
    ) -> Result<(), ConsumerError> {
        let mine = events.iter().filter(|e| {
            e.aggregate_type == "payment"
                || (e.aggregate_type == "order" && e.event_type == "OrderPlaced")
        });
        rows::fold_page(
            tx,
            table,
            &SHAPE,
            mine,
            |r: &PaymentRow| r.order_id.to_string(),
            fold,
        )
        .await
    }
}

fn fold(rows: &mut HashMap<String, PaymentRow>, event: &LogEvent) -> Result<bool, ConsumerError> {
    let at = event.recorded_at;
    if event.aggregate_type == "order" {
        if let OrderEvent::OrderPlaced {
            order_id,
            customer_id,
            total,
            ..
        } = event.decode::<OrderEvent>()?
        {
            // The payment may have been opened first; then only the owner is new.
            let row = rows
                .entry(event.aggregate_id.clone())
                .or_insert_with(|| PaymentRow::pending(order_id.as_uuid(), at));
            row.customer_id = Some(customer_id.to_string());
            if row.amount.is_none() {
                row.amount = Some(serde_json::to_value(total)?);
            }
        }
        return Ok(true);
    }
    let payment = event.decode::<PaymentEvent>()?;
    let row = match rows.entry(event.aggregate_id.clone()) {
        Entry::Occupied(row) => row.into_mut(),
        // A payment opened for an order this projection has not seen: keep it, ownerless
        // (only admins can read it), rather than stop.
        Entry::Vacant(slot) => {
            let PaymentEvent::PaymentRequested { order_id, .. } = &payment else {
                return Err(Orphan {
                    event_type: event.event_type.clone(),
                    position: event.position,
                    key: event.aggregate_id.clone(),
                }
                .into());
            };
            slot.insert(PaymentRow::pending(order_id.as_uuid(), at))
        }
    };
    let status = match payment {
        PaymentEvent::PaymentRequested { amount, .. } => {
            row.amount = Some(serde_json::to_value(amount)?);
            PaymentStatus::Requested
        }
        PaymentEvent::AuthorizationAttempted(attempt) => {
            let status = match &attempt.outcome {
                AttemptOutcome::Authorized { .. } => PaymentStatus::Authorized,
                AttemptOutcome::Declined { .. } => PaymentStatus::Declined,
                AttemptOutcome::Failed {
                    retryable: true, ..
                } => PaymentStatus::Requested,
                AttemptOutcome::Failed { .. } => PaymentStatus::Failed,
            };
            row.attempts.push(AttemptView {
                number: attempt.number,
                at,
                outcome: attempt.outcome,
            });
            status
        }
        PaymentEvent::PaymentCaptured { amount } => {
            row.captured += amount.amount_minor();
            PaymentStatus::Captured
        }
        PaymentEvent::PaymentVoided => PaymentStatus::Voided,
        PaymentEvent::PaymentRefunded { amount } => {
            row.refunded += amount.amount_minor();
            if row.refunded == row.captured {
                PaymentStatus::Refunded
            } else {
                PaymentStatus::Captured
            }
        }
    };
    row.updated_at = at;
    if row.status != Status::Payment(status) {
        row.status = Status::Payment(status);
        row.history.push(PaymentChange {
            status: row.status,
            at,
        });
    }
    Ok(true)
}

/// The payment row of order `order_id`, if the projection has it.
///
/// # Errors
/// The database error, or a row that does not decode.
pub async fn get(pool: &sqlx::PgPool, order_id: Uuid) -> sqlx::Result<Option<PaymentRow>> {
    let row: Option<serde_json::Value> =
        sqlx::query_scalar("SELECT to_jsonb(t) FROM rm_payments t WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(pool)
            .await?;
    row.map(crate::read::decode).transpose()
}
