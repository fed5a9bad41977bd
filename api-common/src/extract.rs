//! Extractors for what comes in the URL, under the one error policy: a path or query-string
//! value that cannot be read is a 400 problem naming the parameter (never axum's `text/plain`),
//! an unknown query parameter is a 400 naming it, and an order id that cannot be decoded or is
//! not a UUID is a 404 like every other unknown order.
//!
//! No value in a URL may hold control characters (`%00` and the like): no identifier, filter or
//! cursor of the API has them, and Postgres refuses a NUL in text outright, which would surface
//! as a 500. They are refused here, once, for every route.

use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use aggregates::values::OrderId;

use crate::error::{ApiError, FieldError};

/// Path parameters deserialized into `T`; a value that does not fit is a 400 naming its
/// parameter.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if let Ok(raw) = axum::extract::RawPathParams::from_request_parts(parts, state).await {
            for (key, value) in &raw {
                if value.chars().any(char::is_control) {
                    return Err(ApiError::field(key, CONTROL_CHARACTERS));
                }
            }
        }
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Self(value))
            .map_err(path_error)
    }
}

const CONTROL_CHARACTERS: &str = "must not contain control characters";

fn path_error(rejection: PathRejection) -> ApiError {
    let PathRejection::FailedToDeserializePathParams(failed) = &rejection else {
        // The route has no parameters to give: a bug in the router, not in the request.
        return ApiError::Internal(rejection.body_text());
    };
    let (field, message) = match failed.kind() {
        ErrorKind::InvalidUtf8InPathParam { key } => (key.clone(), "is not valid UTF-8".into()),
        ErrorKind::ParseErrorAtKey {
            key, expected_type, ..
        } => (
            key.clone(),
            format!("must be a {}", type_name(expected_type)),
        ),
        ErrorKind::DeserializeError { key, message, .. } => (key.clone(), message.clone()),
        other => ("path".to_owned(), other.to_string()),
    };
    ApiError::field(field, message)
}

/// The last segment of a Rust type name, as a reader of the API would say it.
fn type_name(rust: &str) -> &str {
    match rust.rsplit("::").next().unwrap_or(rust) {
        "Uuid" => "UUID",
        "i64" | "i32" | "u64" | "u32" | "usize" => "whole number in range",
        "bool" => "boolean (true or false)",
        other => other,
    }
}

/// The `{id}` (or `{order_id}`) path parameter as an order id. Anything that cannot be one,
/// bytes that are not UTF-8 included, names no order: 404, the answer for an unknown order.
#[derive(Debug, Clone, Copy)]
pub struct OrderPath(pub OrderId);

impl<S: Send + Sync> FromRequestParts<S> for OrderPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let not_found = || ApiError::NotFound("order not found".into());
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|_| not_found())?;
        Uuid::parse_str(&raw)
            .map(|id| Self(OrderId::from(id)))
            .map_err(|_| not_found())
    }
}

/// The query string deserialized into `T` (declare it `deny_unknown_fields`): a malformed value
/// or an unknown parameter is a 400 naming the parameter.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parse_query(parts.uri.query().unwrap_or_default()).map(Self)
    }
}

/// Parses a query string into `T`, naming the parameter that does not fit.
///
/// # Errors
/// [`ApiError::BadRequest`] naming the parameter.
pub fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if value.chars().any(char::is_control) || name.chars().any(char::is_control) {
            return Err(ApiError::BadRequest {
                detail: "the query string is invalid".into(),
                errors: vec![FieldError::new(name, CONTROL_CHARACTERS)],
            });
        }
    }
    let deserializer =
        serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let message = error.into_inner().to_string();
        let field = if path == "." {
            // Serde names an unknown or duplicate field only in its message: `unknown field
            // `foo`, expected ...`.
            message
                .split('`')
                .nth(1)
                .map_or_else(|| "query".to_owned(), str::to_owned)
        } else {
            path
        };
        ApiError::BadRequest {
            detail: "the query string is invalid".into(),
            errors: vec![FieldError::new(field, message)],
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[expect(dead_code, reason = "only parsed")]
    struct Q {
        limit: Option<i64>,
        low_stock: Option<bool>,
    }

    fn field_of(query: &str) -> String {
        match parse_query::<Q>(query) {
            Err(ApiError::BadRequest { errors, .. }) => errors[0].field.clone(),
            other => panic!("{query}: {other:?}"),
        }
    }

    #[test]
    fn each_bad_query_parameter_is_named() {
        assert_eq!(field_of("limit=abc"), "limit");
        assert_eq!(field_of("limit=9223372036854775808"), "limit");
        assert_eq!(field_of("low_stock=maybe"), "low_stock");
        assert_eq!(field_of("limit=1&colour=red"), "colour");
        assert_eq!(field_of("limit=%00"), "limit");
        assert!(parse_query::<Q>("limit=5&low_stock=true").is_ok());
        assert!(parse_query::<Q>("").is_ok());
    }
}
