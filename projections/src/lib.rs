//! Read models, each one table built only from events of the global log.
//!
//! | projection | table | serves |
//! |---|---|---|
//! | [`orders`] | `rm_orders` | `GET /api/v1/orders/{id}`, the order lists by customer and status |
//! | [`inventory`] | `rm_inventory` | the catalog (`/products`) and stock levels (`/inventory`) |
//! | [`payments`] | `rm_payments` | `GET /api/v1/payments/{order_id}` |
//!
//! Guarantee: transactional. A projection applies a whole page of events in the transaction
//! that moves its checkpoint (see `event_store::subscription`), so it never misses or repeats an
//! event. Pages are folded in memory: the rows a page touches are read once, changed, and written
//! back with one upsert, which is what makes replays fast.
//!
//! Replayable: [`rebuild::rebuild`] refills a projection's table from the start of the log beside
//! the live one and swaps them atomically.

pub mod inventory;
pub mod orders;
pub mod payments;
pub mod read;
pub mod rebuild;
mod rows;

use std::sync::Arc;

use event_log::subscription::{Consumer, ConsumerError};
use event_log::LogEvent;
use sqlx::PgConnection;

/// A read model built from the log into one table.
#[async_trait::async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Name of the projection and of its checkpoint.
    fn name(&self) -> &'static str;

    /// The live table.
    fn table(&self) -> &'static str;

    /// Applies `events` to `table` (the live table, or its rebuild twin) through `tx`.
    async fn apply(
        &self,
        tx: &mut PgConnection,
        table: &str,
        events: &[LogEvent],
    ) -> Result<(), ConsumerError>;
}

/// Every projection, in a fixed order.
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(orders::Orders),
        Arc::new(inventory::Inventory),
        Arc::new(payments::Payments),
    ]
}

/// The projection called `name`.
pub fn by_name(name: &str) -> Option<Arc<dyn Projection>> {
    all().into_iter().find(|p| p.name() == name)
}

/// Runs a projection as a log consumer on its live table.
pub struct Live(pub Arc<dyn Projection>);

#[async_trait::async_trait]
impl Consumer for Live {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn kind(&self) -> &str {
        "projection"
    }

    async fn apply(&self, tx: &mut PgConnection, events: &[LogEvent]) -> Result<(), ConsumerError> {
        self.0.apply(tx, self.0.table(), events).await
    }
}

/// Every projection as a consumer, ready for `Subscriptions::spawn`.
pub fn consumers() -> Vec<Arc<dyn Consumer>> {
    all()
        .into_iter()
        .map(|p| Arc::new(Live(p)) as Arc<dyn Consumer>)
        .collect()
}
