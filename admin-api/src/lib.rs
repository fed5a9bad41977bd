//! The operators' routes (`../shared/API.md`, section Admin and tooling), admin role only
//! except `/metrics`: the global log ([`log`]), each consumer's progress and projection rebuilds
//! ([`consumers`]), an aggregate as it was ([`streams`]), the fulfillment sagas ([`sagas`]),
//! the notifications queue ([`notifications`]), keys parked on a poison event ([`parked`]) and
//! Prometheus metrics ([`metrics`]).
//!
//! Every write here is an operator's action on a background process (retry a saga, retry a
//! notification, rebuild a projection, retry or skip a parked key); each goes through the
//! crate that owns the table.

pub mod consumers;
pub mod log;
pub mod metrics;
pub mod notifications;
pub mod parked;
pub mod sagas;
pub mod streams;

use axum::extract::FromRef;
use axum::routing::{get, post};
use axum::Router;
use sqlx::PgPool;

use api_common::auth::TokenKeys;

/// What the admin handlers share.
#[derive(Clone)]
pub struct AdminState {
    /// The database.
    pub pool: PgPool,
    /// Token verification keys.
    pub keys: TokenKeys,
}

impl FromRef<AdminState> for TokenKeys {
    fn from_ref(state: &AdminState) -> Self {
        state.keys.clone()
    }
}

/// The admin routes and `/metrics`, ready to be merged into the server's router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/api/v1/admin/events", get(log::events))
        .route("/api/v1/admin/projections", get(consumers::list))
        .route(
            "/api/v1/admin/projections/{name}/rebuild",
            post(consumers::rebuild),
        )
        .route(
            "/api/v1/admin/streams/{aggregate_type}/{id}",
            get(streams::stream),
        )
        .route("/api/v1/admin/notifications", get(notifications::list))
        .route(
            "/api/v1/admin/notifications/{event_id}/retry",
            post(notifications::retry),
        )
        .route("/api/v1/admin/parked", get(parked::list))
        .route(
            "/api/v1/admin/parked/{consumer}/{key}/retry",
            post(parked::retry),
        )
        .route(
            "/api/v1/admin/parked/{consumer}/{key}/skip",
            post(parked::skip),
        )
        .route("/api/v1/admin/sagas", get(sagas::list))
        .route("/api/v1/admin/sagas/{order_id}", get(sagas::one))
        .route("/api/v1/admin/sagas/{order_id}/retry", post(sagas::retry))
        .route("/metrics", get(metrics::metrics))
        .with_state(state)
}
