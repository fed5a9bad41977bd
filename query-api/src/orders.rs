//! Order queries: one order, the lists, its events and its live status updates.

use std::convert::Infallible;

use api_common::extract::{OrderPath, Query};
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use aggregates::order::OrderStatus;
use api_common::auth::{Actor, CustomerOrAdmin, Role};
use api_common::error::ApiError;
use event_log::checkpoints;
use event_log::LogEvent;
use projections::orders::OrderRow;

use crate::{reached, Consistency, QueryState, Read};

const PROJECTION: &str = "orders";

/// An order as the API shows it.
#[derive(Debug, Serialize)]
pub struct OrderView {
    order_id: Uuid,
    customer_id: String,
    status: OrderStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    lines: Value,
    total: Value,
    created_at: chrono::DateTime<chrono::Utc>,
    updated_at: chrono::DateTime<chrono::Utc>,
    history: Vec<projections::orders::StatusChange>,
}

impl From<OrderRow> for OrderView {
    fn from(row: OrderRow) -> Self {
        Self {
            order_id: row.order_id,
            customer_id: row.customer_id,
            status: row.status,
            reason: row.reason,
            lines: row.lines,
            total: row.total,
            created_at: row.created_at,
            updated_at: row.updated_at,
            history: row.history,
        }
    }
}

fn not_found() -> ApiError {
    ApiError::NotFound("order not found".into())
}

/// The order, if it exists and `actor` may see it (owner or admin); else 404.
async fn visible_order(pool: &sqlx::PgPool, actor: &Actor, id: Uuid) -> Result<OrderRow, ApiError> {
    visible(actor, projections::orders::get(pool, id).await?)
}

/// `row`, if `actor` may see it (owner or admin); else 404.
fn visible(actor: &Actor, row: Option<OrderRow>) -> Result<OrderRow, ApiError> {
    let row = row.ok_or_else(not_found)?;
    if actor.role == Role::Customer && row.customer_id != actor.sub {
        return Err(not_found());
    }
    Ok(row)
}

/// `GET /api/v1/orders/{id}` (owner, admin).
///
/// # Errors
/// 401/403; 404 for an unknown order or another customer's; 503 when `min_position` is not
/// reached in time.
pub async fn one(
    State(state): State<QueryState>,
    CustomerOrAdmin(actor): CustomerOrAdmin,
    OrderPath(id): OrderPath,
    Query(consistency): Query<Consistency>,
) -> Result<Read<OrderView>, ApiError> {
    let id = id.as_uuid();
    let (position, row) = match consistency.min_position {
        None => {
            // The checkpoint and the row in one statement: one snapshot, one round trip.
            let (cursor, row) = checkpoints::cursor_with(
                &state.pool,
                PROJECTION,
                projections::orders::ROW_AS_TEXT_SQL,
                &id.to_string(),
            )
            .await?;
            let row = row
                .as_deref()
                .map(projections::read::decode_text)
                .transpose()?;
            (cursor.position, visible(&actor, row)?)
        }
        Some(_) => {
            let cursor = reached(&state, PROJECTION, &consistency).await?;
            (
                cursor.position,
                visible_order(&state.pool, &actor, id).await?,
            )
        }
    };
    Ok(Read {
        position,
        body: row.into(),
    })
}

/// Query of `GET /api/v1/orders`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
    customer_id: Option<String>,
    min_position: Option<i64>,
}

/// A page of orders.
#[derive(Debug, Serialize)]
pub struct OrderPage {
    items: Vec<OrderView>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    next_cursor: Option<String>,
}

/// Largest page.
const MAX_LIMIT: i64 = 100;

/// `GET /api/v1/orders?status=&limit=&cursor=` newest first. Customers see their own orders;
/// admins see all, optionally one customer's (`customer_id=`). Pages are stable while orders
/// are placed: a page starts below the last order of the previous one.
///
/// # Errors
/// 400 for a bad status, limit or cursor; 403 when a customer asks for another's orders.
pub async fn list(
    State(state): State<QueryState>,
    CustomerOrAdmin(actor): CustomerOrAdmin,
    Query(query): Query<ListQuery>,
) -> Result<Read<OrderPage>, ApiError> {
    let status = query
        .status
        .as_deref()
        .map(|s| {
            serde_json::from_value::<OrderStatus>(json!(s))
                .ok()
                .filter(|s| *s != OrderStatus::New)
                .map(OrderStatus::as_str)
                .ok_or_else(|| {
                    ApiError::field(
                        "status",
                        "must be pending, confirmed, rejected, cancelled or shipped",
                    )
                })
        })
        .transpose()?;
    let limit = query.limit.unwrap_or(20);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("must be 1 to {MAX_LIMIT}"),
        ));
    }
    let before: Option<i64> = query
        .cursor
        .as_deref()
        .map(|c| {
            c.parse()
                .map_err(|_| ApiError::field("cursor", "not a cursor from this API"))
        })
        .transpose()?;
    let customer = match actor.role {
        Role::Customer => match query.customer_id {
            Some(other) if other != actor.sub => {
                return Err(ApiError::Forbidden("admin"));
            }
            _ => Some(actor.sub.clone()),
        },
        _ => query.customer_id,
    };
    let consistency = Consistency {
        min_position: query.min_position,
    };
    let cursor = reached(&state, PROJECTION, &consistency).await?;
    let filter = projections::orders::ListFilter {
        customer_id: customer,
        status,
        before,
        limit: limit + 1,
    };
    let mut items = projections::orders::list(&state.pool, &filter).await?;
    let more = items.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    items.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_cursor = more
        .then(|| items.last().map(|r| r.placed_position.to_string()))
        .flatten();
    Ok(Read {
        position: cursor.position,
        body: OrderPage {
            items: items.into_iter().map(OrderView::from).collect(),
            next_cursor,
        },
    })
}

/// The events of an order's streams (order and payment), oldest first.
#[derive(Debug, Serialize)]
pub struct OrderEvents {
    events: Vec<LogEvent>,
}

/// `GET /api/v1/orders/{id}/events` (owner, admin): read from the log itself, so it is never
/// behind. `X-Orderline-Position` is the newest of these events.
///
/// # Errors
/// 404 for an unknown order or another customer's.
pub async fn events(
    State(state): State<QueryState>,
    CustomerOrAdmin(actor): CustomerOrAdmin,
    OrderPath(id): OrderPath,
) -> Result<Read<OrderEvents>, ApiError> {
    let events =
        event_log::reader::streams(&state.pool, &["order", "payment"], &id.to_string()).await?;
    let owner = events
        .iter()
        .find(|e| e.aggregate_type == "order")
        .and_then(|e| match e.decode::<aggregates::order::OrderEvent>() {
            Ok(aggregates::order::OrderEvent::OrderPlaced { customer_id, .. }) => {
                Some(customer_id.to_string())
            }
            _ => None,
        });
    let visible = match actor.role {
        Role::Admin => owner.is_some(),
        _ => owner.as_deref() == Some(actor.sub.as_str()),
    };
    if !visible {
        return Err(not_found());
    }
    Ok(Read {
        position: events.iter().map(|e| e.position).max().unwrap_or(0),
        body: OrderEvents { events },
    })
}

/// `GET /api/v1/orders/{id}/updates` (owner, admin): Server-Sent Events, one `status` event per
/// status change (starting with the history so far), closing after a final status.
///
/// # Errors
/// 404 for an unknown order or another customer's (use `min_position` right after placing).
pub async fn updates(
    State(state): State<QueryState>,
    CustomerOrAdmin(actor): CustomerOrAdmin,
    OrderPath(id): OrderPath,
    Query(consistency): Query<Consistency>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = id.as_uuid();
    reached(&state, PROJECTION, &consistency).await?;
    visible_order(&state.pool, &actor, id).await?;
    let pool = state.pool.clone();
    let live = state.live.subscribe();
    // Each step sends the next status change, or waits for the read model to move (woken by
    // the process's one listener, never by polling), or ends: after a final status, when the
    // order can no longer be read, or with a goodbye comment when the server shuts down.
    let stream = futures::stream::unfold((0usize, false, live), move |(sent, done, mut live)| {
        let (pool, actor) = (pool.clone(), actor.clone());
        async move {
            if done {
                return None;
            }
            loop {
                if live.closing() {
                    let goodbye = Event::default().comment("the server is shutting down");
                    return Some((Ok(goodbye), (sent, true, live)));
                }
                let row = match visible_order(&pool, &actor, id).await {
                    Ok(row) => row,
                    Err(e) => {
                        tracing::warn!(order_id = %id, error = %e, "status stream stopped");
                        return None;
                    }
                };
                if let Some(change) = row.history.get(sent) {
                    let last = sent + 1 == row.history.len();
                    let done = last
                        && matches!(
                            change.status,
                            OrderStatus::Rejected | OrderStatus::Cancelled | OrderStatus::Shipped
                        );
                    let event = Event::default()
                        .event("status")
                        .id(sent.to_string())
                        .json_data(change)
                        .unwrap_or_else(|_| Event::default().comment("unserializable"));
                    return Some((Ok(event), (sent + 1, done, live)));
                }
                live.next().await;
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
