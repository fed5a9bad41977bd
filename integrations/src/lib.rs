//! Integrators on orderline's Kafka topics (see the README, "Consuming orderline events").
//!
//! - [`inbox`]: a consumer-group member that applies each event once: an inbox of event ids in
//!   the handler's own transaction, offsets committed only after it committed.
//! - [`notifications`]: the notifications integrator built on it, with an SMTP notifier and a
//!   log notifier.

pub mod inbox;
pub mod notifications;
