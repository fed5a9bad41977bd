//! The order fulfillment saga as a pure state machine: no I/O, no clock, no randomness.
//!
//! | step | action | compensation |
//! |---|---|---|
//! | 1. reserve stock | reserve each line's SKU, in SKU order | release what was reserved |
//! | 2. authorize payment | ask the gateway, retrying transient errors until the deadline | void the authorization (refund if captured) |
//! | 3. confirm order | mark the order confirmed | none: the last step cannot fail for business reasons |
//!
//! A failed step (out of stock, declined, payment failed, deadline passed) runs the
//! compensations of the steps before it, newest first, and then rejects the order with the
//! reason. A cancellation (order `pending` or `confirmed`) runs the same compensations. A
//! shipment commits the reservations and captures the payment.
//!
//! The runtime ([`crate::runtime`]) asks [`Fulfillment::next`] what to do, does it (an aggregate
//! command in its transaction, or a gateway call), and reports back with [`Fulfillment::record`]
//! or [`Fulfillment::on_gateway`]. Each aggregate command is derived from the saga and the step,
//! so doing it again changes nothing (see [`Action`]).

use std::collections::VecDeque;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use aggregates::inventory::{ProductCommand, ProductError};
use aggregates::order::{OrderCommand, OrderError, OrderLine, OrderStatus, RejectionReason};
use aggregates::payment::{AttemptOutcome, PaymentCommand, PaymentError};
use aggregates::values::{Money, OrderId, PaymentToken, Quantity, Sku};

use crate::gateway::{Authorization, GatewayError};

/// Timing rules of the saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long authorization may take, retries included, before the order is rejected with
    /// `payment_failed`.
    pub authorization_deadline: Duration,
    /// First retry delay after a gateway failure; doubles per failure.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_cap: Duration,
    /// Failed gateway calls in a row after which a compensation or settlement (void, refund,
    /// capture) stops and the saga is parked as stuck for an operator.
    pub settlement_attempts: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            authorization_deadline: Duration::seconds(60),
            retry_base: Duration::milliseconds(200),
            retry_cap: Duration::seconds(10),
            settlement_attempts: 8,
        }
    }
}

/// One order line as the saga needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// The SKU.
    pub sku: Sku,
    /// Units.
    pub quantity: Quantity,
}

/// What the saga is working towards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "goal", content = "reason")]
pub enum Goal {
    /// Reserve, authorize, confirm.
    Confirm,
    /// Compensate, then reject the order with the reason.
    Reject(RejectionReason),
    /// The order was cancelled: compensate.
    Cancel,
    /// The order shipped: commit the reservations, capture the payment.
    Ship,
}

/// Where the payment is, as far as the saga knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum PaymentProgress {
    /// Not requested yet.
    NotRequested,
    /// Requested; authorization not settled. `unknown` is set when the last call's outcome was
    /// lost, so the next call asks the provider instead of assuming anything.
    Requested {
        /// The last authorization call's outcome is unknown.
        unknown: bool,
    },
    /// Authorized; `reference` names it at the provider.
    Authorized {
        /// The provider's reference.
        reference: String,
    },
    /// Declined or failed for good; nothing is held.
    Refused,
    /// The authorization was released.
    Voided,
    /// The money was taken.
    Captured {
        /// The provider's reference.
        reference: String,
    },
    /// The captured money was given back.
    Refunded,
}

/// A call to the payment gateway the saga waits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayOp {
    /// Authorize the order total.
    Authorize,
    /// Ask what became of the authorization (after a lost answer, or before compensating).
    Retrieve,
    /// Release the authorization.
    Void,
    /// Take the authorized money.
    Capture,
    /// Give captured money back.
    Refund,
}

impl GatewayOp {
    /// The idempotency key of this operation for an order: the same on every retry and after
    /// every restart, so the provider does it at most once. Authorize and retrieve share a key:
    /// retrieve asks about that very authorization.
    pub fn key(self, order_id: OrderId) -> String {
        let op = match self {
            Self::Authorize | Self::Retrieve => "authorize",
            Self::Void => "void",
            Self::Capture => "capture",
            Self::Refund => "refund",
        };
        format!("{order_id}/{op}")
    }
}

/// What a gateway call answered, as fed back to the saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayAnswer {
    /// Authorize or retrieve found a decision.
    Decided(Authorization),
    /// Retrieve: the provider never received the authorization.
    NotFound,
    /// Void, capture or refund was done.
    Done,
    /// The call failed; see the error's kind.
    Failed(GatewayError),
}

/// A bookkeeping command for the payment aggregate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "record")]
pub enum PaymentRecord {
    /// An authorization attempt ended.
    Attempt {
        /// Deterministic: the gateway key and the attempt number.
        attempt_id: String,
        /// How it ended.
        outcome: AttemptOutcome,
    },
    /// The authorization was voided.
    Voided,
    /// The total was captured.
    Captured,
    /// The total was refunded.
    Refunded,
}

/// The next thing the runtime must do for a saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Reserve `quantity` of `sku` for the order (reservations are keyed by order: a repeat is
    /// a no-op). Report [`Outcome::Done`] or [`Outcome::Refused`] (not enough stock).
    Reserve {
        /// The SKU.
        sku: Sku,
        /// Units.
        quantity: Quantity,
    },
    /// Release the order's reservation on `sku` (releasing nothing is a no-op).
    Release {
        /// The SKU.
        sku: Sku,
    },
    /// Commit the order's reservation on `sku`: the units left with the shipment.
    CommitReservation {
        /// The SKU.
        sku: Sku,
    },
    /// Open the order's payment.
    RequestPayment {
        /// The order total.
        amount: Money,
        /// The customer's token.
        token: PaymentToken,
    },
    /// Record a gateway outcome on the payment aggregate (idempotent by attempt id/status).
    Record(PaymentRecord),
    /// Confirm the order. Report [`Outcome::Refused`] if the order was cancelled meanwhile.
    ConfirmOrder,
    /// Reject the order. Report [`Outcome::Refused`] if the order was cancelled meanwhile.
    RejectOrder {
        /// Why.
        reason: RejectionReason,
    },
    /// Call the gateway at `due` (not before); the saga waits for [`Fulfillment::on_gateway`].
    Call {
        /// What to call.
        op: GatewayOp,
        /// When.
        due: DateTime<Utc>,
    },
    /// Nothing to do until an order event arrives (confirmed, or finished, or stuck).
    Wait,
}

/// How an aggregate command of the saga ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done (or had been done already).
    Done,
    /// Refused for a business reason: out of stock for a reservation, order already cancelled
    /// for a confirmation or rejection.
    Refused,
}

/// An aggregate command of the saga, addressed to its aggregate.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// To the inventory aggregate of `sku`.
    Product {
        /// The SKU.
        sku: Sku,
        /// The command.
        command: ProductCommand,
    },
    /// To the order.
    Order(OrderCommand),
    /// To the order's payment.
    Payment(PaymentCommand),
}

/// How the saga reads an aggregate's answer: an [`Outcome`], or the reason to park the saga
/// when the refusal is not one the process foresees.
pub type Verdict = Result<Outcome, String>;

/// Reads an inventory aggregate's answer. Running out of stock (or a SKU that left the
/// catalog) refuses a reservation; any other refusal parks the saga.
pub fn product_verdict(result: Result<(), ProductError>) -> Verdict {
    match result {
        Ok(()) => Ok(Outcome::Done),
        Err(ProductError::OutOfStock { .. } | ProductError::NotRegistered) => Ok(Outcome::Refused),
        Err(other) => Err(other.to_string()),
    }
}

/// Reads the order's answer. A confirmation or rejection refused because the order was
/// cancelled meanwhile is an expected race; any other refusal parks the saga.
pub fn order_verdict(result: Result<(), OrderError>) -> Verdict {
    match result {
        Ok(()) => Ok(Outcome::Done),
        Err(OrderError::CannotConfirm(OrderStatus::Cancelled))
        | Err(OrderError::CannotReject(OrderStatus::Cancelled)) => Ok(Outcome::Refused),
        Err(other) => Err(other.to_string()),
    }
}

/// Reads the payment's answer. A payment requested already was requested by this saga; any
/// other refusal parks the saga.
pub fn payment_verdict(result: Result<(), PaymentError>) -> Verdict {
    match result {
        Ok(()) | Err(PaymentError::AlreadyRequested) => Ok(Outcome::Done),
        Err(other) => Err(other.to_string()),
    }
}

/// The saga's overall state, for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaState {
    /// Moving forward: reserving, authorizing, confirming.
    Running,
    /// Undoing steps after a failure or a cancellation.
    Compensating,
    /// The order is confirmed; waiting for shipment or cancellation.
    Confirmed,
    /// Shipping: committing stock and capturing the payment.
    Settling,
    /// Nothing left to do: shipped, rejected or cancelled.
    Completed,
    /// A compensation or settlement kept failing; an operator must look (and may retry).
    Stuck,
}

impl SagaState {
    /// The lowercase name used in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Confirmed => "confirmed",
            Self::Settling => "settling",
            Self::Completed => "completed",
            Self::Stuck => "stuck",
        }
    }

    /// Parses [`SagaState::as_str`]'s names.
    pub fn parse(raw: &str) -> Option<Self> {
        [
            Self::Running,
            Self::Compensating,
            Self::Confirmed,
            Self::Settling,
            Self::Completed,
            Self::Stuck,
        ]
        .into_iter()
        .find(|s| s.as_str() == raw)
    }
}

/// One entry of a saga's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// When.
    pub at: DateTime<Utc>,
    /// What happened, in words.
    pub what: String,
}

/// How many history entries a saga keeps; retries of a flaky provider would otherwise grow it
/// without bound. The oldest go first, except the first (the start).
const HISTORY_LIMIT: usize = 40;

/// The state of one order's fulfillment. Persisted as JSON after every change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fulfillment {
    order_id: OrderId,
    /// The correlation id of the order's placement; every command of the saga carries it.
    correlation_id: Uuid,
    /// Sorted by SKU: every saga reserves in the same order.
    lines: Vec<Line>,
    amount: Money,
    token: PaymentToken,
    goal: Goal,
    /// `lines[..reserved]` are reserved.
    reserved: usize,
    /// `lines[..committed]` are committed (shipment).
    committed: usize,
    payment: PaymentProgress,
    /// Whether the order aggregate was confirmed or closed (rejected, cancelled) by anyone.
    order_settled: bool,
    /// Authorization attempts recorded on the payment aggregate.
    attempts: u32,
    /// Failed gateway calls in a row (reset by an answer).
    failures: u32,
    /// When the pending gateway call may run.
    due: Option<DateTime<Utc>>,
    /// When authorization gives up.
    deadline: Option<DateTime<Utc>>,
    /// Payment bookkeeping waiting to be recorded, oldest first.
    to_record: VecDeque<PaymentRecord>,
    /// Why the saga is stuck, if it is.
    stuck: Option<String>,
    last_error: Option<String>,
    history: Vec<Entry>,
}

impl Fulfillment {
    /// Starts the saga for a placed order.
    pub fn start(
        order_id: OrderId,
        correlation_id: Uuid,
        lines: &[OrderLine],
        amount: Money,
        token: PaymentToken,
        now: DateTime<Utc>,
    ) -> Self {
        let mut lines: Vec<Line> = lines
            .iter()
            .map(|l| Line {
                sku: l.sku.clone(),
                quantity: l.quantity,
            })
            .collect();
        lines.sort_by(|a, b| a.sku.cmp(&b.sku));
        let mut saga = Self {
            order_id,
            correlation_id,
            lines,
            amount,
            token,
            goal: Goal::Confirm,
            reserved: 0,
            committed: 0,
            payment: PaymentProgress::NotRequested,
            order_settled: false,
            attempts: 0,
            failures: 0,
            due: None,
            deadline: None,
            to_record: VecDeque::new(),
            stuck: None,
            last_error: None,
            history: Vec::new(),
        };
        saga.note(now, "started");
        saga
    }

    /// The order.
    pub fn order_id(&self) -> OrderId {
        self.order_id
    }

    /// The correlation id of the order's placement.
    pub fn correlation_id(&self) -> Uuid {
        self.correlation_id
    }

    /// What the saga works towards.
    pub fn goal(&self) -> Goal {
        self.goal
    }

    /// Where the payment is.
    pub fn payment(&self) -> &PaymentProgress {
        &self.payment
    }

    /// The order total.
    pub fn amount(&self) -> Money {
        self.amount
    }

    /// The customer's payment token.
    pub fn token(&self) -> &PaymentToken {
        &self.token
    }

    /// When the pending gateway call may run; `None` when no call is pending.
    pub fn due(&self) -> Option<DateTime<Utc>> {
        self.due
    }

    /// When authorization gives up, while it is under way.
    pub fn deadline(&self) -> Option<DateTime<Utc>> {
        self.deadline
    }

    /// The last error met, if any.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// What happened so far, oldest first (capped).
    pub fn history(&self) -> &[Entry] {
        &self.history
    }

    /// The provider reference of the authorization, once there is one.
    pub fn reference(&self) -> Option<&str> {
        match &self.payment {
            PaymentProgress::Authorized { reference } | PaymentProgress::Captured { reference } => {
                Some(reference)
            }
            _ => None,
        }
    }

    /// The overall state, for operators.
    pub fn state(&self) -> SagaState {
        if self.stuck.is_some() {
            return SagaState::Stuck;
        }
        if self.is_finished() {
            return SagaState::Completed;
        }
        match self.goal {
            Goal::Confirm if self.order_settled => SagaState::Confirmed,
            Goal::Confirm => SagaState::Running,
            Goal::Reject(_) | Goal::Cancel => SagaState::Compensating,
            Goal::Ship => SagaState::Settling,
        }
    }

    /// The steps with their status, for operators: `(step, status)`.
    pub fn steps(&self) -> Vec<(&'static str, &'static str)> {
        let forward = self.goal == Goal::Confirm || self.goal == Goal::Ship;
        let stock = if self.committed == self.lines.len() {
            "committed"
        } else if self.reserved == self.lines.len() {
            "reserved"
        } else if self.reserved > 0 {
            if forward {
                "reserving"
            } else {
                "releasing"
            }
        } else if forward {
            "pending"
        } else {
            "released"
        };
        let payment = match &self.payment {
            PaymentProgress::NotRequested => "pending",
            PaymentProgress::Requested { unknown: true } => "outcome_unknown",
            PaymentProgress::Requested { unknown: false } if forward => "authorizing",
            PaymentProgress::Requested { .. } => "resolving",
            PaymentProgress::Authorized { .. } if forward => "authorized",
            PaymentProgress::Authorized { .. } => "voiding",
            PaymentProgress::Refused => "refused",
            PaymentProgress::Voided => "voided",
            PaymentProgress::Captured { .. } => "captured",
            PaymentProgress::Refunded => "refunded",
        };
        let order = match (self.goal, self.order_settled) {
            (Goal::Confirm, true) => "confirmed",
            (Goal::Confirm, false) => "pending",
            (Goal::Reject(_), true) => "rejected",
            (Goal::Reject(_), false) => "rejecting",
            (Goal::Cancel, _) => "cancelled",
            (Goal::Ship, _) => "shipped",
        };
        vec![
            ("reserve_stock", stock),
            ("authorize_payment", payment),
            ("confirm_order", order),
        ]
    }

    /// Whether nothing is left to do.
    pub fn is_finished(&self) -> bool {
        self.stuck.is_none()
            && self.to_record.is_empty()
            && self.due.is_none()
            && match self.goal {
                Goal::Confirm => false,
                Goal::Reject(_) => self.order_settled && self.reserved == 0 && !self.holds_money(),
                Goal::Cancel => self.reserved == 0 && !self.holds_money(),
                Goal::Ship => {
                    self.committed == self.lines.len()
                        && matches!(self.payment, PaymentProgress::Captured { .. })
                }
            }
    }

    /// Whether the saga is parked for an operator.
    pub fn is_stuck(&self) -> bool {
        self.stuck.is_some()
    }

    fn holds_money(&self) -> bool {
        matches!(
            self.payment,
            PaymentProgress::Requested { .. }
                | PaymentProgress::Authorized { .. }
                | PaymentProgress::Captured { .. }
        )
    }

    /// What to do next. Call it until it answers [`Action::Call`] or [`Action::Wait`],
    /// reporting each aggregate action with [`Fulfillment::record`] in between.
    ///
    /// `now` matters for deadlines: authorization still unsettled at its deadline turns the
    /// saga to compensation (rejection with `payment_failed`).
    pub fn next(&mut self, now: DateTime<Utc>) -> Action {
        if self.stuck.is_some() {
            return Action::Wait;
        }
        if let Some(record) = self.to_record.front() {
            return Action::Record(record.clone());
        }
        // Authorization (with the confirmation it leads to) must be done by its deadline; an
        // authorization that arrives later is voided like any other.
        if self.goal == Goal::Confirm
            && !self.order_settled
            && self.deadline.is_some_and(|d| now >= d)
        {
            self.note(now, "authorization deadline passed");
            self.turn_to(Goal::Reject(RejectionReason::PaymentFailed), now);
        }
        let action = match self.goal {
            Goal::Confirm => self.next_forward(now),
            Goal::Reject(reason) => self.next_compensation(Some(reason), now),
            Goal::Cancel => self.next_compensation(None, now),
            Goal::Ship => self.next_settlement(now),
        };
        if !matches!(action, Action::Call { .. }) {
            // Only a gateway call is ever due; anything else is done right away.
            self.due = None;
        }
        action
    }

    fn next_forward(&mut self, now: DateTime<Utc>) -> Action {
        if let Some(line) = self.lines.get(self.reserved) {
            return Action::Reserve {
                sku: line.sku.clone(),
                quantity: line.quantity,
            };
        }
        match &self.payment {
            PaymentProgress::NotRequested => Action::RequestPayment {
                amount: self.amount,
                token: self.token.clone(),
            },
            PaymentProgress::Requested { unknown } => {
                let op = if *unknown {
                    GatewayOp::Retrieve
                } else {
                    GatewayOp::Authorize
                };
                self.call(op, now)
            }
            PaymentProgress::Authorized { .. } if !self.order_settled => Action::ConfirmOrder,
            _ => Action::Wait,
        }
    }

    /// Compensation, newest step first: money, then stock, then the order.
    fn next_compensation(&mut self, reject: Option<RejectionReason>, now: DateTime<Utc>) -> Action {
        match &self.payment {
            // Whatever became of the authorization must be known before giving up on it.
            PaymentProgress::Requested { .. } => return self.call(GatewayOp::Retrieve, now),
            PaymentProgress::Authorized { .. } => return self.call(GatewayOp::Void, now),
            PaymentProgress::Captured { .. } => return self.call(GatewayOp::Refund, now),
            _ => {}
        }
        if self.reserved > 0 {
            return Action::Release {
                sku: self.lines[self.reserved - 1].sku.clone(),
            };
        }
        match reject {
            Some(reason) if !self.order_settled => Action::RejectOrder { reason },
            _ => {
                self.finish(now);
                Action::Wait
            }
        }
    }

    fn next_settlement(&mut self, now: DateTime<Utc>) -> Action {
        if let Some(line) = self.lines.get(self.committed) {
            return Action::CommitReservation {
                sku: line.sku.clone(),
            };
        }
        if let PaymentProgress::Authorized { .. } = self.payment {
            return self.call(GatewayOp::Capture, now);
        }
        self.finish(now);
        Action::Wait
    }

    fn finish(&mut self, now: DateTime<Utc>) {
        if self.is_finished() && self.history.last().is_none_or(|e| e.what != "completed") {
            self.note(now, "completed");
        }
    }

    /// Schedules `op` (keeping an earlier due time) and answers the call action.
    fn call(&mut self, op: GatewayOp, now: DateTime<Utc>) -> Action {
        let due = *self.due.get_or_insert(now);
        Action::Call { op, due }
    }

    /// The gateway call the saga waits on, if any: what [`Fulfillment::next`] answered last.
    pub fn pending_call(&mut self, now: DateTime<Utc>) -> Option<GatewayOp> {
        match self.next(now) {
            Action::Call { op, .. } => Some(op),
            _ => None,
        }
    }

    /// The aggregate command behind `action` and the step's name (`reserve/SKU`, `confirm`,
    /// `record/{attempt id}`, ...), which with the order id makes the command's deterministic
    /// id. `None` for a gateway call or a wait.
    pub fn command(&self, action: &Action) -> Option<(String, Command)> {
        let order_id = self.order_id;
        let product = |sku: &Sku, command| Command::Product {
            sku: sku.clone(),
            command,
        };
        Some(match action {
            Action::Call { .. } | Action::Wait => return None,
            Action::Reserve { sku, quantity } => (
                format!("reserve/{sku}"),
                product(
                    sku,
                    ProductCommand::Reserve {
                        order_id,
                        quantity: *quantity,
                    },
                ),
            ),
            Action::Release { sku } => (
                format!("release/{sku}"),
                product(sku, ProductCommand::Release { order_id }),
            ),
            Action::CommitReservation { sku } => (
                format!("commit/{sku}"),
                product(sku, ProductCommand::CommitReservation { order_id }),
            ),
            Action::RequestPayment { amount, token } => (
                "request-payment".to_owned(),
                Command::Payment(PaymentCommand::Request {
                    order_id,
                    amount: *amount,
                    token: token.clone(),
                }),
            ),
            Action::Record(PaymentRecord::Attempt {
                attempt_id,
                outcome,
            }) => (
                format!("record/{attempt_id}"),
                Command::Payment(PaymentCommand::RecordAttempt {
                    attempt_id: attempt_id.clone(),
                    outcome: outcome.clone(),
                }),
            ),
            Action::Record(PaymentRecord::Voided) => (
                "record/void".to_owned(),
                Command::Payment(PaymentCommand::Void),
            ),
            Action::Record(PaymentRecord::Captured) => (
                "record/capture".to_owned(),
                Command::Payment(PaymentCommand::Capture {
                    amount: self.amount,
                }),
            ),
            Action::Record(PaymentRecord::Refunded) => (
                "record/refund".to_owned(),
                Command::Payment(PaymentCommand::Refund {
                    amount: self.amount,
                }),
            ),
            Action::ConfirmOrder => ("confirm".to_owned(), Command::Order(OrderCommand::Confirm)),
            Action::RejectOrder { reason } => (
                "reject".to_owned(),
                Command::Order(OrderCommand::Reject { reason: *reason }),
            ),
        })
    }

    /// Reports how the aggregate action [`Fulfillment::next`] answered ended.
    pub fn record(
        &mut self,
        action: &Action,
        outcome: Outcome,
        timing: &Timing,
        now: DateTime<Utc>,
    ) {
        match (action, outcome) {
            (Action::Record(_), _) => {
                self.to_record.pop_front();
            }
            (Action::Reserve { sku, .. }, Outcome::Done) => {
                self.reserved += 1;
                self.note(now, format!("reserved {sku}"));
            }
            (Action::Reserve { sku, .. }, Outcome::Refused) => {
                self.note(now, format!("{sku} is out of stock"));
                self.turn_to(Goal::Reject(RejectionReason::OutOfStock), now);
            }
            (Action::Release { sku }, _) => {
                self.reserved -= 1;
                self.note(now, format!("released {sku}"));
            }
            (Action::CommitReservation { sku }, _) => {
                self.committed += 1;
                self.note(now, format!("committed {sku}"));
            }
            (Action::RequestPayment { .. }, _) => {
                self.payment = PaymentProgress::Requested { unknown: false };
                self.deadline = Some(now + timing.authorization_deadline);
                self.note(now, "payment requested");
            }
            (Action::ConfirmOrder, Outcome::Done) => {
                self.order_settled = true;
                self.deadline = None;
                self.note(now, "order confirmed");
            }
            (Action::ConfirmOrder, Outcome::Refused) => {
                // The customer cancelled while the payment was being authorized.
                self.on_cancelled(now);
            }
            (Action::RejectOrder { reason }, Outcome::Done) => {
                self.order_settled = true;
                self.note(now, format!("order rejected: {}", reason_str(*reason)));
                self.finish(now);
            }
            (Action::RejectOrder { .. }, Outcome::Refused) => {
                self.on_cancelled(now);
            }
            (Action::Call { .. } | Action::Wait, _) => {}
        }
    }

    /// The order was cancelled (by its customer or an admin): compensate whatever was done.
    pub fn on_cancelled(&mut self, now: DateTime<Utc>) {
        if self.goal == Goal::Cancel || self.goal == Goal::Ship {
            return;
        }
        self.order_settled = true;
        self.note(now, "order cancelled");
        self.turn_to(Goal::Cancel, now);
    }

    /// The order shipped: commit the stock and capture the payment.
    pub fn on_shipped(&mut self, now: DateTime<Utc>) {
        if self.goal == Goal::Ship {
            return;
        }
        self.note(now, "order shipped");
        self.turn_to(Goal::Ship, now);
    }

    fn turn_to(&mut self, goal: Goal, now: DateTime<Utc>) {
        self.goal = goal;
        self.deadline = None;
        self.failures = 0;
        // A call scheduled for the old goal may not be the one the new goal needs; the new
        // goal's next step is due at once.
        if self.due.is_some() {
            self.due = Some(now);
        }
    }

    /// Reports a gateway call's answer. `op` is the call that was made; an answer that no
    /// longer fits (the saga moved on meanwhile) still teaches what the provider did.
    pub fn on_gateway(
        &mut self,
        op: GatewayOp,
        answer: GatewayAnswer,
        timing: &Timing,
        now: DateTime<Utc>,
    ) {
        self.due = None;
        match (op, answer) {
            (GatewayOp::Authorize | GatewayOp::Retrieve, GatewayAnswer::Decided(decision)) => {
                self.failures = 0;
                self.last_error = None;
                if !matches!(self.payment, PaymentProgress::Requested { .. }) {
                    return;
                }
                match decision {
                    Authorization::Authorized { reference } => {
                        self.note(now, "payment authorized");
                        self.attempt(AttemptOutcome::Authorized {
                            provider_reference: reference.clone(),
                        });
                        self.payment = PaymentProgress::Authorized { reference };
                    }
                    Authorization::Declined { reason } => {
                        self.note(now, format!("payment declined: {reason}"));
                        self.attempt(AttemptOutcome::Declined { reason });
                        self.payment = PaymentProgress::Refused;
                        if self.goal == Goal::Confirm {
                            self.turn_to(Goal::Reject(RejectionReason::PaymentDeclined), now);
                        }
                    }
                }
            }
            (GatewayOp::Retrieve, GatewayAnswer::NotFound) => {
                if !matches!(self.payment, PaymentProgress::Requested { .. }) {
                    return;
                }
                if self.goal == Goal::Confirm {
                    // Never received: sending it again (same key) is safe.
                    self.note(
                        now,
                        "the provider never received the authorization; sending it again",
                    );
                    self.payment = PaymentProgress::Requested { unknown: false };
                    self.due = Some(now);
                } else {
                    self.note(now, "no authorization at the provider; payment abandoned");
                    self.attempt(AttemptOutcome::Failed {
                        error: "abandoned before the provider received it".into(),
                        retryable: false,
                    });
                    self.payment = PaymentProgress::Refused;
                }
            }
            (GatewayOp::Void, GatewayAnswer::Done) => {
                self.failures = 0;
                if matches!(self.payment, PaymentProgress::Authorized { .. }) {
                    self.note(now, "payment voided");
                    self.to_record.push_back(PaymentRecord::Voided);
                    self.payment = PaymentProgress::Voided;
                }
            }
            (GatewayOp::Capture, GatewayAnswer::Done) => {
                self.failures = 0;
                if let PaymentProgress::Authorized { reference } = &self.payment {
                    self.payment = PaymentProgress::Captured {
                        reference: reference.clone(),
                    };
                    self.note(now, "payment captured");
                    self.to_record.push_back(PaymentRecord::Captured);
                }
            }
            (GatewayOp::Refund, GatewayAnswer::Done) => {
                self.failures = 0;
                if matches!(self.payment, PaymentProgress::Captured { .. }) {
                    self.note(now, "payment refunded");
                    self.to_record.push_back(PaymentRecord::Refunded);
                    self.payment = PaymentProgress::Refunded;
                }
            }
            (op, GatewayAnswer::Failed(error)) => self.on_failure(op, error, timing, now),
            (op, answer) => {
                // An answer of the wrong kind (e.g. "done" to an authorization) is a provider
                // bug: treat it as an unknown outcome and ask again.
                self.on_failure(
                    op,
                    GatewayError::Unknown(format!("unexpected answer {answer:?}")),
                    timing,
                    now,
                );
            }
        }
    }

    fn on_failure(
        &mut self,
        op: GatewayOp,
        error: GatewayError,
        timing: &Timing,
        now: DateTime<Utc>,
    ) {
        self.failures += 1;
        self.last_error = Some(error.to_string());
        let authorizing = matches!(op, GatewayOp::Authorize | GatewayOp::Retrieve)
            && matches!(self.payment, PaymentProgress::Requested { .. });
        match (&error, authorizing) {
            (GatewayError::Permanent(why), true)
                if op == GatewayOp::Authorize && self.goal == Goal::Confirm =>
            {
                self.note(now, format!("payment failed: {why}"));
                self.attempt(AttemptOutcome::Failed {
                    error: why.clone(),
                    retryable: false,
                });
                self.payment = PaymentProgress::Refused;
                self.turn_to(Goal::Reject(RejectionReason::PaymentFailed), now);
                return;
            }
            (GatewayError::Transient(why), true) if op == GatewayOp::Authorize => {
                self.note(now, format!("authorization failed, will retry: {why}"));
                self.attempt(AttemptOutcome::Failed {
                    error: why.clone(),
                    retryable: true,
                });
            }
            (GatewayError::Unknown(why), true) => {
                self.note(
                    now,
                    format!("authorization outcome unknown, will ask: {why}"),
                );
                self.payment = PaymentProgress::Requested { unknown: true };
            }
            _ => self.note(now, format!("{op:?} failed: {error}")),
        }
        let settling = !authorizing || self.goal != Goal::Confirm;
        if settling
            && (matches!(error, GatewayError::Permanent(_))
                || self.failures >= timing.settlement_attempts)
        {
            self.stuck = Some(format!("{op:?} keeps failing: {error}"));
            self.note(now, "stuck: needs an operator");
            return;
        }
        self.due = Some(now + backoff(timing, self.failures, self.order_id));
    }

    fn attempt(&mut self, outcome: AttemptOutcome) {
        self.attempts += 1;
        self.to_record.push_back(PaymentRecord::Attempt {
            attempt_id: format!(
                "{}#{}",
                GatewayOp::Authorize.key(self.order_id),
                self.attempts
            ),
            outcome,
        });
    }

    /// Reports that an aggregate refused the command behind `action` in a way the process does
    /// not foresee (a catalog entry that no payment can be made for, a hand-edited log).
    ///
    /// While the order is still on its way to confirmation, such a refusal rejects it: the
    /// compensations release whatever was reserved, so the order ends on its own and holds no
    /// stock. A refused reservation rejects it `out_of_stock` (the units cannot be had), a
    /// refused payment request `payment_failed` (no payment can be made). Any other refusal
    /// concerns money already at the provider or an order that moved on, where going on could
    /// make things worse: the saga is parked for an operator ([`Fulfillment::halt`]).
    pub fn refused(&mut self, action: &Action, why: impl Into<String>, now: DateTime<Utc>) {
        let why = why.into();
        let reason = match action {
            Action::Reserve { .. } => Some(RejectionReason::OutOfStock),
            Action::RequestPayment { .. } => Some(RejectionReason::PaymentFailed),
            _ => None,
        };
        match reason {
            Some(reason) if self.goal == Goal::Confirm && !self.order_settled => {
                self.note(now, format!("refused: {why}"));
                self.last_error = Some(why);
                self.turn_to(Goal::Reject(reason), now);
            }
            _ => self.halt(why, now),
        }
    }

    /// Parks the saga for an operator: an aggregate refused one of its commands in a way the
    /// process does not foresee (a bug or a hand-edited log), and going on could make it worse.
    pub fn halt(&mut self, why: impl Into<String>, now: DateTime<Utc>) {
        let why = why.into();
        self.note(now, format!("stuck: {why}"));
        self.last_error = Some(why.clone());
        self.stuck = Some(why);
    }

    /// An operator asks a stuck saga to try again now.
    ///
    /// Returns `false` (and changes nothing) if the saga is not stuck.
    pub fn retry(&mut self, now: DateTime<Utc>) -> bool {
        if self.stuck.take().is_none() {
            return false;
        }
        self.failures = 0;
        self.due = Some(now);
        self.note(now, "retried by an operator");
        true
    }

    fn note(&mut self, at: DateTime<Utc>, what: impl Into<String>) {
        if self.history.len() >= HISTORY_LIMIT {
            self.history.remove(1);
        }
        self.history.push(Entry {
            at,
            what: what.into(),
        });
    }
}

/// The API's name for a rejection reason.
pub fn reason_str(reason: RejectionReason) -> &'static str {
    match reason {
        RejectionReason::OutOfStock => "out_of_stock",
        RejectionReason::PaymentDeclined => "payment_declined",
        RejectionReason::PaymentFailed => "payment_failed",
    }
}

/// Exponential back-off with jitter: `base * 2^(failures-1)`, capped, then scaled into
/// [50 %, 100 %] by a hash of the order and the failure count. The jitter is deterministic so
/// the saga stays a pure function of its inputs, yet different orders spread out.
fn backoff(timing: &Timing, failures: u32, order_id: OrderId) -> Duration {
    let exponent = failures.saturating_sub(1).min(20);
    let raw = timing
        .retry_base
        .checked_mul(1 << exponent)
        .unwrap_or(timing.retry_cap)
        .min(timing.retry_cap);
    let spread = (order_id.as_uuid().as_u128() as u64).wrapping_add(u64::from(failures));
    let percent =
        50 + i32::try_from(spread.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58).unwrap_or(0) * 50 / 63;
    raw * percent / 100
}
