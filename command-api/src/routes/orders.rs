//! Order commands: place (customer), cancel (owner or admin), ship (admin).
//!
//! Placing prices every line from the catalog (the inventory aggregates) at that moment; the
//! client never sends a price. Another customer's order answers 404, as if it did not exist.

use std::collections::HashMap;

use api_common::extract::OrderPath;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use aggregates::inventory::Product;
use aggregates::order::{Order, OrderCommand, OrderLine, MAX_LINES, MAX_LINE_QUANTITY};
use aggregates::values::{
    CustomerId, OrderId, PaymentToken, Quantity, Reason, ShippingAddress, ShippingLabel, Sku,
};

use super::{checked, Fields};
use crate::executor::{execute, Answer, Envelope};
use crate::request::CommandRequest;
use crate::CommandState;
use api_common::auth::{Actor, Admin, Customer, CustomerOrAdmin, Role};
use api_common::error::ApiError;

/// One requested line: what and how many, never a price.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineBody {
    sku: String,
    quantity: i64,
}

/// How the customer pays.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentBody {
    token: String,
}

/// Body of `POST /api/v1/orders`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrderBody {
    lines: Vec<LineBody>,
    payment: PaymentBody,
    shipping_address: Option<String>,
}

/// Body of `POST /api/v1/orders/{id}/cancel`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    reason: Option<String>,
}

/// Body of `POST /api/v1/orders/{id}/ship`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShipBody {
    carrier: Option<String>,
    tracking: Option<String>,
}

/// Places an order for the token's customer. 202 `{order_id, status: "pending", position}`.
///
/// # Errors
/// 400 for invalid fields, 401/403 (customers only), 422 for an unknown SKU or another rule.
pub async fn place(
    State(state): State<CommandState>,
    Customer(actor): Customer,
    request: CommandRequest<PlaceOrderBody>,
) -> Result<Answer, ApiError> {
    let order = &request.body;
    let mut f = Fields::default();
    if order.lines.is_empty() || order.lines.len() > MAX_LINES {
        f.check(
            "lines",
            Err::<(), _>(format!("must have 1 to {MAX_LINES} lines")),
        );
    }
    let wanted: Vec<(usize, Sku, Quantity)> = order
        .lines
        .iter()
        .enumerate()
        .take(MAX_LINES)
        .filter_map(|(i, line)| {
            let sku = f.check(format!("lines[{i}].sku"), Sku::parse(&line.sku));
            let quantity = f.check(
                format!("lines[{i}].quantity"),
                Quantity::parse_at_most(line.quantity, MAX_LINE_QUANTITY),
            );
            Some((i, sku?, quantity?))
        })
        .collect();
    let token = f.check("payment.token", PaymentToken::parse(&order.payment.token));
    let address = order
        .shipping_address
        .as_deref()
        .and_then(|a| f.check("shipping_address", ShippingAddress::parse(a)));
    let customer_id = f.check("sub", CustomerId::parse(&actor.sub));
    f.finish()?;

    // Every line's product in one query: a snapshot and the few events after it each.
    let skus: Vec<&str> = wanted.iter().map(|(_, sku, _)| sku.as_str()).collect();
    let products: HashMap<String, Product> = state
        .store
        .load_many::<Product>(&skus)
        .await?
        .into_iter()
        .map(|(sku, loaded)| (sku, loaded.aggregate))
        .collect();
    let mut lines = Vec::with_capacity(wanted.len());
    for (i, sku, quantity) in wanted {
        let catalog = products
            .get(sku.as_str())
            .and_then(Product::catalog)
            .ok_or_else(|| ApiError::rule(format!("lines[{i}].sku"), "unknown sku"))?;
        lines.push(OrderLine {
            sku,
            quantity,
            unit_price: catalog.price,
        });
    }

    let order_id = OrderId::from(Uuid::new_v4());
    let command = OrderCommand::Place {
        order_id,
        customer_id: checked(customer_id)?,
        lines,
        payment_token: checked(token)?,
        shipping_address: address,
    };
    execute::<Order, _, _>(
        &state,
        &request.envelope(&actor),
        &order_id.to_string(),
        |_| Ok(command.clone()),
        |order, position| Answer {
            status: StatusCode::ACCEPTED,
            location: Some(format!("/api/v1/orders/{order_id}")),
            body: json!({ "order_id": order_id, "status": order.status(), "position": position }),
        },
    )
    .await
}

/// Refuses callers who may not act on `order`: customers other than its owner see 404.
fn visible_to(actor: &Actor, order: &Order) -> Result<(), ApiError> {
    let owner = order.placed().map(|p| p.customer_id.as_str());
    match actor.role {
        Role::Admin if owner.is_some() => Ok(()),
        Role::Customer if owner == Some(actor.sub.as_str()) => Ok(()),
        _ => Err(ApiError::NotFound("order not found".into())),
    }
}

/// Runs a lifecycle command on an order the actor may see; answers 202
/// `{order_id, status, position}`.
async fn transition(
    state: &CommandState,
    envelope: &Envelope<'_>,
    order_id: OrderId,
    command: OrderCommand,
) -> Result<Answer, ApiError> {
    execute::<Order, _, _>(
        state,
        envelope,
        &order_id.to_string(),
        |order| {
            visible_to(envelope.actor, order)?;
            Ok(command.clone())
        },
        |order, position| Answer {
            status: StatusCode::ACCEPTED,
            location: None,
            body: json!({ "order_id": order_id, "status": order.status(), "position": position }),
        },
    )
    .await
}

/// Cancels a pending or confirmed order. 202 `{order_id, status, position}`.
///
/// # Errors
/// 400, 401, 403 (service role), 404 (unknown or another customer's), 409 if not cancellable.
pub async fn cancel(
    State(state): State<CommandState>,
    CustomerOrAdmin(actor): CustomerOrAdmin,
    OrderPath(order_id): OrderPath,
    request: CommandRequest<CancelBody>,
) -> Result<Answer, ApiError> {
    let mut f = Fields::default();
    let reason = request
        .body
        .reason
        .as_deref()
        .and_then(|r| f.check("reason", Reason::parse(r)));
    f.finish()?;
    let command = OrderCommand::Cancel { reason };
    transition(&state, &request.envelope(&actor), order_id, command).await
}

/// Ships a confirmed order. 202 `{order_id, status: "shipped", position}`.
///
/// # Errors
/// 400, 401, 403 (admins only), 404, 409 unless the order is confirmed.
pub async fn ship(
    State(state): State<CommandState>,
    Admin(actor): Admin,
    OrderPath(order_id): OrderPath,
    request: CommandRequest<ShipBody>,
) -> Result<Answer, ApiError> {
    let mut f = Fields::default();
    let mut label = |name: &str, raw: &Option<String>| {
        raw.as_deref()
            .and_then(|v| f.check(name, ShippingLabel::parse(v)))
    };
    let carrier = label("carrier", &request.body.carrier);
    let tracking = label("tracking", &request.body.tracking);
    f.finish()?;
    let command = OrderCommand::Ship { carrier, tracking };
    transition(&state, &request.envelope(&actor), order_id, command).await
}
