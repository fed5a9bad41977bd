//! Writes a realistic log quickly: every payload is serialized from the real event types, so
//! the projections fold exactly what production writes; rows go in with one multi-row insert
//! per 10,000 events.

use std::collections::HashMap;

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

/// The metadata of every generated event.
fn metadata() -> Value {
    json!({
        "actor_sub": "bench", "actor_role": "service", "request_id": "bench",
        "correlation_id": Uuid::nil(), "causation_id": Uuid::nil(),
    })
}

/// Rows waiting for one insert, each with its event id and its link in its stream's hash chain
/// (ADR 9), so that `verify` finds the generated log intact.
#[derive(Default)]
struct Batch {
    types: Vec<String>,
    ids: Vec<String>,
    sequences: Vec<i64>,
    event_types: Vec<String>,
    event_versions: Vec<String>,
    payloads: Vec<Value>,
    event_ids: Vec<Uuid>,
    hashes: Vec<Vec<u8>>,
    /// The newest hash of every stream written so far.
    chains: HashMap<(String, String), Vec<u8>>,
}

impl Batch {
    fn push<E: DomainEvent>(
        &mut self,
        aggregate_type: &str,
        id: &str,
        sequence: i64,
        event: &E,
    ) -> anyhow::Result<()> {
        let payload = serde_json::to_value(event)?;
        let event_id = Uuid::new_v4();
        let (event_type, event_version) = (event.event_type(), event.event_version());
        let stream = (aggregate_type.to_owned(), id.to_owned());
        let hash = event_store::chain::Hashed {
            event_id,
            aggregate_type,
            aggregate_id: id,
            sequence,
            event_type: &event_type,
            event_version: &event_version,
            payload: &payload,
            metadata: &metadata(),
        }
        .hash(self.chains.get(&stream).map(Vec::as_slice));
        self.chains.insert(stream, hash.clone());
        self.types.push(aggregate_type.to_owned());
        self.ids.push(id.to_owned());
        self.sequences.push(sequence);
        self.event_types.push(event_type);
        self.event_versions.push(event_version);
        self.payloads.push(payload);
        self.event_ids.push(event_id);
        self.hashes.push(hash);
        Ok(())
    }

    async fn flush(&mut self, pool: &PgPool) -> anyhow::Result<()> {
        if self.types.is_empty() {
            return Ok(());
        }
        let metadata = metadata();
        let mut tx = event_store::locks::begin_writer(pool).await?;
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                                 payload, metadata, event_id, hash)
             SELECT t, i, s, e, v, p, $6, id, h
               FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::jsonb[],
                           $7::text[], $8::uuid[], $9::bytea[]) AS x(t, i, s, e, p, v, id, h)",
        )
        .bind(&self.types)
        .bind(&self.ids)
        .bind(&self.sequences)
        .bind(&self.event_types)
        .bind(&self.payloads)
        .bind(metadata)
        .bind(&self.event_versions)
        .bind(&self.event_ids)
        .bind(&self.hashes)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        // The rows are written; the streams' chains go on in the next batch.
        let chains = std::mem::take(&mut self.chains);
        *self = Self {
            chains,
            ..Self::default()
        };
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
