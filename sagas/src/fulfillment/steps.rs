//! The step table in code. Each step below is one module holding, side by side, what it does
//! going forward, how it is undone, what it does when the order ships, how the aggregate's
//! answer changes the saga, and how it reads to an operator:
//!
//! | step | forward | compensation | at shipment |
//! |---|---|---|---|
//! | `reserve_stock` | reserve each line, in SKU order | release, newest first | commit each line |
//! | `authorize_payment` | request, then authorize (or ask after a lost answer) | ask, then void or refund | capture |
//! | `confirm_order` | confirm once authorized | none (the order is rejected after the compensations) | none |
//!
//! Adding a step is one module here and one entry in `STEPS`; the saga's driver
//! ([`Fulfillment::next`]) walks the table forward, backward or for settlement by goal.

use chrono::{DateTime, Utc};

use aggregates::order::RejectionReason;

use super::command::{Action, Outcome};
use super::payment::{GatewayOp, PaymentProgress};
use super::timing::Timing;
use super::{Fulfillment, Goal};

/// What a step may ask for next, given the saga; `None` when that direction has nothing left.
type NextAction = fn(&mut Fulfillment, DateTime<Utc>) -> Option<Action>;

/// One step of the saga: its action in each direction and its status for operators.
pub(super) struct Step {
    /// The step's name in the operator view.
    pub(super) name: &'static str,
    /// Its next action while the saga works towards confirmation.
    forward: NextAction,
    /// Its next undoing action while the saga rejects or cancels.
    compensation: NextAction,
    /// Its next action once the order shipped.
    settlement: NextAction,
    /// Its status word for operators (`reserved`, `authorizing`, ...).
    pub(super) status: fn(&Fulfillment) -> &'static str,
}

/// The steps in forward order; compensation walks them backwards.
pub(super) const STEPS: [Step; 3] = [
    reserve_stock::STEP,
    authorize_payment::STEP,
    confirm_order::STEP,
];

fn nothing(_: &mut Fulfillment, _: DateTime<Utc>) -> Option<Action> {
    None
}

impl Fulfillment {
    /// The first step with something left to do forward; otherwise the saga waits (for the
    /// gateway, or for the order to ship or be cancelled).
    pub(super) fn next_forward(&mut self, now: DateTime<Utc>) -> Action {
        STEPS
            .iter()
            .find_map(|step| (step.forward)(self, now))
            .unwrap_or(Action::Wait)
    }

    /// The newest step with something left to undo; once all are undone, the order is
    /// rejected with `reject` (a cancelled order is closed already) and the saga finishes.
    pub(super) fn next_compensation(
        &mut self,
        reject: Option<RejectionReason>,
        now: DateTime<Utc>,
    ) -> Action {
        if let Some(action) = STEPS
            .iter()
            .rev()
            .find_map(|step| (step.compensation)(self, now))
        {
            return action;
        }
        match reject {
            Some(reason) if !self.order_settled => Action::RejectOrder { reason },
            _ => {
                self.finish(now);
                Action::Wait
            }
        }
    }

    /// The first step with something left to settle for a shipment; then the saga finishes.
    pub(super) fn next_settlement(&mut self, now: DateTime<Utc>) -> Action {
        if let Some(action) = STEPS.iter().find_map(|step| (step.settlement)(self, now)) {
            return action;
        }
        self.finish(now);
        Action::Wait
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
            (Action::Reserve { sku, .. }, Outcome::Done) => reserve_stock::reserved(self, sku, now),
            (Action::Reserve { sku, .. }, Outcome::Refused) => {
                reserve_stock::out_of_stock(self, sku, now);
            }
            (Action::Release { sku }, _) => reserve_stock::released(self, sku, now),
            (Action::CommitReservation { sku }, _) => reserve_stock::committed(self, sku, now),
            (Action::RequestPayment { .. }, _) => authorize_payment::requested(self, timing, now),
            (Action::Record(_), _) => authorize_payment::booked(self),
            (Action::ConfirmOrder, Outcome::Done) => confirm_order::confirmed(self, now),
            (Action::RejectOrder { reason }, Outcome::Done) => {
                confirm_order::rejected(self, *reason, now);
            }
            // The customer cancelled while the saga was confirming or rejecting.
            (Action::ConfirmOrder | Action::RejectOrder { .. }, Outcome::Refused) => {
                self.on_cancelled(now);
            }
            (Action::Call { .. } | Action::Wait, _) => {}
        }
    }
}

/// Whether the saga moves the order forward (towards confirmation or through shipment) rather
/// than undoing it; the status words differ by direction.
fn forward(saga: &Fulfillment) -> bool {
    matches!(saga.goal, Goal::Confirm | Goal::Ship)
}

/// Step 1: reserve each line's stock, in SKU order so that two sagas never wait on each other.
pub(super) mod reserve_stock {
    use aggregates::order::RejectionReason;
    use aggregates::values::Sku;

    use super::*;

    pub(super) const STEP: Step = Step {
        name: "reserve_stock",
        forward: reserve,
        compensation: release,
        settlement: commit,
        status,
    };

    fn reserve(saga: &mut Fulfillment, _: DateTime<Utc>) -> Option<Action> {
        let line = saga.lines.get(saga.reserved)?;
        Some(Action::Reserve {
            sku: line.sku.clone(),
            quantity: line.quantity,
        })
    }

    fn release(saga: &mut Fulfillment, _: DateTime<Utc>) -> Option<Action> {
        let newest = saga.reserved.checked_sub(1)?;
        Some(Action::Release {
            sku: saga.lines[newest].sku.clone(),
        })
    }

    fn commit(saga: &mut Fulfillment, _: DateTime<Utc>) -> Option<Action> {
        let line = saga.lines.get(saga.committed)?;
        Some(Action::CommitReservation {
            sku: line.sku.clone(),
        })
    }

    pub(super) fn reserved(saga: &mut Fulfillment, sku: &Sku, now: DateTime<Utc>) {
        saga.reserved += 1;
        saga.note(now, format!("reserved {sku}"));
    }

    pub(super) fn out_of_stock(saga: &mut Fulfillment, sku: &Sku, now: DateTime<Utc>) {
        saga.note(now, format!("{sku} is out of stock"));
        saga.turn_to(Goal::Reject(RejectionReason::OutOfStock), now);
    }

    pub(super) fn released(saga: &mut Fulfillment, sku: &Sku, now: DateTime<Utc>) {
        saga.reserved -= 1;
        saga.note(now, format!("released {sku}"));
    }

    pub(super) fn committed(saga: &mut Fulfillment, sku: &Sku, now: DateTime<Utc>) {
        saga.committed += 1;
        saga.note(now, format!("committed {sku}"));
    }

    fn status(saga: &Fulfillment) -> &'static str {
        let all = saga.lines.len();
        match (saga.committed, saga.reserved) {
            (c, _) if c == all => "committed",
            (_, r) if r == all => "reserved",
            (_, 0) if forward(saga) => "pending",
            (_, 0) => "released",
            _ if forward(saga) => "reserving",
            _ => "releasing",
        }
    }
}

/// Step 2: open the payment and have the gateway authorize the total by the deadline. The
/// gateway's answers are read in [`super::payment`].
pub(super) mod authorize_payment {
    use super::*;

    pub(super) const STEP: Step = Step {
        name: "authorize_payment",
        forward: authorize,
        compensation: give_back,
        settlement: capture,
        status,
    };

    fn authorize(saga: &mut Fulfillment, now: DateTime<Utc>) -> Option<Action> {
        match &saga.payment {
            PaymentProgress::NotRequested => Some(Action::RequestPayment {
                amount: saga.amount,
                token: saga.token.clone(),
            }),
            PaymentProgress::Requested { unknown: true } => {
                Some(saga.call(GatewayOp::Retrieve, now))
            }
            PaymentProgress::Requested { unknown: false } => {
                Some(saga.call(GatewayOp::Authorize, now))
            }
            _ => None,
        }
    }

    /// Whatever became of the authorization must be known before giving up on it.
    fn give_back(saga: &mut Fulfillment, now: DateTime<Utc>) -> Option<Action> {
        let op = match &saga.payment {
            PaymentProgress::Requested { .. } => GatewayOp::Retrieve,
            PaymentProgress::Authorized { .. } => GatewayOp::Void,
            PaymentProgress::Captured { .. } => GatewayOp::Refund,
            _ => return None,
        };
        Some(saga.call(op, now))
    }

    fn capture(saga: &mut Fulfillment, now: DateTime<Utc>) -> Option<Action> {
        matches!(saga.payment, PaymentProgress::Authorized { .. })
            .then(|| saga.call(GatewayOp::Capture, now))
    }

    pub(super) fn requested(saga: &mut Fulfillment, timing: &Timing, now: DateTime<Utc>) {
        saga.payment = PaymentProgress::Requested { unknown: false };
        saga.deadline = Some(now + timing.authorization_deadline);
        saga.note(now, "payment requested");
    }

    /// A gateway outcome was booked on the payment aggregate.
    pub(super) fn booked(saga: &mut Fulfillment) {
        saga.to_record.pop_front();
    }

    fn status(saga: &Fulfillment) -> &'static str {
        match &saga.payment {
            PaymentProgress::NotRequested => "pending",
            PaymentProgress::Requested { unknown: true } => "outcome_unknown",
            PaymentProgress::Requested { unknown: false } if forward(saga) => "authorizing",
            PaymentProgress::Requested { .. } => "resolving",
            PaymentProgress::Authorized { .. } if forward(saga) => "authorized",
            PaymentProgress::Authorized { .. } => "voiding",
            PaymentProgress::Refused => "refused",
            PaymentProgress::Voided => "voided",
            PaymentProgress::Captured { .. } => "captured",
            PaymentProgress::Refunded => "refunded",
        }
    }
}

/// Step 3: confirm the order once its payment is authorized. It cannot fail for a business
/// reason, so it has no compensation; a cancellation racing it is read as a cancellation.
pub(super) mod confirm_order {
    use super::super::view::reason_str;
    use super::*;

    pub(super) const STEP: Step = Step {
        name: "confirm_order",
        forward: confirm,
        compensation: nothing,
        settlement: nothing,
        status,
    };

    fn confirm(saga: &mut Fulfillment, _: DateTime<Utc>) -> Option<Action> {
        (matches!(saga.payment, PaymentProgress::Authorized { .. }) && !saga.order_settled)
            .then_some(Action::ConfirmOrder)
    }

    pub(super) fn confirmed(saga: &mut Fulfillment, now: DateTime<Utc>) {
        saga.order_settled = true;
        saga.deadline = None;
        saga.note(now, "order confirmed");
    }

    pub(super) fn rejected(saga: &mut Fulfillment, reason: RejectionReason, now: DateTime<Utc>) {
        saga.order_settled = true;
        saga.note(now, format!("order rejected: {}", reason_str(reason)));
        saga.finish(now);
    }

    fn status(saga: &Fulfillment) -> &'static str {
        match (saga.goal, saga.order_settled) {
            (Goal::Confirm, true) => "confirmed",
            (Goal::Confirm, false) => "pending",
            (Goal::Reject(_), true) => "rejected",
            (Goal::Reject(_), false) => "rejecting",
            (Goal::Cancel, _) => "cancelled",
            (Goal::Ship, _) => "shipped",
        }
    }
}
