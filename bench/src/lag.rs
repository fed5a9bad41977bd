//! The lag scenario: how far projections trail the log under a steady command load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::sync::oneshot;

use crate::round;
use crate::server::BenchServer;

const PRODUCTS: usize = 100;

/// One sample of one projection.
#[derive(Debug, Clone, Copy)]
struct Sample {
    events: i64,
    seconds: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Runs the server here, sends `rate` commands a second for `duration`, samples lag.
pub async fn run(pool: &PgPool, duration: Duration, rate: u64) -> anyhow::Result<Vec<Value>> {
    let server = BenchServer::start(pool, PRODUCTS).await?;
    let (client, base) = (server.client.clone(), server.base.clone());
    let (admin, customer) = (server.admin.clone(), server.customer.clone());

    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (done_tx, mut done_rx) = oneshot::channel::<()>();
    let load = {
        let (client, base, ok, failed) = (client.clone(), base.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
            let started = Instant::now();
            let mut n = 0u64;
            let mut in_flight = tokio::task::JoinSet::new();
            while started.elapsed() < duration {
                tick.tick().await;
                n += 1;
                let sku = format!("P{}", n % PRODUCTS as u64);
                let request = if n % 10 < 7 {
                    client
                        .post(format!("{base}/api/v1/orders"))
                        .bearer_auth(&customer)
                        .json(&json!({"lines": [{"sku": sku, "quantity": 1}], "payment": {"token": "tok_visa"}}))
                } else {
                    client
                        .post(format!("{base}/api/v1/inventory/{sku}/restock"))
                        .bearer_auth(&admin)
                        .json(&json!({"quantity": 1}))
                };
                let (ok, failed) = (ok.clone(), failed.clone());
                in_flight.spawn(async move {
                    match request.send().await {
                        Ok(r) if r.status().is_success() => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                });
            }
            while in_flight.join_next().await.is_some() {}
            done_tx.send(()).ok();
        })
    };

    let mut samples: std::collections::BTreeMap<String, Vec<Sample>> = Default::default();
    let drained = loop {
        let rows: Vec<(String, i64, f64)> = event_log::checkpoints::progress(pool)
            .await?
            .into_iter()
            .map(|p| (p.name, p.lag, p.lag_seconds))
            .collect();
        let load_finished = matches!(
            done_rx.try_recv(),
            Ok(()) | Err(oneshot::error::TryRecvError::Closed)
        );
        for (name, events, seconds) in &rows {
            samples.entry(name.clone()).or_default().push(Sample {
                events: *events,
                seconds: *seconds,
            });
        }
        if load_finished {
            let drain_started = Instant::now();
            let drained = loop {
                let behind = event_log::checkpoints::progress(pool)
                    .await?
                    .iter()
                    .filter(|p| p.lag > 0)
                    .count();
                if behind == 0 {
                    break drain_started.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            break drained;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    load.await?;
    server.stop().await?;

    let sent = ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed);
    Ok(samples
        .into_iter()
        .map(|(projection, samples)| {
            let mut ms: Vec<f64> = samples.iter().map(|s| s.seconds * 1000.0).collect();
            ms.sort_by(f64::total_cmp);
            let mut events: Vec<f64> = samples.iter().map(|s| s.events as f64).collect();
            events.sort_by(f64::total_cmp);
            json!({
                "scenario": "lag", "projection": projection, "rate_per_second": rate,
                "seconds": duration.as_secs(), "commands": sent,
                "commands_failed": failed.load(Ordering::Relaxed),
                "lag_ms_p50": round(percentile(&ms, 0.5)), "lag_ms_p99": round(percentile(&ms, 0.99)),
                "lag_ms_max": round(ms.last().copied().unwrap_or(0.0)),
                "lag_events_p50": percentile(&events, 0.5), "lag_events_max": events.last().copied().unwrap_or(0.0),
                "drain_ms_after_load": round(drained.as_secs_f64() * 1000.0),
            })
        })
        .collect())
}
