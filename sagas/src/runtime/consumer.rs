//! The saga's log consumer: starts a saga per placed order and moves it on cancellations and
//! shipments, in the subscription runner's transaction.

use std::collections::HashMap;

use chrono::Utc;
use sqlx::PgConnection;
use uuid::Uuid;

use aggregates::order::{Order, OrderEvent};
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

    /// Moves the saga of `order_id` (locked up front, in `locked`) with `change` and drives it;
    /// the page writes it with the others at its end.
    async fn advance(
        &self,
        work: &mut Work,
        tx: &mut PgConnection,
        locked: &mut HashMap<OrderId, Fulfillment>,
        order_id: OrderId,
        change: impl FnOnce(&mut Fulfillment),
    ) -> Result<bool, ConsumerError> {
        let Some(saga) = locked.get_mut(&order_id) else {
            // Orders placed before the saga existed have no saga; nothing to compensate.
            tracing::warn!(%order_id, "order event without a saga; ignored");
            return Ok(false);
        };
        change(saga);
        drive(work, tx, saga, &self.timing)
            .await
            .map_err(retry_conflicts)?;
        Ok(true)
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

    /// Its pages lock the SKUs, payments and orders they command until they commit; pages of
    /// several partitions together would hold more of them at once and wait for each other on
    /// hot SKUs (measured: fewer orders confirmed per second).
    fn pages_together(&self) -> bool {
        false
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
        // Every lock the page needs, before its first write and in the one lock order of the
        // saga (`Work::lock`): every SKU, payment and order its sagas may command, in two round
        // trips, then the rows of the sagas its events start or move.
        let mut placed = Vec::new();
        let mut moved = Vec::new();
        let mut skus = Vec::new();
        let mut orders = Vec::new();
        for (event, decoded) in &decoded {
            match decoded {
                OrderEvent::OrderPlaced {
                    order_id, lines, ..
                } => {
                    skus.extend(lines.iter().map(|l| l.sku.as_str().to_owned()));
                    orders.push(order_id.to_string());
                    placed.push(*order_id);
                }
                OrderEvent::OrderCancelled { .. } | OrderEvent::OrderShipped { .. } => {
                    moved.push(order_id_of(event)?);
                }
                OrderEvent::OrderConfirmed | OrderEvent::OrderRejected { .. } => {}
            }
        }
        moved.sort_unstable();
        moved.dedup();
        for saga in store::read_many(tx, &moved).await? {
            skus.extend(saga.skus().map(str::to_owned));
            orders.push(saga.order_id().to_string());
        }
        let skus: Vec<&str> = skus.iter().map(String::as_str).collect();
        let orders: Vec<&str> = orders.iter().map(String::as_str).collect();
        work.lock(tx, &skus, &orders)
            .await
            .map_err(retry_conflicts)?;
        // The placed orders' rows too: one that has a saga already (its placement was applied
        // before, as after an operator's retry) is not started again.
        let mut rows = moved.clone();
        rows.extend(&placed);
        rows.sort_unstable();
        rows.dedup();
        let mut locked: HashMap<OrderId, Fulfillment> = store::lock_many(tx, &rows)
            .await?
            .into_iter()
            .map(|saga| (saga.order_id(), saga))
            .collect();
        let mut touched = Vec::new();
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
                    if locked.contains_key(&order_id) {
                        continue;
                    }
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
                    drive(&mut work, tx, &mut saga, &self.timing)
                        .await
                        .map_err(retry_conflicts)?;
                    // A cancellation later in the page moves it on.
                    locked.insert(order_id, saga);
                    touched.push(order_id);
                }
                OrderEvent::OrderCancelled { .. } => {
                    let id = order_id_of(event)?;
                    if self
                        .advance(&mut work, tx, &mut locked, id, |s| s.on_cancelled(now))
                        .await?
                    {
                        touched.push(id);
                    }
                }
                OrderEvent::OrderShipped { .. } => {
                    let id = order_id_of(event)?;
                    if self
                        .advance(&mut work, tx, &mut locked, id, |s| s.on_shipped(now))
                        .await?
                    {
                        touched.push(id);
                    }
                }
                OrderEvent::OrderConfirmed | OrderEvent::OrderRejected { .. } => {}
            }
        }
        // The page's writes, each kind in one statement: every command's events, then every
        // saga it started or moved.
        work.flush(tx).await.map_err(retry_conflicts)?;
        touched.sort_unstable();
        touched.dedup();
        let sagas: Vec<&Fulfillment> = touched.iter().filter_map(|id| locked.get(id)).collect();
        store::write_many(tx, &sagas).await?;
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
