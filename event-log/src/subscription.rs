//! Checkpointed subscriptions: each named [`Consumer`] follows the global log from its own
//! checkpoint, and the checkpoint moves in the same transaction as the consumer's writes, so
//! each event takes effect exactly once in the database (guarantee: transactional).
//!
//! Per consumer, one task:
//! - holds a lease on the consumer's checkpoint row (owner, expiry, fencing token; see
//!   `docs/adr/0010-fenced-leases.md`) so that among several processes sharing the database
//!   exactly one applies the consumer. It renews the lease between pages; when its process dies
//!   or freezes the lease expires and another process takes it with a higher token;
//! - reads a page after its checkpoint, locks the checkpoint row, checks that it did not move and
//!   that the lease's token is still there (a runner that woke after a takeover commits
//!   nothing), applies the page and advances the checkpoint, all in one transaction;
//! - on failure retries with exponential back-off, narrowing to one event at a time; an event
//!   that keeps failing parks the consumer (state `parked`, error and position in the
//!   `checkpoints` row, visible in the admin API) instead of crashing the process. Taking the
//!   lease again (a restart) clears the parked state and tries once more;
//! - sleeps until the `events_notify` trigger's NOTIFY, or the polling interval, wakes it.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::checkpoints;
use crate::{crash, reader, Cursor, LogEvent, NOTIFY_CHANNEL};

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
    /// How long a lease runs unless renewed: how soon another process takes over from one
    /// that died or froze. Renewed every third of it.
    pub lease_ttl: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            poll_interval: Duration::from_millis(500),
            attempts_before_parking: 5,
            lease_retry: Duration::from_secs(2),
            lease_ttl: Duration::from_secs(5),
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
        let owner = owner_name();
        for consumer in consumers {
            let runner = Runner {
                pool: pool.clone(),
                owner: owner.clone(),
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

/// The name this process's runners hold leases under: `host:pid:random`, so that an operator
/// can match an owner to a process and two servers in one process still differ.
fn owner_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    let run = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &run[..8])
}

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
    /// The lease was taken over while the page was in hand; nothing was committed.
    Fenced,
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
    /// The name leases are held under.
    owner: String,
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
                    tracing::info!(consumer = %name, owner = %self.owner, token = lease.token, "took the lease; following the log");
                    match self.follow(lease).await {
                        Ok(true) => return,
                        Ok(false) => {
                            tracing::warn!(consumer = %name, "the lease was taken over; following no more");
                        }
                        Err(e) => {
                            tracing::warn!(consumer = %name, error = %e, "cannot renew the lease");
                        }
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

    /// Takes the consumer's lease, or `None` while another process holds it.
    async fn lease(&self) -> sqlx::Result<Option<checkpoints::Lease>> {
        let mut conn = self.pool.acquire().await?;
        let name = self.consumer.name();
        checkpoints::ensure(&mut conn, name).await?;
        let Some(lease) =
            checkpoints::acquire(&mut conn, name, &self.owner, self.config.lease_ttl).await?
        else {
            return Ok(None);
        };
        // A new leader gives a parked consumer one more try (a fixed deployment, say).
        checkpoints::unpark(&mut conn, name).await?;
        Ok(Some(lease))
    }

    /// Applies the log while holding `lease`, renewing it between pages; `Ok(true)` when asked
    /// to stop (the lease is then released), `Ok(false)` when it was taken over.
    async fn follow(&mut self, lease: checkpoints::Lease) -> sqlx::Result<bool> {
        let name = self.consumer.name().to_owned();
        let mut batch = self.batch_size();
        let mut failures = 0u32;
        let mut held_back = 0u32;
        let ttl = self.config.lease_ttl;
        let mut renewed = tokio::time::Instant::now();
        loop {
            if *self.stopped.borrow() {
                let mut conn = self.pool.acquire().await?;
                checkpoints::release(&mut conn, &name, lease).await?;
                return Ok(true);
            }
            if renewed.elapsed() > ttl / 3 {
                let mut conn = self.pool.acquire().await?;
                if !checkpoints::renew(&mut conn, &name, lease, ttl).await? {
                    return Ok(false);
                }
                renewed = tokio::time::Instant::now();
            }
            let step = self.step(batch, lease).await;
            if !matches!(step, Ok(Step::HeldBack)) {
                held_back = 0;
            }
            match step {
                Ok(Step::Applied) => {
                    failures = 0;
                    batch = self.batch_size();
                }
                Ok(Step::Moved) => {}
                Ok(Step::Fenced) => return Ok(false),
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

    async fn step(&self, limit: i64, lease: checkpoints::Lease) -> Result<Step, Failure> {
        let failed = |error: String| Failure {
            error,
            first: None,
            transient: false,
        };
        let name = self.consumer.name();
        let mut tx = self.pool.begin().await.map_err(|e| failed(e.to_string()))?;
        // A runner frozen inside a page (its row locked) would keep every other process from
        // taking the lease; Postgres ends such a transaction after three lease times.
        let idle_ms = (self.config.lease_ttl * 3).as_millis();
        sqlx::query(&format!(
            "SET LOCAL idle_in_transaction_session_timeout = {idle_ms}"
        ))
        .execute(&mut *tx)
        .await
        .map_err(|e| failed(e.to_string()))?;
        let (cursor, parked) = checkpoints::read(&mut tx, name)
            .await
            .map_err(|e| failed(e.to_string()))?;
        if parked {
            return Ok(Step::Parked);
        }
        // Read before this transaction writes anything (see `reader::read_page`).
        let page = reader::read_page(&mut tx, cursor, limit)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let Some(last) = page.last() else {
            let newer = reader::has_events_after(&mut tx, cursor)
                .await
                .map_err(|e| failed(e.to_string()))?;
            return Ok(if newer { Step::HeldBack } else { Step::Idle });
        };
        let span = tracing::info_span!(
            "consumer_page",
            consumer = name,
            after = %cursor,
            events = page.len()
        );
        let last = last.cursor();
        self.apply_page(tx, cursor, last, page, lease)
            .instrument(span)
            .await
    }

    /// Delivers and applies one page read after `cursor`, moves the checkpoint to `last` in the
    /// same transaction, and commits; [`Step::Moved`] if another page moved the checkpoint
    /// meanwhile, [`Step::Fenced`] if `lease` was taken over.
    async fn apply_page(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        cursor: Cursor,
        last: Cursor,
        page: Vec<LogEvent>,
        lease: checkpoints::Lease,
    ) -> Result<Step, Failure> {
        let failed = |error: String| Failure {
            error,
            first: None,
            transient: false,
        };
        let name = self.consumer.name();
        if let Err(e) = self.consumer.deliver(&page).await {
            return Err(Failure {
                transient: e.is::<Transient>(),
                error: e.to_string(),
                first: page.into_iter().next(),
            });
        }
        crash::pause(&format!("before_page_lock:{name}")).await;
        let held = checkpoints::lock_if_at(&mut tx, name, cursor, lease)
            .await
            .map_err(|e| failed(e.to_string()))?;
        match held {
            checkpoints::Held::Ours => {}
            checkpoints::Held::Moved => return Ok(Step::Moved),
            checkpoints::Held::Fenced => {
                tracing::warn!(
                    consumer = name,
                    token = lease.token,
                    "the lease moved on while the page was in hand; it is not applied"
                );
                return Ok(Step::Fenced);
            }
        }
        if let Err(e) = self.consumer.apply(&mut tx, &page).await {
            return Err(Failure {
                transient: e.is::<Transient>(),
                error: e.to_string(),
                first: page.into_iter().next(),
            });
        }
        checkpoints::advance(&mut tx, name, last, page.len())
            .await
            .map_err(|e| failed(e.to_string()))?;
        crash::point(&format!("before_checkpoint_commit:{name}"));
        tx.commit().await.map_err(|e| failed(e.to_string()))?;
        Ok(Step::Applied)
    }

    /// Shows a transient error in the checkpoint row (cleared by the next applied page).
    async fn note_error(&self, error: &str) {
        let result = checkpoints::note_error(&self.pool, self.consumer.name(), error).await;
        if let Err(e) = result {
            tracing::warn!(consumer = self.consumer.name(), error = %e, "cannot record the error");
        }
    }

    async fn park(&self, failure: &Failure) {
        let name = self.consumer.name();
        let position = failure.first.as_ref().map(|e| e.position);
        tracing::error!(consumer = name, position, error = %failure.error, "parking the consumer on a poison event");
        let result = checkpoints::park(&self.pool, name, &failure.error, position).await;
        if let Err(e) = result {
            tracing::error!(consumer = name, error = %e, "cannot record the parked state");
        }
    }
}
