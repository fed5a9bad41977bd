//! The orderline command API: the write half of the HTTP contract (`../shared/API.md`,
//! section Commands).
//!
//! Every handler follows the same path: authenticate ([`api_common::auth::Actor`]), parse the body into
//! domain types ([`request::JsonBody`]), check the role, then run one command on one aggregate
//! with [`executor::execute`], which answers once the events are committed.

pub mod executor;
pub mod idempotency;
pub mod request;
pub mod routes;

use axum::extract::{DefaultBodyLimit, FromRef};
use axum::routing::post;
use axum::Router;

use event_store::EventStore;

use crate::request::MAX_BODY_BYTES;
use api_common::auth::TokenKeys;

/// What the command handlers share.
#[derive(Clone)]
pub struct CommandState {
    /// The event store.
    pub store: EventStore,
    /// Token verification keys.
    pub keys: TokenKeys,
    /// Per-aggregate write locks of this process.
    pub locks: executor::WriteLocks,
}

impl FromRef<CommandState> for TokenKeys {
    fn from_ref(state: &CommandState) -> Self {
        state.keys.clone()
    }
}

/// The command routes, ready to be merged into the server's router.
pub fn router(state: CommandState) -> Router {
    use routes::{inventory, orders, products};
    Router::new()
        .route("/api/v1/products", post(products::register))
        .route("/api/v1/inventory/{sku}/restock", post(inventory::restock))
        .route("/api/v1/inventory/{sku}/adjust", post(inventory::adjust))
        .route("/api/v1/orders", post(orders::place))
        .route("/api/v1/orders/{id}/cancel", post(orders::cancel))
        .route("/api/v1/orders/{id}/ship", post(orders::ship))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}
