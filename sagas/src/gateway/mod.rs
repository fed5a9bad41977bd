//! The payment gateway port: what the fulfillment process needs from a payment provider.
//!
//! Every operation carries an idempotency key chosen by the caller (deterministic per order and
//! step), so sending it again never charges twice, and an authorization whose answer was lost
//! can be asked for by that key ([`PaymentGateway::retrieve`]) instead of being assumed failed.
//!
//! Implementations: [`simulated::SimulatedGateway`] (the tokens of `../shared/API.md`, with
//! durable memory in Postgres) and [`stripe::StripeGateway`] (a Stripe-style HTTP API).

pub mod simulated;
pub mod stripe;

use aggregates::values::{Money, PaymentToken};
use serde::{Deserialize, Serialize};

/// What a provider decided about an authorization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Authorization {
    /// The amount is held on the customer's card.
    Authorized {
        /// The provider's id for the authorization; capture, void and refund name it.
        reference: String,
    },
    /// The provider refused; final for this payment method.
    Declined {
        /// The provider's reason (e.g. `card_declined`).
        reason: String,
    },
}

/// Why a gateway call did not give an answer. The variant says what the caller may do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// The call may or may not have taken effect (a timeout, a connection lost after sending).
    /// Never assume it failed: ask [`PaymentGateway::retrieve`], or repeat it with the same key.
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// The call did not take effect and may succeed later; retry with back-off, same key.
    #[error("temporary failure: {0}")]
    Transient(String),
    /// The call was refused for good (bad request, unknown token, nothing to capture).
    #[error("refused: {0}")]
    Permanent(String),
}

/// A payment provider.
#[async_trait::async_trait]
pub trait PaymentGateway: Send + Sync {
    /// Holds `amount` on the payment method `token`.
    ///
    /// # Errors
    /// [`GatewayError`]; a decline is an `Ok` [`Authorization::Declined`], not an error.
    async fn authorize(
        &self,
        key: &str,
        token: &PaymentToken,
        amount: Money,
    ) -> Result<Authorization, GatewayError>;

    /// What the provider decided for the authorization sent with `key`; `None` if it never
    /// received it (then sending it again is safe).
    ///
    /// # Errors
    /// [`GatewayError::Transient`] or [`GatewayError::Unknown`] when the provider cannot be asked.
    async fn retrieve(&self, key: &str) -> Result<Option<Authorization>, GatewayError>;

    /// Takes `amount` of the authorization `reference`.
    ///
    /// # Errors
    /// [`GatewayError`]; `Permanent` when there is nothing (left) to capture.
    async fn capture(&self, key: &str, reference: &str, amount: Money) -> Result<(), GatewayError>;

    /// Releases the authorization `reference` without taking anything.
    ///
    /// # Errors
    /// [`GatewayError`]; `Permanent` when it was already captured.
    async fn void(&self, key: &str, reference: &str) -> Result<(), GatewayError>;

    /// Gives back `amount` of what was captured on `reference`.
    ///
    /// # Errors
    /// [`GatewayError`]; `Permanent` when more than was captured is asked for.
    async fn refund(&self, key: &str, reference: &str, amount: Money) -> Result<(), GatewayError>;
}
