//! What a hostile or careless client sends, and what it gets back: every refusal is
//! `application/problem+json` naming what was wrong, never axum's `text/plain`, never a 5xx;
//! and nothing it sends lets it see or change what is not its own, or leaves an order unfinished.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aggregates::inventory::{Product, ProductCommand};
use aggregates::values::{Currency, Money, ProductName, Sku};
use api_common::auth::{Role, ISSUER};
use orderline::Parts;
use reqwest::{Method, Response, StatusCode};
use serde_json::{json, Value};
use testkit::{json_body, TestApp};

/// Asserts a problem+json answer with `status`, naming `field` when given; returns the body.
async fn problem(response: Response, status: StatusCode, field: Option<&str>) -> Value {
    let url = response.url().to_string();
    assert_eq!(response.status(), status, "{url}");
    let kind = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(kind, "application/problem+json", "{url}");
    let body = json_body(response).await;
    assert_eq!(body["status"], status.as_u16(), "{url}: {body}");
    if let Some(field) = field {
        let named = body["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["field"] == field);
        assert!(named, "{url}: {field} not named in {body}");
    }
    body
}

/// A token signed with `secret` from raw claims (what another issuer might send).
fn signed(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn in_an_hour() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600
}

#[tokio::test]
async fn a_zero_price_is_refused_at_the_edge() {
    let app = TestApp::spawn_without_sagas().await;
    problem(
        app.register_product("FREE", 0, 5).await,
        StatusCode::BAD_REQUEST,
        Some("price.amount_minor"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_the_payment_cannot_be_made_for_is_rejected_and_its_stock_released() {
    // A catalog entry from before zero prices were refused: written straight to the store.
    let app = TestApp::spawn().await;
    let eur = Currency::parse("EUR").unwrap();
    app.execute::<Product>(
        "FREE",
        ProductCommand::Register {
            sku: Sku::parse("FREE").unwrap(),
            name: ProductName::parse("Sample").unwrap(),
            price: Money::new(0, eur).unwrap(),
            low_stock_threshold: 0,
            initial_stock: 5,
        },
    )
    .await
    .unwrap();
    let placed = app.placed_order("alice", &[("FREE", 2)]).await;
    app.caught_up().await;
    let order = json_body(
        app.get(&format!("/api/v1/orders/{placed}"), &app.admin())
            .await,
    )
    .await;
    assert_eq!(order["status"], "rejected", "{order}");
    assert_eq!(order["reason"], "payment_failed");
    let stock = json_body(app.get("/api/v1/inventory/FREE", &app.admin()).await).await;
    assert_eq!(stock["reserved"], 0, "{stock}");
    let saga = json_body(
        app.get(&format!("/api/v1/admin/sagas/{placed}"), &app.admin())
            .await,
    )
    .await;
    assert_eq!(saga["state"], "completed", "{saga}");
}

#[tokio::test]
async fn subjects_are_opaque_and_malformed_ones_are_refused() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 100, 5).await;
    // The server's secret is not known here: mint through its keys where the sub is valid,
    // and check that a sub with blanks or control characters cannot even be minted.
    for sub in ["alice ", " alice", "al\u{0}ice"] {
        assert!(app
            .keys
            .mint(sub, Role::Customer, Duration::from_secs(60))
            .is_err());
    }
    let orders = json_body(app.get("/api/v1/orders", &app.customer("alice")).await).await;
    assert_eq!(orders["items"], json!([]));
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let app = TestApp::spawn_without_sagas().await;
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let response = app
            .client
            .get(format!("{}/api/v1/orders", app.address))
            .header("authorization", format!("{scheme} {}", app.customer("c")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{scheme}");
    }
    let basic = app
        .client
        .get(format!("{}/api/v1/orders", app.address))
        .header("authorization", "Basic YTpi")
        .send()
        .await
        .unwrap();
    problem(basic, StatusCode::UNAUTHORIZED, None).await;
}

#[tokio::test]
async fn an_admin_and_a_customer_sharing_a_sub_share_no_idempotency_keys() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 100, 5).await;
    let alices = app.placed_order("alice", &[("A", 1)]).await;
    let path = format!("/api/v1/orders/{alices}/cancel");
    let body = json!({ "reason": "ops" });
    let key = [("Idempotency-Key", "k-1")];
    let by_admin = app
        .post(&path, Some(&app.token("bob", Role::Admin)), &body, &key)
        .await;
    assert_eq!(by_admin.status(), StatusCode::ACCEPTED);
    // The same request, same key, from the customer "bob": alice's order stays hidden.
    let by_customer = app
        .post(&path, Some(&app.token("bob", Role::Customer)), &body, &key)
        .await;
    problem(by_customer, StatusCode::NOT_FOUND, None).await;
}

#[tokio::test]
async fn the_extremes_of_a_number_are_refused_not_wrapped() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 100, 5).await;
    for delta in [i64::MIN, i64::MAX] {
        let response = app
            .post(
                "/api/v1/inventory/A/adjust",
                Some(&app.admin()),
                &json!({ "delta": delta, "reason": "count" }),
                &[],
            )
            .await;
        problem(response, StatusCode::BAD_REQUEST, Some("delta")).await;
    }
}

#[tokio::test]
async fn bad_query_and_path_values_are_problems_naming_the_parameter() {
    let app = TestApp::spawn_without_sagas().await;
    let admin = app.admin();
    for (path, field) in [
        ("/api/v1/orders?limit=abc", "limit"),
        (
            "/api/v1/orders?min_position=9223372036854775808",
            "min_position",
        ),
        ("/api/v1/inventory?low_stock=maybe", "low_stock"),
        ("/api/v1/products?colour=red", "colour"),
        ("/api/v1/inventory/A?extra=1", "extra"),
        ("/api/v1/admin/events?limit=x", "limit"),
        ("/api/v1/admin/sagas?limit=-", "limit"),
        ("/api/v1/admin/notifications?limit=1e3", "limit"),
        ("/api/v1/admin/parked?limit=0", "limit"),
        ("/api/v1/admin/streams/order/x?version=v", "version"),
    ] {
        problem(
            app.get(path, &admin).await,
            StatusCode::BAD_REQUEST,
            Some(field),
        )
        .await;
    }
    let retry = app
        .post(
            "/api/v1/admin/notifications/not-a-uuid/retry",
            Some(&admin),
            &json!({}),
            &[],
        )
        .await;
    problem(retry, StatusCode::BAD_REQUEST, Some("event_id")).await;
    // Undecodable or malformed order ids name no order.
    for path in [
        "/api/v1/orders/%FF",
        "/api/v1/orders/not-a-uuid",
        "/api/v1/orders/%FF/events",
        "/api/v1/payments/%FF",
    ] {
        problem(app.get(path, &admin).await, StatusCode::NOT_FOUND, None).await;
    }
    let cancel = app
        .post("/api/v1/orders/%FF/cancel", Some(&admin), &json!({}), &[])
        .await;
    problem(cancel, StatusCode::NOT_FOUND, None).await;
}

#[tokio::test]
async fn tokens_follow_rfc_7519_for_iat_nbf_and_aud() {
    // These tokens are signed with a secret of the test's own: a server configured with it.
    let secret = "a-test-secret-of-at-least-32-bytes!!";
    let app = TestApp::spawn_with_secret(Parts::NONE, secret).await;
    let get = |token: String| {
        app.client
            .get(format!("{}/api/v1/orders", app.address))
            .bearer_auth(token)
            .send()
    };
    let base = json!({ "sub": "c", "role": "customer", "exp": in_an_hour(), "iss": ISSUER });
    let mut no_iat = base.clone();
    no_iat["aud"] = json!(ISSUER);
    assert_eq!(
        get(signed(secret, &no_iat)).await.unwrap().status(),
        StatusCode::OK
    );
    let mut listed = base.clone();
    listed["aud"] = json!(["shop", ISSUER]);
    assert_eq!(
        get(signed(secret, &listed)).await.unwrap().status(),
        StatusCode::OK
    );
    let mut early = no_iat.clone();
    early["nbf"] = json!(in_an_hour());
    let refused = get(signed(secret, &early)).await.unwrap();
    problem(refused, StatusCode::UNAUTHORIZED, None).await;
    let mut blank = no_iat;
    blank["sub"] = json!("alice ");
    let refused = get(signed(secret, &blank)).await.unwrap();
    problem(refused, StatusCode::UNAUTHORIZED, None).await;
    let mut nul = listed;
    nul["sub"] = json!("al\u{0}ice");
    let refused = get(signed(secret, &nul)).await.unwrap();
    problem(refused, StatusCode::UNAUTHORIZED, None).await;
}

#[tokio::test]
async fn answers_are_not_cached_or_sniffed() {
    let app = TestApp::spawn_without_sagas().await;
    let response = app.get("/api/v1/orders", &app.customer("c")).await;
    assert_eq!(response.headers()["cache-control"], "no-store");
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    let refused = app.get("/api/v1/admin/events", &app.customer("c")).await;
    assert_eq!(refused.headers()["cache-control"], "no-store");
}

#[tokio::test]
async fn cross_origin_calls_need_an_allowed_origin() {
    let app = TestApp::spawn_without_sagas().await;
    let preflight = |address: String, origin: &'static str| {
        app.client
            .request(Method::OPTIONS, format!("{address}/api/v1/orders"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, idempotency-key, content-type",
            )
            .send()
    };
    // Unset: no cross-origin access.
    let refused = preflight(app.address.clone(), "https://shop.example")
        .await
        .unwrap();
    assert!(refused
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    problem(refused, StatusCode::METHOD_NOT_ALLOWED, None).await;
    let shop = app.spawn_api_with_cors(&["https://shop.example"]).await;
    let allowed = preflight(shop.clone(), "https://shop.example")
        .await
        .unwrap();
    assert!(allowed.status().is_success());
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    let headers = allowed.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(headers.contains("idempotency-key"), "{headers}");
    let other = preflight(shop.clone(), "https://evil.example")
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    let read = app
        .client
        .get(format!("{shop}/api/v1/orders"))
        .header("origin", "https://shop.example")
        .bearer_auth(app.customer("c"))
        .send()
        .await
        .unwrap();
    let exposed = read.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains("x-orderline-position"), "{exposed}");
}

#[tokio::test]
async fn client_ids_are_bounded_and_cannot_pose_as_the_saga() {
    let app = TestApp::spawn_without_sagas().await;
    let body = json!({ "sku": "A", "name": "A", "price": {"amount_minor": 1, "currency": "EUR"} });
    for (header, value) in [
        (
            "X-Request-Id",
            "saga:00000000-0000-0000-0000-000000000000/confirm",
        ),
        ("X-Request-Id", "has space"),
        ("X-Correlation-Id", "not-a-uuid"),
    ] {
        let response = app
            .post(
                "/api/v1/products",
                Some(&app.admin()),
                &body,
                &[(header, value)],
            )
            .await;
        problem(response, StatusCode::BAD_REQUEST, Some(header)).await;
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(count, 0, "a refused request wrote nothing");
    let response = app
        .post(
            "/api/v1/products",
            Some(&app.admin()),
            &body,
            &[("X-Request-Id", "checkout/42")],
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let stored: String = sqlx::query_scalar("SELECT metadata->>'request_id' FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, "checkout/42");
}

#[tokio::test]
async fn a_position_beyond_the_head_is_unavailable_at_once() {
    let app = TestApp::spawn_without_sagas().await;
    let body = problem(
        app.get("/api/v1/orders?min_position=1000000", &app.admin())
            .await,
        StatusCode::SERVICE_UNAVAILABLE,
        None,
    )
    .await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("beyond the log's head"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_waiting_for_a_read_model_are_bounded() {
    // No projections run: a position that exists is never reached, so every request waits.
    let app = TestApp::spawn_with(Parts::NONE).await;
    app.register_product("A", 100, 1).await;
    let token = app.admin();
    let requests = query_api::MAX_WAITERS + 40;
    let answers = futures::future::join_all((0..requests).map(|_| {
        app.client
            .get(format!("{}/api/v1/inventory/A?min_position=1", app.address))
            .bearer_auth(&token)
            .send()
    }))
    .await;
    let mut turned_away = 0;
    for answer in answers {
        let answer = answer.unwrap();
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = json_body(answer).await;
        if body["detail"].as_str().unwrap().contains("already wait") {
            turned_away += 1;
        }
    }
    assert!(
        turned_away > 0,
        "more than MAX_WAITERS requests waited at once"
    );
}
