//! The saga's partitions across two real saga processes: one that freezes (SIGSTOP, with a page
//! in hand) or whose every connection is cut (`pg_terminate_backend`) while orders flow. The
//! other takes its partitions within the lease time and confirms the orders placed meanwhile;
//! the stale page is refused by its fencing token; every order is confirmed once, each line
//! reserved once, each provider call made once, and the saga applied each event once.

#![expect(
    clippy::unwrap_used,
    reason = "a test that cannot go on should fail loudly"
)]

use std::process::Child;
use std::time::Duration;

use api_common::auth::Role;
use sqlx::PgPool;

mod support;
use support::{
    drop_database, free_port, fresh_database, orderline, place_order, register_product, signal,
    token, until, wait_ready,
};

const PARTITIONS: i64 = 16;

/// The two scenarios run one after the other: four processes each, with their pools, would
/// otherwise crowd the server's 100 connections.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Small pools: four processes share the server with the other tests.
const POOL: (&str, &str) = ("ORDERLINE_DB_POOL_SIZE", "6");

/// Fulfillment partitions whose live lease the process `child` holds.
async fn held(pool: &PgPool, child: &Child) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM checkpoints
          WHERE consumer = 'fulfillment' AND owner LIKE '%:' || $1 || ':%'
            AND lease_until > clock_timestamp()",
    )
    .bind(child.id().to_string())
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Each fulfillment partition's fencing token.
async fn tokens(pool: &PgPool) -> Vec<(i32, i64)> {
    sqlx::query_as(
        "SELECT partition, fencing_token FROM checkpoints WHERE consumer = 'fulfillment'
          ORDER BY partition",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The API and projections processes, then the saga process `first` (with `first_env`) once it
/// holds every saga partition, then a second saga process once it has registered.
async fn processes(url: &str, pool: &PgPool, first_env: &[(&str, &str)]) -> (String, [Child; 4]) {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let api = orderline(url, port, &["serve", "--only", "api"], &[POOL]);
    wait_ready(&reqwest::Client::new(), &base).await;
    let projections = orderline(
        url,
        free_port(),
        &["serve", "--only", "projections"],
        &[POOL],
    );
    let mut env = vec![POOL];
    env.extend_from_slice(first_env);
    let first = orderline(url, free_port(), &["serve", "--only", "sagas"], &env);
    until("the first saga process holds every partition", async || {
        held(pool, &first).await == PARTITIONS
    })
    .await;
    let second = orderline(url, free_port(), &["serve", "--only", "sagas"], &[POOL]);
    until("the second saga process has registered", async || {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM log_processes WHERE consumer = 'fulfillment'",
        )
        .fetch_one(pool)
        .await
        .unwrap()
            >= 2
    })
    .await;
    (base, [api, projections, first, second])
}

/// Places `n` orders of one `A` and one `B` each; answers their ids.
async fn place(base: &str, n: usize) -> Vec<String> {
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let customer = token(&format!("c{}", i % 5), Role::Customer);
        ids.push(place_order(&client, base, &customer, &[("A", 1), ("B", 1)], "tok_visa").await);
    }
    ids
}

/// Orders among `ids` the saga has confirmed (the order stream holds `OrderConfirmed`).
async fn confirmed(pool: &PgPool, ids: &[String]) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events
          WHERE aggregate_type = 'order' AND aggregate_id = ANY($1) AND event_type = 'OrderConfirmed'",
    )
    .bind(ids)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits until no saga waits on a gateway call.
async fn saga_caught_up(pool: &PgPool) {
    until("the saga catches up", async || {
        let behind: i64 = sqlx::query_scalar("SELECT count(*) FROM sagas WHERE due_at IS NOT NULL")
            .fetch_one(pool)
            .await
            .unwrap();
        behind == 0
    })
    .await;
}

/// Every order among `ids` confirmed once, each of its two lines reserved once, its payment
/// authorized once, and every event applied once by the saga; with `calls_once`, each
/// provider call made once too (a cut connection between a call and its record makes the
/// saga ask again, with the same key).
async fn exactly_once(pool: &PgPool, ids: &[String], calls_once: bool) {
    let n = i64::try_from(ids.len()).unwrap();
    assert_eq!(confirmed(pool, ids).await, n, "each order confirmed once");
    let reserved: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events
          WHERE aggregate_type = 'inventory' AND event_type = 'StockReserved'
            AND payload -> 'StockReserved' ->> 'order_id' = ANY($1)",
    )
    .bind(ids)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(reserved, 2 * n, "each line reserved once");
    let attempts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events
          WHERE aggregate_type = 'payment' AND aggregate_id = ANY($1)
            AND event_type = 'AuthorizationAttempted'",
    )
    .bind(ids)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(attempts, n, "each payment authorized once");
    let repeated: Vec<(String, i32)> = sqlx::query_as(
        "SELECT idempotency_key, calls FROM simulated_gateway_operations WHERE calls <> 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    if calls_once {
        assert_eq!(repeated, [], "each provider call made once");
    }
    // The saga's own events (confirmations) come back to it through the log: wait for them,
    // then no more, and never fewer, than the log.
    let applied = async || -> (i64, i64) {
        sqlx::query_as(
            "SELECT (SELECT sum(events_applied)::bigint FROM checkpoints
                      WHERE consumer = 'fulfillment'),
                    (SELECT count(*) FROM events)",
        )
        .fetch_one(pool)
        .await
        .unwrap()
    };
    until("the saga has applied the whole log", async || {
        let (applied, events) = applied().await;
        assert!(applied <= events, "the saga applied an event twice");
        applied == events
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (applied, events) = applied().await;
    assert_eq!(applied, events, "the saga applied each event once");
}

async fn setup(base: &str) {
    let client = reqwest::Client::new();
    let ops = token("ops", Role::Admin);
    register_product(&client, base, &ops, "A", 100, 1000).await;
    register_product(&client, base, &ops, "B", 250, 1000).await;
}

fn stop_all(children: &mut [Child]) {
    for child in children {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_saga_process_loses_its_partitions_and_its_pending_page_is_refused() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (database, url) = fresh_database("orderline_saga_freeze").await;
    let pool = PgPool::connect(&url).await.unwrap();
    // The first process's first saga page stops for 12 s, read, its transaction begun, its
    // checkpoint not locked yet (and the saga's lease manager with it), longer than the lease
    // (5 s) and shorter than the time after which Postgres ends an idle transaction (15 s).
    let pause = [("ORDERLINE_PAUSE_AT", "before_page_lock:fulfillment=12")];
    let (base, mut children) = processes(&url, &pool, &pause).await;
    let before = tokens(&pool).await;
    setup(&base).await;
    // The page in hand, the whole process freezes too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&children[2], "-STOP");
    let orders = place(&base, 20).await;
    until(
        "the other saga process takes every partition and confirms the orders while the first is frozen",
        async || {
            held(&pool, &children[3]).await == PARTITIONS
                && confirmed(&pool, &orders).await == 20
        },
    )
    .await;
    let taken = tokens(&pool).await;
    for ((partition, old), (_, new)) in before.iter().zip(&taken) {
        assert!(
            new > old,
            "partition {partition} was taken with a higher token"
        );
    }
    // Woken, the frozen process's pause runs out and its page meets a token it does not hold.
    signal(&children[2], "-CONT");
    tokio::time::sleep(Duration::from_secs(13)).await;
    let more = place(&base, 5).await;
    until(
        "the orders placed after the wake-up confirm too",
        async || confirmed(&pool, &more).await == 5,
    )
    .await;
    let all: Vec<String> = orders.into_iter().chain(more).collect();
    saga_caught_up(&pool).await;
    exactly_once(&pool, &all, true).await;
    stop_all(&mut children);
    pool.close().await;
    drop_database(&database).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_every_connection_of_a_saga_process_under_load_applies_nothing_twice() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (database, url) = fresh_database("orderline_saga_cut").await;
    let pool = PgPool::connect(&url).await.unwrap();
    let (base, mut children) = processes(&url, &pool, &[]).await;
    setup(&base).await;
    until("the two saga processes share the partitions", async || {
        held(&pool, &children[2]).await == PARTITIONS / 2
            && held(&pool, &children[3]).await == PARTITIONS / 2
    })
    .await;
    let first = format!("orderline:{}", children[2].id());
    let cutting = {
        let pool = pool.clone();
        tokio::spawn(async move {
            // Every 200 ms for 4 s, every session of the first saga process is terminated:
            // its lease renewals, pages in flight, gateway steps and listeners.
            let mut cut = 0i64;
            for _ in 0..20 {
                let ended: i64 = sqlx::query_scalar(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
                       FROM pg_stat_activity WHERE application_name = $1",
                )
                .bind(&first)
                .fetch_one(&pool)
                .await
                .unwrap();
                cut += ended;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            cut
        })
    };
    let orders = place(&base, 30).await;
    let cut = cutting.await.unwrap();
    assert!(cut > 0, "the first saga process's sessions were cut");
    until("every order confirms", async || {
        confirmed(&pool, &orders).await == 30
    })
    .await;
    saga_caught_up(&pool).await;
    exactly_once(&pool, &orders, false).await;
    stop_all(&mut children);
    pool.close().await;
    drop_database(&database).await;
}
