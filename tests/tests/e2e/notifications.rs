//! The notifications integrator end to end: orders through the saga, the relay publishing to
//! Apache Kafka (topics and consumer groups of the test's own), the integrator consuming (stopped and restarted mid-stream, then made to
//! read everything again), and an SMTP sink started here receiving exactly one message per
//! notifying event.

use std::sync::Arc;
use std::time::Duration;

use event_log::subscription::{RunnerConfig, Subscriptions};
use integrations::inbox::{InboxConfig, InboxConsumer};
use integrations::notifications::{
    Notification, NotificationsHandler, Notifier, NotifyError, Sender, SenderConfig, SmtpConfig,
    SmtpNotifier,
};
use kafka_relay::{KafkaRelay, RelayConfig};
use serde_json::json;
use testkit::process::until;
use testkit::smtp::sink as smtp_sink;
use testkit::{json_body, TestApp};

async fn cancel(app: &TestApp, id: &str) {
    let path = format!("/api/v1/orders/{id}/cancel");
    app.post(&path, Some(&app.admin()), &json!({}), &[]).await;
}

async fn ship(app: &TestApp, id: &str) {
    let path = format!("/api/v1/orders/{id}/ship");
    app.post(&path, Some(&app.admin()), &json!({"carrier": "DHL"}), &[])
        .await;
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pool).await.unwrap()
}

/// Starts the relay publishing `app`'s log to topics `{prefix}.*` of `partitions` partitions on
/// `brokers`, and waits for its first page. The relay creates the topics before its first page;
/// the integrators must subscribe after (a consumer subscribed to a topic that does not exist
/// yet sees it only at its next metadata refresh).
async fn relay_publishing(
    app: &TestApp,
    brokers: &str,
    prefix: &str,
    partitions: i32,
) -> Subscriptions {
    let relay = KafkaRelay::new(RelayConfig {
        topic_prefix: prefix.to_owned(),
        partitions,
        ..RelayConfig::new(brokers)
    })
    .unwrap();
    let relays = Subscriptions::spawn(&app.pool, vec![Arc::new(relay)], &RunnerConfig::default());
    until("the relay published", async || {
        count(
            app,
            "SELECT coalesce(sum(events_applied), 0)::bigint FROM checkpoints
              WHERE consumer = 'kafka-relay'",
        )
        .await
            > 0
    })
    .await;
    relays
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_order_outcome_and_low_stock_sends_exactly_one_message_across_restarts() {
    let app = TestApp::spawn().await;
    // Threshold 2: the fourth unit reserved crosses it.
    app.register_product("A", 500, 5).await;
    let mut orders = Vec::new();
    for token in ["tok_visa", "tok_declined", "tok_visa", "tok_visa"] {
        let response = app
            .place_order_paying("ana@example.com", &[("A", 1)], token)
            .await;
        orders.push(
            json_body(response).await["order_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    app.caught_up().await;
    cancel(&app, &orders[2]).await;
    ship(&app, &orders[3]).await;
    app.caught_up().await;
    // Notifying events: 3 confirmed, 1 rejected, 1 cancelled, 1 shipped, and low stock.
    let expected = count(
        &app,
        "SELECT count(*) FROM events WHERE event_type IN ('OrderConfirmed', 'OrderRejected',
            'OrderCancelled', 'OrderShipped', 'LowStockReached')",
    )
    .await;
    assert!(expected >= 7, "{expected}");

    let brokers = testkit::kafka::brokers();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let prefix = format!("notifications-test-{run}");
    let relays = relay_publishing(&app, &brokers, &prefix, 2).await;
    let topics = vec![format!("{prefix}.order"), format!("{prefix}.inventory")];
    let config = InboxConfig {
        group_id: Some(format!("notifications-{run}")),
        ..InboxConfig::new(&brokers, topics)
    };
    // The first consumer stops mid-stream; a second one in the same group takes over.
    let first =
        InboxConsumer::spawn(app.pool.clone(), &config, Arc::new(NotificationsHandler)).unwrap();
    until("some events handled", async || {
        count(&app, "SELECT count(*) FROM inbox").await >= 3
    })
    .await;
    first.stop().await;
    let second =
        InboxConsumer::spawn(app.pool.clone(), &config, Arc::new(NotificationsHandler)).unwrap();
    until("every notification recorded", async || {
        count(&app, "SELECT count(*) FROM notifications").await >= expected
    })
    .await;
    second.stop().await;
    // A consumer in a new group reads everything again: the inbox makes it a no-op.
    let replay = InboxConsumer::spawn(
        app.pool.clone(),
        &InboxConfig {
            group_id: Some(format!("notifications-replay-{run}")),
            ..config.clone()
        },
        Arc::new(NotificationsHandler),
    )
    .unwrap();
    let events = count(
        &app,
        "SELECT count(*) FROM events WHERE aggregate_type IN ('order', 'inventory')",
    )
    .await;
    until("the replay read everything", async || {
        // Each event is in the inbox once, however often it was delivered.
        count(&app, "SELECT count(*) FROM inbox").await >= events
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    replay.stop().await;
    relays.shutdown().await;
    assert_eq!(
        count(&app, "SELECT count(*) FROM notifications").await,
        expected
    );

    let (port, received) = smtp_sink().await;
    let sender = Sender::spawn(
        app.pool.clone(),
        Arc::new(SmtpNotifier::new(SmtpConfig {
            host: "127.0.0.1".into(),
            port,
            from: "orderline@example.com".into(),
            customer_domain: "customers.example".into(),
            operators: "ops@example.com".into(),
        })),
        SenderConfig {
            idle_poll: Duration::from_millis(50),
            ..SenderConfig::default()
        },
    );
    until("every notification sent", async || {
        count(
            &app,
            "SELECT count(*) FROM notifications WHERE state = 'sent'",
        )
        .await
            == expected
    })
    .await;
    sender.stop().await;
    let messages = received.lock().unwrap().clone();
    assert_eq!(i64::try_from(messages.len()).unwrap(), expected);
    let ids: std::collections::HashSet<String> = messages
        .iter()
        .filter_map(|m| {
            m.lines()
                .find(|l| l.to_lowercase().starts_with("message-id:"))
        })
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), messages.len(), "one message per event");
    let to_ana = messages
        .iter()
        .filter(|m| m.contains("To: ana@example.com"))
        .count();
    assert_eq!(to_ana, 6, "{messages:?}");
    assert!(messages
        .iter()
        .any(|m| m.contains("Low stock: A") && m.contains("To: ops@example.com")));
    assert!(messages
        .iter()
        .any(|m| m.contains("could not be accepted") && m.contains("payment_declined")));
}

/// A mail server that is always down.
struct Down;

#[async_trait::async_trait]
impl Notifier for Down {
    async fn send(&self, _: &Notification) -> Result<(), NotifyError> {
        Err(NotifyError("connection refused".into()))
    }
}

#[tokio::test]
async fn a_notification_that_keeps_failing_is_parked_with_its_error_and_can_be_retried() {
    let app = TestApp::spawn_without_sagas().await;
    let id = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO notifications (event_id, kind, recipient, subject, body)
         VALUES ($1, 'order_confirmed', 'customer:c1', 'Hello', 'World')",
    )
    .bind(id)
    .execute(&app.pool)
    .await
    .unwrap();
    let sender = Sender::spawn(
        app.pool.clone(),
        Arc::new(Down),
        SenderConfig {
            max_attempts: 3,
            retry_base: Duration::from_millis(10),
            idle_poll: Duration::from_millis(20),
            ..SenderConfig::default()
        },
    );
    until("parked", async || {
        count(
            &app,
            "SELECT count(*) FROM notifications WHERE state = 'parked'",
        )
        .await
            == 1
    })
    .await;
    sender.stop().await;
    let (attempts, error): (i32, String) =
        sqlx::query_as("SELECT attempts, last_error FROM notifications WHERE event_id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 3);
    assert!(error.contains("connection refused"));
    use integrations::notifications::Retried;
    let retry = || integrations::notifications::retry(&app.pool, id);
    assert_eq!(retry().await.unwrap(), Retried::Yes);
    assert_eq!(retry().await.unwrap(), Retried::NotParked);
}

/// The notifications handler, recording which member of the group handled each event (in the
/// handler's transaction, so only handlings that committed count).
struct Member {
    name: &'static str,
    inner: NotificationsHandler,
}

#[async_trait::async_trait]
impl integrations::inbox::Handler for Member {
    fn name(&self) -> &str {
        // The inbox and the group are the notifications integrator's, shared by both members.
        self.inner.name()
    }

    async fn handle(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &integrations::inbox::IncomingEvent,
    ) -> Result<(), integrations::inbox::HandlerError> {
        self.inner.handle(tx, event).await?;
        sqlx::query(
            "INSERT INTO handled_by (event_id, aggregate_id, event_type, member)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(event.id)
        .bind(&event.aggregate_id)
        .bind(&event.event_type)
        .bind(self.name)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_integrators_in_one_group_share_the_partitions_and_one_killed_mid_stream_loses_nothing()
{
    let app = TestApp::spawn().await;
    sqlx::raw_sql(
        "CREATE TABLE handled_by (event_id uuid NOT NULL, aggregate_id text NOT NULL,
                                  event_type text NOT NULL, member text NOT NULL)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    app.register_product("A", 500, 10_000).await;
    let brokers = testkit::kafka::brokers();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let prefix = format!("group-test-{run}");
    let relays = relay_publishing(&app, &brokers, &prefix, 4).await;
    let config = InboxConfig {
        group_id: Some(format!("notifications-{run}")),
        ..InboxConfig::new(&brokers, vec![format!("{prefix}.order")])
    };
    let member = |name| {
        InboxConsumer::spawn(
            app.pool.clone(),
            &config,
            Arc::new(Member {
                name,
                inner: NotificationsHandler,
            }),
        )
        .unwrap()
    };
    let first = member("first");
    let second = member("second");
    // Orders keep coming while the group forms, so both members get partitions with work.
    let mut orders = Vec::new();
    for i in 0..40 {
        orders.push(app.placed_order(&format!("c{}", i % 5), &[("A", 1)]).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every order confirmed, so that each can be shipped below.
    app.caught_up().await;
    until("both members handled confirmations", async || {
        count(&app, "SELECT count(DISTINCT member) FROM handled_by").await == 2
    })
    .await;
    // The first member dies mid-stream; the orders it confirmed are shipped afterwards, so
    // their shipments land on the partitions it held.
    first.abort();
    for id in &orders {
        ship(&app, id).await;
    }
    app.caught_up().await;
    let expected = count(
        &app,
        "SELECT count(*) FROM events WHERE event_type IN ('OrderConfirmed', 'OrderShipped')",
    )
    .await;
    assert_eq!(expected, 80);
    until("every notification recorded", async || {
        count(&app, "SELECT count(*) FROM notifications").await >= expected
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    second.stop().await;
    relays.shutdown().await;
    assert_eq!(
        count(&app, "SELECT count(*) FROM notifications").await,
        expected,
        "a notification twice, or one lost"
    );
    // Every event of the topic handled once (each committed handling is recorded once).
    let order_events = count(
        &app,
        "SELECT count(*) FROM events WHERE aggregate_type = 'order'",
    )
    .await;
    assert_eq!(
        count(&app, "SELECT count(*) FROM handled_by").await,
        order_events,
        "an event handled twice, or one not at all"
    );
    assert_eq!(
        count(&app, "SELECT count(DISTINCT event_id) FROM handled_by").await,
        order_events
    );
    // The second member took over the first one's partitions: it handled the shipments of
    // orders whose confirmations the first one had handled.
    let taken_over = count(
        &app,
        "SELECT count(*) FROM handled_by c JOIN handled_by s USING (aggregate_id)
          WHERE c.event_type = 'OrderConfirmed' AND c.member = 'first'
            AND s.event_type = 'OrderShipped' AND s.member = 'second'",
    )
    .await;
    assert!(
        taken_over > 0,
        "the first member's partitions were not taken over"
    );
}
