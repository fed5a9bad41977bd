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
//!   worker claims the saga's row (owner, fencing token, expiry, renewed while the call runs),
//!   calls holding no connection, then records the answer and the commands that follow in one
//!   transaction, if its token is still on the row. If it dies in between, the claim expires and
//!   the call is made again with the same idempotency key: the provider answers as before and
//!   charges nothing twice.
//!
//! Both drive the saga the same way (`drive` here): ask it for the next action, perform the
//! aggregate command in the caller's transaction, report the outcome, until it waits.

use std::time::Duration;

use chrono::Utc;
use sqlx::PgConnection;
use uuid::Uuid;

use aggregates::inventory::Product;
use aggregates::order::Order;
use aggregates::payment::Payment;
use event_store::store::LoadMany;
use event_store::unit_of_work::UnitOfWork;
use event_store::{Metadata, StoreError, StoredAggregate};

use crate::fulfillment::{
    order_verdict, payment_verdict, product_verdict, Action, Command, Fulfillment, Outcome, Timing,
    Unforeseen,
};

mod consumer;
mod worker;

pub use consumer::FulfillmentConsumer;
pub use worker::{GatewayWorker, CLAIM_TTL, POOL_CONNECTIONS as GATEWAY_POOL_CONNECTIONS};

/// The consumer name (checkpoint and lease key) of the saga.
pub const CONSUMER_NAME: &str = "fulfillment";

/// The NOTIFY channel that announces a due gateway call (see the `sagas` migration).
pub const DUE_CHANNEL: &str = "orderline_saga_due";

/// How the saga runs.
#[derive(Debug, Clone)]
pub struct SagaConfig {
    /// Deadlines, retries and when to give up.
    pub timing: Timing,
    /// Gateway calls in flight at once in this process (`ORDERLINE_GATEWAY_CONCURRENCY`). A call
    /// holds no connection, only its claim row, so this is independent of the pool's size.
    pub concurrency: usize,
    /// Longest sleep of the gateway worker when no NOTIFY arrives.
    pub idle_poll: Duration,
}

impl Default for SagaConfig {
    fn default() -> Self {
        Self {
            timing: Timing::default(),
            concurrency: 256,
            idle_poll: Duration::from_millis(500),
        }
    }
}

/// What performing one action amounted to.
enum Performed {
    /// An aggregate command ran; report its outcome to the saga.
    Outcome(Outcome),
    /// An aggregate refused in a way the saga does not foresee ([`Fulfillment::refused`]).
    Refused {
        /// The step's name (`reserve/SKU`, ...).
        step: String,
        /// The refusal.
        why: Unforeseen,
    },
    /// The saga waits (for a gateway call or an order event).
    Stop,
}

/// Advances `saga` as far as it goes without the gateway, sending its aggregate commands in
/// `conn`'s transaction.
pub(crate) async fn drive(
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
            Performed::Refused { step, why } => {
                tracing::warn!(order_id = %saga.order_id(), step, %why, "unforeseen refusal");
                saga.refused(&action, format_args!("{step}: {why}"), now);
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
        Err(why) => Performed::Refused { step, why },
    })
}

/// The aggregates one transaction has locked so far.
pub(crate) struct Work {
    pub(crate) unit: UnitOfWork,
}

impl Work {
    pub(crate) fn new() -> Self {
        Self {
            unit: UnitOfWork::new(),
        }
    }

    /// Locks and loads, before the transaction's first write, every aggregate its sagas may
    /// command: the SKUs, then the payments and then the orders of `orders`, each kind in
    /// lock-key order, in two round trips. Then the caller locks the saga rows (`store::lock_many`, by order id).
    /// That is the one lock order of every saga path (the consumer's page, the gateway
    /// worker), so two of them never wait on each other crosswise; the command API holds one
    /// order's lock alone. The aggregate locks are advisory and come first because a row lock
    /// gives the transaction an id, and a transaction with an id that then waits for an
    /// aggregate must start over if a younger one appended to it meanwhile (ADR 1).
    pub(crate) async fn lock(
        &mut self,
        conn: &mut PgConnection,
        skus: &[&str],
        orders: &[&str],
    ) -> Result<(), StoreError> {
        let mut wanted = LoadMany::new();
        wanted
            .add::<Product>(skus)
            .add::<Payment>(orders)
            .add::<Order>(orders);
        self.unit.prefetch(conn, &wanted).await
    }

    /// Writes the events of every command sent so far, in one statement; before the commit.
    pub(crate) async fn flush(&mut self, conn: &mut PgConnection) -> Result<(), StoreError> {
        self.unit.flush(conn).await
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
