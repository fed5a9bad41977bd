use reqwest::StatusCode;
use serde_json::json;
use testkit::{json_body, TestApp};

#[tokio::test]
async fn registering_a_product_answers_201_with_position_and_location() {
    let app = TestApp::spawn().await;
    let response = app.register_product("MUG-1", 1250, 5).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["location"], "/api/v1/products/MUG-1");
    let body = json_body(response).await;
    assert_eq!(body["sku"], "MUG-1");
    let position: i64 = sqlx::query_scalar("SELECT max(position) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(body["position"], position);
    assert_eq!(
        app.stream("inventory", "MUG-1").await,
        vec![("ProductRegistered".to_owned(), 1)]
    );
}

#[tokio::test]
async fn a_duplicate_product_is_409() {
    let app = TestApp::spawn().await;
    assert_eq!(
        app.register_product("A", 1, 0).await.status(),
        StatusCode::CREATED
    );
    let again = app.register_product("A", 1, 0).await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert_eq!(
        json_body(again).await["detail"],
        "product already registered"
    );
}

#[tokio::test]
async fn restocking_answers_the_new_on_hand() {
    let app = TestApp::spawn().await;
    app.register_product("A", 1, 5).await;
    let response = app.restock("A", 10).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = json_body(response).await;
    assert_eq!(body["on_hand"], 15);
    assert!(body["position"].as_i64().unwrap() > 0);
}

#[tokio::test]
async fn restocking_an_unknown_sku_is_404() {
    let app = TestApp::spawn().await;
    let response = app.restock("NOPE", 1).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
}

#[tokio::test]
async fn an_adjustment_is_recorded_with_its_reason() {
    let app = TestApp::spawn().await;
    app.register_product("A", 1, 5).await;
    let response = app
        .post(
            "/api/v1/inventory/A/adjust",
            Some(&app.admin()),
            &json!({"delta": -2, "reason": "two broken in transit"}),
            &[],
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(json_body(response).await["on_hand"], 3);
    let payload: serde_json::Value = sqlx::query_scalar(
        "SELECT payload FROM events WHERE aggregate_id = 'A' AND event_type = 'StockAdjusted'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(payload["StockAdjusted"]["reason"], "two broken in transit");
}

#[tokio::test]
async fn an_adjustment_below_zero_is_422_naming_delta() {
    let app = TestApp::spawn().await;
    app.register_product("A", 1, 5).await;
    let response = app
        .post(
            "/api/v1/inventory/A/adjust",
            Some(&app.admin()),
            &json!({"delta": -6, "reason": "count"}),
            &[],
        )
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(json_body(response).await["errors"][0]["field"], "delta");
    assert_eq!(app.stream("inventory", "A").await.len(), 1);
}
