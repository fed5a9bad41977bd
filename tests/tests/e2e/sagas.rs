//! The fulfillment saga over HTTP, with the simulated gateway: races for stock, every payment
//! token, cancellation, shipment, deadlines and a stuck saga an operator retries.

use std::collections::HashMap;

use futures::future::join_all;
use orderline::Parts;
use reqwest::StatusCode;
use serde_json::{json, Value};
use testkit::{json_body, saga_config, TestApp};

/// The order as `GET /api/v1/orders/{id}` shows it once the saga and projections are done.
async fn order(app: &TestApp, id: &str) -> Value {
    json_body(app.get(&format!("/api/v1/orders/{id}"), &app.admin()).await).await
}

async fn payment(app: &TestApp, id: &str) -> Value {
    json_body(
        app.get(&format!("/api/v1/payments/{id}"), &app.admin())
            .await,
    )
    .await
}

async fn stock(app: &TestApp, sku: &str) -> Value {
    json_body(
        app.get(&format!("/api/v1/inventory/{sku}"), &app.admin())
            .await,
    )
    .await
}

async fn saga(app: &TestApp, id: &str) -> Value {
    json_body(
        app.get(&format!("/api/v1/admin/sagas/{id}"), &app.admin())
            .await,
    )
    .await
}

/// `POST path` with an empty body, as an admin.
async fn admin_post(app: &TestApp, path: &str) -> reqwest::Response {
    app.post(path, Some(&app.admin()), &json!({}), &[]).await
}

/// Places an order of one unit of `sku` paid with `token`; returns its id.
async fn order_paying(app: &TestApp, customer: &str, sku: &str, token: &str) -> String {
    let response = app.place_order_paying(customer, &[(sku, 1)], token).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    json_body(response).await["order_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_customers_racing_for_twenty_units_give_twenty_confirmed_and_forty_out_of_stock() {
    let app = TestApp::spawn().await;
    app.register_product("HOT", 500, 20).await;
    let app = &app;
    let placed = join_all((0..60).map(|i| async move {
        let response = app.place_order(&format!("c{i}"), &[("HOT", 1)]).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        json_body(response).await["order_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }))
    .await;
    app.caught_up().await;
    let mut outcomes: HashMap<(String, String), usize> = HashMap::new();
    for id in &placed {
        let order = order(app, id).await;
        let key = (
            order["status"].as_str().unwrap().to_owned(),
            order["reason"].as_str().unwrap_or("").to_owned(),
        );
        *outcomes.entry(key).or_default() += 1;
    }
    assert_eq!(
        outcomes.get(&("confirmed".into(), String::new())),
        Some(&20)
    );
    assert_eq!(
        outcomes.get(&("rejected".into(), "out_of_stock".into())),
        Some(&40),
        "{outcomes:?}"
    );
    let level = stock(app, "HOT").await;
    assert_eq!(
        (&level["on_hand"], &level["reserved"], &level["available"]),
        (&json!(20), &json!(20), &json!(0))
    );
    // Exactly the confirmed orders hold money, once each.
    let (authorized, keys): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE outcome ? 'authorized'), count(DISTINCT idempotency_key)
           FROM simulated_gateway_operations WHERE operation = 'authorize'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((authorized, keys), (20, 20));
    app.assert_read_models_match_log().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_payment_token_gives_its_documented_outcome() {
    let app = TestApp::spawn().await;
    app.register_product("A", 250, 100).await;
    let cases = [
        ("tok_visa", "confirmed", None, vec!["authorized"]),
        (
            "tok_declined",
            "rejected",
            Some("payment_declined"),
            vec!["declined"],
        ),
        // The first answer was lost; the saga asked by key and found the authorization.
        ("tok_timeout_then_ok", "confirmed", None, vec!["authorized"]),
        (
            "tok_flaky",
            "confirmed",
            None,
            vec!["failed", "failed", "authorized"],
        ),
        ("tok_slow", "confirmed", None, vec!["authorized"]),
        (
            "tok_nonsense",
            "rejected",
            Some("payment_failed"),
            vec!["failed"],
        ),
    ];
    let mut ids = Vec::new();
    for (token, ..) in &cases {
        ids.push(order_paying(&app, "c1", "A", token).await);
    }
    app.caught_up().await;
    for ((token, status, reason, attempts), id) in cases.iter().zip(&ids) {
        let order = order(&app, id).await;
        assert_eq!(order["status"], *status, "{token}: {order}");
        assert_eq!(order["reason"].as_str(), *reason, "{token}");
        let payment = payment(&app, id).await;
        let outcomes: Vec<&str> = payment["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["outcome"].as_str().unwrap())
            .collect();
        assert_eq!(&outcomes, attempts, "{token}: {payment}");
        let expected_payment = if *status == "confirmed" {
            "authorized"
        } else if *reason == Some("payment_declined") {
            "declined"
        } else {
            "failed"
        };
        assert_eq!(payment["status"], expected_payment, "{token}");
        assert_eq!(
            saga(&app, id).await["state"],
            if *status == "confirmed" {
                "confirmed"
            } else {
                "completed"
            }
        );
    }
    // Two orders rejected: their unit is back; four confirmed hold theirs.
    assert_eq!(stock(&app, "A").await["reserved"], 4);
    app.assert_read_models_match_log().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_confirmed_order_voids_the_payment_and_releases_the_stock() {
    let app = TestApp::spawn().await;
    app.register_product("A", 250, 10).await;
    let id = order_paying(&app, "c1", "A", "tok_visa").await;
    app.caught_up().await;
    assert_eq!(order(&app, &id).await["status"], "confirmed");
    let cancelled = app
        .post(
            &format!("/api/v1/orders/{id}/cancel"),
            Some(&app.customer("c1")),
            &json!({ "reason": "changed my mind" }),
            &[],
        )
        .await;
    assert_eq!(cancelled.status(), StatusCode::ACCEPTED);
    app.caught_up().await;
    let order = order(&app, &id).await;
    assert_eq!(order["status"], "cancelled");
    let history: Vec<&str> = order["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    assert_eq!(history, ["pending", "confirmed", "cancelled"]);
    assert_eq!(payment(&app, &id).await["status"], "voided");
    assert_eq!(stock(&app, "A").await["reserved"], 0);
    assert_eq!(stock(&app, "A").await["on_hand"], 10);
    let saga = saga(&app, &id).await;
    assert_eq!(saga["state"], "completed");
    assert_eq!(saga["goal"]["goal"], "cancel");
    app.assert_read_models_match_log().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_while_the_payment_is_slow_still_voids_it_and_releases_the_stock() {
    let app = TestApp::spawn().await;
    app.register_product("A", 250, 10).await;
    let id = order_paying(&app, "c1", "A", "tok_slow").await;
    // Cancel while the 2-second authorization is in flight.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let cancelled = app
        .post(
            &format!("/api/v1/orders/{id}/cancel"),
            Some(&app.customer("c1")),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(cancelled.status(), StatusCode::ACCEPTED);
    app.caught_up().await;
    assert_eq!(order(&app, &id).await["status"], "cancelled");
    let payment = payment(&app, &id).await;
    assert!(
        ["voided", "failed"].contains(&payment["status"].as_str().unwrap()),
        "{payment}"
    );
    let holds: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM simulated_gateway_operations a
          WHERE a.operation = 'authorize' AND a.outcome ? 'authorized'
            AND NOT EXISTS (SELECT 1 FROM simulated_gateway_operations v
                             WHERE v.operation = 'void' AND v.outcome IS NOT NULL
                               AND v.token = 'sim_' || a.idempotency_key)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(holds, 0, "an authorization was left held");
    assert_eq!(stock(&app, "A").await["reserved"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shipping_commits_the_stock_and_captures_the_payment() {
    let app = TestApp::spawn().await;
    app.register_product("A", 250, 10).await;
    let response = app.place_order("c1", &[("A", 3)]).await;
    let id = json_body(response).await["order_id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.caught_up().await;
    let shipped = app
        .post(
            &format!("/api/v1/orders/{id}/ship"),
            Some(&app.admin()),
            &json!({ "carrier": "DHL", "tracking": "123" }),
            &[],
        )
        .await;
    assert_eq!(shipped.status(), StatusCode::ACCEPTED);
    app.caught_up().await;
    assert_eq!(order(&app, &id).await["status"], "shipped");
    let payment = payment(&app, &id).await;
    assert_eq!(payment["status"], "captured");
    assert_eq!(payment["amount"]["amount_minor"], 750);
    let level = stock(&app, "A").await;
    assert_eq!(
        (&level["on_hand"], &level["reserved"]),
        (&json!(7), &json!(0))
    );
    assert_eq!(saga(&app, &id).await["state"], "completed");
    // A cancel after shipment is refused and changes nothing.
    let refused = admin_post(&app, &format!("/api/v1/orders/{id}/cancel")).await;
    assert_eq!(refused.status(), StatusCode::CONFLICT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_authorization_slower_than_its_deadline_is_voided_and_the_order_rejected() {
    let mut config = saga_config();
    config.timing.authorization_deadline = chrono::Duration::seconds(1);
    let app = TestApp::spawn_configured(Parts::ALL, config).await;
    app.register_product("A", 250, 10).await;
    let id = order_paying(&app, "c1", "A", "tok_slow").await;
    app.caught_up().await;
    let order = order(&app, &id).await;
    assert_eq!(order["status"], "rejected");
    assert_eq!(order["reason"], "payment_failed");
    assert_eq!(payment(&app, &id).await["status"], "voided");
    assert_eq!(stock(&app, "A").await["reserved"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saga_whose_void_keeps_failing_is_listed_as_stuck_and_an_admin_can_retry_it() {
    let app = TestApp::spawn().await;
    app.register_product("A", 250, 10).await;
    let id = order_paying(&app, "c1", "A", "tok_visa").await;
    app.caught_up().await;
    // The provider loses the authorization: voiding it is refused for good.
    let key = format!("{id}/authorize");
    let kept: (String, String, i64, String, i32, Value) = sqlx::query_as(
        "DELETE FROM simulated_gateway_operations WHERE idempotency_key = $1
         RETURNING idempotency_key, token, amount_minor, currency, calls, outcome",
    )
    .bind(&key)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let cancel = admin_post(&app, &format!("/api/v1/orders/{id}/cancel")).await;
    assert_eq!(cancel.status(), StatusCode::ACCEPTED);
    app.caught_up().await;

    let stuck = json_body(
        app.get("/api/v1/admin/sagas?state=stuck", &app.admin())
            .await,
    )
    .await;
    let items = stuck["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{stuck}");
    assert_eq!(items[0]["order_id"], id.as_str());
    assert!(items[0]["last_error"]
        .as_str()
        .unwrap()
        .contains("no authorization"));
    let steps: Vec<(&str, &str)> = items[0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [
            ("reserve_stock", "reserved"),
            ("authorize_payment", "voiding"),
            ("confirm_order", "cancelled")
        ]
    );
    // Stock stays reserved while the money is unresolved: nothing is released half-way.
    assert_eq!(stock(&app, "A").await["reserved"], 1);
    let not_stuck = admin_post(
        &app,
        "/api/v1/admin/sagas/00000000-0000-0000-0000-000000000000/retry",
    )
    .await;
    assert_eq!(not_stuck.status(), StatusCode::NOT_FOUND);

    // The operator fixes the provider's side, then retries.
    sqlx::query(
        "INSERT INTO simulated_gateway_operations
                (idempotency_key, operation, token, amount_minor, currency, calls, outcome)
         VALUES ($1, 'authorize', $2, $3, $4, $5, $6)",
    )
    .bind(&kept.0)
    .bind(&kept.1)
    .bind(kept.2)
    .bind(&kept.3)
    .bind(kept.4)
    .bind(&kept.5)
    .execute(&app.pool)
    .await
    .unwrap();
    let retried = admin_post(&app, &format!("/api/v1/admin/sagas/{id}/retry")).await;
    assert_eq!(retried.status(), StatusCode::ACCEPTED);
    app.caught_up().await;
    let saga = saga(&app, &id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    assert_eq!(stock(&app, "A").await["reserved"], 0);
    assert_eq!(payment(&app, &id).await["status"], "voided");
    let again = admin_post(&app, &format!("/api/v1/admin/sagas/{id}/retry")).await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let customer = app.get("/api/v1/admin/sagas", &app.customer("c1")).await;
    assert_eq!(customer.status(), StatusCode::FORBIDDEN);
    let bad = app
        .get("/api/v1/admin/sagas?state=lost", &app.admin())
        .await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saga_commands_carry_the_orders_correlation_id_and_a_deterministic_request_id() {
    let app = TestApp::spawn().await;
    app.register_product("A", 250, 10).await;
    let id = order_paying(&app, "c1", "A", "tok_visa").await;
    app.caught_up().await;
    let metadata: Vec<(String, Value)> = sqlx::query_as(
        "SELECT event_type, metadata FROM events
          WHERE aggregate_id IN ($1, 'A') AND event_type <> 'ProductRegistered'
          ORDER BY position",
    )
    .bind(&id)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let placed = &metadata[0].1;
    let request_ids: Vec<(&str, &str)> = metadata[1..]
        .iter()
        .map(|(t, m)| {
            assert_eq!(m["correlation_id"], placed["correlation_id"], "{t}");
            assert_eq!(m["actor_role"], "service");
            (t.as_str(), m["request_id"].as_str().unwrap())
        })
        .collect();
    let saga = |step: &str| format!("saga:{id}/{step}");
    assert_eq!(
        request_ids,
        [
            ("StockReserved", saga("reserve/A").as_str()),
            ("PaymentRequested", saga("request-payment").as_str()),
            (
                "AuthorizationAttempted",
                saga(&format!("record/{id}/authorize#1")).as_str()
            ),
            ("OrderConfirmed", saga("confirm").as_str()),
        ]
    );
}

/// Orders among `ids` that the orders read model shows as `status`.
async fn orders_in(app: &TestApp, ids: &[String], status: &str) -> i64 {
    let ids: Vec<uuid::Uuid> = ids.iter().map(|id| id.parse().unwrap()).collect();
    sqlx::query_scalar("SELECT count(*) FROM rm_orders WHERE order_id = ANY($1) AND status = $2")
        .bind(&ids)
        .bind(status)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// The saga's parked keys, as `GET /api/v1/admin/parked` lists them.
async fn saga_parked(app: &TestApp) -> Vec<Value> {
    let body = json_body(
        app.get("/api/v1/admin/parked?consumer=fulfillment", &app.admin())
            .await,
    )
    .await;
    body["items"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_order_parks_only_itself_while_200_others_confirm_and_a_retry_after_the_fix_finishes_it(
) {
    let app = TestApp::spawn().await;
    app.register_product("POISON", 100, 10).await;
    for i in 0..4 {
        app.register_product(&format!("FINE{i}"), 100, 1000).await;
    }
    app.caught_up().await;
    // A fault in the database that only this SKU's reservations meet: every page that
    // reserves it fails, for as long as the trigger is there.
    sqlx::raw_sql(
        "CREATE FUNCTION jam() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'the POISON shelf is jammed'; END $$;
         CREATE TRIGGER jam BEFORE INSERT ON events FOR EACH ROW
           WHEN (NEW.aggregate_type = 'inventory' AND NEW.aggregate_id = 'POISON')
           EXECUTE FUNCTION jam();",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let poison = app.placed_order("c-poison", &[("POISON", 1)]).await;
    let app = &app;
    let others: Vec<String> = join_all((0..200).map(|i| async move {
        let sku = format!("FINE{}", i % 4);
        app.placed_order(&format!("c{}", i % 20), &[(sku.as_str(), 1)])
            .await
    }))
    .await;
    let mut parked = Vec::new();
    let mut confirmed = 0;
    for _ in 0..600 {
        parked = saga_parked(app).await;
        confirmed = orders_in(app, &others, "confirmed").await;
        if confirmed == 200 && !parked.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(confirmed, 200, "every other order confirms meanwhile");
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0]["key"], poison.as_str());
    assert_eq!(parked[0]["event_type"], "OrderPlaced");
    assert!(
        parked[0]["error"].as_str().unwrap().contains("jammed"),
        "{parked:?}"
    );
    assert_eq!(
        orders_in(app, std::slice::from_ref(&poison), "pending").await,
        1
    );
    let saga_status = app
        .get(&format!("/api/v1/admin/sagas/{poison}"), &app.admin())
        .await
        .status();
    assert_eq!(
        saga_status,
        StatusCode::NOT_FOUND,
        "the parked order has no saga yet"
    );

    // The cause is fixed; the operator retries; the order finishes like any other.
    sqlx::raw_sql("DROP TRIGGER jam ON events; DROP FUNCTION jam();")
        .execute(&app.pool)
        .await
        .unwrap();
    let retried = admin_post(
        app,
        &format!("/api/v1/admin/parked/fulfillment/{poison}/retry"),
    )
    .await;
    assert_eq!(retried.status(), StatusCode::ACCEPTED);
    for _ in 0..300 {
        if saga_parked(app).await.is_empty()
            && orders_in(app, std::slice::from_ref(&poison), "confirmed").await == 1
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(saga_parked(app).await.is_empty());
    app.caught_up().await;
    assert_eq!(order(app, &poison).await["status"], "confirmed");
    let shelf = stock(app, "POISON").await;
    assert_eq!(
        (shelf["on_hand"].clone(), shelf["reserved"].clone()),
        (json!(10), json!(1))
    );
    let mut reserved = 0;
    for i in 0..4 {
        reserved += stock(app, &format!("FINE{i}")).await["reserved"]
            .as_i64()
            .unwrap();
    }
    assert_eq!(reserved, 200, "each other order reserved once");
    app.assert_applied_once(4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_orders_and_cancellations_on_shared_skus_calls_the_provider_once_per_key() {
    let app = TestApp::spawn().await;
    for sku in ["LA", "LB", "LC"] {
        app.register_product(sku, 100, 100_000).await;
    }
    app.caught_up().await;
    let app = &app;
    // Every order takes all three SKUs, listed in different orders; a third are cancelled as
    // soon as they are placed, so compensations and gateway answers race on the same SKUs.
    let lines = [
        [("LA", 1), ("LB", 1), ("LC", 1)],
        [("LC", 1), ("LB", 1), ("LA", 1)],
        [("LB", 1), ("LC", 1), ("LA", 1)],
    ];
    let placed = join_all((0..150).map(|i| async move {
        let customer = format!("c{}", i % 10);
        let id = app.placed_order(&customer, &lines[i % 3]).await;
        if i % 3 == 0 {
            let cancelled = app
                .post(
                    &format!("/api/v1/orders/{id}/cancel"),
                    Some(&app.customer(&customer)),
                    &json!({}),
                    &[],
                )
                .await;
            assert_eq!(cancelled.status(), StatusCode::ACCEPTED);
        }
        id
    }))
    .await;
    app.caught_up().await;
    let confirmed = orders_in(app, &placed, "confirmed").await;
    let cancelled = orders_in(app, &placed, "cancelled").await;
    assert_eq!((confirmed, cancelled), (100, 50));
    // No step's transaction failed after its provider call: each call was made once.
    let repeated: Vec<(String, i32)> = sqlx::query_as(
        "SELECT idempotency_key, calls FROM simulated_gateway_operations WHERE calls <> 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    if let Some((key, _)) = repeated.first() {
        // What the saga went through, to tell why it asked again.
        let order = key.split('/').next().unwrap_or_default();
        let history: Option<Value> = sqlx::query_scalar(
            "SELECT jsonb_build_object('history', data->'history', 'last_error', data->'last_error')
               FROM sagas WHERE order_id::text = $1",
        )
        .bind(order)
        .fetch_optional(&app.pool)
        .await
        .unwrap();
        panic!(
            "provider calls made more than once: {repeated:?}; the saga of {order}: {history:?}"
        );
    }
    for sku in ["LA", "LB", "LC"] {
        let shelf = stock(app, sku).await;
        assert_eq!(shelf["on_hand"], 100_000);
        assert_eq!(shelf["reserved"], confirmed, "{sku}: {shelf}");
    }
}
