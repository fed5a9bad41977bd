//! What the saga asks the runtime to do ([`Action`]), the aggregate command behind each action
//! ([`Command`]), and how an aggregate's answer reads to the saga ([`Verdict`]).

use chrono::{DateTime, Utc};

use aggregates::inventory::{ProductCommand, ProductError};
use aggregates::order::{OrderCommand, OrderError, OrderStatus, RejectionReason};
use aggregates::payment::{PaymentCommand, PaymentError};
use aggregates::values::{Money, PaymentToken, Quantity, Sku};

use super::payment::{GatewayOp, PaymentRecord};
use super::Fulfillment;

/// The next thing the runtime must do for a saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Reserve `quantity` of `sku` for the order (reservations are keyed by order: a repeat is
    /// a no-op). Report [`Outcome::Done`] or [`Outcome::Refused`] (not enough stock).
    Reserve {
        /// The SKU.
        sku: Sku,
        /// Units to hold for the order (the line's quantity).
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
        /// Why the order is rejected (out of stock, declined, payment failed).
        reason: RejectionReason,
    },
    /// Call the gateway at `due` (not before); the saga waits for [`Fulfillment::on_gateway`].
    Call {
        /// What to call.
        op: GatewayOp,
        /// When the call is due: now, or after a retry's back-off.
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

/// An aggregate's refusal the process does not foresee (a bug, a catalog entry no payment can
/// be made for, a hand-edited log). It rejects the order or parks the saga
/// ([`Fulfillment::refused`]); its words end up in the saga's history.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unforeseen {
    /// The inventory aggregate refused.
    #[error("{0}")]
    Inventory(ProductError),
    /// The order refused.
    #[error("{0}")]
    Order(OrderError),
    /// The payment refused.
    #[error("{0}")]
    Payment(PaymentError),
}

/// How the saga reads an aggregate's answer: an [`Outcome`], or the unforeseen refusal that
/// stops the step.
pub type Verdict = Result<Outcome, Unforeseen>;

/// Reads an inventory aggregate's answer. Running out of stock (or a SKU that left the
/// catalog) refuses a reservation; any other refusal is unforeseen.
pub fn product_verdict(result: Result<(), ProductError>) -> Verdict {
    match result {
        Ok(()) => Ok(Outcome::Done),
        Err(ProductError::OutOfStock { .. } | ProductError::NotRegistered) => Ok(Outcome::Refused),
        Err(other) => Err(Unforeseen::Inventory(other)),
    }
}

/// Reads the order's answer. A confirmation or rejection refused because the order was
/// cancelled meanwhile is an expected race; any other refusal is unforeseen.
pub fn order_verdict(result: Result<(), OrderError>) -> Verdict {
    match result {
        Ok(()) => Ok(Outcome::Done),
        Err(OrderError::CannotConfirm(OrderStatus::Cancelled))
        | Err(OrderError::CannotReject(OrderStatus::Cancelled)) => Ok(Outcome::Refused),
        Err(other) => Err(Unforeseen::Order(other)),
    }
}

/// Reads the payment's answer. A payment requested already was requested by this saga; any
/// other refusal is unforeseen.
pub fn payment_verdict(result: Result<(), PaymentError>) -> Verdict {
    match result {
        Ok(()) | Err(PaymentError::AlreadyRequested) => Ok(Outcome::Done),
        Err(other) => Err(Unforeseen::Payment(other)),
    }
}

impl Fulfillment {
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
}
