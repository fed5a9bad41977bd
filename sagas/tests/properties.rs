//! Property test of the fulfillment saga in an in-memory world: real aggregates (decide and
//! apply), a provider that behaves like the simulated gateway's tokens, customers cancelling and
//! admins shipping at random moments, and a log consumer that learns of them late.
//!
//! Whatever the interleaving: no SKU is ever oversold, every saga finishes, no reservation
//! outlives a rejected or cancelled order, no order is authorized more than once, and the money
//! held at the provider matches the orders' states.

#![expect(
    clippy::unwrap_used,
    reason = "a test that cannot go on should fail loudly"
)]

use std::collections::{BTreeMap, HashMap, VecDeque};

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use uuid::Uuid;

use aggregates::inventory::{Product, ProductCommand};
use aggregates::order::{Order, OrderCommand, OrderEvent, OrderLine, OrderStatus};
use aggregates::payment::{Payment, PaymentStatus};
use aggregates::values::{
    Currency, CustomerId, Money, OrderId, PaymentToken, ProductName, Quantity, Sku,
};
use sagas::fulfillment::{
    order_verdict, payment_verdict, product_verdict, Action, Command, Fulfillment, GatewayAnswer,
    GatewayOp, SagaState, Timing,
};
use sagas::gateway::{Authorization, GatewayError};

const SKUS: [&str; 3] = ["A", "B", "C"];
const TOKENS: [&str; 5] = [
    "tok_visa",
    "tok_declined",
    "tok_timeout_then_ok",
    "tok_flaky",
    "tok_unknown",
];

fn eur(minor: i64) -> Money {
    Money::new(minor, Currency::parse("EUR").unwrap()).unwrap()
}

/// An authorization held at the provider.
#[derive(Debug, Default)]
struct Hold {
    voided: bool,
    captured: bool,
}

/// A provider with the simulated gateway's tokens; it remembers every decision by key.
#[derive(Default)]
struct Provider {
    calls: HashMap<String, u32>,
    decided: HashMap<String, Authorization>,
    holds: HashMap<String, Hold>,
    /// Authorizations granted per order key: must never exceed one.
    granted: HashMap<String, u32>,
}

impl Provider {
    fn authorize(&mut self, key: &str, token: &str) -> Result<Authorization, GatewayError> {
        let calls = {
            let n = self.calls.entry(key.to_owned()).or_default();
            *n += 1;
            *n
        };
        if let Some(decided) = self.decided.get(key) {
            return Ok(decided.clone());
        }
        let grant = |p: &mut Self| {
            let reference = format!("sim_{key}");
            p.holds.insert(reference.clone(), Hold::default());
            *p.granted.entry(key.to_owned()).or_default() += 1;
            let decision = Authorization::Authorized { reference };
            p.decided.insert(key.to_owned(), decision.clone());
            decision
        };
        match token {
            "tok_visa" => Ok(grant(self)),
            "tok_declined" => {
                let decision = Authorization::Declined {
                    reason: "card_declined".into(),
                };
                self.decided.insert(key.to_owned(), decision.clone());
                Ok(decision)
            }
            "tok_timeout_then_ok" if calls == 1 => {
                grant(self);
                Err(GatewayError::Unknown("timeout".into()))
            }
            "tok_timeout_then_ok" => Ok(grant(self)),
            "tok_flaky" if calls <= 2 => Err(GatewayError::Transient("503".into())),
            "tok_flaky" => Ok(grant(self)),
            _ => Err(GatewayError::Permanent("unknown token".into())),
        }
    }

    fn settle(&mut self, op: GatewayOp, reference: Option<&str>) -> GatewayAnswer {
        let Some(hold) = reference.and_then(|r| self.holds.get_mut(r)) else {
            return GatewayAnswer::Failed(GatewayError::Permanent("no authorization".into()));
        };
        match op {
            GatewayOp::Void if !hold.captured => hold.voided = true,
            GatewayOp::Capture if !hold.voided => hold.captured = true,
            GatewayOp::Refund if hold.captured => hold.captured = false,
            _ => return GatewayAnswer::Failed(GatewayError::Permanent("not allowed".into())),
        }
        GatewayAnswer::Done
    }
}

/// Everything the saga touches, in memory.
struct World {
    now: DateTime<Utc>,
    timing: Timing,
    products: BTreeMap<Sku, Product>,
    orders: HashMap<OrderId, Order>,
    payments: HashMap<OrderId, Payment>,
    provider: Provider,
    sagas: BTreeMap<OrderId, Fulfillment>,
    /// Order events the saga's consumer has not read yet.
    unread: VecDeque<(OrderId, OrderEvent)>,
    ids: Vec<OrderId>,
}

impl World {
    fn new(stock: &[u32]) -> Self {
        let mut products = BTreeMap::new();
        for (sku, units) in SKUS.iter().zip(stock) {
            let sku = Sku::parse(sku).unwrap();
            let mut product = Product::default();
            for event in product
                .decide(ProductCommand::Register {
                    sku: sku.clone(),
                    name: ProductName::parse("thing").unwrap(),
                    price: eur(100),
                    low_stock_threshold: 0,
                    initial_stock: u64::from(*units),
                })
                .unwrap()
            {
                product.apply_event(event);
            }
            products.insert(sku, product);
        }
        Self {
            now: Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap(),
            timing: Timing::default(),
            products,
            orders: HashMap::new(),
            payments: HashMap::new(),
            provider: Provider::default(),
            sagas: BTreeMap::new(),
            unread: VecDeque::new(),
            ids: Vec::new(),
        }
    }

    fn place(&mut self, lines: &[(usize, u32)], token: &str) {
        let order_id = OrderId::from(Uuid::from_u128(self.ids.len() as u128 + 1));
        let mut seen = Vec::new();
        let lines: Vec<OrderLine> = lines
            .iter()
            .filter(|(s, _)| {
                let fresh = !seen.contains(s);
                seen.push(*s);
                fresh
            })
            .map(|(s, q)| OrderLine {
                sku: Sku::parse(SKUS[*s]).unwrap(),
                quantity: Quantity::try_from(*q).unwrap(),
                unit_price: eur(100),
            })
            .collect();
        let mut order = Order::default();
        let events = order
            .decide(OrderCommand::Place {
                order_id,
                customer_id: CustomerId::parse("c").unwrap(),
                lines,
                payment_token: PaymentToken::parse(token).unwrap(),
                shipping_address: None,
            })
            .unwrap();
        for event in events {
            self.unread.push_back((order_id, event.clone()));
            order.apply_event(event);
        }
        self.orders.insert(order_id, order);
        self.ids.push(order_id);
    }

    /// An HTTP command on an order (cancel, ship): decided now, read by the saga later.
    fn order_command(&mut self, order_id: OrderId, command: OrderCommand) {
        let order = self.orders.get_mut(&order_id).unwrap();
        if let Ok(events) = order.decide(command) {
            for event in events {
                self.unread.push_back((order_id, event.clone()));
                order.apply_event(event);
            }
        }
    }

    /// The saga's consumer reads the next order event.
    fn consume(&mut self) -> bool {
        let Some((order_id, event)) = self.unread.pop_front() else {
            return false;
        };
        let now = self.now;
        match event {
            OrderEvent::OrderPlaced {
                lines,
                total,
                payment_token,
                ..
            } => {
                let saga =
                    Fulfillment::start(order_id, Uuid::nil(), &lines, total, payment_token, now);
                self.sagas.insert(order_id, saga);
            }
            OrderEvent::OrderCancelled { .. } => self.saga(order_id).on_cancelled(now),
            OrderEvent::OrderShipped { .. } => self.saga(order_id).on_shipped(now),
            OrderEvent::OrderConfirmed | OrderEvent::OrderRejected { .. } => {}
        }
        self.drive(order_id);
        true
    }

    fn saga(&mut self, order_id: OrderId) -> &mut Fulfillment {
        self.sagas.get_mut(&order_id).unwrap()
    }

    /// Runs the saga's aggregate actions until it waits, as one transaction would.
    fn drive(&mut self, order_id: OrderId) {
        let mut saga = self.sagas.remove(&order_id).unwrap();
        loop {
            let action = saga.next(self.now);
            let Some((step, command)) = saga.command(&action) else {
                break;
            };
            match self.execute(order_id, command) {
                Ok(outcome) => saga.record(&action, outcome, &self.timing, self.now),
                Err(why) => {
                    saga.halt(format!("{step}: {why}"), self.now);
                    break;
                }
            }
        }
        self.sagas.insert(order_id, saga);
    }

    fn execute(&mut self, order_id: OrderId, command: Command) -> sagas::fulfillment::Verdict {
        match command {
            Command::Product { sku, command } => {
                let product = self.products.get_mut(&sku).unwrap();
                let result = product.decide(command).map(|events| {
                    for event in events {
                        product.apply_event(event);
                        assert!(product.reserved() <= product.on_hand(), "{sku} oversold");
                    }
                });
                product_verdict(result)
            }
            Command::Order(command) => {
                let order = self.orders.get_mut(&order_id).unwrap();
                let result = order.decide(command).map(|events| {
                    for event in events {
                        self.unread.push_back((order_id, event.clone()));
                        order.apply_event(event);
                    }
                });
                order_verdict(result)
            }
            Command::Payment(command) => {
                let payment = self.payments.entry(order_id).or_default();
                let result = payment.decide(command).map(|events| {
                    for event in events {
                        payment.apply_event(event);
                    }
                });
                payment_verdict(result)
            }
        }
    }

    /// Makes the saga's pending gateway call, when due (the clock jumps there), and records it.
    fn call(&mut self, order_id: OrderId) -> bool {
        let now = self.now;
        let saga = self.saga(order_id);
        let Action::Call { op, due } = saga.next(now) else {
            return false;
        };
        let saga = saga.clone();
        self.now = self.now.max(due);
        let key = op.key(order_id);
        let answer = match op {
            GatewayOp::Authorize => match self.provider.authorize(&key, saga.token().as_str()) {
                Ok(decision) => GatewayAnswer::Decided(decision),
                Err(e) => GatewayAnswer::Failed(e),
            },
            GatewayOp::Retrieve => match self.provider.decided.get(&key) {
                Some(decision) => GatewayAnswer::Decided(decision.clone()),
                None => GatewayAnswer::NotFound,
            },
            settle => self.provider.settle(settle, saga.reference()),
        };
        let (timing, now) = (self.timing, self.now);
        self.saga(order_id).on_gateway(op, answer, &timing, now);
        self.drive(order_id);
        true
    }

    /// Runs everything to the end: the consumer reads all, every due call is made.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let consumed = self.consume();
            let ids: Vec<OrderId> = self.sagas.keys().copied().collect();
            let called = ids
                .into_iter()
                .map(|id| self.call(id))
                .fold(false, |a, b| a | b);
            if !consumed && !called {
                return;
            }
        }
        panic!("the world did not settle");
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// The consumer reads one order event.
    Consume,
    /// The gateway worker makes order n's pending call.
    Call(usize),
    /// The customer cancels order n.
    Cancel(usize),
    /// An admin ships order n.
    Ship(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::Consume),
        3 => (0..8usize).prop_map(Step::Call),
        1 => (0..8usize).prop_map(Step::Cancel),
        1 => (0..8usize).prop_map(Step::Ship),
    ]
}

fn order() -> impl Strategy<Value = (Vec<(usize, u32)>, usize)> {
    (
        prop::collection::vec((0..SKUS.len(), 1..=3u32), 1..=3),
        0..TOKENS.len(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn stock_and_money_add_up_and_every_saga_finishes(
        stock in prop::collection::vec(0..6u32, SKUS.len()),
        orders in prop::collection::vec(order(), 1..=8),
        steps in prop::collection::vec(step(), 0..80),
    ) {
        let mut world = World::new(&stock);
        for (lines, token) in &orders {
            world.place(lines, TOKENS[*token]);
        }
        for step in steps {
            let n = world.ids.len();
            match step {
                Step::Consume => {
                    world.consume();
                }
                Step::Call(i) => {
                    let id = world.ids[i % n];
                    if world.sagas.contains_key(&id) {
                        world.call(id);
                    }
                }
                Step::Cancel(i) => {
                    let id = world.ids[i % n];
                    world.order_command(id, OrderCommand::Cancel { reason: None });
                }
                Step::Ship(i) => {
                    let id = world.ids[i % n];
                    world.order_command(id, OrderCommand::Ship { carrier: None, tracking: None });
                }
            }
            world.now += Duration::milliseconds(50);
        }
        world.settle();

        let mut reserved: BTreeMap<Sku, u64> = BTreeMap::new();
        let mut shipped: BTreeMap<Sku, u64> = BTreeMap::new();
        for (id, order) in &world.orders {
            let saga = &world.sagas[id];
            let status = order.status();
            let expected = if status == OrderStatus::Confirmed {
                SagaState::Confirmed
            } else {
                SagaState::Completed
            };
            prop_assert_eq!(saga.state(), expected, "order {} is {:?}: {:?}", id, status, saga.history());
            prop_assert!(status != OrderStatus::Pending, "order {} never finished", id);
            let key = GatewayOp::Authorize.key(*id);
            prop_assert!(world.provider.granted.get(&key).copied().unwrap_or(0) <= 1);
            let hold = world.provider.holds.get(&format!("sim_{key}"));
            let payment = world.payments.get(id).map(Payment::status);
            match status {
                OrderStatus::Confirmed => {
                    prop_assert!(hold.is_some_and(|h| !h.voided && !h.captured));
                    prop_assert_eq!(payment, Some(PaymentStatus::Authorized));
                }
                OrderStatus::Shipped => {
                    prop_assert!(hold.is_some_and(|h| h.captured));
                    prop_assert_eq!(payment, Some(PaymentStatus::Captured));
                }
                _ => {
                    // Rejected or cancelled: nothing held at the provider, nothing recorded as held.
                    prop_assert!(hold.is_none_or(|h| h.voided), "order {} still holds money", id);
                    prop_assert!(!matches!(payment, Some(PaymentStatus::Authorized | PaymentStatus::Captured)));
                }
            }
            for line in &order.placed().unwrap().lines {
                let units = u64::from(line.quantity.get());
                match status {
                    OrderStatus::Confirmed => *reserved.entry(line.sku.clone()).or_default() += units,
                    OrderStatus::Shipped => *shipped.entry(line.sku.clone()).or_default() += units,
                    _ => {}
                }
            }
        }
        for ((sku, product), initial) in world.products.iter().zip(&stock) {
            prop_assert_eq!(product.reserved(), reserved.get(sku).copied().unwrap_or(0), "{} reserved", sku);
            prop_assert_eq!(
                product.on_hand(),
                u64::from(*initial) - shipped.get(sku).copied().unwrap_or(0),
                "{} on hand", sku
            );
        }
    }
}
