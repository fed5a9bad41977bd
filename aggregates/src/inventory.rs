//! Inventory: one aggregate per SKU holding its catalog entry and its stock.
//!
//! Invariant: `on_hand >= reserved >= 0`, where `reserved` is the sum of the open reservations.
//! A reservation is keyed by the order it is for, which makes reserving and releasing safe to
//! repeat: a second identical reservation and the release of an unknown one change nothing.

use std::collections::BTreeMap;

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use crate::values::{Money, OrderId, ProductName, Quantity, Reason, Sku};

/// Commands the inventory aggregate decides on.
#[derive(Debug, Clone, PartialEq)]
pub enum ProductCommand {
    /// Adds the SKU to the catalog with its price and an optional starting stock.
    Register {
        /// The SKU; must equal the aggregate id.
        sku: Sku,
        /// Display name.
        name: ProductName,
        /// Unit price charged to orders placed from now on.
        price: Money,
        /// `available` at or below this counts as low stock.
        low_stock_threshold: u64,
        /// Units on hand at registration (may be 0).
        initial_stock: u64,
    },
    /// Goods arrived.
    Restock {
        /// Units received.
        quantity: Quantity,
        /// Free text, e.g. a delivery note number.
        note: Option<Reason>,
    },
    /// A correction after a count, damage or loss; `delta` may be negative.
    Adjust {
        /// Change of `on_hand`; never zero.
        delta: i64,
        /// Why stock changed.
        reason: Reason,
    },
    /// Holds units for an order.
    Reserve {
        /// The order the units are held for.
        order_id: OrderId,
        /// Units to hold.
        quantity: Quantity,
    },
    /// Gives an order's held units back to `available`.
    Release {
        /// The order whose reservation ends.
        order_id: OrderId,
    },
    /// The order shipped: its held units leave the warehouse.
    CommitReservation {
        /// The shipped order.
        order_id: OrderId,
    },
}

/// Facts about a SKU's catalog entry and stock. Stored as JSON; renaming a variant or field is
/// a breaking change for the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ProductEvent {
    /// The SKU entered the catalog.
    ProductRegistered {
        /// The SKU.
        sku: Sku,
        /// Display name.
        name: ProductName,
        /// Unit price.
        price: Money,
        /// Low-stock threshold.
        low_stock_threshold: u64,
        /// Units on hand at registration.
        initial_stock: u64,
    },
    /// Units arrived.
    Restocked {
        /// Units received.
        quantity: Quantity,
        /// Operator's note.
        note: Option<Reason>,
    },
    /// `on_hand` was corrected by `delta`.
    StockAdjusted {
        /// Signed change of `on_hand`.
        delta: i64,
        /// Why the stock was adjusted (count, damage, ...), as the admin said.
        reason: Reason,
    },
    /// Units are held for an order.
    StockReserved {
        /// The order.
        order_id: OrderId,
        /// Units held.
        quantity: Quantity,
    },
    /// An order's held units went back to `available`.
    ReservationReleased {
        /// The order.
        order_id: OrderId,
        /// Units released.
        quantity: Quantity,
    },
    /// An order's held units left stock (shipment).
    ReservationCommitted {
        /// The order.
        order_id: OrderId,
        /// Units that left.
        quantity: Quantity,
    },
    /// `available` fell to or below the threshold; raised once per crossing.
    LowStockReached {
        /// Units available after the change.
        available: u64,
        /// The threshold crossed.
        threshold: u64,
    },
}

impl DomainEvent for ProductEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ProductRegistered { .. } => "ProductRegistered",
            Self::Restocked { .. } => "Restocked",
            Self::StockAdjusted { .. } => "StockAdjusted",
            Self::StockReserved { .. } => "StockReserved",
            Self::ReservationReleased { .. } => "ReservationReleased",
            Self::ReservationCommitted { .. } => "ReservationCommitted",
            Self::LowStockReached { .. } => "LowStockReached",
        }
        .to_owned()
    }

    /// `ProductRegistered` is at version 2 (it always carries `low_stock_threshold`; version 1
    /// could lack it and is upcast on read, see `event_store::upcast`); the others at 1.
    fn event_version(&self) -> String {
        match self {
            Self::ProductRegistered { .. } => "2",
            _ => "1",
        }
        .to_owned()
    }
}

/// Why an inventory command was refused. Callers map each to an answer as its doc says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProductError {
    /// The SKU is already in the catalog: a conflict (HTTP 409).
    #[error("product already registered")]
    AlreadyRegistered,
    /// The SKU is not in the catalog: not found (HTTP 404).
    #[error("unknown sku")]
    NotRegistered,
    /// The command's SKU is not this aggregate's: a bug in the caller.
    #[error("command sku does not match the aggregate")]
    SkuMismatch,
    /// Not enough available units to reserve: the saga rejects the order as `out_of_stock`.
    #[error("out of stock: {requested} requested, {available} available")]
    OutOfStock {
        /// Units asked for.
        requested: u64,
        /// Units available.
        available: u64,
    },
    /// The adjustment would take `on_hand` below what is reserved: a business-rule refusal (422).
    #[error("adjustment would leave on_hand {on_hand_after} below reserved {reserved}")]
    BelowReserved {
        /// What `on_hand` would have become.
        on_hand_after: i128,
        /// Units reserved.
        reserved: u64,
    },
    /// An adjustment of zero units: a validation error (422).
    #[error("delta must not be zero")]
    ZeroDelta,
    /// The order already holds a different quantity of this SKU: a conflict (409).
    #[error("order already holds {held} units, not {requested}")]
    ReservationMismatch {
        /// Units already held.
        held: u64,
        /// Units asked for now.
        requested: u64,
    },
    /// Commit of a reservation that does not exist: the shipment was never reserved (422).
    #[error("no reservation for this order")]
    UnknownReservation,
    /// Stock would exceed what the store can count: a validation error (422).
    #[error("stock would overflow")]
    StockOverflow,
}

/// A SKU's catalog entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// The SKU.
    pub sku: Sku,
    /// Display name.
    pub name: ProductName,
    /// Unit price.
    pub price: Money,
    /// Low-stock threshold.
    pub low_stock_threshold: u64,
}

/// The inventory aggregate's state; also its snapshot (inventory aggregates are hot).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Product {
    catalog: Option<CatalogEntry>,
    on_hand: u64,
    reservations: BTreeMap<OrderId, Quantity>,
}

impl Product {
    /// The catalog entry, once registered.
    pub fn catalog(&self) -> Option<&CatalogEntry> {
        self.catalog.as_ref()
    }

    /// Units physically in stock, reserved or not.
    pub fn on_hand(&self) -> u64 {
        self.on_hand
    }

    /// Units held for orders.
    pub fn reserved(&self) -> u64 {
        self.reservations.values().map(|q| q.units()).sum()
    }

    /// Units that can still be reserved.
    pub fn available(&self) -> u64 {
        self.on_hand.saturating_sub(self.reserved())
    }

    /// Units held for `order_id`, if any.
    pub fn reservation(&self, order_id: OrderId) -> Option<Quantity> {
        self.reservations.get(&order_id).copied()
    }

    /// Whether `available` is at or below the threshold.
    pub fn is_low(&self) -> bool {
        self.catalog
            .as_ref()
            .is_some_and(|c| self.available() <= c.low_stock_threshold)
    }

    /// Decides a command against the current state.
    ///
    /// # Errors
    /// A [`ProductError`] naming the rule the command breaks; no event is produced then.
    pub fn decide(&self, command: ProductCommand) -> Result<Vec<ProductEvent>, ProductError> {
        if let ProductCommand::Register {
            sku,
            name,
            price,
            low_stock_threshold,
            initial_stock,
        } = command
        {
            if self.catalog.is_some() {
                return Err(ProductError::AlreadyRegistered);
            }
            return Ok(vec![ProductEvent::ProductRegistered {
                sku,
                name,
                price,
                low_stock_threshold,
                initial_stock,
            }]);
        }
        let catalog = self.catalog.as_ref().ok_or(ProductError::NotRegistered)?;
        let mut events = match command {
            ProductCommand::Register { .. } => unreachable!("handled above"),
            ProductCommand::Restock { quantity, note } => {
                self.on_hand
                    .checked_add(quantity.units())
                    .filter(|n| i64::try_from(*n).is_ok())
                    .ok_or(ProductError::StockOverflow)?;
                vec![ProductEvent::Restocked { quantity, note }]
            }
            ProductCommand::Adjust { delta, reason } => {
                if delta == 0 {
                    return Err(ProductError::ZeroDelta);
                }
                let on_hand_after = i128::from(self.on_hand) + i128::from(delta);
                let reserved = self.reserved();
                if on_hand_after < i128::from(reserved) {
                    return Err(ProductError::BelowReserved {
                        on_hand_after,
                        reserved,
                    });
                }
                if on_hand_after > i128::from(i64::MAX) {
                    return Err(ProductError::StockOverflow);
                }
                vec![ProductEvent::StockAdjusted { delta, reason }]
            }
            ProductCommand::Reserve { order_id, quantity } => {
                match self.reservations.get(&order_id) {
                    Some(held) if *held == quantity => return Ok(vec![]),
                    Some(held) => {
                        return Err(ProductError::ReservationMismatch {
                            held: held.units(),
                            requested: quantity.units(),
                        })
                    }
                    None => {}
                }
                let available = self.available();
                if quantity.units() > available {
                    return Err(ProductError::OutOfStock {
                        requested: quantity.units(),
                        available,
                    });
                }
                vec![ProductEvent::StockReserved { order_id, quantity }]
            }
            ProductCommand::Release { order_id } => match self.reservations.get(&order_id) {
                Some(&quantity) => vec![ProductEvent::ReservationReleased { order_id, quantity }],
                None => vec![],
            },
            ProductCommand::CommitReservation { order_id } => {
                let &quantity = self
                    .reservations
                    .get(&order_id)
                    .ok_or(ProductError::UnknownReservation)?;
                vec![ProductEvent::ReservationCommitted { order_id, quantity }]
            }
        };
        // Low stock is announced once, on the change that crosses the threshold downwards.
        let mut after = self.clone();
        events.iter().cloned().for_each(|e| after.apply_event(e));
        if !self.is_low() && after.is_low() {
            events.push(ProductEvent::LowStockReached {
                available: after.available(),
                threshold: catalog.low_stock_threshold,
            });
        }
        Ok(events)
    }

    /// Folds one event into the state. Never fails: events are facts.
    pub fn apply_event(&mut self, event: ProductEvent) {
        match event {
            ProductEvent::ProductRegistered {
                sku,
                name,
                price,
                low_stock_threshold,
                initial_stock,
            } => {
                self.catalog = Some(CatalogEntry {
                    sku,
                    name,
                    price,
                    low_stock_threshold,
                });
                self.on_hand = initial_stock;
            }
            ProductEvent::Restocked { quantity, .. } => {
                self.on_hand = self.on_hand.saturating_add(quantity.units());
            }
            ProductEvent::StockAdjusted { delta, .. } => {
                self.on_hand = self.on_hand.saturating_add_signed(delta);
            }
            ProductEvent::StockReserved { order_id, quantity } => {
                self.reservations.insert(order_id, quantity);
            }
            ProductEvent::ReservationReleased { order_id, .. } => {
                self.reservations.remove(&order_id);
            }
            ProductEvent::ReservationCommitted { order_id, quantity } => {
                self.reservations.remove(&order_id);
                self.on_hand = self.on_hand.saturating_sub(quantity.units());
            }
            ProductEvent::LowStockReached { .. } => {}
        }
    }
}

crate::cqrs_aggregate!(
    Product,
    "inventory",
    ProductCommand,
    ProductEvent,
    ProductError
);

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;
    use crate::values::Currency;

    type Given = TestFramework<Product>;

    fn sku() -> Sku {
        Sku::parse("MUG-1").unwrap()
    }
    fn qty(n: i64) -> Quantity {
        Quantity::parse(n).unwrap()
    }
    fn order(n: u128) -> OrderId {
        OrderId::from(uuid::Uuid::from_u128(n))
    }
    fn registered(stock: u64) -> ProductEvent {
        ProductEvent::ProductRegistered {
            sku: sku(),
            name: ProductName::parse("Mug").unwrap(),
            price: Money::new(1250, Currency::parse("EUR").unwrap()).unwrap(),
            low_stock_threshold: 2,
            initial_stock: stock,
        }
    }
    fn reserved(o: u128, n: i64) -> ProductEvent {
        ProductEvent::StockReserved {
            order_id: order(o),
            quantity: qty(n),
        }
    }
    fn register_command() -> ProductCommand {
        ProductCommand::Register {
            sku: sku(),
            name: ProductName::parse("Mug").unwrap(),
            price: Money::new(1250, Currency::parse("EUR").unwrap()).unwrap(),
            low_stock_threshold: 2,
            initial_stock: 10,
        }
    }

    #[test]
    fn registering_a_new_sku_records_it() {
        Given::with(())
            .given_no_previous_events()
            .when(register_command())
            .then_expect_events(vec![registered(10)]);
    }

    #[test]
    fn registering_a_sku_twice_is_refused() {
        Given::with(())
            .given(vec![registered(10)])
            .when(register_command())
            .then_expect_error_message("product already registered");
    }

    #[test]
    fn restocking_an_unknown_sku_is_refused() {
        Given::with(())
            .given_no_previous_events()
            .when(ProductCommand::Restock {
                quantity: qty(1),
                note: None,
            })
            .then_expect_error_message("unknown sku");
    }

    #[test]
    fn restocking_adds_to_on_hand() {
        Given::with(())
            .given(vec![registered(10)])
            .when(ProductCommand::Restock {
                quantity: qty(5),
                note: None,
            })
            .then_expect_events(vec![ProductEvent::Restocked {
                quantity: qty(5),
                note: None,
            }]);
    }

    #[test]
    fn an_adjustment_may_not_go_below_reserved() {
        Given::with(())
            .given(vec![registered(10), reserved(1, 8)])
            .when(ProductCommand::Adjust {
                delta: -3,
                reason: Reason::parse("broken").unwrap(),
            })
            .then_expect_error_message("adjustment would leave on_hand 7 below reserved 8");
    }

    #[test]
    fn a_zero_adjustment_is_refused() {
        Given::with(())
            .given(vec![registered(10)])
            .when(ProductCommand::Adjust {
                delta: 0,
                reason: Reason::parse("count").unwrap(),
            })
            .then_expect_error_message("delta must not be zero");
    }

    #[test]
    fn an_adjustment_down_to_the_threshold_reports_low_stock() {
        let reason = Reason::parse("count").unwrap();
        Given::with(())
            .given(vec![registered(10)])
            .when(ProductCommand::Adjust {
                delta: -8,
                reason: reason.clone(),
            })
            .then_expect_events(vec![
                ProductEvent::StockAdjusted { delta: -8, reason },
                ProductEvent::LowStockReached {
                    available: 2,
                    threshold: 2,
                },
            ]);
    }

    #[test]
    fn reserving_holds_units_for_the_order() {
        Given::with(())
            .given(vec![registered(10)])
            .when(ProductCommand::Reserve {
                order_id: order(1),
                quantity: qty(3),
            })
            .then_expect_events(vec![reserved(1, 3)]);
    }

    #[test]
    fn a_second_reservation_for_the_same_order_is_a_no_op() {
        Given::with(())
            .given(vec![registered(10), reserved(1, 3)])
            .when(ProductCommand::Reserve {
                order_id: order(1),
                quantity: qty(3),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_different_reservation_for_the_same_order_is_refused() {
        Given::with(())
            .given(vec![registered(10), reserved(1, 3)])
            .when(ProductCommand::Reserve {
                order_id: order(1),
                quantity: qty(4),
            })
            .then_expect_error_message("order already holds 3 units, not 4");
    }

    #[test]
    fn reserving_more_than_available_is_out_of_stock() {
        Given::with(())
            .given(vec![registered(10), reserved(1, 8)])
            .when(ProductCommand::Reserve {
                order_id: order(2),
                quantity: qty(3),
            })
            .then_expect_error_message("out of stock: 3 requested, 2 available");
    }

    #[test]
    fn releasing_an_unknown_reservation_is_a_no_op() {
        Given::with(())
            .given(vec![registered(10)])
            .when(ProductCommand::Release { order_id: order(9) })
            .then_expect_events(vec![]);
    }

    #[test]
    fn releasing_returns_the_held_units() {
        Given::with(())
            .given(vec![registered(10), reserved(1, 3)])
            .when(ProductCommand::Release { order_id: order(1) })
            .then_expect_events(vec![ProductEvent::ReservationReleased {
                order_id: order(1),
                quantity: qty(3),
            }]);
    }

    #[test]
    fn committing_a_reservation_takes_the_units_out_of_stock() {
        let mut product = Product::default();
        for e in [registered(10), reserved(1, 3)] {
            product.apply_event(e);
        }
        let events = product
            .decide(ProductCommand::CommitReservation { order_id: order(1) })
            .unwrap();
        events.into_iter().for_each(|e| product.apply_event(e));
        assert_eq!((product.on_hand(), product.reserved()), (7, 0));
    }

    #[test]
    fn committing_an_unknown_reservation_is_refused() {
        Given::with(())
            .given(vec![registered(10)])
            .when(ProductCommand::CommitReservation { order_id: order(1) })
            .then_expect_error_message("no reservation for this order");
    }
}
