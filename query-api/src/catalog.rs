//! The catalog (`/products`, any role) and stock levels (`/inventory`, admin and service), both
//! from the inventory read model.

use api_common::extract::{Path, Query};
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use api_common::auth::{Actor, AdminOrService};
use api_common::error::ApiError;
use projections::inventory::InventoryRow;

use crate::{reached, Consistency, QueryState, Read};

const PROJECTION: &str = "inventory";
const MAX_LIMIT: i64 = 500;

/// A product as the catalog shows it.
#[derive(Debug, Serialize)]
pub struct ProductView {
    sku: String,
    name: String,
    price: Value,
    available: i64,
}

/// A SKU's stock levels.
#[derive(Debug, Serialize)]
pub struct LevelView {
    sku: String,
    on_hand: i64,
    reserved: i64,
    available: i64,
    low_stock: bool,
}

impl From<InventoryRow> for ProductView {
    fn from(r: InventoryRow) -> Self {
        Self {
            sku: r.sku,
            name: r.name,
            price: r.price,
            available: r.available,
        }
    }
}

impl From<InventoryRow> for LevelView {
    fn from(r: InventoryRow) -> Self {
        Self {
            sku: r.sku,
            on_hand: r.on_hand,
            reserved: r.reserved,
            available: r.available,
            low_stock: r.low_stock,
        }
    }
}

/// A page of items.
#[derive(Debug, Serialize)]
pub struct Page<T> {
    items: Vec<T>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    next_cursor: Option<String>,
}

/// Query of the lists.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<i64>,
    cursor: Option<String>,
    low_stock: Option<bool>,
    min_position: Option<i64>,
}

async fn row(state: &QueryState, sku: &str) -> Result<InventoryRow, ApiError> {
    projections::inventory::get(&state.pool, sku)
        .await?
        .ok_or_else(|| ApiError::NotFound("unknown sku".into()))
}

/// SKUs after `cursor`, in SKU order.
async fn page<T: From<InventoryRow>>(
    state: &QueryState,
    query: ListQuery,
) -> Result<Read<Page<T>>, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("must be 1 to {MAX_LIMIT}"),
        ));
    }
    let consistency = Consistency {
        min_position: query.min_position,
    };
    let cursor = reached(state, PROJECTION, &consistency).await?;
    let mut rows = projections::inventory::list(
        &state.pool,
        query.cursor.as_deref(),
        query.low_stock.unwrap_or(false),
        limit + 1,
    )
    .await?;
    let size = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = rows.len() > size;
    rows.truncate(size);
    let next_cursor = more.then(|| rows.last().map(|r| r.sku.clone())).flatten();
    Ok(Read {
        position: cursor.position,
        body: Page {
            items: rows.into_iter().map(T::from).collect(),
            next_cursor,
        },
    })
}

/// `GET /api/v1/products/{sku}` (any role).
///
/// # Errors
/// 401; 404 for an unknown SKU; 503 when `min_position` is not reached in time.
pub async fn product(
    State(state): State<QueryState>,
    _: Actor,
    Path(sku): Path<String>,
    Query(consistency): Query<Consistency>,
) -> Result<Read<ProductView>, ApiError> {
    let cursor = reached(&state, PROJECTION, &consistency).await?;
    Ok(Read {
        position: cursor.position,
        body: row(&state, &sku).await?.into(),
    })
}

/// `GET /api/v1/products?limit=&cursor=` (any role), in SKU order.
///
/// # Errors
/// 400 for a bad limit; 401.
pub async fn products(
    State(state): State<QueryState>,
    _: Actor,
    Query(query): Query<ListQuery>,
) -> Result<Read<Page<ProductView>>, ApiError> {
    page(&state, query).await
}

/// `GET /api/v1/inventory/{sku}` (admin, service).
///
/// # Errors
/// 401/403; 404 for an unknown SKU.
pub async fn level(
    State(state): State<QueryState>,
    _: AdminOrService,
    Path(sku): Path<String>,
    Query(consistency): Query<Consistency>,
) -> Result<Read<LevelView>, ApiError> {
    let cursor = reached(&state, PROJECTION, &consistency).await?;
    Ok(Read {
        position: cursor.position,
        body: row(&state, &sku).await?.into(),
    })
}

/// `GET /api/v1/inventory?low_stock=true&limit=&cursor=` (admin, service).
///
/// # Errors
/// 400 for a bad limit; 401/403.
pub async fn levels(
    State(state): State<QueryState>,
    _: AdminOrService,
    Query(query): Query<ListQuery>,
) -> Result<Read<Page<LevelView>>, ApiError> {
    page(&state, query).await
}
