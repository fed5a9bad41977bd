//! `POST /api/v1/inventory/{sku}/restock` and `/adjust` (admin): stock changes of one SKU.

use api_common::extract::Path;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use aggregates::inventory::{Product, ProductCommand};
use aggregates::values::{Quantity, Reason, Sku};

use super::{checked, Fields};
use crate::executor::{execute, Answer, Envelope};
use crate::request::CommandRequest;
use crate::CommandState;
use api_common::auth::Admin;
use api_common::error::ApiError;

/// Body of `POST /api/v1/inventory/{sku}/restock`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestockBody {
    quantity: i64,
    note: Option<String>,
}

/// Body of `POST /api/v1/inventory/{sku}/adjust`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdjustBody {
    delta: i64,
    reason: String,
}

/// A stock correction: non-zero and at most [`Quantity::MAX`] either way. Compared without
/// `abs()`, which has no answer for `i64::MIN`.
fn stock_delta(raw: i64) -> Result<i64, String> {
    let max = i64::from(Quantity::MAX);
    match raw {
        0 => Err("must not be zero".to_owned()),
        d if (-max..=max).contains(&d) => Ok(d),
        _ => Err(format!("must be between -{max} and {max}")),
    }
}

fn path_sku(raw: &str) -> Result<Sku, ApiError> {
    Sku::parse(raw).map_err(|e| ApiError::field("sku", e))
}

/// Runs a stock command and answers 200 `{sku, on_hand, position}`.
async fn change_stock(
    state: &CommandState,
    envelope: &Envelope<'_>,
    sku: &Sku,
    command: ProductCommand,
) -> Result<Answer, ApiError> {
    execute::<Product, _, _>(
        state,
        envelope,
        sku.as_str(),
        |_| Ok(command.clone()),
        |product, position| Answer {
            status: StatusCode::OK,
            location: None,
            body: json!({ "sku": sku, "on_hand": product.on_hand(), "position": position }),
        },
    )
    .await
}

/// Adds received units to a SKU's stock.
///
/// # Errors
/// 400 for invalid fields, 401/403, 404 for an unknown SKU, 409 under lasting contention.
pub async fn restock(
    State(state): State<CommandState>,
    Admin(actor): Admin,
    Path(sku): Path<String>,
    request: CommandRequest<RestockBody>,
) -> Result<Answer, ApiError> {
    let sku = path_sku(&sku)?;
    let body = &request.body;
    let mut f = Fields::default();
    let quantity = f.check("quantity", Quantity::parse(body.quantity));
    let note = body
        .note
        .as_deref()
        .and_then(|n| f.check("note", Reason::parse(n)));
    f.finish()?;
    let command = ProductCommand::Restock {
        quantity: checked(quantity)?,
        note,
    };
    change_stock(&state, &request.envelope(&actor), &sku, command).await
}

/// Corrects a SKU's stock by a signed delta, with a reason.
///
/// # Errors
/// 400 for invalid fields, 401/403, 404 for an unknown SKU, 422 when the result would be below
/// what is reserved, 409 under lasting contention.
pub async fn adjust(
    State(state): State<CommandState>,
    Admin(actor): Admin,
    Path(sku): Path<String>,
    request: CommandRequest<AdjustBody>,
) -> Result<Answer, ApiError> {
    let sku = path_sku(&sku)?;
    let body = &request.body;
    let mut f = Fields::default();
    let delta = f.check("delta", stock_delta(body.delta));
    let reason = f.check("reason", Reason::parse(&body.reason));
    f.finish()?;
    let command = ProductCommand::Adjust {
        delta: checked(delta)?,
        reason: checked(reason)?,
    };
    change_stock(&state, &request.envelope(&actor), &sku, command).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delta_is_bounded_both_ways_including_the_extremes_of_i64() {
        let max = i64::from(Quantity::MAX);
        assert_eq!(stock_delta(-max), Ok(-max));
        assert_eq!(stock_delta(max), Ok(max));
        assert!(stock_delta(0).is_err());
        assert!(stock_delta(max + 1).is_err());
        assert!(stock_delta(i64::MIN).is_err());
        assert!(stock_delta(i64::MAX).is_err());
    }
}
