//! A Kafka consumer for integrators that applies each orderline event once.
//!
//! For every message, in order: begin a transaction, record `(consumer, ce_id)` in `inbox`,
//! run the handler in the same transaction if the id is new, commit, and only then commit the
//! message's offset. A crash anywhere redelivers the message, and the inbox turns the repeat
//! into a no-op. A handler error rolls everything back and the same message is tried again with
//! back-off; the offset does not move past it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::ClientConfig;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// One orderline event as read from Kafka.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingEvent {
    /// `ce_id`: the event id, the same on every redelivery.
    pub id: Uuid,
    /// `order`, `inventory` or `payment` (from `ce_source`'s topic).
    pub aggregate_type: String,
    /// The message key: the aggregate id.
    pub aggregate_id: String,
    /// The event's name, e.g. `OrderConfirmed` (from `ce_type`).
    pub event_type: String,
    /// `ce_sequence`: 1, 2, 3, ... within the aggregate.
    pub sequence: i64,
    /// The event's JSON.
    pub payload: Value,
}

impl IncomingEvent {
    /// Reads a relay message; `None` if it is not an orderline CloudEvent.
    pub fn parse(message: &BorrowedMessage<'_>) -> Option<Self> {
        let headers: HashMap<&str, String> = message
            .headers()?
            .iter()
            .filter_map(|h| Some((h.key, String::from_utf8_lossy(h.value?).into_owned())))
            .collect();
        // ce_type is orderline.{aggregate}.{Event}.v{n}
        let mut kind = headers.get("ce_type")?.split('.');
        let (_, aggregate_type, event_type) = (kind.next()?, kind.next()?, kind.next()?);
        Some(Self {
            id: Uuid::parse_str(headers.get("ce_id")?).ok()?,
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: headers.get("ce_subject")?.clone(),
            event_type: event_type.to_owned(),
            sequence: headers.get("ce_sequence")?.parse().ok()?,
            payload: serde_json::from_slice(message.payload()?).ok()?,
        })
    }
}

/// The error a handler reports; the message is tried again.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// What an integrator does with each event.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Unique name: the inbox key and the consumer group id.
    fn name(&self) -> &str;

    /// Applies `event` using `tx`, the transaction that records it in the inbox. Called once
    /// per event id, however often Kafka delivers it.
    async fn handle(
        &self,
        tx: &mut PgConnection,
        event: &IncomingEvent,
    ) -> Result<(), HandlerError>;
}

/// Where and what to consume.
#[derive(Debug, Clone)]
pub struct InboxConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// Topics to read, e.g. `orderline.order`.
    pub topics: Vec<String>,
    /// Longest back-off between tries of a failing message.
    pub max_backoff: Duration,
    /// The consumer group; `None` uses the handler's name. A new group reads everything again
    /// (the inbox makes that harmless).
    pub group_id: Option<String>,
}

impl InboxConfig {
    /// Reads `topics` from `brokers`, in the handler's group, backing off up to 30 s.
    pub fn new(brokers: impl Into<String>, topics: Vec<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topics,
            max_backoff: Duration::from_secs(30),
            group_id: None,
        }
    }
}

/// A running inbox consumer; [`InboxConsumer::stop`] ends it after the current message.
pub struct InboxConsumer {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl InboxConsumer {
    /// Joins the consumer group named after the handler and starts handling messages.
    ///
    /// # Errors
    /// When the Kafka client cannot be created or cannot subscribe.
    pub fn spawn(
        pool: PgPool,
        config: &InboxConfig,
        handler: Arc<dyn Handler>,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set(
                "group.id",
                config.group_id.as_deref().unwrap_or(handler.name()),
            )
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            // A subscribed topic that does not exist yet (the relay creates the topics on its
            // first publish) is looked for again at each metadata refresh: every 10 s, not
            // librdkafka's default of 5 minutes.
            .set("topic.metadata.refresh.interval.ms", "10000");
        if config.brokers.contains("127.0.0.1") {
            client.set("broker.address.family", "v4");
        }
        let consumer: StreamConsumer = client.create()?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let (stop, stopped) = watch::channel(false);
        let max_backoff = config.max_backoff;
        let task = tokio::spawn(run(pool, consumer, handler, stopped, max_backoff));
        Ok(Self { task, stop })
    }

    /// Stops at once, in the middle of whatever it does, as a crash would: a message being
    /// handled is rolled back, an offset not yet committed stays uncommitted, and the group
    /// gives this member's partitions to the others, which read the uncommitted messages again
    /// (the inbox makes a repeat a no-op). For tests of takeovers.
    pub fn abort(self) {
        self.task.abort();
    }

    /// Stops after the message in hand and waits; its offset is committed if it was handled.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "an inbox consumer failed");
        }
    }
}

async fn run(
    pool: PgPool,
    consumer: StreamConsumer,
    handler: Arc<dyn Handler>,
    mut stopped: watch::Receiver<bool>,
    max_backoff: Duration,
) {
    let name = handler.name().to_owned();
    while !*stopped.borrow() {
        let message = tokio::select! {
            message = consumer.recv() => message,
            _ = stopped.changed() => break,
        };
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(consumer = %name, error = %e, "cannot read from Kafka");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let Some(event) = IncomingEvent::parse(&message) else {
            tracing::warn!(consumer = %name, topic = message.topic(), offset = message.offset(), "not an orderline event; skipped");
            commit(&consumer, &message, &name);
            continue;
        };
        let mut failures = 0u32;
        loop {
            match handle_once(&pool, handler.as_ref(), &event).await {
                Ok(()) => break,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(consumer = %name, event_id = %event.id, attempt = failures, error = %e, "handler failed; retrying");
                    let backoff = Duration::from_millis(100 << failures.min(10)).min(max_backoff);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stopped.changed() => return,
                    }
                }
            }
        }
        commit(&consumer, &message, &name);
    }
}

fn commit(consumer: &StreamConsumer, message: &BorrowedMessage<'_>, name: &str) {
    // A lost commit only redelivers; the inbox absorbs it.
    if let Err(e) = consumer.commit_message(message, CommitMode::Sync) {
        tracing::warn!(consumer = name, error = %e, "cannot commit the offset");
    }
}

/// Records the event in the inbox and runs the handler, in one transaction.
async fn handle_once(
    pool: &PgPool,
    handler: &dyn Handler,
    event: &IncomingEvent,
) -> Result<(), HandlerError> {
    let mut tx = pool.begin().await?;
    let first = sqlx::query(
        "INSERT INTO inbox (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(handler.name())
    .bind(event.id)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if first {
        handler.handle(&mut tx, event).await?;
    }
    tx.commit().await?;
    Ok(())
}
