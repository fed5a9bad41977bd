//! The Stripe-style adapter against a local fake provider started by each test: approvals,
//! declines, temporary failures, a lost answer found again by key, and settlement rules.

#![expect(
    clippy::unwrap_used,
    reason = "a test that cannot go on should fail loudly"
)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aggregates::values::{Currency, Money, PaymentToken};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use sagas::gateway::stripe::{StripeConfig, StripeGateway};
use sagas::gateway::{Authorization, GatewayError, PaymentGateway};
use serde_json::{json, Value};

const API_KEY: &str = "sk_test_orderline";

#[derive(Default)]
struct Fake {
    /// Idempotency key -> the answer first given (status, body).
    answers: HashMap<String, (u16, Value)>,
    /// Intent id -> (amount, captured, refunded, status, orderline key).
    intents: HashMap<String, (i64, i64, i64, String, String)>,
    /// Calls per idempotency key.
    calls: HashMap<String, u32>,
}

type Shared = Arc<Mutex<Fake>>;

fn authorized(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {API_KEY}"))
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body =
        json!({"error": {"type": "invalid_request_error", "code": code, "message": message}});
    (status, Json(body)).into_response()
}

/// Replays the first answer to an idempotency key, or computes and keeps it.
fn idempotent(
    state: &Shared,
    key: &str,
    compute: impl FnOnce(&mut Fake) -> (u16, Value),
) -> Response {
    let mut fake = state.lock().unwrap();
    let (status, body) = match fake.answers.get(key) {
        Some(answer) => answer.clone(),
        None => {
            let answer = compute(&mut fake);
            if answer.0 < 500 {
                fake.answers.insert(key.to_owned(), answer.clone());
            }
            answer
        }
    };
    (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
}

async fn create_intent(
    State(state): State<Shared>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !authorized(&headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "api_key_invalid",
            "Invalid API Key provided",
        );
    }
    let key = headers["idempotency-key"].to_str().unwrap().to_owned();
    let method = form["payment_method"].clone();
    let calls = {
        let mut fake = state.lock().unwrap();
        let n = fake.calls.entry(key.clone()).or_default();
        *n += 1;
        *n
    };
    if method == "pm_slow" {
        // Decides at once but answers after the client gave up.
        let response = idempotent(&state, &key, |fake| intent(fake, &form, "requires_capture"));
        tokio::time::sleep(Duration::from_millis(800)).await;
        return response;
    }
    if method == "pm_flaky" && calls == 1 {
        return error(StatusCode::SERVICE_UNAVAILABLE, "api_error", "try again");
    }
    idempotent(&state, &key, |fake| match method.as_str() {
        "pm_card_chargeDeclined" => (
            402,
            json!({"error": {"type": "card_error", "code": "card_declined", "decline_code": "generic_decline", "message": "Your card was declined."}}),
        ),
        "pm_card_visa" | "pm_flaky" => intent(fake, &form, "requires_capture"),
        _ => (
            400,
            json!({"error": {"type": "invalid_request_error", "code": "resource_missing", "message": "No such PaymentMethod"}}),
        ),
    })
}

fn intent(fake: &mut Fake, form: &HashMap<String, String>, status: &str) -> (u16, Value) {
    let id = format!("pi_{}", fake.intents.len() + 1);
    let amount: i64 = form["amount"].parse().unwrap();
    let key = form["metadata[orderline_key]"].clone();
    fake.intents
        .insert(id.clone(), (amount, 0, 0, status.to_owned(), key));
    (
        200,
        json!({"id": id, "object": "payment_intent", "status": status, "amount": amount}),
    )
}

async fn search(
    State(state): State<Shared>,
    Query(query): Query<HashMap<String, String>>,
) -> Json<Value> {
    let fake = state.lock().unwrap();
    let wanted = query["query"]
        .split('\'')
        .nth(3)
        .unwrap_or_default()
        .to_owned();
    let data: Vec<Value> = fake
        .intents
        .iter()
        .filter(|(_, (_, _, _, _, key))| *key == wanted)
        .map(
            |(id, (amount, _, _, status, _))| json!({"id": id, "status": status, "amount": amount}),
        )
        .collect();
    Json(json!({"object": "search_result", "data": data}))
}

async fn capture(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let key = headers["idempotency-key"].to_str().unwrap().to_owned();
    idempotent(&state, &key, |fake| {
        let Some(intent) = fake.intents.get_mut(&id) else {
            return (404, json!({"error": {"message": "No such payment_intent"}}));
        };
        let amount: i64 = form["amount_to_capture"].parse().unwrap();
        if intent.3 != "requires_capture" || amount > intent.0 {
            return (
                400,
                json!({"error": {"message": "This PaymentIntent could not be captured"}}),
            );
        }
        intent.1 = amount;
        intent.3 = "succeeded".into();
        (200, json!({"id": id, "status": "succeeded"}))
    })
}

async fn cancel(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let key = headers["idempotency-key"].to_str().unwrap().to_owned();
    idempotent(&state, &key, |fake| match fake.intents.get_mut(&id) {
        Some(intent) if intent.3 == "requires_capture" => {
            intent.3 = "canceled".into();
            (200, json!({"id": id, "status": "canceled"}))
        }
        _ => (
            400,
            json!({"error": {"message": "You cannot cancel this PaymentIntent"}}),
        ),
    })
}

async fn refund(
    State(state): State<Shared>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let key = headers["idempotency-key"].to_str().unwrap().to_owned();
    idempotent(&state, &key, |fake| {
        let amount: i64 = form["amount"].parse().unwrap();
        match fake.intents.get_mut(&form["payment_intent"]) {
            Some(intent) if intent.2 + amount <= intent.1 => {
                intent.2 += amount;
                (200, json!({"object": "refund", "status": "succeeded"}))
            }
            _ => (
                400,
                json!({"error": {"message": "Refund amount is greater than unrefunded amount"}}),
            ),
        }
    })
}

/// Starts the fake provider; returns its base URL.
async fn fake_provider() -> String {
    let app = Router::new()
        .route("/v1/payment_intents", post(create_intent))
        .route("/v1/payment_intents/search", get(search))
        .route("/v1/payment_intents/{id}/capture", post(capture))
        .route("/v1/payment_intents/{id}/cancel", post(cancel))
        .route("/v1/refunds", post(refund))
        .with_state(Shared::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

fn gateway(base_url: String, api_key: &str) -> StripeGateway {
    StripeGateway::new(StripeConfig {
        base_url,
        api_key: api_key.into(),
        timeout: Duration::from_millis(300),
    })
    .unwrap()
}

fn eur(minor: i64) -> Money {
    Money::new(minor, Currency::parse("EUR").unwrap()).unwrap()
}

fn token(t: &str) -> PaymentToken {
    PaymentToken::parse(t).unwrap()
}

#[tokio::test]
async fn an_approved_card_is_authorized_and_the_same_key_answers_the_same() {
    let gateway = gateway(fake_provider().await, API_KEY);
    let first = gateway
        .authorize("order-1/authorize", &token("pm_card_visa"), eur(1000))
        .await
        .unwrap();
    let again = gateway
        .authorize("order-1/authorize", &token("pm_card_visa"), eur(1000))
        .await
        .unwrap();
    assert_eq!(
        first,
        Authorization::Authorized {
            reference: "pi_1".into()
        }
    );
    assert_eq!(again, first);
}

#[tokio::test]
async fn a_card_error_is_a_decline_with_its_reason() {
    let gateway = gateway(fake_provider().await, API_KEY);
    let outcome = gateway
        .authorize("k", &token("pm_card_chargeDeclined"), eur(1000))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        Authorization::Declined {
            reason: "generic_decline".into()
        }
    );
}

#[tokio::test]
async fn a_server_error_is_temporary_and_a_retry_with_the_key_succeeds() {
    let gateway = gateway(fake_provider().await, API_KEY);
    let first = gateway.authorize("k", &token("pm_flaky"), eur(1000)).await;
    assert!(
        matches!(first, Err(GatewayError::Transient(_))),
        "{first:?}"
    );
    let second = gateway
        .authorize("k", &token("pm_flaky"), eur(1000))
        .await
        .unwrap();
    assert!(matches!(second, Authorization::Authorized { .. }));
}

#[tokio::test]
async fn a_lost_answer_is_unknown_and_is_found_again_by_key() {
    let gateway = gateway(fake_provider().await, API_KEY);
    assert_eq!(gateway.retrieve("order-9/authorize").await.unwrap(), None);
    let lost = gateway
        .authorize("order-9/authorize", &token("pm_slow"), eur(500))
        .await;
    assert!(matches!(lost, Err(GatewayError::Unknown(_))), "{lost:?}");
    let found = gateway.retrieve("order-9/authorize").await.unwrap();
    assert_eq!(
        found,
        Some(Authorization::Authorized {
            reference: "pi_1".into()
        })
    );
}

#[tokio::test]
async fn capture_void_and_refund_follow_the_providers_rules() {
    let gateway = gateway(fake_provider().await, API_KEY);
    let Authorization::Authorized { reference } = gateway
        .authorize("a", &token("pm_card_visa"), eur(1000))
        .await
        .unwrap()
    else {
        panic!("not authorized");
    };
    let over = gateway.capture("c0", &reference, eur(1001)).await;
    assert!(matches!(over, Err(GatewayError::Permanent(_))), "{over:?}");
    gateway.capture("c1", &reference, eur(1000)).await.unwrap();
    gateway.capture("c1", &reference, eur(1000)).await.unwrap();
    let void = gateway.void("v1", &reference).await;
    assert!(matches!(void, Err(GatewayError::Permanent(_))), "{void:?}");
    gateway.refund("r1", &reference, eur(600)).await.unwrap();
    let too_much = gateway.refund("r2", &reference, eur(500)).await;
    assert!(
        matches!(too_much, Err(GatewayError::Permanent(_))),
        "{too_much:?}"
    );
}

#[tokio::test]
async fn a_wrong_api_key_is_refused_for_good() {
    let gateway = gateway(fake_provider().await, "sk_wrong");
    let refused = gateway.authorize("k", &token("pm_card_visa"), eur(1)).await;
    assert!(
        matches!(refused, Err(GatewayError::Permanent(_))),
        "{refused:?}"
    );
}

#[tokio::test]
async fn an_unreachable_provider_is_temporary() {
    let gateway = gateway("http://127.0.0.1:9".into(), API_KEY);
    let down = gateway.authorize("k", &token("pm_card_visa"), eur(1)).await;
    assert!(matches!(down, Err(GatewayError::Transient(_))), "{down:?}");
}
