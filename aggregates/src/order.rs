//! Orders: one aggregate per order, holding its priced lines and its lifecycle.
//!
//! ```text
//! pending -> confirmed -> shipped
//! pending -> rejected (out_of_stock | payment_declined | payment_failed)
//! pending | confirmed -> cancelled
//! ```
//! Repeating the transition that led to the current status (confirming a confirmed order,
//! cancelling a cancelled one) changes nothing, so redelivered commands are harmless. Every other
//! transition is refused with a named [`OrderError`].

use std::collections::BTreeSet;
use std::fmt;

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use crate::values::{
    CustomerId, Money, MoneyError, OrderId, PaymentToken, Quantity, Reason, ShippingAddress,
    ShippingLabel, Sku,
};

/// Most lines one order may have.
pub const MAX_LINES: usize = 100;
/// Most units of one SKU one order line may ask for.
pub const MAX_LINE_QUANTITY: u32 = 10_000;

/// One line of an order, priced from the catalog at placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderLine {
    /// What is ordered.
    pub sku: Sku,
    /// How many units (1 to [`MAX_LINE_QUANTITY`]).
    pub quantity: Quantity,
    /// The catalog price per unit when the order was placed.
    pub unit_price: Money,
}

/// Where an order is in its lifecycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Not placed yet (the state of an aggregate with no events).
    #[default]
    New,
    /// Placed; stock and payment are being arranged.
    Pending,
    /// Stock reserved and payment authorized.
    Confirmed,
    /// Could not be fulfilled; see the reason.
    Rejected,
    /// Cancelled by the customer or an admin.
    Cancelled,
    /// Handed to the carrier; payment captured.
    Shipped,
}

impl OrderStatus {
    /// The status as the HTTP contract spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Pending => "pending",
            Self::Confirmed => "confirmed",
            Self::Rejected => "rejected",
            Self::Cancelled => "cancelled",
            Self::Shipped => "shipped",
        }
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an order was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectionReason {
    /// A line's SKU did not have enough available stock.
    OutOfStock,
    /// The payment provider declined the payment.
    PaymentDeclined,
    /// The payment failed for good (not a decline).
    PaymentFailed,
}

/// Commands the order aggregate decides on.
#[derive(Debug, Clone, PartialEq)]
pub enum OrderCommand {
    /// Records a new order. Prices come from the catalog, never from the client.
    Place {
        /// Must equal the aggregate id.
        order_id: OrderId,
        /// The token's `sub`.
        customer_id: CustomerId,
        /// 1 to [`MAX_LINES`] lines, each SKU at most once.
        lines: Vec<OrderLine>,
        /// How the customer pays.
        payment_token: PaymentToken,
        /// Where to ship, if given.
        shipping_address: Option<ShippingAddress>,
    },
    /// Stock is reserved and payment authorized.
    Confirm,
    /// The order cannot be fulfilled.
    Reject {
        /// Why it cannot be fulfilled.
        reason: RejectionReason,
    },
    /// The customer or an admin cancels.
    Cancel {
        /// Optional free text.
        reason: Option<Reason>,
    },
    /// An admin hands the order to a carrier.
    Ship {
        /// Carrier name.
        carrier: Option<ShippingLabel>,
        /// Tracking reference.
        tracking: Option<ShippingLabel>,
    },
}

/// Facts about an order. Stored as JSON; renaming a variant or field breaks the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OrderEvent {
    /// The order was placed and is pending.
    OrderPlaced {
        /// The order.
        order_id: OrderId,
        /// Who placed it.
        customer_id: CustomerId,
        /// Priced lines, in the order the customer gave them.
        lines: Vec<OrderLine>,
        /// Sum of `quantity * unit_price` over the lines.
        total: Money,
        /// How the customer pays.
        payment_token: PaymentToken,
        /// Where to ship.
        shipping_address: Option<ShippingAddress>,
    },
    /// Stock reserved and payment authorized.
    OrderConfirmed,
    /// The order could not be fulfilled.
    OrderRejected {
        /// Why it could not be fulfilled.
        reason: RejectionReason,
    },
    /// The order was cancelled.
    OrderCancelled {
        /// Optional free text.
        reason: Option<Reason>,
    },
    /// The order was handed to a carrier.
    OrderShipped {
        /// Carrier name.
        carrier: Option<ShippingLabel>,
        /// Tracking reference.
        tracking: Option<ShippingLabel>,
    },
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> String {
        match self {
            Self::OrderPlaced { .. } => "OrderPlaced",
            Self::OrderConfirmed => "OrderConfirmed",
            Self::OrderRejected { .. } => "OrderRejected",
            Self::OrderCancelled { .. } => "OrderCancelled",
            Self::OrderShipped { .. } => "OrderShipped",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

/// Why an order command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// An order with this id exists: a conflict (409).
    #[error("order already placed")]
    AlreadyPlaced,
    /// No order with this id: not found (404).
    #[error("order not found")]
    NotFound,
    /// The command's order id is not this aggregate's: a bug in the caller.
    #[error("command order id does not match the aggregate")]
    IdMismatch,
    /// No lines, or more than [`MAX_LINES`]: a validation error (422).
    #[error("an order needs 1 to {MAX_LINES} lines")]
    LineCount,
    /// A line asks for more than [`MAX_LINE_QUANTITY`] units: a validation error (422).
    #[error("line {index} asks for more than {MAX_LINE_QUANTITY} units")]
    LineQuantity {
        /// Zero-based index of the line.
        index: usize,
    },
    /// A SKU appears on two lines: a validation error naming the second line (422).
    #[error("sku {sku} appears on more than one line")]
    DuplicateSku {
        /// Zero-based index of the repeated line.
        index: usize,
        /// The SKU.
        sku: Sku,
    },
    /// Lines priced in different currencies, or a total too large: a business-rule refusal (422).
    #[error("cannot total the order: {0}")]
    Total(MoneyError),
    /// Only a pending order can be confirmed (409).
    #[error("cannot confirm an order that is {0}")]
    CannotConfirm(OrderStatus),
    /// Only a pending order can be rejected (409).
    #[error("cannot reject an order that is {0}")]
    CannotReject(OrderStatus),
    /// Only a pending or confirmed order can be cancelled (409).
    #[error("cannot cancel an order that is {0}")]
    CannotCancel(OrderStatus),
    /// Only a confirmed order can be shipped (409).
    #[error("cannot ship an order that is {0}")]
    CannotShip(OrderStatus),
}

/// The order aggregate's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Order {
    status: OrderStatus,
    placed: Option<PlacedOrder>,
    rejection: Option<RejectionReason>,
}

/// What an order holds once placed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacedOrder {
    /// The order id.
    pub order_id: OrderId,
    /// Who placed it.
    pub customer_id: CustomerId,
    /// Priced lines.
    pub lines: Vec<OrderLine>,
    /// Their sum.
    pub total: Money,
    /// How the customer pays.
    pub payment_token: PaymentToken,
}

impl Order {
    /// The current status ([`OrderStatus::New`] before placement).
    pub fn status(&self) -> OrderStatus {
        self.status
    }

    /// The placed order's contents.
    pub fn placed(&self) -> Option<&PlacedOrder> {
        self.placed.as_ref()
    }

    /// Why the order was rejected, if it was.
    pub fn rejection(&self) -> Option<RejectionReason> {
        self.rejection
    }

    /// Decides a command against the current state.
    ///
    /// # Errors
    /// An [`OrderError`] naming the rule the command breaks; no event is produced then.
    pub fn decide(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        use OrderStatus::{Cancelled, Confirmed, New, Pending, Rejected, Shipped};
        if !matches!(command, OrderCommand::Place { .. }) && self.status == New {
            return Err(OrderError::NotFound);
        }
        let event = match command {
            OrderCommand::Place {
                order_id,
                customer_id,
                lines,
                payment_token,
                shipping_address,
            } => {
                if self.status != New {
                    return Err(OrderError::AlreadyPlaced);
                }
                let total = check_lines(&lines)?;
                OrderEvent::OrderPlaced {
                    order_id,
                    customer_id,
                    lines,
                    total,
                    payment_token,
                    shipping_address,
                }
            }
            OrderCommand::Confirm => match self.status {
                Pending => OrderEvent::OrderConfirmed,
                Confirmed => return Ok(vec![]),
                other => return Err(OrderError::CannotConfirm(other)),
            },
            OrderCommand::Reject { reason } => match self.status {
                Pending => OrderEvent::OrderRejected { reason },
                Rejected if self.rejection == Some(reason) => return Ok(vec![]),
                other => return Err(OrderError::CannotReject(other)),
            },
            OrderCommand::Cancel { reason } => match self.status {
                Pending | Confirmed => OrderEvent::OrderCancelled { reason },
                Cancelled => return Ok(vec![]),
                other => return Err(OrderError::CannotCancel(other)),
            },
            OrderCommand::Ship { carrier, tracking } => match self.status {
                Confirmed => OrderEvent::OrderShipped { carrier, tracking },
                Shipped => return Ok(vec![]),
                other => return Err(OrderError::CannotShip(other)),
            },
        };
        Ok(vec![event])
    }

    /// Folds one event into the state.
    pub fn apply_event(&mut self, event: OrderEvent) {
        match event {
            OrderEvent::OrderPlaced {
                order_id,
                customer_id,
                lines,
                total,
                payment_token,
                ..
            } => {
                self.status = OrderStatus::Pending;
                self.placed = Some(PlacedOrder {
                    order_id,
                    customer_id,
                    lines,
                    total,
                    payment_token,
                });
            }
            OrderEvent::OrderConfirmed => self.status = OrderStatus::Confirmed,
            OrderEvent::OrderRejected { reason } => {
                self.status = OrderStatus::Rejected;
                self.rejection = Some(reason);
            }
            OrderEvent::OrderCancelled { .. } => self.status = OrderStatus::Cancelled,
            OrderEvent::OrderShipped { .. } => self.status = OrderStatus::Shipped,
        }
    }
}

/// Checks the line rules and returns the order total.
fn check_lines(lines: &[OrderLine]) -> Result<Money, OrderError> {
    let first = lines.first().ok_or(OrderError::LineCount)?;
    if lines.len() > MAX_LINES {
        return Err(OrderError::LineCount);
    }
    let mut seen = BTreeSet::new();
    let mut total = Money::zero(first.unit_price.currency());
    for (index, line) in lines.iter().enumerate() {
        if line.quantity.get() > MAX_LINE_QUANTITY {
            return Err(OrderError::LineQuantity { index });
        }
        if !seen.insert(&line.sku) {
            return Err(OrderError::DuplicateSku {
                index,
                sku: line.sku.clone(),
            });
        }
        let amount = line
            .unit_price
            .checked_mul(line.quantity)
            .map_err(OrderError::Total)?;
        total = total.checked_add(amount).map_err(OrderError::Total)?;
    }
    Ok(total)
}

crate::cqrs_aggregate!(Order, "order", OrderCommand, OrderEvent, OrderError);

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;
    use crate::values::Currency;

    type Given = TestFramework<Order>;

    fn id() -> OrderId {
        OrderId::from(uuid::Uuid::from_u128(7))
    }
    fn eur(minor: i64) -> Money {
        Money::new(minor, Currency::parse("EUR").unwrap()).unwrap()
    }
    fn line(sku: &str, n: i64, price: Money) -> OrderLine {
        OrderLine {
            sku: Sku::parse(sku).unwrap(),
            quantity: Quantity::parse(n).unwrap(),
            unit_price: price,
        }
    }
    fn place(lines: Vec<OrderLine>) -> OrderCommand {
        OrderCommand::Place {
            order_id: id(),
            customer_id: CustomerId::parse("alice").unwrap(),
            lines,
            payment_token: PaymentToken::parse("tok_visa").unwrap(),
            shipping_address: None,
        }
    }
    fn placed() -> OrderEvent {
        OrderEvent::OrderPlaced {
            order_id: id(),
            customer_id: CustomerId::parse("alice").unwrap(),
            lines: vec![line("A", 2, eur(500)), line("B", 1, eur(250))],
            total: eur(1250),
            payment_token: PaymentToken::parse("tok_visa").unwrap(),
            shipping_address: None,
        }
    }
    fn cancel() -> OrderCommand {
        OrderCommand::Cancel { reason: None }
    }
    fn ship() -> OrderCommand {
        OrderCommand::Ship {
            carrier: None,
            tracking: None,
        }
    }
    fn rejected() -> OrderEvent {
        OrderEvent::OrderRejected {
            reason: RejectionReason::OutOfStock,
        }
    }

    #[test]
    fn placing_an_order_totals_its_lines() {
        Given::with(())
            .given_no_previous_events()
            .when(place(vec![line("A", 2, eur(500)), line("B", 1, eur(250))]))
            .then_expect_events(vec![placed()]);
    }

    #[test]
    fn an_order_is_placed_once() {
        Given::with(())
            .given(vec![placed()])
            .when(place(vec![line("A", 1, eur(1))]))
            .then_expect_error_message("order already placed");
    }

    #[test]
    fn an_order_without_lines_is_refused() {
        Given::with(())
            .given_no_previous_events()
            .when(place(vec![]))
            .then_expect_error_message("an order needs 1 to 100 lines");
    }

    #[test]
    fn an_order_with_too_many_lines_is_refused() {
        let lines = (0..101)
            .map(|i| line(&format!("S{i}"), 1, eur(1)))
            .collect();
        Given::with(())
            .given_no_previous_events()
            .when(place(lines))
            .then_expect_error_message("an order needs 1 to 100 lines");
    }

    #[test]
    fn a_line_above_the_quantity_limit_is_refused() {
        Given::with(())
            .given_no_previous_events()
            .when(place(vec![line("A", 10_001, eur(1))]))
            .then_expect_error_message("line 0 asks for more than 10000 units");
    }

    #[test]
    fn a_sku_on_two_lines_is_refused() {
        Given::with(())
            .given_no_previous_events()
            .when(place(vec![line("A", 1, eur(1)), line("A", 2, eur(1))]))
            .then_expect_error_message("sku A appears on more than one line");
    }

    #[test]
    fn lines_in_two_currencies_are_refused() {
        let usd = Money::new(1, Currency::parse("USD").unwrap()).unwrap();
        Given::with(())
            .given_no_previous_events()
            .when(place(vec![line("A", 1, eur(1)), line("B", 1, usd)]))
            .then_expect_error_message("cannot total the order: currencies differ: EUR and USD");
    }

    #[test]
    fn commands_on_an_unplaced_order_are_not_found() {
        for command in [OrderCommand::Confirm, cancel(), ship()] {
            Given::with(())
                .given_no_previous_events()
                .when(command)
                .then_expect_error_message("order not found");
        }
    }

    #[test]
    fn a_pending_order_can_be_confirmed_once() {
        Given::with(())
            .given(vec![placed()])
            .when(OrderCommand::Confirm)
            .then_expect_events(vec![OrderEvent::OrderConfirmed]);
        Given::with(())
            .given(vec![placed(), OrderEvent::OrderConfirmed])
            .when(OrderCommand::Confirm)
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_rejected_order_cannot_be_confirmed() {
        Given::with(())
            .given(vec![placed(), rejected()])
            .when(OrderCommand::Confirm)
            .then_expect_error_message("cannot confirm an order that is rejected");
    }

    #[test]
    fn a_pending_order_can_be_rejected_with_a_reason() {
        Given::with(())
            .given(vec![placed()])
            .when(OrderCommand::Reject {
                reason: RejectionReason::OutOfStock,
            })
            .then_expect_events(vec![rejected()]);
    }

    #[test]
    fn a_confirmed_order_cannot_be_rejected() {
        Given::with(())
            .given(vec![placed(), OrderEvent::OrderConfirmed])
            .when(OrderCommand::Reject {
                reason: RejectionReason::PaymentDeclined,
            })
            .then_expect_error_message("cannot reject an order that is confirmed");
    }

    #[test]
    fn a_rejected_order_cannot_be_rejected_for_another_reason() {
        Given::with(())
            .given(vec![placed(), rejected()])
            .when(OrderCommand::Reject {
                reason: RejectionReason::PaymentFailed,
            })
            .then_expect_error_message("cannot reject an order that is rejected");
    }

    #[test]
    fn pending_and_confirmed_orders_can_be_cancelled() {
        let cancelled = OrderEvent::OrderCancelled { reason: None };
        Given::with(())
            .given(vec![placed()])
            .when(cancel())
            .then_expect_events(vec![cancelled.clone()]);
        Given::with(())
            .given(vec![placed(), OrderEvent::OrderConfirmed])
            .when(cancel())
            .then_expect_events(vec![cancelled.clone()]);
        Given::with(())
            .given(vec![placed(), cancelled])
            .when(cancel())
            .then_expect_events(vec![]);
    }

    #[test]
    fn rejected_and_shipped_orders_cannot_be_cancelled() {
        Given::with(())
            .given(vec![placed(), rejected()])
            .when(cancel())
            .then_expect_error_message("cannot cancel an order that is rejected");
        Given::with(())
            .given(vec![placed(), OrderEvent::OrderConfirmed, shipped()])
            .when(cancel())
            .then_expect_error_message("cannot cancel an order that is shipped");
    }

    fn shipped() -> OrderEvent {
        OrderEvent::OrderShipped {
            carrier: None,
            tracking: None,
        }
    }

    #[test]
    fn only_a_confirmed_order_ships() {
        Given::with(())
            .given(vec![placed(), OrderEvent::OrderConfirmed])
            .when(ship())
            .then_expect_events(vec![shipped()]);
        Given::with(())
            .given(vec![placed()])
            .when(ship())
            .then_expect_error_message("cannot ship an order that is pending");
        Given::with(())
            .given(vec![placed(), OrderEvent::OrderCancelled { reason: None }])
            .when(ship())
            .then_expect_error_message("cannot ship an order that is cancelled");
        Given::with(())
            .given(vec![placed(), OrderEvent::OrderConfirmed, shipped()])
            .when(ship())
            .then_expect_events(vec![]);
    }
}
