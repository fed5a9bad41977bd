//! The order fulfillment process and what it talks to. So far: the payment gateway port
//! ([`gateway`]), with the built-in simulated gateway and an adapter for a Stripe-style HTTP API.

pub mod gateway;
