//! The relay scenario: how fast the Kafka relay publishes a log, against a Kafka producer alone
//! sending the same messages to the same broker, in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use sqlx::PgPool;

use event_log::subscription::{RunnerConfig, Subscriptions};
use event_log::{Cursor, LogEvent};
use kafka_relay::{headers, KafkaRelay, RelayConfig};

use crate::{generate, round, seconds};

/// Generates `events` events, then times a bare producer and the relay publishing them to the
/// broker at `brokers`, each to topics of its own.
pub async fn run(pool: &PgPool, events: u64, brokers: &str) -> anyhow::Result<Vec<Value>> {
    generate::log(pool, events).await?;
    let mut log = Vec::new();
    let mut conn = pool.acquire().await?;
    let mut cursor = Cursor::default();
    loop {
        let page = event_log::read_page(&mut conn, cursor, 5000).await?;
        let Some(last) = page.last() else { break };
        cursor = last.cursor();
        log.extend(page);
    }
    drop(conn);
    let run = uuid::Uuid::new_v4().simple().to_string();

    // Baseline: one idempotent producer sending every message (same key, value and headers),
    // all in flight at once, waiting for every acknowledgement.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .create()?;
    let topic = |event: &LogEvent| format!("bench-{run}-producer.{}", event.aggregate_type);
    let started = Instant::now();
    let topics: Vec<String> = log.iter().map(topic).collect();
    let mut pending = Vec::with_capacity(log.len());
    for (event, topic) in log.iter().zip(&topics) {
        let record = FutureRecord::to(topic)
            .key(event.aggregate_id.as_str())
            .payload(event.payload.get())
            .headers(headers(event));
        pending.push(producer.send(record, Duration::from_secs(30)));
    }
    for delivery in futures::future::join_all(pending).await {
        delivery.map_err(|(e, _)| anyhow::anyhow!("baseline delivery: {e}"))?;
    }
    let baseline = log.len() as f64 / seconds(started);
    let mut results = vec![json!({
        "scenario": "relay", "subject": "kafka-producer-alone", "events": log.len(),
        "seconds": round(seconds(started)), "events_per_second": baseline.round(),
    })];

    // The relay: a checkpointed consumer of the log, pages of 1000, checkpoint after the acks.
    let relay = KafkaRelay::new(RelayConfig {
        topic_prefix: format!("bench-{run}-relay"),
        partitions: 6,
        ..RelayConfig::new(brokers)
    })?;
    let started = Instant::now();
    let relays = Subscriptions::spawn(pool, vec![Arc::new(relay)], &RunnerConfig::default());
    loop {
        let position = event_log::checkpoints::progress(pool)
            .await?
            .into_iter()
            .find(|p| p.name == kafka_relay::CONSUMER_NAME)
            .map(|p| p.position);
        if position >= log.last().map(|e| e.position) {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the relay did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let relay = log.len() as f64 / seconds(started);
    relays.shutdown().await;
    results.push(json!({
        "scenario": "relay", "subject": "relay", "events": log.len(),
        "seconds": round(log.len() as f64 / relay), "events_per_second": relay.round(),
        "ratio_to_producer_percent": round(relay / baseline * 100.0),
    }));
    Ok(results)
}
