//! How a saga reads to operators: its overall state, its steps' status words and its history.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use aggregates::order::RejectionReason;

use super::steps::STEPS;
use super::{Fulfillment, Goal};

/// The saga's overall state, for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaState {
    /// Moving forward: reserving, authorizing, confirming.
    Running,
    /// Undoing steps after a failure or a cancellation.
    Compensating,
    /// The order is confirmed; waiting for shipment or cancellation.
    Confirmed,
    /// Shipping: committing stock and capturing the payment.
    Settling,
    /// Nothing left to do: shipped, rejected or cancelled.
    Completed,
    /// A compensation or settlement kept failing; an operator must look (and may retry).
    Stuck,
}

impl SagaState {
    /// The lowercase name used in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Confirmed => "confirmed",
            Self::Settling => "settling",
            Self::Completed => "completed",
            Self::Stuck => "stuck",
        }
    }

    /// Parses [`SagaState::as_str`]'s names.
    pub fn parse(raw: &str) -> Option<Self> {
        [
            Self::Running,
            Self::Compensating,
            Self::Confirmed,
            Self::Settling,
            Self::Completed,
            Self::Stuck,
        ]
        .into_iter()
        .find(|s| s.as_str() == raw)
    }
}

/// One entry of a saga's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// When it happened (the clock the runtime passed in).
    pub at: DateTime<Utc>,
    /// What happened, in words.
    pub what: String,
}

/// How many history entries a saga keeps; retries of a flaky provider would otherwise grow it
/// without bound. The oldest go first, except the first (the start).
pub(super) const HISTORY_LIMIT: usize = 40;

impl Fulfillment {
    /// The overall state, for operators.
    pub fn state(&self) -> SagaState {
        if self.stuck.is_some() {
            return SagaState::Stuck;
        }
        if self.is_finished() {
            return SagaState::Completed;
        }
        match self.goal {
            Goal::Confirm if self.order_settled => SagaState::Confirmed,
            Goal::Confirm => SagaState::Running,
            Goal::Reject(_) | Goal::Cancel => SagaState::Compensating,
            Goal::Ship => SagaState::Settling,
        }
    }

    /// The steps in order with their status words, for operators: `(step, status)`, e.g.
    /// `("reserve_stock", "reserved")`.
    pub fn steps(&self) -> Vec<(&'static str, &'static str)> {
        STEPS
            .iter()
            .map(|step| (step.name, (step.status)(self)))
            .collect()
    }

    /// What happened so far, oldest first (the newest 40 entries, and the start).
    pub fn history(&self) -> &[Entry] {
        &self.history
    }

    /// Adds to the history, dropping the oldest entry after the start when it is full.
    pub(super) fn note(&mut self, at: DateTime<Utc>, what: impl Into<String>) {
        if self.history.len() >= HISTORY_LIMIT {
            self.history.remove(1);
        }
        self.history.push(Entry {
            at,
            what: what.into(),
        });
    }
}

/// The API's name for a rejection reason.
pub fn reason_str(reason: RejectionReason) -> &'static str {
    match reason {
        RejectionReason::OutOfStock => "out_of_stock",
        RejectionReason::PaymentDeclined => "payment_declined",
        RejectionReason::PaymentFailed => "payment_failed",
    }
}
