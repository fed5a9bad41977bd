//! The saga's log consumer: starts a saga per placed order and moves it on cancellations and
//! shipments, in the subscription runner's transaction.

use chrono::Utc;
use sqlx::PgConnection;
use uuid::Uuid;

use aggregates::inventory::Product;
use aggregates::order::{Order, OrderEvent};
use aggregates::payment::Payment;
use aggregates::values::OrderId;
use event_log::subscription::{Consumer, ConsumerError, Transient};
use event_log::LogEvent;
use event_store::{Metadata, StoreError};

use super::{drive, Work, CONSUMER_NAME};
use crate::fulfillment::{Fulfillment, Timing};
use crate::store;

/// The saga's log consumer. Guarantee: transactional (saga rows and commands commit with the
/// checkpoint).
pub struct FulfillmentConsumer {
    timing: Timing,
}

impl FulfillmentConsumer {
    /// A consumer that writes, inside the runner's transactions, with `timing`'s deadlines.
    pub fn new(timing: Timing) -> Self {
        Self { timing }
    }

    async fn advance(
        &self,
        work: &mut Work,
        tx: &mut PgConnection,
        order_id: OrderId,
        change: impl FnOnce(&mut Fulfillment),
    ) -> Result<(), ConsumerError> {
        let Some(mut saga) = store::lock(tx, order_id).await? else {
            // Orders placed before the saga existed have no saga; nothing to compensate.
            tracing::warn!(%order_id, "order event without a saga; ignored");
            return Ok(());
        };
        change(&mut saga);
        drive(work, tx, &mut saga, &self.timing)
            .await
            .map_err(retry_conflicts)?;
        store::save(tx, &saga).await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Consumer for FulfillmentConsumer {
    fn name(&self) -> &str {
        CONSUMER_NAME
    }

    fn kind(&self) -> &str {
        "saga"
    }

    /// Its pages append the saga's commands' events (stock reservations, payments).
    fn writes_events(&self) -> bool {
        true
    }

    /// An order placement costs the saga a dozen statements; 50 keep a page's transaction (and
    /// the stock locks it holds) to tens of milliseconds.
    fn max_batch(&self) -> Option<i64> {
        Some(50)
    }

    async fn apply(&self, tx: &mut PgConnection, events: &[LogEvent]) -> Result<(), ConsumerError> {
        let mut work = Work::new();
        let mut current = Vec::with_capacity(events.len());
        LogEvent::for_each_current(events, |e| -> Result<(), ConsumerError> {
            if e.aggregate_type == <Order as cqrs_es::Aggregate>::TYPE {
                current.push(e.clone());
            }
            Ok(())
        })?;
        let decoded = current
            .iter()
            .map(|e| Ok((e, e.decode::<OrderEvent>()?)))
            .collect::<Result<Vec<_>, ConsumerError>>()?;
        // Every SKU the page's placements reserve and every payment they request, locked and
        // loaded up front in four round trips rather than two per aggregate.
        let mut skus = Vec::new();
        let mut payments = Vec::new();
        for (_, event) in &decoded {
            if let OrderEvent::OrderPlaced {
                order_id, lines, ..
            } = event
            {
                skus.extend(lines.iter().map(|l| l.sku.as_str().to_owned()));
                payments.push(order_id.to_string());
            }
        }
        let skus: Vec<&str> = skus.iter().map(String::as_str).collect();
        let payments: Vec<&str> = payments.iter().map(String::as_str).collect();
        work.unit
            .prefetch::<Product>(tx, &skus)
            .await
            .map_err(retry_conflicts)?;
        work.unit
            .prefetch::<Payment>(tx, &payments)
            .await
            .map_err(retry_conflicts)?;
        for (event, decoded) in decoded {
            let now = Utc::now();
            match decoded {
                OrderEvent::OrderPlaced {
                    order_id,
                    lines,
                    total,
                    payment_token,
                    ..
                } => {
                    let correlation_id = serde_json::from_str::<Metadata>(event.metadata.get())
                        .map(|m| m.correlation_id)
                        .unwrap_or(event.event_id);
                    let mut saga = Fulfillment::start(
                        order_id,
                        correlation_id,
                        &lines,
                        total,
                        payment_token,
                        now,
                    );
                    if !store::insert(tx, &saga).await? {
                        continue;
                    }
                    drive(&mut work, tx, &mut saga, &self.timing)
                        .await
                        .map_err(retry_conflicts)?;
                    store::save(tx, &saga).await?;
                }
                OrderEvent::OrderCancelled { .. } => {
                    let id = order_id_of(event)?;
                    self.advance(&mut work, tx, id, |s| s.on_cancelled(now))
                        .await?;
                }
                OrderEvent::OrderShipped { .. } => {
                    let id = order_id_of(event)?;
                    self.advance(&mut work, tx, id, |s| s.on_shipped(now))
                        .await?;
                }
                OrderEvent::OrderConfirmed | OrderEvent::OrderRejected { .. } => {}
            }
        }
        Ok(())
    }
}

/// A conflict, or a deadlock Postgres broke by aborting this transaction, says nothing about
/// the events: the page is tried again, whole, never parked.
fn retry_conflicts(error: StoreError) -> ConsumerError {
    match &error {
        StoreError::Conflict => Box::new(Transient(error.to_string())),
        StoreError::Database(sqlx::Error::Database(db))
            if db.code().as_deref() == Some("40P01") =>
        {
            Box::new(Transient(error.to_string()))
        }
        _ => Box::new(error),
    }
}

fn order_id_of(event: &LogEvent) -> Result<OrderId, ConsumerError> {
    Ok(OrderId::from(Uuid::parse_str(&event.aggregate_id)?))
}
