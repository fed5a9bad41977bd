//! The built-in simulated payment gateway: each token's documented outcome, idempotency by
//! key, outcomes found again by key (also by a new instance, as after a restart), and the
//! settlement rules.

use aggregates::values::{Currency, Money, PaymentToken};
use sagas::gateway::simulated::SimulatedGateway;
use sagas::gateway::{Authorization, GatewayError, PaymentGateway};
use testkit::TestApp;

fn eur(minor: i64) -> Money {
    Money::new(minor, Currency::parse("EUR").unwrap()).unwrap()
}

fn token(t: &str) -> PaymentToken {
    PaymentToken::parse(t).unwrap()
}

fn authorized(key: &str) -> Authorization {
    Authorization::Authorized {
        reference: format!("sim_{key}"),
    }
}

#[tokio::test]
async fn tok_visa_authorizes_once_per_key() {
    let app = TestApp::spawn().await;
    let gateway = SimulatedGateway::new(app.pool.clone());
    let first = gateway
        .authorize("o1/authorize", &token("tok_visa"), eur(100))
        .await;
    assert_eq!(first, Ok(authorized("o1/authorize")));
    let again = gateway
        .authorize("o1/authorize", &token("tok_visa"), eur(100))
        .await;
    assert_eq!(again, first);
    let other_amount = gateway
        .authorize("o1/authorize", &token("tok_visa"), eur(101))
        .await;
    assert!(matches!(other_amount, Err(GatewayError::Permanent(_))));
}

#[tokio::test]
async fn tok_declined_is_declined() {
    let app = TestApp::spawn().await;
    let gateway = SimulatedGateway::new(app.pool.clone());
    let outcome = gateway
        .authorize("k", &token("tok_declined"), eur(100))
        .await;
    assert_eq!(
        outcome,
        Ok(Authorization::Declined {
            reason: "card_declined".into()
        })
    );
}

#[tokio::test]
async fn tok_timeout_then_ok_answers_unknown_first_but_did_authorize() {
    let app = TestApp::spawn().await;
    let gateway = SimulatedGateway::new(app.pool.clone());
    let first = gateway
        .authorize("k", &token("tok_timeout_then_ok"), eur(100))
        .await;
    assert!(matches!(first, Err(GatewayError::Unknown(_))), "{first:?}");
    // A new instance, as after a restart of the caller, finds the outcome by key.
    let restarted = SimulatedGateway::new(app.pool.clone());
    assert_eq!(restarted.retrieve("k").await, Ok(Some(authorized("k"))));
    let again = restarted
        .authorize("k", &token("tok_timeout_then_ok"), eur(100))
        .await;
    assert_eq!(again, Ok(authorized("k")));
}

#[tokio::test]
async fn tok_flaky_fails_twice_then_authorizes() {
    let app = TestApp::spawn().await;
    let gateway = SimulatedGateway::new(app.pool.clone());
    for _ in 0..2 {
        let outcome = gateway.authorize("k", &token("tok_flaky"), eur(100)).await;
        assert!(
            matches!(outcome, Err(GatewayError::Transient(_))),
            "{outcome:?}"
        );
        assert_eq!(gateway.retrieve("k").await, Ok(None));
    }
    let third = gateway.authorize("k", &token("tok_flaky"), eur(100)).await;
    assert_eq!(third, Ok(authorized("k")));
}

#[tokio::test]
async fn tok_slow_authorizes_in_the_end() {
    let app = TestApp::spawn().await;
    let gateway = SimulatedGateway::new(app.pool.clone());
    let outcome = gateway.authorize("k", &token("tok_slow"), eur(100)).await;
    assert_eq!(outcome, Ok(authorized("k")));
}

#[tokio::test]
async fn an_unknown_token_is_refused_and_nothing_is_kept() {
    let app = TestApp::spawn().await;
    let gateway = SimulatedGateway::new(app.pool.clone());
    let outcome = gateway
        .authorize("k", &token("tok_nonsense"), eur(100))
        .await;
    assert!(
        matches!(outcome, Err(GatewayError::Permanent(_))),
        "{outcome:?}"
    );
    assert_eq!(gateway.retrieve("k").await, Ok(None));
}

#[tokio::test]
async fn capture_void_and_refund_keep_the_money_straight() {
    let app = TestApp::spawn().await;
    let gateway = SimulatedGateway::new(app.pool.clone());
    let reference = "sim_a";
    gateway
        .authorize("a", &token("tok_visa"), eur(1000))
        .await
        .unwrap();
    let over = gateway.capture("c0", reference, eur(1001)).await;
    assert!(matches!(over, Err(GatewayError::Permanent(_))), "{over:?}");
    gateway.capture("c1", reference, eur(600)).await.unwrap();
    gateway.capture("c1", reference, eur(600)).await.unwrap();
    let beyond = gateway.capture("c2", reference, eur(500)).await;
    assert!(
        matches!(beyond, Err(GatewayError::Permanent(_))),
        "{beyond:?}"
    );
    let void = gateway.void("v", reference).await;
    assert!(matches!(void, Err(GatewayError::Permanent(_))), "{void:?}");
    gateway.refund("r1", reference, eur(600)).await.unwrap();
    let twice = gateway.refund("r2", reference, eur(1)).await;
    assert!(
        matches!(twice, Err(GatewayError::Permanent(_))),
        "{twice:?}"
    );
    let unknown = gateway.capture("c3", "sim_nothing", eur(1)).await;
    assert!(
        matches!(unknown, Err(GatewayError::Permanent(_))),
        "{unknown:?}"
    );

    gateway
        .authorize("b", &token("tok_visa"), eur(1000))
        .await
        .unwrap();
    gateway.void("vb", "sim_b").await.unwrap();
    let after_void = gateway.capture("cb", "sim_b", eur(1)).await;
    assert!(
        matches!(after_void, Err(GatewayError::Permanent(_))),
        "{after_void:?}"
    );
}
