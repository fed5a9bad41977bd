//! `orderline-bench`: measures orderline against what Postgres alone does on the same machine,
//! in the same run, so the figures are ratios that mean something on a shared machine.
//!
//! HTTP scenarios start the real `orderline serve` (found next to this binary, or at
//! `ORDERLINE_BIN`) on a fresh database, drive it over loopback with `--connections` closed-loop
//! clients for `--warmup` then `--seconds`, stop it, and do the same shape with Postgres alone
//! through sqlx on the same tables at the same concurrency (see `baseline`):
//!
//! - `restock`: restocks spread over 1,000 SKUs; baseline: read a stream and insert one event
//!   per transaction;
//! - `hot-sku`: restocks of one SKU; baseline: the same on one stream;
//! - `place-order`: placements, then confirmed orders per second and placement-to-confirmed
//!   time in the read model; baseline: the `restock` baseline;
//! - `query`: `GET /api/v1/orders/{id}` over `--orders` orders; baseline: the row by id.
//!
//! Log scenarios generate a log of real events and time a consumer against Postgres alone:
//!
//! - `replay --events N`: every projection's rebuild against streaming the log in log order;
//! - `relay --events N [--brokers B]`: the Kafka relay against a producer alone;
//! - `lag --seconds S --rate R`: how far each projection trails the log under a steady load;
//! - `fulfillment --seconds S --rate R [--processes N]`: placement-to-confirmed at an open-loop
//!   rate, with the saga in the bench's server or in N processes sharing its partitions;
//! - `large-log --events N`: `restock`, `place-order` and `query` on a fresh log and on one of
//!   N generated events, and on the large one the idle server's CPU (its own and Postgres's),
//!   the admin views' latency and `verify`'s speed.
//!
//! `all` runs the first six. Each prints a table, or with `--json` one JSON object per
//! scenario on stdout (throughput, p50/p95/p99/max latency, errors, the server's peak RSS, the
//! baseline's figures and the ratio). `--baseline` measures Postgres alone only. Every scenario
//! uses its own database on the server at `DATABASE_URL` (default: the test server) and drops it.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use sqlx::PgPool;

mod api;
mod baseline;
mod counters;
mod generate;
mod lag;
mod large_log;
mod load;
mod process;
mod relay;
mod replay;
mod saga;
mod server;

/// Measure orderline against Postgres alone.
#[derive(Parser)]
#[command(about)]
struct Cli {
    /// Print one JSON object per scenario instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Concurrent connections of the HTTP scenarios (and of their baselines).
    #[arg(long, global = true, default_value_t = 32)]
    connections: usize,
    /// Measured seconds of each HTTP scenario.
    #[arg(long, global = true, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds before measuring.
    #[arg(long, global = true, default_value_t = 3.0)]
    warmup: f64,
    /// Orders placed for the `query` scenario to read.
    #[arg(long, global = true, default_value_t = 2_000)]
    orders: usize,
    /// Measure Postgres alone only (the HTTP scenarios' baselines).
    #[arg(long, global = true)]
    baseline: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Restocks spread over 1,000 SKUs, against Postgres alone.
    Restock,
    /// Restocks of one SKU (contention), against Postgres alone.
    HotSku,
    /// Order placement, and time until `confirmed` in the read model.
    PlaceOrder,
    /// `GET /api/v1/orders/{id}` over existing orders.
    Query,
    /// restock, hot-sku, place-order, query, replay and relay, one after the other.
    All {
        /// Events in the generated log of `replay` and `relay`.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Bootstrap servers for `relay` (default: `ORDERLINE_KAFKA_BROKERS`, else
        /// 127.0.0.1:9092).
        #[arg(long)]
        brokers: Option<String>,
    },
    /// Rebuild speed of every projection over a generated log, against Postgres streaming it.
    Replay {
        /// Events in the generated log.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
    },
    /// Projection lag under a steady command load.
    Lag {
        /// How long to send commands.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Commands per second.
        #[arg(long, default_value_t = 200)]
        rate: u64,
    },
    /// Kafka relay throughput over a generated log, against a producer alone.
    Relay {
        /// Events in the generated log.
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        /// Bootstrap servers of the broker (default: `ORDERLINE_KAFKA_BROKERS`, else
        /// 127.0.0.1:9092).
        #[arg(long)]
        brokers: Option<String>,
    },
    /// restock, place-order and query on a fresh log and on a generated one of `--events`, the
    /// idle server's CPU, the admin views' latency and `verify` on the large one.
    LargeLog {
        /// Events in the generated log.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
    },
    /// Placement-to-confirmed latency and confirmed orders per second under a steady load.
    Fulfillment {
        /// How long to place orders.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Orders placed per second.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        /// Run the saga in this many `orderline serve --only sagas` processes on the one
        /// database (0: in the bench's own server, with everything else).
        #[arg(long, default_value_t = 0)]
        processes: usize,
    },
}

fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .or_else(|_| std::env::var("ORDERLINE_TEST_DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

/// The URL of database `name` on the server of [`server_url`]. Without an `sslmode` there, it
/// is `disable`: the bench talks to Postgres on the same host, where TLS only burns the CPU both
/// sides share. orderline and the baseline always use the same URL.
fn database_url(name: &str) -> anyhow::Result<String> {
    let url = server_url();
    let (base, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
    let Some((server, _)) = base.rsplit_once('/') else {
        anyhow::bail!("DATABASE_URL needs a database part");
    };
    let query = match query {
        "" => "sslmode=disable".to_owned(),
        q if q.contains("sslmode=") => q.to_owned(),
        q => format!("{q}&sslmode=disable"),
    };
    Ok(format!("{server}/{name}?{query}"))
}

/// A database that exists for one scenario.
pub(crate) struct BenchDatabase {
    name: String,
    /// Its URL.
    pub url: String,
    /// A pool of 16 connections to it.
    pub pool: PgPool,
}

impl BenchDatabase {
    /// Creates and migrates a database with a random name.
    pub async fn create() -> anyhow::Result<Self> {
        let (name, _) = testkit::database::create_on(&server_url(), "orderline_bench")
            .await
            .context("cannot reach Postgres (set DATABASE_URL)")?;
        let url = database_url(&name)?;
        let pool = event_store::connect(&url, 16).await?;
        event_store::MIGRATOR.run(&pool).await?;
        Ok(Self { name, url, pool })
    }

    /// Drops the database.
    pub async fn drop(self) -> anyhow::Result<()> {
        self.pool.close().await;
        testkit::database::drop_on(&server_url(), &self.name).await?;
        Ok(())
    }
}

/// Prints results: one JSON line each with `--json`; otherwise the HTTP scenarios as one table
/// (orderline's row, then Postgres alone's) and the others as `key=value` lines.
#[expect(clippy::print_stdout, reason = "the results are the program's output")]
fn report(json: bool, results: &[Value]) {
    if json {
        for result in results {
            println!("{result}");
        }
        return;
    }
    let (http, other): (Vec<&Value>, Vec<&Value>) =
        results.iter().partition(|r| r.get("baseline").is_some());
    if !http.is_empty() {
        println!(
            "{:<12} {:<10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>6}",
            "scenario",
            "subject",
            "per sec",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "errors",
            "RSS MiB",
            "ratio"
        );
    }
    let cell = |v: &Value, key: &str| v.get(key).map_or_else(|| "-".to_owned(), Value::to_string);
    for result in &http {
        let scenario = result["scenario"].as_str().unwrap_or_default();
        for (subject, figures) in [("orderline", *result), ("postgres", &result["baseline"])] {
            if figures.get("throughput_per_second").is_none() {
                continue;
            }
            let (rss, ratio) = match subject {
                "orderline" => (cell(result, "server_rss_mib_peak"), cell(result, "ratio")),
                _ => ("-".into(), "-".into()),
            };
            println!(
                "{scenario:<12} {subject:<10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {rss:>8} {ratio:>6}",
                cell(figures, "throughput_per_second"),
                cell(figures, "p50_ms"),
                cell(figures, "p95_ms"),
                cell(figures, "p99_ms"),
                cell(figures, "max_ms"),
                cell(figures, "errors"),
            );
        }
        if let Some(error) = result
            .get("first_error")
            .or_else(|| result["baseline"].get("first_error"))
        {
            println!("{:<12} first error: {error}", "");
        }
        if result.get("confirmed_per_second").is_some() {
            println!(
                "{:<12} accepted {}/s; confirmed {}/s; placed -> confirmed p50 {} ms, p95 {} ms, \
                 p99 {} ms, max {} ms ({} samples); drained {} s after the load",
                "",
                cell(result, "accepted_per_second"),
                cell(result, "confirmed_per_second"),
                cell(result, "placed_to_confirmed_ms_p50"),
                cell(result, "placed_to_confirmed_ms_p95"),
                cell(result, "placed_to_confirmed_ms_p99"),
                cell(result, "placed_to_confirmed_ms_max"),
                cell(result, "placed_to_confirmed_samples"),
                cell(result, "drain_seconds"),
            );
        }
    }
    for result in other {
        let fields = result
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("  ")
            })
            .unwrap_or_default();
        println!("{fields}");
    }
}

/// Seconds since `started`, as a float.
fn seconds(started: Instant) -> f64 {
    started.elapsed().as_secs_f64()
}

/// Runs `scenario` on a database of its own, dropped afterwards whatever the outcome.
async fn on_fresh_database<F, Fut>(scenario: F) -> anyhow::Result<Vec<Value>>
where
    F: FnOnce(PgPool, String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<Value>>>,
{
    let database = BenchDatabase::create().await?;
    let results = scenario(database.pool.clone(), database.url.clone()).await;
    database.drop().await?;
    results
}

fn brokers(given: Option<String>) -> String {
    given
        .or_else(|| std::env::var("ORDERLINE_KAFKA_BROKERS").ok())
        .unwrap_or_else(|| "127.0.0.1:9092".into())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let load = load::Load {
        connections: cli.connections,
        warmup: Duration::from_secs_f64(cli.warmup),
        duration: Duration::from_secs_f64(cli.duration),
    };
    let sides = if cli.baseline {
        api::Sides::BaselineOnly
    } else {
        api::Sides::Both
    };
    let orders = cli.orders;
    let http = |shape| async move {
        on_fresh_database(|pool, url| async move {
            Ok(vec![
                api::run(shape, &pool, &url, load, sides, orders).await?,
            ])
        })
        .await
    };
    let replay =
        |events| on_fresh_database(move |pool, _| async move { replay::run(&pool, events).await });
    let relay = |brokers: String| {
        move |events| {
            on_fresh_database(
                move |pool, _| async move { relay::run(&pool, events, &brokers).await },
            )
        }
    };
    let results = match cli.scenario {
        Scenario::Restock => http(api::Shape::Restock).await?,
        Scenario::HotSku => http(api::Shape::HotSku).await?,
        Scenario::PlaceOrder => http(api::Shape::PlaceOrder).await?,
        Scenario::Query => http(api::Shape::Query).await?,
        Scenario::All {
            events,
            brokers: given,
        } => {
            let mut all = Vec::new();
            for shape in [
                api::Shape::Restock,
                api::Shape::HotSku,
                api::Shape::PlaceOrder,
                api::Shape::Query,
            ] {
                all.extend(http(shape).await?);
            }
            all.extend(replay(events).await?);
            all.extend(relay(brokers(given))(events.min(200_000)).await?);
            all
        }
        Scenario::Replay { events } => replay(events).await?,
        Scenario::Relay {
            events,
            brokers: given,
        } => relay(brokers(given))(events).await?,
        Scenario::Lag { seconds, rate } => {
            on_fresh_database(move |pool, _| async move {
                lag::run(&pool, Duration::from_secs(seconds), rate).await
            })
            .await?
        }
        Scenario::LargeLog { events } => large_log::run(events, load, orders).await?,
        Scenario::Fulfillment {
            seconds,
            rate,
            processes,
        } => {
            on_fresh_database(move |pool, url| async move {
                saga::run(&pool, &url, Duration::from_secs(seconds), rate, processes).await
            })
            .await?
        }
    };
    report(cli.json, &results);
    Ok(())
}

/// Rounds to one decimal for reports.
fn round(x: f64) -> Value {
    json!((x * 10.0).round() / 10.0)
}
