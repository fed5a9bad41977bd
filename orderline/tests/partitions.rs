//! Three `orderline serve` processes on one database share every consumer's partitions; one is
//! killed with `kill -9` while orders flow. Its partitions are owned again by the others, every
//! acknowledged order ends exactly once, no consumer applies an event twice or skips one, and
//! each order's events reach the read model in log order.

#![expect(
    clippy::unwrap_used,
    reason = "a test that cannot go on should fail loudly"
)]

use std::process::Child;
use std::time::{Duration, Instant};

use api_common::auth::Role;
use sqlx::PgPool;

mod support;
use support::{
    drop_database, free_port, fresh_database, orderline, place_order, register_product, token,
    until, wait_ready,
};

/// Consumers every `serve` runs here (the relay is off: no Kafka is configured).
const CONSUMERS: [&str; 4] = ["fulfillment", "inventory", "orders", "payments"];
const ORDERS_PER_PHASE: usize = 40;

/// For each consumer, how many distinct processes hold live leases on its partitions, and how
/// many of its partitions nobody holds.
async fn spread(pool: &PgPool) -> Vec<(String, i64, i64)> {
    sqlx::query_as(
        "SELECT consumer,
                count(DISTINCT owner) FILTER (WHERE lease_until > clock_timestamp()),
                count(*) FILTER (WHERE owner IS NULL OR lease_until <= clock_timestamp())
           FROM checkpoints WHERE consumer = ANY($1) GROUP BY consumer ORDER BY consumer",
    )
    .bind(CONSUMERS)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Partitions held by the process `child`, over every consumer.
async fn held_by(pool: &PgPool, child: &Child) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM checkpoints
          WHERE owner LIKE '%:' || $1 || ':%' AND lease_until > clock_timestamp()",
    )
    .bind(child.id().to_string())
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn place_some(bases: &[String], first: usize) -> Vec<String> {
    let client = reqwest::Client::new();
    let mut orders = Vec::new();
    for n in first..first + ORDERS_PER_PHASE {
        let customer = token(&format!("c{}", n % 7), Role::Customer);
        let base = &bases[n % bases.len()];
        let lines = [("A", 1), (if n % 2 == 0 { "B" } else { "C" }, 1)];
        orders.push(place_order(&client, base, &customer, &lines, "tok_visa").await);
    }
    orders
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_the_partitions_and_survive_a_kill_of_one() {
    let (database, url) = fresh_database("orderline_partitions").await;
    let pool = PgPool::connect(&url).await.unwrap();
    let client = reqwest::Client::new();
    let mut servers = Vec::new();
    let mut bases = Vec::new();
    for _ in 0..3 {
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        // Three processes on one server: small pools keep them inside its connection limit.
        servers.push(orderline(
            &url,
            port,
            &["serve"],
            &[("ORDERLINE_DB_POOL_SIZE", "8")],
        ));
        wait_ready(&client, &base).await;
        bases.push(base);
    }
    let ops = token("ops", Role::Admin);
    for sku in ["A", "B", "C"] {
        register_product(&client, &bases[0], &ops, sku, 100, 1_000_000).await;
    }
    until(
        "every consumer's partitions are spread over the three processes",
        async || {
            let spread = spread(&pool).await;
            spread.len() == CONSUMERS.len()
                && spread
                    .iter()
                    .all(|(_, owners, unowned)| *owners == 3 && *unowned == 0)
        },
    )
    .await;
    for server in &servers {
        let held = held_by(&pool, server).await;
        // 16 partitions over 3 processes: shares of at most 6 (6, 6 and 4), per consumer.
        assert!(
            (4 * 4..=6 * 4).contains(&held),
            "an even share per process: {held}"
        );
    }

    let mut orders = place_some(&bases, 0).await;
    // Kill one process at once, with pages and gateway calls in flight.
    let mut victim = servers.remove(1);
    bases.remove(1);
    let placing = tokio::spawn({
        let bases = bases.clone();
        async move { place_some(&bases, ORDERS_PER_PHASE).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    victim.kill().unwrap();
    victim.wait().unwrap();
    let killed = Instant::now();
    until("the survivors own every partition again", async || {
        spread(&pool)
            .await
            .iter()
            .all(|(_, owners, unowned)| *owners == 2 && *unowned == 0)
    })
    .await;
    let takeover = killed.elapsed();
    orders.extend(placing.await.unwrap());
    orders.extend(place_some(&bases, 2 * ORDERS_PER_PHASE).await);

    until("every order is confirmed", async || {
        let confirmed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM rm_orders WHERE status = 'confirmed' AND order_id::text = ANY($1)",
        )
        .bind(&orders)
        .fetch_one(&pool)
        .await
        .unwrap();
        confirmed == i64::try_from(orders.len()).unwrap()
    })
    .await;
    until("every consumer applied every event", async || {
        let behind: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM checkpoints c, events e, log_partitions lp
                             WHERE c.consumer = ANY($1)
                               AND (e.key_hash & (lp.partitions - 1)) = c.partition
                               AND (e.transaction_id, e.position) > (c.transaction_id, c.position))",
        )
        .bind(CONSUMERS)
        .fetch_one(&pool)
        .await
        .unwrap();
        !behind
    })
    .await;

    // Exactly once: each order confirmed once, each line reserved once, no event applied twice.
    let (confirmations, reservations, payments): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE event_type = 'OrderConfirmed'),
                count(*) FILTER (WHERE event_type = 'StockReserved'),
                count(*) FILTER (WHERE event_type = 'PaymentRequested')
           FROM events",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let n = i64::try_from(orders.len()).unwrap();
    assert_eq!(confirmations, n);
    assert_eq!(reservations, 2 * n);
    assert_eq!(payments, n);
    let applied: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT consumer, sum(events_applied)::bigint, (SELECT count(*) FROM events)
           FROM checkpoints WHERE consumer = ANY($1) GROUP BY consumer",
    )
    .bind(CONSUMERS)
    .fetch_all(&pool)
    .await
    .unwrap();
    for (consumer, applied, events) in applied {
        assert_eq!(
            applied, events,
            "{consumer} applied every event exactly once"
        );
    }
    // Per key, the read model saw the order's events in log order.
    let misordered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM rm_orders o
          WHERE jsonb_array_length(o.history) <> (
                SELECT count(*) FROM events e
                 WHERE e.aggregate_type = 'order' AND e.aggregate_id = o.order_id::text)
             OR o.history -> -1 ->> 'status' <> o.status",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(misordered, 0);
    assert!(
        takeover < Duration::from_secs(10),
        "the partitions of a killed process are owned again within 10 s: {takeover:?}"
    );

    for mut server in servers {
        server.kill().unwrap();
        server.wait().unwrap();
    }
    pool.close().await;
    drop_database(&database).await;
}
