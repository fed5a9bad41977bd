use std::time::Duration;

use aggregates::inventory::{Product, ProductCommand};
use aggregates::order::{Order, OrderCommand};
use aggregates::values::{OrderId, Quantity};
use api_common::auth::Role;
use reqwest::StatusCode;
use serde_json::{json, Value};
use testkit::{json_body, TestApp};
use uuid::Uuid;

fn position(response: &reqwest::Response) -> i64 {
    response.headers()["x-orderline-position"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

async fn placed(app: &TestApp, customer: &str, lines: &[(&str, i64)]) -> (String, i64) {
    let body = json_body(app.place_order(customer, lines).await).await;
    (
        body["order_id"].as_str().unwrap().to_owned(),
        body["position"].as_i64().unwrap(),
    )
}

#[tokio::test]
async fn an_order_can_be_read_back_at_the_position_its_command_answered() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 250, 10).await;
    let (id, at) = placed(&app, "alice", &[("A", 2)]).await;
    let response = app
        .get(
            &format!("/api/v1/orders/{id}?min_position={at}"),
            &app.customer("alice"),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(position(&response) >= at);
    let order = json_body(response).await;
    assert_eq!(order["status"], "pending");
    assert_eq!(order["customer_id"], "alice");
    assert_eq!(
        order["total"],
        json!({"amount_minor": 500, "currency": "EUR"})
    );
    assert_eq!(order["lines"][0]["sku"], "A");
    assert_eq!(order["history"][0]["status"], "pending");
    let admin = app.get(&format!("/api/v1/orders/{id}"), &app.admin()).await;
    assert_eq!(admin.status(), StatusCode::OK);
}

#[tokio::test]
async fn another_customers_order_payment_and_events_are_404() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 250, 10).await;
    let (id, at) = placed(&app, "alice", &[("A", 1)]).await;
    let mallory = app.customer("mallory");
    for path in [
        format!("/api/v1/orders/{id}?min_position={at}"),
        format!("/api/v1/payments/{id}?min_position={at}"),
        format!("/api/v1/orders/{id}/events"),
        format!("/api/v1/orders/{}", Uuid::new_v4()),
    ] {
        let response = app.get(&path, &mallory).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let service = app.token("erp", Role::Service);
    let response = app.get(&format!("/api/v1/orders/{id}"), &service).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_position_not_reached_in_time_is_503_with_retry_after() {
    let app = TestApp::spawn_without_sagas().await;
    let response = app
        .get("/api/v1/products?min_position=999999", &app.admin())
        .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
}

#[tokio::test]
async fn the_payment_of_an_order_shows_its_attempts() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 250, 10).await;
    let (id, at) = placed(&app, "alice", &[("A", 2)]).await;
    let response = app
        .get(
            &format!("/api/v1/payments/{id}?min_position={at}"),
            &app.customer("alice"),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let payment = json_body(response).await;
    assert_eq!(payment["status"], "pending");
    assert_eq!(
        payment["amount"],
        json!({"amount_minor": 500, "currency": "EUR"})
    );
    assert_eq!(payment["attempts"], json!([]));
}

#[tokio::test]
async fn the_catalog_and_stock_levels_follow_reservations() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 250, 5).await;
    app.register_product("B", 100, 50).await;
    let order = OrderId::from(Uuid::new_v4());
    let reserve = ProductCommand::Reserve {
        order_id: order,
        quantity: Quantity::parse(4).unwrap(),
    };
    app.execute::<Product>("A", reserve).await.unwrap();
    app.caught_up().await;
    let product = json_body(app.get("/api/v1/products/A", &app.customer("c")).await).await;
    assert_eq!(
        product,
        json!({"sku": "A", "name": "Product A", "price": {"amount_minor": 250, "currency": "EUR"}, "available": 1})
    );
    let level = json_body(
        app.get("/api/v1/inventory/A", &app.token("wms", Role::Service))
            .await,
    )
    .await;
    assert_eq!(
        level,
        json!({"sku": "A", "on_hand": 5, "reserved": 4, "available": 1, "low_stock": true})
    );
    let low = json_body(
        app.get("/api/v1/inventory?low_stock=true", &app.admin())
            .await,
    )
    .await;
    assert_eq!(low["items"].as_array().unwrap().len(), 1);
    let all = json_body(
        app.get("/api/v1/products?limit=1", &app.customer("c"))
            .await,
    )
    .await;
    assert_eq!(all["items"][0]["sku"], "A");
    let rest = json_body(
        app.get(
            &format!(
                "/api/v1/products?limit=1&cursor={}",
                all["next_cursor"].as_str().unwrap()
            ),
            &app.customer("c"),
        )
        .await,
    )
    .await;
    assert_eq!(rest["items"][0]["sku"], "B");
    assert_eq!(rest["next_cursor"], Value::Null);
    let forbidden = app.get("/api/v1/inventory/A", &app.customer("c")).await;
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    let missing = app.get("/api/v1/products/NOPE", &app.customer("c")).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

/// Pages through a customer's orders with `limit`, collecting ids.
async fn all_pages(app: &TestApp, token: &str, query: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/orders?{query}&cursor={c}"),
            None => format!("/api/v1/orders?{query}"),
        };
        let page = json_body(app.get(&path, token).await).await;
        for item in page["items"].as_array().unwrap() {
            ids.push(item["order_id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return ids,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_pages_stay_stable_while_orders_are_placed() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 1, 100_000).await;
    let mut before = Vec::new();
    for _ in 0..25 {
        before.push(placed(&app, "alice", &[("A", 1)]).await.0);
    }
    app.caught_up().await;
    let token = app.customer("alice");
    let (seen, _) = tokio::join!(all_pages(&app, &token, "limit=4"), async {
        for _ in 0..15 {
            placed(&app, "alice", &[("A", 1)]).await;
        }
    });
    let unique: std::collections::BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "an order appeared twice");
    for id in &before {
        assert!(seen.contains(id), "order {id} was skipped");
    }
}

#[tokio::test]
async fn lists_filter_by_status_and_customer() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 1, 100).await;
    let (cancelled, _) = placed(&app, "alice", &[("A", 1)]).await;
    placed(&app, "alice", &[("A", 1)]).await;
    placed(&app, "bob", &[("A", 1)]).await;
    app.execute::<Order>(&cancelled, OrderCommand::Cancel { reason: None })
        .await
        .unwrap();
    app.caught_up().await;
    let alice = app.customer("alice");
    assert_eq!(all_pages(&app, &alice, "limit=10").await.len(), 2);
    assert_eq!(
        all_pages(&app, &alice, "status=cancelled").await,
        vec![cancelled.clone()]
    );
    assert_eq!(all_pages(&app, &app.admin(), "limit=10").await.len(), 3);
    assert_eq!(
        all_pages(&app, &app.admin(), "customer_id=bob").await.len(),
        1
    );
    let other = app.get("/api/v1/orders?customer_id=bob", &alice).await;
    assert_eq!(other.status(), StatusCode::FORBIDDEN);
    let bad = app.get("/api/v1/orders?status=lost", &alice).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn an_orders_events_come_with_their_metadata_oldest_first() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 1, 100).await;
    let (id, _) = placed(&app, "alice", &[("A", 1)]).await;
    app.post(
        &format!("/api/v1/orders/{id}/cancel"),
        Some(&app.customer("alice")),
        &json!({}),
        &[],
    )
    .await;
    let body = json_body(
        app.get(
            &format!("/api/v1/orders/{id}/events"),
            &app.customer("alice"),
        )
        .await,
    )
    .await;
    let types: Vec<&str> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["OrderPlaced", "OrderCancelled"]);
    assert_eq!(body["events"][0]["metadata"]["actor_sub"], "alice");
}

#[tokio::test]
async fn status_updates_stream_until_the_order_is_final() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 1, 100).await;
    let (id, at) = placed(&app, "alice", &[("A", 1)]).await;
    let mut response = app
        .client
        .get(format!(
            "{}/api/v1/orders/{id}/updates?min_position={at}",
            app.address
        ))
        .bearer_auth(app.customer("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let first = String::from_utf8(response.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    assert!(
        first.contains("event: status") && first.contains("\"pending\""),
        "{first}"
    );
    app.execute::<Order>(&id, OrderCommand::Cancel { reason: None })
        .await
        .unwrap();
    let mut rest = String::new();
    let read_all = async {
        while let Some(chunk) = response.chunk().await.unwrap() {
            rest.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read_all)
        .await
        .expect("the stream ends after the final status");
    assert!(rest.contains("\"cancelled\""), "{rest}");
}
