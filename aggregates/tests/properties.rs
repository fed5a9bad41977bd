//! Properties of the aggregates under random command sequences: invariants always hold,
//! replaying the produced events reproduces the state, and every event survives serde.

use aggregates::inventory::{Product, ProductCommand, ProductEvent};
use aggregates::order::{Order, OrderCommand, OrderEvent, OrderLine, RejectionReason};
use aggregates::payment::{AttemptOutcome, Payment, PaymentCommand, PaymentEvent};
use aggregates::values::{
    Currency, CustomerId, Money, OrderId, PaymentToken, ProductName, Quantity, Reason, Sku,
};
use proptest::prelude::*;
use serde::{de::DeserializeOwned, Serialize};

fn eur(minor: i64) -> Money {
    Money::new(minor, Currency::parse("EUR").expect("EUR")).expect("non-negative")
}

fn order_id(n: u8) -> OrderId {
    OrderId::from(uuid::Uuid::from_u128(u128::from(n)))
}

fn quantity() -> impl Strategy<Value = Quantity> {
    (1i64..50).prop_map(|n| Quantity::parse(n).expect("in range"))
}

fn product_command() -> impl Strategy<Value = ProductCommand> {
    prop_oneof![
        (0u64..20, 0u64..5).prop_map(|(stock, threshold)| ProductCommand::Register {
            sku: Sku::parse("P").expect("sku"),
            name: ProductName::parse("Product").expect("name"),
            price: eur(100),
            low_stock_threshold: threshold,
            initial_stock: stock,
        }),
        quantity().prop_map(|quantity| ProductCommand::Restock {
            quantity,
            note: None
        }),
        (-30i64..30).prop_map(|delta| ProductCommand::Adjust {
            delta,
            reason: Reason::parse("count").expect("reason"),
        }),
        (0u8..6, quantity()).prop_map(|(o, quantity)| ProductCommand::Reserve {
            order_id: order_id(o),
            quantity
        }),
        (0u8..6).prop_map(|o| ProductCommand::Release {
            order_id: order_id(o)
        }),
        (0u8..6).prop_map(|o| ProductCommand::CommitReservation {
            order_id: order_id(o)
        }),
    ]
}

fn order_command() -> impl Strategy<Value = OrderCommand> {
    let line = (0u8..4, quantity(), 0i64..1000).prop_map(|(s, quantity, price)| OrderLine {
        sku: Sku::parse(&format!("S{s}")).expect("sku"),
        quantity,
        unit_price: eur(price),
    });
    prop_oneof![
        prop::collection::vec(line, 0..5).prop_map(|lines| OrderCommand::Place {
            order_id: order_id(1),
            customer_id: CustomerId::parse("c").expect("customer"),
            lines,
            payment_token: PaymentToken::parse("tok_visa").expect("token"),
            shipping_address: None,
        }),
        Just(OrderCommand::Confirm),
        prop_oneof![
            Just(RejectionReason::OutOfStock),
            Just(RejectionReason::PaymentDeclined),
            Just(RejectionReason::PaymentFailed)
        ]
        .prop_map(|reason| OrderCommand::Reject { reason }),
        Just(OrderCommand::Cancel { reason: None }),
        Just(OrderCommand::Ship {
            carrier: None,
            tracking: None
        }),
    ]
}

fn payment_command() -> impl Strategy<Value = PaymentCommand> {
    let outcome = prop_oneof![
        Just(AttemptOutcome::Authorized {
            provider_reference: "r".into()
        }),
        Just(AttemptOutcome::Declined {
            reason: "no".into()
        }),
        any::<bool>().prop_map(|retryable| AttemptOutcome::Failed {
            error: "e".into(),
            retryable
        }),
    ];
    prop_oneof![
        (0i64..2000).prop_map(|a| PaymentCommand::Request {
            order_id: order_id(1),
            amount: eur(a),
            token: PaymentToken::parse("tok_visa").expect("token"),
        }),
        (0u8..4, outcome).prop_map(|(n, outcome)| PaymentCommand::RecordAttempt {
            attempt_id: format!("a{n}"),
            outcome
        }),
        (0i64..1200).prop_map(|a| PaymentCommand::Capture { amount: eur(a) }),
        Just(PaymentCommand::Void),
        (0i64..1200).prop_map(|a| PaymentCommand::Refund { amount: eur(a) }),
    ]
}

fn round_trips<E: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(event: &E) {
    let json = serde_json::to_value(event).expect("serializes");
    let back: E = serde_json::from_value(json).expect("deserializes");
    assert_eq!(&back, event);
}

/// Runs the commands, keeping every event produced; refused commands change nothing.
macro_rules! run {
    ($agg:ty, $commands:expr, $check:expr) => {{
        let mut state = <$agg>::default();
        let mut log = Vec::new();
        for command in $commands {
            let before = state.clone();
            match state.decide(command) {
                Ok(events) => {
                    for event in events {
                        round_trips(&event);
                        state.apply_event(event.clone());
                        log.push(event);
                    }
                }
                Err(_) => assert_eq!(state, before),
            }
            $check(&state);
        }
        let mut replayed = <$agg>::default();
        log.into_iter().for_each(|e| replayed.apply_event(e));
        prop_assert_eq!(replayed, state);
    }};
}

proptest! {
    #[test]
    fn inventory_never_holds_more_than_it_has(
        commands in prop::collection::vec(product_command(), 0..60)
    ) {
        run!(Product, commands, |p: &Product| {
            assert!(p.on_hand() >= p.reserved(), "on_hand {} < reserved {}", p.on_hand(), p.reserved());
        });
    }

    #[test]
    fn an_order_total_is_always_the_sum_of_its_lines(
        commands in prop::collection::vec(order_command(), 0..20)
    ) {
        run!(Order, commands, |o: &Order| {
            if let Some(placed) = o.placed() {
                let sum: i64 = placed
                    .lines
                    .iter()
                    .map(|l| l.unit_price.amount_minor() * i64::from(l.quantity.get()))
                    .sum();
                assert_eq!(placed.total.amount_minor(), sum);
            }
        });
    }

    #[test]
    fn a_payment_never_captures_or_refunds_too_much(
        commands in prop::collection::vec(payment_command(), 0..40)
    ) {
        run!(Payment, commands, |p: &Payment| {
            let authorized = p.amount().map_or(0, |m| m.amount_minor());
            assert!(p.captured_minor() <= authorized);
            assert!(p.refunded_minor() <= p.captured_minor());
            assert!(p.refunded_minor() >= 0);
        });
    }
}

#[test]
fn events_have_stable_type_names() {
    use cqrs_es::DomainEvent;
    assert_eq!(OrderEvent::OrderConfirmed.event_type(), "OrderConfirmed");
    assert_eq!(PaymentEvent::PaymentVoided.event_type(), "PaymentVoided");
    let event = ProductEvent::Restocked {
        quantity: Quantity::parse(1).expect("q"),
        note: None,
    };
    assert_eq!(event.event_type(), "Restocked");
    assert_eq!(
        serde_json::to_value(&event).expect("json"),
        serde_json::json!({"Restocked": {"quantity": 1, "note": null}})
    );
}
