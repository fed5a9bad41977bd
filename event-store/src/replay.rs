//! The one fold of stored events into an aggregate. Loading for a command, time travel, the
//! audit's decode check and the tests' read-model oracle all read events through here, so an
//! old event shape is upcast the same way everywhere (see [`crate::upcast`]).

use cqrs_es::Aggregate;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::upcast;

/// A stored payload as it was read.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// Raw JSON text: an event in the current shape is decoded straight from it, with no
    /// intermediate JSON tree (the hot path of loading for a command).
    Text(&'a str),
    /// An already parsed JSON value.
    Json(&'a Value),
}

/// The current-shape events of type `E` that one stored event of `aggregate_type` stands for:
/// itself when it is current, else what its upcasters make of it (possibly nothing).
///
/// # Errors
/// The serde error when the payload (or an upcast of it) does not decode into `E`.
pub fn decode<E: DeserializeOwned>(
    aggregate_type: &str,
    event_type: &str,
    event_version: &str,
    payload: Payload<'_>,
) -> Result<Vec<E>, serde_json::Error> {
    if !upcast::is_old(aggregate_type, event_type, event_version) {
        let event = match payload {
            Payload::Text(text) => serde_json::from_str(text)?,
            Payload::Json(value) => E::deserialize(value)?,
        };
        return Ok(vec![event]);
    }
    let value = match payload {
        Payload::Text(text) => serde_json::from_str(text)?,
        Payload::Json(value) => value.clone(),
    };
    upcast::upcast(aggregate_type, event_type, event_version, value)
        .into_iter()
        .map(|current| serde_json::from_value(current.payload))
        .collect()
}

/// Applies one stored event of `A`'s stream to `aggregate`, with `A`'s own `apply`.
///
/// # Errors
/// The serde error when the payload does not decode into `A::Event`; `aggregate` is then
/// unchanged.
pub fn apply<A: Aggregate>(
    aggregate: &mut A,
    event_type: &str,
    event_version: &str,
    payload: Payload<'_>,
) -> Result<(), serde_json::Error> {
    for event in decode::<A::Event>(A::TYPE, event_type, event_version, payload)? {
        aggregate.apply(event);
    }
    Ok(())
}
