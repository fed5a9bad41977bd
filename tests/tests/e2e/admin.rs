use aggregates::inventory::{Product, ProductCommand};
use aggregates::values::{OrderId, Quantity};
use reqwest::StatusCode;
use serde_json::{json, Value};
use testkit::{json_body, TestApp};
use uuid::Uuid;

#[tokio::test]
async fn the_admin_log_pages_through_every_event_in_order() {
    let app = TestApp::spawn_without_sagas().await;
    for i in 0..7 {
        app.register_product(&format!("S{i}"), 1, 1).await;
    }
    let mut after = String::new();
    let mut positions = Vec::new();
    // An empty page means "nothing readable yet" (a transaction may hold the log back for a
    // moment), not the end: poll with the same cursor, as clients do.
    for _ in 0..500 {
        if positions.len() == 7 {
            break;
        }
        let path = format!("/api/v1/admin/events?limit=3{after}");
        let page = json_body(app.get(&path, &app.admin()).await).await;
        let events = page["events"].as_array().unwrap().clone();
        if events.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        }
        positions.extend(events.iter().map(|e| e["position"].as_i64().unwrap()));
        assert!(events[0]["metadata"]["actor_sub"].is_string());
        after = format!("&after={}", page["next"].as_str().unwrap());
    }
    assert_eq!(positions, (1..=7).collect::<Vec<i64>>());
    let customer = app.get("/api/v1/admin/events", &app.customer("c")).await;
    assert_eq!(customer.status(), StatusCode::FORBIDDEN);
    let bad = app.get("/api/v1/admin/events?after=x", &app.admin()).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn projections_report_position_lag_and_state() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 1, 1).await;
    app.caught_up().await;
    // Partitions with no event of their own move past the others' events at their next poll;
    // until then the consumer's position is that of its lowest partition.
    let mut body = Value::Null;
    for _ in 0..100 {
        body = json_body(app.get("/api/v1/admin/projections", &app.admin()).await).await;
        if body["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["position"] == 1)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let items = body["items"].as_array().unwrap();
    let names: Vec<&str> = items.iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["inventory", "orders", "payments"]);
    for item in items {
        assert_eq!(item["state"], "running");
        assert_eq!(item["lag"], 0);
        assert_eq!(item["position"], 1);
    }
}

/// The parked keys `GET /api/v1/admin/parked` lists for `consumer`.
async fn parked_keys(app: &TestApp, consumer: &str) -> Vec<Value> {
    let body = json_body(
        app.get(
            &format!("/api/v1/admin/parked?consumer={consumer}"),
            &app.admin(),
        )
        .await,
    )
    .await;
    body["items"].as_array().unwrap().clone()
}

/// Waits up to 20 s for `parked_keys(consumer)` to satisfy `done`; answers the last list.
async fn parked_until(
    app: &TestApp,
    consumer: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let mut items = Vec::new();
    for _ in 0..200 {
        items = parked_keys(app, consumer).await;
        if done(&items) {
            return items;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the parked keys of {consumer} did not settle: {items:?}");
}

/// `POST /api/v1/admin/parked/inventory/{key}/{action}` as `token`.
async fn parked_action(app: &TestApp, key: &str, action: &str, token: &str) -> reqwest::Response {
    let path = format!("/api/v1/admin/parked/inventory/{key}/{action}");
    app.post(&path, Some(token), &json!({}), &[]).await
}

/// Appends one raw event (as a writer must, announced), bypassing the aggregates.
async fn append_raw(app: &TestApp, sql: &str) {
    let mut tx = event_store::locks::begin_writer(&app.pool).await.unwrap();
    sqlx::query(sql).execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_event_parks_its_key_the_others_flow_and_an_operator_retries_then_skips_it() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 1, 1).await;
    app.caught_up().await;
    // An event no projection can fold: a restock of a SKU that was never registered.
    append_raw(
        &app,
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('inventory', 'GHOST', 1, 'Restocked', '1', '{\"Restocked\": {\"quantity\": 1, \"note\": null}}', '{}')",
    )
    .await;
    let items = parked_until(&app, "inventory", |items| !items.is_empty()).await;
    let ghost = &items[0];
    assert_eq!(ghost["key"], "GHOST");
    assert_eq!(ghost["position"], 2);
    assert_eq!(ghost["event_type"], "Restocked");
    assert!(
        ghost["error"].as_str().unwrap().contains("GHOST"),
        "{ghost}"
    );
    let attempts = ghost["attempts"].as_i64().unwrap();
    assert!(attempts >= 5, "{ghost}");
    assert!(ghost["action"].is_null());

    // The consumer shows it; later events of the key wait behind it, other keys flow on.
    let body = json_body(app.get("/api/v1/admin/projections", &app.admin()).await).await;
    let inventory = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "inventory")
        .unwrap()
        .clone();
    assert_eq!(inventory["state"], "parked");
    assert_eq!(inventory["parked_keys"], 1);
    assert_eq!(inventory["parked_position"], 2);
    append_raw(
        &app,
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         SELECT 'inventory', 'GHOST', 2, event_type, event_version,
                jsonb_set(payload, '{ProductRegistered,sku}', '\"GHOST\"'), '{}'
           FROM events WHERE aggregate_id = 'A' AND sequence = 1",
    )
    .await;
    app.register_product("B", 1, 7).await;
    let mut b = StatusCode::NOT_FOUND;
    for _ in 0..100 {
        b = app.get("/api/v1/inventory/B", &app.admin()).await.status();
        if b == StatusCode::OK {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(b, StatusCode::OK, "another key flows past the parked one");
    assert_eq!(
        app.get("/api/v1/inventory/GHOST", &app.admin())
            .await
            .status(),
        StatusCode::NOT_FOUND,
        "the parked key's later event waits"
    );

    // A retry while the cause is still there fails again and keeps the key parked.
    let retried = parked_action(&app, "GHOST", "retry", &app.admin()).await;
    assert_eq!(retried.status(), StatusCode::ACCEPTED);
    assert_eq!(json_body(retried).await["action"], "retry");
    parked_until(&app, "inventory", |items| {
        items.len() == 1
            && items[0]["attempts"].as_i64() == Some(attempts + 1)
            && items[0]["action"].is_null()
    })
    .await;

    // A customer may not touch it; an unknown key is a 404.
    let customer = app.customer("c1");
    let refused = parked_action(&app, "GHOST", "skip", &customer).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let unknown = parked_action(&app, "NOPE", "retry", &app.admin()).await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        unknown.headers()["content-type"],
        "application/problem+json"
    );

    // Skipping passes over the poison event for good, says so in the log, and applies the rest.
    let skipped = parked_action(&app, "GHOST", "skip", &app.admin()).await;
    assert_eq!(skipped.status(), StatusCode::ACCEPTED);
    parked_until(&app, "inventory", <[Value]>::is_empty).await;
    let ghost = json_body(app.get("/api/v1/inventory/GHOST", &app.admin()).await).await;
    assert_eq!(
        ghost["on_hand"], 1,
        "the registration after the skipped restock: {ghost}"
    );
    let (aggregate_id, payload, metadata): (String, Value, Value) = sqlx::query_as(
        "SELECT aggregate_id, payload, metadata FROM events
          WHERE aggregate_type = 'consumer' AND event_type = 'ParkedEventSkipped'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(aggregate_id, "inventory");
    let what = &payload["ParkedEventSkipped"];
    assert_eq!(what["key"], "GHOST");
    assert_eq!(what["position"], 2);
    assert_eq!(what["event_type"], "Restocked");
    assert_eq!(metadata["actor_role"], "admin");
    assert!(!metadata["actor_sub"].as_str().unwrap().is_empty());
    let again = parked_action(&app, "GHOST", "skip", &app.admin()).await;
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
    let body = json_body(app.get("/api/v1/admin/projections", &app.admin()).await).await;
    for item in body["items"].as_array().unwrap() {
        assert_eq!(item["state"], "running", "{item}");
    }
    // The health check answers throughout.
    let health = app
        .client
        .get(format!("{}/health/ready", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_equals_the_live_read_model_while_writes_continue() {
    let app = TestApp::spawn_without_sagas().await;
    for i in 0..5 {
        app.register_product(&format!("S{i}"), 10, 1000).await;
    }
    for i in 0..30 {
        let sku = format!("S{}", i % 5);
        app.place_order(&format!("c{}", i % 3), &[(sku.as_str(), 1)])
            .await;
        let reserve = ProductCommand::Reserve {
            order_id: OrderId::from(Uuid::new_v4()),
            quantity: Quantity::parse(1).unwrap(),
        };
        app.execute::<Product>(&sku, reserve).await.unwrap();
    }
    app.caught_up().await;
    for (name, table, key) in [
        ("orders", "rm_orders", "order_id"),
        ("inventory", "rm_inventory", "sku"),
        ("payments", "rm_payments", "order_id"),
    ] {
        let writes = async {
            for i in 0..20 {
                app.restock(&format!("S{}", i % 5), 1).await;
                app.place_order("late", &[("S1", 1)]).await;
            }
        };
        let rebuild = async {
            let response = app
                .post(
                    &format!("/api/v1/admin/projections/{name}/rebuild"),
                    Some(&app.admin()),
                    &serde_json::json!({}),
                    &[],
                )
                .await;
            assert_eq!(response.status(), StatusCode::ACCEPTED);
        };
        tokio::join!(writes, rebuild);
        // The rebuild is done when its lock is free again and its table swapped in.
        for _ in 0..500 {
            let running: bool = sqlx::query_scalar(
                "SELECT rebuild_position IS NOT NULL OR to_regclass($1) IS NOT NULL FROM consumers WHERE consumer = $2",
            )
            .bind(format!("{table}__rebuild"))
            .bind(name)
            .fetch_one(&app.pool)
            .await
            .unwrap();
            if !running {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        app.caught_up().await;
        let rebuilt = app.dump(table, key).await;
        // Rebuild once more, now quietly, and compare byte for byte.
        let lock = projections::rebuild::RebuildLock::acquire(
            &app.pool,
            projections::by_name(name).unwrap().as_ref(),
        )
        .await
        .unwrap();
        projections::rebuild::rebuild(
            &app.pool,
            projections::by_name(name).unwrap().as_ref(),
            lock,
            &|_, _| {},
        )
        .await
        .unwrap();
        app.caught_up().await;
        assert_eq!(app.dump(table, key).await, rebuilt, "{name}");
    }
    app.assert_read_models_match_log().await;
    let consumers: i64 = sqlx::query_scalar("SELECT count(DISTINCT consumer) FROM checkpoints")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    app.assert_applied_once(usize::try_from(consumers).unwrap())
        .await;
}

#[tokio::test]
async fn a_second_rebuild_of_the_same_projection_is_409() {
    let app = TestApp::spawn_without_sagas().await;
    let projection = projections::by_name("orders").unwrap();
    let _held = projections::rebuild::RebuildLock::acquire(&app.pool, projection.as_ref())
        .await
        .unwrap();
    let response = app
        .post(
            "/api/v1/admin/projections/orders/rebuild",
            Some(&app.admin()),
            &serde_json::json!({}),
            &[],
        )
        .await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let unknown = app
        .post(
            "/api/v1/admin/projections/nope/rebuild",
            Some(&app.admin()),
            &serde_json::json!({}),
            &[],
        )
        .await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn metrics_expose_each_consumers_position_and_lag_for_prometheus() {
    let app = TestApp::spawn().await;
    app.register_product("A", 1, 1).await;
    app.caught_up().await;
    // A consumer's position is its lowest partition's. The partitions without the event move
    // past it when they next poll (within about two polling intervals: an idle partition asks
    // the process's view of the log's head, itself up to an interval old), not at once.
    let position = "orderline_consumer_position{consumer=\"orders\",kind=\"projection\"} 1";
    let mut text = String::new();
    for _ in 0..100 {
        let response = app
            .client
            .get(format!("{}/metrics", app.address))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        text = response.text().await.unwrap();
        if text.lines().any(|l| l == position) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for line in [
        "orderline_log_head_position 1",
        "orderline_consumer_position{consumer=\"orders\",kind=\"projection\"} 1",
        "orderline_consumer_lag_events{consumer=\"inventory\",kind=\"projection\"} 0",
        "orderline_consumer_parked{consumer=\"fulfillment\",kind=\"saga\"} 0",
        "# TYPE orderline_consumer_events_applied_total counter",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from:\n{text}"
        );
    }
    // Each of the 16 partitions of each consumer, with the process that holds it.
    let partitions = text
        .lines()
        .filter(|l| {
            l.starts_with("orderline_partition_position{consumer=\"orders\",partition=\"")
                && l.contains(",owner=\"")
                && !l.contains(",owner=\"\"")
        })
        .count();
    assert_eq!(partitions, 16, "{text}");
    let view = json_body(app.get("/api/v1/admin/projections", &app.admin()).await).await;
    let process = json_body(
        app.client
            .get(format!("{}/health/ready", app.address))
            .send()
            .await
            .unwrap(),
    )
    .await["process"]
        .as_str()
        .map(str::to_owned)
        .unwrap();
    let orders = view["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "orders")
        .unwrap();
    assert_eq!(orders["kind"], "projection");
    let owned = orders["partitions"].as_array().unwrap();
    assert_eq!(owned.len(), 16);
    assert!(
        owned
            .iter()
            .all(|p| p["owner"] == process.as_str() && p["fencing_token"].as_i64() > Some(0)),
        "every partition is held by the one process /health/ready names: {view}"
    );
}
