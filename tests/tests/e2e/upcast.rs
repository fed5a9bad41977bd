//! Events stored in older shapes are read as the current ones everywhere: by the aggregate that
//! decides the next command, by the projections, by time travel and by `verify`. The log itself
//! is never rewritten.

use event_store::chain::Hashed;
use reqwest::StatusCode;
use serde_json::{json, Value};
use testkit::{json_body, TestApp};
use uuid::Uuid;

/// Appends a hand-made event of `version` at the end of its stream, chained like orderline's.
async fn store_old_event(
    app: &TestApp,
    sku: &str,
    sequence: i64,
    event_type: &str,
    payload: Value,
) {
    let previous: Option<Vec<u8>> = sqlx::query_scalar(
        "SELECT hash FROM events WHERE aggregate_type = 'inventory' AND aggregate_id = $1
          ORDER BY sequence DESC LIMIT 1",
    )
    .bind(sku)
    .fetch_optional(&app.pool)
    .await
    .unwrap()
    .flatten();
    let event_id = Uuid::new_v4();
    let metadata = json!({"correlation_id": Uuid::new_v4(), "causation_id": Uuid::new_v4(),
                          "actor_sub": "legacy-import", "actor_role": "service", "request_id": "legacy"});
    let hash = Hashed {
        event_id,
        aggregate_type: "inventory",
        aggregate_id: sku,
        sequence,
        event_type,
        event_version: "1",
        payload: &payload,
        metadata: &metadata,
    }
    .hash(previous.as_deref());
    let mut tx = event_store::locks::begin_writer(&app.pool).await.unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, event_id, hash)
         VALUES ('inventory', $1, $2, $3, '1', $4, $5, $6, $7)",
    )
    .bind(sku)
    .bind(sequence)
    .bind(event_type)
    .bind(&payload)
    .bind(&metadata)
    .bind(event_id)
    .bind(hash)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn version_1_events_are_read_as_the_current_version_everywhere() {
    let app = TestApp::spawn_without_sagas().await;
    let price = json!({"amount_minor": 250, "currency": "EUR"});
    // 1 -> 1: a registration from before low-stock thresholds existed.
    store_old_event(
        &app,
        "V1",
        1,
        "ProductRegistered",
        json!({"ProductRegistered": {"sku": "V1", "name": "Old", "price": price, "initial_stock": 4}}),
    )
    .await;
    // 1 -> 2: the first catalog event used to carry the opening stock; 1 -> 0: a count that
    // changed nothing.
    store_old_event(
        &app,
        "OLD",
        1,
        "ProductCreated",
        json!({"ProductCreated": {"sku": "OLD", "name": "Older", "price": price, "stock": 5}}),
    )
    .await;
    store_old_event(
        &app,
        "OLD",
        2,
        "StockCounted",
        json!({"StockCounted": {"counted": 5}}),
    )
    .await;

    // The aggregate decides on the upcast state: 5 in stock, then a restock of 1.
    let restocked = app.restock("OLD", 1).await;
    assert_eq!(restocked.status(), StatusCode::OK);
    assert_eq!(json_body(restocked).await["on_hand"], 6);
    let new_event: (i64, String) = sqlx::query_as(
        "SELECT sequence, event_version FROM events WHERE aggregate_id = 'OLD' AND event_type = 'Restocked'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        new_event,
        (3, "1".to_owned()),
        "the new event follows the old ones"
    );
    // New registrations are written at version 2.
    app.register_product("NEW", 100, 1).await;
    let version: String = sqlx::query_scalar(
        "SELECT event_version FROM events WHERE aggregate_id = 'NEW' AND sequence = 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(version, "2");

    // The projections fold the current shapes.
    app.caught_up().await;
    let old = json_body(app.get("/api/v1/inventory/OLD", &app.admin()).await).await;
    assert_eq!((&old["on_hand"], &old["reserved"]), (&json!(6), &json!(0)));
    let v1 = json_body(app.get("/api/v1/inventory/V1", &app.admin()).await).await;
    assert_eq!(v1["on_hand"], 4);
    app.assert_read_models_match_log().await;

    // Time travel reads them the same way: after event 1 the split registration and restock.
    let then = json_body(
        app.get(
            "/api/v1/admin/streams/inventory/OLD?version=1",
            &app.admin(),
        )
        .await,
    )
    .await;
    assert_eq!(then["state"]["on_hand"], 5);
    let v1_then = json_body(
        app.get("/api/v1/admin/streams/inventory/V1?version=1", &app.admin())
            .await,
    )
    .await;
    assert_eq!(v1_then["state"]["catalog"]["low_stock_threshold"], 0);

    // The stored log is untouched and verifies, old shapes and all.
    let stored: String = sqlx::query_scalar(
        "SELECT event_type FROM events WHERE aggregate_id = 'OLD' AND sequence = 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(stored, "ProductCreated");
    let verified = audit::verify::verify(&app.pool, &|_| {}).await.unwrap();
    assert!(verified.is_ok(), "{verified:?}");
}
