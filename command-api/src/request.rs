//! What the command handlers take from a request before a command exists: the JSON body (with
//! field-named errors and a fingerprint for idempotency) and the `Idempotency-Key` header.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::executor::Envelope;
use api_common::auth::Actor;
use api_common::error::{ApiError, FieldError};
use api_common::ids::RequestIds;

/// Largest request body accepted, in bytes. An order of 100 lines with long SKUs fits easily.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A JSON request body parsed into `T`, plus a fingerprint of the request it came in.
///
/// The fingerprint hashes the method, the path and the body re-serialized with sorted keys, so
/// the same request sent twice with other whitespace or key order has the same fingerprint.
/// An empty body reads as `{}`, so commands whose fields are all optional need none.
pub struct JsonBody<T> {
    /// The parsed body.
    pub value: T,
    /// SHA-256 of method, path and canonical body.
    pub fingerprint: Vec<u8>,
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let has_json_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| {
                let v = v.trim().to_ascii_lowercase();
                v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
            });
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(MAX_BODY_BYTES)
            } else {
                ApiError::field("body", rejection.body_text())
            }
        })?;
        let json: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Object(serde_json::Map::new())
        } else {
            if has_json_type != Some(true) {
                return Err(ApiError::UnsupportedMediaType);
            }
            serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::field("body", format!("not valid JSON: {e}")))?
        };
        let mut hasher = Sha256::new();
        hasher.update(method.as_str());
        hasher.update([0]);
        hasher.update(&path);
        hasher.update([0]);
        // serde_json::Value keeps object keys sorted, so this serialization is canonical.
        hasher.update(serde_json::to_vec(&json).unwrap_or_default());
        let fingerprint = hasher.finalize().to_vec();
        let value = serde_path_to_error::deserialize(json).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "body".to_owned() } else { path };
            ApiError::BadRequest {
                detail: "the request body does not have the expected shape".into(),
                errors: vec![FieldError::new(field, e.into_inner())],
            }
        })?;
        Ok(Self { value, fingerprint })
    }
}

/// The `Idempotency-Key` header, if sent: 1-255 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get("idempotency-key") else {
            return Ok(Self(None));
        };
        let key = value
            .to_str()
            .ok()
            .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| {
                ApiError::field("Idempotency-Key", "must be 1-255 visible ASCII characters")
            })?;
        Ok(Self(Some(key.to_owned())))
    }
}

/// Everything a command handler takes from the request besides authentication and the path:
/// the parsed body, the ids, the idempotency key and the request's fingerprint.
pub struct CommandRequest<T> {
    /// The parsed body.
    pub body: T,
    ids: RequestIds,
    idempotency_key: Option<String>,
    fingerprint: Vec<u8>,
}

impl<T> CommandRequest<T> {
    /// The envelope [`crate::executor::execute`] needs, for `actor`.
    pub fn envelope<'a>(&'a self, actor: &'a Actor) -> Envelope<'a> {
        Envelope {
            actor,
            ids: &self.ids,
            idempotency_key: self.idempotency_key.as_deref(),
            fingerprint: &self.fingerprint,
        }
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for CommandRequest<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let ids = RequestIds::from_request_parts(&mut parts, state).await?;
        let IdempotencyKey(idempotency_key) =
            IdempotencyKey::from_request_parts(&mut parts, state).await?;
        let JsonBody { value, fingerprint } =
            JsonBody::from_request(Request::from_parts(parts, body), state).await?;
        Ok(Self {
            body: value,
            ids,
            idempotency_key,
            fingerprint,
        })
    }
}
