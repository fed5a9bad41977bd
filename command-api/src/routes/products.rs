//! `POST /api/v1/products` (admin): adds a SKU to the catalog.

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use aggregates::inventory::{Product, ProductCommand};
use aggregates::values::{Currency, Money, ProductName, Sku};

use super::{checked, Fields};
use crate::executor::{execute, Answer};
use crate::request::CommandRequest;
use crate::CommandState;
use api_common::auth::Admin;
use api_common::error::ApiError;

/// Largest stock level or threshold accepted in one request.
const MAX_STOCK: i64 = 1_000_000_000;

/// Money as the contract spells it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoneyBody {
    amount_minor: i64,
    currency: String,
}

impl MoneyBody {
    /// Parses into a price ([`Money::price`]: at least one minor unit), recording errors
    /// under `field`.
    pub(crate) fn parse_price(&self, field: &str, fields: &mut Fields) -> Option<Money> {
        let currency =
            fields.check(format!("{field}.currency"), Currency::parse(&self.currency))?;
        fields.check(
            format!("{field}.amount_minor"),
            Money::price(self.amount_minor, currency),
        )
    }
}

/// Body of `POST /api/v1/products`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterProductBody {
    sku: String,
    name: String,
    price: MoneyBody,
    low_stock_threshold: Option<i64>,
    initial_stock: Option<i64>,
}

fn stock_level(raw: Option<i64>) -> Result<u64, String> {
    match raw.unwrap_or(0) {
        n @ 0..=MAX_STOCK => Ok(n.unsigned_abs()),
        _ => Err(format!("must be between 0 and {MAX_STOCK}")),
    }
}

impl RegisterProductBody {
    fn parse(&self) -> Result<ProductCommand, ApiError> {
        let mut f = Fields::default();
        let sku = f.check("sku", Sku::parse(&self.sku));
        let name = f.check("name", ProductName::parse(&self.name));
        let price = self.price.parse_price("price", &mut f);
        let low_stock_threshold =
            f.check("low_stock_threshold", stock_level(self.low_stock_threshold));
        let initial_stock = f.check("initial_stock", stock_level(self.initial_stock));
        f.finish()?;
        Ok(ProductCommand::Register {
            sku: checked(sku)?,
            name: checked(name)?,
            price: checked(price)?,
            low_stock_threshold: checked(low_stock_threshold)?,
            initial_stock: checked(initial_stock)?,
        })
    }
}

/// Registers a product. 201 `{sku, position}` with `Location`; 409 if the SKU exists.
///
/// # Errors
/// See [`ApiError`]: 400 for invalid fields, 401/403, 409 for a duplicate SKU.
pub async fn register(
    State(state): State<CommandState>,
    Admin(actor): Admin,
    request: CommandRequest<RegisterProductBody>,
) -> Result<Answer, ApiError> {
    let command = request.body.parse()?;
    let ProductCommand::Register { sku, .. } = &command else {
        return Err(ApiError::Internal(
            "register parsed into another command".into(),
        ));
    };
    let sku = sku.clone();
    execute::<Product, _, _>(
        &state,
        &request.envelope(&actor),
        sku.as_str(),
        |_| Ok(command.clone()),
        |_, position| Answer {
            status: StatusCode::CREATED,
            location: Some(format!("/api/v1/products/{sku}")),
            body: json!({ "sku": sku, "position": position }),
        },
    )
    .await
}
