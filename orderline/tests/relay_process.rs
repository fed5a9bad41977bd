//! End to end across processes with a real Kafka-protocol broker (tansu, started by
//! `scripts/test`): the real server publishes through its relay while orders run through the
//! saga, and a separate consumer here reads every event of the run, keyed by aggregate and in
//! sequence order per aggregate.

#![expect(
    clippy::unwrap_used,
    reason = "a test that cannot go on should fail loudly"
)]

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use api_common::auth::{Role, TokenKeys};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::ClientConfig;
use sqlx::PgPool;

mod support;
use support::{
    drop_database, free_port, fresh_database, orderline, place_order, register_product, until,
    wait_ready, SECRET,
};

const ORDERS: usize = 30;

fn brokers() -> String {
    std::env::var("ORDERLINE_TEST_KAFKA_BROKERS").expect(
        "ORDERLINE_TEST_KAFKA_BROKERS: run the tests with scripts/test, which starts a broker",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_relay_publishes_every_event_of_a_run_of_orders_to_a_real_broker() {
    let (database, url) = fresh_database("orderline_relay").await;
    // Topics of this run only: the broker outlives test runs.
    let prefix = format!("orderline-test-{}", uuid::Uuid::new_v4().simple());
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let brokers = brokers();
    let mut server = orderline(
        &url,
        port,
        &["serve"],
        &[
            ("ORDERLINE_KAFKA_BROKERS", brokers.as_str()),
            ("ORDERLINE_KAFKA_TOPIC_PREFIX", prefix.as_str()),
            ("ORDERLINE_KAFKA_PARTITIONS", "3"),
        ],
    );
    let client = reqwest::Client::new();
    wait_ready(&client, &base).await;
    let keys = TokenKeys::hs256(SECRET.as_bytes());
    let ops = keys
        .mint("ops", Role::Admin, Duration::from_secs(600))
        .unwrap();
    let customer = keys
        .mint("c1", Role::Customer, Duration::from_secs(600))
        .unwrap();
    register_product(&client, &base, &ops, "A", 100, 20).await;
    for _ in 0..ORDERS {
        place_order(&client, &base, &customer, &[("A", 1)], "tok_visa").await;
    }

    // Wait until the sagas are done and the relay has published the whole log.
    let pool = PgPool::connect(&url).await.unwrap();
    until("the relay caught up", async || {
        sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM sagas WHERE state IN ('confirmed', 'completed')) = $1
                AND NOT EXISTS (SELECT 1 FROM checkpoints c, events e
                                 WHERE c.consumer IN ('kafka-relay', 'fulfillment')
                                   AND (e.transaction_id, e.position) > (c.transaction_id, c.position))
                AND (SELECT count(*) FROM checkpoints WHERE consumer = 'kafka-relay') = 16",
        )
        .bind(i64::try_from(ORDERS).unwrap())
        .fetch_one(&pool)
        .await
        .unwrap()
    })
    .await;
    server.kill().unwrap();
    server.wait().unwrap();
    let log: Vec<(uuid::Uuid, String, String, i64)> = sqlx::query_as(
        "SELECT event_id, aggregate_type, aggregate_id, sequence FROM events ORDER BY position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let log: HashMap<String, (String, String, i64)> = log
        .into_iter()
        .map(|(id, t, a, s)| (id.to_string(), (t, a, s)))
        .collect();

    // A separate consumer reads the run's topics from the start.
    let topics: Vec<String> = ["order", "inventory", "payment"]
        .iter()
        .map(|t| format!("{prefix}.{t}"))
        .collect();
    let expected = log.len();
    let received = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("broker.address.family", "v4")
            .set("group.id", format!("{prefix}-reader"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).unwrap();
        let mut received: Vec<(String, String, HashMap<String, String>)> = Vec::new();
        let started = Instant::now();
        let mut ids = HashSet::new();
        while ids.len() < expected && started.elapsed() < Duration::from_secs(60) {
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = message.unwrap();
            let headers: HashMap<String, String> = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            let value = h.value.map(|v| String::from_utf8_lossy(v).into_owned());
                            (h.key.to_owned(), value.unwrap_or_default())
                        })
                        .collect()
                })
                .unwrap_or_default();
            ids.insert(headers["ce_id"].clone());
            let key = String::from_utf8_lossy(message.key().unwrap()).into_owned();
            received.push((message.topic().to_owned(), key, headers));
        }
        received
    })
    .await
    .unwrap();

    let mut seen = HashSet::new();
    let mut last: HashMap<(String, String), i64> = HashMap::new();
    for (topic, key, headers) in &received {
        let id = &headers["ce_id"];
        if !seen.insert(id.clone()) {
            continue;
        }
        let (aggregate_type, aggregate_id, sequence) = &log[id];
        assert!(topic.ends_with(&format!(".{aggregate_type}")), "{topic}");
        assert_eq!(key, aggregate_id);
        assert_eq!(&headers["ce_sequence"], &sequence.to_string());
        let before = last.insert((aggregate_type.clone(), aggregate_id.clone()), *sequence);
        assert_eq!(
            before.unwrap_or(0) + 1,
            *sequence,
            "{aggregate_type} {aggregate_id}"
        );
    }
    assert_eq!(seen.len(), log.len(), "every event of the run arrived");
    // Every order was placed and then confirmed (20) or rejected (10): the run went through
    // the saga, and the saga's events were published too.
    let order_events = log.values().filter(|(t, _, _)| t == "order").count();
    assert_eq!(order_events, ORDERS * 2);
    pool.close().await;
    drop_database(&database).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notifications_part_mails_a_confirmed_order_from_the_topics_and_stops_on_sigterm() {
    let (database, url) = fresh_database("orderline_notify").await;
    let prefix = format!("orderline-test-{}", uuid::Uuid::new_v4().simple());
    let brokers = brokers();
    let (smtp_port, received) = testkit::smtp::sink().await;
    let smtp_port = smtp_port.to_string();
    let kafka = [
        ("ORDERLINE_KAFKA_BROKERS", brokers.as_str()),
        ("ORDERLINE_KAFKA_TOPIC_PREFIX", prefix.as_str()),
        ("ORDERLINE_KAFKA_PARTITIONS", "1"),
    ];
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = orderline(&url, port, &["serve"], &kafka);
    let client = reqwest::Client::new();
    wait_ready(&client, &base).await;
    let mut notify_env = kafka.to_vec();
    notify_env.extend([
        ("ORDERLINE_NOTIFY_SMTP_HOST", "127.0.0.1"),
        ("ORDERLINE_NOTIFY_SMTP_PORT", smtp_port.as_str()),
        ("ORDERLINE_NOTIFY_CUSTOMER_DOMAIN", "customers.example"),
    ]);
    // Its own process, as an integrator would run it, with no HTTP listener.
    let mut notifications = orderline(
        &url,
        free_port(),
        &["serve", "--only", "notifications"],
        &notify_env,
    );
    let ops = support::token("ops", Role::Admin);
    register_product(&client, &base, &ops, "A", 100, 20).await;
    let order = place_order(
        &client,
        &base,
        &support::token("ana", Role::Customer),
        &[("A", 1)],
        "tok_visa",
    )
    .await;
    let subject = format!("Your order {} is confirmed", &order[..8]);
    until("the confirmation is mailed", async || {
        received
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.contains("To: ana@customers.example") && m.contains(&subject))
    })
    .await;

    let terminated = std::process::Command::new("kill")
        .args(["-TERM", &notifications.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let mut status = None;
    until("the notifications part exits after SIGTERM", async || {
        status = notifications.try_wait().unwrap();
        status.is_some()
    })
    .await;
    let status = status.unwrap();
    assert!(
        status.success(),
        "serve --only notifications exited with {status}"
    );
    server.kill().unwrap();
    server.wait().unwrap();
    drop_database(&database).await;
}
