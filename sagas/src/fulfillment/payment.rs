//! The payment side of the saga: where the payment is ([`PaymentProgress`]), the gateway calls
//! it waits on ([`GatewayOp`]) and how their answers move it ([`Fulfillment::on_gateway`]).
//!
//! A gateway answer never leaves the saga in doubt about money: an unknown outcome is asked
//! about (retrieve) before anything else, an authorization that comes late is voided, and every
//! attempt and settlement is booked on the payment aggregate ([`PaymentRecord`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use aggregates::order::RejectionReason;
use aggregates::payment::AttemptOutcome;
use aggregates::values::OrderId;

use crate::gateway::{Authorization, GatewayError};

use super::timing::{backoff, Timing};
use super::{Fulfillment, Goal};

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

impl Fulfillment {
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

    /// Whether money is held or may be held at the provider: compensation must settle it.
    pub(super) fn holds_money(&self) -> bool {
        matches!(
            self.payment,
            PaymentProgress::Requested { .. }
                | PaymentProgress::Authorized { .. }
                | PaymentProgress::Captured { .. }
        )
    }
}
