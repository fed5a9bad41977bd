//! Given/when/then tests of the fulfillment saga on its own: no database, no HTTP, no clock.
//! Each test starts from a placed order, feeds the saga what the aggregates and the gateway
//! answered, and checks what it does next.

#![expect(
    clippy::unwrap_used,
    reason = "a test that cannot go on should fail loudly"
)]

use chrono::{DateTime, Duration, TimeZone, Utc};
use uuid::Uuid;

use aggregates::order::{OrderLine, RejectionReason};
use aggregates::payment::AttemptOutcome;
use aggregates::values::{Currency, Money, OrderId, PaymentToken, Quantity, Sku};
use sagas::fulfillment::{
    Action, Fulfillment, GatewayAnswer, GatewayOp, Goal, Outcome, PaymentRecord, SagaState, Timing,
};
use sagas::gateway::{Authorization, GatewayError};

fn sku(s: &str) -> Sku {
    Sku::parse(s).unwrap()
}

fn eur(minor: i64) -> Money {
    Money::new(minor, Currency::parse("EUR").unwrap()).unwrap()
}

/// A saga under test with its own clock.
struct Given {
    saga: Fulfillment,
    now: DateTime<Utc>,
    timing: Timing,
}

/// An order of `lines` (SKU, units) at 1.00 EUR a unit, as placed.
fn placed(lines: &[(&str, u32)]) -> Given {
    let now = Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap();
    let lines: Vec<OrderLine> = lines
        .iter()
        .map(|(s, q)| OrderLine {
            sku: sku(s),
            quantity: Quantity::try_from(*q).unwrap(),
            unit_price: eur(100),
        })
        .collect();
    let total = lines
        .iter()
        .map(|l| i64::from(l.quantity.get()) * 100)
        .sum();
    let order_id = OrderId::from(Uuid::from_u128(7));
    Given {
        saga: Fulfillment::start(
            order_id,
            Uuid::from_u128(8),
            &lines,
            eur(total),
            PaymentToken::parse("tok_visa").unwrap(),
            now,
        ),
        now,
        timing: Timing::default(),
    }
}

fn reserve(s: &str, units: u32) -> Action {
    Action::Reserve {
        sku: sku(s),
        quantity: Quantity::try_from(units).unwrap(),
    }
}

fn release(s: &str) -> Action {
    Action::Release { sku: sku(s) }
}

fn attempt(n: u32, outcome: AttemptOutcome) -> Action {
    Action::Record(PaymentRecord::Attempt {
        attempt_id: format!("{}/authorize#{n}", OrderId::from(Uuid::from_u128(7))),
        outcome,
    })
}

fn authorized() -> AttemptOutcome {
    AttemptOutcome::Authorized {
        provider_reference: "ref_1".into(),
    }
}

fn decided_authorized() -> GatewayAnswer {
    GatewayAnswer::Decided(Authorization::Authorized {
        reference: "ref_1".into(),
    })
}

impl Given {
    /// The saga's next action must be `expected`; it ends with `outcome`.
    fn does(&mut self, expected: Action, outcome: Outcome) -> &mut Self {
        let action = self.saga.next(self.now);
        assert_eq!(action, expected);
        self.saga.record(&action, outcome, &self.timing, self.now);
        self
    }

    fn done(&mut self, expected: Action) -> &mut Self {
        self.does(expected, Outcome::Done)
    }

    /// The saga must now wait on the gateway call `op`, due at `self.now + after`.
    fn calls(&mut self, op: GatewayOp, after: Duration) -> &mut Self {
        match self.saga.next(self.now) {
            Action::Call { op: called, due } => {
                assert_eq!(called, op);
                assert_eq!(due, self.now + after, "due time of {op:?}");
            }
            other => panic!("expected a call to {op:?}, got {other:?}"),
        }
        self
    }

    /// The gateway answers the pending call `op` (made when it was due).
    fn answers(&mut self, op: GatewayOp, answer: GatewayAnswer) -> &mut Self {
        if let Some(due) = self.saga.due() {
            self.now = self.now.max(due);
        }
        self.saga.on_gateway(op, answer, &self.timing, self.now);
        self
    }

    /// A pending call the saga waits on: the same as [`Given::calls`] with no delay.
    fn calls_now(&mut self, op: GatewayOp) -> &mut Self {
        self.calls(op, Duration::zero())
    }

    fn waits(&mut self) -> &mut Self {
        assert_eq!(self.saga.next(self.now), Action::Wait);
        self
    }

    fn is(&mut self, state: SagaState) -> &mut Self {
        assert_eq!(
            self.saga.state(),
            state,
            "history: {:?}",
            self.saga.history()
        );
        self
    }

    /// Reserve both lines of `placed(&[("A", 1), ("B", 2)])`, request the payment.
    fn reserved_and_requested(&mut self) -> &mut Self {
        self.done(reserve("A", 1))
            .done(reserve("B", 2))
            .done(Action::RequestPayment {
                amount: eur(300),
                token: PaymentToken::parse("tok_visa").unwrap(),
            })
    }

    /// Compensation of a two-line order holding an authorization: void it, then release the
    /// lines newest first.
    fn voids_then_releases_b_and_a(&mut self) -> &mut Self {
        self.calls_now(GatewayOp::Void)
            .answers(GatewayOp::Void, GatewayAnswer::Done)
            .done(Action::Record(PaymentRecord::Voided))
            .done(release("B"))
            .done(release("A"))
    }

    /// From placement to a confirmed order.
    fn confirmed(&mut self) -> &mut Self {
        self.reserved_and_requested()
            .calls_now(GatewayOp::Authorize)
            .answers(GatewayOp::Authorize, decided_authorized())
            .done(attempt(1, authorized()))
            .done(Action::ConfirmOrder)
            .waits()
            .is(SagaState::Confirmed)
    }
}

#[test]
fn a_placed_order_reserves_in_sku_order_then_authorizes_then_confirms() {
    // Lines given B first: reservations still go A, then B, as in every saga.
    let mut t = placed(&[("B", 2), ("A", 1)]);
    t.is(SagaState::Running)
        .done(reserve("A", 1))
        .done(reserve("B", 2))
        .done(Action::RequestPayment {
            amount: eur(300),
            token: PaymentToken::parse("tok_visa").unwrap(),
        })
        .calls_now(GatewayOp::Authorize)
        .answers(GatewayOp::Authorize, decided_authorized())
        .done(attempt(1, authorized()))
        .done(Action::ConfirmOrder)
        .waits()
        .is(SagaState::Confirmed);
    assert_eq!(t.saga.reference(), Some("ref_1"));
    assert_eq!(t.saga.deadline(), None);
}

#[test]
fn out_of_stock_on_a_later_sku_releases_the_earlier_ones_and_rejects() {
    placed(&[("A", 1), ("B", 2)])
        .done(reserve("A", 1))
        .does(reserve("B", 2), Outcome::Refused)
        .done(release("A"))
        .done(Action::RejectOrder {
            reason: RejectionReason::OutOfStock,
        })
        .waits()
        .is(SagaState::Completed);
}

#[test]
fn out_of_stock_on_the_first_sku_rejects_with_nothing_to_release() {
    placed(&[("A", 1), ("B", 2)])
        .does(reserve("A", 1), Outcome::Refused)
        .done(Action::RejectOrder {
            reason: RejectionReason::OutOfStock,
        })
        .waits()
        .is(SagaState::Completed);
}

#[test]
fn a_declined_payment_releases_every_reservation_newest_first_and_rejects() {
    placed(&[("A", 1), ("B", 2)])
        .reserved_and_requested()
        .calls_now(GatewayOp::Authorize)
        .answers(
            GatewayOp::Authorize,
            GatewayAnswer::Decided(Authorization::Declined {
                reason: "card_declined".into(),
            }),
        )
        .done(attempt(
            1,
            AttemptOutcome::Declined {
                reason: "card_declined".into(),
            },
        ))
        .done(release("B"))
        .done(release("A"))
        .done(Action::RejectOrder {
            reason: RejectionReason::PaymentDeclined,
        })
        .waits()
        .is(SagaState::Completed);
}

#[test]
fn a_permanent_gateway_failure_rejects_with_payment_failed() {
    placed(&[("A", 1), ("B", 2)])
        .reserved_and_requested()
        .calls_now(GatewayOp::Authorize)
        .answers(
            GatewayOp::Authorize,
            GatewayAnswer::Failed(GatewayError::Permanent("unknown token".into())),
        )
        .done(attempt(
            1,
            AttemptOutcome::Failed {
                error: "unknown token".into(),
                retryable: false,
            },
        ))
        .done(release("B"))
        .done(release("A"))
        .done(Action::RejectOrder {
            reason: RejectionReason::PaymentFailed,
        })
        .is(SagaState::Completed);
}

#[test]
fn transient_failures_are_retried_later_with_the_same_key_and_recorded() {
    let mut t = placed(&[("A", 1), ("B", 2)]);
    t.reserved_and_requested()
        .calls_now(GatewayOp::Authorize)
        .answers(
            GatewayOp::Authorize,
            GatewayAnswer::Failed(GatewayError::Transient("503".into())),
        )
        .done(attempt(
            1,
            AttemptOutcome::Failed {
                error: "503".into(),
                retryable: true,
            },
        ));
    // Backed off: due later than now, within the first retry's window (100-200 ms).
    let due = t.saga.due().unwrap();
    assert!(due > t.now && due <= t.now + Duration::milliseconds(200));
    t.calls(GatewayOp::Authorize, due - t.now)
        .answers(GatewayOp::Authorize, decided_authorized())
        .done(attempt(2, authorized()))
        .done(Action::ConfirmOrder)
        .is(SagaState::Confirmed);
    assert_eq!(
        GatewayOp::Authorize.key(t.saga.order_id()),
        format!("{}/authorize", t.saga.order_id())
    );
}

#[test]
fn an_unknown_outcome_is_asked_for_not_assumed_and_not_recorded_as_an_attempt() {
    let mut t = placed(&[("A", 1), ("B", 2)]);
    t.reserved_and_requested()
        .calls_now(GatewayOp::Authorize)
        .answers(
            GatewayOp::Authorize,
            GatewayAnswer::Failed(GatewayError::Unknown("timeout".into())),
        );
    let due = t.saga.due().unwrap();
    t.calls(GatewayOp::Retrieve, due - t.now)
        .answers(GatewayOp::Retrieve, decided_authorized())
        // The first recorded attempt is the one that authorized.
        .done(attempt(1, authorized()))
        .done(Action::ConfirmOrder)
        .is(SagaState::Confirmed);
}

#[test]
fn an_authorization_the_provider_never_received_is_sent_again() {
    placed(&[("A", 1), ("B", 2)])
        .reserved_and_requested()
        .calls_now(GatewayOp::Authorize)
        .answers(
            GatewayOp::Authorize,
            GatewayAnswer::Failed(GatewayError::Unknown("connection reset".into())),
        )
        .answers(GatewayOp::Retrieve, GatewayAnswer::NotFound)
        .calls_now(GatewayOp::Authorize)
        .answers(GatewayOp::Authorize, decided_authorized())
        .done(attempt(1, authorized()))
        .done(Action::ConfirmOrder)
        .is(SagaState::Confirmed);
}

#[test]
fn authorization_past_its_deadline_is_resolved_then_compensated_as_payment_failed() {
    let mut t = placed(&[("A", 1), ("B", 2)]);
    t.reserved_and_requested();
    let deadline = t.saga.deadline().unwrap();
    assert_eq!(deadline, t.now + Timing::default().authorization_deadline);
    // The provider times out again and again until the deadline passes.
    t.calls_now(GatewayOp::Authorize).answers(
        GatewayOp::Authorize,
        GatewayAnswer::Failed(GatewayError::Unknown("timeout".into())),
    );
    t.now = deadline;
    // Compensation must first learn whether an authorization exists: it does, so it is voided.
    t.calls_now(GatewayOp::Retrieve)
        .is(SagaState::Compensating)
        .answers(GatewayOp::Retrieve, decided_authorized())
        .done(attempt(1, authorized()))
        .voids_then_releases_b_and_a()
        .done(Action::RejectOrder {
            reason: RejectionReason::PaymentFailed,
        })
        .is(SagaState::Completed);
}

#[test]
fn an_authorization_answered_after_the_deadline_is_voided_and_the_order_rejected() {
    let mut t = placed(&[("A", 1), ("B", 2)]);
    t.reserved_and_requested().calls_now(GatewayOp::Authorize);
    // A slow provider: the answer comes after the deadline.
    t.now = t.saga.deadline().unwrap() + Duration::seconds(1);
    t.answers(GatewayOp::Authorize, decided_authorized())
        .done(attempt(1, authorized()))
        .voids_then_releases_b_and_a()
        .done(Action::RejectOrder {
            reason: RejectionReason::PaymentFailed,
        })
        .is(SagaState::Completed);
}

#[test]
fn cancelling_before_payment_releases_the_reservations_and_rejects_nothing() {
    let mut t = placed(&[("A", 1), ("B", 2)]);
    t.done(reserve("A", 1));
    t.saga.on_cancelled(t.now);
    t.done(release("A")).waits().is(SagaState::Completed);
    assert_eq!(t.saga.goal(), Goal::Cancel);
}

#[test]
fn cancelling_while_authorizing_resolves_the_authorization_and_voids_it() {
    let mut t = placed(&[("A", 1), ("B", 2)]);
    t.reserved_and_requested().calls_now(GatewayOp::Authorize);
    t.saga.on_cancelled(t.now);
    t.calls_now(GatewayOp::Retrieve)
        .answers(GatewayOp::Retrieve, decided_authorized())
        .done(attempt(1, authorized()))
        .voids_then_releases_b_and_a()
        .waits()
        .is(SagaState::Completed);
}

#[test]
fn cancelling_before_the_provider_got_the_authorization_abandons_it() {
    let mut t = placed(&[("A", 1), ("B", 2)]);
    t.reserved_and_requested();
    t.saga.on_cancelled(t.now);
    t.calls_now(GatewayOp::Retrieve)
        .answers(GatewayOp::Retrieve, GatewayAnswer::NotFound)
        .done(attempt(
            1,
            AttemptOutcome::Failed {
                error: "abandoned before the provider received it".into(),
                retryable: false,
            },
        ))
        .done(release("B"))
        .done(release("A"))
        .is(SagaState::Completed);
}

#[test]
fn an_answer_arriving_after_a_cancellation_is_still_voided() {
    let mut t = placed(&[("A", 1), ("B", 2)]);
    t.reserved_and_requested().calls_now(GatewayOp::Authorize);
    // The call was in flight when the order was cancelled; its answer comes afterwards.
    t.saga.on_cancelled(t.now);
    t.answers(GatewayOp::Authorize, decided_authorized())
        .done(attempt(1, authorized()))
        .calls_now(GatewayOp::Void);
}

#[test]
fn cancelling_a_confirmed_order_voids_the_payment_and_releases_the_stock() {
    let mut t = placed(&[("A", 1), ("B", 2)]);
    t.confirmed();
    t.saga.on_cancelled(t.now);
    t.is(SagaState::Compensating)
        .voids_then_releases_b_and_a()
        .waits()
        .is(SagaState::Completed);
}

#[test]
fn a_confirmation_refused_because_the_order_was_cancelled_compensates() {
    let mut t = placed(&[("A", 1), ("B", 2)]);
    t.reserved_and_requested()
        .calls_now(GatewayOp::Authorize)
        .answers(GatewayOp::Authorize, decided_authorized())
        .done(attempt(1, authorized()))
        .does(Action::ConfirmOrder, Outcome::Refused)
        .calls_now(GatewayOp::Void);
    assert_eq!(t.saga.goal(), Goal::Cancel);
}

#[test]
fn shipping_commits_the_reservations_and_captures_the_payment() {
    let mut t = placed(&[("A", 1), ("B", 2)]);
    t.confirmed();
    t.saga.on_shipped(t.now);
    t.is(SagaState::Settling)
        .done(Action::CommitReservation { sku: sku("A") })
        .done(Action::CommitReservation { sku: sku("B") })
        .calls_now(GatewayOp::Capture)
        .answers(GatewayOp::Capture, GatewayAnswer::Done)
        .done(Action::Record(PaymentRecord::Captured))
        .waits()
        .is(SagaState::Completed);
}

#[test]
fn a_void_that_keeps_failing_parks_the_saga_until_an_operator_retries() {
    let mut t = placed(&[("A", 1), ("B", 2)]);
    t.confirmed();
    t.saga.on_cancelled(t.now);
    for _ in 0..t.timing.settlement_attempts {
        let action = t.saga.next(t.now);
        assert!(
            matches!(
                action,
                Action::Call {
                    op: GatewayOp::Void,
                    ..
                }
            ),
            "{action:?}"
        );
        t.answers(
            GatewayOp::Void,
            GatewayAnswer::Failed(GatewayError::Transient("503".into())),
        );
    }
    t.is(SagaState::Stuck).waits();
    assert_eq!(t.saga.due(), None);
    assert!(t.saga.last_error().unwrap().contains("503"));
    assert!(t.saga.retry(t.now));
    t.calls_now(GatewayOp::Void)
        .answers(GatewayOp::Void, GatewayAnswer::Done)
        .done(Action::Record(PaymentRecord::Voided))
        .done(release("B"))
        .done(release("A"))
        .is(SagaState::Completed);
    assert!(
        !t.saga.retry(t.now),
        "a saga that is not stuck is not retried"
    );
}

#[test]
fn a_void_refused_for_good_parks_the_saga_at_once() {
    let mut t = placed(&[("A", 1), ("B", 2)]);
    t.confirmed();
    t.saga.on_cancelled(t.now);
    t.calls_now(GatewayOp::Void)
        .answers(
            GatewayOp::Void,
            GatewayAnswer::Failed(GatewayError::Permanent("already captured".into())),
        )
        .is(SagaState::Stuck);
}

#[test]
fn an_aggregate_refusal_nobody_foresaw_parks_the_saga_with_its_reason() {
    let mut t = placed(&[("A", 1)]);
    t.saga.halt("reserve/A: reservation mismatch", t.now);
    t.is(SagaState::Stuck).waits();
    assert!(t.saga.retry(t.now));
    t.done(reserve("A", 1));
}

#[test]
fn a_payment_request_the_payment_refuses_rejects_the_order_and_releases_its_stock() {
    // A zero-priced catalog entry: the payment aggregate refuses a zero amount.
    let mut t = placed(&[("A", 1), ("B", 2)]);
    t.done(reserve("A", 1)).done(reserve("B", 2));
    let request = t.saga.next(t.now);
    assert!(matches!(request, Action::RequestPayment { .. }));
    t.saga
        .refused(&request, "request-payment: amount must not be zero", t.now);
    t.is(SagaState::Compensating)
        .done(release("B"))
        .done(release("A"))
        .done(Action::RejectOrder {
            reason: RejectionReason::PaymentFailed,
        })
        .waits()
        .is(SagaState::Completed);
}

#[test]
fn a_reservation_refused_for_an_unforeseen_reason_rejects_out_of_stock() {
    let mut t = placed(&[("A", 1), ("B", 2)]);
    t.done(reserve("A", 1));
    let second = t.saga.next(t.now);
    t.saga.refused(&second, "reserve/B: stock overflow", t.now);
    t.done(release("A"))
        .done(Action::RejectOrder {
            reason: RejectionReason::OutOfStock,
        })
        .waits()
        .is(SagaState::Completed);
}

#[test]
fn an_unforeseen_refusal_while_compensating_parks_the_saga() {
    let mut t = placed(&[("A", 1), ("B", 2)]);
    t.done(reserve("A", 1)).done(reserve("B", 2));
    t.saga.on_cancelled(t.now);
    let release_b = t.saga.next(t.now);
    assert_eq!(release_b, release("B"));
    t.saga
        .refused(&release_b, "release/B: not registered", t.now);
    t.is(SagaState::Stuck).waits();
}

#[test]
fn the_state_survives_a_round_trip_through_json_mid_flight() {
    let mut t = placed(&[("A", 1), ("B", 2)]);
    t.reserved_and_requested()
        .calls_now(GatewayOp::Authorize)
        .answers(
            GatewayOp::Authorize,
            GatewayAnswer::Failed(GatewayError::Unknown("timeout".into())),
        );
    let json = serde_json::to_string(&t.saga).unwrap();
    let back: Fulfillment = serde_json::from_str(&json).unwrap();
    assert_eq!(back, t.saga);
}

#[test]
fn history_is_capped_but_keeps_the_start() {
    let mut t = placed(&[("A", 1)]);
    t.done(reserve("A", 1)).done(Action::RequestPayment {
        amount: eur(100),
        token: PaymentToken::parse("tok_visa").unwrap(),
    });
    for _ in 0..100 {
        t.answers(
            GatewayOp::Authorize,
            GatewayAnswer::Failed(GatewayError::Unknown("timeout".into())),
        );
    }
    assert!(t.saga.history().len() <= 40);
    assert_eq!(t.saga.history()[0].what, "started");
}
