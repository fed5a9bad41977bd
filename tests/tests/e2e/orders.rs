use aggregates::order::{Order, OrderCommand};
use reqwest::StatusCode;
use serde_json::{json, Value};
use testkit::{json_body, TestApp};
use uuid::Uuid;

async fn payload(app: &TestApp, order_id: &str, event_type: &str) -> Value {
    sqlx::query_scalar(
        "SELECT payload -> $2 FROM events WHERE aggregate_id = $1 AND event_type = $2",
    )
    .bind(order_id)
    .bind(event_type)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// Stands in for the saga, which is not built yet: records `OrderConfirmed` directly.
async fn confirm(app: &TestApp, order_id: &str) {
    app.execute::<Order>(order_id, OrderCommand::Confirm)
        .await
        .unwrap();
}

#[tokio::test]
async fn placing_an_order_prices_it_from_the_catalog() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 1250, 10).await;
    app.register_product("B", 99, 10).await;
    let response = app.place_order("alice", &[("A", 2), ("B", 3)]).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body = json_body(response).await;
    let order_id = body["order_id"].as_str().unwrap();
    assert_eq!(location, format!("/api/v1/orders/{order_id}"));
    assert_eq!(body["status"], "pending");
    let placed = payload(&app, order_id, "OrderPlaced").await;
    assert_eq!(placed["customer_id"], "alice");
    assert_eq!(
        placed["total"],
        json!({"amount_minor": 2797, "currency": "EUR"})
    );
    assert_eq!(placed["lines"][0]["unit_price"]["amount_minor"], 1250);
    assert_eq!(placed["lines"][1]["unit_price"]["amount_minor"], 99);
    let (position, metadata): (i64, Value) =
        sqlx::query_as("SELECT position, metadata FROM events WHERE aggregate_id = $1")
            .bind(order_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(body["position"], position);
    assert_eq!(metadata["actor_sub"], "alice");
    assert_eq!(metadata["actor_role"], "customer");
    for key in ["correlation_id", "causation_id", "request_id"] {
        assert!(metadata[key].is_string(), "{key} missing");
    }
}

#[tokio::test]
async fn the_request_and_correlation_ids_are_kept_on_the_events() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 1, 10).await;
    let correlation = Uuid::new_v4().to_string();
    let response = app
        .post(
            "/api/v1/orders",
            Some(&app.customer("alice")),
            &json!({"lines": [{"sku": "A", "quantity": 1}], "payment": {"token": "tok_visa"}}),
            &[
                ("x-request-id", "req-42"),
                ("x-correlation-id", &correlation),
            ],
        )
        .await;
    assert_eq!(response.headers()["x-request-id"], "req-42");
    let order_id = json_body(response).await["order_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let metadata: Value = sqlx::query_scalar("SELECT metadata FROM events WHERE aggregate_id = $1")
        .bind(&order_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(metadata["request_id"], "req-42");
    assert_eq!(metadata["correlation_id"], correlation);
}

#[tokio::test]
async fn an_order_for_an_unknown_sku_is_422_naming_the_line() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 1, 10).await;
    let response = app.place_order("alice", &[("A", 1), ("GHOST", 1)]).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem = json_body(response).await;
    assert_eq!(problem["errors"][0]["field"], "lines[1].sku");
    let orders: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'order'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(orders, 0);
}

#[tokio::test]
async fn the_same_sku_on_two_lines_is_422() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 1, 10).await;
    let response = app.place_order("alice", &[("A", 1), ("A", 2)]).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        json_body(response).await["errors"][0]["field"],
        "lines[1].sku"
    );
}

#[tokio::test]
async fn the_owner_can_cancel_and_a_second_cancel_changes_nothing() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 1, 10).await;
    let order_id = app.placed_order("alice", &[("A", 1)]).await;
    let path = format!("/api/v1/orders/{order_id}/cancel");
    let token = app.customer("alice");
    let first = app
        .post(
            &path,
            Some(&token),
            &json!({"reason": "changed my mind"}),
            &[],
        )
        .await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first = json_body(first).await;
    assert_eq!(first["status"], "cancelled");
    let second = app.post(&path, Some(&token), &json!({}), &[]).await;
    assert_eq!(second.status(), StatusCode::ACCEPTED);
    assert_eq!(json_body(second).await["position"], first["position"]);
    assert_eq!(
        app.stream("order", &order_id).await,
        vec![
            ("OrderPlaced".to_owned(), 1),
            ("OrderCancelled".to_owned(), 2)
        ]
    );
    let cancelled = payload(&app, &order_id, "OrderCancelled").await;
    assert_eq!(cancelled["reason"], "changed my mind");
}

#[tokio::test]
async fn cancelling_needs_no_body() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 1, 10).await;
    let order_id = app.placed_order("alice", &[("A", 1)]).await;
    let response = app
        .client
        .post(format!("{}/api/v1/orders/{order_id}/cancel", app.address))
        .bearer_auth(app.admin())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn another_customers_order_is_404_and_stays_untouched() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 1, 10).await;
    let order_id = app.placed_order("alice", &[("A", 1)]).await;
    let response = app
        .post(
            &format!("/api/v1/orders/{order_id}/cancel"),
            Some(&app.customer("mallory")),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(app.stream("order", &order_id).await.len(), 1);
    let unknown = app
        .post(
            &format!("/api/v1/orders/{}/cancel", Uuid::new_v4()),
            Some(&app.admin()),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn only_a_confirmed_order_ships() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 1, 10).await;
    let order_id = app.placed_order("alice", &[("A", 1)]).await;
    let path = format!("/api/v1/orders/{order_id}/ship");
    let body = json!({"carrier": "DHL", "tracking": "JJD000"});
    let pending = app.post(&path, Some(&app.admin()), &body, &[]).await;
    assert_eq!(pending.status(), StatusCode::CONFLICT);
    assert_eq!(
        json_body(pending).await["detail"],
        "cannot ship an order that is pending"
    );
    confirm(&app, &order_id).await;
    let shipped = app.post(&path, Some(&app.admin()), &body, &[]).await;
    assert_eq!(shipped.status(), StatusCode::ACCEPTED);
    assert_eq!(json_body(shipped).await["status"], "shipped");
    let event = payload(&app, &order_id, "OrderShipped").await;
    assert_eq!(event, json!({"carrier": "DHL", "tracking": "JJD000"}));
    let cancel = app
        .post(
            &format!("/api/v1/orders/{order_id}/cancel"),
            Some(&app.admin()),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(cancel.status(), StatusCode::CONFLICT);
}
