//! The hash chain that makes edits to the log evident (ADR 9).
//!
//! Each event stores `hash = SHA-256(previous hash in its stream ‖ canonical JSON of the event)`,
//! computed here when it is appended and written in the same insert. The canonical JSON is an
//! object of the event's identity and content (`event_id`, `aggregate_type`, `aggregate_id`,
//! `sequence`, `event_type`, `event_version`, `payload`, `metadata`) with every object's keys
//! sorted and no whitespace, so the hash can be recomputed from what Postgres returns, whatever
//! order `jsonb` keeps keys in.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// What the hash of one event covers.
#[derive(Debug, Clone, Copy)]
pub struct Hashed<'a> {
    /// Event id.
    pub event_id: Uuid,
    /// Aggregate type.
    pub aggregate_type: &'a str,
    /// Aggregate id.
    pub aggregate_id: &'a str,
    /// Sequence in the stream.
    pub sequence: i64,
    /// Event type.
    pub event_type: &'a str,
    /// Event schema version.
    pub event_version: &'a str,
    /// The payload as stored.
    pub payload: &'a Value,
    /// The metadata as stored.
    pub metadata: &'a Value,
}

impl Hashed<'_> {
    /// The event's hash, chained to `previous` (the hash of the event before it in its stream;
    /// `None` for the first).
    pub fn hash(&self, previous: Option<&[u8]>) -> Vec<u8> {
        let content = json!({
            "event_id": self.event_id,
            "aggregate_type": self.aggregate_type,
            "aggregate_id": self.aggregate_id,
            "sequence": self.sequence,
            "event_type": self.event_type,
            "event_version": self.event_version,
            "payload": self.payload,
            "metadata": self.metadata,
        });
        let mut text = String::new();
        canonical(&content, &mut text);
        let mut digest = Sha256::new();
        digest.update(previous.unwrap_or_default());
        digest.update(text.as_bytes());
        digest.finalize().to_vec()
    }
}

/// Writes `value` as JSON with sorted object keys and no whitespace.
fn canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event<'a>(payload: &'a Value, metadata: &'a Value) -> Hashed<'a> {
        Hashed {
            event_id: Uuid::nil(),
            aggregate_type: "order",
            aggregate_id: "o1",
            sequence: 1,
            event_type: "OrderConfirmed",
            event_version: "1",
            payload,
            metadata,
        }
    }

    #[test]
    fn key_order_does_not_change_the_hash_but_content_and_chain_do() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": {"y": 2, "x": [1, 2]}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a": {"x": [1, 2], "y": 2}, "b": 1}"#).unwrap();
        let c: Value = serde_json::from_str(r#"{"a": {"x": [2, 1], "y": 2}, "b": 1}"#).unwrap();
        let meta = json!({"actor_sub": "ops"});
        assert_eq!(event(&a, &meta).hash(None), event(&b, &meta).hash(None));
        assert_ne!(event(&a, &meta).hash(None), event(&c, &meta).hash(None));
        assert_ne!(
            event(&a, &meta).hash(None),
            event(&a, &meta).hash(Some(b"x"))
        );
        assert_eq!(event(&a, &meta).hash(None).len(), 32);
    }
}
