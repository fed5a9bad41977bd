//! Operators' actions on the engine's own consumers, recorded in the log like every other fact
//! (and so in audit, exports and Kafka): one stream per log consumer, its id the consumer's
//! name. Who acted is in the event's metadata (`actor_sub`, `actor_role`), as for every event.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The event an operator chose to skip, as it stood in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedEvent {
    /// The key it was parked under (its aggregate id).
    pub key: String,
    /// Its id.
    pub event_id: Uuid,
    /// Its global position.
    pub position: i64,
    /// Its aggregate type.
    pub aggregate_type: String,
    /// Its type.
    pub event_type: String,
    /// Its sequence in its stream.
    pub sequence: i64,
    /// Why the consumer could not apply it, the last time it tried.
    pub error: String,
}

/// What an operator asks of a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerCommand {
    /// Pass over a parked event for good; the key's later events are applied.
    SkipParkedEvent(SkippedEvent),
}

/// Facts about a consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsumerEvent {
    /// The consumer will never apply this event (an operator's decision).
    ParkedEventSkipped(SkippedEvent),
}

impl DomainEvent for ConsumerEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ParkedEventSkipped(_) => "ParkedEventSkipped",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

/// Why an operator's command on a consumer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsumerError {
    /// The same event was skipped before: skipping is once per event.
    #[error("event {0} was skipped already")]
    AlreadySkipped(Uuid),
}

/// One log consumer as its operators' actions shaped it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogConsumer {
    /// Every event ever skipped, by id.
    skipped: Vec<Uuid>,
}

impl LogConsumer {
    /// Events skipped so far.
    pub fn skipped(&self) -> usize {
        self.skipped.len()
    }

    /// Decides `command` on this state.
    ///
    /// # Errors
    /// [`ConsumerError::AlreadySkipped`] for an event skipped before.
    pub fn decide(&self, command: ConsumerCommand) -> Result<Vec<ConsumerEvent>, ConsumerError> {
        match command {
            ConsumerCommand::SkipParkedEvent(event) => {
                if self.skipped.contains(&event.event_id) {
                    return Err(ConsumerError::AlreadySkipped(event.event_id));
                }
                Ok(vec![ConsumerEvent::ParkedEventSkipped(event)])
            }
        }
    }

    /// Folds one event.
    pub fn apply_event(&mut self, event: ConsumerEvent) {
        match event {
            ConsumerEvent::ParkedEventSkipped(skipped) => self.skipped.push(skipped.event_id),
        }
    }
}

crate::cqrs_aggregate!(
    LogConsumer,
    "consumer",
    ConsumerCommand,
    ConsumerEvent,
    ConsumerError
);

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    fn skipped(event_id: Uuid) -> SkippedEvent {
        SkippedEvent {
            key: "order-1".into(),
            event_id,
            position: 7,
            aggregate_type: "order".into(),
            event_type: "OrderPlaced".into(),
            sequence: 1,
            error: "boom".into(),
        }
    }

    #[test]
    fn an_event_is_skipped_once() {
        let id = Uuid::new_v4();
        TestFramework::<LogConsumer>::with(())
            .given(vec![ConsumerEvent::ParkedEventSkipped(skipped(id))])
            .when(ConsumerCommand::SkipParkedEvent(skipped(id)))
            .then_expect_error(ConsumerError::AlreadySkipped(id));
    }

    #[test]
    fn a_skip_is_recorded_with_what_was_skipped() {
        let id = Uuid::new_v4();
        TestFramework::<LogConsumer>::with(())
            .given_no_previous_events()
            .when(ConsumerCommand::SkipParkedEvent(skipped(id)))
            .then_expect_events(vec![ConsumerEvent::ParkedEventSkipped(skipped(id))]);
    }
}
