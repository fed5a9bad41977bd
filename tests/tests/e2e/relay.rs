//! The Kafka relay against Apache Kafka (the broker `scripts/ensure-kafka` starts, topics of
//! the test's own, created by the relay): every event arrives keyed and in order with its
//! CloudEvents headers; a relay that dies between publishing and its checkpoint republishes,
//! never loses; of two relays on one database only one publishes. Against librdkafka's mock
//! cluster, for the faults a broker does not give on demand: a broker outage blocks no command
//! and loses no event, and an outage longer than the message timeout heals without a restart.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_log::subscription::{Consumer, ConsumerError, RunnerConfig, Subscriptions, Transient};
use event_log::LogEvent;
use kafka_relay::{KafkaRelay, RelayConfig, AGGREGATE_TYPES};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::ClientConfig;
use serde_json::Value;
use testkit::TestApp;
use uuid::Uuid;

/// One message as read back from Kafka.
#[derive(Debug, Clone)]
struct Received {
    topic: String,
    key: String,
    headers: HashMap<String, String>,
    value: Value,
}

fn mock_cluster() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let mock = MockCluster::new(1).unwrap();
    for aggregate_type in AGGREGATE_TYPES {
        mock.create_topic(&format!("orderline.{aggregate_type}"), 3, 1)
            .unwrap();
    }
    mock
}

/// Where a test's relay publishes: the servers and the topics' prefix.
#[derive(Debug, Clone)]
struct Target {
    brokers: String,
    prefix: String,
    /// Apache Kafka: the relay creates the topics. The mock cluster does not support the admin
    /// API; its topics are made by [`mock_cluster`].
    create_topics: bool,
}

impl Target {
    /// Topics of this test's own on the Apache Kafka broker of the test run.
    fn kafka() -> Self {
        Self {
            brokers: std::env::var("ORDERLINE_TEST_KAFKA_BROKERS").expect(
                "ORDERLINE_TEST_KAFKA_BROKERS: run the tests with scripts/test, which starts Kafka",
            ),
            prefix: format!("relay-test-{}", Uuid::new_v4().simple()),
            create_topics: true,
        }
    }

    fn mock(mock: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>) -> Self {
        Self {
            brokers: mock.bootstrap_servers(),
            prefix: "orderline".into(),
            create_topics: false,
        }
    }

    fn topic(&self, aggregate_type: &str) -> String {
        format!("{}.{aggregate_type}", self.prefix)
    }
}

fn relay_config(target: &Target) -> RelayConfig {
    RelayConfig {
        topic_prefix: target.prefix.clone(),
        partitions: 3,
        create_topics: target.create_topics,
        message_timeout: Duration::from_secs(2),
        ..RelayConfig::new(&target.brokers)
    }
}

fn runner() -> RunnerConfig {
    RunnerConfig {
        poll_interval: Duration::from_millis(100),
        lease_retry: Duration::from_millis(200),
        ..RunnerConfig::default()
    }
}

/// Reads every topic from the start until `count` distinct events (by `ce_id`) arrived, or
/// nothing more came for 3 s after the first, or 30 s passed. Duplicates (a page published
/// again) do not count towards `count`, or the reading would stop before the last events.
fn read_all(target: &Target, count: usize) -> Vec<Received> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &target.brokers)
        .set("broker.address.family", "v4")
        .set("group.id", format!("test-{}", Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let topics: Vec<String> = AGGREGATE_TYPES.iter().map(|t| target.topic(t)).collect();
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).unwrap();
    let mut received = Vec::new();
    let mut distinct = HashSet::new();
    let started = Instant::now();
    let mut last = Instant::now();
    while distinct.len() < count && started.elapsed() < Duration::from_secs(30) {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            if !received.is_empty() && last.elapsed() > Duration::from_secs(3) {
                break;
            }
            continue;
        };
        last = Instant::now();
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
        if let Some(id) = headers.get("ce_id") {
            distinct.insert(id.clone());
        }
        received.push(Received {
            topic: message.topic().to_owned(),
            key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
            headers,
            value: serde_json::from_slice(message.payload().unwrap_or_default()).unwrap(),
        });
    }
    received
}

/// Every event of the log, by event id.
async fn log_events(app: &TestApp) -> BTreeMap<String, (String, String, i64, Value, String)> {
    let rows: Vec<(Uuid, String, String, i64, Value, String)> = sqlx::query_as(
        "SELECT event_id, aggregate_type, aggregate_id, sequence, payload,
                'orderline.' || aggregate_type || '.' || event_type || '.v' || event_version
           FROM events",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, t, a, s, p, kind)| (id.to_string(), (t, a, s, p, kind)))
        .collect()
}

/// Orders, cancellations and restocks: events of every aggregate type.
async fn some_business(app: &TestApp, orders: usize) {
    app.register_product("A", 100, 1000).await;
    app.register_product("B", 250, 1000).await;
    for i in 0..orders {
        let id = app
            .placed_order(&format!("c{}", i % 3), &[("A", 1), ("B", 2)])
            .await;
        if i % 4 == 0 {
            let path = format!("/api/v1/orders/{id}/cancel");
            app.post(&path, Some(&app.admin()), &serde_json::json!({}), &[])
                .await;
        }
        if i % 5 == 0 {
            app.restock("A", 3).await;
        }
    }
    app.caught_up().await;
}

/// Checks what Kafka holds against the log: every event there, deduplicated by `ce_id`, on its
/// aggregate type's topic, keyed by aggregate id, in sequence order per aggregate, with its
/// headers and payload.
fn assert_published(
    target: &Target,
    received: &[Received],
    log: &BTreeMap<String, (String, String, i64, Value, String)>,
) {
    let mut seen = HashSet::new();
    let mut last_sequence: HashMap<(String, String), i64> = HashMap::new();
    for message in received {
        let id = &message.headers["ce_id"];
        if !seen.insert(id.clone()) {
            continue;
        }
        let (aggregate_type, aggregate_id, sequence, payload, kind) = &log[id];
        assert_eq!(message.topic, target.topic(aggregate_type));
        assert_eq!(&message.key, aggregate_id);
        assert_eq!(&message.value, payload);
        assert_eq!(message.headers["ce_specversion"], "1.0");
        assert_eq!(&message.headers["ce_subject"], aggregate_id);
        assert_eq!(message.headers["ce_sequence"], sequence.to_string());
        assert_eq!(&message.headers["ce_type"], kind);
        assert!(message.headers.contains_key("ce_time"));
        assert!(message.headers.contains_key("ce_source"));
        assert!(message.headers.contains_key("ce_correlationid"));
        assert!(message.headers.contains_key("ce_causationid"));
        let stream = (aggregate_type.clone(), aggregate_id.clone());
        let previous = last_sequence.insert(stream, *sequence);
        assert_eq!(
            previous.unwrap_or(0) + 1,
            *sequence,
            "{aggregate_id}: out of order or missing"
        );
    }
    let missing: Vec<&String> = log.keys().filter(|id| !seen.contains(*id)).collect();
    assert!(missing.is_empty(), "{} events never arrived", missing.len());
}

/// Reads Kafka back and checks it against the whole log ([`assert_published`]).
async fn assert_kafka_holds_the_log(app: &TestApp, target: &Target) {
    let log = log_events(app).await;
    let count = log.len();
    let reading = target.clone();
    let received = tokio::task::spawn_blocking(move || read_all(&reading, count))
        .await
        .unwrap();
    assert_published(target, &received, &log);
}

async fn relay_checkpoint_reaches_the_head(app: &TestApp) {
    for _ in 0..600 {
        let behind: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM checkpoints c, events e WHERE c.consumer = 'kafka-relay'
                AND (e.transaction_id, e.position) > (c.transaction_id, c.position))
                OR NOT EXISTS (SELECT 1 FROM checkpoints WHERE consumer = 'kafka-relay')",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if !behind {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows: Option<String> = sqlx::query_scalar(
        "SELECT string_agg(format('%s@%s %s %s %s', partition, position, owner, state, last_error), '; ')
           FROM checkpoints WHERE consumer = 'kafka-relay'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    panic!("the relay did not catch up: {rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_arrives_keyed_in_order_with_its_cloudevents_headers() {
    let app = TestApp::spawn().await;
    some_business(&app, 12).await;
    let target = Target::kafka();
    let relay = KafkaRelay::new(relay_config(&target)).unwrap();
    let relays = Subscriptions::spawn(&app.pool, vec![Arc::new(relay)], &runner());
    relay_checkpoint_reaches_the_head(&app).await;
    relays.shutdown().await;
    let log = log_events(&app).await;
    let count = log.len() + 1;
    let reading = target.clone();
    let received = tokio::task::spawn_blocking(move || read_all(&reading, count))
        .await
        .unwrap();
    assert_eq!(received.len(), log.len(), "one message per event");
    assert_published(&target, &received, &log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_blocks_no_command_and_loses_no_event() {
    let app = TestApp::spawn().await;
    let mock = mock_cluster();
    let target = Target::mock(&mock);
    mock.broker_down(1).unwrap();
    let relay = KafkaRelay::new(relay_config(&target)).unwrap();
    let relays = Subscriptions::spawn(&app.pool, vec![Arc::new(relay)], &runner());
    // Commands go on while the broker is down.
    some_business(&app, 8).await;
    // The relay trails the log and says why.
    let mut error = None;
    for _ in 0..100 {
        error = sqlx::query_scalar::<_, Option<String>>(
            "SELECT last_error FROM checkpoints
              WHERE consumer = 'kafka-relay' AND last_error IS NOT NULL LIMIT 1",
        )
        .fetch_optional(&app.pool)
        .await
        .unwrap()
        .flatten();
        if error.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(error.is_some(), "the relay's error is not visible");
    let parked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM parked_keys WHERE consumer = 'kafka-relay'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(parked, 0, "an outage must not park the relay's keys");
    mock.broker_up(1).unwrap();
    relay_checkpoint_reaches_the_head(&app).await;
    relays.shutdown().await;
    assert_kafka_holds_the_log(&app, &target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_longer_than_the_message_timeout_heals_without_a_restart() {
    let app = TestApp::spawn().await;
    let mock = mock_cluster();
    let target = Target::mock(&mock);
    let relay = KafkaRelay::new(RelayConfig {
        message_timeout: Duration::from_millis(500),
        ..relay_config(&target)
    })
    .unwrap();
    let relays = Subscriptions::spawn(&app.pool, vec![Arc::new(relay)], &runner());
    some_business(&app, 2).await;
    relay_checkpoint_reaches_the_head(&app).await;
    // The broker answers slower than the message timeout, so messages in flight time out; when
    // it answers again it refuses the producer's sequence, an error librdkafka's idempotent
    // producer cannot recover from (a fatal error on that producer instance), as brokers answer
    // a producer whose session was lost in a long outage.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER; 3],
    );
    mock.broker_round_trip_time(1, Duration::from_secs(3))
        .unwrap();
    some_business(&app, 4).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    mock.broker_round_trip_time(1, Duration::ZERO).unwrap();
    relay_checkpoint_reaches_the_head(&app).await;
    relays.shutdown().await;
    assert_kafka_holds_the_log(&app, &target).await;
}

/// A relay whose first checkpoint never commits: it publishes, then "dies".
struct DiesBeforeFirstCheckpoint {
    relay: KafkaRelay,
    died: AtomicBool,
}

#[async_trait::async_trait]
impl Consumer for DiesBeforeFirstCheckpoint {
    fn name(&self) -> &str {
        self.relay.name()
    }

    async fn apply(
        &self,
        tx: &mut sqlx::PgConnection,
        events: &[LogEvent],
    ) -> Result<(), ConsumerError> {
        if !self.died.swap(true, Ordering::SeqCst) {
            return Err(Box::new(Transient("died before the checkpoint".into())));
        }
        self.relay.apply(tx, events).await
    }

    async fn deliver(&self, events: &[LogEvent]) -> Result<(), ConsumerError> {
        self.relay.deliver(events).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_dying_between_publish_and_checkpoint_republishes_and_loses_nothing() {
    let app = TestApp::spawn().await;
    some_business(&app, 6).await;
    let target = Target::kafka();
    let relay = DiesBeforeFirstCheckpoint {
        relay: KafkaRelay::new(relay_config(&target)).unwrap(),
        died: AtomicBool::new(false),
    };
    let relays = Subscriptions::spawn(&app.pool, vec![Arc::new(relay)], &runner());
    relay_checkpoint_reaches_the_head(&app).await;
    relays.shutdown().await;
    let log = log_events(&app).await;
    // The first page went out twice: duplicates, then everything once more.
    let count = 2 * log.len();
    let reading = target.clone();
    let received = tokio::task::spawn_blocking(move || read_all(&reading, count))
        .await
        .unwrap();
    assert!(
        received.len() > log.len(),
        "the first page was not republished"
    );
    assert_published(&target, &received, &log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_two_relays_on_one_database_only_one_publishes() {
    let app = TestApp::spawn().await;
    let target = Target::kafka();
    let first = Subscriptions::spawn(
        &app.pool,
        vec![Arc::new(KafkaRelay::new(relay_config(&target)).unwrap())],
        &runner(),
    );
    let second = Subscriptions::spawn(
        &app.pool,
        vec![Arc::new(KafkaRelay::new(relay_config(&target)).unwrap())],
        &runner(),
    );
    some_business(&app, 8).await;
    relay_checkpoint_reaches_the_head(&app).await;
    first.shutdown().await;
    second.shutdown().await;
    let log = log_events(&app).await;
    // Ask for more than there should be: any duplicate would show.
    let count = log.len() + 1;
    let reading = target.clone();
    let received = tokio::task::spawn_blocking(move || read_all(&reading, count))
        .await
        .unwrap();
    assert_eq!(received.len(), log.len(), "an event was published twice");
    assert_published(&target, &received, &log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_creates_its_topics_with_the_configured_partitions_and_in_sync_replicas() {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;

    let app = TestApp::spawn().await;
    some_business(&app, 2).await;
    let target = Target::kafka();
    // Two in-sync replicas on a one-node broker: Kafka caps the minimum it enforces at the
    // replica count, so writes go through here; on a cluster they wait for two replicas.
    let relay = KafkaRelay::new(RelayConfig {
        min_insync_replicas: Some(2),
        ..relay_config(&target)
    })
    .unwrap();
    let relays = Subscriptions::spawn(&app.pool, vec![Arc::new(relay)], &runner());
    relay_checkpoint_reaches_the_head(&app).await;
    relays.shutdown().await;

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &target.brokers)
        .set("broker.address.family", "v4")
        .create()
        .unwrap();
    let topics: Vec<String> = AGGREGATE_TYPES.iter().map(|t| target.topic(t)).collect();
    let resources: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let configs = admin
        .describe_configs(
            &resources,
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    assert_eq!(configs.len(), AGGREGATE_TYPES.len());
    for config in configs {
        let config = config.unwrap();
        let min_insync = config
            .get("min.insync.replicas")
            .and_then(|e| e.value.clone());
        assert_eq!(min_insync.as_deref(), Some("2"), "{:?}", config.specifier);
    }
    let reader = target.clone();
    let partitions = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &reader.brokers)
            .set("broker.address.family", "v4")
            .create()
            .unwrap();
        let metadata = consumer
            .fetch_metadata(Some(&reader.topic("order")), Duration::from_secs(10))
            .unwrap();
        metadata.topics()[0].partitions().len()
    })
    .await
    .unwrap();
    assert_eq!(partitions, 3);
}

/// What happens to a partition leader of the cluster mid-run.
#[derive(Debug, Clone, Copy)]
enum BrokerFault {
    /// `kill -9`, then started again on its storage.
    Kill,
    /// `SIGSTOP` for longer than the cluster's session timeout, then `SIGCONT`.
    Freeze,
}

/// Orders flow while the leader of a partition of the order topic (on a three-node cluster,
/// topics replicated three times, two in-sync replicas required) is killed or frozen and then
/// brought back: every placement is accepted meanwhile, and afterwards Kafka holds every event
/// of the log, once or more, keyed, in sequence order per aggregate.
async fn orders_flow_through_a_broker_fault(fault: BrokerFault) {
    let mut cluster = testkit::kafka::Cluster::start(3).await;
    let app = TestApp::spawn().await;
    let target = Target {
        brokers: cluster.bootstrap(),
        prefix: format!("failover-test-{}", Uuid::new_v4().simple()),
        create_topics: true,
    };
    let relay = KafkaRelay::new(RelayConfig {
        replication: 3,
        min_insync_replicas: Some(2),
        message_timeout: Duration::from_secs(10),
        ..relay_config(&target)
    })
    .unwrap();
    let relays = Subscriptions::spawn(&app.pool, vec![Arc::new(relay)], &runner());
    app.register_product("A", 100, 100_000).await;
    app.register_product("B", 250, 100_000).await;
    relay_checkpoint_reaches_the_head(&app).await;
    let mut leader = None;
    for i in 0..90 {
        // Each placement must be accepted (202), the broker's state notwithstanding.
        app.placed_order(&format!("c{}", i % 7), &[("A", 1), ("B", 1)])
            .await;
        if i == 30 {
            let node = cluster.leader(&target.topic("order"), 0).await;
            match fault {
                BrokerFault::Kill => cluster.kill(node),
                BrokerFault::Freeze => cluster.freeze(node),
            }
            leader = Some(node);
        }
        if i == 60 {
            let node = leader.expect("a node was faulted");
            match fault {
                BrokerFault::Kill => cluster.restart(node).await,
                BrokerFault::Freeze => cluster.resume(node),
            }
        }
        // Slower while the node is down, so that it stays down (or frozen) for about seven
        // seconds: past the cluster's session timeout, so its partitions get new leaders.
        let pause = if (30..60).contains(&i) { 200 } else { 50 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    app.caught_up().await;
    relay_checkpoint_reaches_the_head(&app).await;
    relays.shutdown().await;
    assert_kafka_holds_the_log(&app, &target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_leader_killed_mid_run_loses_no_acknowledged_event() {
    orders_flow_through_a_broker_fault(BrokerFault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_leader_frozen_mid_run_loses_no_acknowledged_event() {
    orders_flow_through_a_broker_fault(BrokerFault::Freeze).await;
}

/// Orders and restocks of the products [`some_business`] registered.
async fn more_orders(app: &TestApp, orders: usize) {
    for i in 0..orders {
        app.placed_order(&format!("c{}", i % 3), &[("A", 1), ("B", 1)])
            .await;
        app.restock("A", 1).await;
    }
}

/// Whether an event of the log lies past its partition's cursor of the relay.
async fn relay_lags(app: &TestApp) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM checkpoints c, events e WHERE c.consumer = 'kafka-relay'
            AND e.key_hash & 15 = c.partition
            AND (e.transaction_id, e.position) > (c.transaction_id, c.position))",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_frozen_then_stopped_and_started_again_delays_the_relay_and_loses_nothing() {
    let mut cluster = testkit::kafka::Cluster::start(1).await;
    let app = TestApp::spawn().await;
    let target = Target {
        brokers: cluster.bootstrap(),
        prefix: format!("outage-test-{}", Uuid::new_v4().simple()),
        create_topics: true,
    };
    let relay = KafkaRelay::new(RelayConfig {
        message_timeout: Duration::from_secs(3),
        ..relay_config(&target)
    })
    .unwrap();
    let relays = Subscriptions::spawn(&app.pool, vec![Arc::new(relay)], &runner());
    some_business(&app, 3).await;
    relay_checkpoint_reaches_the_head(&app).await;

    // Frozen (SIGSTOP): commands go on, the relay falls behind.
    cluster.freeze(1);
    more_orders(&app, 4).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        relay_lags(&app).await,
        "the relay kept up with a frozen broker"
    );
    cluster.resume(1);
    relay_checkpoint_reaches_the_head(&app).await;

    // Stopped and started again on its storage.
    cluster.kill(1);
    more_orders(&app, 4).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        relay_lags(&app).await,
        "the relay kept up with a stopped broker"
    );
    cluster.restart(1).await;
    relay_checkpoint_reaches_the_head(&app).await;
    relays.shutdown().await;
    assert_kafka_holds_the_log(&app, &target).await;
}
