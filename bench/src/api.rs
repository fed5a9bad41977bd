//! The HTTP scenarios: the real `orderline serve` driven over loopback by many connections, then
//! the same shape done by Postgres alone on the same database (`baseline`), so each prints a
//! ratio.
//!
//! - `restock`: `POST /api/v1/inventory/{sku}/restock` spread over 1,000 SKUs.
//! - `hot-sku`: the same on one SKU: every command contends for one stream.
//! - `place-order`: `POST /api/v1/orders` (two lines, `tok_visa`): acceptance latency, then how
//!   many orders a second reach `confirmed` in the read model and how long a sample of them took.
//! - `query`: `GET /api/v1/orders/{id}` over existing orders (`--orders`, 2,000), as their owner.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{stream, StreamExt, TryStreamExt};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::load::{drive, percentile_us, Load, Measured, Outcome};
use crate::process::ServerProcess;
use crate::{baseline, round, BenchDatabase};

/// SKUs registered for every HTTP scenario.
const PRODUCTS: usize = 1_000;
/// One order in this many is followed until it is confirmed.
const SAMPLE_EVERY: u64 = 8;

/// Which HTTP scenario to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Restocks over 1,000 SKUs.
    Restock,
    /// Restocks of one SKU.
    HotSku,
    /// Order placements, followed to `confirmed`.
    PlaceOrder,
    /// Reads of existing orders.
    Query,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Self::Restock => "restock",
            Self::HotSku => "hot-sku",
            Self::PlaceOrder => "place-order",
            Self::Query => "query",
        }
    }
}

/// Which sides of a scenario to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sides {
    /// orderline, then Postgres alone, and their ratio.
    Both,
    /// Postgres alone only (`--baseline`).
    BaselineOnly,
}

/// Runs one HTTP scenario on the fresh database `pool` (reachable at `url`) and answers its
/// report: one JSON object with orderline's figures, the baseline's and their ratio.
///
/// The machine is shared and its speed drifts over a run, so the baseline is measured twice,
/// right before and right after orderline, and orderline is compared with their mean (both
/// figures are reported as `baseline_before`/`baseline_after`). Write baselines use a database
/// of their own, seeded with the same 1,000 streams, so orderline's consumers never see them.
pub async fn run(
    shape: Shape,
    pool: &PgPool,
    url: &str,
    load: Load,
    sides: Sides,
    query_orders: usize,
) -> anyhow::Result<Value> {
    let server = ServerProcess::start(url).await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(load.connections)
        .build()?;
    register_products(
        &client,
        &server.base,
        &server.admin,
        PRODUCTS,
        1_000_000_000,
    )
    .await?;
    let query_ids = Arc::new(match shape {
        Shape::Query => place_orders(&client, &server, pool, query_orders).await?,
        _ => Vec::new(),
    });
    let own = match shape {
        Shape::Query => None,
        _ => Some(BenchDatabase::create().await?),
    };
    if let Some(own) = &own {
        baseline::seed(&own.pool, PRODUCTS).await?;
    }
    let baseline_url = own.as_ref().map_or(url, |db| db.url.as_str()).to_owned();
    // Every write scenario's yardstick is one stream read plus one insert per transaction; a
    // placement is judged against the spread shape (its confirmed orders/s against these
    // transactions/s), the hot SKU against the same contention.
    let measure_baseline = || {
        let (url, ids) = (baseline_url.clone(), query_ids.clone());
        async move {
            match shape {
                Shape::Restock | Shape::PlaceOrder => {
                    baseline::commands(&url, load, false, |n| format!("P{}", n % PRODUCTS as u64))
                        .await
                }
                Shape::HotSku => baseline::commands(&url, load, true, |_| "P0".into()).await,
                Shape::Query => baseline::order_reads(&url, load, ids).await,
            }
        }
    };

    let mut report = json!({
        "scenario": shape.name(), "connections": load.connections,
        "seconds": load.duration.as_secs_f64(),
    });
    let before = measure_baseline().await?;
    let ours = match sides {
        Sides::BaselineOnly => None,
        Sides::Both => {
            let (figures, throughput) = match shape {
                Shape::Restock | Shape::HotSku => {
                    let measured = restocks(shape, &client, &server, load).await;
                    (measured.fields(), measured.throughput)
                }
                Shape::PlaceOrder => place_order(&client, &server, pool, load).await?,
                Shape::Query => {
                    let measured = queries(&client, &server, load, &query_ids).await;
                    (measured.fields(), measured.throughput)
                }
            };
            merge(&mut report, figures);
            Some(throughput)
        }
    };
    report["server_rss_mib_peak"] = round(server.peak_rss_mib());
    server.stop().await?;
    let after = measure_baseline().await?;
    if let Some(own) = own {
        own.drop().await?;
    }

    report["baseline_before"] = round(before.throughput);
    report["baseline_after"] = round(after.throughput);
    let base = before.combine(after);
    report["baseline"] = base.fields();
    if let Some(ours) = ours {
        let ratio = ours / base.throughput.max(f64::MIN_POSITIVE);
        report["ratio"] = json!((ratio * 1000.0).round() / 1000.0);
    }
    Ok(report)
}

fn merge(report: &mut Value, fields: Value) {
    if let (Some(report), Value::Object(fields)) = (report.as_object_mut(), fields) {
        report.extend(fields);
    }
}

/// Registers SKUs `P0` to `P{count-1}` at 1.00 EUR with `stock` units each, 16 at a time, as
/// `admin` on the server at `base`; SKUs registered already are left as they are.
pub async fn register_products(
    client: &reqwest::Client,
    base: &str,
    admin: &str,
    count: usize,
    stock: u64,
) -> anyhow::Result<()> {
    stream::iter(0..count)
        .map(|i| async move {
            let sku = format!("P{i}");
            let stock = i64::try_from(stock)?;
            let created =
                testkit::client::register_product(client, base, admin, (&sku, 100, stock), None)
                    .await;
            // 409: registered already, by an earlier scenario on the same database.
            if created.status() != reqwest::StatusCode::CONFLICT {
                created.error_for_status()?;
            }
            anyhow::Ok(())
        })
        .buffer_unordered(16)
        .try_collect::<()>()
        .await
}

/// The answer's status as an outcome: `expected`, or a failure naming the status and body.
async fn expect(
    response: Result<reqwest::Response, reqwest::Error>,
    expected: u16,
) -> Result<reqwest::Response, String> {
    match response {
        Ok(r) if r.status().as_u16() == expected => Ok(r),
        Ok(r) => {
            let status = r.status();
            Err(format!("{status}: {}", r.text().await.unwrap_or_default()))
        }
        Err(e) => Err(e.to_string()),
    }
}

async fn restocks(
    shape: Shape,
    client: &reqwest::Client,
    server: &ServerProcess,
    load: Load,
) -> Measured {
    let (client, base, admin) = (client.clone(), server.base.clone(), server.admin.clone());
    drive(load, move |n| {
        let sku = match shape {
            Shape::HotSku => 0,
            _ => n % PRODUCTS as u64,
        };
        let request = client
            .post(format!("{base}/api/v1/inventory/P{sku}/restock"))
            .bearer_auth(&admin)
            .json(&json!({"quantity": 1}))
            .send();
        async move { answered(request.await, 200).await }
    })
    .await
}

/// The answer as an outcome: `expected`, read to the end, or a failure naming what came.
async fn answered(response: Result<reqwest::Response, reqwest::Error>, expected: u16) -> Outcome {
    match expect(response, expected).await {
        Ok(r) => drain(r).await,
        Err(why) => Outcome::Failed(why),
    }
}

/// Reads the body to the end, so the connection is reused and the whole answer is timed.
async fn drain(response: reqwest::Response) -> Outcome {
    match response.bytes().await {
        Ok(_) => Outcome::Ok,
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

fn order_body(n: u64) -> Value {
    json!({
        "lines": [
            {"sku": format!("P{}", n % PRODUCTS as u64), "quantity": 1},
            {"sku": format!("P{}", (n * 7 + 3) % PRODUCTS as u64), "quantity": 2},
        ],
        "payment": {"token": "tok_visa"},
    })
}

/// Places orders for a `load`, then waits until the saga has decided every one.
///
/// Answers the acceptance figures plus `confirmed_per_second` (orders that reached `confirmed`
/// in the read model during the window, per second), `placed_to_confirmed_ms_*` (one order in
/// eight, followed in the read model every 5 ms) and `drain_seconds` (after the window, until
/// every placed order was decided); the throughput that counts is `confirmed_per_second`.
async fn place_order(
    client: &reqwest::Client,
    server: &ServerProcess,
    pool: &PgPool,
    load: Load,
) -> anyhow::Result<(Value, f64)> {
    let sampled: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let decided = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(follow(pool.clone(), sampled.clone(), decided.clone()));
    let confirmed_at_start = {
        let pool = pool.clone();
        tokio::spawn(async move {
            tokio::time::sleep(load.warmup).await;
            count_confirmed(&pool).await
        })
    };
    let measured = {
        let (client, base, customer) =
            (client.clone(), server.base.clone(), server.customer.clone());
        let sampled = sampled.clone();
        drive(load, move |n| {
            let request = client
                .post(format!("{base}/api/v1/orders"))
                .bearer_auth(&customer)
                .json(&order_body(n))
                .send();
            let sampled = sampled.clone();
            let sent = Instant::now();
            async move {
                let response = match expect(request.await, 202).await {
                    Ok(r) => r,
                    Err(why) => return Outcome::Failed(why),
                };
                match response.json::<Value>().await {
                    Ok(body) => {
                        let id = body["order_id"].as_str().and_then(|s| s.parse().ok());
                        match id {
                            Some(id) if n % SAMPLE_EVERY == 0 => {
                                if let Ok(mut sampled) = sampled.lock() {
                                    sampled.insert(id, sent);
                                }
                                Outcome::Ok
                            }
                            Some(_) => Outcome::Ok,
                            None => Outcome::Failed(format!("no order_id in {body}")),
                        }
                    }
                    Err(e) => Outcome::Failed(e.to_string()),
                }
            }
        })
        .await
    };
    let window_end = Instant::now();
    let confirmed_in_window = count_confirmed(pool).await? - confirmed_at_start.await??;
    wait_decided(pool).await?;
    let drain = window_end.elapsed();
    decided.store(true, Ordering::Release);
    let mut waits = watcher.await??;
    waits.sort_unstable();
    let confirmed_per_second = confirmed_in_window as f64 / load.duration.as_secs_f64();
    let mut fields = measured.fields();
    merge(
        &mut fields,
        json!({
            "accepted_per_second": round(measured.throughput),
            "confirmed_per_second": round(confirmed_per_second),
            "throughput_per_second": round(confirmed_per_second),
            "placed_to_confirmed_ms_p50": round(percentile_us(&waits, 0.5) as f64 / 1000.0),
            "placed_to_confirmed_ms_p95": round(percentile_us(&waits, 0.95) as f64 / 1000.0),
            "placed_to_confirmed_ms_p99": round(percentile_us(&waits, 0.99) as f64 / 1000.0),
            "placed_to_confirmed_ms_max": round(percentile_us(&waits, 1.0) as f64 / 1000.0),
            "placed_to_confirmed_samples": waits.len(),
            "drain_seconds": round(drain.as_secs_f64()),
        }),
    );
    Ok((fields, confirmed_per_second))
}

async fn count_confirmed(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM rm_orders WHERE status = 'confirmed'")
            .fetch_one(pool)
            .await?,
    )
}

/// Waits until every order in the read model is decided (confirmed or rejected) and the
/// projection has seen every placement in the log.
async fn wait_decided(pool: &PgPool) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM rm_orders WHERE status NOT IN ('confirmed', 'rejected'))
                  + (SELECT count(*) FROM events WHERE aggregate_type = 'order' AND event_type = 'OrderPlaced')
                  - (SELECT count(*) FROM rm_orders)",
        )
        .fetch_one(pool)
        .await?;
        if open == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "{open} orders still undecided after 600 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Follows the sampled orders in the read model every 5 ms and answers, for each one that
/// reached `confirmed`, the microseconds from sending its placement to seeing it confirmed.
/// Ends after the first pass that starts once `decided` is set (every placement decided).
async fn follow(
    pool: PgPool,
    sampled: Arc<Mutex<HashMap<Uuid, Instant>>>,
    decided: Arc<AtomicBool>,
) -> anyhow::Result<Vec<u64>> {
    let mut waits = Vec::new();
    loop {
        let last = decided.load(Ordering::Acquire);
        let pending: Vec<Uuid> = match sampled.lock() {
            Ok(sampled) => sampled.keys().copied().collect(),
            Err(_) => anyhow::bail!("the sample list was poisoned"),
        };
        if !pending.is_empty() {
            let seen: Vec<(Uuid, String)> = sqlx::query_as(
                "SELECT order_id, status FROM rm_orders
                  WHERE order_id = ANY($1) AND status IN ('confirmed', 'rejected')",
            )
            .bind(&pending)
            .fetch_all(&pool)
            .await?;
            let now = Instant::now();
            if let Ok(mut sampled) = sampled.lock() {
                for (id, status) in seen {
                    if let Some(sent) = sampled.remove(&id) {
                        if status == "confirmed" {
                            waits.push(now.duration_since(sent).as_micros() as u64);
                        }
                    }
                }
            }
        }
        if last {
            return Ok(waits);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Places `count` orders and waits until the read model has them; answers their ids.
async fn place_orders(
    client: &reqwest::Client,
    server: &ServerProcess,
    pool: &PgPool,
    count: usize,
) -> anyhow::Result<Vec<Uuid>> {
    let ids: Vec<Uuid> = stream::iter(0..count.max(1) as u64)
        .map(|n| async move {
            let body: Value = client
                .post(format!("{}/api/v1/orders", server.base))
                .bearer_auth(&server.customer)
                .json(&order_body(n))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let id = body["order_id"]
                .as_str()
                .unwrap_or_default()
                .parse::<Uuid>()?;
            anyhow::Ok(id)
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    wait_decided(pool).await?;
    Ok(ids)
}

async fn queries(
    client: &reqwest::Client,
    server: &ServerProcess,
    load: Load,
    ids: &[Uuid],
) -> Measured {
    let urls: Arc<Vec<String>> = Arc::new(
        ids.iter()
            .map(|id| format!("{}/api/v1/orders/{id}", server.base))
            .collect(),
    );
    let (client, customer) = (client.clone(), server.customer.clone());
    drive(load, move |n| {
        let request = client
            .get(&urls[n as usize % urls.len()])
            .bearer_auth(&customer)
            .send();
        async move { answered(request.await, 200).await }
    })
    .await
}
