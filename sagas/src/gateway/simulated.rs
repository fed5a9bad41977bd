//! The built-in simulated payment gateway. Tokens (from `../shared/API.md`):
//!
//! | token | outcome |
//! |---|---|
//! | `tok_visa` | authorized |
//! | `tok_declined` | declined (`card_declined`) |
//! | `tok_timeout_then_ok` | the first call with a key answers "unknown" (a timeout), but did authorize |
//! | `tok_flaky` | the first two calls with a key fail temporarily, the third authorizes |
//! | `tok_slow` | authorized after 2 s |
//!
//! Any other token is refused for good. Every answer can be made to take a fixed time on top
//! ([`SimulatedGateway::with_latency`], `ORDERLINE_SIMULATED_GATEWAY_LATENCY_MS`), to model a
//! real provider's round trip in benchmarks and tests. Like a real provider it keeps what it did, here in the
//! `simulated_gateway_operations` table: the same key gets the same outcome again, outcomes can be
//! asked for by key, and that memory survives a restart of the caller.

use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;

use aggregates::values::{Money, PaymentToken};

use super::{Authorization, GatewayError, PaymentGateway};

/// The simulated gateway.
#[derive(Clone)]
pub struct SimulatedGateway {
    pool: PgPool,
    slow: Duration,
    latency: Duration,
}

/// Prefix of the references it gives out; the rest is the authorization's key.
const REFERENCE_PREFIX: &str = "sim_";

impl SimulatedGateway {
    /// Connections of the gateway's own pool.
    pub const CONNECTIONS: u32 = 4;

    /// A gateway keeping its records in `pool`'s database, through a pool of its own of
    /// [`SimulatedGateway::CONNECTIONS`] (named `orderline-simulated-gateway:PID`), as a
    /// provider is a system of its own: hundreds of calls in flight must not take the
    /// connections of the server that calls it (they did, and starved calls failed and were
    /// made again). Calls wait for a connection up to 30 s.
    pub fn new(pool: PgPool) -> Self {
        let options = (*pool.connect_options()).clone().application_name(&format!(
            "orderline-simulated-gateway:{}",
            std::process::id()
        ));
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(Self::CONNECTIONS)
            .acquire_timeout(Duration::from_secs(30))
            .connect_lazy_with(options);
        Self {
            pool,
            slow: Duration::from_secs(2),
            latency: Duration::ZERO,
        }
    }

    /// The same gateway, taking `latency` longer to answer every call (a provider's round trip).
    #[must_use]
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Waits out the configured latency, as a provider's round trip would.
    async fn round_trip(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }

    /// Registers one more call with `key` and returns (calls so far, outcome if decided), after
    /// checking the key is not reused for another operation, token or amount.
    async fn call(
        &self,
        key: &str,
        operation: &str,
        token: &str,
        amount: Money,
    ) -> Result<(i32, Option<Value>), GatewayError> {
        let row: (i32, Option<Value>, String, String, i64, String) = sqlx::query_as(
            "INSERT INTO simulated_gateway_operations
                    (idempotency_key, operation, token, amount_minor, currency, calls)
             VALUES ($1, $2, $3, $4, $5, 1)
             ON CONFLICT (idempotency_key) DO UPDATE
                SET calls = simulated_gateway_operations.calls + 1
             RETURNING calls, outcome, operation, token, amount_minor, currency",
        )
        .bind(key)
        .bind(operation)
        .bind(token)
        .bind(amount.amount_minor())
        .bind(amount.currency().code())
        .fetch_one(&self.pool)
        .await
        .map_err(transient)?;
        let (calls, outcome, stored_operation, stored_token, minor, currency) = row;
        if stored_operation != operation
            || stored_token != token
            || minor != amount.amount_minor()
            || currency != amount.currency().code()
        {
            return Err(GatewayError::Permanent(format!(
                "idempotency key {key} was used for another request"
            )));
        }
        Ok((calls, outcome))
    }

    /// Records the outcome for `key` unless one was recorded meanwhile; returns the one that
    /// stands.
    async fn decide(&self, key: &str, outcome: Value) -> Result<Value, GatewayError> {
        let stored: Option<Value> = sqlx::query_scalar(
            "UPDATE simulated_gateway_operations SET outcome = coalesce(outcome, $2)
              WHERE idempotency_key = $1 RETURNING outcome",
        )
        .bind(key)
        .bind(&outcome)
        .fetch_one(&self.pool)
        .await
        .map_err(transient)?;
        Ok(stored.unwrap_or(outcome))
    }

    /// The authorization behind `reference`, with what was captured and refunded on it.
    async fn authorization(&self, reference: &str) -> Result<Held, GatewayError> {
        let refused = || GatewayError::Permanent(format!("no authorization {reference}"));
        let key = reference
            .strip_prefix(REFERENCE_PREFIX)
            .ok_or_else(refused)?;
        let held: Option<(i64, Option<Value>, i64, i64, bool)> = sqlx::query_as(
            "SELECT a.amount_minor, a.outcome,
                    coalesce(sum(o.amount_minor) FILTER (WHERE o.operation = 'capture' AND o.outcome IS NOT NULL), 0)::bigint,
                    coalesce(sum(o.amount_minor) FILTER (WHERE o.operation = 'refund' AND o.outcome IS NOT NULL), 0)::bigint,
                    bool_or(o.operation = 'void' AND o.outcome IS NOT NULL) IS TRUE
               FROM simulated_gateway_operations a
               LEFT JOIN simulated_gateway_operations o ON o.token = $2 AND o.operation <> 'authorize'
              WHERE a.idempotency_key = $1 AND a.operation = 'authorize'
              GROUP BY a.amount_minor, a.outcome",
        )
        .bind(key)
        .bind(reference)
        .fetch_optional(&self.pool)
        .await
        .map_err(transient)?;
        match held {
            Some((authorized, Some(outcome), captured, refunded, voided))
                if outcome.get("authorized").is_some() =>
            {
                Ok(Held {
                    authorized,
                    captured,
                    refunded,
                    voided,
                })
            }
            _ => Err(refused()),
        }
    }

    /// Runs a capture, void or refund once per key: a key already done answers `Ok` again.
    async fn settle(
        &self,
        key: &str,
        operation: &str,
        reference: &str,
        amount: Money,
        allowed: impl FnOnce(&Held) -> Result<(), String>,
    ) -> Result<(), GatewayError> {
        let (_, outcome) = self.call(key, operation, reference, amount).await?;
        if outcome.is_some() {
            return Ok(());
        }
        let held = self.authorization(reference).await?;
        if let Err(why) = allowed(&held) {
            sqlx::query("DELETE FROM simulated_gateway_operations WHERE idempotency_key = $1 AND outcome IS NULL")
                .bind(key)
                .execute(&self.pool)
                .await
                .map_err(transient)?;
            return Err(GatewayError::Permanent(why));
        }
        self.decide(key, serde_json::json!({ "done": {} })).await?;
        Ok(())
    }
}

/// An authorization's money.
struct Held {
    authorized: i64,
    captured: i64,
    refunded: i64,
    voided: bool,
}

fn transient(error: sqlx::Error) -> GatewayError {
    GatewayError::Transient(format!("gateway storage: {error}"))
}

fn read(outcome: Value) -> Result<Authorization, GatewayError> {
    serde_json::from_value(outcome).map_err(|e| GatewayError::Permanent(e.to_string()))
}

#[async_trait::async_trait]
impl PaymentGateway for SimulatedGateway {
    async fn authorize(
        &self,
        key: &str,
        token: &PaymentToken,
        amount: Money,
    ) -> Result<Authorization, GatewayError> {
        self.round_trip().await;
        let (calls, outcome) = self.call(key, "authorize", token.as_str(), amount).await?;
        if let Some(outcome) = outcome {
            return read(outcome);
        }
        let authorized = serde_json::to_value(Authorization::Authorized {
            reference: format!("{REFERENCE_PREFIX}{key}"),
        })
        .map_err(|e| GatewayError::Permanent(e.to_string()))?;
        match token.as_str() {
            "tok_visa" => read(self.decide(key, authorized).await?),
            "tok_declined" => {
                let declined = serde_json::json!({ "declined": { "reason": "card_declined" } });
                read(self.decide(key, declined).await?)
            }
            "tok_timeout_then_ok" => {
                let outcome = read(self.decide(key, authorized).await?)?;
                if calls == 1 {
                    return Err(GatewayError::Unknown(
                        "the provider did not answer in time".into(),
                    ));
                }
                Ok(outcome)
            }
            "tok_flaky" if calls <= 2 => Err(GatewayError::Transient(
                "the provider is temporarily unavailable".into(),
            )),
            "tok_flaky" => read(self.decide(key, authorized).await?),
            "tok_slow" => {
                tokio::time::sleep(self.slow).await;
                read(self.decide(key, authorized).await?)
            }
            other => {
                sqlx::query("DELETE FROM simulated_gateway_operations WHERE idempotency_key = $1 AND outcome IS NULL")
                    .bind(key)
                    .execute(&self.pool)
                    .await
                    .map_err(transient)?;
                Err(GatewayError::Permanent(format!(
                    "unknown payment token {other}"
                )))
            }
        }
    }

    async fn retrieve(&self, key: &str) -> Result<Option<Authorization>, GatewayError> {
        self.round_trip().await;
        let outcome: Option<Option<Value>> = sqlx::query_scalar(
            "SELECT outcome FROM simulated_gateway_operations
              WHERE idempotency_key = $1 AND operation = 'authorize'",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(transient)?;
        outcome.flatten().map(read).transpose()
    }

    async fn capture(&self, key: &str, reference: &str, amount: Money) -> Result<(), GatewayError> {
        self.round_trip().await;
        let wanted = amount.amount_minor();
        self.settle(key, "capture", reference, amount, |held| {
            if held.voided {
                Err("the authorization was voided".into())
            } else if held.captured + wanted > held.authorized {
                Err(format!(
                    "capture of {wanted} exceeds the {} still authorized",
                    held.authorized - held.captured
                ))
            } else {
                Ok(())
            }
        })
        .await
    }

    async fn void(&self, key: &str, reference: &str) -> Result<(), GatewayError> {
        self.round_trip().await;
        let nothing = Money::zero(
            aggregates::values::Currency::parse("EUR")
                .map_err(|e| GatewayError::Permanent(e.to_string()))?,
        );
        self.settle(key, "void", reference, nothing, |held| {
            if held.captured > 0 {
                Err("the authorization was captured; refund instead".into())
            } else {
                Ok(())
            }
        })
        .await
    }

    async fn refund(&self, key: &str, reference: &str, amount: Money) -> Result<(), GatewayError> {
        self.round_trip().await;
        let wanted = amount.amount_minor();
        self.settle(key, "refund", reference, amount, |held| {
            if held.refunded + wanted > held.captured {
                Err(format!(
                    "refund of {wanted} exceeds the {} still refundable",
                    held.captured - held.refunded
                ))
            } else {
                Ok(())
            }
        })
        .await
    }
}
