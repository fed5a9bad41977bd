//! Upcasters: stored events of older shapes, read as the current ones.
//!
//! The log is never rewritten (its hash chains cover the stored form, ADR 9); old events are
//! turned into current ones on the way in, wherever events are read: aggregate loads, the
//! loads under the write lock, time travel, `verify`, and every log consumer (through
//! `event_log::LogEvent::current`). An upcaster may keep one event (1 → 1), split it
//! (1 → N) or drop it (1 → 0); they chain until no upcaster applies.
//!
//! | stored | becomes | why |
//! |---|---|---|
//! | `inventory` `ProductRegistered` v1 | `ProductRegistered` v2 | v1 could lack `low_stock_threshold` (before thresholds existed); v2 always has it (0 when absent) |
//! | `inventory` `ProductCreated` v1 | `ProductRegistered` v2, then `Restocked` v1 | the first catalog event carried opening stock; it is now a registration plus a restock |
//! | `inventory` `StockCounted` v1 | nothing | a stock count that changed nothing; superseded by `StockAdjusted` |

use serde_json::{json, Map, Value};

/// An event in its current shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Current {
    /// Event type.
    pub event_type: String,
    /// Its current schema version.
    pub event_version: String,
    /// The payload, as the aggregate's event enum deserializes it.
    pub payload: Value,
}

/// One step from an old shape.
struct Upcaster {
    aggregate_type: &'static str,
    event_type: &'static str,
    version: &'static str,
    up: fn(Value) -> Vec<Current>,
}

const UPCASTERS: &[Upcaster] = &[
    Upcaster {
        aggregate_type: "inventory",
        event_type: "ProductRegistered",
        version: "1",
        up: product_registered_v1,
    },
    Upcaster {
        aggregate_type: "inventory",
        event_type: "ProductCreated",
        version: "1",
        up: product_created_v1,
    },
    Upcaster {
        aggregate_type: "inventory",
        event_type: "StockCounted",
        version: "1",
        up: |_| Vec::new(),
    },
];

/// Whether an event of this type and version is stored in an old shape.
pub fn is_old(aggregate_type: &str, event_type: &str, event_version: &str) -> bool {
    find(aggregate_type, event_type, event_version).is_some()
}

fn find(aggregate_type: &str, event_type: &str, event_version: &str) -> Option<&'static Upcaster> {
    UPCASTERS.iter().find(|u| {
        u.aggregate_type == aggregate_type
            && u.event_type == event_type
            && u.version == event_version
    })
}

/// The current events a stored event stands for: itself when it is current, else what its
/// upcasters make of it (possibly nothing).
pub fn upcast(
    aggregate_type: &str,
    event_type: &str,
    event_version: &str,
    payload: Value,
) -> Vec<Current> {
    let mut done = Vec::new();
    let mut todo = vec![Current {
        event_type: event_type.to_owned(),
        event_version: event_version.to_owned(),
        payload,
    }];
    // Chains are short; the bound only stops a registry mistake from looping forever.
    for _ in 0..16 {
        let mut next = Vec::new();
        for event in todo {
            match find(aggregate_type, &event.event_type, &event.event_version) {
                Some(upcaster) => next.extend((upcaster.up)(event.payload)),
                None => done.push(event),
            }
        }
        if next.is_empty() {
            return done;
        }
        todo = next;
    }
    done.extend(todo);
    done
}

fn body(payload: &Value, variant: &str) -> Map<String, Value> {
    payload
        .get(variant)
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

fn product_registered_v1(payload: Value) -> Vec<Current> {
    let mut fields = body(&payload, "ProductRegistered");
    fields
        .entry("low_stock_threshold")
        .or_insert_with(|| json!(0));
    vec![Current {
        event_type: "ProductRegistered".into(),
        event_version: "2".into(),
        payload: json!({ "ProductRegistered": fields }),
    }]
}

fn product_created_v1(payload: Value) -> Vec<Current> {
    let fields = body(&payload, "ProductCreated");
    let stock = fields.get("stock").and_then(Value::as_u64).unwrap_or(0);
    let mut events = vec![Current {
        event_type: "ProductRegistered".into(),
        event_version: "2".into(),
        payload: json!({ "ProductRegistered": {
            "sku": fields.get("sku"), "name": fields.get("name"), "price": fields.get("price"),
            "low_stock_threshold": 0, "initial_stock": 0,
        }}),
    }];
    if stock > 0 {
        events.push(Current {
            event_type: "Restocked".into(),
            event_version: "1".into(),
            payload: json!({ "Restocked": { "quantity": stock, "note": "opening stock" } }),
        });
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_events_pass_through_old_ones_are_kept_split_or_dropped() {
        let restocked = json!({"Restocked": {"quantity": 3, "note": null}});
        assert_eq!(
            upcast("inventory", "Restocked", "1", restocked.clone()),
            vec![Current {
                event_type: "Restocked".into(),
                event_version: "1".into(),
                payload: restocked
            }]
        );
        let old = json!({"ProductRegistered": {"sku": "A", "name": "A",
            "price": {"amount_minor": 1, "currency": "EUR"}, "initial_stock": 2}});
        let new = upcast("inventory", "ProductRegistered", "1", old);
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].event_version, "2");
        assert_eq!(
            new[0].payload["ProductRegistered"]["low_stock_threshold"],
            0
        );
        let created = json!({"ProductCreated": {"sku": "A", "name": "A",
            "price": {"amount_minor": 1, "currency": "EUR"}, "stock": 5}});
        let split = upcast("inventory", "ProductCreated", "1", created);
        let types: Vec<&str> = split.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, ["ProductRegistered", "Restocked"]);
        assert!(upcast("inventory", "StockCounted", "1", json!({})).is_empty());
    }
}
