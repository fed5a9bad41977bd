//! Checkpointed subscriptions: each named [`Consumer`] follows the global log from its own
//! checkpoint, and the checkpoint moves in the same transaction as the consumer's writes, so
//! each event takes effect exactly once in the database (guarantee: transactional).
//!
//! Per consumer, one task:
//! - holds a lease (a session advisory lock on a connection of its own) so that among several
//!   processes sharing the database exactly one applies the consumer; when that process dies its
//!   connection closes, the lock is released, and another process takes over;
//! - reads a page after its checkpoint, locks the checkpoint row, checks it did not move, applies
//!   the page and advances the checkpoint, all in one transaction;
//! - on failure retries with exponential back-off, narrowing to one event at a time; an event
//!   that keeps failing parks the consumer (state `parked`, error and position in the
//!   `checkpoints` row, visible in the admin API) instead of crashing the process. Taking the
//!   lease again (a restart) clears the parked state and tries once more;
//! - sleeps until the `events_notify` trigger's NOTIFY, or the polling interval, wakes it.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::log::{self, Cursor, LogEvent, NOTIFY_CHANNEL};

/// The channel `NOTIFY`ed, with the consumer's name as payload, in every transaction that moves
/// a checkpoint: a read model has advanced once the notification arrives.
pub const CHECKPOINT_CHANNEL: &str = "orderline_checkpoints";

/// The error a consumer reports for a page it could not apply.
pub type ConsumerError = Box<dyn std::error::Error + Send + Sync>;

/// Something that follows the global log.
#[async_trait::async_trait]
pub trait Consumer: Send + Sync + 'static {
    /// Unique, stable name: the key of its checkpoint and lease.
    fn name(&self) -> &str;

    /// Applies `events` (consecutive, in log order) using `tx`, the transaction in which the
    /// checkpoint then moves past them. Everything it writes must go through `tx`; an error
    /// rolls the whole page back and the page is offered again.
    async fn apply(&self, tx: &mut PgConnection, events: &[LogEvent]) -> Result<(), ConsumerError>;

    /// Most events per transaction for this consumer, if fewer than the runner's
    /// [`RunnerConfig::batch_size`]. A consumer whose page transaction does much work per event
    /// (the saga) keeps its transactions short this way: while one runs, it holds back every
    /// reader of the log (they read below the oldest running transaction).
    fn max_batch(&self) -> Option<i64> {
        None
    }

    /// Hands `events` to something outside Postgres (the Kafka relay's broker) before the
    /// page's transaction writes anything. The checkpoint moves past them only after this
    /// returned `Ok`, so delivery is at least once: a crash in between delivers them again.
    /// It runs while the page's read-only transaction is open but holds no transaction id, so
    /// however long it waits, it holds back no other reader of the log.
    ///
    /// Return a [`Transient`] error when the outside world is the problem (a broker down): the
    /// runner then retries the page with back-off for as long as it takes and never parks.
    async fn deliver(&self, events: &[LogEvent]) -> Result<(), ConsumerError> {
        let _ = events;
        Ok(())
    }
}

/// A consumer error that says nothing about the events: retry later, never park.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Transient(pub String);

/// How consumers are run.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Most events per transaction.
    pub batch_size: i64,
    /// Longest sleep between reads when no NOTIFY arrives.
    pub poll_interval: Duration,
    /// Attempts at a single event before the consumer parks.
    pub attempts_before_parking: u32,
    /// How often a process without the lease tries to take it.
    pub lease_retry: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            poll_interval: Duration::from_millis(500),
            attempts_before_parking: 5,
            lease_retry: Duration::from_secs(2),
        }
    }
}

/// Running consumers; dropping it does not stop them, [`Subscriptions::shutdown`] does.
pub struct Subscriptions {
    tasks: Vec<JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

impl Subscriptions {
    /// Starts one task per consumer and one that turns NOTIFYs into wake-ups.
    pub fn spawn(pool: &PgPool, consumers: Vec<Arc<dyn Consumer>>, config: &RunnerConfig) -> Self {
        let (stop, stopped) = watch::channel(false);
        let (wake, woken) = watch::channel(0u64);
        let mut tasks = vec![tokio::spawn(listen(pool.clone(), wake, stopped.clone()))];
        for consumer in consumers {
            let runner = Runner {
                pool: pool.clone(),
                consumer,
                config: config.clone(),
                woken: woken.clone(),
                stopped: stopped.clone(),
            };
            tasks.push(tokio::spawn(runner.run()));
        }
        Self { tasks, stop }
    }

    /// Stops every consumer after its current transaction and waits for them.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "a consumer task failed");
            }
        }
    }
}

/// Makes sure a checkpoint row exists for `consumer`.
///
/// # Errors
/// The database error, if any.
pub async fn ensure_checkpoint(conn: &mut PgConnection, consumer: &str) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO checkpoints (consumer) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(consumer)
        .execute(conn)
        .await?;
    Ok(())
}

/// The lease of a consumer: a session-level advisory lock in its own key space.
const LEASE_CLASS: i32 = 8102;

/// Turns NOTIFYs on the events channel into wake-ups. When the listener connection fails the
/// consumers still poll, so this only retries.
async fn listen(pool: PgPool, wake: watch::Sender<u64>, stopped: watch::Receiver<bool>) {
    forward_notifications(&pool, NOTIFY_CHANNEL, stopped, |_| {
        wake.send_modify(|n| *n = n.wrapping_add(1));
    })
    .await;
}

/// Listens on `channel` until `stopped` turns `true`, calling `notified` with each
/// notification's payload, and with `None` each time the listener (re)connects: whatever was
/// notified while no listener was there must be looked for again. A lost connection is
/// retried every second. One listener per process serves every waiter of that channel.
pub async fn forward_notifications(
    pool: &PgPool,
    channel: &str,
    mut stopped: watch::Receiver<bool>,
    mut notified: impl FnMut(Option<&str>),
) {
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(pool).await?;
            listener.listen(channel).await?;
            notified(None);
            loop {
                notified(Some(listener.recv().await?.payload()));
            }
        };
        tokio::select! {
            result = listener => {
                let result: sqlx::Result<()> = result;
                if let Err(e) = result {
                    tracing::warn!(channel, error = %e, "listener lost; retrying in a second");
                }
            }
            _ = stopped.changed() => return,
        }
        if sleep_or_stop(Duration::from_secs(1), &mut stopped).await {
            return;
        }
    }
}

/// Sleeps; `true` if asked to stop meanwhile.
async fn sleep_or_stop(duration: Duration, stopped: &mut watch::Receiver<bool>) -> bool {
    if *stopped.borrow() {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(duration) => *stopped.borrow(),
        _ = stopped.changed() => true,
    }
}

/// What one step of a consumer did.
enum Step {
    /// Applied a page.
    Applied,
    /// Nothing new in the log.
    Idle,
    /// Newer events exist but an older transaction is still open; they become readable when
    /// it ends.
    HeldBack,
    /// The consumer is parked.
    Parked,
    /// Another runner moved the checkpoint; read again.
    Moved,
}

/// A page that failed, and the event it started at.
struct Failure {
    error: String,
    first: Option<LogEvent>,
    /// The consumer said the error is [`Transient`].
    transient: bool,
}

struct Runner {
    pool: PgPool,
    consumer: Arc<dyn Consumer>,
    config: RunnerConfig,
    woken: watch::Receiver<u64>,
    stopped: watch::Receiver<bool>,
}

impl Runner {
    fn batch_size(&self) -> i64 {
        self.consumer
            .max_batch()
            .map_or(self.config.batch_size, |max| {
                max.min(self.config.batch_size)
            })
            .max(1)
    }

    async fn run(mut self) {
        let name = self.consumer.name().to_owned();
        loop {
            match self.lease().await {
                Ok(Some(lease)) => {
                    tracing::info!(consumer = %name, "took the lease; following the log");
                    let result = self.follow(lease).await;
                    match result {
                        Ok(()) => return,
                        Err(e) => tracing::warn!(consumer = %name, error = %e, "lost the lease"),
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(consumer = %name, error = %e, "cannot take the lease"),
            }
            let retry = self.config.lease_retry;
            if sleep_or_stop(retry, &mut self.stopped).await {
                return;
            }
        }
    }

    /// A connection holding the consumer's lease, or `None` if another process holds it.
    async fn lease(&self) -> sqlx::Result<Option<PgConnection>> {
        let mut conn = PgConnection::connect_with(&self.pool.connect_options()).await?;
        let name = self.consumer.name();
        ensure_checkpoint(&mut conn, name).await?;
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
            .bind(LEASE_CLASS)
            .bind(name)
            .fetch_one(&mut conn)
            .await?;
        if !taken {
            conn.close().await.ok();
            return Ok(None);
        }
        // A new leader gives a parked consumer one more try (a fixed deployment, say).
        sqlx::query(
            "UPDATE checkpoints SET state = 'running', parked_position = NULL, updated_at = now()
              WHERE consumer = $1 AND state = 'parked'",
        )
        .bind(name)
        .execute(&mut conn)
        .await?;
        Ok(Some(conn))
    }

    /// Applies the log while holding `lease`; returns `Ok` when asked to stop, `Err` when the
    /// lease connection broke.
    async fn follow(&mut self, mut lease: PgConnection) -> sqlx::Result<()> {
        let mut batch = self.batch_size();
        let mut failures = 0u32;
        let mut held_back = 0u32;
        let mut lease_checked = tokio::time::Instant::now();
        loop {
            if *self.stopped.borrow() {
                lease.close().await.ok();
                return Ok(());
            }
            if lease_checked.elapsed() > Duration::from_secs(5) {
                lease.ping().await?;
                lease_checked = tokio::time::Instant::now();
            }
            let step = self.step(batch).await;
            if !matches!(step, Ok(Step::HeldBack)) {
                held_back = 0;
            }
            match step {
                Ok(Step::Applied) => {
                    failures = 0;
                    batch = self.batch_size();
                }
                Ok(Step::Moved) => {}
                Ok(Step::Idle) => self.idle().await,
                Ok(Step::HeldBack) => {
                    // Most holding transactions last milliseconds; some last long. Look again
                    // soon, then less often.
                    held_back += 1;
                    let wait = Duration::from_millis(1 << held_back.min(6));
                    sleep_or_stop(wait, &mut self.stopped).await;
                }
                Ok(Step::Parked) => {
                    let poll = self.config.poll_interval;
                    sleep_or_stop(poll, &mut self.stopped).await;
                }
                Err(failure) => {
                    failures += 1;
                    tracing::warn!(consumer = self.consumer.name(), attempt = failures, error = %failure.error, "a page failed");
                    if failure.transient {
                        // The outside world is down, not the events at fault: keep the page
                        // whole, show the error, and wait longer each time.
                        self.note_error(&failure.error).await;
                        let backoff = Duration::from_millis(100 << failures.min(8))
                            .min(Duration::from_secs(30));
                        sleep_or_stop(backoff, &mut self.stopped).await;
                        continue;
                    }
                    if batch == 1 && failures >= self.config.attempts_before_parking {
                        self.park(&failure).await;
                        failures = 0;
                        batch = self.batch_size();
                        continue;
                    }
                    // Narrow down to the failing event, then back off.
                    batch = 1;
                    let backoff =
                        Duration::from_millis(100 << failures.min(8)).min(Duration::from_secs(30));
                    sleep_or_stop(backoff, &mut self.stopped).await;
                }
            }
        }
    }

    /// Waits for a NOTIFY or the polling interval.
    async fn idle(&mut self) {
        let poll = self.config.poll_interval;
        tokio::select! {
            _ = self.woken.changed() => {}
            () = tokio::time::sleep(poll) => {}
            _ = self.stopped.changed() => {}
        }
    }

    async fn step(&self, limit: i64) -> Result<Step, Failure> {
        let failed = |error: String| Failure {
            error,
            first: None,
            transient: false,
        };
        let name = self.consumer.name();
        let mut tx = self.pool.begin().await.map_err(|e| failed(e.to_string()))?;
        let (transaction_id, position, state): (i64, i64, String) = sqlx::query_as(
            "SELECT transaction_id::text::bigint, position, state FROM checkpoints WHERE consumer = $1",
        )
        .bind(name)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| failed(e.to_string()))?;
        if state == "parked" {
            return Ok(Step::Parked);
        }
        let cursor = Cursor {
            transaction_id,
            position,
        };
        // Read before this transaction writes anything (see `log::read_page`).
        let page = log::read_page(&mut tx, cursor, limit)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let Some(last) = page.last() else {
            let newer = log::has_events_after(&mut tx, cursor)
                .await
                .map_err(|e| failed(e.to_string()))?;
            return Ok(if newer { Step::HeldBack } else { Step::Idle });
        };
        if let Err(e) = self.consumer.deliver(&page).await {
            return Err(Failure {
                transient: e.is::<Transient>(),
                error: e.to_string(),
                first: page.into_iter().next(),
            });
        }
        let still_ours: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM checkpoints
              WHERE consumer = $1 AND transaction_id = $2::text::xid8 AND position = $3 FOR UPDATE",
        )
        .bind(name)
        .bind(transaction_id.to_string())
        .bind(position)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| failed(e.to_string()))?;
        if still_ours.is_none() {
            return Ok(Step::Moved);
        }
        if let Err(e) = self.consumer.apply(&mut tx, &page).await {
            return Err(Failure {
                transient: e.is::<Transient>(),
                error: e.to_string(),
                first: page.into_iter().next(),
            });
        }
        let next = last.cursor();
        let applied = page.len();
        // The NOTIFY is delivered at commit: listeners (live updates) learn that this read
        // model moved once it really has.
        sqlx::query(
            "WITH moved AS (
                UPDATE checkpoints
                   SET transaction_id = $2::text::xid8, position = $3,
                       events_applied = events_applied + $4, last_error = NULL, updated_at = now()
                 WHERE consumer = $1
             RETURNING consumer)
             SELECT pg_notify($5, consumer) FROM moved",
        )
        .bind(name)
        .bind(next.transaction_id.to_string())
        .bind(next.position)
        .bind(i64::try_from(applied).unwrap_or(i64::MAX))
        .bind(CHECKPOINT_CHANNEL)
        .execute(&mut *tx)
        .await
        .map_err(|e| failed(e.to_string()))?;
        crash_point(name);
        tx.commit().await.map_err(|e| failed(e.to_string()))?;
        Ok(Step::Applied)
    }

    /// Shows a transient error in the checkpoint row (cleared by the next applied page).
    async fn note_error(&self, error: &str) {
        let result = sqlx::query(
            "UPDATE checkpoints SET last_error = $2, last_error_at = now() WHERE consumer = $1",
        )
        .bind(self.consumer.name())
        .bind(error)
        .execute(&self.pool)
        .await;
        if let Err(e) = result {
            tracing::warn!(consumer = self.consumer.name(), error = %e, "cannot record the error");
        }
    }

    async fn park(&self, failure: &Failure) {
        let name = self.consumer.name();
        let position = failure.first.as_ref().map(|e| e.position);
        tracing::error!(consumer = name, position, error = %failure.error, "parking the consumer on a poison event");
        let result = sqlx::query(
            "UPDATE checkpoints SET state = 'parked', last_error = $2, last_error_at = now(),
                    parked_position = $3, updated_at = now()
              WHERE consumer = $1",
        )
        .bind(name)
        .bind(&failure.error)
        .bind(position)
        .execute(&self.pool)
        .await;
        if let Err(e) = result {
            tracing::error!(consumer = name, error = %e, "cannot record the parked state");
        }
    }
}

/// Test hook for crash tests: with `ORDERLINE_CRASH_BEFORE_CHECKPOINT_COMMIT=NAME`, the process
/// aborts after consumer NAME wrote a page and its checkpoint but before the commit, the worst
/// moment for exactly-once. Never set in production.
fn crash_point(consumer: &str) {
    static TARGET: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let target =
        TARGET.get_or_init(|| std::env::var("ORDERLINE_CRASH_BEFORE_CHECKPOINT_COMMIT").ok());
    if target.as_deref() == Some(consumer) {
        tracing::error!(consumer, "crash point reached: aborting");
        std::process::abort();
    }
}
