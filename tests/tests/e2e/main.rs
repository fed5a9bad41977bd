//! End-to-end tests: the real server, the real Postgres. One binary, one module per concern.
#![expect(
    clippy::unwrap_used,
    reason = "a test that cannot go on should fail loudly"
)]

mod admin;
mod auth;
mod concurrency;
mod gateway;
mod hostile;
mod idempotency;
mod inventory;
mod large_log;
mod leases;
mod log;
mod notifications;
mod orders;
mod queries;
mod relay;
mod routes;
mod sagas;
mod store;
mod upcast;
mod validation;
