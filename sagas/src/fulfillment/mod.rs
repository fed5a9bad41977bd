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
//!
//! Where things are: the table above in code, one module per step, is [`steps`]; the payment
//! and the gateway's answers [`payment`]; actions, commands and verdicts [`command`]; the
//! operators' view [`view`]; deadlines and back-off [`timing`].

use std::collections::VecDeque;
use std::fmt::Display;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use aggregates::order::{OrderLine, RejectionReason};
use aggregates::values::{Money, OrderId, PaymentToken, Quantity, Sku};

pub mod command;
pub mod payment;
pub mod steps;
pub mod timing;
pub mod view;

pub use command::{
    order_verdict, payment_verdict, product_verdict, Action, Command, Outcome, Unforeseen, Verdict,
};
pub use payment::{GatewayAnswer, GatewayOp, PaymentProgress, PaymentRecord};
pub use timing::Timing;
pub use view::{reason_str, Entry, SagaState};

/// One order line as the saga needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// The SKU.
    pub sku: Sku,
    /// Units ordered, all reserved together.
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

    /// Every SKU the saga may reserve, release or commit: its transaction locks them all up
    /// front, in the one lock order (`runtime::Work::lock`).
    pub fn skus(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().map(|l| l.sku.as_str())
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

    /// The provider reference of the authorization, once there is one.
    pub fn reference(&self) -> Option<&str> {
        match &self.payment {
            PaymentProgress::Authorized { reference } | PaymentProgress::Captured { reference } => {
                Some(reference)
            }
            _ => None,
        }
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

    /// Reports that an aggregate refused the command behind `action` in a way the process does
    /// not foresee (a catalog entry that no payment can be made for, a hand-edited log).
    ///
    /// While the order is still on its way to confirmation, such a refusal rejects it: the
    /// compensations release whatever was reserved, so the order ends on its own and holds no
    /// stock. A refused reservation rejects it `out_of_stock` (the units cannot be had), a
    /// refused payment request `payment_failed` (no payment can be made). Any other refusal
    /// concerns money already at the provider or an order that moved on, where going on could
    /// make things worse: the saga is parked for an operator ([`Fulfillment::halt`]).
    pub fn refused(&mut self, action: &Action, why: impl Display, now: DateTime<Utc>) {
        let why = why.to_string();
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
    pub fn halt(&mut self, why: impl Display, now: DateTime<Utc>) {
        let why = why.to_string();
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
}
