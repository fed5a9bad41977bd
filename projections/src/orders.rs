//! The orders read model: one row per order with its lines, total, status and status history.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use aggregates::order::{OrderEvent, OrderStatus};
use event_log::subscription::ConsumerError;
use event_log::LogEvent;

use crate::rows::{self, Orphan, TableShape};
use crate::Projection;

/// The orders projection (`rm_orders`).
pub struct Orders;

/// One status change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusChange {
    /// The new status.
    pub status: OrderStatus,
    /// When (the event's `recorded_at`).
    pub at: DateTime<Utc>,
    /// Why, for rejections and cancellations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A row of `rm_orders`; field names are column names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderRow {
    /// The order.
    pub order_id: Uuid,
    /// Who placed it.
    pub customer_id: String,
    /// Current status.
    pub status: OrderStatus,
    /// Why it was rejected or cancelled.
    pub reason: Option<String>,
    /// `[{sku, quantity, unit_price}]`.
    pub lines: Value,
    /// The order total, `{amount_minor, currency}`.
    pub total: Value,
    /// Every status, oldest first.
    pub history: Vec<StatusChange>,
    /// When it was placed.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// Position of `OrderPlaced`; orders list newest first by it.
    pub placed_position: i64,
}

const SHAPE: TableShape = TableShape {
    key: "order_id",
    key_type: "uuid",
    mutable: &["status", "reason", "history", "updated_at"],
};

#[async_trait::async_trait]
impl Projection for Orders {
    fn name(&self) -> &'static str {
        "orders"
    }

    fn table(&self) -> &'static str {
        "rm_orders"
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        table: &str,
        events: &[LogEvent],
    ) -> Result<(), ConsumerError> {
        let mine = events.iter().filter(|e| e.aggregate_type == "order");
        rows::fold_page(
            tx,
            table,
            &SHAPE,
            mine,
            |r: &OrderRow| r.order_id.to_string(),
            fold,
        )
        .await
    }
}

/// Folds one order event into the rows; every order event changes its row.
fn fold(rows: &mut HashMap<String, OrderRow>, event: &LogEvent) -> Result<bool, ConsumerError> {
    let at = event.recorded_at;
    let (status, reason) = match event.decode::<OrderEvent>()? {
        OrderEvent::OrderPlaced {
            order_id,
            customer_id,
            lines,
            total,
            ..
        } => {
            let row = OrderRow {
                order_id: order_id.as_uuid(),
                customer_id: customer_id.to_string(),
                status: OrderStatus::Pending,
                reason: None,
                lines: serde_json::to_value(&lines)?,
                total: serde_json::to_value(total)?,
                history: vec![StatusChange {
                    status: OrderStatus::Pending,
                    at,
                    reason: None,
                }],
                created_at: at,
                updated_at: at,
                placed_position: event.position,
            };
            rows.insert(event.aggregate_id.clone(), row);
            return Ok(true);
        }
        OrderEvent::OrderConfirmed => (OrderStatus::Confirmed, None),
        OrderEvent::OrderRejected { reason } => (
            OrderStatus::Rejected,
            Some(
                serde_json::to_value(reason)?
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            ),
        ),
        OrderEvent::OrderCancelled { reason } => {
            (OrderStatus::Cancelled, reason.map(|r| r.to_string()))
        }
        OrderEvent::OrderShipped { .. } => (OrderStatus::Shipped, None),
    };
    let row = rows.get_mut(&event.aggregate_id).ok_or_else(|| Orphan {
        event_type: event.event_type.clone(),
        position: event.position,
        key: event.aggregate_id.clone(),
    })?;
    row.status = status;
    row.reason.clone_from(&reason);
    row.updated_at = at;
    row.history.push(StatusChange { status, at, reason });
    Ok(true)
}

/// One order's row as JSON text, where `$2` is the order id as text: read in the same
/// statement as the projection's checkpoint (`event_log::checkpoints::cursor_with`), the hot
/// path of `GET /api/v1/orders/{id}`.
pub const ROW_AS_TEXT_SQL: &str =
    "SELECT to_jsonb(t)::text FROM rm_orders t WHERE t.order_id = $2::uuid";

/// Order `id`'s row, if the projection has it.
///
/// # Errors
/// The database error, or a row that does not decode.
pub async fn get(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<OrderRow>> {
    let row: Option<Value> =
        sqlx::query_scalar("SELECT to_jsonb(t) FROM rm_orders t WHERE order_id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    row.map(crate::read::decode).transpose()
}

/// Which orders to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// One customer's orders only.
    pub customer_id: Option<String>,
    /// Only orders in this status (`pending`, `confirmed`, ...).
    pub status: Option<&'static str>,
    /// Only orders placed before this `placed_position` (the previous page's last).
    pub before: Option<i64>,
    /// Most rows.
    pub limit: i64,
}

/// The orders matching `filter`, newest (highest `placed_position`) first.
///
/// # Errors
/// The database error, or a row that does not decode.
pub async fn list(pool: &PgPool, filter: &ListFilter) -> sqlx::Result<Vec<OrderRow>> {
    let rows: Vec<Value> = sqlx::query_scalar(
        "SELECT to_jsonb(t) FROM rm_orders t
          WHERE ($1::text IS NULL OR customer_id = $1)
            AND ($2::text IS NULL OR status = $2)
            AND ($3::bigint IS NULL OR placed_position < $3)
          ORDER BY placed_position DESC
          LIMIT $4",
    )
    .bind(&filter.customer_id)
    .bind(filter.status)
    .bind(filter.before)
    .bind(filter.limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(crate::read::decode).collect()
}
