use reqwest::StatusCode;
use serde_json::{json, Value};
use testkit::{json_body, TestApp};

async fn send(app: &TestApp, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
    let response = app.post(path, Some(token), &body, &[]).await;
    let status = response.status();
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "{path}"
    );
    (status, json_body(response).await)
}

fn fields(problem: &Value) -> Vec<&str> {
    problem["errors"]
        .as_array()
        .map(|e| e.iter().filter_map(|f| f["field"].as_str()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn every_invalid_field_of_a_product_is_named() {
    let app = TestApp::spawn().await;
    let body = json!({
        "sku": "no spaces", "name": " ", "price": {"amount_minor": -1, "currency": "EUR"},
        "initial_stock": -5
    });
    let (status, problem) = send(&app, "/api/v1/products", &app.admin(), body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(problem["status"], 400);
    assert_eq!(
        fields(&problem),
        ["sku", "name", "price.amount_minor", "initial_stock"]
    );
}

#[tokio::test]
async fn an_unknown_currency_is_named() {
    let app = TestApp::spawn().await;
    let body = json!({"sku": "A", "name": "A", "price": {"amount_minor": 1, "currency": "XYZ"}});
    let (status, problem) = send(&app, "/api/v1/products", &app.admin(), body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(fields(&problem), ["price.currency"]);
}

#[tokio::test]
async fn unknown_fields_are_400_naming_the_field() {
    let app = TestApp::spawn().await;
    app.register_product("A", 1, 1).await;
    let body = json!({"lines": [{"sku": "A", "quantity": 1, "unit_price": 1}], "payment": {"token": "tok_visa"}});
    let (status, problem) = send(&app, "/api/v1/orders", &app.customer("c"), body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(fields(&problem), ["lines[0].unit_price"]);
    let (status, _) = problem_of_restock(&app, json!({"quantity": 1, "price": 3})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

async fn problem_of_restock(app: &TestApp, body: Value) -> (StatusCode, Value) {
    send(app, "/api/v1/inventory/A/restock", &app.admin(), body).await
}

#[tokio::test]
async fn a_missing_or_mistyped_field_is_400() {
    let app = TestApp::spawn().await;
    app.register_product("A", 1, 1).await;
    let (status, problem) = problem_of_restock(&app, json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(problem["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("quantity"));
    let (status, problem) = problem_of_restock(&app, json!({"quantity": "ten"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(fields(&problem), ["quantity"]);
}

#[tokio::test]
async fn order_lines_are_limited_in_number_and_quantity() {
    let app = TestApp::spawn().await;
    let token = app.customer("c");
    let too_many: Vec<Value> = (0..101)
        .map(|i| json!({"sku": format!("S{i}"), "quantity": 1}))
        .collect();
    let body = json!({"lines": too_many, "payment": {"token": "tok_visa"}});
    let (status, problem) = send(&app, "/api/v1/orders", &token, body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(fields(&problem), ["lines"]);
    let body = json!({"lines": [{"sku": "A", "quantity": 10001}, {"sku": "B", "quantity": 0}], "payment": {"token": ""}});
    let (status, problem) = send(&app, "/api/v1/orders", &token, body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        fields(&problem),
        ["lines[0].quantity", "lines[1].quantity", "payment.token"]
    );
    let body = json!({"lines": [], "payment": {"token": "tok_visa"}});
    let (status, problem) = send(&app, "/api/v1/orders", &token, body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(fields(&problem), ["lines"]);
}

#[tokio::test]
async fn a_restock_quantity_must_be_positive() {
    let app = TestApp::spawn().await;
    app.register_product("A", 1, 1).await;
    for quantity in [0, -3, 1_000_001] {
        let (status, problem) = problem_of_restock(&app, json!({"quantity": quantity})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(fields(&problem), ["quantity"]);
    }
}

#[tokio::test]
async fn a_body_that_is_not_json_is_refused() {
    let app = TestApp::spawn().await;
    let send = |content_type: &'static str, body: Vec<u8>| {
        app.client
            .post(format!("{}/api/v1/inventory/A/restock", app.address))
            .bearer_auth(app.admin())
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let broken = send("application/json", b"{\"quantity\": ".to_vec())
        .await
        .unwrap();
    assert_eq!(broken.status(), StatusCode::BAD_REQUEST);
    let text = send("text/plain", b"{\"quantity\": 1}".to_vec())
        .await
        .unwrap();
    assert_eq!(text.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let huge = send("application/json", vec![b' '; 70 * 1024])
        .await
        .unwrap();
    assert_eq!(huge.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(huge.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_problems() {
    let app = TestApp::spawn().await;
    let missing = app
        .client
        .get(format!("{}/nope", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );
    let wrong = app
        .client
        .delete(format!("{}/api/v1/orders", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn health_says_live_and_ready() {
    let app = TestApp::spawn().await;
    for path in ["/health/live", "/health/ready"] {
        let response = app
            .client
            .get(format!("{}{path}", app.address))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
}
