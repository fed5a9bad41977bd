//! Leases of log consumers across real processes: a projections process that freezes (SIGSTOP,
//! or one task paused with a page in hand) loses its leases to another within the lease time,
//! the other carries on while it is frozen, and when it wakes its stale page is refused by the
//! fencing token: nothing is applied twice and the lease stays with the new owner.

#![expect(
    clippy::unwrap_used,
    reason = "a test that cannot go on should fail loudly"
)]

use std::process::{Child, Command};
use std::time::Duration;

use api_common::auth::Role;
use sqlx::PgPool;

mod support;
use support::{
    drop_database, free_port, fresh_database, orderline, place_order, register_product, token,
    until, wait_ready,
};

const PROJECTIONS: [&str; 3] = ["inventory", "orders", "payments"];

/// Who holds each projection's lease, with its fencing token.
async fn owners(pool: &PgPool) -> Vec<(String, Option<String>, i64)> {
    sqlx::query_as(
        "SELECT consumer, owner, fencing_token FROM checkpoints
          WHERE consumer = ANY($1) ORDER BY consumer",
    )
    .bind(PROJECTIONS)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Whether the process `child` holds every projection's lease.
async fn owns_all(pool: &PgPool, child: &Child) -> bool {
    let pid = format!(":{}:", child.id());
    let owners = owners(pool).await;
    owners.len() == PROJECTIONS.len()
        && owners
            .iter()
            .all(|(_, owner, _)| owner.as_deref().is_some_and(|o| o.contains(&pid)))
}

fn signal(child: &Child, signal: &str) {
    let sent = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// The order's row in the read model, with as many history entries as the order has events.
async fn projected_once(pool: &PgPool, order: &str) -> bool {
    let (rows, history, events): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM rm_orders WHERE order_id::text = $1),
                coalesce((SELECT jsonb_array_length(history) FROM rm_orders
                           WHERE order_id::text = $1), 0)::bigint,
                (SELECT count(*) FROM events WHERE aggregate_type = 'order' AND aggregate_id = $1)",
    )
    .bind(order)
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(history <= events, "an order event was applied twice");
    rows == 1 && history == events
}

/// A server for the API and two projections processes, the first with `first_env`; answers
/// the API's address and the three once the first holds every projection's lease and the
/// second is running.
async fn three_processes(
    url: &str,
    pool: &PgPool,
    first_env: &[(&str, &str)],
) -> (String, [Child; 3]) {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let api = orderline(url, port, &["serve", "--only", "api"], &[]);
    wait_ready(&reqwest::Client::new(), &base).await;
    let first = orderline(
        url,
        free_port(),
        &["serve", "--only", "projections"],
        first_env,
    );
    until(
        "the first projections process holds every lease",
        async || owns_all(pool, &first).await,
    )
    .await;
    let second = orderline(url, free_port(), &["serve", "--only", "projections"], &[]);
    // It has started (and failed to take the leases) once it has looked up its checkpoints.
    tokio::time::sleep(Duration::from_secs(1)).await;
    (base, [api, first, second])
}

async fn place(base: &str) -> String {
    let client = reqwest::Client::new();
    let ops = token("ops", Role::Admin);
    register_product(&client, base, &ops, "A", 100, 10).await;
    let ana = token("ana", Role::Customer);
    place_order(&client, base, &ana, &[("A", 1)], "tok_visa").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_projections_process_loses_its_leases_and_cannot_take_them_back() {
    let (database, url) = fresh_database("orderline_lease").await;
    let pool = PgPool::connect(&url).await.unwrap();
    let (base, [mut api, mut frozen, mut standby]) = three_processes(&url, &pool, &[]).await;
    signal(&frozen, "-STOP");
    let order = place(&base).await;
    until(
        "the standby projects the order while the owner is frozen",
        async || projected_once(&pool, &order).await,
    )
    .await;
    assert!(owns_all(&pool, &standby).await, "{:?}", owners(&pool).await);

    // Woken, the old owner finds its leases taken (its renewal is refused) and stops.
    signal(&frozen, "-CONT");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(owns_all(&pool, &standby).await, "{:?}", owners(&pool).await);
    assert!(projected_once(&pool, &order).await);
    for child in [&mut api, &mut frozen, &mut standby] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    pool.close().await;
    drop_database(&database).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_held_past_a_takeover_is_refused_by_its_fencing_token() {
    let (database, url) = fresh_database("orderline_fence").await;
    let pool = PgPool::connect(&url).await.unwrap();
    // The first owner's orders runner stops for 12 s with its first page read and delivered,
    // its checkpoint not locked yet: longer than the lease (5 s), shorter than the time after
    // which Postgres ends an idle transaction (15 s), so the page comes back to be committed.
    let pause = [("ORDERLINE_PAUSE_AT", "before_page_lock:orders=12")];
    let (base, [mut api, mut paused, mut standby]) = three_processes(&url, &pool, &pause).await;
    let order = place(&base).await;
    until(
        "the standby takes the orders lease and projects the order",
        async || projected_once(&pool, &order).await,
    )
    .await;
    let token_of = |owners: &[(String, Option<String>, i64)]| {
        owners
            .iter()
            .find(|(name, _, _)| name == "orders")
            .map(|(_, _, token)| *token)
            .unwrap()
    };
    let taken = token_of(&owners(&pool).await);
    assert!(taken >= 2, "a takeover raises the token: {taken}");
    // Past the pause: the stale page was refused, not applied, and the lease stayed.
    tokio::time::sleep(Duration::from_secs(13)).await;
    assert!(projected_once(&pool, &order).await);
    let now = owners(&pool).await;
    assert_eq!(token_of(&now), taken, "{now:?}");
    // Only the paused runner lost its lease; the other projections stayed where they were.
    let pid = format!(":{}:", standby.id());
    let orders_owner = now.iter().find(|(name, _, _)| name == "orders");
    assert!(
        orders_owner
            .is_some_and(|(_, owner, _)| owner.as_deref().is_some_and(|o| o.contains(&pid))),
        "{now:?}"
    );
    let (applied, events): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT events_applied FROM checkpoints WHERE consumer = 'orders'),
                (SELECT count(*) FROM events)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(applied, events, "each event was applied once");
    for child in [&mut api, &mut paused, &mut standby] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    pool.close().await;
    drop_database(&database).await;
}
