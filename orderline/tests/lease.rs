//! Leases of log consumers across real processes: a projections process that freezes (SIGSTOP,
//! or one task paused with a page in hand) loses its leases to another within the lease time,
//! the other carries on while it is frozen, and when it wakes its stale page is refused by the
//! fencing token: nothing is applied twice and the lease stays with the new owner.

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

const PROJECTIONS: [&str; 3] = ["inventory", "orders", "payments"];
const PARTITIONS: usize = 16;

/// Who holds each projection partition's lease, with its fencing token.
async fn owners(pool: &PgPool) -> Vec<(String, i32, Option<String>, i64)> {
    sqlx::query_as(
        "SELECT consumer, partition, owner, fencing_token FROM checkpoints
          WHERE consumer = ANY($1) AND lease_until > clock_timestamp()
          ORDER BY consumer, partition",
    )
    .bind(PROJECTIONS)
    .fetch_all(pool)
    .await
    .unwrap()
}

fn held_by(owner: Option<&str>, child: &Child) -> bool {
    let pid = format!(":{}:", child.id());
    owner.is_some_and(|o| o.contains(&pid))
}

/// How many projection partitions the process `child` holds.
async fn held(pool: &PgPool, child: &Child) -> usize {
    owners(pool)
        .await
        .iter()
        .filter(|(_, _, owner, _)| held_by(owner.as_deref(), child))
        .count()
}

/// Whether the process `child` holds every projection partition's lease.
async fn owns_all(pool: &PgPool, child: &Child) -> bool {
    held(pool, child).await == PROJECTIONS.len() * PARTITIONS
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
/// the API's address and the three once the first holds every projection partition and,
/// when `share` is set, once the second has taken its half.
async fn three_processes(
    url: &str,
    pool: &PgPool,
    first_env: &[(&str, &str)],
    share: bool,
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
    if share {
        until(
            "the two processes share the partitions evenly",
            async || {
                let half = PROJECTIONS.len() * PARTITIONS / 2;
                held(pool, &first).await == half && held(pool, &second).await == half
            },
        )
        .await;
    } else {
        // It has started once it has registered for the consumers.
        until("the second process has started", async || {
            sqlx::query_scalar::<_, i64>("SELECT count(DISTINCT owner) FROM log_processes")
                .fetch_one(pool)
                .await
                .unwrap()
                >= 2
        })
        .await;
    }
    (base, [api, first, second])
}

/// Whether every event was applied exactly once by each projection.
async fn applied_once(pool: &PgPool) -> bool {
    let wrong: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT consumer, sum(events_applied) AS n FROM checkpoints
                                 WHERE consumer = ANY($1) GROUP BY consumer) AS c
          WHERE c.n <> (SELECT count(*) FROM events)",
    )
    .bind(PROJECTIONS)
    .fetch_one(pool)
    .await
    .unwrap();
    wrong == 0
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
    let (base, [mut api, mut frozen, mut standby]) = three_processes(&url, &pool, &[], true).await;
    let before: Vec<_> = owners(&pool)
        .await
        .into_iter()
        .filter(|(_, _, owner, _)| held_by(owner.as_deref(), &frozen))
        .collect();
    signal(&frozen, "-STOP");
    let order = place(&base).await;
    until(
        "the standby takes every partition and projects the order while the owner is frozen",
        async || projected_once(&pool, &order).await && owns_all(&pool, &standby).await,
    )
    .await;

    // Woken, the old owner finds its leases taken (its renewals are refused): whatever it gets
    // back later comes with a new token, never the one it froze with.
    signal(&frozen, "-CONT");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let now = owners(&pool).await;
    for (consumer, partition, _, token) in &before {
        let row = now
            .iter()
            .find(|(c, p, _, _)| c == consumer && p == partition);
        assert!(
            row.is_none_or(|(_, _, _, t)| t > token),
            "{consumer}/{partition} still carries the frozen owner's token: {now:?}"
        );
    }
    assert!(projected_once(&pool, &order).await);
    until("each event applied once", async || {
        applied_once(&pool).await
    })
    .await;
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
    // The first owner's first orders page stops for 12 s, read and delivered, its checkpoint not
    // locked yet, and with it the renewals of its orders leases (as if frozen): longer than the
    // lease (5 s), shorter than the time after which Postgres ends an idle transaction (15 s), so
    // the page comes back to be committed after the standby took the partition over.
    let pause = [("ORDERLINE_PAUSE_AT", "before_page_lock:orders=12")];
    let (base, [mut api, mut paused, mut standby]) =
        three_processes(&url, &pool, &pause, false).await;
    let order = place(&base).await;
    let partition: i32 =
        sqlx::query_scalar("SELECT DISTINCT key_hash & 15 FROM events WHERE aggregate_id = $1")
            .bind(&order)
            .fetch_one(&pool)
            .await
            .unwrap();
    let token_of = |owners: &[(String, i32, Option<String>, i64)]| {
        owners
            .iter()
            .find(|(name, p, _, _)| name == "orders" && *p == partition)
            .map(|(_, _, owner, token)| (owner.clone(), *token))
    };
    until(
        "the standby takes the order's orders partition and projects the order",
        async || {
            projected_once(&pool, &order).await
                && token_of(&owners(&pool).await)
                    .is_some_and(|(owner, _)| held_by(owner.as_deref(), &standby))
        },
    )
    .await;
    let (_, taken) = token_of(&owners(&pool).await).unwrap();
    assert!(taken >= 2, "a takeover raises the token: {taken}");
    // Past the pause: the stale page was refused, not applied.
    tokio::time::sleep(Duration::from_secs(13)).await;
    assert!(projected_once(&pool, &order).await);
    until("each event applied once", async || {
        applied_once(&pool).await
    })
    .await;
    for child in [&mut api, &mut paused, &mut standby] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    pool.close().await;
    drop_database(&database).await;
}
