//! Kills the saga runner (the real `orderline serve --only sagas` process) at every step
//! boundary, again and again, while orders are in flight: before the consumer commits a page,
//! before a gateway call, after the call but before its answer is recorded, and right after
//! recording it. A final runner then finishes the work, and every order must have completed
//! exactly once: one reservation per line, one confirmation or rejection, at most one
//! authorization at the provider, no event twice.

#![expect(
    clippy::unwrap_used,
    reason = "a test that cannot go on should fail loudly"
)]

use std::process::Child;
use std::time::{Duration, Instant};

use api_common::auth::{Role, TokenKeys};
use sqlx::PgPool;

/// Payment tokens of the orders, in turn: every path through the authorization step.
const TOKENS: [&str; 6] = [
    "tok_visa",
    "tok_timeout_then_ok",
    "tok_flaky",
    "tok_declined",
    "tok_visa",
    "tok_flaky",
];
/// Where a runner is made to die, as (variable, value).
const CRASH_POINTS: [(&str, &str); 4] = [
    ("ORDERLINE_CRASH_AT", "before_checkpoint_commit:fulfillment"),
    ("ORDERLINE_CRASH_AT", "before_gateway_call"),
    ("ORDERLINE_CRASH_AT", "after_gateway_call"),
    ("ORDERLINE_CRASH_AT", "after_gateway_record"),
];

mod support;
use support::{
    drop_database, free_port, fresh_database, place_order, register_product, until, wait_ready,
    SECRET,
};

fn orderline(database_url: &str, port: u16, only: &str, env: &[(&str, &str)]) -> Child {
    support::orderline(database_url, port, &["serve", "--only", only], env)
}

/// Waits for `child` to die by itself (the crash point was reached) for up to `limit`, else
/// kills it: either way the runner stops without a clean shutdown. Returns whether it crashed
/// by itself.
async fn until_dead(child: &mut Child, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success(), "the runner exited cleanly");
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    false
}

/// Whether every saga has nothing left to do and the saga consumer has read the whole log.
async fn settled(pool: &PgPool, orders: i64) -> bool {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM sagas WHERE state IN ('confirmed', 'completed')
                                             AND due_at IS NULL) = $1
            AND NOT EXISTS (SELECT 1 FROM checkpoints c, events e
                             WHERE c.consumer = 'fulfillment'
                               AND (e.transaction_id, e.position) > (c.transaction_id, c.position))",
    )
    .bind(orders)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn count(pool: &PgPool, sql: &str, id: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_runner_killed_at_every_step_boundary_completes_every_order_exactly_once() {
    let (database, url) = fresh_database("orderline_saga_crash").await;
    let keys = TokenKeys::hs256(SECRET.as_bytes());
    let ops = keys
        .mint("ops", Role::Admin, Duration::from_secs(600))
        .unwrap();
    let customer = keys
        .mint("c1", Role::Customer, Duration::from_secs(600))
        .unwrap();
    let client = reqwest::Client::new();

    // The API alone takes the orders; no saga runs yet.
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut api = orderline(&url, port, "api", &[]);
    wait_ready(&client, &base).await;
    for sku in ["A", "B"] {
        register_product(&client, &base, &ops, sku, 100, 100).await;
    }
    let mut orders = Vec::new();
    for token in TOKENS {
        let id = place_order(&client, &base, &customer, &[("B", 2), ("A", 1)], token).await;
        orders.push((id, token));
    }

    // Runners die at every boundary, twice round.
    let mut crashes = 0;
    for _ in 0..2 {
        for (variable, value) in CRASH_POINTS {
            let mut runner = orderline(&url, free_port(), "sagas", &[(variable, value)]);
            if until_dead(&mut runner, Duration::from_secs(15)).await {
                crashes += 1;
            }
        }
    }
    assert!(
        crashes >= CRASH_POINTS.len(),
        "only {crashes} crashes happened"
    );

    // A healthy runner finishes the work.
    let pool = PgPool::connect(&url).await.unwrap();
    let mut runner = orderline(&url, free_port(), "sagas", &[]);
    let total = i64::try_from(orders.len()).unwrap();
    until("the sagas finished", async || settled(&pool, total).await).await;
    runner.kill().unwrap();
    runner.wait().unwrap();
    api.kill().unwrap();
    api.wait().unwrap();

    let per_order = |event: &str| {
        format!(
            "SELECT count(*) FROM events WHERE event_type = '{event}'
               AND (aggregate_id = $1 OR payload::text LIKE '%' || $1 || '%')"
        )
    };
    for (id, token) in &orders {
        let confirmed = count(&pool, &per_order("OrderConfirmed"), id).await;
        let rejected = count(&pool, &per_order("OrderRejected"), id).await;
        let reserved = count(&pool, &per_order("StockReserved"), id).await;
        let released = count(&pool, &per_order("ReservationReleased"), id).await;
        let authorized = count(
            &pool,
            "SELECT count(*) FROM events WHERE aggregate_type = 'payment' AND aggregate_id = $1
               AND payload -> 'AuthorizationAttempted' -> 'outcome' ->> 'outcome' = 'authorized'",
            id,
        )
        .await;
        let held = count(
            &pool,
            "SELECT count(*) FROM simulated_gateway_operations
              WHERE idempotency_key = $1 || '/authorize' AND outcome ? 'authorized'",
            id,
        )
        .await;
        let attempts = count(
            &pool,
            "SELECT count(*) - count(DISTINCT payload -> 'AuthorizationAttempted' ->> 'attempt_id')
               FROM events WHERE aggregate_type = 'payment' AND aggregate_id = $1
                AND event_type = 'AuthorizationAttempted'",
            id,
        )
        .await;
        assert_eq!(reserved, 2, "{token}: one reservation per line");
        assert_eq!(attempts, 0, "{token}: an attempt recorded twice");
        if *token == "tok_declined" {
            assert_eq!(
                (confirmed, rejected, released, authorized, held),
                (0, 1, 2, 0, 0),
                "{token}"
            );
        } else {
            assert_eq!(
                (confirmed, rejected, released, authorized, held),
                (1, 0, 0, 1, 1),
                "{token}"
            );
        }
    }
    let gaps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM events GROUP BY aggregate_type, aggregate_id
                               HAVING count(*) <> max(sequence)) AS broken",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(gaps, 0);
    // 5 confirmed orders hold 2 B and 1 A each.
    let reserved: Vec<(String, i64)> = sqlx::query_as(
        "SELECT aggregate_id,
                sum(coalesce((payload -> 'StockReserved' ->> 'quantity')::bigint, 0)
                  - coalesce((payload -> 'ReservationReleased' ->> 'quantity')::bigint, 0))::bigint
           FROM events WHERE aggregate_type = 'inventory' GROUP BY aggregate_id ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(reserved, [("A".to_owned(), 5), ("B".to_owned(), 10)]);
    pool.close().await;
    drop_database(&database).await;
}
