//! The fulfillment scenario: how long an order takes from placement to `confirmed`, and how
//! many orders a second the saga confirms, under a steady load of placements.
//!
//! Latency is measured in the log, not by polling: the `recorded_at` of each order's
//! `OrderConfirmed` minus that of its `OrderPlaced` (both are their transactions' start times).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::counters::{top_statements, Counters};
use crate::process::ServerProcess;
use crate::round;
use crate::server::BenchServer;
use orderline::Parts;
use serde_json::{json, Value};
use sqlx::PgPool;

const PRODUCTS: usize = 50;

/// Runs the server here (with the saga, or with `processes` saga processes beside it on the
/// database at `url`), places `rate` orders a second for `duration` (two lines each, paid with
/// `tok_visa`), waits until every saga is done, and reports latency and throughput.
pub async fn run(
    pool: &PgPool,
    url: &str,
    duration: Duration,
    rate: u64,
    processes: usize,
) -> anyhow::Result<Vec<Value>> {
    let parts = match processes {
        0 => Parts::ALL,
        _ => Parts {
            sagas: false,
            ..Parts::ALL
        },
    };
    let server = BenchServer::start_with(pool, PRODUCTS, parts).await?;
    let mut sagas = Vec::new();
    for _ in 0..processes {
        sagas.push(ServerProcess::start_part(url, "sagas").await?);
    }
    if processes > 0 {
        wait_for_sagas(pool, processes).await?;
    }
    let (client, base, customer) = (&server.client, &server.base, &server.customer);
    Counters::enable_statements(pool).await;
    let before = Counters::read(pool).await?;

    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    let mut in_flight = tokio::task::JoinSet::new();
    let mut placed = 0u64;
    while started.elapsed() < duration {
        tick.tick().await;
        placed += 1;
        let lines = json!([
            {"sku": format!("P{}", placed % PRODUCTS as u64), "quantity": 1},
            {"sku": format!("P{}", (placed * 7 + 3) % PRODUCTS as u64), "quantity": 2},
        ]);
        let request = client
            .post(format!("{base}/api/v1/orders"))
            .bearer_auth(customer)
            .json(&json!({"lines": lines, "payment": {"token": "tok_visa"}}));
        let failed = failed.clone();
        in_flight.spawn(async move {
            match request.send().await {
                Ok(r) if r.status().is_success() => {}
                _ => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while in_flight.join_next().await.is_some() {}
    let load_seconds = started.elapsed().as_secs_f64();
    let drain_started = Instant::now();
    let mut polls = 0i64;
    loop {
        polls += 1;
        let open: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM sagas WHERE state NOT IN ('confirmed', 'completed'))
                  + (SELECT count(*) FROM events e WHERE e.event_type = 'OrderPlaced'
                      AND NOT EXISTS (SELECT 1 FROM sagas s WHERE s.order_id::text = e.aggregate_id))",
        )
        .fetch_one(pool)
        .await?;
        if open == 0 {
            break;
        }
        anyhow::ensure!(
            drain_started.elapsed() < Duration::from_secs(300),
            "sagas did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain = drain_started.elapsed();
    server.stop().await?;
    for saga in sagas {
        saga.stop().await?;
    }
    // The polls above, and the statement of the first read.
    let delta = before.since(&Counters::read(pool).await?, polls + 1);
    let top = top_statements(pool).await;

    let latencies: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM c.recorded_at - p.recorded_at)::float8 * 1000
           FROM events p JOIN events c ON c.aggregate_type = 'order' AND c.aggregate_id = p.aggregate_id
          WHERE p.event_type = 'OrderPlaced' AND c.event_type = 'OrderConfirmed'
          ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    let (first, last, rejected): (Option<f64>, Option<f64>, i64) = sqlx::query_as(
        "SELECT extract(epoch FROM min(recorded_at) FILTER (WHERE event_type = 'OrderPlaced'))::float8,
                extract(epoch FROM max(recorded_at) FILTER (WHERE event_type = 'OrderConfirmed'))::float8,
                count(*) FILTER (WHERE event_type = 'OrderRejected')
           FROM events WHERE aggregate_type = 'order'",
    )
    .fetch_one(pool)
    .await?;
    let span = last.zip(first).map_or(0.0, |(l, f)| l - f);
    let confirmed = latencies.len();
    let pick = |p: f64| {
        latencies
            .get(((confirmed.saturating_sub(1)) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(vec![json!({
        "scenario": "fulfillment", "rate_per_second": rate, "seconds": duration.as_secs(),
        "saga_processes": processes,
        "orders_placed": placed, "placements_failed": failed.load(Ordering::Relaxed),
        "confirmed": confirmed, "rejected": rejected,
        "placed_per_second": round(placed as f64 / load_seconds),
        "confirmed_per_second": round(if span > 0.0 { confirmed as f64 / span } else { 0.0 }),
        "placed_to_confirmed_ms_p50": round(pick(0.5)),
        "placed_to_confirmed_ms_p99": round(pick(0.99)),
        "placed_to_confirmed_ms_max": round(latencies.last().copied().unwrap_or(0.0)),
        "drain_ms_after_load": round(drain.as_secs_f64() * 1000.0),
        "statements_per_confirmed": delta.statements.map(|s| per(s, confirmed)),
        "explicit_transactions_per_confirmed": delta.transactions.map(|t| per(t, confirmed)),
        "rollbacks": delta.rollbacks,
        "top_statements": top.into_iter().map(|(q, calls)| json!({"calls": calls, "query": q})).collect::<Vec<_>>(),
    })])
}

/// Waits until `processes` saga processes run and share every partition of the saga's consumer.
async fn wait_for_sagas(pool: &PgPool, processes: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let (live, owners, unowned): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM log_processes
                      WHERE consumer = 'fulfillment' AND alive_until > now()),
                    (SELECT count(DISTINCT owner) FROM checkpoints
                      WHERE consumer = 'fulfillment' AND lease_until > now()),
                    (SELECT count(*) FROM checkpoints
                      WHERE consumer = 'fulfillment' AND (owner IS NULL OR lease_until < now()))",
        )
        .fetch_one(pool)
        .await?;
        if usize::try_from(live)? == processes
            && usize::try_from(owners)? == processes
            && unowned == 0
        {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the saga processes did not share the partitions within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `count` per confirmed order, to one decimal.
fn per(count: i64, confirmed: usize) -> Value {
    round(count as f64 / confirmed.max(1) as f64)
}
