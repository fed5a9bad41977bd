//! Checkpointed, partitioned subscriptions: each named [`Consumer`] follows the global log in
//! partitions (by a hash of the event's aggregate id; see [`crate::partitions`]), each with its
//! own checkpoint, and a checkpoint moves in the same transaction as the consumer's writes, so
//! each event takes effect exactly once in the database (guarantee: transactional). Within a
//! key, events are applied in log order; partitions run in parallel.
//!
//! Per process:
//! - per consumer, one manager task keeps the process's row for it in `log_processes` alive
//!   (counting the processes that run the consumer), and holds leases on partitions (owner, expiry, fencing token;
//!   `docs/adr/0010-fenced-leases.md`): it takes free or expired ones up to this process's even
//!   share, gives up those beyond it when another process joins, and renews the rest in one
//!   statement every third of the lease time. When a process dies or freezes its leases expire
//!   and the others take them with higher tokens;
//! - per held partition, one worker: it reads a page of its partition after its checkpoint,
//!   applies it, and checks that the checkpoint did not move and that the lease's token is
//!   still there (a worker that woke after a takeover commits nothing) as it advances the
//!   checkpoint, all in one transaction. Workers whose pages go through hand them to the
//!   consumer's group (`subscription/group.rs`), which applies the pages of every partition waiting in one
//!   transaction;
//! - on failure a worker retries with exponential back-off, narrowing to one event at a time;
//!   an event that keeps failing parks its key (the aggregate id; [`crate::parked`]): the
//!   checkpoint moves past it, the key's later events wait behind it in order, every other key
//!   of the partition flows on. An operator's retry or skip (`/api/v1/admin/parked`) has the
//!   worker apply the key's held events, or park it again where it fails;
//! - a worker sleeps until a NOTIFY naming a key of its partition, or the polling interval,
//!   wakes it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::checkpoints::{self, Lease};
use crate::parked::{self, Action, ParkedKey, ParkedSet};
use crate::{crash, processes, reader, Cursor, LogEvent, NOTIFY_CHANNEL};

mod group;

/// The error a consumer reports for a page it could not apply.
pub type ConsumerError = Box<dyn std::error::Error + Send + Sync>;

/// Something that follows the global log.
#[async_trait::async_trait]
pub trait Consumer: Send + Sync + 'static {
    /// Unique, stable name: the key of its checkpoints and leases.
    fn name(&self) -> &str;

    /// What it is, for operators: `projection`, `saga`, `relay`, `notifications`, ...
    fn kind(&self) -> &str {
        "consumer"
    }

    /// Whether [`Consumer::apply`] appends events to the log. The runner then announces the
    /// page's transaction as a writer before it writes anything
    /// (`event_store::locks::announce_writer`), as every writer of the log must, and checks
    /// its checkpoint row after `apply` rather than before, so that `apply` can take its
    /// aggregates' locks before the transaction has an id. Such an `apply` must lock every
    /// aggregate it writes before its first row lock or write.
    fn writes_events(&self) -> bool {
        false
    }

    /// Applies `events` (in log order; a page may hold events of several of the consumer's
    /// partitions, each partition's consecutive) using `tx`, the transaction in which their
    /// checkpoints then move past them. Everything it writes must go through `tx`; an error
    /// rolls the whole page back and the page is offered again.
    async fn apply(&self, tx: &mut PgConnection, events: &[LogEvent]) -> Result<(), ConsumerError>;

    /// Most events per transaction for this consumer, if fewer than the runner's
    /// [`RunnerConfig::batch_size`]. A consumer whose page transaction does much work per event
    /// (the saga) keeps its transactions short this way: while one runs, it holds back every
    /// reader of the log (they read below the oldest running transaction).
    fn max_batch(&self) -> Option<i64> {
        None
    }

    /// Whether pages of several of its partitions may go in one transaction (the consumer's group):
    /// yes for a consumer whose cost is per page (read, checkpoint, commit). A consumer whose
    /// pages lock shared rows (the saga, its SKUs) keeps them apart: a page of many partitions
    /// would hold more locks at once, and its pages would wait for each other.
    fn pages_together(&self) -> bool {
        true
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
    /// Attempts at a single event before its key is parked.
    pub attempts_before_parking: u32,
    /// How often a process without the lease tries to take it.
    pub lease_retry: Duration,
    /// How long a lease runs unless renewed: how soon another process takes over from one
    /// that died or froze. Renewed every third of it.
    pub lease_ttl: Duration,
    /// The log's partition count, as [`crate::partitions::ensure`] answered it.
    pub partitions: u32,
    /// The name this process holds leases under: `host:pid:random` by default, so that an
    /// operator can match an owner to a process and two servers in one process still differ.
    pub owner: String,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            poll_interval: Duration::from_millis(500),
            attempts_before_parking: 5,
            lease_retry: Duration::from_secs(2),
            lease_ttl: Duration::from_secs(5),
            partitions: crate::partitions::DEFAULT_PARTITIONS,
            owner: owner_name(),
        }
    }
}

/// Running consumers; dropping it does not stop them, [`Subscriptions::shutdown`] does.
pub struct Subscriptions {
    tasks: Vec<JoinHandle<()>>,
    stop: watch::Sender<bool>,
    owner: String,
    freeze: Arc<Freeze>,
}

/// A runner frozen as a whole (a test's SIGSTOP, in process): until when.
#[derive(Default)]
struct Freeze(std::sync::Mutex<Option<std::time::Instant>>);

impl Freeze {
    fn until(&self) -> Option<std::time::Instant> {
        let until = *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        until.filter(|t| *t > std::time::Instant::now())
    }

    /// Sleeps while frozen.
    async fn thaw(&self) {
        while let Some(until) = self.until() {
            tokio::time::sleep_until(until.into()).await;
        }
    }
}

/// The log's newest event as this process last read it, shared by every worker of every
/// consumer here: an idle worker's poll asks it first and reads its partition only when the log
/// has grown past its cursor, so an idle process costs Postgres one statement per polling
/// interval rather than one per partition and consumer.
#[derive(Default)]
struct Head(tokio::sync::Mutex<Option<(std::time::Instant, Option<Cursor>)>>);

impl Head {
    /// The newest event of the log (`None` when it is empty), read again when the last read is
    /// older than `max_age`. Concurrent callers wait for one read.
    async fn newest(&self, pool: &PgPool, max_age: Duration) -> sqlx::Result<Option<Cursor>> {
        let mut cached = self.0.lock().await;
        if let Some((at, newest)) = *cached {
            if at.elapsed() < max_age {
                return Ok(newest);
            }
        }
        let mut conn = pool.acquire().await?;
        let newest = reader::newest(&mut conn).await?;
        *cached = Some((std::time::Instant::now(), newest));
        Ok(newest)
    }
}

/// One wake-up channel per partition, shared by every consumer's worker of that partition.
#[derive(Clone)]
struct Wakes(Arc<Vec<watch::Sender<u64>>>);

impl Wakes {
    fn new(partitions: u32) -> Self {
        Self(Arc::new(
            (0..partitions).map(|_| watch::channel(0u64).0).collect(),
        ))
    }

    fn wake(&self, partition: u32) {
        if let Some(wake) = self.0.get(partition as usize) {
            wake.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn wake_all(&self) {
        for wake in self.0.iter() {
            wake.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn subscribe(&self, partition: u32) -> watch::Receiver<u64> {
        match self.0.get(partition as usize) {
            Some(wake) => wake.subscribe(),
            None => watch::channel(0u64).1,
        }
    }
}

impl Subscriptions {
    /// Starts one lease manager per consumer (which keeps the process's heartbeat for it and
    /// starts a worker per partition it holds) and one task that turns NOTIFYs into wake-ups.
    pub fn spawn(pool: &PgPool, consumers: Vec<Arc<dyn Consumer>>, config: &RunnerConfig) -> Self {
        let (stop, stopped) = watch::channel(false);
        let freeze = Arc::new(Freeze::default());
        let partitions = config.partitions.max(1);
        let wakes = Wakes::new(partitions);
        let head = Arc::new(Head::default());
        let owner = config.owner.clone();
        let mut tasks = vec![tokio::spawn(listen(
            pool.clone(),
            wakes.clone(),
            partitions,
            stopped.clone(),
        ))];
        for consumer in consumers {
            let manager = Manager {
                pool: pool.clone(),
                owner: owner.clone(),
                config: config.clone(),
                partitions,
                wakes: wakes.clone(),
                head: head.clone(),
                stopped: stopped.clone(),
                workers: HashMap::new(),
                stopping: Vec::new(),
                freeze: freeze.clone(),
                group: Arc::new(group::Group::new(
                    pool.clone(),
                    consumer.clone(),
                    config.clone(),
                    partitions,
                    freeze.clone(),
                )),
                consumer,
            };
            tasks.push(tokio::spawn(manager.run()));
        }
        Self {
            tasks,
            stop,
            owner,
            freeze,
        }
    }

    /// Freezes every consumer of this runner for `duration`, as SIGSTOP would freeze the
    /// process: lease managers renew and take nothing, and each worker stops just before it
    /// locks its next page's checkpoint (its page read, its transaction begun), then goes on.
    /// For fault tests of fencing in one process.
    pub fn freeze(&self, duration: Duration) {
        let mut until = self
            .freeze
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *until = Some(std::time::Instant::now() + duration);
    }

    /// The name this process holds its leases under (`host:pid:runner`).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Stops every task at once, in the middle of whatever it does: open page transactions are
    /// abandoned (rolled back), nothing is released and no heartbeat removed, as when the
    /// process is killed with `kill -9`. Other processes take the partitions once the leases
    /// expire. For tests of takeovers; a server stops with [`Subscriptions::shutdown`].
    pub fn abort(self) {
        for task in self.tasks {
            // A manager's workers go with it (`Running` aborts its worker when dropped).
            task.abort();
        }
    }

    /// Stops every consumer after its current transaction, gives up the leases, and waits.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "a consumer task failed");
            }
        }
    }
}

/// A fresh name for a process's leases: `host:pid:random`.
fn owner_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    let run = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &run[..8])
}

/// Turns NOTIFYs on the events channel (a comma-separated list of the low 8 bits of the key
/// hashes written, which hold the partition) into wake-ups of those partitions. When the listener connection fails the workers still
/// poll, so this only retries; on every (re)connection every partition is woken.
async fn listen(pool: PgPool, wakes: Wakes, partitions: u32, stopped: watch::Receiver<bool>) {
    forward_notifications(&pool, NOTIFY_CHANNEL, stopped, |payload| {
        let Some(payload) = payload.filter(|p| !p.is_empty()) else {
            wakes.wake_all();
            return;
        };
        for hash in payload.split(',') {
            match hash.parse::<i32>() {
                Ok(hash) => wakes.wake(reader::partition_of(hash, partitions)),
                Err(_) => wakes.wake_all(),
            }
        }
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

/// A worker the manager started, and how to stop it. Dropping it (the manager's task ended or
/// was aborted) aborts the worker, so a worker never outlives its manager and its lease
/// renewals.
struct Running {
    lease: Lease,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    _abort: AbortOnDrop,
}

/// Aborts a task when dropped (a finished task is left alone).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A worker asked to stop, and whether its lease is to be given up once it has (it is still
/// ours: handing partitions over to another process) or was lost already.
struct Stopping {
    running: Running,
    release: bool,
}

/// Holds one consumer's leases in this process and runs a worker per held partition. It never
/// waits for a worker: one that is stopping (its page finishing) is looked at again next round,
/// so renewals of the other leases never fall behind.
struct Manager {
    pool: PgPool,
    owner: String,
    consumer: Arc<dyn Consumer>,
    config: RunnerConfig,
    partitions: u32,
    wakes: Wakes,
    head: Arc<Head>,
    stopped: watch::Receiver<bool>,
    workers: HashMap<u32, Running>,
    stopping: Vec<Stopping>,
    freeze: Arc<Freeze>,
    /// The consumer's pages of several partitions at once, shared by its workers.
    group: Arc<group::Group>,
}

impl Manager {
    async fn run(mut self) {
        let name = self.consumer.name().to_owned();
        let kind = self.consumer.kind().to_owned();
        // The rows first: without them there is nothing to lease.
        loop {
            let ensured = async {
                let mut conn = self.pool.acquire().await?;
                checkpoints::ensure(&mut conn, &name, &kind, self.partitions).await
            };
            match ensured.await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(consumer = %name, error = %e, "cannot register the consumer");
                }
            }
            if sleep_or_stop(self.config.lease_retry, &mut self.stopped).await {
                return;
            }
        }
        let tick = (self.config.lease_ttl / 3).min(self.config.lease_retry);
        loop {
            if *self.stopped.borrow() {
                break;
            }
            // A test's pause point freezes this consumer as a frozen process would be.
            if !crash::frozen(&name) && self.freeze.until().is_none() {
                if let Err(e) = self.balance().await {
                    tracing::warn!(consumer = %name, error = %e, "cannot renew or take leases");
                }
            }
            if sleep_or_stop(tick, &mut self.stopped).await {
                break;
            }
        }
        // Shutdown: every worker finishes its page, then every lease still ours is given up.
        let mut leases: Vec<Lease> = self.workers.values().map(|w| w.lease).collect();
        leases.extend(
            self.stopping
                .iter()
                .filter(|s| s.release)
                .map(|s| s.running.lease),
        );
        let mut workers: Vec<Running> = Vec::new();
        for (_, running) in self.workers.drain() {
            running.stop.send_replace(true);
            workers.push(running);
        }
        workers.extend(self.stopping.drain(..).map(|s| s.running));
        // Awaited through `&mut`: each abort guard stays until its worker finished its page.
        for mut worker in workers {
            if let Err(e) = (&mut worker.task).await {
                tracing::error!(consumer = %name, error = %e, "a partition worker failed");
            }
        }
        let released = async {
            let mut conn = self.pool.acquire().await?;
            checkpoints::release(&mut conn, &name, &leases).await
        };
        if let Err(e) = released.await {
            tracing::warn!(consumer = %name, error = %e, "cannot release the leases");
        }
        if let Err(e) = processes::leave(&self.pool, &self.owner, &name).await {
            tracing::warn!(consumer = %name, error = %e, "cannot remove this process's heartbeat");
        }
    }

    /// One round: forget finished workers, give up the leases of those that were handing over,
    /// renew the rest, then take or give up partitions to hold this process's share.
    async fn balance(&mut self) -> sqlx::Result<()> {
        let name = self.consumer.name().to_owned();
        // A worker that ended by itself was fenced off: its lease is someone else's now.
        self.workers.retain(|_, w| !w.task.is_finished());
        let (done, still): (Vec<Stopping>, Vec<Stopping>) = std::mem::take(&mut self.stopping)
            .into_iter()
            .partition(|s| s.running.task.is_finished());
        self.stopping = still;
        let handed_over: Vec<Lease> = done
            .iter()
            .filter(|s| s.release)
            .map(|s| s.running.lease)
            .collect();
        let mut conn = self.pool.acquire().await?;
        let live =
            processes::heartbeat(&mut conn, &self.owner, &name, self.config.lease_ttl).await?;
        checkpoints::release(&mut conn, &name, &handed_over).await?;

        // Renew what is ours, including leases whose workers are finishing a page before
        // handing over (so that page still commits).
        let mut held: Vec<Lease> = self.workers.values().map(|w| w.lease).collect();
        held.extend(
            self.stopping
                .iter()
                .filter(|s| s.release)
                .map(|s| s.running.lease),
        );
        let kept = checkpoints::renew(&mut conn, &name, &held, self.config.lease_ttl).await?;
        let lost: Vec<u32> = held
            .iter()
            .filter(|l| !kept.contains(l))
            .map(|l| l.partition)
            .collect();
        if !lost.is_empty() {
            tracing::warn!(consumer = %name, partitions = ?lost, "leases taken over; stopping their workers");
            self.stop(&lost, false);
            for s in &mut self.stopping {
                if lost.contains(&s.running.lease.partition) {
                    s.release = false;
                }
            }
        }

        // Partitions whose holder died or froze are taken whatever the share: they must not
        // wait for its heartbeat to run out. The share evens things out afterwards.
        let expired = checkpoints::acquire(
            &mut conn,
            &name,
            &self.owner,
            self.config.lease_ttl,
            self.partitions,
            checkpoints::Claim::Expired,
        )
        .await?;
        let share = processes::share(self.partitions, live);
        let holding = u32::try_from(self.workers.len() + expired.len()).unwrap_or(u32::MAX);
        let free = if holding < share && self.stopping.is_empty() {
            checkpoints::acquire(
                &mut conn,
                &name,
                &self.owner,
                self.config.lease_ttl,
                self.partitions,
                checkpoints::Claim::Free(share - holding),
            )
            .await?
        } else {
            Vec::new()
        };
        for lease in expired.into_iter().chain(free) {
            tracing::info!(consumer = %name, owner = %self.owner, partition = lease.partition, token = lease.token, "took a partition");
            self.start_worker(lease);
        }
        let holding = u32::try_from(self.workers.len()).unwrap_or(u32::MAX);
        if holding > share {
            // Another process joined: hand the highest partitions over after their pages.
            let mut mine: Vec<u32> = self.workers.keys().copied().collect();
            mine.sort_unstable();
            let extra = mine.split_off(share as usize);
            tracing::info!(consumer = %name, partitions = ?extra, share, "handing partitions to another process");
            self.stop(&extra, true);
        }
        Ok(())
    }

    fn start_worker(&mut self, lease: Lease) {
        let (stop, stopped) = watch::channel(false);
        let worker = Worker {
            pool: self.pool.clone(),
            consumer: self.consumer.clone(),
            config: self.config.clone(),
            partitions: self.partitions,
            lease,
            woken: self.wakes.subscribe(lease.partition),
            head: self.head.clone(),
            stopped,
            process_stopped: self.stopped.clone(),
            freeze: self.freeze.clone(),
            group: self.group.clone(),
            parked: ParkedSet::new(),
            parked_version: 0,
            parked_read: std::time::Instant::now(),
        };
        let task = tokio::spawn(worker.run());
        let abort = AbortOnDrop(task.abort_handle());
        self.workers.insert(
            lease.partition,
            Running {
                lease,
                stop,
                task,
                _abort: abort,
            },
        );
    }

    /// Asks the workers of `partitions` to stop after their page; `release` gives their leases
    /// up once they have.
    fn stop(&mut self, partitions: &[u32], release: bool) {
        for partition in partitions {
            if let Some(running) = self.workers.remove(partition) {
                running.stop.send_replace(true);
                self.stopping.push(Stopping { running, release });
            }
        }
    }
}

/// Begins a page's transaction: a bounded idle time (a worker frozen inside a page, its row
/// locked, would keep every other process from taking the lease; Postgres ends such a
/// transaction after three lease times) and, for a consumer that appends events, the writer's
/// announcement before its first write (`writes`: the page is not empty).
async fn begin_page(
    pool: &PgPool,
    consumer: &dyn Consumer,
    config: &RunnerConfig,
    writes: bool,
) -> sqlx::Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    let idle_ms = (config.lease_ttl * 3).as_millis();
    let announce = if consumer.writes_events() && writes {
        format!("; {}", event_store::locks::ANNOUNCE_WRITER_SQL)
    } else {
        String::new()
    };
    pool.begin_with(format!(
        "BEGIN; SET LOCAL idle_in_transaction_session_timeout = {idle_ms}{announce}"
    ))
    .await
}

/// What one step of a worker did.
enum Step {
    /// Applied a page (or moved an idle partition's cursor past other partitions' events).
    Applied,
    /// Nothing new in the partition.
    Idle,
    /// Newer events of the partition exist but their writer is still open; they become
    /// readable when it ends.
    HeldBack,
    /// Another transaction moved the checkpoint; read it again.
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

impl Failure {
    fn database(error: &sqlx::Error) -> Self {
        Self {
            error: error.to_string(),
            first: None,
            transient: false,
        }
    }

    fn consumer(error: &ConsumerError, page: Vec<LogEvent>) -> Self {
        Self {
            transient: error.is::<Transient>(),
            error: error.to_string(),
            first: page.into_iter().next(),
        }
    }
}

/// Applies one partition of one consumer while the manager holds its lease.
struct Worker {
    pool: PgPool,
    consumer: Arc<dyn Consumer>,
    config: RunnerConfig,
    partitions: u32,
    lease: Lease,
    woken: watch::Receiver<u64>,
    /// The process's view of the log's newest event.
    head: Arc<Head>,
    /// The manager's stop (lease lost, given up, or shutdown).
    stopped: watch::Receiver<bool>,
    process_stopped: watch::Receiver<bool>,
    /// The runner's freeze (fault tests), waited out before each page's lock.
    freeze: Arc<Freeze>,
    /// Where the next page goes while this partition's pages go through (see [`group`]).
    group: Arc<group::Group>,
    /// The partition's parked keys, as last read with the checkpoint; pages pass over their
    /// events.
    parked: ParkedSet,
    /// The checkpoint's `parked_version` that `parked` goes with: a page commits only while the
    /// row still has it.
    parked_version: i64,
    /// When `parked` was read: with keys parked, it is read again every polling interval to
    /// see operators' requests.
    parked_read: std::time::Instant,
}

/// What became of an operator's request on a parked key.
enum Resolved {
    /// Done, or parked again where it failed: go on.
    Done,
    /// The checkpoint or the parked row changed meanwhile (or the lease moved): read again.
    Reread,
}

/// Most events in one page of `consumer`: the runner's batch size, or the consumer's own
/// maximum if smaller.
fn page_size(consumer: &dyn Consumer, config: &RunnerConfig) -> i64 {
    consumer
        .max_batch()
        .map_or(config.batch_size, |max| max.min(config.batch_size))
        .max(1)
}

impl Worker {
    fn batch_size(&self) -> i64 {
        page_size(&*self.consumer, &self.config)
    }

    fn stopping(&self) -> bool {
        *self.stopped.borrow() || *self.process_stopped.borrow()
    }

    async fn run(mut self) {
        let name = self.consumer.name().to_owned();
        let partition = self.lease.partition;
        let mut batch = self.batch_size();
        let mut failures = 0u32;
        let mut held_back = 0u32;
        // Whether the last wait ended on the polling interval rather than a NOTIFY: a caught-up
        // partition then most likely has nothing, and one probe says so.
        let mut polled = false;
        // The last group this partition was in did not commit: its next page goes alone.
        let mut alone = false;
        let mut at: Option<Cursor> = None;
        while !self.stopping() {
            if !self.parked.is_empty() && self.parked_read.elapsed() >= self.config.poll_interval {
                at = None;
            }
            let cursor = match at {
                Some(known) => known,
                None => match self.read_checkpoint().await {
                    Ok(known) => known,
                    Err(e) => {
                        tracing::warn!(consumer = %name, partition, error = %e, "cannot read the checkpoint");
                        self.pause(self.config.lease_retry).await;
                        continue;
                    }
                },
            };
            at = Some(cursor);
            let requested: Vec<(String, ParkedKey)> = self
                .parked
                .iter()
                .filter(|(_, p)| p.action.is_some())
                .map(|(k, p)| (k.clone(), *p))
                .collect();
            if !requested.is_empty() {
                for (key, wanted) in requested {
                    match self.resolve(cursor, &key, wanted).await {
                        Ok(Resolved::Done) => {}
                        Ok(Resolved::Reread) => at = None,
                        Err(failure) => {
                            tracing::warn!(consumer = %name, partition, key, error = %failure.error, "a retry of a parked key failed");
                            self.pause(self.config.poll_interval).await;
                            at = None;
                        }
                    }
                    if at.is_none() {
                        break;
                    }
                }
                continue;
            }
            let probe = std::mem::take(&mut polled);
            if probe && self.log_is_not_past(cursor).await {
                // Nothing was written past the cursor: still idle, and no statement of ours.
                polled = !self.idle().await;
                continue;
            }
            // A page that goes through goes with the group's (one read, one transaction, one
            // checkpoint statement for every partition of the consumer with work); anything
            // else, and the page after a group that did not commit, goes alone.
            let grouped = self.consumer.pages_together()
                && !probe
                && !alone
                && failures == 0
                && self.parked.is_empty()
                && batch == self.batch_size();
            let step = if grouped {
                let request = group::Request {
                    lease: self.lease,
                    cursor,
                    parked_version: self.parked_version,
                };
                match self.group.page(request).await {
                    group::Outcome::Applied(next) => Ok((Step::Applied, next)),
                    group::Outcome::Empty => self.step(cursor, batch, true).await,
                    group::Outcome::Alone => {
                        alone = true;
                        self.step(cursor, batch, false).await
                    }
                }
            } else {
                self.step(cursor, batch, probe).await
            };
            if matches!(step, Ok((Step::Applied | Step::Idle, _))) {
                alone = false;
            }
            if !matches!(step, Ok((Step::HeldBack, _))) {
                held_back = 0;
            }
            match step {
                Ok((Step::Applied, next)) => {
                    failures = 0;
                    batch = self.batch_size();
                    at = Some(next);
                }
                Ok((Step::Moved, _)) => at = None,
                Ok((Step::Fenced, _)) => return,
                Ok((Step::Idle, _)) => polled = !self.idle().await,
                Ok((Step::HeldBack, _)) => {
                    // Most holding transactions last milliseconds; some last long. Look again
                    // soon, then less often.
                    held_back += 1;
                    self.pause(Duration::from_millis(1 << held_back.min(6)))
                        .await;
                }
                Err(failure) => {
                    failures += 1;
                    tracing::warn!(consumer = %name, partition, attempt = failures, error = %failure.error, "a page failed");
                    let backoff =
                        Duration::from_millis(100 << failures.min(8)).min(Duration::from_secs(30));
                    if failure.transient || failure.first.is_none() {
                        // The outside world or the database is down, not the events at fault:
                        // keep the page whole, show the error, and wait longer each time.
                        self.note_error(&failure.error).await;
                        self.pause(backoff).await;
                        at = None;
                        continue;
                    }
                    if batch == 1 && failures >= self.config.attempts_before_parking {
                        match self.park(cursor, &failure, failures).await {
                            Ok(Some(next)) => {
                                failures = 0;
                                batch = self.batch_size();
                                at = Some(next);
                            }
                            Ok(None) => at = None,
                            Err(e) => {
                                tracing::error!(consumer = %name, partition, error = %e, "cannot park the key");
                                self.pause(backoff).await;
                                at = None;
                            }
                        }
                        continue;
                    }
                    // Narrow down to the failing event, then back off.
                    batch = 1;
                    self.pause(backoff).await;
                    at = None;
                }
            }
        }
    }

    /// Reads the checkpoint and the partition's parked keys.
    async fn read_checkpoint(&mut self) -> sqlx::Result<Cursor> {
        let mut conn = self.pool.acquire().await?;
        let name = self.consumer.name();
        let partition = self.lease.partition;
        let (cursor, version) = checkpoints::read(&mut conn, name, partition).await?;
        self.parked = parked::of_partition(&mut conn, name, self.partitions, partition).await?;
        self.parked_version = version;
        self.parked_read = std::time::Instant::now();
        Ok(cursor)
    }

    /// Sleeps unless told to stop.
    async fn pause(&mut self, duration: Duration) {
        tokio::select! {
            () = tokio::time::sleep(duration) => {}
            _ = self.stopped.changed() => {}
            _ = self.process_stopped.changed() => {}
        }
    }

    /// Whether the log's newest event, as this process read it within the polling interval
    /// ([`Head`]), is not past `cursor`: then a poll can only find nothing. An event written
    /// since was announced by a NOTIFY, which wakes the partition anyway; the poll only covers
    /// a lost one, and a read of the head at most one interval old still does.
    async fn log_is_not_past(&self, cursor: Cursor) -> bool {
        match self
            .head
            .newest(&self.pool, self.config.poll_interval)
            .await
        {
            Ok(newest) => newest.is_none_or(|newest| newest <= cursor),
            Err(_) => false,
        }
    }

    /// Waits for a NOTIFY of this partition or the polling interval; answers whether a NOTIFY
    /// (or a stop) ended the wait.
    async fn idle(&mut self) -> bool {
        let poll = self.config.poll_interval;
        tokio::select! {
            _ = self.woken.changed() => true,
            () = tokio::time::sleep(poll) => false,
            _ = self.stopped.changed() => true,
            _ = self.process_stopped.changed() => true,
        }
    }

    /// Reads a page after `cursor` and applies it; answers what happened and the cursor after.
    /// With `probe`, looks past the cursor first ([`reader::partition_tail`], one statement)
    /// and reads a page only if an event of the partition is readable: an idle poll costs one
    /// statement, not two.
    async fn step(
        &self,
        cursor: Cursor,
        limit: i64,
        probe: bool,
    ) -> Result<(Step, Cursor), Failure> {
        let name = self.consumer.name();
        let partition = self.lease.partition;
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| Failure::database(&e))?;
        let probed = match probe {
            true => Some(
                reader::partition_tail(&mut conn, self.partitions, partition, cursor)
                    .await
                    .map_err(|e| Failure::database(&e))?,
            ),
            false => None,
        };
        let mut page = match probed {
            None | Some(reader::Tail::Readable) => {
                reader::read_partition(&mut conn, self.partitions, partition, cursor, limit)
                    .await
                    .map_err(|e| Failure::database(&e))?
            }
            Some(_) => Vec::new(),
        };
        let Some(last) = page.last().map(LogEvent::cursor) else {
            let tail = match probed {
                Some(tail) => tail,
                None => reader::partition_tail(&mut conn, self.partitions, partition, cursor)
                    .await
                    .map_err(|e| Failure::database(&e))?,
            };
            drop(conn);
            return match tail {
                reader::Tail::HeldBack => Ok((Step::HeldBack, cursor)),
                reader::Tail::Readable => Ok((Step::Moved, cursor)),
                // Other partitions' events went by: move this partition's cursor past them, so
                // that it shows how far the consumer is (nothing of this partition lies there).
                reader::Tail::Nothing {
                    passed: Some(passed),
                } => self.commit(cursor, passed, Vec::new()).await,
                reader::Tail::Nothing { passed: None } => Ok((Step::Idle, cursor)),
            };
        };
        drop(conn);
        // A parked key's events wait behind its parked event; the cursor passes them.
        if !self.parked.is_empty() {
            page.retain(|e| !self.parked.contains_key(&e.aggregate_id));
        }
        let span = tracing::info_span!(
            "consumer_page",
            consumer = name,
            partition,
            after = %cursor,
            events = page.len()
        );
        self.commit(cursor, last, page).instrument(span).await
    }

    /// Delivers and applies `page` (read after `cursor`), moves the checkpoint to `last` in the
    /// same transaction, and commits; [`Step::Moved`] if another transaction moved the
    /// checkpoint meanwhile, [`Step::Fenced`] if the lease was taken over.
    async fn commit(
        &self,
        cursor: Cursor,
        last: Cursor,
        page: Vec<LogEvent>,
    ) -> Result<(Step, Cursor), Failure> {
        let name = self.consumer.name();
        let (page, mut tx) = self.deliver_and_begin(page).await?;
        crash::pause(&format!("before_page_lock:{name}")).await;
        self.freeze.thaw().await;
        // The checkpoint row is checked and moved after the page is applied, in one statement
        // (`advance_if_at`), and locked from then to the commit, so a page whose lease moved on
        // is never committed. Checking it after, not before, matters to a page that appends
        // events: it takes its aggregates' locks while its transaction has no id yet (locking
        // the row first would give it one), and a page with an id that waited for a hot SKU
        // behind another partition's page would find the SKU written by a younger transaction
        // and have to start over (ADR 1); under load, every page on a hot SKU did.
        if !page.is_empty() {
            if let Err(e) = self.consumer.apply(&mut tx, &page).await {
                drop(tx);
                // A page whose lease moved on can fail only because its new owner applied it
                // meanwhile: that is no failure of the events.
                if let Some(step) = self.refused_now(cursor).await {
                    return Ok((step, cursor));
                }
                return Err(Failure::consumer(&e, page));
            }
        }
        let held = checkpoints::advance_if_at(
            &mut tx,
            name,
            cursor,
            self.lease,
            self.parked_version,
            last,
            page.len(),
        )
        .await
        .map_err(|e| Failure::database(&e))?;
        if let Some(step) = self.refused(held) {
            return Ok((step, cursor));
        }
        if !page.is_empty() {
            crash::point(&format!("before_checkpoint_commit:{name}"));
        }
        tx.commit().await.map_err(|e| Failure::database(&e))?;
        Ok((Step::Applied, last))
    }

    /// `None` when the checkpoint was `Ours`; otherwise the step that says why the page must
    /// not commit.
    fn refused(&self, held: checkpoints::Held) -> Option<Step> {
        match held {
            checkpoints::Held::Ours => None,
            checkpoints::Held::Moved => Some(Step::Moved),
            checkpoints::Held::Fenced => {
                tracing::warn!(
                    consumer = self.consumer.name(),
                    partition = self.lease.partition,
                    token = self.lease.token,
                    "the lease moved on while the page was in hand; it is not applied"
                );
                Some(Step::Fenced)
            }
        }
    }

    /// [`Worker::refused`] for the checkpoint as it is now, outside the page's transaction (a
    /// failed page's is aborted). `None` also when it cannot be read: the failure stands.
    async fn refused_now(&self, cursor: Cursor) -> Option<Step> {
        let mut conn = self.pool.acquire().await.ok()?;
        let name = self.consumer.name();
        let held =
            checkpoints::lock_if_at(&mut conn, name, cursor, self.lease, self.parked_version)
                .await
                .ok()?;
        self.refused(held)
    }

    /// Shows a transient error in the checkpoint row (cleared by the next applied page).
    async fn note_error(&self, error: &str) {
        let name = self.consumer.name();
        let result = checkpoints::note_error(&self.pool, name, self.lease.partition, error).await;
        if let Err(e) = result {
            tracing::warn!(consumer = name, error = %e, "cannot record the error");
        }
    }

    /// Begins a page's transaction ([`begin_page`]).
    async fn begin(
        &self,
        writes: bool,
    ) -> sqlx::Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        begin_page(&self.pool, &*self.consumer, &self.config, writes).await
    }

    /// Hands a non-empty `page` to the consumer's outside world ([`Consumer::deliver`]), then
    /// begins the transaction that applies it ([`Worker::begin`]).
    async fn deliver_and_begin(
        &self,
        page: Vec<LogEvent>,
    ) -> Result<(Vec<LogEvent>, sqlx::Transaction<'static, sqlx::Postgres>), Failure> {
        if !page.is_empty() {
            if let Err(e) = self.consumer.deliver(&page).await {
                return Err(Failure::consumer(&e, page));
            }
        }
        let tx = self
            .begin(!page.is_empty())
            .await
            .map_err(|e| Failure::database(&e))?;
        Ok((page, tx))
    }

    /// Parks the key of the event `failure` started at (read after `cursor`), and moves the
    /// checkpoint past that event in the same transaction. Answers the new cursor, or `None`
    /// when the checkpoint moved meanwhile (read it again).
    async fn park(
        &mut self,
        cursor: Cursor,
        failure: &Failure,
        attempts: u32,
    ) -> sqlx::Result<Option<Cursor>> {
        let Some(event) = &failure.first else {
            return Ok(None);
        };
        let name = self.consumer.name().to_owned();
        let partition = self.lease.partition;
        let mut tx = self.begin(false).await?;
        let held = checkpoints::lock_if_at(&mut tx, &name, cursor, self.lease, self.parked_version)
            .await?;
        if held != checkpoints::Held::Ours {
            return Ok(None);
        }
        let version =
            parked::park(&mut tx, &name, partition, event, &failure.error, attempts).await?;
        checkpoints::advance(&mut tx, &name, partition, event.cursor(), 0).await?;
        tx.commit().await?;
        tracing::error!(
            consumer = name, partition, key = event.aggregate_id, position = event.position,
            error = %failure.error,
            "parked a key on a poison event; its later events wait, the others flow on"
        );
        self.parked.insert(
            event.aggregate_id.clone(),
            ParkedKey {
                cursor: event.cursor(),
                action: None,
            },
        );
        self.parked_version = version;
        Ok(Some(event.cursor()))
    }

    /// Carries out an operator's request on the parked `key`: applies its held events, from
    /// the parked one (retry) or the one after it (skip) up to the checkpoint at `checkpoint`,
    /// a page per transaction, then frees the key; where an event fails, the key is parked
    /// again there.
    async fn resolve(
        &mut self,
        checkpoint: Cursor,
        key: &str,
        mut wanted: ParkedKey,
    ) -> Result<Resolved, Failure> {
        let name = self.consumer.name().to_owned();
        let partition = self.lease.partition;
        let mut limit = self.batch_size();
        loop {
            let inclusive = wanted.action != Some(Action::Skip);
            let mut conn = self
                .pool
                .acquire()
                .await
                .map_err(|e| Failure::database(&e))?;
            let mut page = reader::read_key(
                &mut conn,
                self.partitions,
                key,
                wanted.cursor,
                inclusive,
                checkpoint,
                limit + 1,
            )
            .await
            .map_err(|e| Failure::database(&e))?;
            drop(conn);
            let next = if page.len() > usize::try_from(limit).unwrap_or(usize::MAX) {
                page.pop().map(|e| e.cursor())
            } else {
                None
            };
            let (page, mut tx) = self.deliver_and_begin(page).await?;
            let held = checkpoints::lock_if_at(
                &mut tx,
                &name,
                checkpoint,
                self.lease,
                self.parked_version,
            )
            .await
            .map_err(|e| Failure::database(&e))?;
            if held != checkpoints::Held::Ours {
                return Ok(Resolved::Reread);
            }
            if !page.is_empty() {
                if let Err(e) = self.consumer.apply(&mut tx, &page).await {
                    drop(tx);
                    if e.is::<Transient>() {
                        return Err(Failure::consumer(&e, page));
                    }
                    if page.len() > 1 {
                        // Find the event at fault: one at a time from here.
                        limit = 1;
                        continue;
                    }
                    let at = page[0].cursor();
                    let error = e.to_string();
                    let again = parked::failed(&self.pool, &name, key, wanted, at, &error)
                        .await
                        .map_err(|e| Failure::database(&e))?;
                    if !again {
                        return Ok(Resolved::Reread);
                    }
                    tracing::warn!(
                        consumer = name,
                        partition,
                        key,
                        position = at.position,
                        error,
                        "the retried key failed again; it stays parked"
                    );
                    self.parked.insert(
                        key.to_owned(),
                        ParkedKey {
                            cursor: at,
                            action: None,
                        },
                    );
                    return Ok(Resolved::Done);
                }
            }
            let resumed = parked::resume(&mut tx, &name, partition, key, wanted, next)
                .await
                .map_err(|e| Failure::database(&e))?;
            let Some(version) = resumed else {
                return Ok(Resolved::Reread);
            };
            checkpoints::count_applied(&mut tx, &name, partition, page.len())
                .await
                .map_err(|e| Failure::database(&e))?;
            tx.commit().await.map_err(|e| Failure::database(&e))?;
            self.parked_version = version;
            match next {
                None => {
                    tracing::info!(
                        consumer = name,
                        partition,
                        key,
                        "a parked key caught up and flows again"
                    );
                    self.parked.remove(key);
                    return Ok(Resolved::Done);
                }
                Some(cursor) => {
                    wanted = ParkedKey {
                        cursor,
                        action: Some(Action::Retry),
                    };
                    self.parked.insert(key.to_owned(), wanted);
                }
            }
        }
    }
}
