//! Kills the real `orderline` process with SIGKILL while commands are in flight, then proves:
//! every command that was acknowledged is in the log, and retrying every command with its
//! idempotency key after a restart applies each exactly once.

#![expect(
    clippy::unwrap_used,
    reason = "a test that cannot go on should fail loudly"
)]

use std::collections::HashMap;
use std::process::Child;
use std::time::Duration;

use api_common::auth::{Role, TokenKeys};
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use sqlx::PgPool;

const REQUESTS: usize = 300;

mod support;
use support::{
    drop_database, free_port, fresh_database, orderline, place_order, register_product, until,
    wait_ready, SECRET,
};

fn start(database_url: &str, port: u16) -> Child {
    orderline(database_url, port, &["serve"], &[])
}

/// Sends restock `i` (quantity i + 1) with idempotency key `restock-i`; `Some(body)` if acked.
async fn restock(client: &reqwest::Client, base: &str, token: &str, i: usize) -> Option<Value> {
    let response = client
        .post(format!("{base}/api/v1/inventory/SKU-1/restock"))
        .bearer_auth(token)
        .header("idempotency-key", format!("restock-{i}"))
        .json(&json!({ "quantity": i + 1 }))
        .send()
        .await
        .ok()?;
    if response.status().is_success() {
        response.json().await.ok()
    } else {
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_loses_no_acknowledged_command_and_retries_apply_once() {
    let (database, url) = fresh_database("orderline_crash").await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let token = TokenKeys::hs256(SECRET.as_bytes())
        .mint("ops", Role::Admin, Duration::from_secs(600))
        .unwrap();

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = start(&url, port);
    wait_ready(&client, &base).await;
    register_product(&client, &base, &token, "SKU-1", 1, 0).await;

    // Fire the restocks, and kill the server once a third of them were acknowledged.
    let acknowledged: HashMap<usize, Value> = {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sender = {
            let (client, base, token) = (client.clone(), base.clone(), token.clone());
            tokio::spawn(async move {
                stream::iter(0..REQUESTS)
                    .for_each_concurrent(16, |i| {
                        let (client, base, token, tx) = (&client, &base, &token, tx.clone());
                        async move {
                            if let Some(body) = restock(client, base, token, i).await {
                                tx.send((i, body)).ok();
                            }
                        }
                    })
                    .await;
            })
        };
        let mut acked = HashMap::new();
        while let Some((i, body)) = rx.recv().await {
            acked.insert(i, body);
            if acked.len() == REQUESTS / 3 {
                server.kill().unwrap();
            }
        }
        sender.await.unwrap();
        acked
    };
    server.wait().unwrap();
    assert!(acknowledged.len() >= REQUESTS / 3);
    assert!(
        acknowledged.len() < REQUESTS,
        "the kill came too late to test anything"
    );

    // Every acknowledged restock is in the log at the position it was answered with.
    let pool = PgPool::connect(&url).await.unwrap();
    for (i, body) in &acknowledged {
        let payload: Value = sqlx::query_scalar(
            "SELECT payload FROM events WHERE position = $1 AND aggregate_id = 'SKU-1'",
        )
        .bind(body["position"].as_i64().unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(payload["Restocked"]["quantity"], i + 1, "restock {i}");
    }

    // After a restart, retrying every restock with its key applies each exactly once.
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = start(&url, port);
    wait_ready(&client, &base).await;
    for i in 0..REQUESTS {
        let body = restock(&client, &base, &token, i).await;
        let body = body.unwrap_or_else(|| panic!("retry of restock {i} failed"));
        if let Some(first) = acknowledged.get(&i) {
            assert_eq!(&body, first, "a retry must replay the first answer");
        }
    }
    server.kill().unwrap();
    server.wait().unwrap();
    let (events, total): (i64, i64) = sqlx::query_as(
        "SELECT count(*), sum((payload -> 'Restocked' ->> 'quantity')::bigint)::bigint
           FROM events WHERE event_type = 'Restocked'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let requests = i64::try_from(REQUESTS).unwrap();
    assert_eq!(events, requests, "each restock applied exactly once");
    assert_eq!(total, (1..=requests).sum::<i64>());
    pool.close().await;
    drop_database(&database).await;
}

/// Every row of `table` as JSON, ordered by `key`.
async fn dump(pool: &PgPool, table: &str, key: &str) -> Value {
    sqlx::query_scalar(&format!(
        "SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY {key}), '[]') FROM {table} t"
    ))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits until every projection has applied the whole log.
async fn caught_up(pool: &PgPool) {
    until("the projections caught up", async || {
        let behind: i64 = sqlx::query_scalar(
            "SELECT 3 - count(DISTINCT consumer) + count(*) FILTER (WHERE EXISTS (
                 SELECT 1 FROM events e
                  WHERE (e.transaction_id, e.position) > (c.transaction_id, c.position)))
               FROM checkpoints c",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        behind == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_killed_before_its_commit_applies_nothing_twice() {
    let (database, url) = fresh_database("orderline_crash").await;
    let client = reqwest::Client::new();
    let (token, alice) = (
        support::token("ops", Role::Admin),
        support::token("alice", Role::Customer),
    );

    // Commands only: the API without projections writes a log to project.
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut api = orderline(&url, port, &["serve", "--only", "api"], &[]);
    wait_ready(&client, &base).await;
    register_product(&client, &base, &token, "A", 7, 100).await;
    for _ in 0..20 {
        place_order(&client, &base, &alice, &[("A", 1)], "tok_visa").await;
    }
    api.kill().unwrap();
    api.wait().unwrap();

    // The projections process dies after writing the orders page and its checkpoint, before
    // the commit.
    let crash = [("ORDERLINE_CRASH_AT", "before_checkpoint_commit:orders")];
    let mut doomed = orderline(
        &url,
        free_port(),
        &["serve", "--only", "projections"],
        &crash,
    );
    let status = tokio::task::spawn_blocking(move || doomed.wait().unwrap())
        .await
        .unwrap();
    assert!(!status.success(), "the crash point must end the process");
    let pool = PgPool::connect(&url).await.unwrap();
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM rm_orders")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(orders, 0, "the uncommitted page left rows behind");

    // Restarted, it applies everything once; a rebuild from the log agrees byte for byte.
    let mut projections = orderline(&url, free_port(), &["serve", "--only", "projections"], &[]);
    caught_up(&pool).await;
    projections.kill().unwrap();
    projections.wait().unwrap();
    let live = dump(&pool, "rm_orders", "order_id").await;
    assert_eq!(live.as_array().map(Vec::len), Some(20));
    let replay = orderline(&url, free_port(), &["replay", "orders"], &[])
        .wait()
        .unwrap();
    assert!(replay.success());
    assert_eq!(dump(&pool, "rm_orders", "order_id").await, live);
    let (applied, events): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT sum(events_applied)::bigint FROM checkpoints WHERE consumer = 'orders'),
                (SELECT count(*) FROM events)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(applied, events);
    pool.close().await;
    drop_database(&database).await;
}
