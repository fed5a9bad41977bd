//! The Kafka relay: the events table is the outbox, and this consumer of the global log
//! publishes every event to Kafka.
//!
//! - One topic per aggregate type: `{prefix}.order`, `{prefix}.inventory`, `{prefix}.payment`
//!   (prefix `orderline` by default), created on first use if missing.
//! - Keyed by aggregate id, so one aggregate's events share a partition and keep their order.
//! - A CloudEvents 1.0 event in Kafka binary mode: the value is the event's JSON; the headers
//!   are `ce_specversion`, `ce_id` (the event id), `ce_source`, `ce_type`
//!   (`orderline.order.OrderPlaced.v1`), `ce_time`, `ce_subject` (the aggregate id),
//!   `ce_correlationid`, `ce_causationid`, `ce_sequence` (in the aggregate) and `ce_position`
//!   (in the log), and `content-type`.
//! - The idempotent producer (`enable.idempotence=true`, `acks=all`): the broker writes each
//!   message once per producer session, in order.
//! - The checkpoint moves past a page only after the broker acknowledged every message of it
//!   ([`Consumer::deliver`]). Delivery is **at least once**: a relay that dies after publishing
//!   and before its checkpoint commits publishes those events again after the restart.
//!   Consumers dedupe by `ce_id`.
//! - A broker that is down never blocks commands: the relay's page fails as [`Transient`], the
//!   runner backs off and retries, and its lag shows in `GET /api/v1/admin/projections`.
//! - An outage longer than the message timeout leaves librdkafka's idempotent producer unable
//!   to go on: its timed-out messages make it reset its producer id, and a broker may answer
//!   that with a fencing error, which librdkafka treats as fatal for that producer instance.
//!   After a page fails, a producer with a fatal error (or one the broker fenced) is replaced
//!   by a new one, so the relay catches up when the broker is back, with no restart.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::Producer;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde_json::Value;
use tokio::sync::Mutex;

use event_log::subscription::{Consumer, ConsumerError, Transient};
use event_log::LogEvent;

/// The relay's consumer name: its checkpoint and lease.
pub const CONSUMER_NAME: &str = "kafka-relay";

/// Aggregate types the relay knows, and so the topics it creates.
pub const AGGREGATE_TYPES: [&str; 4] = ["order", "inventory", "payment", "consumer"];

/// How the relay reaches Kafka.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Bootstrap servers, comma-separated (`ORDERLINE_KAFKA_BROKERS`).
    pub brokers: String,
    /// Topic name prefix; topics are `{prefix}.{aggregate_type}`.
    pub topic_prefix: String,
    /// Partitions of the topics the relay creates.
    pub partitions: i32,
    /// Replication factor of the topics the relay creates.
    pub replication: i32,
    /// `min.insync.replicas` of the topics the relay creates (`None`: the broker's default).
    /// With `acks=all`, a message is acknowledged only once this many replicas hold it, so a
    /// replication factor of 3 and 2 here survive one broker lost without losing an
    /// acknowledged event.
    pub min_insync_replicas: Option<i32>,
    /// Whether to create missing topics (with the admin client) before the first publish.
    pub create_topics: bool,
    /// How long the producer keeps trying to deliver one message before the page fails.
    pub message_timeout: Duration,
}

impl RelayConfig {
    /// The defaults for `brokers`: prefix `orderline`, 6 partitions, replication 1 (the
    /// broker's `min.insync.replicas`), topics created, 30 s per message.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic_prefix: "orderline".into(),
            partitions: 6,
            replication: 1,
            min_insync_replicas: None,
            create_topics: true,
            message_timeout: Duration::from_secs(30),
        }
    }

    /// The topic of an aggregate type.
    pub fn topic(&self, aggregate_type: &str) -> String {
        format!("{}.{aggregate_type}", self.topic_prefix)
    }

    fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        if self.brokers.contains("127.0.0.1") || self.brokers.contains("localhost") {
            // librdkafka tries IPv6 first for localhost and waits on it.
            config.set("broker.address.family", "v4");
        }
        config
    }
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot create the Kafka producer: {0}")]
pub struct RelayError(#[from] KafkaError);

/// The relay: a log consumer that publishes (see the module doc).
pub struct KafkaRelay {
    config: RelayConfig,
    /// The producer in use; replaced when it can no longer deliver ([`KafkaRelay::renew`]).
    producer: std::sync::Mutex<FutureProducer>,
    /// Whether the topics are known to exist; checked again after a failure.
    topics_ready: Mutex<bool>,
}

impl KafkaRelay {
    /// A relay publishing with `config`. Connects lazily: a broker that is down now is no error.
    ///
    /// # Errors
    /// [`RelayError`] when the producer configuration is refused.
    pub fn new(config: RelayConfig) -> Result<Self, RelayError> {
        Ok(Self {
            producer: std::sync::Mutex::new(Self::producer_for(&config)?),
            config,
            topics_ready: Mutex::new(false),
        })
    }

    fn producer_for(config: &RelayConfig) -> Result<FutureProducer, KafkaError> {
        config
            .client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .set(
                "message.timeout.ms",
                config.message_timeout.as_millis().to_string(),
            )
            .create()
    }

    /// The producer in use (a cheap handle on it).
    fn current(&self) -> FutureProducer {
        self.producer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// After a failed page: replaces `used` with a new producer if it cannot deliver again,
    /// because librdkafka raised a fatal error on it or the broker fenced it. A transient
    /// failure (broker down) keeps the producer, which reconnects by itself.
    fn renew(&self, used: &FutureProducer, failure: Option<RDKafkaErrorCode>) {
        let fatal = used.client().fatal_error();
        let fenced = matches!(
            failure,
            Some(
                RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::UnknownProducerId
                    | RDKafkaErrorCode::OutOfOrderSequenceNumber
                    | RDKafkaErrorCode::Fatal
            )
        );
        if fatal.is_none() && !fenced {
            return;
        }
        match Self::producer_for(&self.config) {
            Ok(fresh) => {
                tracing::warn!(
                    ?fatal,
                    ?failure,
                    "the Kafka producer cannot go on; replaced it"
                );
                *self
                    .producer
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
            }
            Err(e) => tracing::error!(error = %e, "cannot replace the Kafka producer"),
        }
    }

    /// Publishes `events` with `producer` and waits for every acknowledgement.
    async fn publish(&self, producer: &FutureProducer, events: &[LogEvent]) -> Result<(), Failure> {
        let topics: Vec<String> = events
            .iter()
            .map(|e| self.config.topic(&e.aggregate_type))
            .collect();
        let mut pending: Vec<DeliveryFuture> = Vec::with_capacity(events.len());
        for (event, topic) in events.iter().zip(&topics) {
            let mut record = FutureRecord::to(topic)
                .key(event.aggregate_id.as_str())
                .payload(event.payload.get())
                .headers(headers(event));
            // Enqueue in log order; a full local queue waits for what is in flight, so the
            // order within each partition is the log's.
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        await_all(std::mem::take(&mut pending)).await?;
                    }
                    Err((e, _)) => return Err(Failure::from_kafka("publishing", &e)),
                }
            }
        }
        await_all(pending).await
    }

    /// Creates the relay's topics if they are missing.
    async fn ensure_topics(&self) -> Result<(), ConsumerError> {
        let mut ready = self.topics_ready.lock().await;
        if *ready || !self.config.create_topics {
            return Ok(());
        }
        let admin: AdminClient<DefaultClientContext> = self
            .config
            .client()
            .create()
            .map_err(|e| Transient(format!("admin client: {e}")))?;
        let names: Vec<String> = AGGREGATE_TYPES
            .iter()
            .map(|t| self.config.topic(t))
            .collect();
        let min_insync = self.config.min_insync_replicas.map(|n| n.to_string());
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|name| {
                let topic = NewTopic::new(
                    name,
                    self.config.partitions,
                    TopicReplication::Fixed(self.config.replication),
                );
                match &min_insync {
                    Some(n) => topic.set("min.insync.replicas", n),
                    None => topic,
                }
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics(&topics, &options)
            .await
            .map_err(|e| Transient(format!("creating topics: {e}")))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(Box::new(Transient(format!(
                        "creating topic {topic}: {code}"
                    ))))
                }
            }
        }
        tracing::info!(topics = ?names, "Kafka topics are ready");
        *ready = true;
        Ok(())
    }
}

/// The CloudEvents headers of an event (binary content mode).
pub fn headers(event: &LogEvent) -> OwnedHeaders {
    let metadata: Value = serde_json::from_str(event.metadata.get()).unwrap_or(Value::Null);
    let text = |key: &str| metadata.get(key).and_then(Value::as_str).map(str::to_owned);
    let id = event.event_id.to_string();
    let source = format!("urn:orderline:{}", event.aggregate_type);
    let kind = format!(
        "orderline.{}.{}.v{}",
        event.aggregate_type, event.event_type, event.event_version
    );
    let time = event.recorded_at.to_rfc3339();
    let sequence = event.sequence.to_string();
    let position = event.position.to_string();
    let mut headers = OwnedHeaders::new();
    let mut fields: Vec<(&str, String)> = vec![
        ("ce_specversion", "1.0".into()),
        ("ce_id", id),
        ("ce_source", source),
        ("ce_type", kind),
        ("ce_time", time),
        ("ce_subject", event.aggregate_id.clone()),
        ("ce_sequence", sequence),
        ("ce_position", position),
        ("content-type", "application/json".into()),
    ];
    if let Some(correlation) = text("correlation_id") {
        fields.push(("ce_correlationid", correlation));
    }
    if let Some(causation) = text("causation_id") {
        fields.push(("ce_causationid", causation));
    }
    for (key, value) in &fields {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_str()),
        });
    }
    headers
}

#[async_trait::async_trait]
impl Consumer for KafkaRelay {
    fn name(&self) -> &str {
        CONSUMER_NAME
    }

    fn kind(&self) -> &str {
        "relay"
    }

    /// Nothing to write in Postgres: the checkpoint is the relay's only state.
    async fn apply(
        &self,
        _tx: &mut sqlx::PgConnection,
        _events: &[LogEvent],
    ) -> Result<(), ConsumerError> {
        Ok(())
    }

    async fn deliver(&self, events: &[LogEvent]) -> Result<(), ConsumerError> {
        self.ensure_topics().await?;
        let producer = self.current();
        match self.publish(&producer, events).await {
            Ok(()) => Ok(()),
            Err(failure) => {
                self.renew(&producer, failure.code);
                Err(Box::new(Transient(failure.message)))
            }
        }
    }
}

/// Why a page could not be published: the text shown in the checkpoint and, where Kafka gave
/// one, its error code (which tells whether the producer can go on).
struct Failure {
    message: String,
    code: Option<RDKafkaErrorCode>,
}

impl Failure {
    fn from_kafka(doing: &str, error: &KafkaError) -> Self {
        Self {
            message: format!("{doing}: {error}"),
            code: error.rdkafka_error_code(),
        }
    }
}

/// Waits until the broker acknowledged every message, or one failed.
async fn await_all(pending: Vec<DeliveryFuture>) -> Result<(), Failure> {
    for delivery in futures::future::join_all(pending).await {
        match delivery {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(Failure::from_kafka("delivery", &e)),
            Err(_) => {
                return Err(Failure {
                    message: "the producer went away".into(),
                    code: None,
                })
            }
        }
    }
    Ok(())
}
