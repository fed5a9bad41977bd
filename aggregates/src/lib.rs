//! The orderline domain: pure, synchronous decisions with no I/O.
//!
//! Four kinds of aggregate, each a [`cqrs_es::Aggregate`]:
//! - [`inventory::Product`]: one per SKU, holding the catalog entry and the stock;
//! - [`order::Order`]: one per order, holding its lines and lifecycle;
//! - [`payment::Payment`]: one per order, holding the money movements;
//! - [`operations::LogConsumer`]: one per log consumer, holding operators' actions on it.
//!
//! Each aggregate decides with a plain `decide(&self, command) -> Result<Vec<Event>, Error>`;
//! the cqrs-es `handle` only forwards to it. Facts from outside (prices from the catalog, the
//! customer from the token) arrive inside the command, never through I/O.

pub mod inventory;
pub mod operations;
pub mod order;
pub mod payment;
pub mod values;

/// Implements [`cqrs_es::Aggregate`] for a type with `decide(&self, command)` and
/// `apply_event(&mut self, event)`: `handle` decides and records the events through the sink,
/// `apply` folds one event. Keeps cqrs-es's async `handle` a thin shell over pure code.
macro_rules! cqrs_aggregate {
    ($aggregate:ty, $name:literal, $command:ty, $event:ty, $error:ty) => {
        impl cqrs_es::Aggregate for $aggregate {
            const TYPE: &'static str = $name;
            type Command = $command;
            type Event = $event;
            type Error = $error;
            type Services = ();

            async fn handle(
                &mut self,
                command: Self::Command,
                _: &Self::Services,
                sink: &cqrs_es::event_sink::EventSink<Self>,
            ) -> Result<(), Self::Error> {
                for event in self.decide(command)? {
                    sink.write(event, self).await;
                }
                Ok(())
            }

            fn apply(&mut self, event: Self::Event) {
                self.apply_event(event);
            }
        }
    };
}
pub(crate) use cqrs_aggregate;
