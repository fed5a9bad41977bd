//! Runs the fulfillment saga against Postgres and a payment gateway.
//!
//! Two parts, both safe to run in several processes at once:
//! - [`FulfillmentConsumer`] follows the global log through the checkpointed subscription runner
//!   (one leader at a time). On `OrderPlaced`, `OrderCancelled` and `OrderShipped` it advances
//!   the saga and sends the aggregate commands that follow (reservations, payment request,
//!   rejection, releases, ...) in the page's transaction: saga row, events and checkpoint commit
//!   together, so a step is done exactly once whatever crashes.
//! - [`GatewayWorker`] makes the gateway calls sagas wait on, when due. A call cannot be inside
//!   a transaction (it is slow, and an open transaction would hold back every log reader), so the
//!   worker holds a session advisory lock on the saga while it calls, then records the answer
//!   and the commands that follow in one transaction. If it dies in between, the lock goes with
//!   its connection and the call is made again with the same idempotency key: the provider
//!   answers as before and charges nothing twice.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use uuid::Uuid;

use aggregates::inventory::Product;
use aggregates::order::{Order, OrderEvent};
use aggregates::payment::Payment;
use aggregates::values::OrderId;
use event_log::subscription::{Consumer, ConsumerError, Transient};
use event_log::{crash, LogEvent};
use event_store::unit_of_work::UnitOfWork;
use event_store::{locks, EventStore, Metadata, StoreError, StoredAggregate};

use crate::fulfillment::{
    order_verdict, payment_verdict, product_verdict, Action, Command, Fulfillment, GatewayAnswer,
    GatewayOp, Outcome, Timing,
};
use crate::gateway::{GatewayError, PaymentGateway};
use crate::store;

/// The consumer name (checkpoint and lease key) of the saga.
pub const CONSUMER_NAME: &str = "fulfillment";

/// The NOTIFY channel that announces a due gateway call (see the `sagas` migration).
pub const DUE_CHANNEL: &str = "orderline_saga_due";

/// How the saga runs.
#[derive(Debug, Clone)]
pub struct SagaConfig {
    /// Deadlines, retries and when to give up.
    pub timing: Timing,
    /// Gateway calls in flight at once in this process (each holds a connection).
    pub concurrency: usize,
    /// Longest sleep of the gateway worker when no NOTIFY arrives.
    pub idle_poll: Duration,
}

impl Default for SagaConfig {
    fn default() -> Self {
        Self {
            timing: Timing::default(),
            concurrency: 8,
            idle_poll: Duration::from_millis(500),
        }
    }
}

/// What performing one action amounted to.
enum Performed {
    /// An aggregate command ran; report its outcome to the saga.
    Outcome(Outcome),
    /// An aggregate refused in a way the saga does not foresee ([`Fulfillment::refused`]).
    Refused(String),
    /// The saga waits (for a gateway call or an order event).
    Stop,
}

/// Advances `saga` as far as it goes without the gateway, sending its aggregate commands in
/// `conn`'s transaction.
async fn drive(
    work: &mut Work,
    conn: &mut PgConnection,
    saga: &mut Fulfillment,
    timing: &Timing,
) -> Result<(), StoreError> {
    // Each step moves the saga strictly forward; a few hundred bound even a 100-line order
    // reserved and released. Hitting the bound means a bug, and the saga is parked, not spun.
    for _ in 0..1000 {
        let now = Utc::now();
        let action = saga.next(now);
        match perform(work, conn, saga, &action).await? {
            Performed::Outcome(outcome) => saga.record(&action, outcome, timing, now),
            Performed::Refused(why) => {
                tracing::warn!(order_id = %saga.order_id(), why, "unforeseen refusal");
                saga.refused(&action, why, now);
                if saga.is_stuck() {
                    tracing::error!(order_id = %saga.order_id(), "saga parked");
                    return Ok(());
                }
            }
            Performed::Stop => return Ok(()),
        }
    }
    saga.halt("the saga did not settle in 1000 steps", Utc::now());
    Ok(())
}

/// Sends the aggregate command behind `action`.
async fn perform(
    work: &mut Work,
    conn: &mut PgConnection,
    saga: &Fulfillment,
    action: &Action,
) -> Result<Performed, StoreError> {
    let Some((step, command)) = saga.command(action) else {
        return Ok(Performed::Stop);
    };
    let meta = metadata(saga, &step);
    let order = saga.order_id().to_string();
    let verdict = match command {
        Command::Product { sku, command } => product_verdict(
            work.run::<Product>(conn, sku.as_str(), command, &meta)
                .await?,
        ),
        Command::Order(command) => {
            order_verdict(work.run::<Order>(conn, &order, command, &meta).await?)
        }
        Command::Payment(command) => {
            payment_verdict(work.run::<Payment>(conn, &order, command, &meta).await?)
        }
    };
    Ok(match verdict {
        Ok(outcome) => Performed::Outcome(outcome),
        Err(why) => Performed::Refused(format!("{step}: {why}")),
    })
}

/// The aggregates one transaction has locked so far.
struct Work {
    unit: UnitOfWork,
}

impl Work {
    fn new() -> Self {
        Self {
            unit: UnitOfWork::new(),
        }
    }

    async fn run<A: StoredAggregate<Services = ()> + Send + Sync + 'static>(
        &mut self,
        conn: &mut PgConnection,
        id: &str,
        command: A::Command,
        metadata: &Metadata,
    ) -> Result<Result<(), A::Error>, StoreError> {
        Ok(self
            .unit
            .execute::<A>(conn, id, command, metadata)
            .await?
            .map(|_| ()))
    }
}

/// The metadata of a saga command. The request id names the saga and the step
/// (`saga:{order}/{step}`), and the causation id is derived from it: both are the same however
/// often the step is tried.
fn metadata(saga: &Fulfillment, step: &str) -> Metadata {
    let request_id = format!("saga:{}/{step}", saga.order_id());
    Metadata {
        correlation_id: saga.correlation_id(),
        causation_id: Uuid::new_v5(&Uuid::NAMESPACE_OID, request_id.as_bytes()),
        actor_sub: CONSUMER_NAME.to_owned(),
        actor_role: "service".to_owned(),
        request_id,
    }
}

/// The saga's log consumer. Guarantee: transactional (saga rows and commands commit with the
/// checkpoint).
pub struct FulfillmentConsumer {
    timing: Timing,
}

impl FulfillmentConsumer {
    /// A consumer that writes, inside the runner's transactions, with `timing`'s deadlines.
    pub fn new(timing: Timing) -> Self {
        Self { timing }
    }

    async fn advance(
        &self,
        work: &mut Work,
        tx: &mut PgConnection,
        order_id: OrderId,
        change: impl FnOnce(&mut Fulfillment),
    ) -> Result<(), ConsumerError> {
        let Some(mut saga) = store::lock(tx, order_id).await? else {
            // Orders placed before the saga existed have no saga; nothing to compensate.
            tracing::warn!(%order_id, "order event without a saga; ignored");
            return Ok(());
        };
        change(&mut saga);
        drive(work, tx, &mut saga, &self.timing)
            .await
            .map_err(retry_conflicts)?;
        store::save(tx, &saga).await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Consumer for FulfillmentConsumer {
    fn name(&self) -> &str {
        CONSUMER_NAME
    }

    /// An order placement costs the saga a dozen statements; 50 keep a page's transaction (and
    /// the stock locks it holds) to tens of milliseconds.
    fn max_batch(&self) -> Option<i64> {
        Some(50)
    }

    async fn apply(&self, tx: &mut PgConnection, events: &[LogEvent]) -> Result<(), ConsumerError> {
        let mut work = Work::new();
        let mut current = Vec::with_capacity(events.len());
        LogEvent::for_each_current(events, |e| -> Result<(), ConsumerError> {
            if e.aggregate_type == <Order as cqrs_es::Aggregate>::TYPE {
                current.push(e.clone());
            }
            Ok(())
        })?;
        let decoded = current
            .iter()
            .map(|e| Ok((e, e.decode::<OrderEvent>()?)))
            .collect::<Result<Vec<_>, ConsumerError>>()?;
        // Every SKU the page's placements reserve and every payment they request, locked and
        // loaded up front in four round trips rather than two per aggregate.
        let mut skus = Vec::new();
        let mut payments = Vec::new();
        for (_, event) in &decoded {
            if let OrderEvent::OrderPlaced {
                order_id, lines, ..
            } = event
            {
                skus.extend(lines.iter().map(|l| l.sku.as_str().to_owned()));
                payments.push(order_id.to_string());
            }
        }
        let skus: Vec<&str> = skus.iter().map(String::as_str).collect();
        let payments: Vec<&str> = payments.iter().map(String::as_str).collect();
        work.unit
            .prefetch::<Product>(tx, &skus)
            .await
            .map_err(retry_conflicts)?;
        work.unit
            .prefetch::<Payment>(tx, &payments)
            .await
            .map_err(retry_conflicts)?;
        for (event, decoded) in decoded {
            let now = Utc::now();
            match decoded {
                OrderEvent::OrderPlaced {
                    order_id,
                    lines,
                    total,
                    payment_token,
                    ..
                } => {
                    let correlation_id = serde_json::from_str::<Metadata>(event.metadata.get())
                        .map(|m| m.correlation_id)
                        .unwrap_or(event.event_id);
                    let mut saga = Fulfillment::start(
                        order_id,
                        correlation_id,
                        &lines,
                        total,
                        payment_token,
                        now,
                    );
                    if !store::insert(tx, &saga).await? {
                        continue;
                    }
                    drive(&mut work, tx, &mut saga, &self.timing)
                        .await
                        .map_err(retry_conflicts)?;
                    store::save(tx, &saga).await?;
                }
                OrderEvent::OrderCancelled { .. } => {
                    let id = order_id_of(event)?;
                    self.advance(&mut work, tx, id, |s| s.on_cancelled(now))
                        .await?;
                }
                OrderEvent::OrderShipped { .. } => {
                    let id = order_id_of(event)?;
                    self.advance(&mut work, tx, id, |s| s.on_shipped(now))
                        .await?;
                }
                OrderEvent::OrderConfirmed | OrderEvent::OrderRejected { .. } => {}
            }
        }
        Ok(())
    }
}

/// A conflict, or a deadlock Postgres broke by aborting this transaction, says nothing about
/// the events: the page is tried again, whole, never parked.
fn retry_conflicts(error: StoreError) -> ConsumerError {
    match &error {
        StoreError::Conflict => Box::new(Transient(error.to_string())),
        StoreError::Database(sqlx::Error::Database(db))
            if db.code().as_deref() == Some("40P01") =>
        {
            Box::new(Transient(error.to_string()))
        }
        _ => Box::new(error),
    }
}

fn order_id_of(event: &LogEvent) -> Result<OrderId, ConsumerError> {
    Ok(OrderId::from(Uuid::parse_str(&event.aggregate_id)?))
}

/// The gateway worker running in this process; [`GatewayWorker::shutdown`] stops it.
pub struct GatewayWorker {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

struct Worker {
    pool: PgPool,
    gateway: Arc<dyn PaymentGateway>,
    config: SagaConfig,
    in_flight: Mutex<HashSet<OrderId>>,
}

impl GatewayWorker {
    /// Starts the worker. It opens its own connections (up to `config.concurrency + 1`) to
    /// `store`'s database, so calls in flight never starve the API's pool.
    pub fn spawn(store: EventStore, gateway: Arc<dyn PaymentGateway>, config: SagaConfig) -> Self {
        let options = (*store.pool().connect_options()).clone();
        let pool = PgPoolOptions::new()
            .max_connections(u32::try_from(config.concurrency + 1).unwrap_or(u32::MAX))
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options);
        let (stop, stopped) = watch::channel(false);
        let worker = Arc::new(Worker {
            pool,
            gateway,
            config,
            in_flight: Mutex::new(HashSet::new()),
        });
        Self {
            task: tokio::spawn(worker.run(stopped)),
            stop,
        }
    }

    /// Stops taking calls, lets the calls in flight finish, and returns.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the gateway worker failed");
        }
    }
}

impl Worker {
    async fn run(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let mut listener = match PgListener::connect_with(&self.pool).await {
            Ok(mut l) => match l.listen(DUE_CHANNEL).await {
                Ok(()) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot LISTEN; the gateway worker polls");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot LISTEN; the gateway worker polls");
                None
            }
        };
        let mut tasks = JoinSet::new();
        while !*stopped.borrow() {
            let free = self.config.concurrency.saturating_sub(tasks.len());
            let mut wait = self.config.idle_poll;
            if free > 0 {
                match self.claimable(free).await {
                    Ok(ids) if !ids.is_empty() => {
                        for id in ids {
                            tasks.spawn(self.clone().work(id));
                        }
                        continue;
                    }
                    Ok(_) => {
                        if let Ok(Some(next)) = store::next_due(&self.pool).await {
                            let until = (next - Utc::now()).to_std().unwrap_or_default();
                            wait = wait.min(until.max(Duration::from_millis(5)));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read due sagas"),
                }
            }
            tokio::select! {
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = notified(listener.as_mut()) => {}
                _ = stopped.changed() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Due sagas not already in flight here, at most `free`; marks them in flight.
    async fn claimable(&self, free: usize) -> sqlx::Result<Vec<OrderId>> {
        let due = store::due(&self.pool, i64::try_from(free * 2).unwrap_or(64)).await?;
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        Ok(due
            .into_iter()
            .filter(|id| in_flight.insert(*id))
            .take(free)
            .collect())
    }

    async fn work(self: Arc<Self>, order_id: OrderId) {
        if let Err(e) = self.work_locked(order_id).await {
            tracing::warn!(%order_id, error = %e, "gateway step failed; it will be retried");
        }
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        in_flight.remove(&order_id);
    }

    /// Takes the saga's call lock, does its step, and lets go of the lock.
    async fn work_locked(&self, order_id: OrderId) -> Result<(), ConsumerError> {
        let mut conn = self.pool.acquire().await?;
        let key = order_id.to_string();
        if !locks::try_session(&mut conn, locks::GATEWAY_CALL, &key).await? {
            // Another process is calling for this saga.
            return Ok(());
        }
        let result = self.step(&mut conn, order_id).await;
        let unlocked = locks::unlock_session(&mut conn, locks::GATEWAY_CALL, &key).await;
        if !matches!(unlocked, Ok(true)) {
            // Closing the connection releases the lock for sure.
            drop(conn.detach());
        }
        result
    }

    async fn step(&self, conn: &mut PgConnection, order_id: OrderId) -> Result<(), ConsumerError> {
        let timing = &self.config.timing;
        let Some(mut saga) = store::read(conn, order_id).await? else {
            return Ok(());
        };
        let now = Utc::now();
        if saga.due().is_none_or(|due| due > now) {
            // Done or rescheduled by someone else since it was listed.
            return Ok(());
        }
        let op = saga.pending_call(now);
        let answer = match op {
            Some(op) => {
                crash::point("before_gateway_call");
                let answer = call(self.gateway.as_ref(), &saga, op).await;
                crash::point("after_gateway_call");
                Some((op, answer))
            }
            None => None,
        };
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let Some(mut saga) = store::lock(&mut tx, order_id).await? else {
            return Ok(());
        };
        if let Some((op, answer)) = answer {
            tracing::debug!(%order_id, ?op, ?answer, "gateway answered");
            saga.on_gateway(op, answer, timing, Utc::now());
        }
        drive(&mut Work::new(), &mut tx, &mut saga, timing).await?;
        store::save(&mut tx, &saga).await?;
        tx.commit().await?;
        crash::point("after_gateway_record");
        Ok(())
    }
}

async fn notified(listener: Option<&mut PgListener>) {
    match listener {
        Some(l) => {
            if l.recv().await.is_err() {
                // The listener reconnects on its next recv; do not spin meanwhile.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Makes the gateway call `op` for `saga`, with the op's idempotency key.
async fn call(gateway: &dyn PaymentGateway, saga: &Fulfillment, op: GatewayOp) -> GatewayAnswer {
    let key = op.key(saga.order_id());
    let settled = |result: Result<(), GatewayError>| match result {
        Ok(()) => GatewayAnswer::Done,
        Err(e) => GatewayAnswer::Failed(e),
    };
    let no_reference =
        || GatewayAnswer::Failed(GatewayError::Permanent("no authorization reference".into()));
    match op {
        GatewayOp::Authorize => match gateway.authorize(&key, saga.token(), saga.amount()).await {
            Ok(decision) => GatewayAnswer::Decided(decision),
            Err(e) => GatewayAnswer::Failed(e),
        },
        GatewayOp::Retrieve => match gateway.retrieve(&key).await {
            Ok(Some(decision)) => GatewayAnswer::Decided(decision),
            Ok(None) => GatewayAnswer::NotFound,
            Err(e) => GatewayAnswer::Failed(e),
        },
        GatewayOp::Void => match saga.reference() {
            Some(reference) => settled(gateway.void(&key, reference).await),
            None => no_reference(),
        },
        GatewayOp::Capture => match saga.reference() {
            Some(reference) => settled(gateway.capture(&key, reference, saga.amount()).await),
            None => no_reference(),
        },
        GatewayOp::Refund => match saga.reference() {
            Some(reference) => settled(gateway.refund(&key, reference, saga.amount()).await),
            None => no_reference(),
        },
    }
}
