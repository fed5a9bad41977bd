//! The large-log scenario: whether what a server costs stays flat as the log grows. It runs
//! `restock`, `place-order` and `query` (each with its Postgres-alone baseline) on a fresh
//! database, then generates a log of `--events` real events on another one, brings every
//! consumer up to its head (the projections by a rebuild, so the read models hold the log's
//! orders; the saga and the notifications by their checkpoints, as a server that had followed
//! the log would have left them), and measures there:
//!
//! - the same three HTTP scenarios, and each one's throughput against the fresh database's;
//! - an idle server's CPU, its own and Postgres's, over `IDLE` (from `/proc`);
//! - `GET /api/v1/admin/projections` and `/metrics`, `ADMIN_REQUESTS` each, one at a time;
//! - `verify` (the hash chain of the whole log, then every projection against it), in events
//!   per second.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::PgPool;

use projections::rebuild::{self, RebuildLock};

use crate::api::{self, Shape, Sides};
use crate::load::{percentile_us, Load};
use crate::process::ServerProcess;
use crate::{generate, round, seconds, BenchDatabase};

/// How long the idle server is watched.
const IDLE: Duration = Duration::from_secs(10);
/// Requests to each admin view.
const ADMIN_REQUESTS: usize = 200;
/// The consumers that are not projections: a server that followed the log has checkpoints for
/// them at its head.
const FOLLOWERS: [&str; 2] = [
    sagas::runtime::CONSUMER_NAME,
    integrations::notifications::NAME,
];

/// Runs the scenario; one result per measurement.
pub async fn run(events: u64, load: Load, query_orders: usize) -> anyhow::Result<Vec<Value>> {
    let shapes = [Shape::Restock, Shape::PlaceOrder, Shape::Query];
    let mut fresh = Vec::new();
    for shape in shapes {
        let database = BenchDatabase::create().await?;
        let measured = api::run(
            shape,
            &database.pool,
            &database.url,
            load,
            Sides::Both,
            query_orders,
        )
        .await;
        database.drop().await?;
        fresh.push(measured?);
    }

    let database = BenchDatabase::create().await?;
    let measured = on_large_log(&database, events, load, query_orders, &shapes, &fresh).await;
    database.drop().await?;
    let mut results = fresh;
    results.extend(measured?);
    Ok(results)
}

async fn on_large_log(
    database: &BenchDatabase,
    events: u64,
    load: Load,
    query_orders: usize,
    shapes: &[Shape],
    fresh: &[Value],
) -> anyhow::Result<Vec<Value>> {
    let pool = &database.pool;
    let started = Instant::now();
    let written = generate::log(pool, events).await?;
    sqlx::query("VACUUM ANALYZE events").execute(pool).await?;
    let generated_seconds = seconds(started);
    let started = Instant::now();
    catch_up(pool).await?;
    // A settled database, as one that grew over months is: no autovacuum of the fresh rows
    // running into the measurements.
    sqlx::query("VACUUM ANALYZE").execute(pool).await?;
    let mut results = vec![json!({
        "scenario": "large-log", "subject": "setup", "events": written,
        "generate_seconds": round(generated_seconds),
        "rebuild_seconds": round(seconds(started)),
    })];

    for (shape, fresh) in shapes.iter().zip(fresh) {
        let mut measured =
            api::run(*shape, pool, &database.url, load, Sides::Both, query_orders).await?;
        let ours = measured["throughput_per_second"].as_f64().unwrap_or(0.0);
        let theirs = fresh["throughput_per_second"].as_f64().unwrap_or(0.0);
        measured["scenario"] = json!(format!("{}@{written}", shape_name(&measured)));
        measured["vs_fresh_log"] =
            json!((ours / theirs.max(f64::MIN_POSITIVE) * 1000.0).round() / 1000.0);
        results.push(measured);
    }

    // The scenarios' writes leave the tables to autovacuum; vacuum them now and wait for any
    // worker still running, so the idle window measures the server's own cost.
    sqlx::query("VACUUM ANALYZE").execute(pool).await?;
    let server = ServerProcess::start(&database.url).await?;
    // Let the start-up work (leases, first polls) pass before watching it idle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_for_no_autovacuum(pool).await?;
    let idle = idle_cpu(server.pid()).await?;
    results.push(json!({
        "scenario": "large-log", "subject": "idle", "events": written,
        "seconds": IDLE.as_secs(),
        "server_cpu_percent_of_a_core": round(idle.0),
        "postgres_cpu_percent_of_a_core": round(idle.1),
        "total_cpu_percent_of_a_core": round(idle.0 + idle.1),
    }));
    let client = reqwest::Client::new();
    for path in ["/api/v1/admin/projections", "/metrics"] {
        let mut took = Vec::with_capacity(ADMIN_REQUESTS);
        for _ in 0..ADMIN_REQUESTS {
            let sent = Instant::now();
            let response = client
                .get(format!("{}{path}", server.base))
                .bearer_auth(&server.admin)
                .send()
                .await?
                .error_for_status()?;
            response.bytes().await?;
            took.push(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX));
        }
        took.sort_unstable();
        results.push(json!({
            "scenario": "large-log", "subject": format!("GET {path}"), "events": written,
            "requests": ADMIN_REQUESTS,
            "p50_ms": round(percentile_us(&took, 0.5) as f64 / 1000.0),
            "p99_ms": round(percentile_us(&took, 0.99) as f64 / 1000.0),
            "max_ms": round(percentile_us(&took, 1.0) as f64 / 1000.0),
        }));
    }
    server.stop().await?;

    // `verify` is the hash chain of the whole log, then each projection compared with a fold
    // of it: timed part by part.
    let started = Instant::now();
    let checked = match audit::verify::verify(pool, &|_| {}).await? {
        Ok(verified) => verified.events,
        Err(finding) => anyhow::bail!("verify found a problem in the generated log: {finding}"),
    };
    let chain_seconds = seconds(started);
    let mut compared = serde_json::Map::new();
    for projection in projections::all() {
        let started = Instant::now();
        let lock = RebuildLock::acquire(pool, projection.as_ref()).await?;
        let outcome = match rebuild::compare(pool, projection.as_ref(), lock).await? {
            rebuild::Comparison::Same { .. } => "same",
            _ => "differs",
        };
        compared.insert(
            projection.name().to_owned(),
            json!({"seconds": round(seconds(started)), "outcome": outcome}),
        );
    }
    let total = chain_seconds
        + compared
            .values()
            .filter_map(|c| c["seconds"].as_f64())
            .sum::<f64>();
    results.push(json!({
        "scenario": "large-log", "subject": "verify", "events": checked,
        "seconds": round(total), "events_per_second": (checked as f64 / total).round(),
        "hash_chain_seconds": round(chain_seconds),
        "hash_chain_events_per_second": (checked as f64 / chain_seconds).round(),
        "projections": compared,
    }));
    Ok(results)
}

fn shape_name(report: &Value) -> String {
    report["scenario"].as_str().unwrap_or_default().to_owned()
}

/// Brings every consumer to the log's head: each projection by a rebuild, the others by
/// checkpoints at the newest event on every partition.
async fn catch_up(pool: &PgPool) -> anyhow::Result<()> {
    for projection in projections::all() {
        let lock = RebuildLock::acquire(pool, projection.as_ref()).await?;
        rebuild::rebuild(pool, projection.as_ref(), lock, &|_, _| {}).await?;
    }
    for consumer in FOLLOWERS {
        sqlx::query("INSERT INTO consumers (consumer) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(consumer)
            .execute(pool)
            .await?;
        sqlx::query(
            "INSERT INTO checkpoints (consumer, partition, transaction_id, position)
             SELECT $1, p, head.transaction_id, head.position
               FROM (SELECT transaction_id, position FROM events
                      ORDER BY transaction_id DESC, position DESC LIMIT 1) AS head,
                    log_partitions, generate_series(0, log_partitions.partitions - 1) AS p
             ON CONFLICT (consumer, partition) DO UPDATE
                SET transaction_id = EXCLUDED.transaction_id, position = EXCLUDED.position",
        )
        .bind(consumer)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Waits, up to two minutes, until no autovacuum worker runs on the server.
async fn wait_for_no_autovacuum(pool: &PgPool) -> anyhow::Result<()> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'",
        )
        .fetch_one(pool)
        .await?;
        if running == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// CPU used over [`IDLE`] by process `server` and by every Postgres process, in percent of one
/// core, from the clock ticks `/proc/PID/stat` counts (user and system).
async fn idle_cpu(server: u32) -> anyhow::Result<(f64, f64)> {
    let before = (ticks(server), postgres_ticks());
    let started = Instant::now();
    tokio::time::sleep(IDLE).await;
    let elapsed = seconds(started);
    let after = (ticks(server), postgres_ticks());
    // Linux counts in USER_HZ, 100 a second on every architecture it runs on here.
    let percent = |ticks: u64| ticks as f64 / 100.0 / elapsed * 100.0;
    Ok((
        percent(after.0.saturating_sub(before.0)),
        percent(after.1.saturating_sub(before.1)),
    ))
}

/// User plus system clock ticks of process `pid` so far (0 when it is gone).
fn ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The command name may hold spaces; the fields after its closing parenthesis are
            // fixed: utime and stime are the 12th and 13th of them.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// Clock ticks of every process whose command is `postgres`, summed. Backends that exit in
/// between take theirs with them; an idle server's connections stay.
fn postgres_ticks() -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(ticks)
        .sum()
}
