//! Writes a realistic log quickly: every payload is serialized from the real event types, so
//! the projections fold exactly what production writes; rows go in with one multi-row insert
//! per 10,000 events.

use aggregates::inventory::ProductEvent;
use aggregates::order::{OrderEvent, OrderLine};
use aggregates::payment::{Attempt, AttemptOutcome, PaymentEvent};
use aggregates::values::{
    Currency, CustomerId, Money, OrderId, PaymentToken, ProductName, Quantity, Sku,
};
use cqrs_es::DomainEvent;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

/// SKUs in the generated catalog.
pub const SKUS: usize = 1000;
/// Events each generated order contributes: placed, reserved, payment requested, authorized,
/// confirmed.
pub const EVENTS_PER_ORDER: u64 = 5;

#[derive(Default)]
struct Batch {
    types: Vec<String>,
    ids: Vec<String>,
    sequences: Vec<i64>,
    event_types: Vec<String>,
    payloads: Vec<Value>,
}

impl Batch {
    fn push<E: DomainEvent>(
        &mut self,
        aggregate_type: &str,
        id: &str,
        sequence: i64,
        event: &E,
    ) -> anyhow::Result<()> {
        self.types.push(aggregate_type.to_owned());
        self.ids.push(id.to_owned());
        self.sequences.push(sequence);
        self.event_types.push(event.event_type());
        self.payloads.push(serde_json::to_value(event)?);
        Ok(())
    }

    async fn flush(&mut self, pool: &PgPool) -> anyhow::Result<()> {
        if self.types.is_empty() {
            return Ok(());
        }
        let metadata = json!({
            "actor_sub": "bench", "actor_role": "service", "request_id": "bench",
            "correlation_id": Uuid::nil(), "causation_id": Uuid::nil(),
        });
        let mut tx = event_store::locks::begin_writer(pool).await?;
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             SELECT t, i, s, e, '1', p, $6
               FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::jsonb[]) AS x(t, i, s, e, p)",
        )
        .bind(&self.types)
        .bind(&self.ids)
        .bind(&self.sequences)
        .bind(&self.event_types)
        .bind(&self.payloads)
        .bind(metadata)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        *self = Self::default();
        Ok(())
    }
}

/// Writes at least `events` events; returns how many it wrote.
pub async fn log(pool: &PgPool, events: u64) -> anyhow::Result<u64> {
    let eur = Currency::parse("EUR")?;
    let price = Money::new(1250, eur)?;
    let one = Quantity::parse(1)?;
    let skus: Vec<Sku> = (0..SKUS)
        .map(|i| Sku::parse(&format!("SKU-{i:04}")))
        .collect::<Result<_, _>>()?;
    let mut next_sequence = vec![1i64; SKUS];
    let mut batch = Batch::default();
    let mut written = 0u64;
    for (i, sku) in skus.iter().enumerate() {
        let registered = ProductEvent::ProductRegistered {
            sku: sku.clone(),
            name: ProductName::parse(&format!("Product {i}"))?,
            price,
            low_stock_threshold: 10,
            initial_stock: 10_000_000,
        };
        batch.push("inventory", sku.as_str(), 1, &registered)?;
        next_sequence[i] = 2;
        written += 1;
    }
    let mut order_number = 0usize;
    while written < events {
        let order_id = OrderId::from(Uuid::new_v4());
        let id = order_id.to_string();
        let slot = order_number % SKUS;
        let sku = &skus[slot];
        let placed = OrderEvent::OrderPlaced {
            order_id,
            customer_id: CustomerId::parse(&format!("customer-{}", order_number % 5000))?,
            lines: vec![OrderLine {
                sku: sku.clone(),
                quantity: one,
                unit_price: price,
            }],
            total: price,
            payment_token: PaymentToken::parse("tok_visa")?,
            shipping_address: None,
        };
        batch.push("order", &id, 1, &placed)?;
        let reserved = ProductEvent::StockReserved {
            order_id,
            quantity: one,
        };
        batch.push("inventory", sku.as_str(), next_sequence[slot], &reserved)?;
        next_sequence[slot] += 1;
        let requested = PaymentEvent::PaymentRequested {
            order_id,
            amount: price,
            token: PaymentToken::parse("tok_visa")?,
        };
        batch.push("payment", &id, 1, &requested)?;
        let authorized = PaymentEvent::AuthorizationAttempted(Attempt {
            number: 1,
            attempt_id: format!("{id}/authorize/1"),
            outcome: AttemptOutcome::Authorized {
                provider_reference: format!("auth_{order_number}"),
            },
        });
        batch.push("payment", &id, 2, &authorized)?;
        batch.push("order", &id, 2, &OrderEvent::OrderConfirmed)?;
        written += EVENTS_PER_ORDER;
        order_number += 1;
        if batch.types.len() >= 10_000 {
            batch.flush(pool).await?;
        }
    }
    batch.flush(pool).await?;
    sqlx::query("ANALYZE events").execute(pool).await?;
    Ok(written)
}
