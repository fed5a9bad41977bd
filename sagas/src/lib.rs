//! The order fulfillment process: reserve stock, authorize the payment, confirm the order, with
//! a compensation beside every step, and the payment gateway port it talks to.
//!
//! - [`fulfillment`]: the saga as a pure state machine (what to do next, given what happened);
//! - [`runtime`]: runs it from the global log and calls the gateway, exactly once per step;
//! - [`store`]: the saga rows, for the runtime and for operators;
//! - [`gateway`]: the payment provider port, a simulated provider and a Stripe-style adapter.
//!
//! Why it is shaped like this: `docs/adr/0007-fulfillment-saga.md`.

pub mod fulfillment;
pub mod gateway;
pub mod runtime;
pub mod store;
