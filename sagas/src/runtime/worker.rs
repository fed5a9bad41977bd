//! The gateway worker: makes the payment-gateway calls sagas wait on when they are due, one
//! saga at a time under its call lock, and records each answer with the commands that follow.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

use aggregates::values::OrderId;
use event_log::crash;
use event_log::subscription::ConsumerError;
use event_store::{locks, EventStore};

use super::{drive, SagaConfig, Work, DUE_CHANNEL};
use crate::fulfillment::{Fulfillment, GatewayAnswer, GatewayOp};
use crate::gateway::{GatewayError, PaymentGateway};
use crate::store;

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
                let span = tracing::info_span!("gateway_call", %order_id, ?op);
                let answer = call(self.gateway.as_ref(), &saga, op)
                    .instrument(span)
                    .await;
                crash::point("after_gateway_call");
                Some((op, answer))
            }
            None => None,
        };
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        // Recording the answer may append events: announce before the saga row is locked.
        locks::announce_writer(&mut tx).await?;
        // Everything the saga may command, then its row, locked before the first write in the
        // one lock order of every saga path (`Work::lock`): the consumer's pages take the same.
        // Its lines never change, so the copy read before the call names the SKUs.
        let mut work = Work::new();
        let skus: Vec<&str> = saga.skus().collect();
        let order = order_id.to_string();
        work.lock(&mut tx, &skus, &[order.as_str()]).await?;
        let Some(mut saga) = store::lock(&mut tx, order_id).await? else {
            return Ok(());
        };
        if let Some((op, answer)) = answer {
            tracing::debug!(%order_id, ?op, ?answer, "gateway answered");
            saga.on_gateway(op, answer, timing, Utc::now());
        }
        drive(&mut work, &mut tx, &mut saga, timing).await?;
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
