//! Payments: one aggregate per order, recording every authorization attempt and every money
//! movement. Invariants: captured <= authorized; refunded <= captured; all in one currency.
//!
//! Attempt outcomes carry the gateway call's idempotency key (`attempt_id`); recording the same
//! attempt twice changes nothing, so a saga that retries after a crash cannot double-count.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use crate::values::{Money, OrderId, PaymentToken};

/// Where a payment is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    /// Not requested yet.
    #[default]
    New,
    /// Waiting for an authorization (transient failures keep it here).
    Requested,
    /// Authorized, nothing captured yet.
    Authorized,
    /// Declined by the provider; final.
    Declined,
    /// Failed for good; final.
    Failed,
    /// Some or all of the authorization captured.
    Captured,
    /// Authorization released without capture; final.
    Voided,
    /// Everything captured was refunded; final.
    Refunded,
}

/// How one authorization attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum AttemptOutcome {
    /// The provider authorized the amount.
    Authorized {
        /// The provider's reference for the authorization.
        provider_reference: String,
    },
    /// The provider declined.
    Declined {
        /// The provider's reason.
        reason: String,
    },
    /// The attempt failed.
    Failed {
        /// What went wrong.
        error: String,
        /// Whether another attempt may succeed.
        retryable: bool,
    },
}

/// One authorization attempt as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1 for the first attempt, then 2, 3, ...
    pub number: u32,
    /// The idempotency key the gateway call used.
    pub attempt_id: String,
    /// How it ended.
    pub outcome: AttemptOutcome,
}

/// Commands the payment aggregate decides on.
#[derive(Debug, Clone, PartialEq)]
pub enum PaymentCommand {
    /// Opens the payment for an order.
    Request {
        /// The order paid for; must equal the aggregate id.
        order_id: OrderId,
        /// The order total.
        amount: Money,
        /// The customer's payment token.
        token: PaymentToken,
    },
    /// Records how an authorization attempt ended.
    RecordAttempt {
        /// The gateway call's idempotency key.
        attempt_id: String,
        /// Its outcome.
        outcome: AttemptOutcome,
    },
    /// Takes (part of) the authorized money.
    Capture {
        /// How much.
        amount: Money,
    },
    /// Releases an authorization with nothing captured.
    Void,
    /// Gives captured money back.
    Refund {
        /// How much.
        amount: Money,
    },
}

/// Facts about a payment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PaymentEvent {
    /// The payment was opened.
    PaymentRequested {
        /// The order.
        order_id: OrderId,
        /// Amount to authorize.
        amount: Money,
        /// Customer's token.
        token: PaymentToken,
    },
    /// An authorization attempt ended; see its outcome.
    AuthorizationAttempted(Attempt),
    /// Money was captured.
    PaymentCaptured {
        /// How much.
        amount: Money,
    },
    /// The authorization was released.
    PaymentVoided,
    /// Money was refunded.
    PaymentRefunded {
        /// How much.
        amount: Money,
    },
}

impl DomainEvent for PaymentEvent {
    fn event_type(&self) -> String {
        match self {
            Self::PaymentRequested { .. } => "PaymentRequested",
            Self::AuthorizationAttempted(_) => "AuthorizationAttempted",
            Self::PaymentCaptured { .. } => "PaymentCaptured",
            Self::PaymentVoided => "PaymentVoided",
            Self::PaymentRefunded { .. } => "PaymentRefunded",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

/// Why a payment command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    /// The payment exists already: a conflict (409).
    #[error("payment already requested")]
    AlreadyRequested,
    /// No payment for this order: not found (404).
    #[error("payment not found")]
    NotFound,
    /// The action does not fit the payment's status (409).
    #[error("cannot {action} a payment that is {status:?}")]
    WrongStatus {
        /// What was attempted.
        action: &'static str,
        /// The status it was in.
        status: PaymentStatus,
    },
    /// An amount in another currency than the payment's (422).
    #[error("amount must be in the payment's currency")]
    CurrencyMismatch,
    /// An amount of zero (422).
    #[error("amount must be positive")]
    ZeroAmount,
    /// Capturing more than was authorized (422).
    #[error("capture of {requested} exceeds the {remaining} still authorized")]
    CaptureExceedsAuthorized {
        /// Minor units asked for.
        requested: i64,
        /// Minor units still capturable.
        remaining: i64,
    },
    /// Refunding more than was captured (422).
    #[error("refund of {requested} exceeds the {remaining} still refundable")]
    RefundExceedsCaptured {
        /// Minor units asked for.
        requested: i64,
        /// Minor units still refundable.
        remaining: i64,
    },
}

/// The payment aggregate's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Payment {
    status: PaymentStatus,
    amount: Option<Money>,
    attempts: Vec<Attempt>,
    captured_minor: i64,
    refunded_minor: i64,
}

impl Payment {
    /// The current status.
    pub fn status(&self) -> PaymentStatus {
        self.status
    }

    /// The amount requested (and authorized once authorized).
    pub fn amount(&self) -> Option<Money> {
        self.amount
    }

    /// Every authorization attempt, oldest first.
    pub fn attempts(&self) -> &[Attempt] {
        &self.attempts
    }

    /// Minor units captured so far.
    pub fn captured_minor(&self) -> i64 {
        self.captured_minor
    }

    /// Minor units refunded so far.
    pub fn refunded_minor(&self) -> i64 {
        self.refunded_minor
    }

    /// Decides a command against the current state.
    ///
    /// # Errors
    /// A [`PaymentError`] naming the rule the command breaks; no event is produced then.
    pub fn decide(&self, command: PaymentCommand) -> Result<Vec<PaymentEvent>, PaymentError> {
        use PaymentStatus as S;
        let Some(total) = self.amount else {
            return match command {
                PaymentCommand::Request {
                    order_id,
                    amount,
                    token,
                } if amount.amount_minor() > 0 => Ok(vec![PaymentEvent::PaymentRequested {
                    order_id,
                    amount,
                    token,
                }]),
                PaymentCommand::Request { .. } => Err(PaymentError::ZeroAmount),
                _ => Err(PaymentError::NotFound),
            };
        };
        let wrong = |action| PaymentError::WrongStatus {
            action,
            status: self.status,
        };
        let event = match command {
            PaymentCommand::Request { .. } => return Err(PaymentError::AlreadyRequested),
            PaymentCommand::RecordAttempt {
                attempt_id,
                outcome,
            } => {
                if self.attempts.iter().any(|a| a.attempt_id == attempt_id) {
                    return Ok(vec![]);
                }
                if self.status != S::Requested {
                    return Err(wrong("record an attempt on"));
                }
                PaymentEvent::AuthorizationAttempted(Attempt {
                    number: u32::try_from(self.attempts.len()).unwrap_or(u32::MAX - 1) + 1,
                    attempt_id,
                    outcome,
                })
            }
            PaymentCommand::Capture { amount } => {
                if !matches!(self.status, S::Authorized | S::Captured) {
                    return Err(wrong("capture"));
                }
                let requested = self.positive_in_currency(amount, total)?;
                let remaining = total.amount_minor() - self.captured_minor;
                if requested > remaining {
                    return Err(PaymentError::CaptureExceedsAuthorized {
                        requested,
                        remaining,
                    });
                }
                PaymentEvent::PaymentCaptured { amount }
            }
            PaymentCommand::Void => match self.status {
                S::Authorized => PaymentEvent::PaymentVoided,
                S::Voided => return Ok(vec![]),
                _ => return Err(wrong("void")),
            },
            PaymentCommand::Refund { amount } => {
                if !matches!(self.status, S::Captured) {
                    return Err(wrong("refund"));
                }
                let requested = self.positive_in_currency(amount, total)?;
                let remaining = self.captured_minor - self.refunded_minor;
                if requested > remaining {
                    return Err(PaymentError::RefundExceedsCaptured {
                        requested,
                        remaining,
                    });
                }
                PaymentEvent::PaymentRefunded { amount }
            }
        };
        Ok(vec![event])
    }

    fn positive_in_currency(&self, amount: Money, total: Money) -> Result<i64, PaymentError> {
        if amount.currency() != total.currency() {
            return Err(PaymentError::CurrencyMismatch);
        }
        if amount.amount_minor() == 0 {
            return Err(PaymentError::ZeroAmount);
        }
        Ok(amount.amount_minor())
    }

    /// Folds one event into the state.
    pub fn apply_event(&mut self, event: PaymentEvent) {
        match event {
            PaymentEvent::PaymentRequested { amount, .. } => {
                self.status = PaymentStatus::Requested;
                self.amount = Some(amount);
            }
            PaymentEvent::AuthorizationAttempted(attempt) => {
                self.status = match &attempt.outcome {
                    AttemptOutcome::Authorized { .. } => PaymentStatus::Authorized,
                    AttemptOutcome::Declined { .. } => PaymentStatus::Declined,
                    AttemptOutcome::Failed {
                        retryable: true, ..
                    } => PaymentStatus::Requested,
                    AttemptOutcome::Failed {
                        retryable: false, ..
                    } => PaymentStatus::Failed,
                };
                self.attempts.push(attempt);
            }
            PaymentEvent::PaymentCaptured { amount } => {
                self.status = PaymentStatus::Captured;
                self.captured_minor += amount.amount_minor();
            }
            PaymentEvent::PaymentVoided => self.status = PaymentStatus::Voided,
            PaymentEvent::PaymentRefunded { amount } => {
                self.refunded_minor += amount.amount_minor();
                if self.refunded_minor == self.captured_minor {
                    self.status = PaymentStatus::Refunded;
                }
            }
        }
    }
}

crate::cqrs_aggregate!(
    Payment,
    "payment",
    PaymentCommand,
    PaymentEvent,
    PaymentError
);

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;
    use crate::values::Currency;

    type Given = TestFramework<Payment>;

    fn eur(minor: i64) -> Money {
        Money::new(minor, Currency::parse("EUR").unwrap()).unwrap()
    }
    fn requested() -> PaymentEvent {
        PaymentEvent::PaymentRequested {
            order_id: OrderId::from(uuid::Uuid::from_u128(1)),
            amount: eur(1000),
            token: PaymentToken::parse("tok_visa").unwrap(),
        }
    }
    fn attempt(n: u32, outcome: AttemptOutcome) -> PaymentEvent {
        PaymentEvent::AuthorizationAttempted(Attempt {
            number: n,
            attempt_id: format!("a{n}"),
            outcome,
        })
    }
    fn authorized(n: u32) -> PaymentEvent {
        attempt(
            n,
            AttemptOutcome::Authorized {
                provider_reference: "ref".into(),
            },
        )
    }
    fn record(n: u32, outcome: AttemptOutcome) -> PaymentCommand {
        PaymentCommand::RecordAttempt {
            attempt_id: format!("a{n}"),
            outcome,
        }
    }
    fn transient() -> AttemptOutcome {
        AttemptOutcome::Failed {
            error: "timeout".into(),
            retryable: true,
        }
    }

    #[test]
    fn requesting_a_payment_opens_it() {
        Given::with(())
            .given_no_previous_events()
            .when(PaymentCommand::Request {
                order_id: OrderId::from(uuid::Uuid::from_u128(1)),
                amount: eur(1000),
                token: PaymentToken::parse("tok_visa").unwrap(),
            })
            .then_expect_events(vec![requested()]);
    }

    #[test]
    fn a_payment_is_requested_once() {
        Given::with(())
            .given(vec![requested()])
            .when(PaymentCommand::Request {
                order_id: OrderId::from(uuid::Uuid::from_u128(1)),
                amount: eur(1000),
                token: PaymentToken::parse("tok_visa").unwrap(),
            })
            .then_expect_error_message("payment already requested");
    }

    #[test]
    fn every_attempt_is_numbered_and_recorded() {
        Given::with(())
            .given(vec![requested(), attempt(1, transient())])
            .when(record(
                2,
                AttemptOutcome::Authorized {
                    provider_reference: "ref".into(),
                },
            ))
            .then_expect_events(vec![authorized(2)]);
    }

    #[test]
    fn recording_the_same_attempt_twice_is_a_no_op() {
        Given::with(())
            .given(vec![requested(), authorized(1)])
            .when(record(
                1,
                AttemptOutcome::Authorized {
                    provider_reference: "ref".into(),
                },
            ))
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_declined_payment_takes_no_further_attempts() {
        let declined = AttemptOutcome::Declined {
            reason: "insufficient funds".into(),
        };
        Given::with(())
            .given(vec![requested(), attempt(1, declined)])
            .when(record(2, transient()))
            .then_expect_error_message("cannot record an attempt on a payment that is Declined");
    }

    #[test]
    fn capture_may_not_exceed_the_authorization() {
        Given::with(())
            .given(vec![requested(), authorized(1)])
            .when(PaymentCommand::Capture { amount: eur(1001) })
            .then_expect_error_message("capture of 1001 exceeds the 1000 still authorized");
        Given::with(())
            .given(vec![
                requested(),
                authorized(1),
                PaymentEvent::PaymentCaptured { amount: eur(600) },
            ])
            .when(PaymentCommand::Capture { amount: eur(400) })
            .then_expect_events(vec![PaymentEvent::PaymentCaptured { amount: eur(400) }]);
    }

    #[test]
    fn an_unauthorized_payment_cannot_be_captured() {
        Given::with(())
            .given(vec![requested()])
            .when(PaymentCommand::Capture { amount: eur(1) })
            .then_expect_error_message("cannot capture a payment that is Requested");
    }

    #[test]
    fn refund_may_not_exceed_what_was_captured() {
        let captured = PaymentEvent::PaymentCaptured { amount: eur(600) };
        Given::with(())
            .given(vec![requested(), authorized(1), captured.clone()])
            .when(PaymentCommand::Refund { amount: eur(601) })
            .then_expect_error_message("refund of 601 exceeds the 600 still refundable");
        Given::with(())
            .given(vec![requested(), authorized(1), captured])
            .when(PaymentCommand::Refund { amount: eur(600) })
            .then_expect_events(vec![PaymentEvent::PaymentRefunded { amount: eur(600) }]);
    }

    #[test]
    fn only_an_uncaptured_authorization_can_be_voided() {
        Given::with(())
            .given(vec![requested(), authorized(1)])
            .when(PaymentCommand::Void)
            .then_expect_events(vec![PaymentEvent::PaymentVoided]);
        Given::with(())
            .given(vec![
                requested(),
                authorized(1),
                PaymentEvent::PaymentCaptured { amount: eur(1) },
            ])
            .when(PaymentCommand::Void)
            .then_expect_error_message("cannot void a payment that is Captured");
        Given::with(())
            .given(vec![
                requested(),
                authorized(1),
                PaymentEvent::PaymentVoided,
            ])
            .when(PaymentCommand::Void)
            .then_expect_events(vec![]);
    }

    #[test]
    fn amounts_in_another_currency_are_refused() {
        let usd = Money::new(1, Currency::parse("USD").unwrap()).unwrap();
        Given::with(())
            .given(vec![requested(), authorized(1)])
            .when(PaymentCommand::Capture { amount: usd })
            .then_expect_error_message("amount must be in the payment's currency");
    }

    #[test]
    fn commands_before_the_request_are_not_found() {
        Given::with(())
            .given_no_previous_events()
            .when(PaymentCommand::Void)
            .then_expect_error_message("payment not found");
    }
}
