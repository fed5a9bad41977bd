//! The read-model oracle: every read model must equal an independent fold of the events table,
//! each aggregate's own `apply` over its raw events (through the one replay path,
//! `event_store::replay`), never the projections' code.

use cqrs_es::persist::PersistedEventRepository;
use postgres_es::PostgresEventRepository;
use serde_json::{json, Value};
use sqlx::PgPool;

use aggregates::inventory::Product;
use aggregates::order::Order;
use aggregates::payment::{Payment, PaymentStatus};
use event_store::replay::{self, Payload};

/// Every row of `table`, as JSON, ordered by `key`: for byte-for-byte comparisons.
///
/// # Panics
/// When the query fails.
pub async fn dump(pool: &PgPool, table: &str, key: &str) -> Value {
    sqlx::query_scalar(&format!(
        "SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY {key}), '[]') FROM {table} t"
    ))
    .fetch_one(pool)
    .await
    .expect("dump")
}

/// Asserts that the read models on `pool`'s database (inventory, orders, payments) equal an
/// independent fold of the log, row for row, and that each stream is in sequence order in it.
///
/// # Panics
/// On the first difference, naming the row.
/// Asserts that every read model equals an independent fold of the events table: each
/// aggregate's own `apply` over its raw events.
pub async fn assert_read_models_match_log(pool: &PgPool) {
    // Consumers fold each aggregate's events in log order: it must be sequence order.
    let inverted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
            SELECT sequence, lag(sequence) OVER (PARTITION BY aggregate_type, aggregate_id
                                                 ORDER BY transaction_id, position) AS before
              FROM events) AS stream
          WHERE before IS NOT NULL AND sequence <> before + 1",
    )
    .fetch_one(pool)
    .await
    .expect("log order");
    assert_eq!(inverted, 0, "events out of sequence order in the log");
    let repository = PostgresEventRepository::new(pool.clone());
    let ids = |aggregate_type: &'static str| {
        sqlx::query_scalar::<_, String>(
            "SELECT DISTINCT aggregate_id FROM events WHERE aggregate_type = $1",
        )
        .bind(aggregate_type)
        .fetch_all(pool)
    };
    let inventory = dump(pool, "rm_inventory", "sku").await;
    let skus = ids("inventory").await.expect("skus");
    assert_eq!(
        inventory.as_array().map(Vec::len),
        Some(skus.len()),
        "inventory rows"
    );
    for row in inventory.as_array().into_iter().flatten() {
        let sku = row["sku"].as_str().expect("sku");
        let product: Product = fold(&repository, sku).await;
        let expected = json!({
            "on_hand": product.on_hand(), "reserved": product.reserved(),
            "available": product.available(), "low_stock": product.is_low(),
            "price": product.catalog().map(|c| c.price),
        });
        let actual = json!({
            "on_hand": row["on_hand"], "reserved": row["reserved"],
            "available": row["available"], "low_stock": row["low_stock"], "price": row["price"],
        });
        assert_eq!(actual, expected, "inventory {sku}");
    }
    let orders = dump(pool, "rm_orders", "order_id").await;
    let order_ids = ids("order").await.expect("orders");
    assert_eq!(
        orders.as_array().map(Vec::len),
        Some(order_ids.len()),
        "order rows"
    );
    let payments = dump(pool, "rm_payments", "order_id").await;
    let paid: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT aggregate_id) FROM events
          WHERE aggregate_type IN ('order', 'payment')",
    )
    .fetch_one(pool)
    .await
    .expect("count");
    assert_eq!(
        payments.as_array().map(Vec::len),
        usize::try_from(paid).ok(),
        "payment rows"
    );
    for row in orders.as_array().into_iter().flatten() {
        let id = row["order_id"].as_str().expect("id");
        let order: Order = fold(&repository, id).await;
        let placed = order.placed().expect("placed");
        assert_eq!(row["status"], json!(order.status()), "order {id}");
        assert_eq!(row["customer_id"], json!(placed.customer_id), "order {id}");
        assert_eq!(row["total"], json!(placed.total), "order {id}");
        let changes: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE aggregate_type = 'order' AND aggregate_id = $1",
        )
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("count");
        assert_eq!(
            row["history"].as_array().map(Vec::len),
            usize::try_from(changes).ok(),
            "order {id} history"
        );
    }
    for row in payments.as_array().into_iter().flatten() {
        let id = row["order_id"].as_str().expect("id");
        let payment: Payment = fold(&repository, id).await;
        if payment.status() == PaymentStatus::New {
            assert_eq!(row["status"], "pending", "payment {id}");
            continue;
        }
        assert_eq!(row["status"], json!(payment.status()), "payment {id}");
        assert_eq!(row["captured"], payment.captured_minor(), "payment {id}");
        assert_eq!(row["refunded"], payment.refunded_minor(), "payment {id}");
        assert_eq!(
            row["attempts"].as_array().map(Vec::len),
            Some(payment.attempts().len()),
            "payment {id}"
        );
    }
}

/// An aggregate folded from all its raw events (no snapshot), old shapes read through the
/// upcasters as every reader does.
async fn fold<A: cqrs_es::Aggregate>(repository: &PostgresEventRepository, id: &str) -> A {
    let mut aggregate = A::default();
    for event in repository.get_events::<A>(id).await.expect("events") {
        replay::apply(
            &mut aggregate,
            &event.event_type,
            &event.event_version,
            Payload::Json(&event.payload),
        )
        .expect("a stored event decodes");
    }
    aggregate
}
