//! `orderline-bench`: measures orderline against what Postgres alone does on the same machine,
//! in the same run, so the figures are ratios that mean something on a shared machine.
//!
//! - `replay --events N`: writes a log of N real domain events (orders with their reservation
//!   and payment events), then times Postgres streaming those rows in log order (the baseline)
//!   and the rebuild of every projection.
//! - `lag --seconds S --rate R`: runs the server in this process, sends R commands a second
//!   (orders and restocks) for S seconds, and samples how far each projection trails the log.
//! - `relay --events N [--brokers B]`: writes a log of N events, then times a Kafka producer
//!   alone sending them and the relay publishing them, to the same broker.
//! - `fulfillment --seconds S --rate R`: places R orders a second for S seconds and reports the
//!   time from placement to `confirmed` (p50, p99) and the orders confirmed per second.
//!
//! Each prints a table and, with `--json`, one JSON object per scenario on stdout. Each uses a
//! fresh database on the server at `DATABASE_URL` (default: the test server) and drops it.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, PgPool};

mod generate;
mod lag;
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
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
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
    /// Placement-to-confirmed latency and confirmed orders per second under a steady load.
    Fulfillment {
        /// How long to place orders.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Orders placed per second.
        #[arg(long, default_value_t = 100)]
        rate: u64,
    },
}

fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .or_else(|_| std::env::var("ORDERLINE_TEST_DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

/// A database that exists for one scenario.
struct BenchDatabase {
    name: String,
    pool: PgPool,
}

impl BenchDatabase {
    async fn create() -> anyhow::Result<Self> {
        let name = format!("orderline_bench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&server_url())
            .await
            .context("cannot reach Postgres (set DATABASE_URL)")?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        let url = match server_url().rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => anyhow::bail!("DATABASE_URL needs a database part"),
        };
        let pool = event_store::connect(&url, 16).await?;
        event_store::MIGRATOR.run(&pool).await?;
        Ok(Self { name, pool })
    }

    async fn drop(self) -> anyhow::Result<()> {
        self.pool.close().await;
        let mut admin = PgConnection::connect(&server_url()).await?;
        sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .execute(&mut admin)
            .await?;
        Ok(())
    }
}

/// Prints a result as a table row or a JSON line.
fn report(json: bool, result: &Value) {
    #[expect(clippy::print_stdout, reason = "the results are the program's output")]
    if json {
        println!("{result}");
    } else {
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let database = BenchDatabase::create().await?;
    let results = match cli.scenario {
        Scenario::Replay { events } => replay::run(&database.pool, events).await,
        Scenario::Lag { seconds, rate } => {
            lag::run(&database.pool, Duration::from_secs(seconds), rate).await
        }
        Scenario::Relay { events, brokers } => {
            let brokers = brokers
                .or_else(|| std::env::var("ORDERLINE_KAFKA_BROKERS").ok())
                .unwrap_or_else(|| "127.0.0.1:9092".into());
            relay::run(&database.pool, events, &brokers).await
        }
        Scenario::Fulfillment { seconds, rate } => {
            saga::run(&database.pool, Duration::from_secs(seconds), rate).await
        }
    };
    database.drop().await?;
    for result in results? {
        report(cli.json, &result);
    }
    Ok(())
}

/// Rounds to one decimal for reports.
fn round(x: f64) -> Value {
    json!((x * 10.0).round() / 10.0)
}
