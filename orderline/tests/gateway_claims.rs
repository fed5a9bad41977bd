//! Gateway calls in flight hold claim rows, not connections. With the provider answering in
//! 300 ms and 200 orders placed at once, a saga process has far more calls in flight than it
//! has connections, its connections never pass its two pools' sizes, each order's
//! authorization is asked for once under one key, and every order confirms.

#![expect(
    clippy::unwrap_used,
    reason = "a test that cannot go on should fail loudly"
)]

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use api_common::auth::Role;
use futures::future::join_all;
use sqlx::PgPool;

mod support;
use support::{
    drop_database, free_port, fresh_database, orderline, place_order, register_product, token,
    until, wait_ready,
};

const POOL_SIZE: i64 = 8;
const ORDERS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_slow_calls_in_flight_need_no_more_connections_than_the_pools_hold() {
    let (database, url) = fresh_database("orderline_claims").await;
    let pool = PgPool::connect(&url).await.unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut api = orderline(&url, port, &["serve", "--only", "api"], &[]);
    wait_ready(&reqwest::Client::new(), &base).await;
    let mut projections = orderline(&url, free_port(), &["serve", "--only", "projections"], &[]);
    let pool_size = POOL_SIZE.to_string();
    let mut sagas = orderline(
        &url,
        free_port(),
        &["serve", "--only", "sagas"],
        &[
            ("ORDERLINE_DB_POOL_SIZE", pool_size.as_str()),
            ("ORDERLINE_SIMULATED_GATEWAY_LATENCY_MS", "300"),
        ],
    );
    let client = reqwest::Client::new();
    let ops = token("ops", Role::Admin);
    register_product(&client, &base, &ops, "A", 100, 100_000).await;

    // Sample the saga process's sessions and the claims in flight while the orders run.
    let watching = Arc::new(AtomicBool::new(true));
    let most_sessions = Arc::new(AtomicI64::new(0));
    let most_claims = Arc::new(AtomicI64::new(0));
    let watcher = {
        let (pool, watching) = (pool.clone(), watching.clone());
        let (most_sessions, most_claims) = (most_sessions.clone(), most_claims.clone());
        let name = format!("orderline:{}", sagas.id());
        tokio::spawn(async move {
            while watching.load(Ordering::SeqCst) {
                let (sessions, claims): (i64, i64) = sqlx::query_as(
                    "SELECT (SELECT count(*) FROM pg_stat_activity WHERE application_name = $1),
                            (SELECT count(*) FROM sagas WHERE claim_until > clock_timestamp())",
                )
                .bind(&name)
                .fetch_one(&pool)
                .await
                .unwrap();
                most_sessions.fetch_max(sessions, Ordering::SeqCst);
                most_claims.fetch_max(claims, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let orders: Vec<String> = join_all((0..ORDERS).map(|i| {
        let (client, base) = (&client, &base);
        async move {
            let customer = token(&format!("c{}", i % 10), Role::Customer);
            place_order(client, base, &customer, &[("A", 1)], "tok_visa").await
        }
    }))
    .await;
    until("every order confirms", async || {
        let confirmed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events
              WHERE event_type = 'OrderConfirmed' AND aggregate_id = ANY($1)",
        )
        .bind(&orders)
        .fetch_one(&pool)
        .await
        .unwrap();
        confirmed == i64::try_from(ORDERS).unwrap()
    })
    .await;
    watching.store(false, Ordering::SeqCst);
    watcher.await.unwrap();

    let sessions = most_sessions.load(Ordering::SeqCst);
    let claims = most_claims.load(Ordering::SeqCst);
    let gateway_pool = i64::from(sagas::runtime::GATEWAY_POOL_CONNECTIONS);
    assert!(
        sessions <= POOL_SIZE + gateway_pool,
        "the saga process opened {sessions} sessions, more than its pools hold ({POOL_SIZE} + {gateway_pool})"
    );
    assert!(
        claims > POOL_SIZE + gateway_pool,
        "at most {claims} calls were in flight at once: calls must not wait for connections"
    );
    let (asked, keys, most_calls): (i64, i64, i32) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT idempotency_key), coalesce(max(calls), 0)
           FROM simulated_gateway_operations WHERE operation = 'authorize'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let n = i64::try_from(ORDERS).unwrap();
    assert_eq!(
        (asked, keys, most_calls),
        (n, n, 1),
        "one authorization per order, asked once"
    );
    for child in [&mut api, &mut projections, &mut sagas] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    pool.close().await;
    drop_database(&database).await;
}
