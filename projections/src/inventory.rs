//! The inventory read model: one row per SKU with its catalog entry and stock levels.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use aggregates::inventory::ProductEvent;
use event_log::subscription::ConsumerError;
use event_log::LogEvent;

use crate::rows::{self, Orphan, TableShape};
use crate::Projection;

/// The inventory projection (`rm_inventory`).
pub struct Inventory;

/// A row of `rm_inventory`; field names are column names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InventoryRow {
    /// The SKU.
    pub sku: String,
    /// Display name.
    pub name: String,
    /// Unit price (money).
    pub price: Value,
    /// Units in stock.
    pub on_hand: i64,
    /// Units held for orders.
    pub reserved: i64,
    /// `on_hand - reserved`.
    pub available: i64,
    /// Low-stock threshold.
    pub low_stock_threshold: i64,
    /// `available <= low_stock_threshold`.
    pub low_stock: bool,
}

const SHAPE: TableShape = TableShape {
    key: "sku",
    key_type: "text",
    mutable: &["on_hand", "reserved", "available", "low_stock"],
};

#[async_trait::async_trait]
impl Projection for Inventory {
    fn name(&self) -> &'static str {
        "inventory"
    }

    fn table(&self) -> &'static str {
        "rm_inventory"
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        table: &str,
        events: &[LogEvent],
    ) -> Result<(), ConsumerError> {
        let mine = events.iter().filter(|e| e.aggregate_type == "inventory");
        rows::fold_page(
            tx,
            table,
            &SHAPE,
            mine,
            |r: &InventoryRow| r.sku.clone(),
            fold,
        )
        .await
    }
}

/// Folds one inventory event into the rows; `true` if a row changed.
fn fold(rows: &mut HashMap<String, InventoryRow>, event: &LogEvent) -> Result<bool, ConsumerError> {
    let units = |q: aggregates::values::Quantity| i64::from(q.get());
    let (on_hand, reserved) = match event.decode::<ProductEvent>()? {
        ProductEvent::ProductRegistered {
            sku,
            name,
            price,
            low_stock_threshold,
            initial_stock,
        } => {
            let on_hand = i64::try_from(initial_stock)?;
            let threshold = i64::try_from(low_stock_threshold)?;
            rows.insert(
                event.aggregate_id.clone(),
                InventoryRow {
                    sku: sku.to_string(),
                    name: name.to_string(),
                    price: serde_json::to_value(price)?,
                    on_hand,
                    reserved: 0,
                    available: on_hand,
                    low_stock_threshold: threshold,
                    low_stock: on_hand <= threshold,
                },
            );
            return Ok(true);
        }
        ProductEvent::Restocked { quantity, .. } => (units(quantity), 0),
        ProductEvent::StockAdjusted { delta, .. } => (delta, 0),
        ProductEvent::StockReserved { quantity, .. } => (0, units(quantity)),
        ProductEvent::ReservationReleased { quantity, .. } => (0, -units(quantity)),
        ProductEvent::ReservationCommitted { quantity, .. } => (-units(quantity), -units(quantity)),
        ProductEvent::LowStockReached { .. } => return Ok(false),
    };
    let row = rows.get_mut(&event.aggregate_id).ok_or_else(|| Orphan {
        event_type: event.event_type.clone(),
        position: event.position,
        key: event.aggregate_id.clone(),
    })?;
    row.on_hand += on_hand;
    row.reserved += reserved;
    row.available = row.on_hand - row.reserved;
    row.low_stock = row.available <= row.low_stock_threshold;
    Ok(true)
}

/// SKU `sku`'s row, if the projection has it.
///
/// # Errors
/// The database error, or a row that does not decode.
pub async fn get(pool: &PgPool, sku: &str) -> sqlx::Result<Option<InventoryRow>> {
    let row: Option<serde_json::Value> =
        sqlx::query_scalar("SELECT to_jsonb(t) FROM rm_inventory t WHERE sku = $1")
            .bind(sku)
            .fetch_optional(pool)
            .await?;
    row.map(crate::read::decode).transpose()
}

/// Up to `limit` SKUs after `after`, in SKU order; only those low on stock if `low_stock`.
///
/// # Errors
/// The database error, or a row that does not decode.
pub async fn list(
    pool: &PgPool,
    after: Option<&str>,
    low_stock: bool,
    limit: i64,
) -> sqlx::Result<Vec<InventoryRow>> {
    let rows: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT to_jsonb(t) FROM rm_inventory t
          WHERE ($1::text IS NULL OR sku > $1) AND (NOT $2 OR low_stock)
          ORDER BY sku LIMIT $3",
    )
    .bind(after)
    .bind(low_stock)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(crate::read::decode).collect()
}
