//! One helper per command endpoint, over any base address (an in-process server or a child
//! process). Each answers the raw response, so a caller can expect success or a refusal.

use reqwest::{Client, Response};
use serde_json::{json, Value};

/// Sends `request`.
///
/// # Panics
/// When the server cannot be reached at all (the test cannot go on).
async fn send(request: reqwest::RequestBuilder) -> Response {
    request.send().await.expect("the server answers")
}

/// `POST /api/v1/products` as `admin`: `sku` named `Product {sku}` at `price_minor` EUR cents
/// with `stock` units and, if given, a low-stock threshold (else the server's default).
pub async fn register_product(
    client: &Client,
    base: &str,
    admin: &str,
    (sku, price_minor, stock): (&str, i64, i64),
    low_stock_threshold: Option<i64>,
) -> Response {
    let mut body = json!({
        "sku": sku, "name": format!("Product {sku}"),
        "price": {"amount_minor": price_minor, "currency": "EUR"},
        "initial_stock": stock,
    });
    if let Some(threshold) = low_stock_threshold {
        body["low_stock_threshold"] = json!(threshold);
    }
    send(
        client
            .post(format!("{base}/api/v1/products"))
            .bearer_auth(admin)
            .json(&body),
    )
    .await
}

/// `POST /api/v1/inventory/{sku}/restock` as `admin`.
pub async fn restock(
    client: &Client,
    base: &str,
    admin: &str,
    sku: &str,
    quantity: i64,
) -> Response {
    send(
        client
            .post(format!("{base}/api/v1/inventory/{sku}/restock"))
            .bearer_auth(admin)
            .json(&json!({ "quantity": quantity })),
    )
    .await
}

/// `POST /api/v1/orders` with the `customer` token: `(sku, quantity)` lines paid with the
/// payment `token` (`tok_visa` is authorized by the simulated provider).
pub async fn place_order(
    client: &Client,
    base: &str,
    customer: &str,
    lines: &[(&str, i64)],
    token: &str,
) -> Response {
    let lines: Vec<Value> = lines
        .iter()
        .map(|(sku, quantity)| json!({ "sku": sku, "quantity": quantity }))
        .collect();
    send(
        client
            .post(format!("{base}/api/v1/orders"))
            .bearer_auth(customer)
            .json(&json!({ "lines": lines, "payment": { "token": token } })),
    )
    .await
}

/// [`place_order`] that must be accepted (202); answers the order id.
///
/// # Panics
/// When the order is refused.
pub async fn placed_order(
    client: &Client,
    base: &str,
    customer: &str,
    lines: &[(&str, i64)],
    token: &str,
) -> String {
    let response = place_order(client, base, customer, lines, token).await;
    assert_eq!(response.status(), 202, "placing {lines:?}");
    let body: Value = response.json().await.expect("a JSON answer");
    body["order_id"].as_str().expect("an order_id").to_owned()
}
