use reqwest::StatusCode;
use serde_json::json;
use testkit::{json_body, TestApp};

/// Orders placed so far (the saga's confirmations, which race with the test, do not count).
async fn order_events(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'order' AND event_type = 'OrderPlaced'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_retried_command_replays_the_first_answer_and_writes_once() {
    let app = TestApp::spawn().await;
    app.register_product("A", 100, 10).await;
    let token = app.customer("alice");
    let body = json!({"lines": [{"sku": "A", "quantity": 1}], "payment": {"token": "tok_visa"}});
    let key = [("idempotency-key", "order-attempt-1")];
    let first = app.post("/api/v1/orders", Some(&token), &body, &key).await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let location = first.headers()["location"].clone();
    let first = json_body(first).await;
    // The same body with other key order and spacing is the same request.
    let same = serde_json::from_str::<serde_json::Value>(
        r#"{ "payment": {"token":"tok_visa"}, "lines":[{"quantity":1,"sku":"A"}] }"#,
    )
    .unwrap();
    let second = app.post("/api/v1/orders", Some(&token), &same, &key).await;
    assert_eq!(second.status(), StatusCode::ACCEPTED);
    assert_eq!(second.headers()["location"], location);
    assert_eq!(json_body(second).await, first);
    assert_eq!(order_events(&app).await, 1);
}

#[tokio::test]
async fn reusing_a_key_for_another_body_is_422() {
    let app = TestApp::spawn().await;
    app.register_product("A", 100, 10).await;
    let key = [("idempotency-key", "k1")];
    let admin = app.admin();
    let (one, two) = (json!({"quantity": 1}), json!({"quantity": 2}));
    let path = "/api/v1/inventory/A/restock";
    let first = app.post(path, Some(&admin), &one, &key).await;
    assert_eq!(first.status(), StatusCode::OK);
    let changed = app.post(path, Some(&admin), &two, &key).await;
    assert_eq!(changed.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        changed.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(app.stream("inventory", "A").await.len(), 2);
}

#[tokio::test]
async fn keys_are_scoped_to_the_caller() {
    let app = TestApp::spawn().await;
    app.register_product("A", 100, 10).await;
    let body = json!({"lines": [{"sku": "A", "quantity": 1}], "payment": {"token": "tok_visa"}});
    let key = [("idempotency-key", "same-key")];
    let alice = app
        .post("/api/v1/orders", Some(&app.customer("alice")), &body, &key)
        .await;
    let bob = app
        .post("/api/v1/orders", Some(&app.customer("bob")), &body, &key)
        .await;
    assert_eq!(alice.status(), StatusCode::ACCEPTED);
    assert_eq!(bob.status(), StatusCode::ACCEPTED);
    assert_ne!(
        json_body(alice).await["order_id"],
        json_body(bob).await["order_id"]
    );
    assert_eq!(order_events(&app).await, 2);
}

#[tokio::test]
async fn a_key_whose_first_request_is_still_running_is_409() {
    let app = TestApp::spawn().await;
    app.register_product("A", 100, 10).await;
    // Hold the key's lock the way a request in flight holds it: keys belong to the principal,
    // `role:sub`.
    let mut holder = app.pool.acquire().await.unwrap();
    sqlx::query(
        "SELECT pg_advisory_lock(8101,
                hashtext(length('admin:ops') || ':' || 'admin:ops' || 'busy-key'))",
    )
    .execute(&mut *holder)
    .await
    .unwrap();
    let key = [("idempotency-key", "busy-key")];
    let response = app
        .post(
            "/api/v1/inventory/A/restock",
            Some(&app.admin()),
            &json!({"quantity": 1}),
            &key,
        )
        .await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(app.stream("inventory", "A").await.len(), 1);
    sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(&mut *holder)
        .await
        .unwrap();
    let response = app
        .post(
            "/api/v1/inventory/A/restock",
            Some(&app.admin()),
            &json!({"quantity": 1}),
            &key,
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_refused_command_stores_no_answer_so_a_fixed_retry_runs() {
    let app = TestApp::spawn().await;
    let key = [("idempotency-key", "k")];
    let body = json!({"quantity": 1});
    let early = app
        .post(
            "/api/v1/inventory/A/restock",
            Some(&app.admin()),
            &body,
            &key,
        )
        .await;
    assert_eq!(early.status(), StatusCode::NOT_FOUND);
    app.register_product("A", 100, 10).await;
    let retry = app
        .post(
            "/api/v1/inventory/A/restock",
            Some(&app.admin()),
            &body,
            &key,
        )
        .await;
    assert_eq!(retry.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_invalid_key_is_400() {
    let app = TestApp::spawn().await;
    let long = "k".repeat(256);
    let response = app
        .post(
            "/api/v1/inventory/A/restock",
            Some(&app.admin()),
            &json!({"quantity": 1}),
            &[("idempotency-key", long.as_str())],
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        json_body(response).await["errors"][0]["field"],
        "Idempotency-Key"
    );
}
