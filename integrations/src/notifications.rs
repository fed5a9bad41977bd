//! The notifications integrator: tells customers when their order is confirmed, rejected,
//! cancelled or shipped, and operators when stock runs low.
//!
//! Two halves, so that a slow or failing mail server never holds a Kafka offset or a database
//! transaction:
//! - [`NotificationsHandler`] (behind an [`crate::inbox::InboxConsumer`]) turns each notifying
//!   event into one row of `notifications`, in the inbox's transaction: one row per event, ever.
//! - [`Sender`] sends pending rows through a [`Notifier`], retrying with back-off; a row that
//!   keeps failing is parked with its error, never dropped. A sender that dies after sending and
//!   before marking the row sent sends it again later: each message carries its event id as
//!   `Message-ID`, so mail systems can drop the repeat.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lettre::message::Mailbox;
use lettre::transport::smtp::AsyncSmtpTransport;
use lettre::{AsyncTransport, Message, Tokio1Executor};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::inbox::{Handler, HandlerError, IncomingEvent};

/// The consumer name (inbox key and consumer group) of the notifications integrator.
pub const NAME: &str = "notifications";

/// One message to send.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Notification {
    /// The event it is about; also its identity.
    pub event_id: Uuid,
    /// `order_confirmed`, `order_rejected`, `order_cancelled`, `order_shipped`, `low_stock`.
    pub kind: String,
    /// `customer:{id}` or `operators`.
    pub recipient: String,
    /// Subject line.
    pub subject: String,
    /// Plain-text body.
    pub body: String,
}

/// Why a notification could not be sent; the sender retries it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotifyError(pub String);

/// A way to reach people.
#[async_trait::async_trait]
pub trait Notifier: Send + Sync + 'static {
    /// Sends one notification.
    ///
    /// # Errors
    /// [`NotifyError`] when it was not sent (it is retried, then parked).
    async fn send(&self, notification: &Notification) -> Result<(), NotifyError>;
}

/// The default notifier: writes each notification to the log.
pub struct LogNotifier;

#[async_trait::async_trait]
impl Notifier for LogNotifier {
    async fn send(&self, n: &Notification) -> Result<(), NotifyError> {
        tracing::info!(event_id = %n.event_id, kind = n.kind, recipient = n.recipient, subject = n.subject, "notification");
        Ok(())
    }
}

/// Where the SMTP notifier sends.
#[derive(Debug, Clone)]
pub struct SmtpConfig {
    /// SMTP host.
    pub host: String,
    /// SMTP port.
    pub port: u16,
    /// The sender address.
    pub from: String,
    /// Customers whose id is not an address get `{id}@{customer_domain}`.
    pub customer_domain: String,
    /// Where low-stock notices go.
    pub operators: String,
}

/// Sends notifications as e-mail over SMTP (plain, as to a local relay).
pub struct SmtpNotifier {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    config: SmtpConfig,
}

impl SmtpNotifier {
    /// A notifier for `config`; connects per message.
    pub fn new(config: SmtpConfig) -> Self {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host)
            .port(config.port)
            .timeout(Some(Duration::from_secs(10)))
            .build();
        Self { transport, config }
    }

    fn address(&self, recipient: &str) -> String {
        match recipient.strip_prefix("customer:") {
            Some(id) if id.contains('@') => id.to_owned(),
            Some(id) => format!("{id}@{}", self.config.customer_domain),
            None => self.config.operators.clone(),
        }
    }
}

#[async_trait::async_trait]
impl Notifier for SmtpNotifier {
    async fn send(&self, n: &Notification) -> Result<(), NotifyError> {
        let mailbox = |raw: &str| {
            raw.parse::<Mailbox>()
                .map_err(|e| NotifyError(format!("address {raw:?}: {e}")))
        };
        let message = Message::builder()
            .from(mailbox(&self.config.from)?)
            .to(mailbox(&self.address(&n.recipient))?)
            .message_id(Some(format!("<{}@orderline>", n.event_id)))
            .subject(&n.subject)
            .body(n.body.clone())
            .map_err(|e| NotifyError(format!("building the message: {e}")))?;
        self.transport
            .send(message)
            .await
            .map(drop)
            .map_err(|e| NotifyError(format!("SMTP: {e}")))
    }
}

/// Turns notifying events into `notifications` rows (see the module doc).
pub struct NotificationsHandler;

#[async_trait::async_trait]
impl Handler for NotificationsHandler {
    fn name(&self) -> &str {
        NAME
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        event: &IncomingEvent,
    ) -> Result<(), HandlerError> {
        let body = &event.payload[&event.event_type];
        let order = || -> Result<Uuid, HandlerError> { Ok(Uuid::parse_str(&event.aggregate_id)?) };
        let short = event.aggregate_id.chars().take(8).collect::<String>();
        let (kind, subject, text) = match (event.aggregate_type.as_str(), event.event_type.as_str())
        {
            ("order", "OrderPlaced") => {
                let customer = body["customer_id"]
                    .as_str()
                    .ok_or("OrderPlaced without customer")?;
                sqlx::query(
                    "INSERT INTO notification_recipients (order_id, customer_id) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING",
                )
                .bind(order()?)
                .bind(customer)
                .execute(&mut *tx)
                .await?;
                return Ok(());
            }
            ("order", "OrderConfirmed") => (
                "order_confirmed",
                format!("Your order {short} is confirmed"),
                "We have your items and your payment; we will tell you when it ships.".to_owned(),
            ),
            ("order", "OrderRejected") => (
                "order_rejected",
                format!("Your order {short} could not be accepted"),
                format!("Reason: {}. Nothing was charged.", text_of(&body["reason"])),
            ),
            ("order", "OrderCancelled") => (
                "order_cancelled",
                format!("Your order {short} is cancelled"),
                "Your order is cancelled and any payment hold is released.".to_owned(),
            ),
            ("order", "OrderShipped") => (
                "order_shipped",
                format!("Your order {short} has shipped"),
                format!(
                    "Carrier: {}. Tracking: {}.",
                    text_of(&body["carrier"]),
                    text_of(&body["tracking"])
                ),
            ),
            ("inventory", "LowStockReached") => (
                "low_stock",
                format!("Low stock: {}", event.aggregate_id),
                format!(
                    "{} units available (threshold {}).",
                    body["available"], body["threshold"]
                ),
            ),
            _ => return Ok(()),
        };
        let recipient = if kind == "low_stock" {
            "operators".to_owned()
        } else {
            let customer: Option<String> = sqlx::query_scalar(
                "SELECT customer_id FROM notification_recipients WHERE order_id = $1",
            )
            .bind(order()?)
            .fetch_optional(&mut *tx)
            .await?;
            // OrderPlaced comes first on the same partition; without it, wait for it.
            format!(
                "customer:{}",
                customer.ok_or("the order's placement was not seen yet")?
            )
        };
        sqlx::query(
            "INSERT INTO notifications (event_id, kind, recipient, subject, body)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(event.id)
        .bind(kind)
        .bind(recipient)
        .bind(subject)
        .bind(text)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

fn text_of(value: &Value) -> String {
    value.as_str().unwrap_or("none").to_owned()
}

/// How the sender retries.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Failed sends after which a notification is parked.
    pub max_attempts: i32,
    /// First retry delay; doubles per failure, up to a minute.
    pub retry_base: Duration,
    /// How long a claimed notification is reserved for the sender that claimed it.
    pub claim: Duration,
    /// Sleep when nothing is due.
    pub idle_poll: Duration,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            retry_base: Duration::from_secs(1),
            claim: Duration::from_secs(60),
            idle_poll: Duration::from_millis(500),
        }
    }
}

/// The running sender; [`Sender::stop`] ends it after the message in hand.
pub struct Sender {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Sender {
    /// Starts sending due notifications through `notifier`.
    pub fn spawn(pool: PgPool, notifier: Arc<dyn Notifier>, config: SenderConfig) -> Self {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(send_loop(pool, notifier, config, stopped));
        Self { task, stop }
    }

    /// Stops and waits.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the notification sender failed");
        }
    }
}

async fn send_loop(
    pool: PgPool,
    notifier: Arc<dyn Notifier>,
    config: SenderConfig,
    mut stopped: watch::Receiver<bool>,
) {
    while !*stopped.borrow() {
        match send_one(&pool, notifier.as_ref(), &config).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "the notification sender cannot reach Postgres"),
        }
        tokio::select! {
            () = tokio::time::sleep(config.idle_poll) => {}
            _ = stopped.changed() => {}
        }
    }
}

/// Claims one due notification (a short transaction: it reserves the row for `config.claim`),
/// sends it, and records the outcome. `Ok(false)` when nothing was due.
async fn send_one(
    pool: &PgPool,
    notifier: &dyn Notifier,
    config: &SenderConfig,
) -> sqlx::Result<bool> {
    let claimed: Option<Notification> = sqlx::query_as(
        "UPDATE notifications SET next_attempt_at = now() + $1::float8 * interval '1 second'
          WHERE event_id = (SELECT event_id FROM notifications
                             WHERE state = 'pending' AND next_attempt_at <= now()
                             ORDER BY next_attempt_at LIMIT 1 FOR UPDATE SKIP LOCKED)
          RETURNING event_id, kind, recipient, subject, body",
    )
    .bind(config.claim.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    let Some(notification) = claimed else {
        return Ok(false);
    };
    match notifier.send(&notification).await {
        Ok(()) => {
            sqlx::query(
                "UPDATE notifications SET state = 'sent', sent_at = now(), attempts = attempts + 1,
                        last_error = NULL WHERE event_id = $1",
            )
            .bind(notification.event_id)
            .execute(pool)
            .await?;
        }
        Err(error) => {
            tracing::warn!(event_id = %notification.event_id, error = %error, "a notification failed");
            sqlx::query(
                "UPDATE notifications
                    SET attempts = attempts + 1, last_error = $2,
                        state = CASE WHEN attempts + 1 >= $3 THEN 'parked' ELSE 'pending' END,
                        next_attempt_at = now() + least(60, $4::float8 * 2 ^ attempts) * interval '1 second'
                  WHERE event_id = $1",
            )
            .bind(notification.event_id)
            .bind(error.to_string())
            .bind(config.max_attempts)
            .bind(config.retry_base.as_secs_f64())
            .execute(pool)
            .await?;
        }
    }
    Ok(true)
}

/// What `retry` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retried {
    /// It was parked and is pending again.
    Yes,
    /// It exists but is not parked (pending or sent).
    NotParked,
    /// There is no notification for that event.
    NotFound,
}

/// Puts a parked notification back in the queue (an operator fixed the mail server).
///
/// # Errors
/// The database error, if any.
pub async fn retry(pool: &PgPool, event_id: Uuid) -> sqlx::Result<Retried> {
    let (retried, exists): (bool, bool) = sqlx::query_as(
        "WITH retried AS (
            UPDATE notifications SET state = 'pending', attempts = 0, next_attempt_at = now()
             WHERE event_id = $1 AND state = 'parked'
         RETURNING 1)
         SELECT EXISTS (SELECT 1 FROM retried),
                EXISTS (SELECT 1 FROM notifications WHERE event_id = $1)",
    )
    .bind(event_id)
    .fetch_one(pool)
    .await?;
    Ok(match (retried, exists) {
        (true, _) => Retried::Yes,
        (false, true) => Retried::NotParked,
        (false, false) => Retried::NotFound,
    })
}

/// One notification as operators see it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct NotificationView {
    /// The event that caused it (its key: one notification per event, ever).
    pub event_id: Uuid,
    /// Which notification (`order_confirmed`, `low_stock`, ...).
    pub kind: String,
    /// Who it goes to.
    pub recipient: String,
    /// Its subject line.
    pub subject: String,
    /// `pending`, `sent` or `parked`.
    pub state: String,
    /// Failed attempts so far.
    pub attempts: i32,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// When the sender tries it next (while pending).
    pub next_attempt_at: DateTime<Utc>,
    /// When the event was turned into it.
    pub created_at: DateTime<Utc>,
    /// When it went out.
    pub sent_at: Option<DateTime<Utc>>,
}

/// The newest `limit` notifications, in `state` if given (`pending`, `sent` or `parked`).
///
/// # Errors
/// The database error, if any.
pub async fn list(
    pool: &PgPool,
    state: Option<&str>,
    limit: i64,
) -> sqlx::Result<Vec<NotificationView>> {
    sqlx::query_as(
        "SELECT event_id, kind, recipient, subject, state, attempts, last_error, next_attempt_at,
                created_at, sent_at
           FROM notifications WHERE ($1::text IS NULL OR state = $1)
          ORDER BY created_at DESC LIMIT $2",
    )
    .bind(state)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Notifications waiting or parked (the `sent` ones are history), counted by the partial
/// indexes. Public so that tests can check its plan on a large table.
pub const WAITING_SQL: &str = "SELECT state, count(*) FROM notifications
  WHERE state IN ('pending', 'parked') GROUP BY state ORDER BY state";

/// How many notifications are pending and parked, by state (for `/metrics`).
///
/// # Errors
/// The database error, if any.
pub async fn count_waiting(pool: &PgPool) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(WAITING_SQL).fetch_all(pool).await
}
