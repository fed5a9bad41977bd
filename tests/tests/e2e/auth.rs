use api_common::auth::Role;
use reqwest::StatusCode;
use serde_json::json;
use testkit::{json_body, TestApp};

#[tokio::test]
async fn a_command_without_a_token_is_401_with_a_bearer_challenge() {
    let app = TestApp::spawn().await;
    let response = app.post("/api/v1/orders", None, &json!({}), &[]).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer realm=\"orderline\""
    );
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
}

#[tokio::test]
async fn a_token_signed_with_another_secret_is_401() {
    let app = TestApp::spawn().await;
    let foreign = api_common::auth::TokenKeys::hs256(b"another secret entirely")
        .mint("ops", Role::Admin, std::time::Duration::from_secs(60))
        .unwrap();
    let body = json!({"sku": "A", "name": "A", "price": {"amount_minor": 1, "currency": "EUR"}});
    let response = app
        .post("/api/v1/products", Some(&foreign), &body, &[])
        .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let garbage = app
        .post("/api/v1/products", Some("not-a-jwt"), &json!({}), &[])
        .await;
    assert_eq!(garbage.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn each_command_refuses_the_wrong_role_with_403() {
    let app = TestApp::spawn().await;
    let customer = app.customer("alice");
    let service = app.token("warehouse", Role::Service);
    let admin = app.admin();
    let cases = [
        ("/api/v1/products", &customer),
        ("/api/v1/inventory/A/restock", &customer),
        ("/api/v1/inventory/A/adjust", &service),
        ("/api/v1/orders", &admin),
        ("/api/v1/orders", &service),
        (
            "/api/v1/orders/8f0f3b5e-8d0c-4c1e-9f55-2b4f4b2f7a10/ship",
            &customer,
        ),
        (
            "/api/v1/orders/8f0f3b5e-8d0c-4c1e-9f55-2b4f4b2f7a10/cancel",
            &service,
        ),
    ];
    for (path, token) in cases {
        let response = app.post(path, Some(token), &json!({}), &[]).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{path}");
        let problem = json_body(response).await;
        assert_eq!(problem["status"], 403);
    }
}
