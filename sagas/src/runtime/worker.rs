//! The gateway worker: makes the payment-gateway calls sagas wait on when they are due. A call
//! in flight is claimed by a row (owner, fencing token, expiry), not held by a connection: the
//! worker claims due sagas in one statement, calls with no connection held, renews its claims
//! while calls run, and records each answer, with the commands that follow, only while its
//! token is still on the row.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

use aggregates::values::OrderId;
use event_log::crash;
use event_log::subscription::ConsumerError;
use event_store::{locks, EventStore};

use super::{drive, SagaConfig, Work, DUE_CHANNEL};
use crate::fulfillment::{Fulfillment, GatewayAnswer, GatewayOp};
use crate::gateway::{GatewayError, PaymentGateway};
use crate::store::{self, Claimed};

/// How long a claim runs unless renewed: how soon another process makes the call of one that
/// died or froze. Renewed every third of it while the call runs.
pub const CLAIM_TTL: Duration = Duration::from_secs(6);

/// Connections of the worker's pool for recording answers: a few serve any number of calls in
/// flight. Recording waits for the SKUs' locks behind the saga's pages; with 4 the saga
/// confirmed about a quarter fewer orders per second in the fulfillment bench than with 8.
/// Answers that find them all busy wait their turn (up to two minutes), since giving up would
/// make the call again.
pub const RECORD_CONNECTIONS: u32 = 8;

/// Connections of the worker's pool for its own bookkeeping: the LISTEN, claiming, renewing
/// and releasing claims. Apart from the recording pool, so that answers queueing for a
/// connection never hold up the renewals that keep their claims alive (a claim that expired
/// there was taken again and its call made twice).
pub const CONTROL_CONNECTIONS: u32 = 2;

/// The most answers one transaction records: enough that under load a few transactions a
/// second record every answer, few enough that the SKU locks a batch takes are held briefly.
pub const RECORD_BATCH: usize = 64;

/// Every connection the worker opens.
pub const POOL_CONNECTIONS: u32 = RECORD_CONNECTIONS + CONTROL_CONNECTIONS;

/// The gateway worker running in this process; [`GatewayWorker::shutdown`] stops it.
pub struct GatewayWorker {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

struct Worker {
    /// Recording answers.
    pool: PgPool,
    /// Listening, claiming, renewing, releasing.
    control: PgPool,
    gateway: Arc<dyn PaymentGateway>,
    config: SagaConfig,
    /// The name claims are taken under (`host:pid:random`, as lease owners).
    owner: String,
    /// Claims in flight here, by order: their tokens, renewed together.
    in_flight: Mutex<HashMap<OrderId, i64>>,
    /// Answers for the recorders.
    answers: mpsc::Sender<Answered>,
    /// Where the recorders take them from, one recorder at a time, as many as are waiting.
    waiting: tokio::sync::Mutex<mpsc::Receiver<Answered>>,
}

impl GatewayWorker {
    /// Starts the worker under `owner`. It opens its own pool of [`POOL_CONNECTIONS`] to
    /// `store`'s database, whatever `config.concurrency` (calls in flight) is, so calls never
    /// starve the API's pool.
    pub fn spawn(
        store: EventStore,
        gateway: Arc<dyn PaymentGateway>,
        config: SagaConfig,
        owner: String,
    ) -> Self {
        let options = (*store.pool().connect_options()).clone();
        let pool = PgPoolOptions::new()
            .max_connections(RECORD_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(120))
            // No ping per acquire, as `event_store::connect`.
            .test_before_acquire(false)
            .connect_lazy_with(options.clone());
        let control = PgPoolOptions::new()
            .max_connections(CONTROL_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(10))
            .test_before_acquire(false)
            .connect_lazy_with(options);
        let (stop, stopped) = watch::channel(false);
        let (answers, waiting) = mpsc::channel(config.concurrency.max(1));
        let worker = Arc::new(Worker {
            pool,
            control,
            gateway,
            config,
            owner,
            in_flight: Mutex::new(HashMap::new()),
            answers,
            waiting: tokio::sync::Mutex::new(waiting),
        });
        Self {
            task: tokio::spawn(worker.run(stopped)),
            stop,
        }
    }

    /// Stops taking calls, lets the calls in flight finish and record, and returns.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the gateway worker failed");
        }
    }
}

impl Worker {
    async fn run(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let mut listener = match PgListener::connect_with(&self.control).await {
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
        let mut recorders = JoinSet::new();
        for _ in 0..RECORD_CONNECTIONS {
            recorders.spawn(self.clone().recorder());
        }
        let mut tasks = JoinSet::new();
        let mut renew = tokio::time::interval(CLAIM_TTL / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whether to claim before waiting again: at the start, after a wake-up (a NOTIFY, the
        // poll, a claim that found rows) and when a call ends while every slot was taken. A
        // call that ends otherwise only frees a slot nobody waits for: claiming then would
        // cost two statements per order for nothing.
        let mut claim_now = true;
        let mut wait = self.config.idle_poll;
        while !*stopped.borrow() {
            let free = self.config.concurrency.saturating_sub(tasks.len());
            if claim_now && free > 0 {
                wait = self.config.idle_poll;
                let limit = i64::try_from(free).unwrap_or(i64::MAX);
                match store::claim(&self.control, &self.owner, CLAIM_TTL, limit).await {
                    Ok(claimed) if !claimed.is_empty() => {
                        let mut in_flight = self.in_flight();
                        for claim in claimed {
                            in_flight.insert(claim.saga.order_id(), claim.token);
                            tasks.spawn(self.clone().work(claim));
                        }
                        continue;
                    }
                    Ok(_) => {
                        if let Ok(Some(next)) = store::next_due(&self.control).await {
                            let until = (next - Utc::now()).to_std().unwrap_or_default();
                            wait = wait.min(until.max(Duration::from_millis(5)));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot claim due sagas"),
                }
            }
            let full = free == 0;
            claim_now = true;
            let started = tokio::time::Instant::now();
            tokio::select! {
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {
                    claim_now = full;
                    // The time waited counts against the wait for the next due call.
                    wait = wait.saturating_sub(started.elapsed());
                }
                _ = notified(listener.as_mut()) => {}
                _ = stopped.changed() => {}
                _ = renew.tick() => {
                    self.renew().await;
                    claim_now = false;
                    wait = wait.saturating_sub(started.elapsed());
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
        // Calls in flight finish and record; their claims are renewed meanwhile.
        loop {
            tokio::select! {
                joined = tasks.join_next() => if joined.is_none() { break },
                _ = renew.tick() => self.renew().await,
            }
        }
        // No call waits for a recorder any more.
        recorders.shutdown().await;
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<OrderId, i64>> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Extends every claim in flight here, in one statement.
    async fn renew(&self) {
        let held: Vec<(OrderId, i64)> = self.in_flight().iter().map(|(k, v)| (*k, *v)).collect();
        if let Err(e) = store::renew_claims(&self.control, &self.owner, &held, CLAIM_TTL).await {
            tracing::warn!(error = %e, "cannot renew the gateway claims");
        }
    }

    async fn work(self: Arc<Self>, claim: Claimed) {
        let order_id = claim.saga.order_id();
        let token = claim.token;
        if let Err(e) = self.step(claim).await {
            tracing::warn!(%order_id, error = %e, "gateway step failed; it will be retried");
            if let Err(e) = store::release_claim(&self.control, order_id, token).await {
                tracing::warn!(%order_id, error = %e, "cannot release the claim; it expires");
            }
        }
        // Only this claim's entry: the saga may have been claimed again for its next call.
        let mut in_flight = self.in_flight();
        if in_flight.get(&order_id) == Some(&token) {
            in_flight.remove(&order_id);
        }
    }

    /// Makes the claimed saga's pending call, holding no connection, then has a recorder record
    /// the answer and drive the saga on, if the claim is still ours, and waits until it did.
    async fn step(&self, claim: Claimed) -> Result<(), ConsumerError> {
        let Claimed { token, mut saga } = claim;
        let order_id = saga.order_id();
        let now = Utc::now();
        if saga.due().is_none_or(|due| due > now) {
            // Rescheduled by a page since it was claimed.
            store::release_claim(&self.control, order_id, token).await?;
            return Ok(());
        }
        let op = saga.pending_call(now);
        let answer = match op {
            Some(op) => {
                crash::point("before_gateway_call");
                let span = tracing::info_span!("gateway_call", %order_id, ?op);
                let answer = call(self.gateway.as_ref(), &saga, op)
                    .instrument(span)
                    .await;
                crash::point("after_gateway_call");
                Some((op, answer))
            }
            None => None,
        };
        let (done, recorded) = oneshot::channel();
        let answered = Answered {
            token,
            saga,
            answer,
            done,
        };
        if self.answers.send(answered).await.is_err() {
            return Err("the gateway worker's recorders stopped".into());
        }
        match recorded.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err("the answer's recorder stopped".into()),
        }
    }

    /// Records answers as they arrive, as many as are waiting (up to [`RECORD_BATCH`]) in one
    /// transaction, until the channel closes. [`RECORD_CONNECTIONS`] of these run at once.
    async fn recorder(self: Arc<Self>) {
        loop {
            let batch = {
                let mut answers = self.waiting.lock().await;
                let Some(first) = answers.recv().await else {
                    return;
                };
                let mut batch = vec![first];
                while batch.len() < RECORD_BATCH {
                    match answers.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                batch
            };
            let mut done = Vec::with_capacity(batch.len());
            let mut answered = Vec::with_capacity(batch.len());
            for a in batch {
                done.push(a.done);
                answered.push((a.token, a.saga, a.answer));
            }
            let result = self.record(answered).await.map_err(|e| e.to_string());
            if result.is_ok() {
                crash::point("after_gateway_record");
            }
            for sender in done {
                // The task may have ended (shutdown); then nobody waits for the answer.
                let _ = sender.send(result.clone());
            }
        }
    }

    /// Records gateway answers and drives their sagas on, in one transaction: every saga whose
    /// claim is still ours, and whatever they command next. A saga whose claim was taken over
    /// during its call is left out (the new claimant asks again with the same key).
    async fn record(&self, answered: Vec<Recording>) -> Result<(), ConsumerError> {
        let timing = &self.config.timing;
        let mut tx = locks::begin_writer(&self.pool).await?;
        // Everything the sagas may command, then their rows, locked before the first write in
        // the one lock order of every saga path (`Work::lock`): the consumer's pages take the
        // same. Their lines never change, so the copies claimed name the SKUs.
        let mut work = Work::new();
        let skus: Vec<&str> = answered
            .iter()
            .flat_map(|(_, saga, _)| saga.skus())
            .collect();
        let orders: Vec<String> = answered
            .iter()
            .map(|(_, saga, _)| saga.order_id().to_string())
            .collect();
        let orders: Vec<&str> = orders.iter().map(String::as_str).collect();
        work.lock(&mut tx, &skus, &orders).await?;
        let held: Vec<(OrderId, i64)> = answered
            .iter()
            .map(|(token, saga, _)| (saga.order_id(), *token))
            .collect();
        let mut locked: HashMap<OrderId, Fulfillment> = store::lock_claimed_many(&mut tx, &held)
            .await?
            .into_iter()
            .map(|saga| (saga.order_id(), saga))
            .collect();
        let mut recorded = Vec::with_capacity(locked.len());
        for (token, claimed, answer) in answered {
            let order_id = claimed.order_id();
            let Some(mut saga) = locked.remove(&order_id) else {
                tracing::warn!(%order_id, token, "the claim was taken over during the call; its answer is not recorded");
                continue;
            };
            if let Some((op, answer)) = answer {
                tracing::debug!(%order_id, ?op, ?answer, "gateway answered");
                saga.on_gateway(op, answer, timing, Utc::now());
            }
            drive(&mut work, &mut tx, &mut saga, timing).await?;
            recorded.push(saga);
        }
        work.flush(&mut tx).await?;
        let sagas: Vec<&Fulfillment> = recorded.iter().collect();
        store::save_claimed_many(&mut tx, &sagas).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// What a recorder records for one claim: its token, the saga as claimed, and the call made
/// with its answer (none when the saga was due without a call).
type Recording = (i64, Fulfillment, Option<(GatewayOp, GatewayAnswer)>);

/// A gateway answer waiting to be recorded, and where to say how recording went.
struct Answered {
    token: i64,
    saga: Fulfillment,
    answer: Option<(GatewayOp, GatewayAnswer)>,
    done: oneshot::Sender<Result<(), String>>,
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
