//! What the projections' reads share: rows come out of Postgres as JSON (`to_jsonb`), one shape
//! for the fold's tables and the API's answers.

use serde_json::Value;

/// A row read as JSON into its Rust type; a mismatch is a decode error (a 500, never a panic).
///
/// # Errors
/// [`sqlx::Error::Decode`] when the row does not have the type's shape.
pub fn decode<T: serde::de::DeserializeOwned>(row: Value) -> sqlx::Result<T> {
    serde_json::from_value(row).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// [`decode`] for a row read as JSON text.
///
/// # Errors
/// As [`decode`].
pub fn decode_text<T: serde::de::DeserializeOwned>(row: &str) -> sqlx::Result<T> {
    serde_json::from_str(row).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}
