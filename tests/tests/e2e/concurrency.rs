use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::json;
use testkit::{json_body, TestApp};

/// Every stream's sequence numbers run 1, 2, 3, ... with no gap and no repeat.
async fn assert_no_gaps(app: &TestApp) {
    let broken: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT aggregate_type, aggregate_id, count(*), max(sequence)
           FROM events GROUP BY aggregate_type, aggregate_id
         HAVING count(*) <> max(sequence) OR min(sequence) <> 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(broken.is_empty(), "streams with gaps: {broken:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_concurrent_restocks_of_one_sku_are_all_applied_once() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("HOT", 1, 0).await;
    let responses = join_all((1..=30).map(|i| app.restock("HOT", i))).await;
    for response in responses {
        assert_eq!(response.status(), StatusCode::OK);
    }
    let sum: i64 = (1..=30).sum();
    let on_hand: i64 = sqlx::query_scalar(
        "SELECT sum((payload -> 'Restocked' ->> 'quantity')::bigint)::bigint FROM events
          WHERE aggregate_id = 'HOT' AND event_type = 'Restocked'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(on_hand, sum);
    assert_eq!(app.stream("inventory", "HOT").await.len(), 31);
    // The aggregate as loaded (snapshot plus newer events) agrees with the log.
    let last = app.restock("HOT", 1).await;
    assert_eq!(json_body(last).await["on_hand"], sum + 1);
    assert_no_gaps(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_writing_one_sku_lose_nothing() {
    let app = TestApp::spawn_without_sagas().await;
    let sibling = app.spawn_sibling().await;
    app.register_product("HOT", 1, 0).await;
    let admin = app.admin();
    let requests = (0..80).map(|i| {
        let base = if i % 2 == 0 { &app.address } else { &sibling };
        app.client
            .post(format!("{base}/api/v1/inventory/HOT/restock"))
            .bearer_auth(&admin)
            .json(&json!({"quantity": 1}))
            .send()
    });
    for response in join_all(requests).await {
        assert_eq!(response.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(app.stream("inventory", "HOT").await.len(), 81);
    assert_no_gaps(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_orders_and_restocks_leave_every_stream_gapless() {
    let app = TestApp::spawn_without_sagas().await;
    for sku in ["A", "B", "C"] {
        app.register_product(sku, 10, 100).await;
    }
    let app = &app;
    let orders = (0..20).map(|i| async move {
        let customer = format!("c{}", i % 4);
        app.place_order(&customer, &[("A", 1), ("B", 2)]).await
    });
    let restocks = (0..20).map(|i| app.restock(["A", "B", "C"][i % 3], 1));
    let (orders, restocks) = tokio::join!(join_all(orders), join_all(restocks));
    assert!(orders.iter().all(|r| r.status() == StatusCode::ACCEPTED));
    assert!(restocks.iter().all(|r| r.status() == StatusCode::OK));
    assert_no_gaps(app).await;
    // Positions are unique and every event got a transaction id and an event id.
    let (events, positions, ids): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT position), count(DISTINCT event_id) FROM events
          WHERE transaction_id IS NOT NULL",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    // 3 products, 20 orders, 20 restocks.
    assert_eq!((events, positions, ids), (43, 43, 43));
}
