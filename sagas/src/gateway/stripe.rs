//! An adapter for a Stripe-style payments API (`/v1/payment_intents`, form-encoded requests,
//! `Idempotency-Key` headers, bearer API key). Authorizations are payment intents confirmed
//! with `capture_method=manual`; the caller's key is also stored as
//! `metadata[orderline_key]` so an authorization whose answer was lost can be found again.
//!
//! Failures map onto [`GatewayError`] by whether the request may have taken effect: a timeout
//! after sending is `Unknown`; no connection, 409, 429 and 5xx are `Transient`; other 4xx are
//! `Permanent`; a card error (402) is a decline.

use std::time::Duration;

use reqwest::{Client, RequestBuilder, Response, StatusCode};
use serde::Deserialize;

use aggregates::values::{Money, PaymentToken};

use super::{Authorization, GatewayError, PaymentGateway};

/// Where the provider is and how to call it.
#[derive(Debug, Clone)]
pub struct StripeConfig {
    /// e.g. `https://api.stripe.com`.
    pub base_url: String,
    /// The secret API key.
    pub api_key: String,
    /// Longest wait for one answer; past it the outcome is unknown.
    pub timeout: Duration,
}

/// The adapter.
#[derive(Clone)]
pub struct StripeGateway {
    client: Client,
    config: StripeConfig,
}

#[derive(Debug, Deserialize)]
struct Intent {
    id: String,
    status: String,
    #[serde(default)]
    last_payment_error: Option<ErrorBody>,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    decline_code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorEnvelope {
    error: ErrorBody,
}

#[derive(Debug, Deserialize)]
struct SearchResult {
    data: Vec<Intent>,
}

impl ErrorBody {
    fn reason(&self) -> String {
        self.decline_code
            .clone()
            .or_else(|| self.code.clone())
            .unwrap_or_else(|| "declined".into())
    }
}

impl StripeGateway {
    /// An adapter for `config`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS set-up).
    pub fn new(config: StripeConfig) -> Result<Self, reqwest::Error> {
        let client = Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .build()?;
        Ok(Self { client, config })
    }

    fn post(&self, path: &str, key: &str) -> RequestBuilder {
        self.client
            .post(format!("{}{path}", self.config.base_url))
            .bearer_auth(&self.config.api_key)
            .header("Idempotency-Key", key)
    }

    /// Sends a request; maps transport failures and non-success statuses.
    async fn send(&self, request: RequestBuilder) -> Result<Response, GatewayError> {
        let response = request.send().await.map_err(|e| {
            if e.is_connect() {
                GatewayError::Transient(format!("cannot reach the provider: {e}"))
            } else {
                GatewayError::Unknown(format!("no answer from the provider: {e}"))
            }
        })?;
        let status = response.status();
        if status.is_success() || status == StatusCode::PAYMENT_REQUIRED {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ErrorEnvelope>(&body)
            .ok()
            .and_then(|e| e.error.message)
            .unwrap_or(body);
        if status == StatusCode::CONFLICT
            || status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error()
        {
            Err(GatewayError::Transient(format!("{status}: {message}")))
        } else {
            Err(GatewayError::Permanent(format!("{status}: {message}")))
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(response: Response) -> Result<T, GatewayError> {
        response
            .json()
            .await
            .map_err(|e| GatewayError::Unknown(format!("unreadable answer: {e}")))
    }

    /// What an intent's status means for an authorization; `None` while still undecided.
    fn judge(intent: Intent) -> Option<Authorization> {
        match intent.status.as_str() {
            "requires_capture" | "succeeded" => Some(Authorization::Authorized {
                reference: intent.id,
            }),
            "requires_payment_method" | "canceled" => Some(Authorization::Declined {
                reason: intent
                    .last_payment_error
                    .map_or_else(|| intent.status.clone(), |e| e.reason()),
            }),
            _ => None,
        }
    }

    async fn settle(&self, request: RequestBuilder) -> Result<(), GatewayError> {
        let response = self.send(request).await?;
        if response.status() == StatusCode::PAYMENT_REQUIRED {
            let error: ErrorEnvelope = Self::json(response).await?;
            return Err(GatewayError::Permanent(error.error.reason()));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl PaymentGateway for StripeGateway {
    async fn authorize(
        &self,
        key: &str,
        token: &PaymentToken,
        amount: Money,
    ) -> Result<Authorization, GatewayError> {
        let form = [
            ("amount", amount.amount_minor().to_string()),
            ("currency", amount.currency().code().to_ascii_lowercase()),
            ("payment_method", token.as_str().to_owned()),
            ("confirm", "true".into()),
            ("capture_method", "manual".into()),
            ("metadata[orderline_key]", key.to_owned()),
        ];
        let response = self
            .send(self.post("/v1/payment_intents", key).form(&form))
            .await?;
        if response.status() == StatusCode::PAYMENT_REQUIRED {
            let error: ErrorEnvelope = Self::json(response).await?;
            return Ok(Authorization::Declined {
                reason: error.error.reason(),
            });
        }
        let intent: Intent = Self::json(response).await?;
        Self::judge(intent).ok_or_else(|| {
            GatewayError::Unknown("the provider has not decided yet; ask again".into())
        })
    }

    async fn retrieve(&self, key: &str) -> Result<Option<Authorization>, GatewayError> {
        let query = format!("metadata['orderline_key']:'{}'", key.replace('\'', "\\'"));
        let request = self
            .client
            .get(format!(
                "{}/v1/payment_intents/search",
                self.config.base_url
            ))
            .bearer_auth(&self.config.api_key)
            .query(&[("query", query)]);
        let found: SearchResult = Self::json(self.send(request).await?).await?;
        match found.data.into_iter().next() {
            None => Ok(None),
            Some(intent) => Self::judge(intent).map(Some).ok_or_else(|| {
                GatewayError::Unknown("the provider has not decided yet; ask again".into())
            }),
        }
    }

    async fn capture(&self, key: &str, reference: &str, amount: Money) -> Result<(), GatewayError> {
        let form = [("amount_to_capture", amount.amount_minor().to_string())];
        let path = format!("/v1/payment_intents/{reference}/capture");
        self.settle(self.post(&path, key).form(&form)).await
    }

    async fn void(&self, key: &str, reference: &str) -> Result<(), GatewayError> {
        let path = format!("/v1/payment_intents/{reference}/cancel");
        self.settle(self.post(&path, key)).await
    }

    async fn refund(&self, key: &str, reference: &str, amount: Money) -> Result<(), GatewayError> {
        let form = [
            ("payment_intent", reference.to_owned()),
            ("amount", amount.amount_minor().to_string()),
        ];
        self.settle(self.post("/v1/refunds", key).form(&form)).await
    }
}
